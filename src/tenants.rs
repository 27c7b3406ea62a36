//! Installations as the request guard sees them: read through a moka cache in front of the
//! store, so a verified product request costs no store round trip. Entries are dropped when
//! this instance writes a lifecycle event, when another instance announces one (Redis
//! pub/sub, see [`crate::invalidation`]), and in any case after a bounded time.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use crate::domain::ClientKey;
use crate::store::{Installation, SharedStore, StoreError};

/// Upper bound of cached installations; one entry is a few hundred bytes.
const MAX_CACHED_TENANTS: u64 = 200_000;

#[derive(Clone)]
pub struct TenantCache {
    store: SharedStore,
    cache: Cache<ClientKey, Arc<Installation>>,
}

impl TenantCache {
    pub fn new(store: SharedStore, ttl: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(MAX_CACHED_TENANTS)
            .time_to_live(ttl)
            .build();
        Self { store, cache }
    }

    /// The installation, from the cache or the store. Unknown clientKeys are not cached, so a
    /// tenant installed a moment ago is found at once.
    pub async fn get(&self, client_key: &ClientKey) -> Result<Option<Arc<Installation>>, StoreError> {
        if let Some(hit) = self.cache.get(client_key).await {
            return Ok(Some(hit));
        }
        self.reload(client_key).await
    }

    /// Reads the store, bypassing and refreshing the cache.
    pub async fn reload(&self, client_key: &ClientKey) -> Result<Option<Arc<Installation>>, StoreError> {
        match self.store.load(client_key).await? {
            Some(found) => {
                let found = Arc::new(found);
                self.cache.insert(client_key.clone(), found.clone()).await;
                Ok(Some(found))
            }
            None => {
                self.cache.invalidate(client_key).await;
                Ok(None)
            }
        }
    }

    /// Replaces the cached entry with a record this instance just wrote.
    pub async fn put(&self, installation: Arc<Installation>) {
        self.cache.insert(installation.client_key.clone(), installation).await;
    }

    pub async fn invalidate(&self, client_key: &ClientKey) {
        self.cache.invalidate(client_key).await;
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}
