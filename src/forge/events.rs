//! Forge lifecycle events (`avi:forge:installed:app`, `avi:forge:upgraded:app`) and the
//! `preUninstall` trigger, delivered to `POST /forge/events` with a FIT (docs/PROTOCOL.md §12,
//! "Forge lifecycle events").
//!
//! The FIT does not cover the body, so the installation is the token's, never the body's; the
//! body only says which event it is (and may name the installation, which must agree). The
//! event is applied to the linked Connect installation's record by compare-and-set, and the
//! change is idempotent: a second delivery of an applied event (Atlassian's retries every
//! 60 s, or one that reached another instance) finds nothing to change and writes nothing.
//! [`SeenEvents`] answers the retries this instance already applied without a store read.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ApiError;
use crate::startup::AppState;
use crate::store::{Commit, CommitOutcome, ForgeBinding, Installation};
use connect_protocol::forge::{InstallationId, VerifiedFit};

/// Longest event body accepted (a real one is well under 1 KiB).
pub const MAX_EVENT_BODY_BYTES: usize = 64 * 1024;
/// How long an applied event is remembered: longer than Atlassian's 4 retries 60 s apart.
const SEEN_EVENT_TTL: Duration = Duration::from_secs(10 * 60);
const SEEN_EVENT_CAPACITY: u64 = 100_000;
/// How many installationIds a record remembers as replaced (never bound again by an event).
pub const MAX_RETIRED_INSTALLATIONS: usize = 10;
const MAX_COMMIT_ATTEMPTS: usize = 8;

/// The events `POST /forge/events` accepts, by the body's `eventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForgeEventKind {
    Installed,
    Upgraded,
    PreUninstall,
}

impl ForgeEventKind {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "avi:forge:installed:app" => Some(Self::Installed),
            "avi:forge:upgraded:app" => Some(Self::Upgraded),
            "preUninstall" => Some(Self::PreUninstall),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installed => "avi:forge:installed:app",
            Self::Upgraded => "avi:forge:upgraded:app",
            Self::PreUninstall => "preUninstall",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventBody {
    event_type: Option<String>,
    /// The installation, in the documented `avi:forge:installed:app` payload.
    id: Option<String>,
    installation_id: Option<String>,
    retry_context: Option<serde_json::Value>,
}

/// One event as received: its kind, and whether Atlassian marked it a retry.
#[derive(Debug, Clone, Copy)]
pub struct ForgeEvent {
    pub kind: ForgeEventKind,
    pub retry: bool,
}

impl ForgeEvent {
    /// Parses `body` against the verified token: an installation the body names (`id` or
    /// `installationId`, either form) must be the token's.
    pub fn parse(body: &[u8], fit: &VerifiedFit) -> Result<Self, ApiError> {
        let body: EventBody = serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("the event body is not valid JSON: {e}")))?;
        let raw = body
            .event_type
            .ok_or_else(|| ApiError::BadRequest("the event body has no eventType".to_owned()))?;
        let kind = ForgeEventKind::parse(&raw).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "the eventType {raw:?} is not one warden handles (avi:forge:installed:app, avi:forge:upgraded:app, preUninstall)"
            ))
        })?;
        for (field, value) in [("id", &body.id), ("installationId", &body.installation_id)] {
            let Some(value) = value else { continue };
            let named = InstallationId::parse(value)
                .map_err(|e| ApiError::BadRequest(format!("the event's {field}: {e}")))?;
            if named != fit.installation_id {
                return Err(ApiError::BadRequest(format!(
                    "the event's {field} {named} does not match the Forge Invocation Token's app.installationId {}",
                    fit.installation_id
                )));
            }
        }
        Ok(Self {
            kind,
            retry: body.retry_context.is_some(),
        })
    }
}

/// An event's identity: the installation, the event and the app version (Atlassian documents
/// no event id). A reinstall has a new installation, an upgrade a new version.
type EventKey = (uuid::Uuid, ForgeEventKind, Option<String>);

/// The events this instance applied in the last [`SEEN_EVENT_TTL`]; bounded.
#[derive(Debug)]
pub struct SeenEvents(moka::sync::Cache<EventKey, ()>);

impl Default for SeenEvents {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(SEEN_EVENT_CAPACITY)
                .time_to_live(SEEN_EVENT_TTL)
                .build(),
        )
    }
}

fn key_of(fit: &VerifiedFit, kind: ForgeEventKind) -> EventKey {
    (fit.installation_id.uuid(), kind, fit.app_version.clone())
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// The linked installation's record was written.
    Applied,
    /// The record already said so (a repeated delivery): nothing written.
    Unchanged,
    /// This instance applied the same event moments ago: not looked at again.
    Duplicate,
    /// The event names an installationId the record replaced: it never moves the binding back.
    Stale,
    /// No active Connect installation is linked to the token: nothing stored.
    Unlinked,
}

impl EventOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Unlinked => "unlinked",
        }
    }
}

/// Applies `event` for the verified token: to the linked Connect installation, once.
pub async fn apply(
    state: &AppState,
    seen: &SeenEvents,
    fit: &VerifiedFit,
    event: ForgeEvent,
    now: i64,
) -> Result<(EventOutcome, Option<connect_protocol::domain::ClientKey>), ApiError> {
    let key = key_of(fit, event.kind);
    if seen.0.contains_key(&key) {
        return Ok((EventOutcome::Duplicate, None));
    }
    let Some(linked) = crate::tenant_request::linked_installation(state, fit).await? else {
        return Ok((EventOutcome::Unlinked, None));
    };
    let client_key = linked.client_key.clone();
    let outcome = update(state, &client_key, |record| {
        change(record, fit, event.kind, now)
    })
    .await?;
    if outcome == EventOutcome::Applied {
        state.tenants.invalidate(&client_key).await;
    }
    seen.0.insert(key, ());
    Ok((outcome, Some(client_key)))
}

/// The record `event` makes of `record`, or the outcome when it changes nothing.
fn change(
    record: &mut Installation,
    fit: &VerifiedFit,
    kind: ForgeEventKind,
    now: i64,
) -> Result<(), EventOutcome> {
    let id = fit.installation_id.to_string();
    if record
        .forge
        .as_ref()
        .is_some_and(|b| b.retired.contains(&id))
    {
        return Err(EventOutcome::Stale);
    }
    let before = (
        record.installation_id.clone(),
        record.cloud_id.clone(),
        record.forge.clone(),
    );
    let current = record
        .installation_id
        .as_deref()
        .and_then(|raw| InstallationId::parse(raw).ok());
    match kind {
        // Only the bound installation is being uninstalled; another one's trigger says nothing
        // of this record.
        ForgeEventKind::PreUninstall => {
            if current != Some(fit.installation_id) {
                return Err(EventOutcome::Stale);
            }
            let binding = record.forge.get_or_insert_with(ForgeBinding::default);
            binding.installation_id = id;
            binding.uninstalling_since.get_or_insert(now);
        }
        ForgeEventKind::Installed | ForgeEventKind::Upgraded => {
            let binding = record.forge.get_or_insert_with(ForgeBinding::default);
            if let Some(old) = current.filter(|old| *old != fit.installation_id) {
                binding.retired.push(old.to_string());
                let excess = binding
                    .retired
                    .len()
                    .saturating_sub(MAX_RETIRED_INSTALLATIONS);
                binding.retired.drain(..excess);
            }
            binding.installation_id = id.clone();
            if fit.app_version.is_some() {
                binding.app_version = fit.app_version.clone();
            }
            if kind == ForgeEventKind::Installed {
                binding.uninstalling_since = None;
            }
            record.installation_id = Some(id);
            if let Some(cloud) = &fit.cloud_id {
                record.cloud_id = Some(cloud.clone());
            }
        }
    }
    let after = (
        record.installation_id.clone(),
        record.cloud_id.clone(),
        record.forge.clone(),
    );
    if before == after {
        return Err(EventOutcome::Unchanged);
    }
    record.updated_at = now;
    Ok(())
}

/// Read-modify-write of `client_key`'s record with compare-and-set, deciding again on the
/// record read after a lost race.
async fn update(
    state: &AppState,
    client_key: &connect_protocol::domain::ClientKey,
    mut change: impl FnMut(&mut Installation) -> Result<(), EventOutcome>,
) -> Result<EventOutcome, ApiError> {
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        let Some(mut record) = state.store.load(client_key).await? else {
            return Ok(EventOutcome::Unlinked);
        };
        let expected_version = record.version;
        if let Err(outcome) = change(&mut record) {
            return Ok(outcome);
        }
        let commit = Commit {
            record: &record,
            expected_version,
            token: None,
        };
        if state.store.commit(commit).await? == CommitOutcome::Committed {
            return Ok(EventOutcome::Applied);
        }
    }
    Err(ApiError::Unavailable(format!(
        "the installation {client_key} is being changed concurrently; retry"
    )))
}
