//! The one place where a lifecycle callback touches the store: load the record, let the policy
//! authenticate and decide against exactly that record, write with compare-and-set (deciding
//! again after a lost race), run the site step, then drop every installation it changed from
//! the tenant cache (which announces it to the host client and, through the store's publish,
//! to other instances).

use std::sync::Arc;

use connect_protocol::domain::ClientKey;
use connect_protocol::jwt;

use super::{authenticate, decide, Callback, LifecycleContext, LifecycleError, Proof, SiteStep};
use crate::store::{Commit, CommitOutcome, Installation, InstallationStore};
use crate::tenants::TenantCache;

/// How often a write is retried when another writer changed the record in between.
const MAX_COMMIT_ATTEMPTS: usize = 8;

/// What a callback did.
#[derive(Debug)]
pub struct Applied {
    /// Whether the callback's own record was written (`false`: a retry, or nothing to change).
    pub written: bool,
    pub proof: Proof,
    /// The installation after the callback, if there is one.
    pub installation: Option<Arc<Installation>>,
    /// Installations retired by this install (site import), possibly this one itself.
    pub superseded: Vec<ClientKey>,
}

/// Where a callback is applied.
pub struct Applier<'a> {
    pub policy: LifecycleContext<'a>,
    pub store: &'a dyn InstallationStore,
    pub tenants: &'a TenantCache,
}

impl Applier<'_> {
    /// Authenticates, decides and applies `callback`; a refusal stores nothing.
    pub async fn apply(&self, callback: &Callback<'_>) -> Result<Applied, LifecycleError> {
        let payload = callback.payload;
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let existing = self.store.load(&payload.client_key).await?;
            // Authenticated against exactly the record the write will compare against.
            let auth = authenticate(&self.policy, callback, existing.as_ref()).await?;
            let seen_body = match &auth.seen {
                Some(seen) => {
                    self.store
                        .seen_token(&payload.client_key, &seen.token_digest)
                        .await?
                }
                None => None,
            };
            let decision = decide(callback, &auth, existing, seen_body, jwt::now())?;
            let written = match &decision.write {
                Some(write) => {
                    let commit = Commit {
                        record: &write.record,
                        expected_version: write.expected_version,
                        token: write.token,
                    };
                    if self.store.commit(commit).await? == CommitOutcome::Conflict {
                        continue;
                    }
                    true
                }
                None => false,
            };
            let installation = decision.installation.map(Arc::new);
            let superseded = match (&installation, decision.site) {
                (Some(installed), SiteStep::Import) => {
                    self.supersede_previous_tenants(installed).await?
                }
                (Some(installed), SiteStep::Index) => {
                    self.store
                        .index_site(&installed.base_url, &installed.client_key)
                        .await?;
                    Vec::new()
                }
                _ => Vec::new(),
            };
            // A retry of a callback already applied writes nothing, yet it must not be
            // acknowledged before what the first attempt wrote is durable: that attempt may
            // have been refused for want of replicas (docs/PROTOCOL.md §10). Last, so that it
            // also covers the site step's writes.
            if let (Some(seen), Some(_), None) = (&auth.seen, seen_body, &decision.write) {
                self.store.reconfirm(&payload.client_key, seen).await?;
            }
            if written || !superseded.is_empty() {
                self.tenants.invalidate(&payload.client_key).await;
            }
            for old in &superseded {
                self.tenants.invalidate(old).await;
            }
            return Ok(Applied {
                written,
                proof: auth.proof,
                installation,
                superseded,
            });
        }
        Err(LifecycleError::Contention(payload.client_key.clone()))
    }

    /// Site import (docs/PROTOCOL.md §7): a new clientKey installed, with
    /// Atlassian's signature, on a site whose `baseUrl` belongs to other active installations.
    /// The most recent install on a site wins: installations are ranked by their latest
    /// lifecycle event (`iat`), then by the order in which the site index first saw them, which
    /// every instance reads alike. Those ranked below this install are marked superseded by it
    /// and linked from it; should another active one rank above it (two imports racing), this
    /// installation is the one superseded. So exactly one installation of a site stays active,
    /// whatever order the writes land in. Installations Atlassian never installed (legacy
    /// mode's unsigned installs) take no part: they neither outrank this install nor are
    /// retired or linked by it, so a squatter can neither knock the genuine site out nor be
    /// taken for its predecessor. Returns the clientKeys superseded (possibly this
    /// installation's own).
    async fn supersede_previous_tenants(
        &self,
        installed: &Installation,
    ) -> Result<Vec<ClientKey>, LifecycleError> {
        let store = self.store;
        store
            .index_site(&installed.base_url, &installed.client_key)
            .await?;
        let site_order = store.client_keys_for_site(&installed.base_url).await?;
        let position = |key: &ClientKey| site_order.iter().position(|k| k == key);
        let this = (installed.last_event_iat, position(&installed.client_key));
        let mut superseded = Vec::new();
        for other in &site_order {
            if *other == installed.client_key {
                continue;
            }
            let mut other_is_newer = false;
            let marked = update_with_retry(store, other, |old| {
                if !old.is_active() || old.base_url != installed.base_url || !old.ever_signed() {
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
}

/// Records on `successor` that it superseded `predecessor`.
async fn link(
    store: &dyn InstallationStore,
    successor: &ClientKey,
    predecessor: &ClientKey,
) -> Result<(), LifecycleError> {
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
) -> Result<bool, LifecycleError> {
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        let Some(mut record) = store.load(client_key).await? else {
            return Ok(false);
        };
        let expected_version = record.version;
        if change(&mut record).is_none() {
            return Ok(false);
        }
        record.updated_at = jwt::now();
        let commit = Commit {
            record: &record,
            expected_version,
            token: None,
        };
        if store.commit(commit).await? == CommitOutcome::Committed {
            return Ok(true);
        }
    }
    Err(LifecycleError::Contention(client_key.clone()))
}
