//! Shared secrets at rest (docs/PROTOCOL.md §10): each secret of an installation's history is
//! sealed with XChaCha20-Poly1305 under the first key of `WARDEN_SECRET_KEYS` before either
//! store writes it, and opened with whichever key of the ring its sealed form names when it is
//! read. The clientKey is the associated data, so a sealed secret copied into another tenant's
//! record does not open there.
//!
//! Stored form of one history entry (a JSON object), written by [`Sealer::seal_history`]:
//! - `{"sealed": "v1:<key id>:<base64 of nonce (24 bytes) + ciphertext + tag>", "since", "signed"}`
//! - `{"secret": "<plaintext>", "since", "signed"}`: what records written without a key (or by
//!   versions before sealing) hold. Still read; sealed on the record's next write.
//!
//! [`rekey`] rewrites every record so that all its secrets are sealed under the newest key.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretBox};
use serde::{Deserialize, Serialize};

use connect_protocol::domain::{ClientKey, SharedSecret};

use super::{Commit, CommitOutcome, InstallationStore, StoreError};
use crate::secrets::SecretVersion;

/// Version tag of the sealed form; a new algorithm would get a new tag.
const FORMAT: &str = "v1";
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
/// XChaCha20-Poly1305's tag.
const TAG_LEN: usize = 16;

/// The id of one key of `WARDEN_SECRET_KEYS`, written into every value it seals: 1-32
/// characters from letters, digits, `-`, `_` and `.` (never `:`, the separator of the form).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SealingKeyId(String);

impl SealingKeyId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = (1..=32).contains(&raw.len())
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "key id {raw:?} must be 1-32 characters from letters, digits, '-', '_' and '.'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SealingKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

struct SealingKey {
    id: SealingKeyId,
    key: SecretBox<[u8; KEY_LEN]>,
}

/// The keys of `WARDEN_SECRET_KEYS`, in the order given: the first seals, every one opens.
/// `Debug` shows the key ids only.
#[derive(Clone, Default)]
pub struct KeyRing(Arc<Vec<SealingKey>>);

impl KeyRing {
    /// Parses `id:base64key` items (the key 32 bytes, standard base64). Messages name the item
    /// by position or id, never echo key material.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut keys: Vec<SealingKey> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item = item.as_ref().trim();
            let Some((id, encoded)) = item.split_once(':') else {
                return Err(format!("item {} is not `id:base64key`", i + 1));
            };
            let id = SealingKeyId::parse(id.trim())?;
            if keys.iter().any(|k| k.id == id) {
                return Err(format!("key id {:?} is given twice", id.as_str()));
            }
            let bytes = STANDARD
                .decode(encoded.trim())
                .map_err(|_| format!("the key of {:?} is not standard base64", id.as_str()))?;
            let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
                format!(
                    "the key of {:?} is {} bytes; it must be {KEY_LEN} (head -c32 /dev/urandom | base64)",
                    id.as_str(),
                    bytes.len()
                )
            })?;
            keys.push(SealingKey {
                id,
                key: SecretBox::new(Box::new(key)),
            });
        }
        Ok(Self(Arc::new(keys)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key ids, the sealing one first.
    pub fn ids(&self) -> impl Iterator<Item = &SealingKeyId> {
        self.0.iter().map(|k| &k.id)
    }

    fn get(&self, id: &str) -> Option<&SealingKey> {
        self.0.iter().find(|k| k.id.as_str() == id)
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeyRing")
            .field(&self.ids().map(SealingKeyId::as_str).collect::<Vec<_>>())
            .finish()
    }
}

/// Why a sealed secret did not open. Never carries the secret or a key.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("a sealed secret is malformed")]
    Malformed,
    #[error(
        "a secret is sealed under key id {id:?}, which WARDEN_SECRET_KEYS does not hold ({held})"
    )]
    UnknownKey { id: String, held: String },
    #[error("a secret sealed under key id {id:?} fails authentication: WARDEN_SECRET_KEYS holds another key under that id, or the value was damaged or copied from another installation")]
    Rejected { id: String },
}

/// How an installation's secrets were found in the store (what [`rekey`] acts on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AtRest {
    /// Not read from a store.
    #[default]
    Unread,
    /// At least one secret is stored in plaintext.
    Plaintext,
    /// Every secret is sealed; the key ids used, without repeats.
    Sealed(Vec<SealingKeyId>),
}

/// Seals and opens shared secrets with a [`KeyRing`]; with an empty ring, secrets are written
/// in plaintext (and sealed ones cannot be opened).
#[derive(Debug, Clone, Default)]
pub struct Sealer {
    ring: KeyRing,
}

/// `WARDEN_REQUIRE_ENCRYPTION` (or `warden serve --require-encryption`) without a key.
#[derive(Debug, thiserror::Error)]
#[error("encryption of shared secrets at rest is required (WARDEN_REQUIRE_ENCRYPTION or --require-encryption) but WARDEN_SECRET_KEYS is not set; set it to `id:base64key` with a key from `head -c32 /dev/urandom | base64`")]
pub struct EncryptionRequired;

/// The one start-up warning of a service that stores secrets in plaintext.
pub const PLAINTEXT_WARNING: &str = "shared secrets are stored in plaintext: set WARDEN_SECRET_KEYS=<id>:<base64 key> (a key from `head -c32 /dev/urandom | base64`) to encrypt them at rest";

impl Sealer {
    pub fn new(ring: KeyRing) -> Self {
        Self { ring }
    }

    /// No key: secrets are written in plaintext.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// The service's sealer: refuses when encryption is required and no key is set.
    pub fn for_service(ring: KeyRing, required: bool) -> Result<Self, EncryptionRequired> {
        if required && ring.is_empty() {
            return Err(EncryptionRequired);
        }
        Ok(Self::new(ring))
    }

    /// The key new seals use, if any.
    pub fn sealing_key(&self) -> Option<&SealingKeyId> {
        self.ring.ids().next()
    }

    fn seal(&self, client_key: &ClientKey, secret: &SharedSecret) -> Option<String> {
        self.seal_bytes(client_key.as_str().as_bytes(), secret.expose().as_bytes())
    }

    fn open(
        &self,
        client_key: &ClientKey,
        sealed: &str,
    ) -> Result<(SharedSecret, SealingKeyId), SealError> {
        let (plaintext, id) = self.open_bytes(client_key.as_str().as_bytes(), sealed)?;
        let rejected = || SealError::Rejected { id: id.0.clone() };
        let text = String::from_utf8(plaintext).map_err(|_| rejected())?;
        let secret = SharedSecret::parse(&text).map_err(|_| rejected())?;
        Ok((secret, id))
    }

    /// `msg` sealed under the newest key, bound to `aad` (it opens only with the same `aad`);
    /// `None` without a key.
    pub(crate) fn seal_bytes(&self, aad: &[u8], msg: &[u8]) -> Option<String> {
        let key = self.ring.0.first()?;
        let cipher = XChaCha20Poly1305::new(key.key.expose_secret().into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(&XNonce::from(nonce), Payload { msg, aad })
            .expect("XChaCha20-Poly1305 seals any message shorter than 256 GiB");
        let mut body = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&ciphertext);
        Some(format!("{FORMAT}:{}:{}", key.id, STANDARD.encode(body)))
    }

    /// What [`seal_bytes`](Self::seal_bytes) sealed with the same `aad`, and the key it used.
    pub(crate) fn open_bytes(
        &self,
        aad: &[u8],
        sealed: &str,
    ) -> Result<(Vec<u8>, SealingKeyId), SealError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(FORMAT), Some(id), Some(encoded)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Malformed);
        };
        let Some(key) = self.ring.get(id) else {
            let held: Vec<&str> = self.ring.ids().map(SealingKeyId::as_str).collect();
            return Err(SealError::UnknownKey {
                id: SealingKeyId::parse(id).map_err(|_| SealError::Malformed)?.0,
                held: if held.is_empty() {
                    "it is not set".to_owned()
                } else {
                    format!("it holds {}", held.join(", "))
                },
            });
        };
        let body = STANDARD.decode(encoded).map_err(|_| SealError::Malformed)?;
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Malformed)?;
        let cipher = XChaCha20Poly1305::new(key.key.expose_secret().into());
        let plaintext = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SealError::Rejected {
                id: key.id.0.clone(),
            })?;
        Ok((plaintext, key.id.clone()))
    }

    /// The stored form of a secret history, oldest first: each entry sealed under the newest
    /// key, or in plaintext when there is no key.
    pub(crate) fn seal_history(
        &self,
        client_key: &ClientKey,
        history: &[SecretVersion],
    ) -> Vec<serde_json::Value> {
        history
            .iter()
            .map(|entry| {
                let (secret, sealed) = match self.seal(client_key, &entry.secret) {
                    Some(sealed) => (None, Some(sealed)),
                    None => (Some(entry.secret.expose().to_owned()), None),
                };
                serde_json::to_value(StoredSecret {
                    secret,
                    sealed,
                    since: entry.since,
                    signed: entry.signed,
                })
                .expect("a stored secret entry is plain JSON")
            })
            .collect()
    }

    /// Opens a stored secret history (sealed or plaintext entries). A sealed entry that does
    /// not open makes the whole record unusable: nothing is guessed.
    pub(crate) fn open_history(
        &self,
        client_key: &ClientKey,
        entries: Vec<serde_json::Value>,
    ) -> Result<(Vec<SecretVersion>, AtRest), StoreError> {
        let mut history = Vec::with_capacity(entries.len());
        let mut plaintext = false;
        let mut key_ids: Vec<SealingKeyId> = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            // A parse error could quote the secret: only say which entry is broken.
            let invalid = || {
                StoreError::Corrupt(format!(
                    "secret entry {i} of installation {client_key} is not valid"
                ))
            };
            let stored: StoredSecret = serde_json::from_value(entry).map_err(|_| invalid())?;
            let secret = match (stored.secret, stored.sealed) {
                (Some(plain), None) => {
                    plaintext = true;
                    SharedSecret::parse(&plain).map_err(|_| invalid())?
                }
                (None, Some(sealed)) => {
                    let (secret, id) = self.open(client_key, &sealed).map_err(|e| {
                        StoreError::Unsealable(format!("installation {client_key}: {e}"))
                    })?;
                    if !key_ids.contains(&id) {
                        key_ids.push(id);
                    }
                    secret
                }
                _ => return Err(invalid()),
            };
            history.push(SecretVersion {
                secret,
                since: stored.since,
                signed: stored.signed,
            });
        }
        let at_rest = if plaintext {
            AtRest::Plaintext
        } else {
            AtRest::Sealed(key_ids)
        };
        Ok((history, at_rest))
    }

    /// Whether a record found `at_rest` needs rewriting to be sealed under the newest key.
    pub fn needs_rekey(&self, at_rest: &AtRest) -> bool {
        match (self.sealing_key(), at_rest) {
            (None, _) => false,
            (Some(newest), AtRest::Sealed(ids)) => ids.as_slice() != std::slice::from_ref(newest),
            (Some(_), AtRest::Plaintext | AtRest::Unread) => true,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSecret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
    since: i64,
    #[serde(default)]
    signed: bool,
}

/// What [`rekey`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RekeyReport {
    /// Records whose plaintext secrets were sealed.
    pub sealed_plaintext: usize,
    /// Records moved from older keys to the newest.
    pub resealed: usize,
    /// Records already sealed under the newest key only.
    pub unchanged: usize,
    /// Records that could not be read or written, with why (never a secret).
    pub failed: Vec<(ClientKey, String)>,
}

/// How many times a record written concurrently is read again before it counts as failed.
const REKEY_ATTEMPTS: usize = 5;

/// Rewrites every installation whose secrets are not all sealed under `sealer`'s newest key:
/// plaintext ones are sealed, older keys' are sealed again. Each rewrite is an ordinary
/// compare-and-set commit (on Redis it also invalidates other instances' caches), so it may run
/// beside a serving Redis deployment.
pub async fn rekey(
    store: &dyn InstallationStore,
    sealer: &Sealer,
) -> Result<RekeyReport, StoreError> {
    let mut report = RekeyReport::default();
    for client_key in store.list_client_keys().await? {
        let mut outcome = Err("it was written concurrently too many times".to_owned());
        for _ in 0..REKEY_ATTEMPTS {
            let record = match store.load(&client_key).await {
                Ok(Some(record)) => record,
                // Gone between the listing and the read: nothing to protect.
                Ok(None) => {
                    outcome = Ok(None);
                    break;
                }
                Err(StoreError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                Err(e) => {
                    outcome = Err(e.to_string());
                    break;
                }
            };
            if !sealer.needs_rekey(&record.at_rest) {
                outcome = Ok(None);
                report.unchanged += 1;
                break;
            }
            let committed = store
                .commit(Commit {
                    record: &record,
                    expected_version: record.version,
                    token: None,
                })
                .await?;
            if committed == CommitOutcome::Committed {
                outcome = Ok(Some(record.at_rest));
                break;
            }
        }
        match outcome {
            Ok(Some(AtRest::Plaintext | AtRest::Unread)) => report.sealed_plaintext += 1,
            Ok(Some(AtRest::Sealed(_))) => report.resealed += 1,
            Ok(None) => {}
            Err(why) => report.failed.push((client_key, why)),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &[&str]) -> KeyRing {
        KeyRing::parse(spec).unwrap()
    }

    fn key(byte: u8) -> String {
        STANDARD.encode([byte; KEY_LEN])
    }

    fn ck(s: &str) -> ClientKey {
        ClientKey::parse(s).unwrap()
    }

    fn history(secret: &str) -> Vec<SecretVersion> {
        vec![SecretVersion {
            secret: SharedSecret::parse(secret).unwrap(),
            since: 7,
            signed: true,
        }]
    }

    #[test]
    fn sealed_entries_name_the_key_and_hide_the_secret() {
        let sealer = Sealer::new(ring(&[&format!("a:{}", key(1))]));
        let stored = sealer.seal_history(&ck("jira:1"), &history("top-secret-value"));
        let text = stored[0].to_string();
        assert!(!text.contains("top-secret-value"), "{text}");
        assert!(stored[0]["sealed"].as_str().unwrap().starts_with("v1:a:"));
        // A fresh nonce each time.
        let again = sealer.seal_history(&ck("jira:1"), &history("top-secret-value"));
        assert_ne!(stored, again);
        let (opened, at_rest) = sealer.open_history(&ck("jira:1"), stored).unwrap();
        assert_eq!(opened[0].secret.expose(), "top-secret-value");
        assert_eq!((opened[0].since, opened[0].signed), (7, true));
        assert_eq!(
            at_rest,
            AtRest::Sealed(vec![SealingKeyId::parse("a").unwrap()])
        );
    }

    #[test]
    fn another_tenant_or_key_does_not_open_it() {
        let a = Sealer::new(ring(&[&format!("a:{}", key(1))]));
        let stored = a.seal_history(&ck("jira:1"), &history("s"));
        let moved = a.open_history(&ck("jira:2"), stored.clone()).unwrap_err();
        assert!(matches!(moved, StoreError::Unsealable(_)), "{moved}");
        let same_id_other_key = Sealer::new(ring(&[&format!("a:{}", key(2))]));
        let err = same_id_other_key
            .open_history(&ck("jira:1"), stored.clone())
            .unwrap_err();
        assert!(err.to_string().contains("fails authentication"), "{err}");
        let unknown = Sealer::new(ring(&[&format!("b:{}", key(1))]));
        let err = unknown
            .open_history(&ck("jira:1"), stored.clone())
            .unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
        let none = Sealer::plaintext();
        let err = none.open_history(&ck("jira:1"), stored).unwrap_err();
        assert!(err.to_string().contains("not set"), "{err}");
    }

    #[test]
    fn plaintext_entries_are_read_and_reported() {
        let sealer = Sealer::new(ring(&[&format!("a:{}", key(1))]));
        let stored = Sealer::plaintext().seal_history(&ck("jira:1"), &history("old"));
        assert_eq!(stored[0]["secret"], "old");
        let (opened, at_rest) = sealer.open_history(&ck("jira:1"), stored).unwrap();
        assert_eq!(opened[0].secret.expose(), "old");
        assert_eq!(at_rest, AtRest::Plaintext);
        assert!(sealer.needs_rekey(&at_rest));
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let old = Sealer::new(ring(&[&format!("a:{}", key(1))]));
        let stored = old.seal_history(&ck("jira:1"), &history("s"));
        let both = Sealer::new(ring(&[&format!("b:{}", key(2)), &format!("a:{}", key(1))]));
        let (opened, at_rest) = both.open_history(&ck("jira:1"), stored).unwrap();
        assert!(both.needs_rekey(&at_rest));
        let resealed = both.seal_history(&ck("jira:1"), &opened);
        assert!(resealed[0]["sealed"].as_str().unwrap().starts_with("v1:b:"));
        let (_, at_rest) = both.open_history(&ck("jira:1"), resealed).unwrap();
        assert!(!both.needs_rekey(&at_rest));
    }

    #[test]
    fn key_rings_parse_and_never_show_keys() {
        let k = key(9);
        let parsed = ring(&[&format!(" b : {k} "), &format!("a:{k}")]);
        let ids: Vec<&str> = parsed.ids().map(SealingKeyId::as_str).collect();
        assert_eq!(ids, ["b", "a"]);
        let debug = format!("{:?}", Sealer::new(parsed));
        assert!(!debug.contains(&k) && debug.contains("\"b\""), "{debug}");
        for bad in [
            vec!["nokey".to_owned()],
            vec![format!("a:{}", STANDARD.encode([0u8; 16]))],
            vec!["a:!!!".to_owned()],
            vec![format!("a:{k}"), format!("a:{k}")],
            vec![format!("a:b:{k}")],
        ] {
            let err = KeyRing::parse(&bad).unwrap_err();
            assert!(!err.contains(&k), "{err}");
        }
    }

    #[test]
    fn required_encryption_needs_a_key() {
        assert!(Sealer::for_service(KeyRing::default(), true).is_err());
        assert!(Sealer::for_service(KeyRing::default(), false).is_ok());
        assert!(Sealer::for_service(ring(&[&format!("a:{}", key(1))]), true).is_ok());
    }
}
