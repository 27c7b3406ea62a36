//! "Many instances, one store": two real `warden` processes on one Redis. A lifecycle write
//! processed by instance A (roll, uninstall, disable/enable, site import) is honoured by
//! instance B within one second, also after B lost its subscription to the invalidation
//! channel.
//!
//! B's tenant cache TTL is set to an hour, so only the invalidation can explain B's change of
//! mind within the bounds asserted here. The tests share this binary's private Redis and run
//! one at a time, because one of them kills every pub/sub connection on it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::helpers::app::Site;
use crate::helpers::app::{eventually, Cluster, TestApp};
use connect_protocol::domain::ClientKey;
use connect_protocol::jwt;
use connect_warden::invalidation::{Invalidation, Listener};
use connect_warden::store::redis::RedisStore;
use connect_warden::tenants::TenantCache;

/// The requirement: every instance honours a write within one second.
const WITHIN: Duration = Duration::from_secs(1);

/// After its subscription is killed, the listener waits 100 ms (less up to 20 % jitter) before
/// reconnecting, doubling on each further loss in a row (the test kills it for about 100 ms,
/// so once or twice), subscribes on loopback in a few ms, then drops its whole cache: well
/// under 1 s. 2 s leaves room for a loaded machine.
const RECOVERY_WITHIN: Duration = Duration::from_secs(2);

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A and B on one Redis and prefix, caching tenants for an hour.
async fn two_instances(grace_seconds: &str) -> (Cluster, TestApp, TestApp) {
    let cluster = Cluster::new().await;
    let env = [
        ("WARDEN_SECRET_GRACE_SECONDS", grace_seconds),
        ("WARDEN_SECRET_CACHE_TTL_SECONDS", "3600"),
    ];
    let a = cluster.spawn("A", &env).await;
    let b = cluster.spawn("B", &env).await;
    (cluster, a, b)
}

/// A new site installed through A and cached by B (one successful product request).
async fn installed_on_a_cached_on_b(a: &TestApp, b: &TestApp) -> Site {
    let site = Site::new();
    a.installed(&site).await;
    assert_eq!(
        b.tenant_status(&site, &site.secret).await,
        200,
        "B serves a tenant installed through A"
    );
    site
}

/// The site after Atlassian rolled its secret; returns the old secret too.
fn rolled(site: &Site) -> (Site, String) {
    let mut next = site.clone();
    next.secret = format!("{}-rolled", site.secret);
    (next, site.secret.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_on_one_instance_is_honoured_by_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_instances("1").await;

    // The new secret works on B with the first request after the roll, whether B already
    // heard of the roll or still holds the old secret (then it re-reads the store once, unless
    // its entry was read from the store less than 100 ms ago: see `tenants::FRESH_FOR`).
    let x = installed_on_a_cached_on_b(&a, &b).await;
    let (x, _) = rolled(&x);
    a.installed(&x).await;
    assert_eq!(
        b.tenant_status(&x, &x.secret).await,
        200,
        "B accepts the new secret at once"
    );

    // The old secret, on a token issued after the roll, verifies against what B cached
    // before the roll: only the invalidation makes B refuse it.
    let y = installed_on_a_cached_on_b(&a, &b).await;
    let (y, old) = rolled(&y);
    let issued_before_roll = jwt::now() - 1;
    a.installed(&y).await;
    let rolled_at = Instant::now();
    let took = eventually(
        "B refuses the old secret on a token issued after the roll",
        WITHIN,
        401,
        || b.tenant_status(&y, &old),
    )
    .await;
    eprintln!("B refused the old secret {took:?} after the roll");
    assert_eq!(b.tenant_status(&y, &y.secret).await, 200);

    // With a 1 s grace window, a token issued before the roll with the old secret passes for
    // a moment, then never again. `since` has a resolution of one second, so the window ends
    // between 1 and 2 s after the roll.
    let in_flight = || b.tenant_status_at(&y, &old, issued_before_roll);
    let early = in_flight().await;
    if rolled_at.elapsed() < Duration::from_millis(500) {
        assert_eq!(
            early, 200,
            "a token issued before the roll is accepted within the grace window"
        );
    }
    eventually(
        "B refuses the old secret after the grace window",
        Duration::from_secs(3),
        401,
        in_flight,
    )
    .await;
    assert!(
        rolled_at.elapsed() >= Duration::from_millis(900),
        "refused before the grace window ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstall_on_one_instance_is_honoured_by_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_instances("0").await;
    let site = installed_on_a_cached_on_b(&a, &b).await;
    a.uninstalled(&site).await;
    eventually("B refuses an uninstalled tenant", WITHIN, 403, || {
        b.tenant_status(&site, &site.secret)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_on_one_instance_are_honoured_by_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_instances("0").await;
    let site = installed_on_a_cached_on_b(&a, &b).await;
    a.disabled(&site).await;
    eventually("B refuses a disabled tenant", WITHIN, 403, || {
        b.tenant_status(&site, &site.secret)
    })
    .await;
    a.enabled(&site).await;
    eventually("B serves the tenant enabled again", WITHIN, 200, || {
        b.tenant_status(&site, &site.secret)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_import_on_one_instance_is_honoured_by_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_, a, b) = two_instances("0").await;
    let old = installed_on_a_cached_on_b(&a, &b).await;
    // The imported site: same baseUrl, new clientKey, no uninstall of the old one.
    let mut imported = Site::new();
    imported.base_url = old.base_url.clone();
    a.installed(&imported).await;
    eventually("B refuses the superseded installation", WITHIN, 403, || {
        b.tenant_status(&old, &old.secret)
    })
    .await;
    assert_eq!(b.tenant_status(&imported, &imported.secret).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_recovers_from_a_lost_connection() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (cluster, a, b) = two_instances("0").await;
    let channel = connect_warden::invalidation::channel(&cluster.redis_prefix);
    let mut redis = redis::Client::open(crate::helpers::redis_server::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    wait_for_subscribers(&mut redis, &channel, 2).await;
    let first = installed_on_a_cached_on_b(&a, &b).await;
    let second = installed_on_a_cached_on_b(&a, &b).await;

    // Kill every subscription, and keep killing the new ones, until A has written: the
    // invalidation is published while B is not subscribed, so B never receives it and must
    // drop its whole cache once it is subscribed again.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let stop = stop.clone();
        let mut redis = redis.clone();
        async move {
            let mut killed = 0;
            while !stop.load(Ordering::SeqCst) {
                let n: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                killed += n;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            killed
        }
    });
    wait_for_subscribers(&mut redis, &channel, 0).await;
    a.uninstalled(&first).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::SeqCst);
    let killed = killer.await.unwrap();
    assert!(
        killed >= 2,
        "A's and B's subscriptions are killed (killed {killed})"
    );
    let took = eventually(
        "B honours an uninstall published while it was disconnected",
        RECOVERY_WITHIN,
        403,
        || b.tenant_status(&first, &first.secret),
    )
    .await;
    eprintln!("B honoured the lost message {took:?} after the uninstall");

    // And messages flow again.
    wait_for_subscribers(&mut redis, &channel, 2).await;
    assert_eq!(b.tenant_status(&second, &second.secret).await, 200);
    a.disabled(&second).await;
    eventually(
        "B honours a disable after resubscribing",
        WITHIN,
        403,
        || b.tenant_status(&second, &second.secret),
    )
    .await;
}

/// A TCP proxy whose existing connections can be made silent: bytes are dropped both ways but
/// the sockets stay open (no FIN, no RST), as in a network partition. New connections pass.
struct PartitionProxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    silenced_below: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PartitionProxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let silenced_below = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (accepted, silenced_below) = (accepted.clone(), silenced_below.clone());
            async move {
                loop {
                    let (client, _) = listener.accept().await.unwrap();
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                        .await
                        .unwrap();
                    let id = accepted.fetch_add(1, Ordering::SeqCst);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, id, silenced_below.clone()));
                    tokio::spawn(pump(server_read, client_write, id, silenced_below.clone()));
                }
            }
        });
        Self {
            port,
            accepted,
            silenced_below,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection made so far goes silent.
    fn partition_existing(&self) {
        self.silenced_below.store(self.accepted(), Ordering::SeqCst);
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: usize,
    silenced_below: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if id < silenced_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Waits up to `within` for an announcement `wanted` accepts; returns how long it took.
async fn announced(
    events: &mut tokio::sync::broadcast::Receiver<Invalidation>,
    within: Duration,
    what: &str,
    wanted: impl Fn(&Invalidation) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let left = within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(event)) if wanted(&event) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("announcements failed while waiting for {what}: {e}"),
            Err(_) => panic!("{what}: nothing within {within:?}"),
        }
    }
}

/// A partition that leaves the listener's connection half-open (no reset, messages silently
/// dropped) while a write is published: the listener must notice within about 2 s (PING every
/// second, answered within a second) and drop its cache, not after the 12 s of a 10 s ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_subscription_is_noticed_within_two_seconds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = crate::helpers::redis_server::server();
    let prefix = crate::helpers::redis_server::unique_prefix();
    let channel = connect_warden::invalidation::channel(&prefix);
    let store = RedisStore::connect(&redis.url, &prefix).await.unwrap();
    let tenants = TenantCache::new(Arc::new(store), Duration::from_secs(3600));
    let mut events = tenants.invalidations().subscribe();
    let proxy = PartitionProxy::start(redis.port).await;
    let _listener = Listener::start(&proxy.url(), channel.clone(), tenants.clone()).unwrap();
    let publisher = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let publish = |key: &'static str| {
        let (mut publisher, channel) = (publisher.clone(), channel.clone());
        async move {
            let receivers: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(key)
                .query_async(&mut publisher)
                .await
                .unwrap();
            receivers
        }
    };
    let tenant = |key: &'static str| {
        let key = ClientKey::parse(key).unwrap();
        move |event: &Invalidation| *event == Invalidation::Tenant(key.clone())
    };
    let all = |event: &Invalidation| *event == Invalidation::All;

    announced(&mut events, RECOVERY_WITHIN * 5, "first subscription", all).await;
    assert_eq!(publish("ck-before").await, 1);
    announced(
        &mut events,
        WITHIN,
        "a message through the proxy",
        tenant("ck-before"),
    )
    .await;

    // The partition: the write is published, Redis hands it to the silent connection, and it
    // never arrives. Only noticing the dead connection can make the listener honour it.
    proxy.partition_existing();
    let partitioned_at = Instant::now();
    assert_eq!(
        publish("ck-lost").await,
        1,
        "Redis still sees the subscriber"
    );
    let took = announced(
        &mut events,
        Duration::from_secs(3),
        "the listener drops its cache after its connection went silent",
        all,
    )
    .await;
    eprintln!("half-open subscription noticed {took:?} after the partition");
    assert!(partitioned_at.elapsed() < Duration::from_secs(3));

    // It subscribes again through a new connection, and messages flow again.
    let deadline = Instant::now() + RECOVERY_WITHIN * 2;
    while proxy.accepted() < 2 {
        assert!(Instant::now() < deadline, "the listener did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + RECOVERY_WITHIN * 2;
    loop {
        // Until the new subscription has registered, the message may reach only the silent one.
        publish("ck-after").await;
        let event = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
        if matches!(event, Ok(Ok(Invalidation::Tenant(ref k))) if k.as_str() == "ck-after") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages do not flow after the reconnect"
        );
    }
}

/// Waits (bounded) until exactly `count` connections are subscribed to `channel`.
async fn wait_for_subscribers(
    redis: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    count: i64,
) {
    let deadline = Instant::now() + RECOVERY_WITHIN * 5;
    loop {
        let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(redis)
            .await
            .unwrap();
        if subscribers == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {subscribers} of {count} instances subscribed to {channel}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
