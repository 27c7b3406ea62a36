//! The OAuth tokens Forge sends with a call (docs/PROTOCOL.md §12): `x-forge-oauth-system`, the
//! app's system token, kept per installation for later calls as the app
//! ([`crate::host_client::HostClient::as_forge_app`]); `x-forge-oauth-user`, the user's, handed
//! to the handler of that one request and never kept.
//!
//! Only a call whose FIT verified is read, and the installation and `apiBaseUrl` the token is
//! kept for come from that FIT, never from a header. The token is opaque: its expiry is the
//! `exp` claim when it reads as a JWT (a hint only, never verified, capped at
//! [`MAX_LIFETIME`] from now), else [`ASSUMED_LIFETIME`] from the first time it is seen.
//! An in-memory cache of the token last kept per installation spares the store a write on
//! every call: Forge sends the same token for a while.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use secrecy::SecretString;

use crate::store::forge_token::ForgeAppToken;
use crate::store::{InstallationStore, StoreError};
use connect_protocol::forge::{InstallationId, VerifiedFit};

pub const SYSTEM_TOKEN_HEADER: &str = "x-forge-oauth-system";
pub const USER_TOKEN_HEADER: &str = "x-forge-oauth-user";
/// Lifetime given to a token without a readable `exp`: the least Atlassian promises (2 h).
pub const ASSUMED_LIFETIME: i64 = 2 * 3600;
/// The most Atlassian lets a token live (4 h): a longer `exp` is not believed.
pub const MAX_LIFETIME: i64 = 4 * 3600;
/// Longest token taken from a header.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Installations whose last kept token is remembered in memory.
const MAX_REMEMBERED: u64 = 100_000;

/// When `raw` stops being used: its `exp` if it reads as a JWT (capped), else
/// [`ASSUMED_LIFETIME`] from `now`.
pub fn expiry_hint(raw: &str, now: i64) -> i64 {
    let exp = raw.split('.').nth(1).and_then(|payload| {
        let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["exp"].as_i64()
    });
    match exp {
        Some(exp) => exp.min(now + MAX_LIFETIME),
        None => now + ASSUMED_LIFETIME,
    }
}

/// A bearer token from header `name`, if it is there and plausible (visible ASCII, bounded).
pub fn header_token(req: &actix_web::HttpRequest, name: &str) -> Option<SecretString> {
    let value = req.headers().get(name)?.to_str().ok()?.trim();
    let plausible = !value.is_empty()
        && value.len() <= MAX_TOKEN_BYTES
        && value.bytes().all(|b| b.is_ascii_graphic());
    plausible.then(|| SecretString::from(value.to_owned()))
}

/// Keeps the newest system token per installation, writing to the store only when a token
/// is new to this process and expires later than the one it kept last.
#[derive(Debug)]
pub struct TokenKeeper {
    /// installation -> (digest, expiry) of the token last kept or found kept.
    known: moka::sync::Cache<InstallationId, ([u8; 32], i64)>,
}

impl Default for TokenKeeper {
    fn default() -> Self {
        Self {
            known: moka::sync::Cache::builder()
                .name("forge_app_tokens")
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(Duration::from_secs(MAX_LIFETIME as u64))
                .build(),
        }
    }
}

impl TokenKeeper {
    /// Keeps `token`, sent with the verified `fit`, for its installation unless a token as new
    /// is kept. Returns whether the store was written.
    pub async fn keep(
        &self,
        store: &dyn InstallationStore,
        fit: &VerifiedFit,
        token: SecretString,
        now: i64,
    ) -> Result<bool, StoreError> {
        use secrecy::ExposeSecret as _;
        let expires_at = expiry_hint(token.expose_secret(), now);
        if expires_at <= now {
            return Ok(false);
        }
        let token = ForgeAppToken {
            token,
            expires_at,
            api_base_url: fit.api_base_url.clone(),
        };
        let digest = token.digest();
        let installation = fit.installation_id;
        if let Some((known_digest, known_exp)) = self.known.get(&installation) {
            if known_digest == digest || known_exp >= expires_at {
                return Ok(false);
            }
        }
        let written = store.keep_forge_token(&installation, &token).await?;
        // Whether written or not, the store holds a token at least as new as this one.
        self.known.insert(installation, (digest, expires_at));
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use connect_protocol::domain::BaseUrl;
    use secrecy::ExposeSecret as _;

    fn jwt_with_exp(exp: i64) -> String {
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp}}}"#));
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl")
    }

    fn fit(installation: &str) -> VerifiedFit {
        VerifiedFit {
            installation_id: InstallationId::parse(installation).unwrap(),
            api_base_url: BaseUrl::parse("https://api.atlassian.com/ex/jira/c1").unwrap(),
            cloud_id: None,
            site_url: None,
            account_id: None,
            module_key: None,
            module_type: None,
            environment_type: None,
            environment_id: None,
            app_version: None,
            license: None,
            jti: "j".into(),
            expires_at: 0,
        }
    }

    #[test]
    fn the_expiry_is_the_jwt_exp_capped_else_the_least_lifetime_promised() {
        let now = 1_000_000;
        assert_eq!(expiry_hint(&jwt_with_exp(now + 600), now), now + 600);
        assert_eq!(
            expiry_hint(&jwt_with_exp(now + 86_400), now),
            now + MAX_LIFETIME
        );
        assert_eq!(expiry_hint("opaque-token", now), now + ASSUMED_LIFETIME);
        assert_eq!(expiry_hint("a.%%%.b", now), now + ASSUMED_LIFETIME);
    }

    #[tokio::test]
    async fn a_token_already_kept_is_not_written_again() {
        let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let empty = EmbeddedStore::open(other_dir.path()).unwrap();
        let fit = fit("2f9a6c1e-6d0b-4d8e-9a51-3e4c8b7f0a12");
        let keeper = TokenKeeper::default();
        let now = connect_protocol::jwt::now();
        let token = || SecretString::from(jwt_with_exp(now + 3600));
        assert!(keeper.keep(&store, &fit, token(), now).await.unwrap());
        // Known to this process: no write is even tried (the other store stays empty).
        assert!(!keeper.keep(&empty, &fit, token(), now).await.unwrap());
        assert!(empty
            .forge_token(&fit.installation_id)
            .await
            .unwrap()
            .is_none());
        let older = SecretString::from(jwt_with_exp(now + 60));
        assert!(!keeper.keep(&empty, &fit, older, now).await.unwrap());
        assert!(empty
            .forge_token(&fit.installation_id)
            .await
            .unwrap()
            .is_none());
        // A newer one is written.
        let newer = jwt_with_exp(now + 7200);
        let written = keeper.keep(&store, &fit, SecretString::from(newer.clone()), now);
        assert!(written.await.unwrap());
        let kept = store
            .forge_token(&fit.installation_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.token.expose_secret(), newer);
        // Its Debug shows no token.
        assert!(!format!("{kept:?}").contains(&newer));
    }
}
