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

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use crate::domain::ClientKey;
use crate::invalidation::{Invalidation, Invalidations};
use crate::store::{Installation, SharedStore, StoreError};

/// Upper bound of cached installations; one entry is a few hundred bytes.
const MAX_CACHED_TENANTS: u64 = 200_000;

/// Number of invalidation epochs. Two clientKeys sharing a stripe only cost each other a
/// skipped cache insert, never a stale one.
const EPOCH_STRIPES: usize = 1024;

#[derive(Clone)]
pub struct TenantCache {
    store: SharedStore,
    cache: Cache<ClientKey, Arc<Installation>>,
    epochs: Arc<Epochs>,
    invalidations: Invalidations,
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
        let cache = Cache::builder()
            .max_capacity(MAX_CACHED_TENANTS)
            .time_to_live(ttl)
            .build();
        Self {
            store,
            cache,
            epochs: Arc::new(Epochs::new()),
            invalidations,
        }
    }

    /// Where every invalidation of this cache is announced.
    pub fn invalidations(&self) -> &Invalidations {
        &self.invalidations
    }

    /// The installation, from the cache or the store. Unknown clientKeys are not cached, so a
    /// tenant installed a moment ago is found at once.
    pub async fn get(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<Arc<Installation>>, StoreError> {
        if let Some(hit) = self.cache.get(client_key).await {
            return Ok(Some(hit));
        }
        self.reload(client_key).await
    }

    /// Reads the store, bypassing and refreshing the cache. What was read is returned in any
    /// case, but cached only if no invalidation of this key happened while reading.
    pub async fn reload(
        &self,
        client_key: &ClientKey,
    ) -> Result<Option<Arc<Installation>>, StoreError> {
        let before = self.epochs.snapshot(client_key);
        match self.store.load(client_key).await? {
            Some(found) => {
                let found = Arc::new(found);
                if self.epochs.snapshot(client_key) == before {
                    self.cache.insert(client_key.clone(), found.clone()).await;
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
                Ok(None)
            }
        }
    }

    /// This instance just wrote `installation`. The entry is dropped rather than replaced: a
    /// concurrent write on another instance may already have superseded this record (its
    /// invalidation may even have arrived before this call), and the next request reads the
    /// store anyway, once.
    pub async fn put(&self, installation: Arc<Installation>) {
        self.invalidate(&installation.client_key).await;
    }

    /// Drops the cached entry of `client_key` and announces it.
    pub async fn invalidate(&self, client_key: &ClientKey) {
        self.epochs.bump(client_key);
        self.cache.invalidate(client_key).await;
        self.invalidations
            .notify(Invalidation::Tenant(client_key.clone()));
    }

    /// Drops every cached entry and announces it (after invalidation messages may have been
    /// lost).
    pub fn invalidate_all(&self) {
        self.epochs.bump_all();
        self.cache.invalidate_all();
        self.invalidations.notify(Invalidation::All);
    }

    /// The cached entry, without reading the store.
    pub async fn cached(&self, client_key: &ClientKey) -> Option<Arc<Installation>> {
        self.cache.get(client_key).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::{oneshot, Notify};

    use super::*;
    use crate::domain::{BaseUrl, SharedSecret};
    use crate::store::{Commit, CommitOutcome, InstallationStore};

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
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
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
            tenants.invalidate(&ClientKey::parse("ck-1").unwrap()).await;
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
        tenants.put(Arc::new(installation("ck-1", 2))).await;
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
}
