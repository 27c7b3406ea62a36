//! The lifecycle policy: who may send `installed`, `uninstalled`, `enabled` and `disabled`, and
//! what each one does to the stored installation. It reads nothing from the store and writes
//! nothing: it authenticates a callback against the record it is given and returns a
//! [`Decision`]; [`apply`] is the one place that loads, applies and announces. The wire format
//! (event names, the body) is `connect_protocol::lifecycle`; the secret rules are
//! [`crate::secrets`].
//!
//! A callback goes through three steps, and a failure at any step stores nothing:
//! 1. `LifecyclePayload::parse`: the body, into typed values;
//! 2. [`authenticate`]: the `Authorization` token, per [`InstallAuth`] mode;
//! 3. [`decide`]: replay and ordering checks, then the record to write and the site step.

pub mod apply;

use connect_protocol::authorization::{token_from_header, AuthorizationError};
use connect_protocol::domain::{ClientKey, KeyId, ParseError};
use connect_protocol::jwt::{self, JwtError, Token};
use connect_protocol::lifecycle::{LifecycleEvent, LifecyclePayload};
use connect_protocol::qsh::CanonicalRequest;

use crate::configuration::{is_staging_host, InstallAuth, Settings};
use crate::install_keys::{InstallKeys, KeyFetchError};
use crate::secrets::verify_lifecycle_signature;
use crate::store::{InstallState, Installation, SeenToken, SiteProof, StoreError};

/// How long after the end of its validity an accepted lifecycle token is still remembered.
const REPLAY_MEMORY_MARGIN_SECONDS: i64 = 60;
/// The latest time a token is remembered until (9999-12-31T23:59:59Z).
const REPLAY_MEMORY_LATEST: i64 = 253_402_300_799;

/// Why a lifecycle callback was refused. The service maps each kind to its HTTP status in
/// `error.rs`; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The body or the token's location is malformed.
    #[error(transparent)]
    Malformed(#[from] ParseError),
    /// No acceptable proof of origin.
    #[error("{0}")]
    Unauthenticated(String),
    #[error(transparent)]
    Authorization(#[from] AuthorizationError),
    #[error(transparent)]
    Token(#[from] JwtError),
    #[error(transparent)]
    InstallKey(#[from] KeyFetchError),
    /// Proven, but not allowed (host, `iss` ≠ clientKey, production/staging move).
    #[error("{0}")]
    NotAllowed(String),
    /// A replayed token or an event older than the last one accepted.
    #[error("{0}")]
    Stale(String),
    /// Other writers kept changing the record; the caller should retry.
    #[error("the installation {0} is being changed concurrently; retry")]
    Contention(ClientKey),
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// One lifecycle callback as received: the body parsed, the request for its `qsh`, and the raw
/// `Authorization` header.
pub struct Callback<'a> {
    pub event: LifecycleEvent,
    pub payload: &'a LifecyclePayload,
    /// Method, path and query of the request (the app's base path is stripped).
    pub request: CanonicalRequest,
    pub authorization: Option<&'a [u8]>,
    /// The sender's address, for its own install-key fetch budget.
    pub source: Option<std::net::IpAddr>,
}

/// What the policy needs besides the callback and the record.
pub struct LifecycleContext<'a> {
    pub settings: &'a Settings,
    pub keys: &'a InstallKeys,
}

/// Step 2: checks the token of a callback against the rules of its event and the mode.
pub async fn authenticate(
    ctx: &LifecycleContext<'_>,
    callback: &Callback<'_>,
    existing: Option<&Installation>,
) -> Result<Authenticated, LifecycleError> {
    let (event, payload) = (callback.event, callback.payload);
    let legacy = ctx.settings.install_auth == InstallAuth::Legacy;
    let Some(header) = callback.authorization else {
        if legacy && event == LifecycleEvent::Installed && existing.is_none() {
            check_host(ctx.settings, payload)?;
            return Ok(Authenticated {
                proof: Proof::Unsigned,
                iat: None,
                seen: None,
            });
        }
        return Err(LifecycleError::Unauthenticated(missing_token_message(
            event,
            legacy,
            existing.is_some(),
        )));
    };
    let token = Token::parse(token_from_header(header)?)?;

    let signed_by_atlassian = event.is_install_signed() && (token.alg() == "RS256" || !legacy);
    let verifier = if signed_by_atlassian {
        token.require_alg("RS256")?;
        let kid = token.kid().ok_or(JwtError::MissingKid)?;
        Verifier::InstallKey(KeyId::parse(kid).map_err(|_| JwtError::InvalidKid)?)
    } else {
        token.require_alg("HS256")?;
        match existing {
            Some(installation) => Verifier::TenantSecret(installation),
            // An app that lost (or never had) the record treats a signed reinstall as a first
            // install (docs/PROTOCOL.md §5). In legacy mode that is no weaker than the unsigned
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
                return Err(LifecycleError::Unauthenticated(format!(
                    "no installation is known for clientKey {}, so its token cannot be verified",
                    payload.client_key
                )))
            }
        }
    };

    // Every rule that can be checked on the claims as sent runs before a key is fetched or a
    // secret tried: a junk token costs no key-server fetch and no fetch budget.
    let claims = token.claims();
    let (iat, exp) = claims.check_times(jwt::now())?;
    if signed_by_atlassian {
        claims.check_audience(&ctx.settings.accepted_audiences())?;
    }
    claims.check_qsh(&callback.request, false)?;
    if claims.iss.as_deref() != Some(payload.client_key.as_str()) {
        return Err(LifecycleError::NotAllowed(format!(
            "the token's iss does not equal the body's clientKey {}",
            payload.client_key
        )));
    }
    check_host(ctx.settings, payload)?;

    let proof = match verifier {
        Verifier::InstallKey(kid) => {
            let key = ctx
                .keys
                .key_for(&kid, &payload.base_url, callback.source)
                .await?;
            token.verify_rs256(&key)?;
            Proof::AtlassianSignature
        }
        Verifier::TenantSecret(installation) => {
            verify_lifecycle_signature(&token, event, installation)?;
            Proof::SharedSecret
        }
    };
    Ok(Authenticated {
        proof,
        iat: Some(iat),
        seen: Some(SeenToken {
            token_digest: token.digest(),
            body_digest: payload.body_digest,
            // Remembered well past the last second `check_times` accepts the token, so the
            // memory can never lapse while the token still passes (clock skew included).
            // `exp` is the sender's number, up to `i64::MAX`: capped where every store can
            // still keep it (Redis refuses a later `EXAT`), which is forever in practice.
            expires_at: exp
                .saturating_add(jwt::LEEWAY_SECONDS)
                .saturating_add(REPLAY_MEMORY_MARGIN_SECONDS)
                .min(REPLAY_MEMORY_LATEST),
        }),
    })
}

/// What a lifecycle token's signature is checked with.
enum Verifier<'a> {
    /// Atlassian's install key of this `kid` (RS256).
    InstallKey(KeyId),
    /// A secret of this installation (HS256).
    TenantSecret(&'a Installation),
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

fn check_host(settings: &Settings, payload: &LifecyclePayload) -> Result<(), LifecycleError> {
    let host = payload.base_url.host();
    if settings.host_allowed(&host) {
        Ok(())
    } else {
        Err(LifecycleError::NotAllowed(format!(
            "the host {host} is not an allowed product host (WARDEN_PRODUCT_HOSTS)"
        )))
    }
}

/// What a callback does: the write (if any) and what happens on its site afterwards.
#[derive(Debug)]
pub struct Decision {
    /// The record to store, compare-and-set against `expected_version` (0: no record yet).
    /// `None`: a retry of a callback already applied, or nothing to change.
    pub write: Option<Write>,
    /// The installation after the callback (as written, or as it was when nothing changes).
    pub installation: Option<Installation>,
    pub site: SiteStep,
}

/// One compare-and-set write.
#[derive(Debug)]
pub struct Write {
    pub record: Installation,
    pub expected_version: u64,
    pub token: Option<SeenToken>,
}

/// What an `installed` means for the other installations on its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteStep {
    /// Not an install: the site index is unchanged.
    None,
    /// Record the installation in its site's index.
    Index,
    /// A site import's install, signed by Atlassian: index it and, once its site confirmed it
    /// ([`plan_site`]), retire the installations it outranks on its site ([`apply`] runs the
    /// ranking).
    Import,
    /// An unsigned first install (legacy mode): index it and record whether its site confirms
    /// it, so a squatter is visible. It never retires anyone.
    Observe,
}

/// What [`apply`] does on the site once the callback's record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SitePlan {
    /// Nothing beyond indexing.
    Nothing,
    /// Run the ranking now: retire the installations this install outranks.
    Supersede,
    /// Ask the site to confirm the install in the background; the ranking runs only if it does.
    Prove,
}

/// The site proof of docs/PROTOCOL.md §7 for an `Import` or `Observe` step, once [`apply`]
/// knows whether other clientKeys are indexed on the site: a written record gets `pending`
/// (others there) or `skipped` (alone); a retry of an install already written finishes what it
/// started (a proof cut short by a restart runs again, a proven import's ranking runs again).
/// With proofs off (`proofs == false`) an import ranks at once, as before proofs existed.
pub fn plan_site(decision: &mut Decision, proofs: bool, others_on_site: bool) -> SitePlan {
    let step = decision.site;
    match step {
        SiteStep::None | SiteStep::Index => return SitePlan::Nothing,
        SiteStep::Import if !proofs => return SitePlan::Supersede,
        SiteStep::Observe if !proofs => return SitePlan::Nothing,
        SiteStep::Import | SiteStep::Observe => {}
    }
    if let Some(write) = &mut decision.write {
        let proof = if others_on_site {
            SiteProof::Pending
        } else {
            SiteProof::Skipped
        };
        write.record.site_proof = Some(proof);
        if let Some(installation) = &mut decision.installation {
            installation.site_proof = Some(proof);
        }
        return if others_on_site {
            SitePlan::Prove
        } else {
            SitePlan::Nothing
        };
    }
    let current = decision.installation.as_ref().and_then(|i| i.site_proof);
    match (step, current) {
        (_, Some(SiteProof::Pending)) => SitePlan::Prove,
        // Proven, or written before proofs existed: the interrupted ranking may finish.
        (SiteStep::Import, Some(SiteProof::Proven) | None) => SitePlan::Supersede,
        _ => SitePlan::Nothing,
    }
}

/// Step 3: the replay and ordering checks, then the record after `callback`. `seen_body` is
/// the digest of the body stored with this very token, if it was accepted before. Makes no
/// I/O, so it is decided again, against the new record, whenever the write loses a race.
pub fn decide(
    callback: &Callback<'_>,
    auth: &Authenticated,
    existing: Option<Installation>,
    seen_body: Option<[u8; 32]>,
    now: i64,
) -> Result<Decision, LifecycleError> {
    let (event, payload) = (callback.event, callback.payload);
    check_same_environment(existing.as_ref(), payload)?;
    if let Some(body) = seen_body {
        if auth.seen.is_some_and(|seen| seen.body_digest == body) {
            // The host retrying a callback already applied: nothing to write, but finish a
            // site link that an interrupted first attempt may not have made.
            let site = match &existing {
                Some(installed)
                    if links_site(event, auth, installed, is_latest(installed, payload, auth)) =>
                {
                    SiteStep::Import
                }
                Some(_) if event == LifecycleEvent::Installed => SiteStep::Index,
                _ => SiteStep::None,
            };
            return Ok(Decision {
                write: None,
                installation: existing,
                site,
            });
        }
        return Err(LifecycleError::Stale(
            "this token was already used with a different body: refused as a replay".into(),
        ));
    }
    if let (Some(iat), Some(current)) = (auth.iat, existing.as_ref()) {
        let floor = ordering_floor(event, auth.proof, current);
        if iat < floor {
            return Err(LifecycleError::Stale(format!(
                "this {} was issued (iat {iat}) before the last accepted lifecycle event of its kind (iat {floor}): refused as stale",
                event.name(),
            )));
        }
    }
    let new_installation = existing.is_none();
    let expected_version = existing.as_ref().map_or(0, |i| i.version);
    let Some(mut record) = next_record(event, payload, auth, existing, now)? else {
        return Ok(Decision {
            write: None,
            installation: None,
            site: SiteStep::None,
        });
    };
    record.version = expected_version + 1;
    // An import whose site never confirmed it is still an import when Atlassian installs it
    // again: the new install gets its own proof.
    let unfinished = record.site_proof.is_some_and(SiteProof::is_unproven);
    let site = if links_site(event, auth, &record, new_installation || unfinished) {
        SiteStep::Import
    } else if event == LifecycleEvent::Installed
        && auth.proof == Proof::Unsigned
        && new_installation
    {
        SiteStep::Observe
    } else if event == LifecycleEvent::Installed {
        SiteStep::Index
    } else {
        SiteStep::None
    };
    Ok(Decision {
        installation: Some(record.clone()),
        write: Some(Write {
            record,
            expected_version,
            token: auth.seen,
        }),
        site,
    })
}

/// The `iat` an event must not be older than (docs/PROTOCOL.md §4). Events signed by
/// Atlassian are ordered among themselves, and so are events signed with the tenant's secret:
/// a tenant-signed event (which anyone holding a leaked secret can make) never holds back a
/// signed one, and a product clock a second ahead on `disabled` never refuses the signed
/// `uninstalled` that follows. A tenant-signed reinstall also rolls the secret, so it must not
/// be older than the last signed event either; other tenant-signed events may trail it by
/// the clock leeway at most (a `disabled` issued before Atlassian's last signed event and
/// delivered after it is stale).
fn ordering_floor(event: LifecycleEvent, proof: Proof, current: &Installation) -> i64 {
    match proof {
        Proof::AtlassianSignature => current.last_event_iat,
        _ if event == LifecycleEvent::Installed => {
            current.last_event_iat.max(current.last_tenant_event_iat)
        }
        _ => current
            .last_tenant_event_iat
            .max(current.last_event_iat - jwt::LEEWAY_SECONDS),
    }
}

/// Records `iat` as the newest event of its kind, never ahead of the server clock: a token
/// issued up to the leeway in the future must not raise the floor past what a genuine event
/// issued now carries.
fn record_event_time(record: &mut Installation, proof: Proof, iat: Option<i64>, now: i64) {
    let Some(iat) = iat else { return };
    let at = iat.min(now);
    match proof {
        Proof::AtlassianSignature => record.last_event_iat = record.last_event_iat.max(at),
        _ => record.last_tenant_event_iat = record.last_tenant_event_iat.max(at),
    }
}

/// Whether a retried install is still what the installation last became: no signed event
/// since, and its secret is still current.
fn is_latest(installed: &Installation, payload: &LifecyclePayload, auth: &Authenticated) -> bool {
    let secret_current = payload
        .shared_secret
        .as_ref()
        .is_some_and(|s| installed.current_secret().secret.same_as(s));
    auth.iat.is_some_and(|iat| installed.last_event_iat <= iat) && secret_current
}

/// Whether this `installed` is a site import's first install that may retire other tenants
/// on its site: proven by Atlassian's signature, active, and `first`: the install of a new
/// clientKey, or a retry of that very install (finishing a link an interrupted first attempt
/// did not) while it is still the installation's latest event, or a reinstall of an import its
/// site never confirmed. An unsigned install never links: it could be forged to knock a real
/// tenant out. Even a signed one retires nobody before its site confirms it ([`plan_site`]):
/// the token does not cover the body's `baseUrl`.
fn links_site(
    event: LifecycleEvent,
    auth: &Authenticated,
    installed: &Installation,
    first: bool,
) -> bool {
    event == LifecycleEvent::Installed
        && auth.proof == Proof::AtlassianSignature
        && installed.is_active()
        && first
}

/// Production sites are verified with production keys, `*.jira-dev.com` sites with staging
/// keys, chosen by the body's `baseUrl` (which the token does not cover). So an install must
/// not move a clientKey that Atlassian installed from one to the other: a staging-signed token
/// could otherwise rewrite a production tenant's secret. A record Atlassian never installed
/// (legacy mode's unsigned install) proves nothing, so it cannot hold the signed install out.
fn check_same_environment(
    existing: Option<&Installation>,
    payload: &LifecyclePayload,
) -> Result<(), LifecycleError> {
    let Some(existing) = existing.filter(|e| e.ever_signed()) else {
        return Ok(());
    };
    if is_staging_host(&existing.base_url.host()) != is_staging_host(&payload.base_url.host()) {
        return Err(LifecycleError::NotAllowed(format!(
            "the installation {} cannot move between Atlassian's production and staging sites",
            payload.client_key
        )));
    }
    Ok(())
}

/// The record after `event`, or `None` when there is nothing to store.
fn next_record(
    event: LifecycleEvent,
    payload: &LifecyclePayload,
    auth: &Authenticated,
    existing: Option<Installation>,
    now: i64,
) -> Result<Option<Installation>, LifecycleError> {
    let signed = auth.proof == Proof::AtlassianSignature;
    let Some(mut record) = existing else {
        return match event {
            LifecycleEvent::Installed => {
                let mut record = Installation::new(
                    payload.client_key.clone(),
                    payload.base_url.clone(),
                    payload.product_type.clone(),
                    installed_secret(payload),
                    signed,
                    now,
                );
                record_event_time(&mut record, auth.proof, auth.iat, now);
                fill_from_payload(&mut record, payload);
                Ok(Some(record))
            }
            // An uninstall for a tenant never stored: nothing to mark.
            LifecycleEvent::Uninstalled => Ok(None),
            LifecycleEvent::Enabled | LifecycleEvent::Disabled => {
                Err(LifecycleError::Unauthenticated(format!(
                    "no installation is known for clientKey {}",
                    payload.client_key
                )))
            }
        };
    };
    record_event_time(&mut record, auth.proof, auth.iat, now);
    record.updated_at = now;
    match event {
        LifecycleEvent::Installed => {
            record.roll_secret(installed_secret(payload), signed, now);
            fill_from_payload(&mut record, payload);
            record.state = InstallState::Installed;
            record.enabled = true;
            record.signed_install = signed;
            if signed {
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

fn installed_secret(payload: &LifecyclePayload) -> connect_protocol::domain::SharedSecret {
    payload
        .shared_secret
        .clone()
        .expect("LifecyclePayload::parse requires a sharedSecret for installed")
}

fn fill_from_payload(record: &mut Installation, payload: &LifecyclePayload) {
    record.base_url = payload.base_url.clone();
    record.product_type = payload.product_type.clone();
    let a = &payload.attributes;
    record.display_url = a.display_url.clone();
    record.description = a.description.clone();
    record.oauth_client_id = a.oauth_client_id.clone();
    record.installation_id = a.installation_id.clone();
    record.cloud_id = a.cloud_id.clone();
    record.service_entitlement_number = a.service_entitlement_number.clone();
    record.entitlement_id = a.entitlement_id.clone();
    record.entitlement_number = a.entitlement_number.clone();
    record.server_version = a.server_version.clone();
    record.plugins_version = a.plugins_version.clone();
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::apply::Applier;
    use super::*;
    use connect_protocol::domain::SharedSecret;
    use connect_protocol::lifecycle::MAX_FIELD_CHARS;

    use crate::store::embedded::EmbeddedStore;
    use crate::store::testing::LoadSpy;
    use crate::store::{InstallationStore, SharedStore};
    use crate::tenants::TenantCache;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Settings::from_sources(None, env).unwrap()
    }

    /// Legacy-mode settings and a key cache that is never asked (no RS256 token here).
    fn legacy_mode() -> (Settings, InstallKeys) {
        let keys = InstallKeys::new(vec![], std::time::Duration::from_secs(1));
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

    fn callback<'a>(
        payload: &'a LifecyclePayload,
        authorization: Option<&'a [u8]>,
    ) -> Callback<'a> {
        Callback {
            event: LifecycleEvent::Installed,
            payload,
            request: CanonicalRequest::new("POST", "/installed", "", ""),
            authorization,
            source: None,
        }
    }

    fn applier<'a>(
        settings: &'a Settings,
        keys: &'a InstallKeys,
        store: &'a dyn InstallationStore,
        tenants: &'a TenantCache,
    ) -> Applier<'a> {
        Applier {
            policy: LifecycleContext { settings, keys },
            store,
            tenants,
        }
    }

    /// An unsigned legacy install decided on a stale "no record" must not be written over the
    /// install that committed in between: after the conflict it is authenticated again, against
    /// the record that now exists, and refused.
    #[tokio::test]
    async fn a_decision_is_never_applied_to_a_record_it_was_not_made_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoadSpy::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let (settings, keys) = legacy_mode();
        let tenants = TenantCache::new(
            store.clone() as SharedStore,
            std::time::Duration::from_secs(30),
        );
        let lifecycle = applier(&settings, &keys, store.as_ref(), &tenants);

        let genuine = installed("ck-race", "genuine-secret");
        lifecycle.apply(&callback(&genuine, None)).await.unwrap();

        store.answer_none_once();
        let attacker = installed("ck-race", "attacker-secret");
        let refused = lifecycle.apply(&callback(&attacker, None)).await;
        assert!(
            matches!(refused, Err(LifecycleError::Unauthenticated(_))),
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
        let store: SharedStore = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let (settings, keys) = legacy_mode();
        let tenants = TenantCache::new(store.clone(), std::time::Duration::from_secs(30));
        let lifecycle = applier(&settings, &keys, store.as_ref(), &tenants);
        let first = installed("ck-replay", "one");
        lifecycle.apply(&callback(&first, None)).await.unwrap();
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
            &lifecycle.policy,
            &callback(&reinstall, Some(header.as_bytes())),
            existing.as_ref(),
        )
        .await
        .unwrap();
        let last_accepted_second = exp + jwt::LEEWAY_SECONDS;
        assert!(claims.check_times(last_accepted_second).is_ok());
        assert!(auth.seen.unwrap().expires_at > last_accepted_second);
    }

    /// A decision for a site step: a first install (written) or a retry (nothing written) of
    /// an installation whose recorded proof is `proof`.
    fn site_decision(site: SiteStep, written: bool, proof: Option<SiteProof>) -> Decision {
        let mut record = Installation::new(
            ClientKey::parse("ck-plan").unwrap(),
            connect_protocol::domain::BaseUrl::parse("https://acme.atlassian.net").unwrap(),
            "jira",
            SharedSecret::parse("s").unwrap(),
            true,
            0,
        );
        record.site_proof = proof;
        Decision {
            installation: Some(record.clone()),
            write: written.then(|| Write {
                record,
                expected_version: 0,
                token: None,
            }),
            site,
        }
    }

    /// docs/PROTOCOL.md §7: an install sharing its site is proven before it ranks; one alone
    /// is skipped; a retry finishes what its install started; with proofs off an import ranks
    /// at once; an unsigned install is proven but never ranks.
    #[test]
    fn site_plans() {
        use SitePlan as P;
        use SiteProof::*;
        use SiteStep as S;
        for (site, written, before, proofs, others, plan, after) in [
            (S::Import, true, None, true, true, P::Prove, Some(Pending)),
            (
                S::Import,
                true,
                None,
                true,
                false,
                P::Nothing,
                Some(Skipped),
            ),
            (
                S::Import,
                true,
                Some(Refused),
                true,
                true,
                P::Prove,
                Some(Pending),
            ),
            (S::Import, true, None, false, true, P::Supersede, None),
            (S::Observe, true, None, true, true, P::Prove, Some(Pending)),
            (S::Observe, true, None, false, true, P::Nothing, None),
            (
                S::Import,
                false,
                Some(Pending),
                true,
                true,
                P::Prove,
                Some(Pending),
            ),
            (
                S::Import,
                false,
                Some(Proven),
                true,
                true,
                P::Supersede,
                Some(Proven),
            ),
            (
                S::Import,
                false,
                Some(Refused),
                true,
                true,
                P::Nothing,
                Some(Refused),
            ),
            (
                S::Import,
                false,
                Some(Skipped),
                true,
                true,
                P::Nothing,
                Some(Skipped),
            ),
            (S::Index, true, None, true, true, P::Nothing, None),
        ] {
            let mut decision = site_decision(site, written, before);
            let case =
                format!("{site:?} written={written} {before:?} proofs={proofs} others={others}");
            assert_eq!(plan_site(&mut decision, proofs, others), plan, "{case}");
            let recorded = decision.installation.as_ref().unwrap().site_proof;
            assert_eq!(recorded, after, "{case}");
            if let Some(write) = &decision.write {
                assert_eq!(write.record.site_proof, after, "{case}");
            }
        }
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
        assert!(err.0.contains("description"), "{err:?}");
        value["description"] = serde_json::json!("d".repeat(MAX_FIELD_CHARS));
        assert!(LifecyclePayload::parse(
            LifecycleEvent::Installed,
            &serde_json::to_vec(&value).unwrap(),
            "connect-warden"
        )
        .is_ok());
    }
}
