//! Installations as the request guard sees them: read through a moka cache in front of the
//! store, so a verified product request costs no store round trip. Entries are dropped when
//! this instance writes a lifecycle event, when another instance announces one (Redis
//! pub/sub, see [`crate::invalidation`]), and in any case after a bounded time.
//!
//! Every drop is also announced on [`Invalidations`], so that other caches keyed by tenant
//! (the host client's impersonation tokens) follow the same rhythm.
//!
//! A read that races with an invalidation must not put back what it read: a `reload` that
//! read the store before a write, but inserts after the write's invalidation arrived, would
//! otherwise serve the old record until the TTL. Each invalidation therefore bumps an epoch
//! (one per stripe of clientKeys, plus one for "everything"), and a reload inserts only if no
//! epoch of its key moved while it read.
//!
//! Unauthenticated requests must not buy store round trips:
//!
//! - Reads of one clientKey are single-flight: whoever needs the store while a read of that key
//!   is under way waits for it, unless an invalidation of the key happened since that read
//!   began (then it starts a new one, so a write is always seen by the next read).
//! - A [`reload`](TenantCache::reload) is answered from the cache when the cached entry was
//!   read from the store less than [`FRESH_FOR`] ago: an entry survives only if no invalidation
//!   came after its read, so it is as new as a read would be, but for writes whose
//!   invalidation is still on its way.
//! - A clientKey the store does not know is remembered as unknown for [`UNKNOWN_FOR`], under
//!   the same invalidations and the same epoch rule: an install, here or on another instance,
//!   invalidates its clientKey and is found by the next request.
//!
//! Cached entries are only as good as the invalidations heard. While other instances' writes
//! may go unheard (on Redis: until the [`Listener`](crate::invalidation::Listener) has
//! subscribed, and from a lost subscription until it is back), the cache is
//! [`Subscription::NotSubscribed`]: [`get`](TenantCache::get) reads the store every time (still
//! single-flight) and no "unknown" is answered from memory, so a roll made anywhere is honoured
//! here at once, whatever the outage before it (docs/PROTOCOL.md §10). What is read is still
//! kept, so a [`reload`](TenantCache::reload) right after a read (a failed signature) reuses it
//! under the [`FRESH_FOR`] rule. Subscribed again, the cache drops everything, then serves.
//! The embedded store has no other writer: its cache is always subscribed.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use moka::future::Cache;

use crate::invalidation::{Invalidation, Invalidations};
use crate::monitoring::{self, Lookup};
use crate::store::{Installation, SharedStore, StoreError};
use connect_protocol::domain::ClientKey;

/// Upper bound of cached installations; one entry is a few hundred bytes.
const MAX_CACHED_TENANTS: u64 = 200_000;

/// Upper bound of clientKeys remembered as unknown, in a cache of their own so that a flood of
/// made-up clientKeys cannot evict real tenants.
const MAX_UNKNOWN_TENANTS: u64 = 100_000;

/// Number of invalidation epochs. Two clientKeys sharing a stripe only cost each other a
/// skipped cache insert, never a stale one.
const EPOCH_STRIPES: usize = 1024;

/// A [`TenantCache::reload`] does not read the store again when the cached entry was read less
/// than this ago (and no invalidation of its key came since).
pub const FRESH_FOR: Duration = Duration::from_millis(100);

/// How long a clientKey the store does not hold is answered as unknown without reading the
/// store (unless an invalidation of the key comes first).
pub const UNKNOWN_FOR: Duration = Duration::from_secs(1);

/// Whether this instance hears every write made elsewhere, i.e. whether its cached entries may
/// be served (docs/PROTOCOL.md §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// Every write made elsewhere reaches the cache as an invalidation (or there is no
    /// elsewhere: the embedded store). Cached entries are served.
    Subscribed,
    /// Writes made elsewhere may go unheard: lookups read the store.
    NotSubscribed,
}

#[derive(Clone)]
pub struct TenantCache {
    store: SharedStore,
    cache: Cache<ClientKey, Cached>,
    unknown: Cache<ClientKey, ()>,
    epochs: Arc<Epochs>,
    flights: Arc<Flights>,
    fresh_for: Duration,
    invalidations: Invalidations,
    /// [`Subscription::Subscribed`] as `true`; shared by every clone, set by the listener.
    subscribed: Arc<AtomicBool>,
}

/// A cached installation and when the read that found it began.
#[derive(Clone)]
struct Cached {
    installation: Arc<Installation>,
    read_at: Instant,
}

/// What a store read hands to everyone waiting for it.
type Read = Result<Option<Arc<Installation>>, Arc<StoreError>>;

/// Store reads under way, at most one per clientKey that its readers may join.
#[derive(Default)]
struct Flights {
    next_id: AtomicU64,
    by_key: Mutex<HashMap<ClientKey, Flight>>,
}

struct Flight {
    id: u64,
    /// The epochs of the key when the read began: only a reader seeing the same epochs may
    /// join, since a read that began before an invalidation may miss the write behind it.
    epoch: EpochSnapshot,
    read: Shared<BoxFuture<'static, Read>>,
}

/// Removes a flight from [`Flights`] when its read ends, however it ends (also on panic or
/// cancellation), unless a newer flight of the key replaced it.
struct Landing {
    flights: Arc<Flights>,
    client_key: ClientKey,
    id: u64,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut by_key = self
            .flights
            .by_key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if by_key
            .get(&self.client_key)
            .is_some_and(|f| f.id == self.id)
        {
            by_key.remove(&self.client_key);
        }
    }
}

/// Invalidation counters: `all` moves on [`TenantCache::invalidate_all`], `stripes[h(key)]` on
/// [`TenantCache::invalidate`].
struct Epochs {
    all: AtomicU64,
    stripes: Box<[AtomicU64]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EpochSnapshot {
    all: u64,
    stripe: u64,
}

impl Epochs {
    fn new() -> Self {
        Self {
            all: AtomicU64::new(0),
            stripes: (0..EPOCH_STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn stripe(&self, client_key: &ClientKey) -> &AtomicU64 {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(client_key.as_str());
        &self.stripes[(hash as usize) % self.stripes.len()]
    }

    fn snapshot(&self, client_key: &ClientKey) -> EpochSnapshot {
        EpochSnapshot {
            all: self.all.load(Ordering::SeqCst),
            stripe: self.stripe(client_key).load(Ordering::SeqCst),
        }
    }

    fn bump(&self, client_key: &ClientKey) {
        self.stripe(client_key).fetch_add(1, Ordering::SeqCst);
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

/// A store error shared by the readers of one flight: each gets a [`StoreError`] of the same
/// kind (what decides the HTTP status), with the original as its cause.
#[derive(Debug)]
struct SharedStoreError(Arc<StoreError>);

impl std::fmt::Display for SharedStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::error::Error::source(&*self.0) {
            Some(cause) => write!(f, "{cause}"),
            None => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for SharedStoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0).and_then(|cause| cause.source())
    }
}

fn unshare(error: Arc<StoreError>) -> StoreError {
    match &*error {
        StoreError::Unavailable(_) | StoreError::NotReplicated { .. } => {
            StoreError::unavailable(SharedStoreError(error))
        }
        StoreError::Corrupt(what) => StoreError::Corrupt(what.clone()),
        StoreError::Unsealable(what) => StoreError::Unsealable(what.clone()),
    }
}

impl TenantCache {
    pub fn new(store: SharedStore, ttl: Duration) -> Self {
        Self::with_invalidations(store, ttl, Invalidations::new())
    }

    /// Like [`new`](Self::new), announcing every invalidation on `invalidations`.
    pub fn with_invalidations(
        store: SharedStore,
        ttl: Duration,
        invalidations: Invalidations,
    ) -> Self {
        Self::with_windows(store, ttl, invalidations, FRESH_FOR, UNKNOWN_FOR)
    }

    fn with_windows(
        store: SharedStore,
        ttl: Duration,
        invalidations: Invalidations,
        fresh_for: Duration,
        unknown_for: Duration,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(MAX_CACHED_TENANTS)
            .time_to_live(ttl)
            .build();
        let unknown = Cache::builder()
            .max_capacity(MAX_UNKNOWN_TENANTS)
            .time_to_live(unknown_for.min(ttl))
            .build();
        Self {
            store,
            cache,
            unknown,
            epochs: Arc::new(Epochs::new()),
            flights: Arc::new(Flights::default()),
            fresh_for,
            invalidations,
            subscribed: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Where every invalidation of this cache is announced.
    pub fn invalidations(&self) -> &Invalidations {
        &self.invalidations
    }

    /// Whether cached entries are served. A new cache is subscribed; the invalidation listener
    /// says otherwise from its start until it has subscribed.
    pub fn subscription(&self) -> Subscription {
        if self.subscribed.load(Ordering::SeqCst) {
            Subscription::Subscribed
        } else {
            Subscription::NotSubscribed
        }
    }

    /// Called by the invalidation listener. Becoming subscribed drops every entry first, then
    /// serves from the cache again: what was published before the subscription is lost, and no
    /// entry read before it may be served after it. Becoming unsubscribed only stops serving;
    /// what is cached is dropped at the next subscription.
    pub fn set_subscription(&self, subscription: Subscription) {
        match subscription {
            Subscription::Subscribed => {
                self.invalidate_all();
                self.subscribed.store(true, Ordering::SeqCst);
            }
            Subscription::NotSubscribed => self.subscribed.store(false, Ordering::SeqCst),
        }
    }

    fn is_subscribed(&self) -> bool {
        self.subscription() == Subscription::Subscribed
    }

    /// The installation, from the cache or the store. A clientKey the store does not hold is
    /// answered as unknown for [`UNKNOWN_FOR`] without reading the store again; an install
    /// invalidates its clientKey, so it is found at once all the same. Not subscribed, always
    /// from the store.
    pub async fn get(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<Arc<Installation>>, StoreError> {
        if self.is_subscribed() {
            if let Some(hit) = self.cache.get(client_key).await {
                monitoring::tenant_cache(Lookup::Get, true);
                return Ok(Some(hit.installation));
            }
            if self.unknown.get(client_key).await.is_some() {
                monitoring::tenant_cache(Lookup::Get, true);
                return Ok(None);
            }
        }
        monitoring::tenant_cache(Lookup::Get, false);
        self.read(client_key).await
    }

    /// What the store holds now, for a caller that found the cached entry wanting (a signature
    /// that fails against a secret which may have been rolled elsewhere). The store is read,
    /// and the cache refreshed, unless the cached entry (or unknown) was itself read after
    /// every invalidation of the key and less than [`FRESH_FOR`] ago; concurrent reads of one
    /// key share one store round trip. What was read is returned in any case, but cached only
    /// if no invalidation of this key happened while reading. Not subscribed, a fresh entry is
    /// still reused (it is as new as a read would be): a forged signature after a `get` costs
    /// no second read.
    pub async fn reload(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<Arc<Installation>>, StoreError> {
        if let Some(hit) = self.cache.get(client_key).await {
            if hit.read_at.elapsed() < self.fresh_for {
                monitoring::tenant_cache(Lookup::Reload, true);
                return Ok(Some(hit.installation));
            }
        } else if self.is_subscribed() && self.unknown.get(client_key).await.is_some() {
            monitoring::tenant_cache(Lookup::Reload, true);
            return Ok(None);
        }
        monitoring::tenant_cache(Lookup::Reload, false);
        self.read(client_key).await
    }

    /// Joins the read of `client_key` under way if it began after the last invalidation of
    /// the key, or starts one. The read runs in a task of its own, so that readers giving up
    /// (a client hanging up) do not abort it for the others.
    async fn read(&self, client_key: &ClientKey) -> Result<Option<Arc<Installation>>, StoreError> {
        let read = {
            let mut by_key = self
                .flights
                .by_key
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Taken under the lock, and the read is only spawned once the flight is registered,
            // so its `Landing` cannot run before the insert below.
            let epoch = self.epochs.snapshot(client_key);
            match by_key.get(client_key) {
                Some(flight) if flight.epoch == epoch && flight.read.peek().is_none() => {
                    flight.read.clone()
                }
                _ => {
                    let id = self.flights.next_id.fetch_add(1, Ordering::Relaxed);
                    let landing = Landing {
                        flights: self.flights.clone(),
                        client_key: client_key.clone(),
                        id,
                    };
                    let flight = {
                        let this = self.clone();
                        let client_key = client_key.clone();
                        async move {
                            let _landing = landing;
                            this.read_store(&client_key, epoch).await
                        }
                    };
                    // Spawned on first poll, after the lock is released: a task the runtime
                    // refuses (shutting down) drops its `Landing` at once, which takes the lock.
                    let read = async move {
                        tokio::spawn(flight)
                            .await
                            .unwrap_or_else(|e| Err(Arc::new(StoreError::unavailable(e))))
                    }
                    .boxed()
                    .shared();
                    by_key.insert(
                        client_key.clone(),
                        Flight {
                            id,
                            epoch,
                            read: read.clone(),
                        },
                    );
                    read
                }
            }
        };
        read.await.map_err(unshare)
    }

    /// One store read, cached (found or unknown) only if the epochs of the key are still
    /// `before`.
    async fn read_store(&self, client_key: &ClientKey, before: EpochSnapshot) -> Read {
        let read_at = Instant::now();
        match self.store.load(client_key).await.map_err(Arc::new)? {
            Some(found) => {
                let found = Arc::new(found);
                self.unknown.invalidate(client_key).await;
                if self.epochs.snapshot(client_key) == before {
                    let cached = Cached {
                        installation: found.clone(),
                        read_at,
                    };
                    self.cache.insert(client_key.clone(), cached).await;
                    // An invalidation may have slipped in between the check and the insert:
                    // it bumped the epoch before dropping the entry, so if it is not seen
                    // here its drop comes after the insert; if it is seen, undo the insert.
                    if self.epochs.snapshot(client_key) != before {
                        self.cache.invalidate(client_key).await;
                    }
                }
                Ok(Some(found))
            }
            None => {
                self.cache.invalidate(client_key).await;
                // The same rule for "unknown": an install whose invalidation arrived while
                // reading must be found by the next request.
                if self.epochs.snapshot(client_key) == before {
                    self.unknown.insert(client_key.clone(), ()).await;
                    if self.epochs.snapshot(client_key) != before {
                        self.unknown.invalidate(client_key).await;
                    }
                }
                Ok(None)
            }
        }
    }

    /// Drops the cached entry of `client_key` (an installation or "unknown") and announces it:
    /// the one entry point for a change this instance made or heard of. After a local write the
    /// entry is dropped rather than replaced: a concurrent write on another instance may already
    /// have superseded the record, and the next request reads the store anyway, once.
    pub async fn invalidate(&self, client_key: &ClientKey) {
        self.epochs.bump(client_key);
        self.cache.invalidate(client_key).await;
        self.unknown.invalidate(client_key).await;
        self.invalidations
            .notify(Invalidation::Tenant(client_key.clone()));
    }

    /// Drops every cached entry and announces it (after invalidation messages may have been
    /// lost).
    pub fn invalidate_all(&self) {
        self.epochs.bump_all();
        self.cache.invalidate_all();
        self.unknown.invalidate_all();
        self.invalidations.notify(Invalidation::All);
    }

    /// The cached entry, without reading the store.
    pub async fn cached(&self, client_key: &ClientKey) -> Option<Arc<Installation>> {
        self.cache.get(client_key).await.map(|hit| hit.installation)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::{oneshot, Notify};

    use super::*;
    use crate::store::testing::LoadSpy;
    use crate::store::{Commit, CommitOutcome, InstallationStore};
    use connect_protocol::domain::{BaseUrl, SharedSecret};

    fn installation(client_key: &str, version: u64) -> Installation {
        let mut installation = Installation::new(
            ClientKey::parse(client_key).unwrap(),
            BaseUrl::parse("https://acme.atlassian.net").unwrap(),
            "jira",
            SharedSecret::parse("s").unwrap(),
            true,
            0,
        );
        installation.version = version;
        installation
    }

    /// A store whose `load` can be held until the test releases it.
    #[derive(Default)]
    struct GatedStore {
        record: Mutex<Option<Installation>>,
        entered: Notify,
        gate: Mutex<Option<oneshot::Receiver<()>>>,
    }

    #[async_trait]
    impl InstallationStore for GatedStore {
        async fn load(&self, _: &ClientKey) -> Result<Option<Installation>, StoreError> {
            let read = self.record.lock().unwrap().clone();
            let gate = self.gate.lock().unwrap().take();
            self.entered.notify_one();
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            Ok(read)
        }
        async fn seen_token(
            &self,
            _: &ClientKey,
            _: &[u8; 32],
        ) -> Result<Option<[u8; 32]>, StoreError> {
            Ok(None)
        }
        async fn commit(&self, _: Commit<'_>) -> Result<CommitOutcome, StoreError> {
            unimplemented!()
        }
        async fn index_site(&self, _: &BaseUrl, _: &ClientKey) -> Result<(), StoreError> {
            Ok(())
        }
        async fn client_keys_for_site(&self, _: &BaseUrl) -> Result<Vec<ClientKey>, StoreError> {
            Ok(Vec::new())
        }
        async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
            Ok(Vec::new())
        }
        async fn client_keys_for_forge(
            &self,
            _: &crate::store::ForgeIdentity,
        ) -> Result<Vec<ClientKey>, StoreError> {
            Ok(Vec::new())
        }
        async fn index_forge(&self, _: &Installation) -> Result<(), StoreError> {
            Ok(())
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn remember_install_key(&self, _: &str, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn forget_install_key(&self, _: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
            Ok(Vec::new())
        }
        async fn keep_forge_token(
            &self,
            _: &connect_protocol::forge::InstallationId,
            _: &crate::store::forge_token::ForgeAppToken,
        ) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn forge_token(
            &self,
            _: &connect_protocol::forge::InstallationId,
        ) -> Result<Option<crate::store::forge_token::ForgeAppToken>, StoreError> {
            Ok(None)
        }
    }

    /// Starts a reload that reads version 1, lets `meanwhile` run while the read is in
    /// flight, then lets the reload finish.
    async fn reload_racing_with(
        meanwhile: impl AsyncFnOnce(&TenantCache, &GatedStore),
    ) -> (TenantCache, Arc<GatedStore>) {
        let store = Arc::new(GatedStore::default());
        *store.record.lock().unwrap() = Some(installation("ck-1", 1));
        let (release, gate) = oneshot::channel();
        *store.gate.lock().unwrap() = Some(gate);
        let tenants = TenantCache::new(store.clone(), Duration::from_secs(60));
        let key = ClientKey::parse("ck-1").unwrap();

        let reloading = {
            let tenants = tenants.clone();
            let key = key.clone();
            tokio::spawn(async move { tenants.reload(&key).await })
        };
        store.entered.notified().await;
        meanwhile(&tenants, &store).await;
        release.send(()).unwrap();
        let read = reloading.await.unwrap().unwrap().unwrap();
        assert_eq!(read.version, 1, "the reload returns what it read");
        (tenants, store)
    }

    #[tokio::test]
    async fn a_reload_that_read_before_an_invalidation_does_not_cache_what_it_read() {
        let key = ClientKey::parse("ck-1").unwrap();
        let (tenants, _store) = reload_racing_with(async |tenants, store| {
            // Another instance writes version 2 and its invalidation arrives mid-read.
            *store.record.lock().unwrap() = Some(installation("ck-1", 2));
            tenants.invalidate(&key).await;
        })
        .await;
        assert!(
            tenants.cached(&key).await.is_none(),
            "the stale read must not be cached"
        );
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(
            tenants.cached(&key).await.unwrap().version,
            2,
            "a clean read is cached"
        );
    }

    #[tokio::test]
    async fn invalidate_all_also_stops_a_racing_reload_from_caching() {
        let key = ClientKey::parse("ck-1").unwrap();
        let (tenants, _store) =
            reload_racing_with(async |tenants, _| tenants.invalidate_all()).await;
        assert!(tenants.cached(&key).await.is_none());
    }

    #[tokio::test]
    async fn a_reload_without_interference_is_cached() {
        let key = ClientKey::parse("ck-1").unwrap();
        let (tenants, _store) = reload_racing_with(async |_, _| {}).await;
        assert_eq!(tenants.cached(&key).await.unwrap().version, 1);
    }

    #[tokio::test]
    async fn invalidations_and_writes_are_announced() {
        let store = Arc::new(GatedStore::default());
        *store.record.lock().unwrap() = Some(installation("ck-1", 1));
        let tenants = TenantCache::new(store.clone(), Duration::from_secs(60));
        let mut events = tenants.invalidations().subscribe();
        let key = ClientKey::parse("ck-1").unwrap();

        tenants.get(&key).await.unwrap();
        assert!(tenants.cached(&key).await.is_some());
        tenants.invalidate(&key).await;
        assert!(
            tenants.cached(&key).await.is_none(),
            "a local write drops the entry"
        );
        assert_eq!(
            events.recv().await.unwrap(),
            Invalidation::Tenant(key.clone())
        );
        tenants.invalidate_all();
        assert_eq!(events.recv().await.unwrap(), Invalidation::All);
    }

    /// Counts the `load` calls that reach the store: what an attacker's requests cost.
    /// A cache over a counting, gated store holding `record`, with the production windows
    /// unless the test needs others.
    fn counted(
        record: Option<Installation>,
        fresh_for: Duration,
        unknown_for: Duration,
    ) -> (TenantCache, Arc<LoadSpy>, Arc<GatedStore>) {
        let gated = Arc::new(GatedStore::default());
        *gated.record.lock().unwrap() = record;
        let store = LoadSpy::new(gated.clone());
        let tenants = TenantCache::with_windows(
            store.clone(),
            Duration::from_secs(60),
            Invalidations::new(),
            fresh_for,
            unknown_for,
        );
        (tenants, store, gated)
    }

    fn random_client_key() -> ClientKey {
        ClientKey::parse(&format!("ck-attacker-{}", uuid::Uuid::new_v4())).unwrap()
    }

    /// Starts 100 concurrent `lookup`s of `key` while the store holds the first `load`, lets
    /// them all wait for it, then releases it; returns what each lookup got.
    async fn hundred_at_once<F, Fut>(
        tenants: &TenantCache,
        gated: &GatedStore,
        key: &ClientKey,
        lookup: F,
    ) -> Vec<Option<Arc<Installation>>>
    where
        F: Fn(TenantCache, ClientKey) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Arc<Installation>>, StoreError>>
            + Send
            + 'static,
    {
        let (release, gate) = oneshot::channel();
        *gated.gate.lock().unwrap() = Some(gate);
        let lookups: Vec<_> = (0..100)
            .map(|_| tokio::spawn(lookup(tenants.clone(), key.clone())))
            .collect();
        gated.entered.notified().await;
        // Every lookup has started and is waiting for the one read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.send(()).unwrap();
        let mut found = Vec::new();
        for lookup in lookups {
            found.push(lookup.await.unwrap().unwrap());
        }
        found
    }

    #[tokio::test]
    async fn an_unknown_client_key_costs_one_store_read_per_negative_window() {
        let (tenants, store, gated) = counted(None, FRESH_FOR, UNKNOWN_FOR);
        let key = random_client_key();
        let started = Instant::now();
        for _ in 0..1000 {
            assert!(tenants.get(&key).await.unwrap().is_none());
            assert!(tenants.reload(&key).await.unwrap().is_none());
        }
        assert!(
            started.elapsed() < UNKNOWN_FOR,
            "the lookups took {:?}",
            started.elapsed()
        );
        assert_eq!(store.loads(), 1, "1,000 lookups, one store read");

        // The tenant installs (here or on another instance): the commit is followed by an
        // invalidation of its clientKey, and the next lookup reads the new record.
        *gated.record.lock().unwrap() = Some(installation(key.as_str(), 1));
        tenants.invalidate(&key).await;
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 2);
    }

    #[tokio::test]
    async fn unknown_expires_after_the_negative_window_and_on_invalidate_all() {
        let window = Duration::from_millis(100);
        let (tenants, store, gated) = counted(None, FRESH_FOR, window);
        let key = random_client_key();
        assert!(tenants.get(&key).await.unwrap().is_none());
        assert!(tenants.get(&key).await.unwrap().is_none());
        assert_eq!(store.loads(), 1);
        tokio::time::sleep(window * 2).await;
        assert!(tenants.get(&key).await.unwrap().is_none());
        assert_eq!(
            store.loads(),
            2,
            "unknown is remembered only for the window"
        );

        *gated.record.lock().unwrap() = Some(installation(key.as_str(), 1));
        tenants.invalidate_all();
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 3);
    }

    #[tokio::test]
    async fn a_read_that_found_nothing_before_an_install_does_not_cache_unknown() {
        let (tenants, store, gated) = counted(None, FRESH_FOR, Duration::from_secs(60));
        let key = ClientKey::parse("ck-1").unwrap();
        let (release, gate) = oneshot::channel();
        *gated.gate.lock().unwrap() = Some(gate);
        let reading = {
            let (tenants, key) = (tenants.clone(), key.clone());
            tokio::spawn(async move { tenants.get(&key).await })
        };
        gated.entered.notified().await;
        // The install commits and its invalidation arrives while the read is in flight.
        *gated.record.lock().unwrap() = Some(installation("ck-1", 1));
        tenants.invalidate(&key).await;
        release.send(()).unwrap();
        assert!(reading.await.unwrap().unwrap().is_none(), "it read nothing");
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reloads_of_one_key_share_one_store_read() {
        let fresh_for = Duration::from_millis(50);
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), fresh_for, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        tenants.get(&key).await.unwrap().unwrap();
        tokio::time::sleep(fresh_for * 2).await;
        assert_eq!(store.loads(), 1);

        *gated.record.lock().unwrap() = Some(installation("ck-1", 2));
        let reloads = hundred_at_once(&tenants, &gated, &key, async |tenants, key| {
            tenants.reload(&key).await
        })
        .await;
        for reload in reloads {
            assert_eq!(reload.unwrap().version, 2);
        }
        assert_eq!(store.loads(), 2, "100 concurrent reloads, one store read");
        assert_eq!(tenants.cached(&key).await.unwrap().version, 2);
    }

    #[tokio::test]
    async fn concurrent_lookups_of_an_unknown_key_share_one_store_read() {
        let (tenants, store, gated) = counted(None, FRESH_FOR, UNKNOWN_FOR);
        let key = random_client_key();
        let lookups = hundred_at_once(&tenants, &gated, &key, async |tenants, key| {
            tenants.get(&key).await
        })
        .await;
        assert!(lookups.iter().all(Option::is_none));
        assert_eq!(store.loads(), 1);
    }

    #[tokio::test]
    async fn a_reload_right_after_a_fresh_read_is_skipped_but_not_after_an_invalidation() {
        let fresh_for = Duration::from_millis(100);
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), fresh_for, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        for _ in 0..200 {
            assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 1);
        }
        assert_eq!(
            store.loads(),
            1,
            "reloads within the fresh window are skipped"
        );

        // A roll elsewhere: its invalidation drops the entry, so the next reload reads.
        *gated.record.lock().unwrap() = Some(installation("ck-1", 2));
        tenants.invalidate(&key).await;
        assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(store.loads(), 2);
        assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(store.loads(), 2);

        // Past the window a reload reads again (a roll whose invalidation is still on its way).
        *gated.record.lock().unwrap() = Some(installation("ck-1", 3));
        tokio::time::sleep(fresh_for * 2).await;
        assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 3);
        assert_eq!(store.loads(), 3);
    }

    #[tokio::test]
    async fn the_production_window_skips_a_reload_right_after_a_read() {
        let (tenants, store, _gated) =
            counted(Some(installation("ck-1", 1)), FRESH_FOR, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        tenants.get(&key).await.unwrap().unwrap();
        tenants.reload(&key).await.unwrap().unwrap();
        assert_eq!(store.loads(), 1);
    }

    #[tokio::test]
    async fn a_read_begun_before_an_invalidation_is_not_joined() {
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), FRESH_FOR, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        let (release, gate) = oneshot::channel();
        *gated.gate.lock().unwrap() = Some(gate);
        let first = {
            let (tenants, key) = (tenants.clone(), key.clone());
            tokio::spawn(async move { tenants.reload(&key).await })
        };
        gated.entered.notified().await;
        // A roll commits and is announced while the first read is in flight: a request with
        // the new secret must not wait for (and be refused with) that read.
        *gated.record.lock().unwrap() = Some(installation("ck-1", 2));
        tenants.invalidate(&key).await;
        assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(store.loads(), 2);
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().unwrap().version, 1);
        assert_eq!(
            tenants.cached(&key).await.unwrap().version,
            2,
            "the stale read does not replace the new one"
        );
    }

    #[tokio::test]
    async fn not_subscribed_every_get_reads_the_store_and_subscribing_clears_then_serves() {
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), FRESH_FOR, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        tenants.set_subscription(Subscription::NotSubscribed);
        assert_eq!(tenants.subscription(), Subscription::NotSubscribed);
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 1);

        // A roll elsewhere whose message nobody hears: the next lookup sees it all the same.
        *gated.record.lock().unwrap() = Some(installation("ck-1", 2));
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(store.loads(), 2, "no entry is served");
        // A failed signature right after the read reuses it, as when subscribed.
        assert_eq!(tenants.reload(&key).await.unwrap().unwrap().version, 2);
        assert_eq!(store.loads(), 2);

        *gated.record.lock().unwrap() = Some(installation("ck-1", 3));
        tenants.set_subscription(Subscription::Subscribed);
        assert!(
            tenants.cached(&key).await.is_none(),
            "what was read unsubscribed is dropped before serving again"
        );
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 3);
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 3);
        assert_eq!(store.loads(), 3, "subscribed, the cache serves again");
    }

    #[tokio::test]
    async fn not_subscribed_unknown_is_not_served() {
        let (tenants, store, gated) = counted(None, FRESH_FOR, UNKNOWN_FOR);
        let key = random_client_key();
        tenants.set_subscription(Subscription::NotSubscribed);
        assert!(tenants.get(&key).await.unwrap().is_none());
        assert!(tenants.reload(&key).await.unwrap().is_none());
        assert_eq!(store.loads(), 2);
        // Installed elsewhere, unheard: found by the next lookup.
        *gated.record.lock().unwrap() = Some(installation(key.as_str(), 1));
        assert_eq!(tenants.get(&key).await.unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 3);
    }

    #[tokio::test]
    async fn not_subscribed_concurrent_lookups_of_one_key_share_one_store_read() {
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), FRESH_FOR, UNKNOWN_FOR);
        tenants.set_subscription(Subscription::NotSubscribed);
        let key = ClientKey::parse("ck-1").unwrap();
        let lookups = hundred_at_once(&tenants, &gated, &key, async |tenants, key| {
            tenants.get(&key).await
        })
        .await;
        for lookup in lookups {
            assert_eq!(lookup.unwrap().version, 1);
        }
        assert_eq!(store.loads(), 1, "100 concurrent lookups, one store read");
    }

    #[tokio::test]
    async fn a_read_begun_before_the_subscription_is_not_cached() {
        let key = ClientKey::parse("ck-1").unwrap();
        let (tenants, _store) = reload_racing_with(async |tenants, _| {
            tenants.set_subscription(Subscription::NotSubscribed);
            tenants.set_subscription(Subscription::Subscribed);
        })
        .await;
        assert!(tenants.cached(&key).await.is_none());
    }

    #[tokio::test]
    async fn a_reader_giving_up_does_not_fail_the_others() {
        let (tenants, store, gated) =
            counted(Some(installation("ck-1", 1)), FRESH_FOR, UNKNOWN_FOR);
        let key = ClientKey::parse("ck-1").unwrap();
        let (release, gate) = oneshot::channel();
        *gated.gate.lock().unwrap() = Some(gate);
        let leader = {
            let (tenants, key) = (tenants.clone(), key.clone());
            tokio::spawn(async move { tenants.get(&key).await })
        };
        gated.entered.notified().await;
        let follower = {
            let (tenants, key) = (tenants.clone(), key.clone());
            tokio::spawn(async move { tenants.get(&key).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        release.send(()).unwrap();
        assert_eq!(follower.await.unwrap().unwrap().unwrap().version, 1);
        assert_eq!(store.loads(), 1);
        assert!(tenants.flights.by_key.lock().unwrap().is_empty());
    }
}
