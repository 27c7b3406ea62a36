//! Prometheus metrics: every name and label is declared here and documented in README
//! ("Metrics"). Counting goes through the `metrics` facade; `metrics-exporter-prometheus`
//! renders `GET /metrics`.
//!
//! Labels are `&'static str` from fixed sets: an event name, an outcome ([`Refusal`], mapped
//! from errors in `error.rs` only), a store operation, a status class. Nothing a caller sent
//! (clientKey, URL, kid) is ever a label, so the series stay bounded whatever arrives.
//!
//! The facade has one global recorder per process; [`install`] puts ours there once, and every
//! later [`crate::startup::Application`] in the same process (tests, embedders) shares it.
//! Product requests and lifecycle callbacks count through handles registered once per label
//! set ([`Outcomes`]): on the request path a count is one atomic add.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use async_trait::async_trait;
use metrics::{counter, gauge, histogram, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Refusal;
use crate::startup::AppState;
use crate::store::{
    Commit, CommitOutcome, ForgeIdentity, Installation, InstallationPage, InstallationStore,
    ScanCursor, SeenToken, SharedStore, SiteCommitOutcome, SiteEntry, StoreError, Usability,
};
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::lifecycle::LifecycleEvent;

pub const LIFECYCLE_CALLBACKS: &str = "warden_lifecycle_callbacks_total";
pub const PRODUCT_REQUESTS: &str = "warden_product_requests_total";
pub const INSTALL_KEY_FETCHES: &str = "warden_install_key_fetches_total";
pub const TENANT_CACHE_LOOKUPS: &str = "warden_tenant_cache_lookups_total";
pub const STORE_OPERATION_SECONDS: &str = "warden_store_operation_seconds";
pub const STORE_ERRORS: &str = "warden_store_errors_total";
pub const INVALIDATIONS_RECEIVED: &str = "warden_invalidations_received_total";
pub const INVALIDATIONS_SENT: &str = "warden_invalidations_sent_total";
pub const INVALIDATION_RECONNECTS: &str = "warden_invalidation_reconnects_total";
pub const INVALIDATION_SUBSCRIBED: &str = "warden_invalidation_subscribed";
pub const HOST_CALLS: &str = "warden_host_calls_total";
pub const INSTALLATIONS: &str = "warden_installations";

/// Every metric name, for checks that a dashboard names only what exists.
pub const ALL_NAMES: [&str; 12] = [
    LIFECYCLE_CALLBACKS,
    PRODUCT_REQUESTS,
    INSTALL_KEY_FETCHES,
    TENANT_CACHE_LOOKUPS,
    STORE_OPERATION_SECONDS,
    STORE_ERRORS,
    INVALIDATIONS_RECEIVED,
    INVALIDATIONS_SENT,
    INVALIDATION_RECONNECTS,
    INVALIDATION_SUBSCRIBED,
    HOST_CALLS,
    INSTALLATIONS,
];

/// The outcome label of an accepted request.
pub const ACCEPTED: &str = "accepted";

/// Store round trips: from an embedded read (well under a millisecond) to a Redis write that
/// waits for replicas (up to 1.5 s).
const STORE_BUCKETS: [f64; 12] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.5,
];

/// How often pending histogram samples are folded in when nobody scrapes (bounds memory).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// How long an installation census is reused by later scrapes: a census reads every record
/// (seconds on 100 000 installations, docs/PERFORMANCE.md), and every instance makes its own.
pub const CENSUS_EVERY: Duration = Duration::from_secs(300);

/// Installs the Prometheus recorder as the process's global recorder, once; later calls return
/// the same handle. `None` when another recorder was installed first (an embedder's): metrics
/// then go there, and warden serves no `/metrics`.
pub fn install() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&STORE_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "another metrics recorder is installed: warden's metrics go to it and GET /metrics is not served");
                return None;
            }
            describe();
            // Shown at 0 from the start, so that a dashboard tells "none" from "not exported".
            counter!(INVALIDATIONS_RECEIVED).absolute(0);
            counter!(INVALIDATIONS_SENT).absolute(0);
            counter!(INVALIDATION_RECONNECTS).absolute(0);
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded in at each scrape only");
            }
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        LIFECYCLE_CALLBACKS,
        "Lifecycle callbacks by event and outcome (accepted, or why refused)"
    );
    describe_counter!(
        PRODUCT_REQUESTS,
        "Requests from host sites through the product-request guard, by outcome"
    );
    describe_counter!(
        INSTALL_KEY_FETCHES,
        "Install-key cache misses by result (a request to the key server unless over_budget)"
    );
    describe_counter!(
        TENANT_CACHE_LOOKUPS,
        "Tenant cache lookups by kind (get, reload) and result (hit, miss)"
    );
    describe_histogram!(
        STORE_OPERATION_SECONDS,
        Unit::Seconds,
        "Latency of installation-store operations, by operation"
    );
    describe_counter!(
        STORE_ERRORS,
        "Failed installation-store operations, by operation and kind"
    );
    describe_counter!(
        INVALIDATIONS_RECEIVED,
        "Invalidation messages received from Redis"
    );
    describe_counter!(
        INVALIDATIONS_SENT,
        "Invalidation messages published by this instance's commits"
    );
    describe_counter!(
        INVALIDATION_RECONNECTS,
        "Subscriptions to the invalidation channel made again after a loss"
    );
    describe_gauge!(
        INVALIDATION_SUBSCRIBED,
        "1 while the invalidation listener is subscribed, 0 while reconnecting"
    );
    describe_counter!(
        HOST_CALLS,
        "Calls from the app to host sites and the OAuth token endpoint, by call and status class"
    );
    describe_gauge!(
        INSTALLATIONS,
        "Installations in the store by state, counted at most every 30 s on scrape"
    );
}

/// One counter per outcome of one metric (and event), registered at first use.
struct Outcomes {
    slots: [OnceLock<Counter>; Refusal::ALL.len() + 1],
}

impl Outcomes {
    const fn new() -> Self {
        Self {
            slots: [const { OnceLock::new() }; Refusal::ALL.len() + 1],
        }
    }

    fn count(&self, outcome: Result<(), Refusal>, register: impl FnOnce(&'static str) -> Counter) {
        let (slot, label) = match outcome {
            Ok(()) => (0, ACCEPTED),
            Err(refusal) => (refusal.index() + 1, refusal.label()),
        };
        self.slots[slot]
            .get_or_init(|| register(label))
            .increment(1);
    }
}

/// Counts one lifecycle callback.
pub fn lifecycle_callback(event: LifecycleEvent, outcome: Result<(), Refusal>) {
    static BY_EVENT: [Outcomes; 4] = [const { Outcomes::new() }; 4];
    let index = match event {
        LifecycleEvent::Installed => 0,
        LifecycleEvent::Uninstalled => 1,
        LifecycleEvent::Enabled => 2,
        LifecycleEvent::Disabled => 3,
    };
    BY_EVENT[index].count(
        outcome,
        |label| counter!(LIFECYCLE_CALLBACKS, "event" => event.name(), "outcome" => label),
    );
}

/// Counts one request through the product-request guard.
pub fn product_request(outcome: Result<(), Refusal>) {
    static OUTCOMES: Outcomes = Outcomes::new();
    OUTCOMES.count(
        outcome,
        |label| counter!(PRODUCT_REQUESTS, "outcome" => label),
    );
}

/// Counts one install-key cache miss: a fetch, or one refused by a fetch budget.
pub fn install_key_fetch(outcome: Result<(), Refusal>) {
    let result = match outcome {
        Ok(()) => "ok",
        Err(Refusal::InstallKeyNotFound) => "not_found",
        Err(Refusal::InstallKeyInvalid) => "invalid_key",
        Err(Refusal::InstallKeyOverBudget) => "over_budget",
        Err(_) => "unavailable",
    };
    counter!(INSTALL_KEY_FETCHES, "result" => result).increment(1);
}

/// Which tenant-cache lookup: a request's first, or the re-read after a failed signature.
#[derive(Debug, Clone, Copy)]
pub enum Lookup {
    Get,
    Reload,
}

/// Counts one tenant-cache lookup (an "unknown clientKey" remembered counts as a hit).
pub fn tenant_cache(lookup: Lookup, hit: bool) {
    // On every product request: handles registered once, like [`Outcomes`].
    static HANDLES: [OnceLock<Counter>; 4] = [const { OnceLock::new() }; 4];
    let (slot, lookup, result) = match (lookup, hit) {
        (Lookup::Get, true) => (0, "get", "hit"),
        (Lookup::Get, false) => (1, "get", "miss"),
        (Lookup::Reload, true) => (2, "reload", "hit"),
        (Lookup::Reload, false) => (3, "reload", "miss"),
    };
    HANDLES[slot]
        .get_or_init(|| counter!(TENANT_CACHE_LOOKUPS, "lookup" => lookup, "result" => result))
        .increment(1);
}

pub fn invalidation_received() {
    counter!(INVALIDATIONS_RECEIVED).increment(1);
}

pub fn invalidation_sent() {
    counter!(INVALIDATIONS_SENT).increment(1);
}

/// The listener subscribed (`again`: after a loss) or lost its subscription.
pub fn invalidation_subscription(subscribed: bool, again: bool) {
    gauge!(INVALIDATION_SUBSCRIBED).set(if subscribed { 1.0 } else { 0.0 });
    if subscribed && again {
        counter!(INVALIDATION_RECONNECTS).increment(1);
    }
}

/// Which call to a host: a request to the site, or a token from the authorization server.
#[derive(Debug, Clone, Copy)]
pub enum HostCall {
    Request,
    Token,
}

/// Counts one call from the app to a host: its status, or `None` when no answer came.
pub fn host_call(call: HostCall, status: Option<reqwest::StatusCode>) {
    let call = match call {
        HostCall::Request => "request",
        HostCall::Token => "token",
    };
    let class = match status.map(|s| s.as_u16() / 100) {
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        Some(_) => "other",
        None => "error",
    };
    counter!(HOST_CALLS, "call" => call, "status" => class).increment(1);
}

/// The store, timing every operation and counting its failures.
pub struct InstrumentedStore {
    inner: SharedStore,
}

impl InstrumentedStore {
    pub fn wrap(inner: SharedStore) -> SharedStore {
        std::sync::Arc::new(Self { inner })
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = call.await;
    histogram!(STORE_OPERATION_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    if let Err(error) = &result {
        counter!(STORE_ERRORS, "op" => op, "kind" => Refusal::of_store(error).label()).increment(1);
    }
    result
}

#[async_trait]
impl InstallationStore for InstrumentedStore {
    async fn load(&self, client_key: &ClientKey) -> Result<Option<Installation>, StoreError> {
        timed("load", self.inner.load(client_key)).await
    }
    async fn seen_token(
        &self,
        client_key: &ClientKey,
        token_digest: &[u8; 32],
    ) -> Result<Option<[u8; 32]>, StoreError> {
        timed(
            "seen_token",
            self.inner.seen_token(client_key, token_digest),
        )
        .await
    }
    async fn commit(&self, commit: Commit<'_>) -> Result<CommitOutcome, StoreError> {
        timed("commit", self.inner.commit(commit)).await
    }
    async fn reconfirm(&self, client_key: &ClientKey, token: &SeenToken) -> Result<(), StoreError> {
        timed("reconfirm", self.inner.reconfirm(client_key, token)).await
    }
    async fn index_site(
        &self,
        base_url: &BaseUrl,
        client_key: &ClientKey,
    ) -> Result<(), StoreError> {
        timed("index_site", self.inner.index_site(base_url, client_key)).await
    }
    async fn client_keys_for_site(&self, base_url: &BaseUrl) -> Result<Vec<ClientKey>, StoreError> {
        timed(
            "client_keys_for_site",
            self.inner.client_keys_for_site(base_url),
        )
        .await
    }
    // Every method is forwarded, defaults included: a default here would run the store's
    // fallback (several round trips) instead of its own one-round-trip implementation.
    async fn load_with_token(
        &self,
        client_key: &ClientKey,
        token_digest: Option<&[u8; 32]>,
    ) -> Result<(Option<Installation>, Option<[u8; 32]>), StoreError> {
        timed(
            "load_with_token",
            self.inner.load_with_token(client_key, token_digest),
        )
        .await
    }

    async fn commit_on_site(
        &self,
        commit: Commit<'_>,
        site: SiteEntry<'_>,
    ) -> Result<SiteCommitOutcome, StoreError> {
        timed("commit_on_site", self.inner.commit_on_site(commit, site)).await
    }

    async fn client_keys_for_forge(
        &self,
        identity: &ForgeIdentity,
    ) -> Result<Vec<ClientKey>, StoreError> {
        timed(
            "client_keys_for_forge",
            self.inner.client_keys_for_forge(identity),
        )
        .await
    }

    async fn index_forge(&self, record: &Installation) -> Result<(), StoreError> {
        timed("index_forge", self.inner.index_forge(record)).await
    }

    async fn scan_installations(&self, cursor: ScanCursor) -> Result<InstallationPage, StoreError> {
        timed("scan_installations", self.inner.scan_installations(cursor)).await
    }

    async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
        timed("list_client_keys", self.inner.list_client_keys()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed("ping", self.inner.ping()).await
    }
    async fn remember_install_key(&self, url: &str, entry: &str) -> Result<(), StoreError> {
        timed(
            "remember_install_key",
            self.inner.remember_install_key(url, entry),
        )
        .await
    }
    async fn forget_install_key(&self, url: &str) -> Result<(), StoreError> {
        timed("forget_install_key", self.inner.forget_install_key(url)).await
    }
    async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        timed("install_keys", self.inner.install_keys()).await
    }
    async fn keep_forge_token(
        &self,
        installation: &connect_protocol::forge::InstallationId,
        token: &crate::store::forge_token::ForgeAppToken,
    ) -> Result<bool, StoreError> {
        timed(
            "keep_forge_token",
            self.inner.keep_forge_token(installation, token),
        )
        .await
    }
    async fn forge_token(
        &self,
        installation: &connect_protocol::forge::InstallationId,
    ) -> Result<Option<crate::store::forge_token::ForgeAppToken>, StoreError> {
        timed("forge_token", self.inner.forge_token(installation)).await
    }
}

/// The installations gauge, counted from the store on scrape and reused for [`CENSUS_EVERY`]:
/// the store is the only view every instance shares (another instance's installs are not
/// seen here otherwise), and it works alike on Redis, a Cluster and the embedded store. One
/// census runs at a time; concurrent scrapes wait for it.
#[derive(Debug, Default)]
pub struct Census {
    counted_at: tokio::sync::Mutex<Option<Instant>>,
    /// A census runs in the background for a scrape that found the last one old.
    refreshing: std::sync::atomic::AtomicBool,
}

/// Installations by state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    active: u64,
    disabled: u64,
    uninstalled: u64,
    superseded: u64,
    /// Records that could not be read (corrupt, or sealed under a key not configured).
    unreadable: u64,
}

impl Census {
    /// What a scrape does: the first census is made before answering; a later one, once the
    /// last is older than [`CENSUS_EVERY`], in the background, so that no scrape waits for a
    /// listing of every installation (it shows the previous count meanwhile).
    pub async fn on_scrape(state: &web::Data<AppState>) {
        use std::sync::atomic::Ordering;
        let census = &state.census;
        if census.counted_at.lock().await.is_none() {
            census.refresh(state.store.as_ref()).await;
            return;
        }
        if census.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = state.clone();
        tokio::spawn(async move {
            state.census.refresh(state.store.as_ref()).await;
            state.census.refreshing.store(false, Ordering::Release);
        });
    }

    /// Counts again unless the last count is recent; a store that cannot list keeps the last
    /// values.
    pub async fn refresh(&self, store: &dyn InstallationStore) {
        let mut counted_at = self.counted_at.lock().await;
        if counted_at.is_some_and(|at| at.elapsed() < CENSUS_EVERY) {
            return;
        }
        match count(store).await {
            Ok(counts) => {
                gauge!(INSTALLATIONS, "state" => "active").set(counts.active as f64);
                gauge!(INSTALLATIONS, "state" => "disabled").set(counts.disabled as f64);
                gauge!(INSTALLATIONS, "state" => "uninstalled").set(counts.uninstalled as f64);
                gauge!(INSTALLATIONS, "state" => "superseded").set(counts.superseded as f64);
                gauge!(INSTALLATIONS, "state" => "unreadable").set(counts.unreadable as f64);
                *counted_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&error), "cannot count installations for /metrics; the last count stays");
            }
        }
    }
}

/// One pass over the store's paged listing (pipelined reads, bounded memory). On Redis a record
/// `SCAN` returns twice is counted twice: a gauge, not an inventory (`warden tenants stats`).
async fn count(store: &dyn InstallationStore) -> Result<Counts, StoreError> {
    let mut counts = Counts::default();
    let mut cursor = ScanCursor::default();
    loop {
        let page = store.scan_installations(cursor).await?;
        for listed in page.installations {
            match listed.record {
                Ok(installation) => match installation.usability() {
                    Usability::Active => counts.active += 1,
                    Usability::Disabled => counts.disabled += 1,
                    Usability::Uninstalled => counts.uninstalled += 1,
                    Usability::Superseded { .. } => counts.superseded += 1,
                },
                Err(StoreError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                Err(_) => counts.unreadable += 1,
            }
        }
        match page.next {
            Some(next) => cursor = next,
            None => return Ok(counts),
        }
    }
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let Some(handle) = install() else {
        return HttpResponse::NotFound().json(serde_json::json!({ "error": "no such route" }));
    };
    Census::on_scrape(&state).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_listed_in_index_order_with_distinct_labels() {
        let mut labels = std::collections::HashSet::new();
        for (i, refusal) in Refusal::ALL.iter().enumerate() {
            assert_eq!(refusal.index(), i, "{refusal:?}");
            assert!(labels.insert(refusal.label()), "{refusal:?}");
            assert_ne!(refusal.label(), ACCEPTED);
        }
    }
}
