//! The one place where a lifecycle callback touches the store: load the record, let the policy
//! authenticate and decide against exactly that record, write with compare-and-set (deciding
//! again after a lost race), run the site step, then drop every installation it changed from
//! the tenant cache (which announces it to the host client and, through the store's publish,
//! to other instances).

use std::sync::Arc;

use connect_protocol::authorization::token_from_header;
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::jwt;

use super::{
    authenticate, decide, plan_site, Callback, LifecycleContext, LifecycleError, Proof, SitePlan,
    SiteStep,
};
use crate::configuration::SiteProofSettings;
use crate::host_client::HostClient;
use crate::store::{
    Commit, CommitOutcome, Installation, InstallationStore, SiteCommitOutcome, SiteEntry, SiteProof,
};
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
    /// Whether the site must now confirm the install ([`Applier::prove_site`], run in the
    /// background once the callback is answered).
    pub prove_site: bool,
}

/// Where a callback is applied.
pub struct Applier<'a> {
    pub policy: LifecycleContext<'a>,
    pub store: &'a dyn InstallationStore,
    pub tenants: &'a TenantCache,
}

impl Applier<'_> {
    /// Authenticates, decides and applies `callback`; a refusal stores nothing.
    ///
    /// Redis round trips of an `installed` in the common case (a new site's first install, a
    /// reinstall): one read of the record with the token's replay memory, one write that also
    /// indexes the site. The write assumes the site holds no other installation; if it does,
    /// the store indexes but writes nothing, and the site step is planned again and written
    /// (one more round trip, only on a site shared with other installations).
    pub async fn apply(&self, callback: &Callback<'_>) -> Result<Applied, LifecycleError> {
        let payload = callback.payload;
        // The replay memory is read with the record, before the token is checked; it is used
        // only once the token passed, and only for the token it was read for.
        let token_digest = callback
            .authorization
            .and_then(|header| token_from_header(header).ok())
            .map(jwt::token_digest);
        let proofs = self.policy.settings.site_proof.enabled;
        let mut assumed_others = false;
        'attempts: for _ in 0..MAX_COMMIT_ATTEMPTS {
            let (existing, seen_with_record) = self
                .store
                .load_with_token(&payload.client_key, token_digest.as_ref())
                .await?;
            // Authenticated against exactly the record the write will compare against.
            let auth = authenticate(&self.policy, callback, existing.as_ref()).await?;
            let seen_body = match &auth.seen {
                Some(seen) if Some(seen.token_digest) == token_digest => seen_with_record,
                Some(seen) => {
                    self.store
                        .seen_token(&payload.client_key, &seen.token_digest)
                        .await?
                }
                None => None,
            };
            let mut decision = decide(callback, &auth, existing, seen_body, jwt::now())?;
            let mut others_on_site = match decision.site {
                // A retry writes nothing: indexed on its own, before the site step.
                SiteStep::Import | SiteStep::Observe if decision.write.is_none() => {
                    self.index_and_look_for_others(&payload.base_url, &payload.client_key)
                        .await?
                }
                // Indexed by the write itself, which checks the assumption.
                SiteStep::Import | SiteStep::Observe => assumed_others,
                _ => false,
            };
            // At most twice: the site's clientKeys only grow, so a corrected assumption holds.
            let (plan, written) = 'plan: {
                for _ in 0..2 {
                    let plan = plan_site(&mut decision, proofs, others_on_site);
                    let Some(write) = &decision.write else {
                        break 'plan (plan, false);
                    };
                    let commit = Commit {
                        record: &write.record,
                        expected_version: write.expected_version,
                        token: write.token,
                    };
                    if decision.site == SiteStep::None {
                        if self.store.commit(commit).await? == CommitOutcome::Conflict {
                            continue 'attempts;
                        }
                        break 'plan (plan, true);
                    }
                    // Only a proof planned on a write depends on the other installations.
                    let depends_on_site =
                        proofs && matches!(decision.site, SiteStep::Import | SiteStep::Observe);
                    let site = SiteEntry {
                        base_url: &payload.base_url,
                        assumed_others: depends_on_site.then_some(others_on_site),
                    };
                    match self.store.commit_on_site(commit, site).await? {
                        SiteCommitOutcome::Committed => break 'plan (plan, true),
                        SiteCommitOutcome::Conflict => continue 'attempts,
                        SiteCommitOutcome::SiteDiffers { others } => {
                            others_on_site = others;
                            assumed_others = others;
                        }
                    }
                }
                continue 'attempts;
            };
            let installation = decision.installation.map(Arc::new);
            let superseded = match (&installation, plan, decision.site) {
                (Some(installed), SitePlan::Supersede, _) => {
                    self.supersede_previous_tenants(installed).await?
                }
                // A write indexed the site itself.
                (Some(installed), _, SiteStep::Index) if !written => {
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
                prove_site: plan == SitePlan::Prove,
            });
        }
        Err(LifecycleError::Contention(payload.client_key.clone()))
    }

    /// Indexes `client_key` on its site; whether other clientKeys are indexed there.
    async fn index_and_look_for_others(
        &self,
        base_url: &BaseUrl,
        client_key: &ClientKey,
    ) -> Result<bool, LifecycleError> {
        self.store.index_site(base_url, client_key).await?;
        let site = self.store.client_keys_for_site(base_url).await?;
        Ok(site.iter().any(|k| k != client_key))
    }

    /// The site proof (docs/PROTOCOL.md §7) of `client_key`, whose record says `pending`: a
    /// `GET <baseUrl>/rest/atlassian-connect/1/addons/<appKey>` signed as the app with the
    /// installation's current secret, tried `settings.attempts` times with a doubling backoff.
    /// 2xx is `proven`; 401, 403 or 404 `refused`; anything else, every time, `unreachable`.
    /// The outcome is recorded only for the secret it proved (a reinstall in between starts
    /// over) and only while the record is still pending. Once proven, a signed import runs the
    /// site's ranking here, the one place that retires installations. Returns the outcome
    /// recorded, `None` when nothing was pending.
    pub async fn prove_site(
        &self,
        host: &HostClient,
        client_key: &ClientKey,
        settings: SiteProofSettings,
    ) -> Result<Option<SiteProof>, LifecycleError> {
        let path = format!("/rest/atlassian-connect/1/addons/{}", host.app_key());
        loop {
            let Some(record) = self.store.load(client_key).await? else {
                return Ok(None);
            };
            if record.site_proof != Some(SiteProof::Pending) {
                return Ok(None);
            }
            let outcome = ask_site(host, &record, &path, settings).await;
            let proven_secret = record.current_secret().secret.clone();
            let still_pending = |now: &Installation| {
                now.site_proof == Some(SiteProof::Pending)
                    && now.current_secret().secret.same_as(&proven_secret)
            };
            // The ranking runs before `proven` is recorded: a process stopped in between
            // leaves the proof pending, and running it again retires nobody twice.
            let mut superseded = Vec::new();
            if outcome == SiteProof::Proven {
                match self.store.load(client_key).await? {
                    Some(now) if !still_pending(&now) => continue,
                    Some(now) if now.is_active() && now.ever_signed() => {
                        superseded = self.supersede_previous_tenants(&now).await?;
                    }
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            let mut rolled = false;
            let recorded = update_with_retry(self.store, client_key, |now| {
                if !still_pending(now) {
                    rolled = now.site_proof == Some(SiteProof::Pending);
                    return None;
                }
                now.site_proof = Some(outcome);
                Some(())
            })
            .await?;
            for old in &superseded {
                self.tenants.invalidate(old).await;
            }
            if rolled {
                continue;
            }
            if !recorded {
                return Ok(None);
            }
            self.tenants.invalidate(client_key).await;
            if outcome == SiteProof::Proven {
                // Two imports proven at the same moment each ranked while the other was still
                // pending, so neither saw the other: ranking again once this proof is recorded
                // makes the later of the two see both (ranking twice retires nobody twice).
                if let Some(now) = self.store.load(client_key).await? {
                    if now.is_active() && now.ever_signed() {
                        let again = self.supersede_previous_tenants(&now).await?;
                        for old in &again {
                            self.tenants.invalidate(old).await;
                        }
                        superseded.extend(again);
                    }
                }
                tracing::info!(client_key = %client_key, base_url = %record.base_url, superseded = ?superseded, "site proof: the site confirmed the install");
            } else {
                tracing::warn!(client_key = %client_key, base_url = %record.base_url, site_proof = outcome.as_str(),
                    "site proof: the site did not confirm the install; it retires nobody");
            }
            return Ok(Some(outcome));
        }
    }

    /// Site import (docs/PROTOCOL.md §7): a new clientKey installed, with
    /// Atlassian's signature, on a site whose `baseUrl` belongs to other active installations,
    /// and (with site proofs on) confirmed by that site.
    /// The most recent install on a site wins: installations are ranked by their latest
    /// lifecycle event (`iat`), then by the order in which the site index first saw them, which
    /// every instance reads alike. Those ranked below this install are marked superseded by it
    /// and linked from it; should another active one rank above it (two imports racing), this
    /// installation is the one superseded. So exactly one installation of a site stays active,
    /// whatever order the writes land in. Installations Atlassian never installed (legacy
    /// mode's unsigned installs) and imports their site never confirmed take no part: they
    /// neither outrank this install nor are retired or linked by it, so a squatter can neither
    /// knock the genuine site out nor be taken for its predecessor. One write per installation
    /// retired and one for all the links: O(N) writes for N installations on the site.
    /// Returns the clientKeys superseded (possibly this installation's own).
    async fn supersede_previous_tenants(
        &self,
        installed: &Installation,
    ) -> Result<Vec<ClientKey>, LifecycleError> {
        let store = self.store;
        store
            .index_site(&installed.base_url, &installed.client_key)
            .await?;
        let site_order = store.client_keys_for_site(&installed.base_url).await?;
        let this = (
            installed.last_event_iat,
            site_order.iter().position(|k| *k == installed.client_key),
        );
        let mut retired = Vec::new();
        for (position, other) in site_order.iter().enumerate() {
            if *other == installed.client_key {
                continue;
            }
            let mut other_is_newer = false;
            let marked = update_with_retry(store, other, |old| {
                if !ranks_on_site(old, &installed.base_url) {
                    return None;
                }
                if (old.last_event_iat, Some(position)) > this {
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
                retired.push(other.clone());
            } else if other_is_newer {
                let own = update_with_retry(store, &installed.client_key, |own| {
                    own.is_active()
                        .then(|| own.superseded_by = Some(other.clone()))
                })
                .await?;
                if own {
                    tracing::warn!(old_client_key = %installed.client_key, new_client_key = %other, base_url = %installed.base_url,
                        "site import: a newer installation on the same site supersedes this one");
                    link(store, other, std::slice::from_ref(&installed.client_key)).await?;
                    link(store, &installed.client_key, &retired).await?;
                    retired.push(installed.client_key.clone());
                    return Ok(retired);
                }
            }
        }
        link(store, &installed.client_key, &retired).await?;
        Ok(retired)
    }
}

/// Calls the site until it answers 2xx (`proven`) or 401/403/404 (`refused`); `unreachable`
/// when every attempt failed otherwise.
async fn ask_site(
    host: &HostClient,
    record: &Installation,
    path: &str,
    settings: SiteProofSettings,
) -> SiteProof {
    let mut wait = settings.backoff;
    for attempt in 1..=settings.attempts {
        match host.as_app(record).get(path).send().await {
            Ok(response) if response.status().is_success() => return SiteProof::Proven,
            Ok(response) if matches!(response.status().as_u16(), 401 | 403 | 404) => {
                return SiteProof::Refused
            }
            Ok(response) => {
                tracing::info!(client_key = %record.client_key, attempt, status = response.status().as_u16(), "site proof: the site answered without confirming; retrying")
            }
            Err(error) => {
                tracing::info!(client_key = %record.client_key, attempt, error = %crate::error::error_chain(&error), "site proof: the site did not answer; retrying")
            }
        }
        if attempt < settings.attempts {
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
    }
    SiteProof::Unreachable
}

/// Whether `other` takes part in ranking the site at `base_url`: active there, installed by
/// Atlassian at least once, and not an import its site never confirmed.
fn ranks_on_site(other: &Installation, base_url: &BaseUrl) -> bool {
    other.is_active()
        && other.base_url == *base_url
        && other.ever_signed()
        && !other.site_proof.is_some_and(SiteProof::is_unproven)
}

/// Records on `successor` that it superseded `predecessors`: one write for all of them.
async fn link(
    store: &dyn InstallationStore,
    successor: &ClientKey,
    predecessors: &[ClientKey],
) -> Result<(), LifecycleError> {
    if predecessors.is_empty() {
        return Ok(());
    }
    update_with_retry(store, successor, |record| {
        let before = record.supersedes.len();
        for predecessor in predecessors {
            if !record.supersedes.contains(predecessor) {
                record.supersedes.push(predecessor.clone());
            }
        }
        (record.supersedes.len() > before).then_some(())
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};

    use super::*;
    use crate::configuration::Settings;
    use crate::install_keys::InstallKeys;
    use crate::lifecycle::LifecycleContext;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::testing::LoadSpy;
    use crate::store::SharedStore;

    /// A signed installation on `base_url` whose newest signed event is `iat`, stored and
    /// indexed.
    async fn installed(store: &LoadSpy, key: &str, base_url: &BaseUrl, iat: i64) -> Installation {
        let mut record = Installation::new(
            ClientKey::parse(key).unwrap(),
            base_url.clone(),
            "jira",
            SharedSecret::parse(&format!("secret-{key}")).unwrap(),
            true,
            iat,
        );
        record.last_event_iat = iat;
        record.version = 1;
        let commit = Commit {
            record: &record,
            expected_version: 0,
            token: None,
        };
        assert_eq!(
            store.commit(commit).await.unwrap(),
            CommitOutcome::Committed
        );
        store
            .index_site(base_url, &record.client_key)
            .await
            .unwrap();
        record
    }

    /// An import retiring N installations writes each of them once and itself once (all its
    /// links together), never once per pair.
    #[tokio::test]
    async fn an_import_costs_one_write_per_retired_installation_plus_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoadSpy::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        let settings = Settings::from_sources(None, Vec::new()).unwrap();
        let keys = InstallKeys::new(vec![], std::time::Duration::from_secs(1));
        let tenants = TenantCache::new(
            store.clone() as SharedStore,
            std::time::Duration::from_secs(30),
        );
        let applier = Applier {
            policy: LifecycleContext {
                settings: &settings,
                keys: &keys,
            },
            store: store.as_ref(),
            tenants: &tenants,
        };
        let site = BaseUrl::parse("https://acme.atlassian.net").unwrap();
        const N: u64 = 12;
        for n in 0..N {
            installed(&store, &format!("ck-old-{n}"), &site, 1_000 + n as i64).await;
        }
        let new = installed(&store, "ck-new", &site, 2_000).await;

        let before = store.commits();
        let superseded = applier.supersede_previous_tenants(&new).await.unwrap();
        assert_eq!(superseded.len() as u64, N);
        assert_eq!(store.commits() - before, N + 1);
        let stored = store.load(&new.client_key).await.unwrap().unwrap();
        assert_eq!(stored.supersedes.len() as u64, N);
    }
}
