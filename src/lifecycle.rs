//! The lifecycle policy: who may send `installed`, `uninstalled`, `enabled` and `disabled`, and
//! what each one does to the stored installation. Every rule of the install lifecycle in
//! `PROTOCOL.md` lives here; the JWT mechanics it relies on live in [`crate::jwt`].
//!
//! A callback goes through three steps, and a failure at any step stores nothing:
//! 1. [`LifecyclePayload::parse`]: the body, into typed values (400 on bad input);
//! 2. [`authenticate`]: the `Authorization` token, per [`InstallAuth`] mode (401/403/503);
//! 3. [`apply_once`]: replay and ordering checks, then one atomic compare-and-set write (409
//!    on a stale or replayed callback).
//!
//! [`process`] runs steps 2 and 3 against the record as stored, and when another writer got
//! there first it re-reads the record and runs both again: a decision is never applied to a
//! record other than the one it was made on. Then [`supersede_previous_tenants`] links a site
//! import.

use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::configuration::{is_staging_host, InstallAuth, Settings};
use crate::domain::{BaseUrl, ClientKey, KeyId, SharedSecret};
use crate::error::ApiError;
use crate::install_keys::InstallKeys;
use crate::jwt::{self, CanonicalRequest, JwtError, Token};
use crate::store::{
    Commit, CommitOutcome, InstallState, Installation, InstallationStore, SeenToken,
};

/// Lifecycle bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How often a write is retried when another writer changed the record in between.
const MAX_COMMIT_ATTEMPTS: usize = 8;

/// How long after the end of its validity an accepted lifecycle token is still remembered.
const REPLAY_MEMORY_MARGIN_SECONDS: i64 = 60;

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
    fn is_install_signed(self) -> bool {
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
    display_url: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    product_type: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    description: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    service_entitlement_number: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    entitlement_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    entitlement_number: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    oauth_client_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    installation_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    cloud_id: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    server_version: Option<String>,
    #[serde(default, deserialize_with = "loose_string")]
    plugins_version: Option<String>,
}

/// A lifecycle body, parsed. `shared_secret` is present for `installed`.
pub struct LifecyclePayload {
    pub client_key: ClientKey,
    pub base_url: BaseUrl,
    pub shared_secret: Option<SharedSecret>,
    pub product_type: String,
    raw: RawPayload,
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
            .finish_non_exhaustive()
    }
}

impl RawPayload {
    /// Every optional text field with its JSON name, for the length check.
    fn text_fields(&self) -> [(&'static str, &Option<String>); 11] {
        [
            ("displayUrl", &self.display_url),
            ("productType", &self.product_type),
            ("description", &self.description),
            ("serviceEntitlementNumber", &self.service_entitlement_number),
            ("entitlementId", &self.entitlement_id),
            ("entitlementNumber", &self.entitlement_number),
            ("oauthClientId", &self.oauth_client_id),
            ("installationId", &self.installation_id),
            ("cloudId", &self.cloud_id),
            ("serverVersion", &self.server_version),
            ("pluginsVersion", &self.plugins_version),
        ]
    }
}

impl LifecyclePayload {
    pub fn parse(event: LifecycleEvent, body: &[u8], app_key: &str) -> Result<Self, ApiError> {
        let raw: RawPayload = serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!("the body is not a JSON lifecycle payload: {e}"))
        })?;
        let bad = |e: crate::domain::ParseError| ApiError::BadRequest(e.0);
        let client_key = ClientKey::parse(
            raw.client_key
                .as_deref()
                .ok_or_else(|| ApiError::BadRequest("the body has no clientKey".into()))?,
        )
        .map_err(bad)?;
        let base_url = BaseUrl::parse(
            raw.base_url
                .as_deref()
                .ok_or_else(|| ApiError::BadRequest("the body has no baseUrl".into()))?,
        )
        .map_err(bad)?;
        let shared_secret = raw
            .shared_secret
            .as_deref()
            .map(SharedSecret::parse)
            .transpose()
            .map_err(bad)?;
        if event == LifecycleEvent::Installed && shared_secret.is_none() {
            return Err(ApiError::BadRequest(
                "an installed body must carry a sharedSecret".into(),
            ));
        }
        for (name, value) in raw.text_fields() {
            if value
                .as_ref()
                .is_some_and(|v| v.chars().count() > MAX_FIELD_CHARS)
            {
                return Err(ApiError::BadRequest(format!(
                    "the body's {name} is longer than {MAX_FIELD_CHARS} characters"
                )));
            }
        }
        if let Some(key) = raw.key.as_deref() {
            if key != app_key {
                return Err(ApiError::BadRequest(format!(
                    "the body is for app key {key:?}, but this service is app {app_key:?}"
                )));
            }
        }
        Ok(Self {
            client_key,
            base_url,
            shared_secret,
            product_type: raw.product_type.clone().unwrap_or_else(|| "jira".into()),
            raw,
            body_digest: Sha256::digest(body).into(),
        })
    }
}

/// What the request line says, for the `qsh`.
#[derive(Debug, Clone)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
}

/// How a callback proved where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// RS256 by Atlassian's install key.
    AtlassianSignature,
    /// HS256 by a secret the installation holds (or held).
    SharedSecret,
    /// Legacy mode's first install: nothing proved.
    Unsigned,
}

/// A callback that passed authentication.
#[derive(Debug)]
pub struct Authenticated {
    pub proof: Proof,
    /// `iat` of the token; `None` for an unsigned install.
    pub iat: Option<i64>,
    pub seen: Option<SeenToken>,
}

pub struct LifecycleContext<'a> {
    pub settings: &'a Settings,
    pub store: &'a dyn InstallationStore,
    pub keys: &'a InstallKeys,
}

/// Step 2: checks the token of a callback against the rules of its event and the mode.
pub async fn authenticate(
    ctx: &LifecycleContext<'_>,
    event: LifecycleEvent,
    request: &RequestLine<'_>,
    authorization: Option<&str>,
    payload: &LifecyclePayload,
    existing: Option<&Installation>,
) -> Result<Authenticated, ApiError> {
    let legacy = ctx.settings.install_auth == InstallAuth::Legacy;
    let Some(header) = authorization else {
        if legacy && event == LifecycleEvent::Installed && existing.is_none() {
            check_host(ctx.settings, payload)?;
            return Ok(Authenticated {
                proof: Proof::Unsigned,
                iat: None,
                seen: None,
            });
        }
        return Err(ApiError::Unauthenticated(missing_token_message(
            event,
            legacy,
            existing.is_some(),
        )));
    };
    let raw = header
        .strip_prefix("JWT ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthenticated("the Authorization header must be \"JWT <token>\"".into())
        })?;
    let token = Token::parse(raw)?;

    let proof = if event.is_install_signed() && (token.alg() == "RS256" || !legacy) {
        token.require_alg("RS256")?;
        let kid = token.kid().ok_or(JwtError::MissingKid)?;
        let kid = KeyId::parse(kid).map_err(|_| JwtError::InvalidKid)?;
        let key = ctx.keys.key(&kid, &payload.base_url).await?;
        token.verify_rs256(&key)?;
        Proof::AtlassianSignature
    } else {
        token.require_alg("HS256")?;
        match existing {
            Some(installation) => {
                verify_with_known_secret(&token, event, installation)?;
                Proof::SharedSecret
            }
            // Seed 001 #13: an app that lost (or never had) the record treats a signed
            // reinstall as a first install. In legacy mode that is no weaker than the unsigned
            // first install it already accepts.
            None if legacy && event == LifecycleEvent::Installed => {
                check_host(ctx.settings, payload)?;
                tracing::warn!(client_key = %payload.client_key, "HS256 install for an unknown clientKey accepted as a first install (legacy mode)");
                return Ok(Authenticated {
                    proof: Proof::Unsigned,
                    iat: None,
                    seen: None,
                });
            }
            None => {
                return Err(ApiError::Unauthenticated(format!(
                    "no installation is known for clientKey {}, so its token cannot be verified",
                    payload.client_key
                )))
            }
        }
    };

    let claims = token.claims();
    let (iat, exp) = claims.check_times(jwt::now())?;
    if proof == Proof::AtlassianSignature {
        claims.check_audience(&ctx.settings.accepted_audiences())?;
    }
    let canonical = CanonicalRequest::new(
        request.method,
        request.path,
        request.query,
        ctx.settings.base_url.path(),
    );
    claims.check_qsh(&canonical, false)?;
    if claims.iss.as_deref() != Some(payload.client_key.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "the token's iss does not equal the body's clientKey {}",
            payload.client_key
        )));
    }
    check_host(ctx.settings, payload)?;
    Ok(Authenticated {
        proof,
        iat: Some(iat),
        seen: Some(SeenToken {
            token_digest: token.digest(),
            body_digest: payload.body_digest,
            // Remembered well past the last second `check_times` accepts the token, so the
            // memory can never lapse while the token still passes (clock skew included).
            expires_at: exp + jwt::LEEWAY_SECONDS + REPLAY_MEMORY_MARGIN_SECONDS,
        }),
    })
}

fn missing_token_message(event: LifecycleEvent, legacy: bool, known: bool) -> String {
    match (event.is_install_signed(), legacy, known) {
        (true, false, _) => format!("{} must carry Atlassian's signature: Authorization: JWT <RS256 token>", event.name()),
        (_, true, true) if event == LifecycleEvent::Installed => {
            "an installed callback for a known clientKey must be signed (RS256, or HS256 with its shared secret)".into()
        }
        _ => format!("{} must carry Authorization: JWT <token>", event.name()),
    }
}

/// HS256 callbacks: `enabled`/`disabled` (and legacy `uninstalled`) with the current secret;
/// a legacy reinstall with the current secret or one kept in the history, also after an
/// `uninstalled` (seed 001), but none older than the newest secret that came with a signed
/// install ([`Installation::secrets_for_reinstall`]).
fn verify_with_known_secret(
    token: &Token<'_>,
    event: LifecycleEvent,
    installation: &Installation,
) -> Result<(), ApiError> {
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
    Err(JwtError::BadSignature.into())
}

fn check_host(settings: &Settings, payload: &LifecyclePayload) -> Result<(), ApiError> {
    let host = payload.base_url.host();
    if settings.host_allowed(&host) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "the host {host} is not an allowed product host (WARDEN_PRODUCT_HOSTS)"
        )))
    }
}

/// What a callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The record was written.
    Applied,
    /// A retry of a callback already applied, or nothing to change: nothing written.
    Unchanged,
}

/// What changed in a write, for cache invalidation and the site-import step.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    pub installation: Option<Arc<Installation>>,
    pub new_installation: bool,
}

/// What [`process`] did with a callback.
#[derive(Debug)]
pub struct Processed {
    pub applied: Applied,
    pub proof: Proof,
    /// Installations retired by this install (site import).
    pub superseded: Vec<ClientKey>,
}

/// Steps 2 and 3 for one callback, then the site-import step. `authorization` is the raw
/// `Authorization` header.
pub async fn process(
    ctx: &LifecycleContext<'_>,
    event: LifecycleEvent,
    request: &RequestLine<'_>,
    authorization: Option<&str>,
    payload: &LifecyclePayload,
) -> Result<Processed, ApiError> {
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        let existing = ctx.store.load(&payload.client_key).await?;
        // Authenticated against exactly the record the write will compare against.
        let auth = authenticate(
            ctx,
            event,
            request,
            authorization,
            payload,
            existing.as_ref(),
        )
        .await?;
        check_same_environment(existing.as_ref(), payload)?;
        let Some(applied) = apply_once(ctx.store, event, payload, &auth, existing).await? else {
            continue;
        };
        let superseded = match &applied.installation {
            Some(installed) if links_site(event, &applied, &auth, installed) => {
                supersede_previous_tenants(ctx.store, installed, auth.iat.unwrap_or(0)).await?
            }
            Some(installed) if event == LifecycleEvent::Installed => {
                ctx.store
                    .index_site(&installed.base_url, &installed.client_key)
                    .await?;
                Vec::new()
            }
            _ => Vec::new(),
        };
        return Ok(Processed {
            applied,
            proof: auth.proof,
            superseded,
        });
    }
    Err(ApiError::Unavailable(format!(
        "the installation {} is being changed concurrently; retry",
        payload.client_key
    )))
}

/// Whether this `installed` is a site import's first install that may retire other tenants
/// on its site: proven by Atlassian's signature, for a new clientKey, or a retry of that very
/// install (finishing a link an interrupted first attempt did not) while it is still the
/// installation's latest event and the installation is active.
fn links_site(
    event: LifecycleEvent,
    applied: &Applied,
    auth: &Authenticated,
    installed: &Installation,
) -> bool {
    event == LifecycleEvent::Installed
        && auth.proof == Proof::AtlassianSignature
        && installed.is_active()
        && match applied.outcome {
            Outcome::Applied => applied.new_installation,
            Outcome::Unchanged => auth.iat == Some(installed.last_event_iat),
        }
}

/// Production sites are verified with production keys, `*.jira-dev.com` sites with staging
/// keys, chosen by the body's `baseUrl` (which the token does not cover). So an install must
/// not move a clientKey from one to the other: a staging-signed token could otherwise rewrite
/// a production tenant's secret.
fn check_same_environment(
    existing: Option<&Installation>,
    payload: &LifecyclePayload,
) -> Result<(), ApiError> {
    let Some(existing) = existing else {
        return Ok(());
    };
    if is_staging_host(&existing.base_url.host()) != is_staging_host(&payload.base_url.host()) {
        return Err(ApiError::Forbidden(format!(
            "the installation {} cannot move between Atlassian's production and staging sites",
            payload.client_key
        )));
    }
    Ok(())
}

/// Step 3: replay and ordering checks, then one compare-and-set write. `None`: another writer
/// changed the record since it was read; read again and decide again.
pub async fn apply_once(
    store: &dyn InstallationStore,
    event: LifecycleEvent,
    payload: &LifecyclePayload,
    auth: &Authenticated,
    existing: Option<Installation>,
) -> Result<Option<Applied>, ApiError> {
    if let Some(seen) = &auth.seen {
        match store
            .seen_token(&payload.client_key, &seen.token_digest)
            .await?
        {
            Some(body) if body == seen.body_digest => {
                return Ok(Some(Applied {
                    outcome: Outcome::Unchanged,
                    installation: existing.map(Arc::new),
                    new_installation: false,
                }))
            }
            Some(_) => {
                return Err(ApiError::Conflict(
                    "this token was already used with a different body: refused as a replay".into(),
                ))
            }
            None => {}
        }
    }
    if let (Some(iat), Some(current)) = (auth.iat, existing.as_ref()) {
        if iat < current.last_event_iat {
            return Err(ApiError::Conflict(format!(
                "this {} was issued (iat {iat}) before the last accepted lifecycle event (iat {}): refused as stale",
                event.name(),
                current.last_event_iat
            )));
        }
    }
    let now = jwt::now();
    let new_installation = existing.is_none();
    let expected_version = existing.as_ref().map_or(0, |i| i.version);
    let Some(mut record) = next_record(event, payload, auth, existing, now)? else {
        return Ok(Some(Applied {
            outcome: Outcome::Unchanged,
            installation: None,
            new_installation: false,
        }));
    };
    let commit = Commit {
        record: &record,
        expected_version,
        token: auth.seen,
    };
    match store.commit(commit).await? {
        CommitOutcome::Committed => {
            record.version = expected_version + 1;
            Ok(Some(Applied {
                outcome: Outcome::Applied,
                installation: Some(Arc::new(record)),
                new_installation,
            }))
        }
        CommitOutcome::Conflict => Ok(None),
    }
}

/// The record after `event`, or `None` when there is nothing to store.
fn next_record(
    event: LifecycleEvent,
    payload: &LifecyclePayload,
    auth: &Authenticated,
    existing: Option<Installation>,
    now: i64,
) -> Result<Option<Installation>, ApiError> {
    let iat = auth.iat.unwrap_or(0);
    let Some(mut record) = existing else {
        return match event {
            LifecycleEvent::Installed => Ok(Some(new_record(payload, auth, now))),
            // An uninstall for a tenant never stored: nothing to mark.
            LifecycleEvent::Uninstalled => Ok(None),
            LifecycleEvent::Enabled | LifecycleEvent::Disabled => {
                Err(ApiError::Unauthenticated(format!(
                    "no installation is known for clientKey {}",
                    payload.client_key
                )))
            }
        };
    };
    record.last_event_iat = record.last_event_iat.max(iat);
    record.updated_at = now;
    match event {
        LifecycleEvent::Installed => {
            let secret = payload
                .shared_secret
                .clone()
                .expect("checked by LifecyclePayload::parse");
            record.roll_secret(secret, auth.proof == Proof::AtlassianSignature, now);
            fill_from_payload(&mut record, payload);
            record.state = InstallState::Installed;
            record.enabled = true;
            record.signed_install = auth.proof == Proof::AtlassianSignature;
            if record.signed_install {
                // Atlassian itself installed this clientKey again: the site exists.
                record.superseded_by = None;
            }
        }
        LifecycleEvent::Uninstalled => record.state = InstallState::Uninstalled,
        LifecycleEvent::Enabled => record.enabled = true,
        LifecycleEvent::Disabled => record.enabled = false,
    }
    Ok(Some(record))
}

fn new_record(payload: &LifecyclePayload, auth: &Authenticated, now: i64) -> Installation {
    let secret = payload
        .shared_secret
        .clone()
        .expect("checked by LifecyclePayload::parse");
    let mut record = Installation::new(
        payload.client_key.clone(),
        payload.base_url.clone(),
        payload.product_type.clone(),
        secret,
        auth.proof == Proof::AtlassianSignature,
        now,
    );
    record.last_event_iat = auth.iat.unwrap_or(0);
    fill_from_payload(&mut record, payload);
    record
}

fn fill_from_payload(record: &mut Installation, payload: &LifecyclePayload) {
    let raw = &payload.raw;
    record.base_url = payload.base_url.clone();
    record.product_type = payload.product_type.clone();
    record.display_url = raw.display_url.clone();
    record.description = raw.description.clone();
    record.oauth_client_id = raw.oauth_client_id.clone();
    record.installation_id = raw.installation_id.clone();
    record.cloud_id = raw.cloud_id.clone();
    record.service_entitlement_number = raw.service_entitlement_number.clone();
    record.entitlement_id = raw.entitlement_id.clone();
    record.entitlement_number = raw.entitlement_number.clone();
    record.server_version = raw.server_version.clone();
    record.plugins_version = raw.plugins_version.clone();
}

/// Site import (seed 003): a new clientKey installed, with Atlassian's signature, on a site
/// whose `baseUrl` belongs to other active installations. The most recent install on a site
/// wins: installations are ranked by their latest lifecycle event (`iat`), then by the order
/// in which the site index first saw them, which every instance reads alike. Those ranked
/// below this install are marked superseded by it and linked from it; should another active
/// one rank above it (two imports racing), this installation is the one superseded. So
/// exactly one installation of a site stays active, whatever order the writes land in. The
/// caller decides that this install may supersede at all ([`links_site`]): an unsigned
/// install never does, it could be forged to knock a real tenant out. Returns the clientKeys
/// superseded (possibly this installation's own).
pub async fn supersede_previous_tenants(
    store: &dyn InstallationStore,
    installed: &Installation,
    install_iat: i64,
) -> Result<Vec<ClientKey>, ApiError> {
    store
        .index_site(&installed.base_url, &installed.client_key)
        .await?;
    let site_order = store.client_keys_for_site(&installed.base_url).await?;
    let position = |key: &ClientKey| site_order.iter().position(|k| k == key);
    let this = (install_iat, position(&installed.client_key));
    let mut superseded = Vec::new();
    for other in &site_order {
        if *other == installed.client_key {
            continue;
        }
        let mut other_is_newer = false;
        let marked = update_with_retry(store, other, |old| {
            if !old.is_active() || old.base_url != installed.base_url {
                return None;
            }
            if (old.last_event_iat, position(other)) > this {
                other_is_newer = true;
                return None;
            }
            old.superseded_by = Some(installed.client_key.clone());
            Some(())
        })
        .await?;
        if marked {
            tracing::warn!(old_client_key = %other, new_client_key = %installed.client_key, base_url = %installed.base_url,
                "site import: installation superseded by a new clientKey on the same site");
            link(store, &installed.client_key, other).await?;
            superseded.push(other.clone());
        } else if other_is_newer {
            let own = update_with_retry(store, &installed.client_key, |own| {
                own.is_active()
                    .then(|| own.superseded_by = Some(other.clone()))
            })
            .await?;
            if own {
                tracing::warn!(old_client_key = %installed.client_key, new_client_key = %other, base_url = %installed.base_url,
                    "site import: a newer installation on the same site supersedes this one");
                link(store, other, &installed.client_key).await?;
                superseded.push(installed.client_key.clone());
                break;
            }
        }
    }
    Ok(superseded)
}

/// Records on `successor` that it superseded `predecessor`.
async fn link(
    store: &dyn InstallationStore,
    successor: &ClientKey,
    predecessor: &ClientKey,
) -> Result<(), ApiError> {
    update_with_retry(store, successor, |record| {
        (!record.supersedes.contains(predecessor))
            .then(|| record.supersedes.push(predecessor.clone()))
    })
    .await?;
    Ok(())
}

/// Read-modify-write of one record with compare-and-set; `change` returns `None` to leave it.
async fn update_with_retry(
    store: &dyn InstallationStore,
    client_key: &ClientKey,
    mut change: impl FnMut(&mut Installation) -> Option<()>,
) -> Result<bool, ApiError> {
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        let Some(mut record) = store.load(client_key).await? else {
            return Ok(false);
        };
        let expected_version = record.version;
        if change(&mut record).is_none() {
            return Ok(false);
        }
        record.updated_at = jwt::now();
        if store
            .commit(Commit {
                record: &record,
                expected_version,
                token: None,
            })
            .await?
            == CommitOutcome::Committed
        {
            return Ok(true);
        }
    }
    Err(ApiError::Unavailable(format!(
        "the installation {client_key} is being changed concurrently; retry"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::testing::LoadSpy;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::from_sources(None, env).unwrap()
    }

    /// Legacy-mode settings and a key cache that is never asked (no RS256 token here).
    fn legacy_mode() -> (Settings, InstallKeys) {
        let keys = InstallKeys::new(None, std::time::Duration::from_secs(1));
        (settings(&[("WARDEN_INSTALL_AUTH", "legacy")]), keys)
    }

    fn installed(client_key: &str, secret: &str) -> LifecyclePayload {
        LifecyclePayload::parse(
            LifecycleEvent::Installed,
            &body(client_key, secret),
            "connect-warden",
        )
        .unwrap()
    }

    fn body(client_key: &str, secret: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "key": "connect-warden",
            "clientKey": client_key,
            "sharedSecret": secret,
            "baseUrl": "https://acme.atlassian.net",
            "productType": "jira",
        }))
        .unwrap()
    }

    const INSTALLED: RequestLine<'static> = RequestLine {
        method: "POST",
        path: "/installed",
        query: "",
    };

    /// An unsigned legacy install decided on a stale "no record" must not be written over the
    /// install that committed in between: after the conflict it is authenticated again, against
    /// the record that now exists, and refused.
    #[tokio::test]
    async fn a_decision_is_never_applied_to_a_record_it_was_not_made_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoadSpy::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let (settings, keys) = legacy_mode();
        let ctx = LifecycleContext {
            settings: &settings,
            store: store.as_ref(),
            keys: &keys,
        };

        let genuine = installed("ck-race", "genuine-secret");
        process(&ctx, LifecycleEvent::Installed, &INSTALLED, None, &genuine)
            .await
            .unwrap();

        store.answer_none_once();
        let attacker = installed("ck-race", "attacker-secret");
        let refused = process(&ctx, LifecycleEvent::Installed, &INSTALLED, None, &attacker).await;
        assert!(
            matches!(refused, Err(ApiError::Unauthenticated(_))),
            "{refused:?}"
        );
        let stored = store.load(&genuine.client_key).await.unwrap().unwrap();
        assert_eq!(stored.current_secret().secret.expose(), "genuine-secret");
        assert_eq!(stored.secrets.len(), 1);
    }

    /// An accepted token is remembered past the last second in which it still passes the
    /// time check, so a replay with another body can never slip through at that boundary.
    #[tokio::test]
    async fn replay_memory_outlives_token_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (settings, keys) = legacy_mode();
        let ctx = LifecycleContext {
            settings: &settings,
            store: &store,
            keys: &keys,
        };
        let first = installed("ck-replay", "one");
        process(&ctx, LifecycleEvent::Installed, &INSTALLED, None, &first)
            .await
            .unwrap();
        let existing = store.load(&first.client_key).await.unwrap();

        let now = jwt::now();
        let exp = now + 10;
        let claims = jwt::Claims {
            iss: Some("ck-replay".into()),
            iat: Some(now),
            exp: Some(exp),
            qsh: Some(CanonicalRequest::new("POST", "/installed", "", "").qsh()),
            ..Default::default()
        };
        let token = jwt::sign_hs256(&claims, &SharedSecret::parse("one").unwrap());
        let reinstall = installed("ck-replay", "two");
        let header = format!("JWT {token}");
        let auth = authenticate(
            &ctx,
            LifecycleEvent::Installed,
            &INSTALLED,
            Some(&header),
            &reinstall,
            existing.as_ref(),
        )
        .await
        .unwrap();
        let last_accepted_second = exp + jwt::LEEWAY_SECONDS;
        assert!(claims.check_times(last_accepted_second).is_ok());
        assert!(auth.seen.unwrap().expires_at > last_accepted_second);
    }

    #[test]
    fn payload_debug_never_shows_the_secret() {
        let payload = installed("ck-debug", "very-secret-value");
        let shown = format!("{payload:?}");
        assert!(shown.contains("ck-debug"));
        assert!(!shown.contains("very-secret-value"), "{shown}");
    }

    #[test]
    fn oversized_fields_are_refused_naming_the_field() {
        let mut value: serde_json::Value = serde_json::from_slice(&body("ck-big", "s")).unwrap();
        value["description"] = serde_json::json!("d".repeat(MAX_FIELD_CHARS + 1));
        let err = LifecyclePayload::parse(
            LifecycleEvent::Installed,
            &serde_json::to_vec(&value).unwrap(),
            "connect-warden",
        )
        .unwrap_err();
        assert!(
            matches!(&err, ApiError::BadRequest(m) if m.contains("description")),
            "{err:?}"
        );
        value["description"] = serde_json::json!("d".repeat(MAX_FIELD_CHARS));
        assert!(LifecyclePayload::parse(
            LifecycleEvent::Installed,
            &serde_json::to_vec(&value).unwrap(),
            "connect-warden"
        )
        .is_ok());
    }
}
