//! The Forge app's system token of one installation (`x-forge-oauth-system`, docs/PROTOCOL.md
//! §12) in its stored form: what both stores keep, sealed with `WARDEN_SECRET_KEYS` when set.
//!
//! Stored form (a JSON object, one per installation):
//! `{"exp": <Unix s>, "api": "<apiBaseUrl>", "digest": "<hex SHA-256 of the token>",
//!   "sealed": "v1:..."}` or, without a key, `"token": "<plaintext>"` instead of `sealed`.
//! The associated data of the seal is `forge-token:<installationId>`, so a sealed token copied
//! to another installation does not open there.

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::sealing::Sealer;
use super::StoreError;
use connect_protocol::domain::BaseUrl;
use connect_protocol::forge::InstallationId;

/// The app's system token for one installation, where it may be used, and until when.
/// `Debug` never shows the token.
#[derive(Debug, Clone)]
pub struct ForgeAppToken {
    pub token: SecretString,
    /// Unix seconds after which the token is not used.
    pub expires_at: i64,
    /// `app.apiBaseUrl` of the verified FIT the token came with.
    pub api_base_url: BaseUrl,
}

impl ForgeAppToken {
    /// SHA-256 of the token: tells the same token apart without holding it.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.token.expose_secret().as_bytes()).into()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    exp: i64,
    api: String,
    digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

fn aad(installation: &InstallationId) -> Vec<u8> {
    format!("forge-token:{installation}").into_bytes()
}

/// The stored form of `token`.
pub(crate) fn encode(
    installation: &InstallationId,
    token: &ForgeAppToken,
    sealer: &Sealer,
) -> String {
    let raw = token.token.expose_secret();
    let sealed = sealer.seal_bytes(&aad(installation), raw.as_bytes());
    let stored = Stored {
        exp: token.expires_at,
        api: token.api_base_url.as_str().to_owned(),
        digest: hex::encode(token.digest()),
        token: sealed.is_none().then(|| raw.to_owned()),
        sealed,
    };
    serde_json::to_string(&stored).expect("a stored Forge token is plain JSON")
}

/// Reads a stored form; never quotes it in an error.
pub(crate) fn decode(
    installation: &InstallationId,
    raw: &str,
    sealer: &Sealer,
) -> Result<ForgeAppToken, StoreError> {
    let corrupt = || {
        StoreError::Corrupt(format!(
            "the Forge app token of {installation} is not valid"
        ))
    };
    let stored: Stored = serde_json::from_str(raw).map_err(|_| corrupt())?;
    let token = match (stored.token, stored.sealed) {
        (Some(plain), None) => plain,
        (None, Some(sealed)) => {
            let (bytes, _) = sealer
                .open_bytes(&aad(installation), &sealed)
                .map_err(|e| {
                    StoreError::Unsealable(format!("the Forge app token of {installation}: {e}"))
                })?;
            String::from_utf8(bytes).map_err(|_| corrupt())?
        }
        _ => return Err(corrupt()),
    };
    Ok(ForgeAppToken {
        token: SecretString::from(token),
        expires_at: stored.exp,
        api_base_url: BaseUrl::parse(&stored.api).map_err(|_| corrupt())?,
    })
}
