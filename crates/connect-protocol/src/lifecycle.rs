//! The lifecycle callbacks a host sends (`installed`, `uninstalled`, `enabled`, `disabled`)
//! and their JSON body, parsed into typed values. What a callback may do to a stored
//! installation is the service's lifecycle policy; this module only knows the wire format.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::domain::{BaseUrl, ClientKey, ParseError, SharedSecret};

/// Lifecycle bodies larger than this are refused.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    Installed,
    Uninstalled,
    Enabled,
    Disabled,
}

impl LifecycleEvent {
    pub fn name(self) -> &'static str {
        match self {
            LifecycleEvent::Installed => "installed",
            LifecycleEvent::Uninstalled => "uninstalled",
            LifecycleEvent::Enabled => "enabled",
            LifecycleEvent::Disabled => "disabled",
        }
    }

    /// `installed` and `uninstalled` are signed by Atlassian (RS256); the others by the tenant.
    pub fn is_install_signed(self) -> bool {
        matches!(
            self,
            LifecycleEvent::Installed | LifecycleEvent::Uninstalled
        )
    }
}

/// A string field that some hosts send as a number.
fn loose_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    })
}

/// Longest text accepted in any body field; real values are far shorter. Keeps a stored
/// (and cached) installation small whatever a caller sends.
pub const MAX_FIELD_CHARS: usize = 2048;

/// The body as sent; unknown fields are ignored. No `Debug`: it holds the shared secret.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPayload {
    #[serde(default, deserialize_with = "loose_string")]
    key: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    client_key: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    shared_secret: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    product_type: Option<String>,
    #[serde(flatten)]
    attributes: SiteAttributes,
}

/// The descriptive fields of a lifecycle body, kept as sent (each at most
/// [`MAX_FIELD_CHARS`]). None of them is covered by a signature.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteAttributes {
    #[serde(default, deserialize_with = "loose_string")]
    pub display_url: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub service_entitlement_number: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub entitlement_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub entitlement_number: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub oauth_client_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub installation_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub cloud_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub server_version: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    pub plugins_version: Option<String>,
}

/// A lifecycle body, parsed. `shared_secret` is present for `installed`.
pub struct LifecyclePayload {
    pub client_key: ClientKey,
    pub base_url: BaseUrl,
    pub shared_secret: Option<SharedSecret>,
    pub product_type: String,
    pub attributes: SiteAttributes,
    /// SHA-256 of the exact body bytes: tells a retry from a replay.
    pub body_digest: [u8; 32],
}

impl std::fmt::Debug for LifecyclePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LifecyclePayload")
            .field("client_key", &self.client_key)
            .field("base_url", &self.base_url)
            .field("shared_secret", &self.shared_secret)
            .field("product_type", &self.product_type)
            .field("attributes", &self.attributes)
            .finish()
    }
}

impl RawPayload {
    /// Every optional text field with its JSON name, for the length check.
    fn text_fields(&self) -> [(&'static str, &Option<String>); 11] {
        let a = &self.attributes;
        [
            ("displayUrl", &a.display_url),
            ("productType", &self.product_type),
            ("description", &a.description),
            ("serviceEntitlementNumber", &a.service_entitlement_number),
            ("entitlementId", &a.entitlement_id),
            ("entitlementNumber", &a.entitlement_number),
            ("oauthClientId", &a.oauth_client_id),
            ("installationId", &a.installation_id),
            ("cloudId", &a.cloud_id),
            ("serverVersion", &a.server_version),
            ("pluginsVersion", &a.plugins_version),
        ]
    }
}

impl LifecyclePayload {
    pub fn parse(event: LifecycleEvent, body: &[u8], app_key: &str) -> Result<Self, ParseError> {
        let raw: RawPayload = serde_json::from_slice(body)
            .map_err(|e| ParseError(format!("the body is not a JSON lifecycle payload: {e}")))?;
        let client_key = ClientKey::parse(
            raw.client_key
                .as_deref()
                .ok_or_else(|| ParseError("the body has no clientKey".into()))?,
        )?;
        let base_url = BaseUrl::parse(
            raw.base_url
                .as_deref()
                .ok_or_else(|| ParseError("the body has no baseUrl".into()))?,
        )?;
        let shared_secret = raw
            .shared_secret
            .as_deref()
            .map(SharedSecret::parse)
            .transpose()?;
        if event == LifecycleEvent::Installed && shared_secret.is_none() {
            return Err(ParseError(
                "an installed body must carry a sharedSecret".into(),
            ));
        }
        for (name, value) in raw.text_fields() {
            if value
                .as_ref()
                .is_some_and(|v| v.chars().count() > MAX_FIELD_CHARS)
            {
                return Err(ParseError(format!(
                    "the body's {name} is longer than {MAX_FIELD_CHARS} characters"
                )));
            }
        }
        if let Some(key) = raw.key.as_deref() {
            if key != app_key {
                return Err(ParseError(format!(
                    "the body is for app key {key:?}, but this service is app {app_key:?}"
                )));
            }
        }
        Ok(Self {
            client_key,
            base_url,
            shared_secret,
            product_type: raw.product_type.unwrap_or_else(|| "jira".into()),
            attributes: raw.attributes,
            body_digest: Sha256::digest(body).into(),
        })
    }
}
