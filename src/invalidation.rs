//! "Many instances, one store": every `warden` instance sharing a Redis honours a lifecycle
//! write made by any of them (roll, uninstall, disable, site import) within a second of the
//! write, whatever the outage before it (docs/PROTOCOL.md §10).
//!
//! The Redis store's commit script publishes the written clientKey on `<prefix>:invalidate`
//! ([`channel`]). Each instance runs one [`Listener`]: a background task subscribed to that
//! channel, which drops the clientKey from its [`TenantCache`] for every message. The listener
//! also tells the cache whether it is subscribed ([`Subscription`]): from its start until the
//! first `SUBSCRIBE` succeeds, and from a lost subscription (closed, or silent: a `PING` every
//! second must be answered within a second) until the next one, the cache serves nothing from
//! memory and reads the store instead, since messages sent meanwhile are lost. It reconnects
//! with a bounded backoff (100 ms doubling to 1 s, less up to 20 % jitter) and, once subscribed
//! again, drops the whole cache before serving from it.
//! Should even that fail, cached entries still expire after `WARDEN_SECRET_CACHE_TTL_SECONDS`.
//!
//! Other code that caches per tenant (the host client's impersonation tokens) follows along
//! through [`Invalidations::subscribe`]: the tenant cache announces there every entry it drops,
//! whether the cause was a message from Redis or a lifecycle write of this instance. With
//! Redis an own write is announced twice (locally, then echoed by Redis); dropping twice is
//! harmless.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rand::Rng as _;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::tenants::{Subscription, TenantCache};
use connect_protocol::domain::ClientKey;

/// First wait before reconnecting; doubled after each failure up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between attempts. While not subscribed every lookup reads the store, so this
/// bounds that extra load after an outage, not the staleness (which the read-through bounds).
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Bound on connecting and subscribing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the subscription is checked with `PING`: a connection that died without a reset
/// (network partition, half-open) is noticed within this plus [`PING_TIMEOUT`], about 2 s
/// instead of the 12 s of a 10 s interval. Costs one tiny round trip per second per instance.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on the answer to a health `PING`; Redis answers in well under a millisecond.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Capacity of the local announcement channel; a subscriber that falls further behind gets
/// `RecvError::Lagged` and must treat it as [`Invalidation::All`].
const ANNOUNCEMENT_CAPACITY: usize = 1024;

/// The invalidation channel for a Redis key prefix: the store publishes on it, the
/// [`Listener`] subscribes to it.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:invalidate")
}

/// What cached data to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// This installation changed (roll, uninstall, enable/disable, superseded by an import).
    Tenant(ClientKey),
    /// Anything may have changed: messages may have been lost.
    All,
}

impl Invalidation {
    /// Whether cached data of `client_key` must be dropped.
    pub fn covers(&self, client_key: &ClientKey) -> bool {
        match self {
            Invalidation::Tenant(k) => k == client_key,
            Invalidation::All => true,
        }
    }
}

/// Local announcements of invalidations. Cheap to clone; every clone announces to the same
/// subscribers.
///
/// ```ignore
/// let mut events = state.invalidations.subscribe();
/// tokio::spawn(async move {
///     loop {
///         match events.recv().await {
///             Ok(Invalidation::Tenant(key)) => tokens.remove(&key),
///             Ok(Invalidation::All) | Err(RecvError::Lagged(_)) => tokens.clear(),
///             Err(RecvError::Closed) => break,
///         }
///     }
/// });
/// ```
#[derive(Debug, Clone)]
pub struct Invalidations {
    tx: broadcast::Sender<Invalidation>,
}

impl Invalidations {
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(ANNOUNCEMENT_CAPACITY).0,
        }
    }

    /// Every invalidation announced from now on. On `RecvError::Lagged`, drop everything.
    pub fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.tx.subscribe()
    }

    /// Calls `on` for every invalidation announced from now on, on a task of the current
    /// runtime that ends once every [`Invalidations`] clone is dropped. A lag (more than
    /// 1024 announcements behind) is reported as [`Invalidation::All`]. E.g. for the host
    /// client: `invalidations.forward_to(move |i| match i { Tenant(k) => c.forget_tenant(&k),
    /// All => c.forget_all() })`.
    pub fn forward_to(&self, mut on: impl FnMut(Invalidation) + Send + 'static) -> JoinHandle<()> {
        let mut events = self.subscribe();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(invalidation) => on(invalidation),
                    Err(broadcast::error::RecvError::Lagged(_)) => on(Invalidation::All),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    /// Announces `invalidation` to every subscriber (none is fine).
    pub fn notify(&self, invalidation: Invalidation) {
        let _ = self.tx.send(invalidation);
    }
}

impl Default for Invalidations {
    fn default() -> Self {
        Self::new()
    }
}

/// The running subscription task. Dropping it stops the task (and closes its connection).
#[derive(Debug)]
pub struct Listener {
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts listening on `channel` of the Redis at `url` for the clientKeys to drop from
    /// `tenants`, which is not subscribed from now until the first `SUBSCRIBE` succeeds. Fails
    /// only if `url` is not a valid Redis URL; an unreachable Redis is retried in the
    /// background. Must be called within a tokio runtime.
    pub fn start(url: &str, channel: String, tenants: TenantCache) -> anyhow::Result<Self> {
        Self::start_on_any(&[url], channel, tenants)
    }

    /// Like [`start`](Self::start), for a Redis Cluster known by its seed node URLs: `PUBLISH`
    /// reaches every node of a cluster, so one subscription on any node hears every commit.
    /// Subscribes to the first seed that answers; after a loss, tries the seeds in order again,
    /// starting with the one that worked last.
    pub fn start_on_any(
        urls: &[&str],
        channel: String,
        tenants: TenantCache,
    ) -> anyhow::Result<Self> {
        if urls.is_empty() {
            anyhow::bail!("no Redis URL given");
        }
        let clients = urls
            .iter()
            .map(|url| {
                // The URL may hold a password: the error names only its kind.
                redis::Client::open(*url)
                    .map_err(|e| anyhow::anyhow!("the Redis URL is not valid ({:?})", e.kind()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Writes made elsewhere go unheard until subscribed.
        tenants.set_subscription(Subscription::NotSubscribed);
        let task = tokio::spawn(listen(clients, channel, tenants));
        Ok(Self { task })
    }

    /// Whether the task has ended (it only does when aborted, or if it panicked).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn listen(clients: Vec<redis::Client>, channel: String, tenants: TenantCache) {
    let mut backoff = INITIAL_BACKOFF;
    let mut failures: u32 = 0;
    // The seed tried first: the one that worked last.
    let mut first = 0;
    // Whether a subscription was made (and so lost) before: the next one is a reconnect.
    let mut lost_before = false;
    crate::monitoring::invalidation_subscription(false, false);
    loop {
        match subscribe_any(&clients, &mut first, &channel).await {
            Ok(pubsub) => {
                // Whatever was published while we were not subscribed is lost: the cache drops
                // everything, then serves again.
                tenants.set_subscription(Subscription::Subscribed);
                crate::monitoring::invalidation_subscription(true, lost_before);
                lost_before = true;
                if failures > 0 {
                    tracing::info!(%channel, failed_attempts = failures, "invalidation channel subscribed again; tenant cache cleared");
                } else {
                    tracing::debug!(%channel, "invalidation channel subscribed");
                }
                failures = 0;
                let since = Instant::now();
                let reason = receive(pubsub, &tenants).await;
                // Messages may already be lost (a half-open connection drops them silently),
                // and more will be until subscribed again: read the store from now on, and
                // announce the drop now (for the other per-tenant caches) rather than at the
                // reconnect, which a partition can delay indefinitely.
                tenants.set_subscription(Subscription::NotSubscribed);
                crate::monitoring::invalidation_subscription(false, false);
                tenants.invalidate_all();
                tracing::warn!(%channel, reason = %reason, "invalidation channel lost; tenant cache cleared and bypassed until subscribed; reconnecting");
                if since.elapsed() >= MAX_BACKOFF {
                    // A connection that held for a while starts the backoff afresh; one that
                    // keeps dropping at once keeps backing off.
                    backoff = INITIAL_BACKOFF;
                }
            }
            Err(e) => {
                failures += 1;
                // Not a URL in sight: redis errors name the failure, not the connection info.
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(%channel, error = %e, attempts = failures, retry_in_ms = backoff.as_millis() as u64,
                        "cannot subscribe to the invalidation channel");
                }
            }
        }
        tokio::time::sleep(with_jitter(backoff)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Up to 20 % less, so that instances do not reconnect in lockstep and [`MAX_BACKOFF`] stays
/// the longest wait.
fn with_jitter(d: Duration) -> Duration {
    let max_less = (d.as_millis() as u64 / 5).max(1);
    d.saturating_sub(Duration::from_millis(
        rand::thread_rng().gen_range(0..=max_less),
    ))
}

#[derive(Debug, thiserror::Error)]
enum SubscribeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// Subscribes through the first of `clients` that answers, starting at `first` (updated to
/// the one that did); the error of the last one tried otherwise.
async fn subscribe_any(
    clients: &[redis::Client],
    first: &mut usize,
    channel: &str,
) -> Result<redis::aio::PubSub, SubscribeError> {
    let mut last_error = None;
    for i in 0..clients.len() {
        let index = (*first + i) % clients.len();
        match subscribe(&clients[index], channel).await {
            Ok(pubsub) => {
                *first = index;
                return Ok(pubsub);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or(SubscribeError::Timeout(Duration::ZERO)))
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> Result<redis::aio::PubSub, SubscribeError> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, SubscribeError>(pubsub)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .map_err(|_| SubscribeError::Timeout(CONNECT_TIMEOUT))?
}

/// Drops every clientKey received until the connection ends; returns why it ended.
async fn receive(pubsub: redis::aio::PubSub, tenants: &TenantCache) -> String {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return "the connection closed".into();
                };
                crate::monitoring::invalidation_received();
                let payload = message.get_payload_bytes();
                match std::str::from_utf8(payload).ok().and_then(|s| ClientKey::parse(s).ok()) {
                    Some(client_key) => tenants.invalidate(&client_key).await,
                    None => {
                        // Not ours to interpret: be safe and drop everything.
                        tracing::warn!(len = payload.len(), "invalidation message is not a clientKey; tenant cache cleared");
                        tenants.invalidate_all();
                    }
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("PING failed: {e}"),
                    Err(_) => return format!("no answer to PING within {PING_TIMEOUT:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::RedisStore;

    #[tokio::test]
    async fn the_channel_is_the_one_the_store_publishes_on() {
        // `connect` sends nothing to Redis: no server needed.
        let store = RedisStore::connect("redis://127.0.0.1:1", "warden-x")
            .await
            .unwrap();
        assert_eq!(channel("warden-x"), store.channel());
    }

    #[test]
    fn a_bad_url_is_refused_without_echoing_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let tenants_store: crate::store::SharedStore = std::sync::Arc::new(
            runtime
                .block_on(RedisStore::connect("redis://127.0.0.1:1", "p"))
                .unwrap(),
        );
        let tenants = TenantCache::new(tenants_store, Duration::from_secs(1));
        let err = Listener::start(
            "notredis://user:hunter2@host",
            "p:invalidate".into(),
            tenants,
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn jitter_stays_within_a_fifth_below() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(80) && d <= Duration::from_millis(100),
                "{d:?}"
            );
            assert!(with_jitter(MAX_BACKOFF) <= Duration::from_secs(1));
        }
    }

    /// Until its first `SUBSCRIBE` succeeds (here never: nothing listens on the port), the
    /// listener's cache is not subscribed and so serves nothing from memory.
    #[tokio::test]
    async fn the_cache_is_not_subscribed_until_the_listener_is() {
        let store: crate::store::SharedStore = std::sync::Arc::new(
            RedisStore::connect("redis://127.0.0.1:1", "p")
                .await
                .unwrap(),
        );
        let tenants = TenantCache::new(store, Duration::from_secs(60));
        assert_eq!(tenants.subscription(), Subscription::Subscribed);
        let listener = Listener::start(
            "redis://127.0.0.1:1",
            "p:invalidate".into(),
            tenants.clone(),
        )
        .unwrap();
        assert_eq!(tenants.subscription(), Subscription::NotSubscribed);
        tokio::time::sleep(INITIAL_BACKOFF * 3).await;
        assert_eq!(tenants.subscription(), Subscription::NotSubscribed);
        assert!(!listener.is_finished());
    }

    #[tokio::test]
    async fn forward_to_calls_back_until_the_announcer_is_gone() {
        let invalidations = Invalidations::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = invalidations.forward_to(move |i| tx.send(i).unwrap());
        let key = ClientKey::parse("ck").unwrap();
        invalidations.notify(Invalidation::Tenant(key.clone()));
        invalidations.notify(Invalidation::All);
        assert_eq!(rx.recv().await, Some(Invalidation::Tenant(key)));
        assert_eq!(rx.recv().await, Some(Invalidation::All));
        drop(invalidations);
        task.await.unwrap();
    }

    #[test]
    fn covers() {
        let a = ClientKey::parse("a").unwrap();
        let b = ClientKey::parse("b").unwrap();
        assert!(Invalidation::Tenant(a.clone()).covers(&a));
        assert!(!Invalidation::Tenant(a).covers(&b));
        assert!(Invalidation::All.covers(&b));
    }
}
