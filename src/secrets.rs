//! The secret rules: each installation keeps its shared secrets as a bounded history (newest
//! last), a roll appends, and this module alone decides which secret may verify what:
//! - a product request: the current secret, or the previous one within the grace window for a
//!   token issued before the roll (never a secret an unsigned install planted);
//! - `enabled`/`disabled` (and legacy `uninstalled`): the current secret;
//! - a legacy reinstall: the current secret or one kept in the history, back to the newest one
//!   that came with an install signed by Atlassian.

use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt::{JwtError, Token};
use connect_protocol::lifecycle::LifecycleEvent;

use crate::store::Installation;

/// How many secrets an installation keeps, newest last.
pub const SECRET_HISTORY_LEN: usize = 10;

/// One shared secret, the moment (Unix seconds) it became current, and whether it arrived
/// with an install proven by Atlassian's RS256 signature. Only the store writes it out, sealed
/// (`store::sealing`).
#[derive(Debug, Clone)]
pub struct SecretVersion {
    pub secret: SharedSecret,
    pub since: i64,
    /// Secrets from unsigned (legacy) installs are never trusted past a signed one.
    pub signed: bool,
}

impl SecretVersion {
    /// What operators see of this secret (`warden tenants show`), never the secret itself:
    /// the first 12 hex digits (48 bits) of the SHA-256 of its UTF-8 bytes, the same as
    /// `printf %s "$secret" | sha256sum | cut -c1-12`. Enough to tell the secrets of one
    /// history apart or to recognise one an operator holds; a one-way digest truncated to
    /// 48 bits gives nothing back of a secret with real entropy (Connect's are long random
    /// strings).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.secret.expose().as_bytes());
        hex::encode(&digest[..6])
    }
}

impl Installation {
    /// Whether Atlassian's signature ever proved an install of this installation. Legacy
    /// mode's unsigned installs may be squatters. The flag is sticky; records written before
    /// it existed are judged by their secret history.
    pub fn ever_signed(&self) -> bool {
        self.atlassian_installed || self.secrets.iter().any(|s| s.signed)
    }

    pub fn current_secret(&self) -> &SecretVersion {
        self.secrets
            .last()
            .expect("an installation always has at least one secret")
    }

    /// The secret current before the last roll, if any.
    pub fn previous_secret(&self) -> Option<&SecretVersion> {
        self.secrets.len().checked_sub(2).map(|i| &self.secrets[i])
    }

    /// Makes `secret` current unless it already is; the history stays bounded. `signed`: it
    /// arrived with an install proven by Atlassian's signature.
    pub fn roll_secret(&mut self, secret: SharedSecret, signed: bool, now: i64) -> bool {
        self.atlassian_installed |= signed;
        if self.current_secret().secret.same_as(&secret) {
            // The same secret, now also proven by a signed install.
            if signed {
                if let Some(current) = self.secrets.last_mut() {
                    current.signed = true;
                }
            }
            return false;
        }
        self.secrets.push(SecretVersion {
            secret,
            since: now,
            signed,
        });
        if self.secrets.len() > SECRET_HISTORY_LEN {
            let excess = self.secrets.len() - SECRET_HISTORY_LEN;
            self.secrets.drain(..excess);
        }
        true
    }

    /// The secrets a legacy HS256 reinstall may be signed with, newest first: the history back
    /// to, and including, the newest secret that came with a signed install. Older ones may
    /// have been planted by an unsigned install (squatting) before Atlassian's own install
    /// replaced them, so they prove nothing.
    pub fn secrets_for_reinstall(&self) -> impl Iterator<Item = &SecretVersion> {
        let newest_signed = self.secrets.iter().rposition(|s| s.signed).unwrap_or(0);
        self.secrets[newest_signed..].iter().rev()
    }
}

/// The current secret verifies; the previous one only for a token issued before the roll,
/// only within the grace window after it, and never when an unsigned install's secret was
/// replaced by a signed one. Older secrets never verify a product request.
pub fn verify_product_signature(
    token: &Token<'_>,
    installation: &Installation,
    grace_seconds: i64,
    now: i64,
) -> Result<(), JwtError> {
    let current = installation.current_secret();
    let result = token.verify_hs256(&current.secret);
    if result.is_ok() {
        return result;
    }
    let Some(previous) = installation.previous_secret() else {
        return result;
    };
    let within_grace = now - current.since <= grace_seconds;
    let issued_before_roll = token.claims().iat.is_some_and(|iat| iat < current.since);
    // A secret from an unsigned install that Atlassian's signed install replaced may have been
    // planted by anyone: it gets no grace.
    let trusted = previous.signed || !current.signed;
    if within_grace && issued_before_roll && trusted {
        token.verify_hs256(&previous.secret)
    } else {
        result
    }
}

/// HS256 callbacks: `enabled`/`disabled` (and legacy `uninstalled`) with the current secret;
/// a legacy reinstall with the current secret or one kept in the history, also after an
/// `uninstalled` (docs/PROTOCOL.md §5), but none older than the newest secret that came with a signed
/// install ([`Installation::secrets_for_reinstall`]).
pub fn verify_lifecycle_signature(
    token: &Token<'_>,
    event: LifecycleEvent,
    installation: &Installation,
) -> Result<(), JwtError> {
    let current = &installation.current_secret().secret;
    if token.verify_hs256(current).is_ok() {
        return Ok(());
    }
    if event == LifecycleEvent::Installed
        && installation
            .secrets_for_reinstall()
            .skip(1)
            .any(|s| token.verify_hs256(&s.secret).is_ok())
    {
        return Ok(());
    }
    Err(JwtError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_the_head_of_the_sha256_and_never_the_secret() {
        let version = SecretVersion {
            secret: SharedSecret::parse("abc").unwrap(),
            since: 0,
            signed: true,
        };
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(version.fingerprint(), "ba7816bf8f01");
    }
}
