//! The install-signing keys of the fake Atlassian side, and the RS256 tokens made with them.
//!
//! A [`SigningKey`] is an RSA-2048 pair named by a UUID `kid`, like Atlassian's. A [`KeyRing`]
//! holds every key ever made (old kids must keep resolving, as on the real CDN) and which one
//! signs now; it can live in memory or in a state directory as PEM files plus `keys.json`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use connect_protocol::jwt::RsaVerifyingKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Size of generated keys, as Atlassian's.
pub const KEY_BITS: usize = 2048;

/// Name of the index file in a key ring's state directory.
pub const INDEX_FILE: &str = "keys.json";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid key index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("key {kid}: {message}")]
    Key { kid: String, message: String },
}

/// One RSA key pair named by `kid`. `Debug` does not print the private key.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    private_pem: SecretString,
    encoding: EncodingKey,
    public_pem: String,
}

impl SigningKey {
    /// A fresh 2048-bit key with a random UUID v4 `kid`. Slow in debug builds (about a second
    /// or more): tests should make their keys once.
    pub fn generate() -> Self {
        let private = RsaPrivateKey::new(&mut rand::thread_rng(), KEY_BITS)
            .expect("generating an RSA key of a standard size does not fail");
        Self::from_rsa(uuid::Uuid::new_v4().to_string(), &private)
            .expect("a freshly generated RSA key encodes as PEM")
    }

    /// A key from its PKCS#8 private PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_private_pem(kid: impl Into<String>, private_pem: &str) -> Result<Self, KeyError> {
        let kid = kid.into();
        let private = RsaPrivateKey::from_pkcs8_pem(private_pem).map_err(|e| KeyError::Key {
            kid: kid.clone(),
            message: format!("not an RSA private key in PKCS#8 PEM form: {e}"),
        })?;
        Self::from_rsa(kid, &private)
    }

    fn from_rsa(kid: String, private: &RsaPrivateKey) -> Result<Self, KeyError> {
        let bad = |message: String| KeyError::Key {
            kid: kid.clone(),
            message,
        };
        let private_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| bad(format!("cannot encode the private key: {e}")))?;
        let public_pem = RsaPublicKey::from(private)
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| bad(format!("cannot encode the public key: {e}")))?;
        let encoding = EncodingKey::from_rsa_pem(private_pem.as_bytes())
            .map_err(|e| bad(format!("jsonwebtoken refuses the private key: {e}")))?;
        Ok(Self {
            private_pem: SecretString::from(private_pem.as_str().to_owned()),
            kid,
            encoding,
            public_pem,
        })
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), what the key server serves.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn private_pem(&self) -> &str {
        self.private_pem.expose_secret()
    }

    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public half, ready to verify tokens.
    pub fn verifying_key(&self) -> RsaVerifyingKey {
        RsaVerifyingKey::from_pem(&self.public_pem).expect("our own public PEM parses")
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("private_pem", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// Signs `claims` with RS256 and header `kid` = `key.kid`: an install token as Atlassian makes it.
pub fn sign_rs256<C: Serialize>(key: &SigningKey, claims: &C) -> String {
    sign_rs256_with_kid(key, &key.kid, claims)
}

/// Like [`sign_rs256`] but with any `kid` in the header (`"../x"`, another key's kid, ...), for
/// tests that forge tokens.
pub fn sign_rs256_with_kid<C: Serialize>(key: &SigningKey, kid: &str, claims: &C) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("JWT".to_owned());
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding)
        .expect("RS256 signing of serializable claims with a valid key cannot fail")
}

/// Every key made so far and the one that signs now.
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<SigningKey>,
    current: usize,
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    current: String,
    /// Oldest first; each has `<kid>.pem` (private, PKCS#8) and `<kid>.pub.pem` beside the index.
    keys: Vec<String>,
}

impl KeyRing {
    /// A ring with one freshly generated key, kept in memory only.
    pub fn in_memory() -> Self {
        Self::with_key(SigningKey::generate())
    }

    /// A ring in memory whose current key is `key` (lets tests reuse keys made once).
    pub fn with_key(key: SigningKey) -> Self {
        Self {
            keys: vec![key],
            current: 0,
            state_dir: None,
        }
    }

    /// Loads the ring kept in `state_dir`, or creates the directory and a ring with one new key.
    /// Later [`rotate`](Self::rotate)s are written there too.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, KeyError> {
        let index_path = state_dir.join(INDEX_FILE);
        match std::fs::read(&index_path) {
            Ok(bytes) => Self::load(state_dir, &index_path, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(state_dir).map_err(|source| KeyError::Io {
                    action: "create",
                    path: state_dir.to_owned(),
                    source,
                })?;
                let mut ring = Self::with_key(SigningKey::generate());
                ring.state_dir = Some(state_dir.to_owned());
                ring.persist_key(&ring.keys[0])?;
                ring.persist_index()?;
                Ok(ring)
            }
            Err(source) => Err(KeyError::Io {
                action: "read",
                path: index_path,
                source,
            }),
        }
    }

    fn load(state_dir: &Path, index_path: &Path, bytes: &[u8]) -> Result<Self, KeyError> {
        let bad_index = |message: String| KeyError::Index {
            path: index_path.to_owned(),
            message,
        };
        let index: Index = serde_json::from_slice(bytes).map_err(|e| bad_index(e.to_string()))?;
        let mut keys = Vec::with_capacity(index.keys.len());
        for kid in &index.keys {
            check_kid(kid)?;
            let path = state_dir.join(format!("{kid}.pem"));
            let pem = std::fs::read_to_string(&path).map_err(|source| KeyError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            keys.push(SigningKey::from_private_pem(kid.clone(), &pem)?);
        }
        let current = keys
            .iter()
            .position(|k| k.kid == index.current)
            .ok_or_else(|| {
                bad_index(format!(
                    "current kid {:?} is not among the keys",
                    index.current
                ))
            })?;
        Ok(Self {
            keys,
            current,
            state_dir: Some(state_dir.to_owned()),
        })
    }

    /// The key that signs new install tokens.
    pub fn current(&self) -> &SigningKey {
        &self.keys[self.current]
    }

    /// The key named `kid`, current or retired.
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Every key, oldest first.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    /// Where the ring is kept, if not in memory only.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// Generates a new key and makes it current; older keys are still served.
    pub fn rotate(&mut self) -> Result<&SigningKey, KeyError> {
        self.rotate_to(SigningKey::generate())
    }

    /// Makes `key` current (adding it if its kid is new) and persists the ring if it has a
    /// state directory.
    pub fn rotate_to(&mut self, key: SigningKey) -> Result<&SigningKey, KeyError> {
        if self.state_dir.is_some() {
            check_kid(&key.kid)?;
        }
        let position = match self.keys.iter().position(|k| k.kid == key.kid) {
            Some(i) => i,
            None => {
                self.persist_key(&key)?;
                self.keys.push(key);
                self.keys.len() - 1
            }
        };
        let previous = std::mem::replace(&mut self.current, position);
        if let Err(e) = self.persist_index() {
            self.current = previous;
            return Err(e);
        }
        Ok(self.current())
    }

    fn persist_key(&self, key: &SigningKey) -> Result<(), KeyError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        write_file(
            &dir.join(format!("{}.pem", key.kid)),
            key.private_pem().as_bytes(),
            true,
        )?;
        write_file(
            &dir.join(format!("{}.pub.pem", key.kid)),
            key.public_pem().as_bytes(),
            false,
        )
    }

    fn persist_index(&self) -> Result<(), KeyError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        let index = Index {
            current: self.current().kid.clone(),
            keys: self.keys.iter().map(|k| k.kid.clone()).collect(),
        };
        let json = serde_json::to_vec_pretty(&index).expect("the key index serializes");
        write_file(&dir.join(INDEX_FILE), &json, false)
    }
}

/// Kids become file names: only UUID-like names (letters, digits, `-`) are kept on disk.
fn check_kid(kid: &str) -> Result<(), KeyError> {
    if kid.is_empty()
        || kid.len() > 64
        || !kid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(KeyError::Key {
            kid: kid.to_owned(),
            message: "a stored kid may only contain letters, digits and '-'".into(),
        });
    }
    Ok(())
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
/// Private files are created readable by the owner only.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    write_via_tmp(path, &tmp, contents, private).map_err(|failure| match failure {
        WriteFailure::Write(source) => KeyError::Io {
            action: "write",
            path: tmp.clone(),
            source,
        },
        WriteFailure::Rename(source) => KeyError::Io {
            action: "rename into",
            path: path.to_owned(),
            source,
        },
    })
}

/// The step of [`write_via_tmp`] that failed.
#[derive(Debug)]
pub(super) enum WriteFailure {
    /// Creating, writing or syncing the temporary file.
    Write(io::Error),
    /// Renaming it to its final path.
    Rename(io::Error),
}

/// Writes `contents` to `tmp`, syncs it and renames it to `path`, so a crash never leaves half
/// a file. `private` files are created readable by the owner only.
pub(super) fn write_via_tmp(
    path: &Path,
    tmp: &Path,
    contents: &[u8],
    private: bool,
) -> Result<(), WriteFailure> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(tmp).map_err(WriteFailure::Write)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(WriteFailure::Write)?;
    std::fs::rename(tmp, path).map_err(WriteFailure::Rename)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::OnceLock;

    use super::*;
    use connect_protocol::jwt::{Claims, JwtError, Token};
    use connect_protocol::qsh::CanonicalRequest;

    /// Two keys made once for the whole test binary (key generation is slow in debug builds).
    pub(crate) fn test_keys() -> &'static [SigningKey; 2] {
        static KEYS: OnceLock<[SigningKey; 2]> = OnceLock::new();
        KEYS.get_or_init(|| [SigningKey::generate(), SigningKey::generate()])
    }

    fn claims() -> Claims {
        let now = connect_protocol::jwt::now();
        connect_protocol::claims::install_claims(
            "jira:1234",
            "https://app.example.com",
            &CanonicalRequest::new("POST", "/installed", "", ""),
            now,
            now + 180,
        )
    }

    #[test]
    fn generated_key_has_uuid_kid_and_standard_pems() {
        let key = &test_keys()[0];
        assert!(
            connect_protocol::domain::KeyId::parse(&key.kid).is_ok(),
            "{}",
            key.kid
        );
        assert!(key.public_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(key
            .private_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(!format!("{key:?}").contains("PRIVATE KEY"));
        assert_ne!(test_keys()[0].kid, test_keys()[1].kid);
    }

    #[test]
    fn minted_install_token_verifies_with_its_public_key_only() {
        let [key, other] = test_keys();
        let sent = claims();
        let token = sign_rs256(key, &sent);
        let parsed = Token::parse(&token).unwrap();
        assert_eq!(parsed.alg(), "RS256");
        assert_eq!(parsed.kid(), Some(key.kid.as_str()));
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().typ.as_deref(),
            Some("JWT")
        );
        assert_eq!(parsed.claims(), &sent);
        let public = RsaVerifyingKey::from_pem(key.public_pem()).unwrap();
        assert_eq!(parsed.verify_rs256(&public), Ok(()));
        let wrong = RsaVerifyingKey::from_pem(other.public_pem()).unwrap();
        assert_eq!(parsed.verify_rs256(&wrong), Err(JwtError::BadSignature));
        assert!(parsed
            .verify_hs256(&connect_protocol::domain::SharedSecret::parse("x").unwrap())
            .is_err());
    }

    #[test]
    fn forged_kid_is_carried_verbatim() {
        let key = &test_keys()[0];
        let token = sign_rs256_with_kid(key, "../x", &claims());
        let parsed = Token::parse(&token).unwrap();
        assert_eq!(parsed.kid(), Some("../x"));
        assert_eq!(parsed.verify_rs256(&key.verifying_key()), Ok(()));
    }

    #[test]
    fn private_pem_round_trips() {
        let key = &test_keys()[0];
        let again = SigningKey::from_private_pem(key.kid.clone(), key.private_pem()).unwrap();
        assert_eq!(again.public_pem(), key.public_pem());
        assert!(SigningKey::from_private_pem("k", "not a pem").is_err());
    }

    #[test]
    fn key_ring_persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("devtenant");
        let [a, b] = test_keys();
        {
            // Build the ring by hand from the shared keys so the test generates nothing.
            let mut ring = KeyRing::with_key(a.clone());
            ring.state_dir = Some(state.clone());
            std::fs::create_dir_all(&state).unwrap();
            ring.persist_key(a).unwrap();
            ring.persist_index().unwrap();
            assert_eq!(ring.rotate_to(b.clone()).unwrap().kid, b.kid);
        }
        let ring = KeyRing::load_or_create(&state).unwrap();
        assert_eq!(ring.current().kid, b.kid);
        let kids: Vec<&str> = ring.keys().iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, [a.kid.as_str(), b.kid.as_str()]);
        assert_eq!(ring.get(&a.kid).unwrap().public_pem(), a.public_pem());
        assert_eq!(ring.current().private_pem(), b.private_pem());
        assert!(state.join(format!("{}.pub.pem", a.kid)).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(state.join(format!("{}.pem", a.kid)))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
        }

        // A token signed before the reload verifies with the reloaded key.
        let token = sign_rs256(b, &claims());
        assert!(Token::parse(&token)
            .unwrap()
            .verify_rs256(&ring.current().verifying_key())
            .is_ok());
    }

    #[test]
    fn load_or_create_makes_a_new_ring_once() {
        let dir = tempfile::tempdir().unwrap();
        let created = KeyRing::load_or_create(dir.path()).unwrap();
        let loaded = KeyRing::load_or_create(dir.path()).unwrap();
        assert_eq!(created.keys().len(), 1);
        assert_eq!(loaded.current().kid, created.current().kid);
        assert_eq!(
            loaded.current().public_pem(),
            created.current().public_pem()
        );
    }

    #[test]
    fn rotation_keeps_old_keys_and_switches_current() {
        let [a, b] = test_keys();
        let mut ring = KeyRing::with_key(a.clone());
        ring.rotate_to(b.clone()).unwrap();
        assert_eq!(ring.current().kid, b.kid);
        assert!(ring.get(&a.kid).is_some());
        // Rotating back to a known kid does not duplicate it.
        ring.rotate_to(a.clone()).unwrap();
        assert_eq!(ring.current().kid, a.kid);
        assert_eq!(ring.keys().len(), 2);
    }

    #[test]
    fn bad_index_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(INDEX_FILE),
            br#"{"current":"x","keys":["../etc"]}"#,
        )
        .unwrap();
        assert!(matches!(
            KeyRing::load_or_create(dir.path()),
            Err(KeyError::Key { .. })
        ));
        std::fs::write(dir.path().join(INDEX_FILE), b"{").unwrap();
        assert!(matches!(
            KeyRing::load_or_create(dir.path()),
            Err(KeyError::Index { .. })
        ));
    }
}
