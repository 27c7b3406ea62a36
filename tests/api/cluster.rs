//! `warden` on a Redis Cluster: a private cluster of three primaries (no replicas) on free
//! loopback ports (`crate::helpers::redis_server::cluster`), shared by the tests of this binary, each
//! with its own key prefix. The store's behavioural suite also runs against it in
//! `tests/store.rs`; here: tenants spread over every node, invalidations published on one node
//! heard on every node, and the real app (one instance, then two) on the cluster.

use crate::helpers::store::commit;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::helpers::app::eventually;
use crate::helpers::app::{spawn_app_with, Backend, Options, Site, TestApp};
use crate::helpers::redis_server::{self, RedisCluster};
use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_warden::store::redis::RedisStore;
use connect_warden::store::{
    CommitOutcome, Installation, InstallationStore, SeenToken, StoreError,
};
use futures_util::StreamExt as _;

/// The requirement: every instance honours a write within one second.
const WITHIN: Duration = Duration::from_secs(1);

fn cluster() -> &'static RedisCluster {
    redis_server::cluster()
}

async fn cluster_store(prefix: &str) -> RedisStore {
    let seeds: Vec<&str> = cluster().urls.iter().map(String::as_str).collect();
    let store = RedisStore::connect_cluster(&seeds, prefix)
        .await
        .expect("connect");
    assert!(store.is_cluster());
    store
}

fn record(client_key: &str) -> Installation {
    Installation::new(
        ClientKey::parse(client_key).unwrap(),
        BaseUrl::parse("https://acme.atlassian.net").unwrap(),
        "jira",
        SharedSecret::parse(&format!("secret-of-{client_key}")).unwrap(),
        true,
        1_700_000_000,
    )
}

/// A plain connection to one node (not cluster-aware).
async fn node(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The installation hashes of `prefix` that the node at `url` itself holds.
async fn installations_on_node(url: &str, prefix: &str) -> usize {
    let mut conn = node(url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*:installation"))
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.len()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_spread_over_every_node_and_all_are_listed() {
    let prefix = redis_server::unique_prefix();
    let store = cluster_store(&prefix).await;
    let keys: Vec<String> = (0..24).map(|n| format!("jira:tenant-{n}")).collect();
    for key in &keys {
        let token = SeenToken {
            token_digest: [3; 32],
            body_digest: [4; 32],
            expires_at: now_unix() + 600,
        };
        assert_eq!(
            commit(&store, &record(key), 0, Some(token)).await,
            CommitOutcome::Committed
        );
        // A stale writer loses on every node alike.
        assert_eq!(
            commit(&store, &record(key), 0, None).await,
            CommitOutcome::Conflict
        );
    }
    for key in &keys {
        let client_key = ClientKey::parse(key).unwrap();
        let loaded = store.load(&client_key).await.unwrap().expect("stored");
        assert_eq!(loaded.version, 1);
        assert_eq!(
            loaded.current_secret().secret.expose(),
            format!("secret-of-{key}")
        );
        assert_eq!(
            store.seen_token(&client_key, &[3; 32]).await.unwrap(),
            Some([4; 32])
        );
    }

    // The tenants really are spread: every primary holds some of them.
    let mut per_node = Vec::new();
    for url in &cluster().urls {
        per_node.push(installations_on_node(url, &prefix).await);
    }
    assert!(per_node.iter().all(|n| *n > 0), "per node: {per_node:?}");
    assert_eq!(per_node.iter().sum::<usize>(), keys.len());

    // SCAN of every primary finds all of them, once each.
    let listed = store.list_client_keys().await.unwrap();
    let expected: BTreeSet<ClientKey> = keys.iter().map(|k| ClientKey::parse(k).unwrap()).collect();
    assert_eq!(listed.len(), keys.len());
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), expected);

    // Site indexes live in slots of their own; their order holds.
    let site = BaseUrl::parse("https://spread.atlassian.net").unwrap();
    for key in keys.iter().rev().take(3) {
        store
            .index_site(&site, &ClientKey::parse(key).unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let indexed: Vec<String> = store
        .client_keys_for_site(&site)
        .await
        .unwrap()
        .iter()
        .map(|k| k.as_str().to_owned())
        .collect();
    assert_eq!(
        indexed,
        keys.iter().rev().take(3).cloned().collect::<Vec<_>>()
    );
    store.ping().await.unwrap();
}

/// In a Redis Cluster `PUBLISH` (also from the commit script, on the node owning the tenant's
/// slot) is forwarded to every node: a subscriber on any single node hears every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_any_node_is_heard_on_every_node() {
    let prefix = redis_server::unique_prefix();
    let store = cluster_store(&prefix).await;
    let mut subscriptions = Vec::new();
    for url in &cluster().urls {
        let mut pubsub = redis::Client::open(url.as_str())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe(store.channel()).await.unwrap();
        subscriptions.push(pubsub);
    }
    let keys: Vec<String> = (0..9).map(|n| format!("jira:published-{n}")).collect();
    for key in &keys {
        assert_eq!(
            commit(&store, &record(key), 0, None).await,
            CommitOutcome::Committed
        );
    }
    // Messages published on different nodes may arrive in any order.
    let expected: BTreeSet<String> = keys.iter().cloned().collect();
    for (i, pubsub) in subscriptions.iter_mut().enumerate() {
        let mut messages = pubsub.on_message();
        let mut heard = BTreeSet::new();
        while heard.len() < keys.len() {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .unwrap_or_else(|_| panic!("node {i}: heard only {heard:?} within 5 s"))
                .expect("the subscription is open");
            assert_eq!(message.get_channel_name(), store.channel());
            heard.insert(message.get_payload::<String>().unwrap());
        }
        assert_eq!(heard, expected, "node {i}");
    }
}

#[tokio::test]
async fn a_cluster_that_is_down_is_unavailable_quickly_not_a_failed_start() {
    // One seed refuses connections, the other accepts them and never says a word.
    let closed = crate::helpers::free_port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("redis://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let closed_url = format!("redis://127.0.0.1:{closed}");
    let store = RedisStore::connect_cluster(&[&closed_url, &silent_url], "warden")
        .await
        .expect("construction must not need the cluster");
    let limit = Duration::from_secs(10);
    let started = std::time::Instant::now();
    let load = tokio::time::timeout(limit, store.load(&ClientKey::parse("ck").unwrap()))
        .await
        .expect("load must not hang");
    assert!(matches!(load, Err(StoreError::Unavailable(_))), "{load:?}");
    let ping = tokio::time::timeout(limit, store.ping())
        .await
        .expect("ping must not hang");
    assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
    let listed = tokio::time::timeout(limit, store.list_client_keys())
        .await
        .expect("listing must not hang");
    assert!(
        matches!(listed, Err(StoreError::Unavailable(_))),
        "{listed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    assert!(RedisStore::connect_cluster(&[], "warden").await.is_err());
    assert!(RedisStore::connect_cluster(&["not a url"], "warden")
        .await
        .is_err());
    assert!(RedisStore::connect_cluster(&[&closed_url], "a{b}")
        .await
        .is_err());
    drop(silent);
}

/// The app on the cluster: `seeds` in the order given, the shared `prefix`, tenants cached
/// for an hour (only an invalidation explains a change of mind within a second).
async fn app_on_cluster(seeds: &[String], prefix: &str) -> TestApp {
    spawn_app_with(
        Options::new(Backend::Redis)
            .set("WARDEN_REDIS_URL", seeds.join(","))
            .set("WARDEN_REDIS_CLUSTER", "true")
            .set("WARDEN_REDIS_PREFIX", prefix)
            .set("WARDEN_SECRET_GRACE_SECONDS", "0")
            .set("WARDEN_SECRET_CACHE_TTL_SECONDS", "3600"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_serves_tenants_from_the_cluster() {
    let prefix = redis_server::unique_prefix();
    let app = app_on_cluster(&cluster().urls, &prefix).await;
    let response = app.readyz().await;
    assert_eq!(response.status(), 200);
    let sites: Vec<Site> = (0..4).map(|_| Site::new()).collect();
    for site in &sites {
        app.installed(site).await;
        assert_eq!(app.tenant_status(site, &site.secret).await, 200);
        assert_eq!(app.tenant_status(site, "not-the-secret").await, 401);
    }
    assert_eq!(app.stored_count().await, sites.len());
    let stored = app.stored(&sites[0].client_key).await.expect("stored");
    assert_eq!(stored.current_secret().secret.expose(), sites[0].secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_on_the_cluster_honour_each_others_writes_within_a_second() {
    let prefix = redis_server::unique_prefix();
    let seeds = cluster().urls.clone();
    let a = app_on_cluster(&seeds, &prefix).await;
    // B subscribes on another node than A does: its seeds in another order.
    let mut rotated = seeds.clone();
    rotated.rotate_left(2);
    let b = app_on_cluster(&rotated, &prefix).await;
    let b = Arc::new(b);

    // Several tenants, so that their slots (and the node publishing) differ.
    for _ in 0..3 {
        let site = Site::new();
        a.installed(&site).await;
        assert_eq!(
            b.tenant_status(&site, &site.secret).await,
            200,
            "B reads A's install"
        );

        // A roll through A: B, which cached the old secret, refuses it within a second.
        let mut rolled = site.clone();
        rolled.secret = format!("{}-rolled", site.secret);
        a.installed(&rolled).await;
        let took = eventually("B refuses the rolled-away secret", WITHIN, 401, || {
            b.tenant_status(&site, &site.secret)
        })
        .await;
        eprintln!("B honoured the roll after {took:?}");
        assert_eq!(b.tenant_status(&rolled, &rolled.secret).await, 200);

        // An uninstall through A: B refuses the tenant within a second.
        let token = a.install_token(&rolled.client_key, "/uninstalled");
        let response = a
            .post_lifecycle("/uninstalled", Some(&token), &rolled.body("uninstalled"))
            .await;
        assert_eq!(response.status(), 204);
        let took = eventually("B refuses the uninstalled tenant", WITHIN, 403, || {
            b.tenant_status(&rolled, &rolled.secret)
        })
        .await;
        eprintln!("B honoured the uninstall after {took:?}");
    }
}

/// The listener subscribes through the first seed that answers (here the second: the first
/// refuses connections) and hears commits to tenants on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_skips_a_dead_seed_and_hears_every_node() {
    use connect_warden::invalidation::{Invalidation, Listener};
    use connect_warden::tenants::TenantCache;

    let prefix = redis_server::unique_prefix();
    let store = Arc::new(cluster_store(&prefix).await);
    let tenants = TenantCache::new(store.clone(), Duration::from_secs(3600));
    let mut events = tenants.invalidations().subscribe();
    let dead = format!("redis://127.0.0.1:{}", crate::helpers::free_port());
    let seeds = [dead.as_str(), cluster().urls[2].as_str()];
    let _listener = Listener::start_on_any(&seeds, store.channel(), tenants.clone()).unwrap();

    // Subscribed: the whole cache is dropped once.
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("subscribed within 5 s")
        .unwrap();
    assert_eq!(first, Invalidation::All);

    let keys: Vec<String> = (0..6).map(|n| format!("jira:heard-{n}")).collect();
    for key in &keys {
        assert_eq!(
            commit(store.as_ref(), &record(key), 0, None).await,
            CommitOutcome::Committed
        );
    }
    let mut heard = BTreeSet::new();
    while heard.len() < keys.len() {
        match tokio::time::timeout(WITHIN, events.recv()).await {
            Ok(Ok(Invalidation::Tenant(key))) => {
                heard.insert(key.as_str().to_owned());
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("heard only {heard:?} within {WITHIN:?}"),
        }
    }
    assert_eq!(heard, keys.iter().cloned().collect::<BTreeSet<_>>());
}
