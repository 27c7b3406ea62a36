//! [`RedisStore`]: installations in Redis, shared by every `warden` instance.
//!
//! Key layout (`P` = the configured prefix, `CK` = the clientKey). Every key of one tenant
//! carries the hash tag `{CK}`, so one tenant lives in one Redis Cluster slot and the commit
//! script may touch all of them:
//!
//! - `P:{CK}:installation`: a HASH of two fields: `version`, the compare-and-set version, and
//!   `record`, the whole record in the compact form of `super::record` (short names, absent
//!   attributes left out, the sealed secret history inside), so that an installation is one
//!   small key. Records written before that form (one JSON field per attribute, the secrets in
//!   a LIST `P:{CK}:secrets`) are still read, and rewritten in it by their next write.
//! - `P:{CK}:token:<hex token digest>`: a STRING holding the hex body digest, expiring at the
//!   token's `exp` (`EXAT`).
//! - `P:site:{<baseUrl>}`: a sorted SET of the clientKeys installed on that site, scored by
//!   when each was first indexed (milliseconds), so every instance sees the same order.
//! - `P:forge-token:{<installationId>}`: a HASH (`exp`, `digest`, `value`: the stored form of
//!   `super::forge_token`) of the Forge app token of one installation, expiring at its `exp`;
//!   written by [`FORGE_TOKEN_SCRIPT`], never waited on for replicas (a lost token is sent
//!   again by Forge's next call).
//! - `P:invalidate`: the channel on which every commit publishes the clientKey it wrote, so that
//!   other instances drop what they cached.
//!
//! With a Redis Cluster ([`RedisStore::connect_cluster`]) the same keys are used: every command
//! touches one slot (a tenant's keys share one; a site index is a key of its own), so the
//! commit script and the `load` transaction stay single-slot. `PUBLISH` reaches every node of
//! a cluster, so a subscriber on any node hears every commit. Listings `SCAN` every primary.
//!
//! With [`Replication`] (`WARDEN_REDIS_MIN_REPLICAS` ≥ 1) every write is followed by `WAIT`
//! on the very connection that wrote it (in a cluster: routed to the primary owning the key
//! just written) and is acknowledged only when enough replicas confirmed it
//! (docs/PROTOCOL.md §10). `WAIT` blocks the connection it runs on, so in a cluster such
//! writes take a connection of their own ([`ClusterBackend::writer`]) instead of the shared
//! one every read uses.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, Script, Value};

use super::forge_token::{self, ForgeAppToken};
use super::record;
use super::sealing::Sealer;
use super::{
    Commit, CommitOutcome, ForgeIdentity, Installation, InstallationPage, InstallationStore,
    Listed, ScanCursor, ScanPosition, SeenToken, SiteCommitOutcome, SiteEntry, StoreError,
};
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::forge::InstallationId;

/// How long to wait for a connection from the pool, for a new connection, or for an answer.
/// An outage must turn into a quick `503`, not a hanging request.
const TIMEOUT: Duration = Duration::from_secs(2);
const POOL_SIZE: usize = 16;
const SCAN_COUNT: usize = 500;
/// `SCAN`'s `COUNT` for a page of [`InstallationStore::scan_installations`].
const LISTING_SCAN_COUNT: usize = 1000;
/// How many `load`s of one listing page a cluster connection carries at once.
const CLUSTER_LISTING_LOADS: usize = 128;

/// Keeps a Forge app token unless the one kept is the same or expires as late or later
/// (compare-and-set on `exp`, atomic); the key expires with the token.
/// KEYS[1] the token hash; ARGV[1] exp (Unix seconds), ARGV[2] hex digest, ARGV[3] stored form.
/// Returns 1 when written, 0 when the kept token stays.
const FORGE_TOKEN_SCRIPT: &str = r#"
local kept = redis.call('HMGET', KEYS[1], 'exp', 'digest')
if kept[1] and (tonumber(kept[1]) >= tonumber(ARGV[1]) or kept[2] == ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'exp', ARGV[1], 'digest', ARGV[2], 'value', ARGV[3])
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 1
"#;
static FORGE_TOKEN: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(FORGE_TOKEN_SCRIPT));

/// The compare-and-set write: one script, so the check, the writes and the notification are
/// atomic. It may also index the installation on its site first (one Redis, not a Cluster:
/// the site index lives in another slot), and then write only if the site agrees with what
/// the record assumes about other installations there.
///
/// KEYS[1] installation hash, KEYS[2] the secret list of the old layout (deleted by every
/// write), KEYS[3] token key (the hash again when no token is remembered), KEYS[4] site index
/// (the hash again without a site step), KEYS[5..] the Forge identity sets the clientKey joins
/// with the record (docs/PROTOCOL.md §12; one Redis only: on a Cluster they live in other
/// slots and are written just before).
/// ARGV[1] expected version, ARGV[2] channel, ARGV[3] clientKey, ARGV[4] new version,
/// ARGV[5] token body digest ('' when no token is remembered), ARGV[6] token expiry (Unix
/// seconds), ARGV[7] site step ('': none; 'any': index; '0'/'1': index, and write only if the
/// site holds no other/some other clientKey), ARGV[8] the index score (milliseconds),
/// ARGV[9] the record in its compact form.
/// Returns 1 when written, 0 on a version conflict (nothing written but the index), 2 when the
/// site disagrees (nothing written but the index).
const COMMIT_SCRIPT: &str = r#"
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[4], 'NX', ARGV[8], ARGV[3])
end
local current = redis.call('HGET', KEYS[1], 'version')
if not current then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  current = '0'
end
if current ~= ARGV[1] then
  return 0
end
if ARGV[7] == '0' or ARGV[7] == '1' then
  local others = '0'
  if redis.call('ZCARD', KEYS[4]) > 1 then
    others = '1'
  end
  if others ~= ARGV[7] then
    return 2
  end
end
-- The only write Redis may refuse comes first: a script is not rolled back.
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5], 'EXAT', ARGV[6])
end
if current ~= '0' then
  redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('HSET', KEYS[1], 'version', ARGV[4], 'record', ARGV[9])
for i = 5, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

pub struct RedisStore {
    backend: Backend,
    prefix: String,
    commit_script: Script,
    replication: Option<Replication>,
    sealer: Sealer,
}

/// How many replicas must confirm a write before it is acknowledged, and how long `WAIT`
/// may take for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    pub min_replicas: u32,
    pub timeout: Duration,
}

/// At most this many cluster connections are reserved for writes that `WAIT`.
const CLUSTER_WRITERS: usize = 8;

/// Where commands go: one Redis or a Redis Cluster.
enum Backend {
    Single(std::sync::Arc<SingleBackend>),
    Cluster(Box<ClusterBackend>),
}

/// One Redis: a multiplexed connection shared by every request, so that a request costs its
/// own round trips only (a pooled connection costs one more at every checkout, the pool's
/// `PING`). Opened on first use and again after a connection-level failure, so the service
/// starts while Redis is down. Writes that `WAIT` take a pooled connection of their own
/// instead: `WAIT` blocks the connection it runs on.
struct SingleBackend {
    client: redis::Client,
    config: AsyncConnectionConfig,
    shared: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    pool: Pool,
}

impl SingleBackend {
    async fn get(&self) -> Result<MultiplexedConnection, StoreError> {
        let attempt = async {
            let mut cached = self.shared.lock().await;
            if let Some(connection) = cached.as_ref() {
                return Ok(connection.clone());
            }
            let connection = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(StoreError::unavailable)?;
            *cached = Some(connection.clone());
            Ok(connection)
        };
        tokio::time::timeout(TIMEOUT, attempt).await.map_err(|_| {
            StoreError::unavailable(ConfigError(format!(
                "no connection to Redis within {TIMEOUT:?}"
            )))
        })?
    }

    /// After a connection-level failure the next command opens a fresh connection.
    fn forget_connection(&self) {
        if let Ok(mut cached) = self.shared.try_lock() {
            *cached = None;
        }
    }

    /// Whether `e` says the shared connection is broken (not merely slow: a timeout is not
    /// tried again).
    fn reconnect_for(e: &RedisError) -> bool {
        (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout()
    }

    /// A fresh shared connection in place of the broken one; `broken`'s error if none opens.
    async fn reconnect(&self, broken: RedisError) -> Result<MultiplexedConnection, RedisError> {
        let mut cached = self.shared.lock().await;
        let fresh = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config);
        match tokio::time::timeout(TIMEOUT, fresh).await {
            Ok(Ok(connection)) => {
                *cached = Some(connection.clone());
                Ok(connection)
            }
            _ => {
                *cached = None;
                Err(broken)
            }
        }
    }
}

/// A Redis Cluster: one multiplexed [`ClusterConnection`] (it keeps a connection to every
/// node and routes each command by slot), opened on first use and opened again after a
/// connection-level failure, so the service starts while the cluster is down.
struct ClusterBackend {
    client: ClusterClient,
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// Idle connections of writes that `WAIT`, and how many may exist at once.
    writers: std::sync::Mutex<Vec<ClusterConnection>>,
    writer_permits: std::sync::Arc<tokio::sync::Semaphore>,
}

/// A cluster connection held by one write until it is handed back (once its commands were
/// answered; a connection whose command failed is dropped, the next write opens a fresh one).
struct Writer {
    connection: ClusterConnection,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ClusterBackend {
    async fn get(&self) -> Result<ClusterConnection, StoreError> {
        let attempt = async {
            let mut cached = self.connection.lock().await;
            if let Some(connection) = cached.as_ref() {
                return Ok(connection.clone());
            }
            let connection = self
                .client
                .get_async_connection()
                .await
                .map_err(StoreError::unavailable)?;
            *cached = Some(connection.clone());
            Ok(connection)
        };
        tokio::time::timeout(TIMEOUT, attempt).await.map_err(|_| {
            StoreError::unavailable(ConfigError(format!(
                "no connection to the Redis Cluster within {TIMEOUT:?}"
            )))
        })?
    }

    /// A cluster connection no other request uses until [`give_back`](Self::give_back):
    /// a `WAIT` on it blocks only this write.
    async fn writer(&self) -> Result<Writer, StoreError> {
        let attempt = async {
            let permit = self
                .writer_permits
                .clone()
                .acquire_owned()
                .await
                .map_err(StoreError::unavailable)?;
            let idle = self.writers.lock().ok().and_then(|mut idle| idle.pop());
            let connection = match idle {
                Some(connection) => connection,
                None => self
                    .client
                    .get_async_connection()
                    .await
                    .map_err(StoreError::unavailable)?,
            };
            Ok(Writer {
                connection,
                _permit: permit,
            })
        };
        tokio::time::timeout(TIMEOUT, attempt).await.map_err(|_| {
            StoreError::unavailable(ConfigError(format!(
                "no connection to the Redis Cluster within {TIMEOUT:?}"
            )))
        })?
    }

    fn give_back(&self, writer: Writer) {
        if let Ok(mut idle) = self.writers.lock() {
            idle.push(writer.connection);
        }
    }

    /// After a connection-level failure the next command opens a fresh cluster connection.
    fn forget_connection(&self) {
        if let Ok(mut cached) = self.connection.try_lock() {
            *cached = None;
        }
    }
}

/// A connection of either backend; commands and scripts are written once against it.
enum Conn {
    /// The shared connection of one Redis ([`SingleBackend`]). For a read (`Some`), a command
    /// that finds it broken (Redis restarted since the last command) is sent once more on a
    /// fresh one, as a pool's check-out would have replaced it; a write is never sent twice
    /// (whether the first one ran is unknown), it fails and the caller answers `503`.
    Shared(MultiplexedConnection, Option<std::sync::Arc<SingleBackend>>),
    /// A pooled connection of one Redis, for a write that `WAIT`s.
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection),
    /// A cluster connection of one write ([`ClusterBackend::writer`]).
    Writer(Writer),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Shared(c, None) => c.req_packed_command(cmd),
            Conn::Shared(c, Some(single)) => Box::pin(async move {
                match c.req_packed_command(cmd).await {
                    Err(e) if SingleBackend::reconnect_for(&e) => {
                        *c = single.reconnect(e).await?;
                        c.req_packed_command(cmd).await
                    }
                    answer => answer,
                }
            }),
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Writer(w) => w.connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Shared(c, None) => c.req_packed_commands(cmd, offset, count),
            Conn::Shared(c, Some(single)) => Box::pin(async move {
                match c.req_packed_commands(cmd, offset, count).await {
                    Err(e) if SingleBackend::reconnect_for(&e) => {
                        *c = single.reconnect(e).await?;
                        c.req_packed_commands(cmd, offset, count).await
                    }
                    answer => answer,
                }
            }),
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Writer(w) => w.connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Shared(c, _) => c.get_db(),
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Writer(w) => w.connection.get_db(),
        }
    }
}

/// The seed node URLs of a comma-separated `WARDEN_REDIS_URL` (cluster mode).
pub fn seed_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the connection pool. Nothing is sent to Redis yet: the service starts while Redis
    /// is down and answers `503` until it is back. Fails only on a malformed URL or prefix.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        check_prefix(prefix)?;
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        // The URL may carry a password: never echo it.
        let invalid = |e: RedisError| {
            StoreError::unavailable(ConfigError(format!(
                "the Redis URL is not valid ({:?})",
                e.kind()
            )))
        };
        let client = redis::Client::open(url).map_err(invalid)?;
        let manager = Manager::new_with_config(url, connection_config.clone()).map_err(invalid)?;
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(StoreError::unavailable)?;
        Ok(RedisStore {
            backend: Backend::Single(std::sync::Arc::new(SingleBackend {
                client,
                config: connection_config,
                shared: tokio::sync::Mutex::new(None),
                pool,
            })),
            prefix: prefix.to_owned(),
            commit_script: Script::new(COMMIT_SCRIPT),
            replication: None,
            sealer: Sealer::plaintext(),
        })
    }

    /// Like [`connect`](Self::connect), for a Redis Cluster known by one or more seed node
    /// URLs. Nothing is sent yet: the cluster may be down at start-up. Fails only on no or a
    /// malformed URL, or a bad prefix.
    pub async fn connect_cluster(seeds: &[&str], prefix: &str) -> Result<RedisStore, StoreError> {
        check_prefix(prefix)?;
        if seeds.is_empty() {
            return Err(StoreError::unavailable(ConfigError(
                "no Redis Cluster seed node URL given".into(),
            )));
        }
        let mut infos = Vec::with_capacity(seeds.len());
        for seed in seeds {
            // The URL may carry a password: never echo it.
            let info = redis::IntoConnectionInfo::into_connection_info(*seed).map_err(|e| {
                StoreError::unavailable(ConfigError(format!(
                    "a Redis Cluster seed URL is not valid ({:?})",
                    e.kind()
                )))
            })?;
            infos.push(info);
        }
        let client = ClusterClientBuilder::new(infos)
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            // A failing node must turn into a quick 503, not a long series of retries.
            .retries(2)
            .build()
            .map_err(|e| {
                StoreError::unavailable(ConfigError(format!(
                    "the Redis Cluster seed URLs are not valid ({:?})",
                    e.kind()
                )))
            })?;
        Ok(RedisStore {
            backend: Backend::Cluster(Box::new(ClusterBackend {
                client,
                connection: tokio::sync::Mutex::new(None),
                writers: std::sync::Mutex::new(Vec::new()),
                writer_permits: std::sync::Arc::new(tokio::sync::Semaphore::new(CLUSTER_WRITERS)),
            })),
            prefix: prefix.to_owned(),
            commit_script: Script::new(COMMIT_SCRIPT),
            replication: None,
            sealer: Sealer::plaintext(),
        })
    }

    /// Every write is acknowledged only once `replication.min_replicas` replicas confirmed it
    /// (`WAIT`); `None` or zero replicas: as soon as the primary wrote it.
    pub fn with_replication(mut self, replication: Option<Replication>) -> Self {
        // `WAIT n 0` would block until a replica confirms: never wait less than 1 ms.
        self.replication = replication
            .filter(|r| r.min_replicas > 0)
            .map(|r| Replication {
                timeout: r.timeout.max(Duration::from_millis(1)),
                ..r
            });
        self
    }

    /// Seals secrets with `sealer` from now on (without it they are written in plaintext).
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = sealer;
        self
    }

    /// Whether this store speaks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// The channel every commit publishes the written clientKey on.
    pub fn channel(&self) -> String {
        crate::invalidation::channel(&self.prefix)
    }

    fn installation_key(&self, client_key: &ClientKey) -> String {
        format!("{}:{{{}}}:installation", self.prefix, client_key.as_str())
    }

    /// One hash of every remembered install key (key URL -> PEM): a handful of entries, one
    /// slot.
    fn install_keys_key(&self) -> String {
        format!("{}:install-keys", self.prefix)
    }

    fn secrets_key(&self, client_key: &ClientKey) -> String {
        format!("{}:{{{}}}:secrets", self.prefix, client_key.as_str())
    }

    fn token_key(&self, client_key: &ClientKey, token_digest: &[u8; 32]) -> String {
        format!(
            "{}:{{{}}}:token:{}",
            self.prefix,
            client_key.as_str(),
            hex::encode(token_digest)
        )
    }

    fn forge_token_key(&self, installation: &InstallationId) -> String {
        format!("{}:forge-token:{{{}}}", self.prefix, installation.uuid())
    }

    fn site_key(&self, base_url: &BaseUrl) -> String {
        format!("{}:site:{{{}}}", self.prefix, base_url.as_str())
    }

    /// The set of clientKeys committed with a Forge identity: hash-tagged on the identity, so
    /// one slot holds it on a Cluster.
    fn forge_key(&self, identity: &ForgeIdentity) -> String {
        match identity {
            // The bare UUID: the ARI's constant prefix would only cost memory.
            ForgeIdentity::Installation(id) => {
                format!("{}:forge-installation:{{{}}}", self.prefix, id.uuid())
            }
            ForgeIdentity::Cloud(id) => format!("{}:forge-cloud:{{{id}}}", self.prefix),
        }
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        match &self.backend {
            Backend::Single(single) => single
                .get()
                .await
                .map(|c| Conn::Shared(c, Some(single.clone()))),
            Backend::Cluster(cluster) => cluster.get().await.map(Conn::Cluster),
        }
    }

    /// The connection of a write: with replication required, one of its own, so that its
    /// `WAIT` neither blocks nor is answered for other requests.
    async fn write_conn(&self) -> Result<Conn, StoreError> {
        match (&self.backend, self.replication) {
            (Backend::Cluster(cluster), Some(_)) => cluster.writer().await.map(Conn::Writer),
            (Backend::Single(single), Some(_)) => single
                .pool
                .get()
                .await
                .map(Conn::Single)
                .map_err(StoreError::unavailable),
            (Backend::Single(single), None) => single.get().await.map(|c| Conn::Shared(c, None)),
            (Backend::Cluster(_), None) => self.conn().await,
        }
    }

    /// Ends a write on `conn`: with replication required, `WAIT`s on that same connection (in
    /// a cluster, on the primary owning `key`, the key just written) until enough replicas
    /// confirmed every write it made. Then hands a cluster writer connection back.
    async fn confirm_write(&self, mut conn: Conn, key: &str) -> Result<(), StoreError> {
        let Some(replication) = self.replication else {
            return Ok(());
        };
        let mut wait = redis::cmd("WAIT");
        wait.arg(replication.min_replicas)
            .arg(replication.timeout.as_millis() as u64);
        let reply = match &mut conn {
            Conn::Shared(c, _) => wait.query_async::<Value>(c).await,
            Conn::Single(c) => wait.query_async::<Value>(c).await,
            Conn::Cluster(c) => {
                route_to_primary(c, wait, Route::with_key(key, SlotAddr::Master)).await
            }
            Conn::Writer(w) => {
                route_to_primary(
                    &mut w.connection,
                    wait,
                    Route::with_key(key, SlotAddr::Master),
                )
                .await
            }
        }
        .map_err(|e| self.redis_error(e))?;
        let confirmed: u64 =
            redis::from_redis_value(reply).map_err(|e| self.redis_error(e.into()))?;
        self.release(conn);
        if confirmed < u64::from(replication.min_replicas) {
            return Err(StoreError::NotReplicated {
                confirmed,
                required: replication.min_replicas,
            });
        }
        Ok(())
    }

    /// Hands a cluster writer connection that answered back for the next write.
    fn release(&self, conn: Conn) {
        if let (Backend::Cluster(cluster), Conn::Writer(writer)) = (&self.backend, conn) {
            cluster.give_back(writer);
        }
    }

    /// Classifies a command's error; in cluster mode a connection-level failure also drops
    /// the cluster connection, so the next command starts afresh.
    fn redis_error(&self, e: RedisError) -> StoreError {
        let connection_lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error();
        match &self.backend {
            Backend::Cluster(cluster) if connection_lost || stale_topology(&e) => {
                cluster.forget_connection()
            }
            Backend::Single(single) if connection_lost => single.forget_connection(),
            _ => {}
        }
        redis_error(e)
    }

    /// The body digest a remembered token key holds (`stored`: its `GET`).
    fn seen_body(
        &self,
        client_key: &ClientKey,
        stored: Option<Value>,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let stored: Option<String> = match stored {
            Some(value) => {
                redis::from_redis_value(value).map_err(|e| self.redis_error(e.into()))?
            }
            None => None,
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        let mut body_digest = [0u8; 32];
        hex::decode_to_slice(stored.as_bytes(), &mut body_digest).map_err(|_| {
            StoreError::Corrupt(format!(
                "a remembered token of installation {client_key} holds no valid digest"
            ))
        })?;
        Ok(Some(body_digest))
    }

    /// Runs [`COMMIT_SCRIPT`] for `commit`, indexing `site` first if given (one Redis only),
    /// and confirms the write as configured (`WAIT`).
    async fn run_commit(
        &self,
        commit: Commit<'_>,
        site: Option<SiteEntry<'_>>,
    ) -> Result<Written, StoreError> {
        let client_key = &commit.record.client_key;
        let new_version = commit.expected_version.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the version of installation {client_key} overflows"
            ))
        })?;
        let compact = record::to_compact(record::encode(commit.record, new_version, &self.sealer)?);

        let token = commit.token.filter(|t| t.expires_at > now_unix());
        let installation_key = self.installation_key(client_key);

        let mut invocation = self.commit_script.prepare_invoke();
        invocation
            .key(&installation_key)
            .key(self.secrets_key(client_key))
            .key(match &token {
                Some(t) => self.token_key(client_key, &t.token_digest),
                None => installation_key.clone(),
            });
        invocation.key(match &site {
            Some(site) => self.site_key(site.base_url),
            None => installation_key.clone(),
        });
        if self.is_cluster() {
            // Index first: a stale entry is harmless (readers re-check), a record its
            // identities do not find is not.
            self.index_forge(commit.record).await?;
        } else {
            for identity in ForgeIdentity::of(commit.record) {
                invocation.key(self.forge_key(&identity));
            }
        }
        let site_step = match site.map(|s| s.assumed_others) {
            None => "",
            Some(None) => "any",
            Some(Some(false)) => "0",
            Some(Some(true)) => "1",
        };
        invocation
            .arg(commit.expected_version.to_string())
            .arg(self.channel())
            .arg(client_key.as_str())
            .arg(new_version.to_string())
            .arg(
                token
                    .map(|t| hex::encode(t.body_digest))
                    .unwrap_or_default(),
            )
            .arg(token.map(|t| t.expires_at).unwrap_or(0))
            .arg(site_step)
            .arg(now_millis())
            .arg(compact);

        let mut conn = self.write_conn().await?;
        let written: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let written = match written {
            1 => Written::Yes,
            2 => Written::SiteDiffers,
            _ => Written::Conflict,
        };
        if written != Written::Yes {
            self.release(conn);
            return Ok(written);
        }
        // The script published the clientKey.
        crate::monitoring::invalidation_sent();
        self.confirm_write(conn, &installation_key).await?;
        Ok(written)
    }

    /// Every clientKey whose installation hash a `SCAN` of `conn` finds, added to `found`. In
    /// a cluster the `SCAN` goes to the primary serving `slot`.
    async fn scan_into(
        &self,
        conn: &mut Conn,
        slot: Option<u16>,
        found: &mut BTreeSet<ClientKey>,
    ) -> Result<(), StoreError> {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = self.scan_step(conn, slot, cursor, SCAN_COUNT).await?;
            found.extend(keys);
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One `SCAN` step of `conn` from `cursor` (in a cluster: of the primary serving `slot`):
    /// the next cursor (0 once done) and the clientKeys of the installation hashes it found.
    async fn scan_step(
        &self,
        conn: &mut Conn,
        slot: Option<u16>,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<ClientKey>), StoreError> {
        let head = format!("{}:{{", self.prefix);
        const TAIL: &str = "}:installation";
        let pattern = format!("{}*{TAIL}", glob_escape(&head));
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(count);
        let reply = match (slot, &mut *conn) {
            (Some(slot), Conn::Cluster(c)) => {
                route_to_primary(c, scan, Route::new(slot, SlotAddr::Master))
                    .await
                    .map_err(|e| self.redis_error(e))?
            }
            _ => scan
                .query_async::<Value>(&mut *conn)
                .await
                .map_err(|e| self.redis_error(e))?,
        };
        let (next, keys): (u64, Vec<Vec<u8>>) =
            redis::from_redis_value(reply).map_err(|e| self.redis_error(e.into()))?;
        let client_keys = keys
            .iter()
            .filter_map(|key| {
                // Keys of other applications sharing the server are skipped, not reported.
                let key = std::str::from_utf8(key).ok()?;
                let inner = key.strip_prefix(&head)?.strip_suffix(TAIL)?;
                ClientKey::parse(inner).ok()
            })
            .collect();
        Ok((next, client_keys))
    }

    /// One slot served by each primary of the cluster `conn` speaks to.
    async fn primaries(&self, cluster: &mut ClusterConnection) -> Result<Vec<u16>, StoreError> {
        let reply = cluster
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(|e| self.redis_error(e))?;
        let nodes: String =
            redis::from_redis_value(reply).map_err(|e| self.redis_error(e.into()))?;
        let slots = slot_per_primary(&nodes);
        if slots.is_empty() {
            return Err(StoreError::unavailable(ConfigError(
                "CLUSTER NODES names no primary serving a slot".into(),
            )));
        }
        Ok(slots)
    }

    /// The installations of `keys`. One Redis: one transaction reading them all (each record
    /// whole, as `load` reads it); a cluster: `load`s of their own, many at once on its
    /// multiplexed connection (a transaction may not span slots).
    async fn load_listed(
        &self,
        conn: &mut Conn,
        keys: Vec<ClientKey>,
    ) -> Result<Vec<Listed>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut listed = Vec::with_capacity(keys.len());
        if let Conn::Cluster(_) = conn {
            use futures_util::StreamExt as _;
            let mut loads = futures_util::stream::iter(keys)
                .map(|client_key| async move {
                    let record = self.load(&client_key).await;
                    (client_key, record)
                })
                .buffered(CLUSTER_LISTING_LOADS);
            while let Some((client_key, record)) = loads.next().await {
                match record {
                    Ok(Some(record)) => listed.push(Listed {
                        client_key,
                        record: Ok(record),
                    }),
                    Ok(None) => {}
                    Err(StoreError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                    Err(e) => listed.push(Listed {
                        client_key,
                        record: Err(e),
                    }),
                }
            }
            return Ok(listed);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for client_key in &keys {
            pipe.hgetall(self.installation_key(client_key)).lrange(
                self.secrets_key(client_key),
                0,
                -1,
            );
        }
        let replies: Vec<Value> = pipe
            .query_async(conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let mut replies = replies.into_iter();
        for client_key in keys {
            let (Some(fields), Some(secrets)) = (replies.next(), replies.next()) else {
                return Err(StoreError::Corrupt(
                    "Redis answered fewer replies than it was asked for".into(),
                ));
            };
            let fields: HashMap<String, Vec<u8>> =
                redis::from_redis_value(fields).map_err(|e| self.redis_error(e.into()))?;
            let secrets: Vec<Vec<u8>> =
                redis::from_redis_value(secrets).map_err(|e| self.redis_error(e.into()))?;
            // Gone between the `SCAN` and the read.
            if fields.is_empty() {
                continue;
            }
            let record = decode(&client_key, fields, secrets, &self.sealer);
            listed.push(Listed { client_key, record });
        }
        Ok(listed)
    }
}

/// The steps of a listing ([`InstallationStore::scan_installations`]).
impl RedisStore {
    async fn single_step(
        &self,
        conn: &mut Conn,
        cursor: u64,
    ) -> Result<(Vec<ClientKey>, Option<ScanCursor>), StoreError> {
        let (next, keys) = self
            .scan_step(conn, None, cursor, LISTING_SCAN_COUNT)
            .await?;
        Ok((
            keys,
            (next != 0).then_some(ScanCursor(ScanPosition::Redis(next))),
        ))
    }

    /// One `SCAN` step of the primary at `index`; after its last step the next primary's
    /// first.
    async fn cluster_step(
        &self,
        conn: &mut Conn,
        primaries: Vec<u16>,
        index: usize,
        cursor: u64,
    ) -> Result<(Vec<ClientKey>, Option<ScanCursor>), StoreError> {
        let Some(&slot) = primaries.get(index) else {
            return Ok((Vec::new(), None));
        };
        let (next, keys) = self
            .scan_step(conn, Some(slot), cursor, LISTING_SCAN_COUNT)
            .await?;
        let (index, cursor) = if next == 0 {
            (index + 1, 0)
        } else {
            (index, next)
        };
        let next = (index < primaries.len()).then_some(ScanCursor(ScanPosition::Cluster {
            primaries,
            index,
            cursor,
        }));
        Ok((keys, next))
    }
}

/// Whether `e` says that the slot map a cluster connection follows is out of date (after a
/// failover): redis-rs follows a plain `MOVED` itself, but not one inside a transaction (the
/// `load` reads), which comes back as `EXECABORT`, so the connection would stay stale.
fn stale_topology(e: &RedisError) -> bool {
    use redis::ServerErrorKind as Kind;
    e.clone().into_server_errors().is_some_and(|errors| {
        errors.iter().any(|(_, error)| {
            matches!(
                error.kind(),
                Some(
                    Kind::Moved
                        | Kind::Ask
                        | Kind::TryAgain
                        | Kind::ClusterDown
                        | Kind::MasterDown
                        | Kind::ReadOnly
                )
            )
        })
    })
}

/// Sends `cmd` to the node of `route` (a slot's primary).
async fn route_to_primary(
    connection: &mut ClusterConnection,
    cmd: Cmd,
    route: Route,
) -> redis::RedisResult<Value> {
    connection
        .route_command(
            cmd,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
        )
        .await
}

fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        return Err(StoreError::unavailable(ConfigError(format!(
            "the Redis key prefix {prefix:?} must be non-empty and must not contain braces (they are hash tags)"
        ))));
    }
    Ok(())
}

/// One slot served by each primary of a cluster, from a `CLUSTER NODES` reply: routing a
/// command by that slot reaches that primary, whatever address the nodes announce. Primaries
/// without slots hold no keys and are left out.
fn slot_per_primary(cluster_nodes: &str) -> Vec<u16> {
    let mut out = Vec::new();
    for line in cluster_nodes.lines() {
        // `<id> <ip:port@cport> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(flags) = fields.get(2) else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") {
            continue;
        }
        // A slot is `n` or `from-to`; `[n->-id]`/`[n-<-id]` are migrations, not ownership.
        let first_slot = fields
            .iter()
            .skip(8)
            .filter(|f| !f.starts_with('['))
            .find_map(|f| f.split('-').next().and_then(|n| n.parse::<u16>().ok()));
        if let Some(slot) = first_slot {
            out.push(slot);
        }
    }
    out
}

fn redis_error(e: RedisError) -> StoreError {
    if e.code() == Some("WRONGTYPE") {
        StoreError::Corrupt("a Redis key of the installation store holds the wrong type".into())
    } else {
        StoreError::unavailable(e)
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The hash field of the record in its compact form (the field `version` beside it).
const RECORD_FIELD: &str = "record";

/// When a site index entry is first written: its score (ties sort by clientKey).
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What [`COMMIT_SCRIPT`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    Conflict,
    SiteDiffers,
}

/// Escapes the glob characters of `SCAN MATCH` so the prefix matches literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Rebuilds an installation from its hash fields (and, in the old layout, its secret list).
fn decode(
    client_key: &ClientKey,
    mut fields: HashMap<String, Vec<u8>>,
    secrets: Vec<Vec<u8>>,
    sealer: &Sealer,
) -> Result<Installation, StoreError> {
    if let Some(compact) = fields.remove(RECORD_FIELD) {
        let version = fields
            .get("version")
            .and_then(|v| serde_json::from_slice(v).ok())
            .ok_or_else(|| {
                StoreError::Corrupt(format!("installation {client_key} has no valid version"))
            })?;
        // A parse error could quote a secret: only say which record is broken.
        let stored = record::from_compact(&compact, version).ok_or_else(|| {
            StoreError::Corrupt(format!("installation {client_key} is not valid JSON"))
        })?;
        return record::decode(client_key, stored.fields, stored.secrets, sealer);
    }
    // The old layout: one field per attribute, the secrets in a list of their own.
    let mut object = serde_json::Map::with_capacity(fields.len());
    for (name, raw) in fields {
        let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| {
            StoreError::Corrupt(format!(
                "field {name:?} of installation {client_key} is not JSON"
            ))
        })?;
        object.insert(name, value);
    }
    let entries = secrets
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            // The parse error could quote the secret: only say which entry is broken.
            serde_json::from_slice(raw).map_err(|_| {
                StoreError::Corrupt(format!(
                    "secret entry {i} of installation {client_key} is not valid"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    record::decode(client_key, object, entries, sealer)
}

#[async_trait]
impl InstallationStore for RedisStore {
    async fn load(&self, client_key: &ClientKey) -> Result<Option<Installation>, StoreError> {
        let mut conn = self.conn().await?;
        let (fields, secrets): (HashMap<String, Vec<u8>>, Vec<Vec<u8>>) = redis::pipe()
            .atomic()
            .hgetall(self.installation_key(client_key))
            .lrange(self.secrets_key(client_key), 0, -1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode(client_key, fields, secrets, &self.sealer).map(Some)
    }

    async fn seen_token(
        &self,
        client_key: &ClientKey,
        token_digest: &[u8; 32],
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let mut conn = self.conn().await?;
        let stored: Value = redis::cmd("GET")
            .arg(self.token_key(client_key, token_digest))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        self.seen_body(client_key, Some(stored))
    }

    async fn commit(&self, commit: Commit<'_>) -> Result<CommitOutcome, StoreError> {
        Ok(match self.run_commit(commit, None).await? {
            Written::Yes => CommitOutcome::Committed,
            Written::Conflict | Written::SiteDiffers => CommitOutcome::Conflict,
        })
    }

    async fn commit_on_site(
        &self,
        commit: Commit<'_>,
        site: SiteEntry<'_>,
    ) -> Result<SiteCommitOutcome, StoreError> {
        if self.is_cluster() {
            // The site index is in another slot than the tenant's keys: no one script.
            return super::commit_on_site_in_steps(self, commit, site).await;
        }
        Ok(match self.run_commit(commit, Some(site)).await? {
            Written::Yes => SiteCommitOutcome::Committed,
            Written::Conflict => SiteCommitOutcome::Conflict,
            Written::SiteDiffers => SiteCommitOutcome::SiteDiffers {
                others: !site.assumed_others.unwrap_or_default(),
            },
        })
    }

    async fn load_with_token(
        &self,
        client_key: &ClientKey,
        token_digest: Option<&[u8; 32]>,
    ) -> Result<(Option<Installation>, Option<[u8; 32]>), StoreError> {
        let mut read = redis::pipe();
        read.atomic()
            .hgetall(self.installation_key(client_key))
            .lrange(self.secrets_key(client_key), 0, -1);
        if let Some(digest) = token_digest {
            read.get(self.token_key(client_key, digest));
        }
        let mut conn = self.conn().await?;
        let mut replies: Vec<Value> = read
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let seen = match token_digest {
            Some(_) => self.seen_body(client_key, replies.pop())?,
            None => None,
        };
        let (fields, secrets): (HashMap<String, Vec<u8>>, Vec<Vec<u8>>) =
            redis::from_redis_value(Value::Array(replies))
                .map_err(|e| self.redis_error(e.into()))?;
        if fields.is_empty() {
            return Ok((None, seen));
        }
        decode(client_key, fields, secrets, &self.sealer).map(|r| (Some(r), seen))
    }

    async fn reconfirm(&self, client_key: &ClientKey, token: &SeenToken) -> Result<(), StoreError> {
        if self.replication.is_none() {
            return Ok(());
        }
        // Writing the token key again (same value, same expiry) moves this connection's
        // replication offset past every earlier write of this primary, so the `WAIT` that
        // follows covers the first attempt's writes too.
        let key = self.token_key(client_key, &token.token_digest);
        let mut conn = self.write_conn().await?;
        let _: Value = redis::cmd("SET")
            .arg(&key)
            .arg(hex::encode(token.body_digest))
            .arg("EXAT")
            .arg(token.expires_at)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        self.confirm_write(conn, &key).await
    }

    async fn index_site(
        &self,
        base_url: &BaseUrl,
        client_key: &ClientKey,
    ) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        // The first indexing fixes the position (NX); ties sort by clientKey, the same for all.
        let first_indexed_ms = now_millis();
        let site_key = self.site_key(base_url);
        let _: i64 = redis::cmd("ZADD")
            .arg(&site_key)
            .arg("NX")
            .arg(first_indexed_ms)
            .arg(client_key.as_str())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        self.confirm_write(conn, &site_key).await
    }

    async fn client_keys_for_forge(
        &self,
        identity: &ForgeIdentity,
    ) -> Result<Vec<ClientKey>, StoreError> {
        let mut conn = self.conn().await?;
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.forge_key(identity))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        members
            .iter()
            .map(|m| {
                ClientKey::parse(m).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "the Forge identity index of {} holds an invalid clientKey",
                        identity.index_name()
                    ))
                })
            })
            .collect()
    }

    async fn index_forge(&self, record: &Installation) -> Result<(), StoreError> {
        for identity in ForgeIdentity::of(record) {
            let key = self.forge_key(&identity);
            let mut conn = self.write_conn().await?;
            let _: i64 = redis::cmd("SADD")
                .arg(&key)
                .arg(record.client_key.as_str())
                .query_async(&mut conn)
                .await
                .map_err(|e| self.redis_error(e))?;
            self.confirm_write(conn, &key).await?;
        }
        Ok(())
    }

    async fn client_keys_for_site(&self, base_url: &BaseUrl) -> Result<Vec<ClientKey>, StoreError> {
        let mut conn = self.conn().await?;
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.site_key(base_url))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        let keys = members
            .iter()
            .map(|m| {
                ClientKey::parse(m).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "the site index of {base_url} holds an invalid clientKey"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(keys)
    }

    async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
        let mut conn = self.conn().await?;
        let mut found = BTreeSet::new();
        match &mut conn {
            Conn::Shared(..) | Conn::Single(_) | Conn::Writer(_) => {
                self.scan_into(&mut conn, None, &mut found).await?
            }
            Conn::Cluster(cluster) => {
                // Every primary holds its own slots: SCAN each of them.
                for slot in self.primaries(cluster).await? {
                    self.scan_into(&mut conn, Some(slot), &mut found).await?;
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    async fn scan_installations(&self, cursor: ScanCursor) -> Result<InstallationPage, StoreError> {
        let mut conn = self.conn().await?;
        let (keys, next) = match (cursor.0, &mut conn) {
            (ScanPosition::Start, Conn::Cluster(cluster)) => {
                let primaries = self.primaries(cluster).await?;
                self.cluster_step(&mut conn, primaries, 0, 0).await?
            }
            (
                ScanPosition::Cluster {
                    primaries,
                    index,
                    cursor,
                },
                Conn::Cluster(_),
            ) => {
                self.cluster_step(&mut conn, primaries, index, cursor)
                    .await?
            }
            // `conn` hands out the shared connection of one Redis, never a pooled one.
            (ScanPosition::Start, Conn::Shared(..) | Conn::Single(_)) => {
                self.single_step(&mut conn, 0).await?
            }
            (ScanPosition::Redis(cursor), Conn::Shared(..) | Conn::Single(_)) => {
                self.single_step(&mut conn, cursor).await?
            }
            (other, _) => {
                return Err(StoreError::Corrupt(format!(
                    "a listing cursor of another store: {other:?}"
                )))
            }
        };
        Ok(InstallationPage {
            installations: self.load_listed(&mut conn, keys).await?,
            next,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        // A cluster answers from every node.
        let _: Value = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(())
    }

    async fn remember_install_key(&self, url: &str, entry: &str) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let _: Value = redis::cmd("HSET")
            .arg(self.install_keys_key())
            .arg(url)
            .arg(entry)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(())
    }

    async fn forget_install_key(&self, url: &str) -> Result<(), StoreError> {
        let mut conn = self.write_conn().await?;
        let _: Value = redis::cmd("HDEL")
            .arg(self.install_keys_key())
            .arg(url)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(())
    }

    async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn().await?;
        let keys: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.install_keys_key())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(keys.into_iter().collect())
    }

    async fn keep_forge_token(
        &self,
        installation: &InstallationId,
        token: &ForgeAppToken,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let written: i64 = FORGE_TOKEN
            .key(self.forge_token_key(installation))
            .arg(token.expires_at)
            .arg(hex::encode(token.digest()))
            .arg(forge_token::encode(installation, token, &self.sealer))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        Ok(written == 1)
    }

    async fn forge_token(
        &self,
        installation: &InstallationId,
    ) -> Result<Option<ForgeAppToken>, StoreError> {
        let mut conn = self.conn().await?;
        let stored: Option<String> = redis::cmd("HGET")
            .arg(self.forge_token_key(installation))
            .arg("value")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_error(e))?;
        stored
            .map(|raw| forge_token::decode(installation, &raw, &self.sealer))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_primary_serving_slots() {
        let nodes = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected [10923->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1] 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0 2-5460
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master - 0 1426238316232 5 connected
";
        assert_eq!(slot_per_primary(nodes), vec![5461, 10923, 0]);
        assert!(slot_per_primary("").is_empty());
    }

    #[test]
    fn seed_urls_split_on_commas() {
        assert_eq!(
            seed_urls(" redis://a:1 ,redis://b:2,,"),
            vec!["redis://a:1", "redis://b:2"]
        );
    }
}
