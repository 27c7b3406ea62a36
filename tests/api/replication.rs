//! Failover without loss (docs/PROTOCOL.md §10): with `WARDEN_REDIS_MIN_REPLICAS`, a lifecycle
//! write is acknowledged only once that many replicas confirmed it (`WAIT`), so an
//! acknowledged install survives the loss of its primary. Each test runs its own Redis
//! processes (a primary and a replica; a cluster of three primaries with one replica each)
//! and kills them with `kill -9`.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

use crate::helpers::app::{error_of, spawn_app_with, Backend, Options, Site, TestApp};
use crate::helpers::redis_server::{redis_cli, ReplicatedCluster, ReplicatedRedis};

/// The installation hash of `site` as a node itself holds it (no redirection).
fn stored_on(port: u16, prefix: &str, site: &Site) -> bool {
    let key = format!("{prefix}:{{{}}}:installation", site.client_key);
    redis_cli(port, &["exists", &key]).trim() == "1"
}

fn app_options(urls: &str, prefix: &str) -> Options {
    Options::new(Backend::Redis)
        .set("WARDEN_REDIS_URL", urls)
        .set("WARDEN_REDIS_PREFIX", prefix)
        .set("WARDEN_REDIS_MIN_REPLICAS", "1")
        // The longest allowed: on a loaded 2-core machine a replica may take a while to ack.
        .set("WARDEN_REDIS_WAIT_TIMEOUT_MS", "1500")
}

/// One `installed` of `site` with a fresh Atlassian token: the token and the response.
async fn install(app: &TestApp, site: &Site) -> (String, reqwest::Response) {
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    (token, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_is_acknowledged_only_once_a_replica_holds_it() {
    let mut redis = ReplicatedRedis::start();
    let prefix = "repl";
    let app = spawn_app_with(app_options(&redis.primary.url, prefix)).await;

    // Both up: installs succeed and the replica holds each one as soon as it is acknowledged.
    for _ in 0..3 {
        let site = Site::new();
        let (_, response) = install(&app, &site).await;
        assert_eq!(response.status(), 204);
        assert!(
            stored_on(redis.replica.port, prefix, &site),
            "on the replica"
        );
        assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    }

    // The replica dies: an install is written on the primary but not acknowledged.
    redis.replica.kill9();
    let site = Site::new();
    let (token, response) = install(&app, &site).await;
    assert_eq!(response.status(), 503);
    let error = error_of(response).await;
    assert!(error.contains("replicas"), "{error}");

    // The replica is back: without a restart of warden, Atlassian's identical retry of the
    // refused callback succeeds (not a 409 replay), and so do new installs; the replica holds
    // all of them.
    redis.replica.restart();
    redis.await_replica_in_sync();
    let retried = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(retried.status(), 204, "{}", retried.text().await.unwrap());
    assert!(stored_on(redis.replica.port, prefix, &site));
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    let next = Site::new();
    assert_eq!(install(&app, &next).await.1.status(), 204);
    assert!(stored_on(redis.replica.port, prefix, &next));
}

/// While the replica is away, an identical retry is refused too: it is acknowledged only
/// once the first attempt's write reached a replica. (`disabled`: a retry of it writes
/// nothing at all, not even to the site index.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_acknowledged_before_a_replica_holds_the_first_attempt() {
    let mut redis = ReplicatedRedis::start();
    let prefix = "repl";
    let app = spawn_app_with(app_options(&redis.primary.url, prefix)).await;
    let site = Site::new();
    app.installed(&site).await;
    redis.replica.kill9();
    let token = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/disabled");
    for _ in 0..2 {
        let response = app
            .post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
            .await;
        assert_eq!(response.status(), 503);
    }
    redis.replica.restart();
    redis.await_replica_in_sync();
    let response = app
        .post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.tenant_status(&site, &site.secret).await, 403);
}

const INSTALLS: usize = 200;
const CONCURRENCY: usize = 8;

/// An install burst on a cluster during which one primary is killed (`kill -9`) and its
/// replica takes over: the heir, left without a replica, acknowledges nothing; every
/// acknowledged install is still there afterwards, every refused one succeeds when retried
/// once the old primary rejoined as a replica, and warden follows the new primary without a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_install_is_lost_when_a_cluster_primary_fails_over() {
    let started = Instant::now();
    let mut cluster = ReplicatedCluster::start();
    let prefix = "failover";
    let app = spawn_app_with(
        app_options(&cluster.urls().join(","), prefix).set("WARDEN_REDIS_CLUSTER", "true"),
    )
    .await;
    let sites: Vec<Site> = (0..INSTALLS).map(|_| Site::new()).collect();
    let (victim, heir) = cluster.primary_and_replica();

    // The burst, with the failover after a quarter of it: kill -9 of the primary, then its
    // replica takes over its slots without the primary's consent.
    let failover_at = INSTALLS / 4;
    let results: Vec<(usize, String, u16)> = futures_util::stream::iter(sites.iter().enumerate())
        .map(|(i, site)| {
            let (app, cluster) = (&app, &cluster);
            async move {
                if i == failover_at {
                    cluster.node(victim).kill9();
                    let answer = cluster.node(heir).cli(&["cluster", "failover", "takeover"]);
                    assert_eq!(answer.trim(), "OK", "CLUSTER FAILOVER TAKEOVER");
                }
                let (token, response) = install(app, site).await;
                (i, token, response.status().as_u16())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let acknowledged: Vec<usize> = results
        .iter()
        .filter(|(_, _, s)| *s == 204)
        .map(|(i, ..)| *i)
        .collect();
    let refused: Vec<&(usize, String, u16)> =
        results.iter().filter(|(_, _, s)| *s != 204).collect();
    eprintln!(
        "{} acknowledged, {} refused ({:?}) during the failover",
        acknowledged.len(),
        refused.len(),
        refused
            .iter()
            .map(|r| r.2)
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        refused.iter().all(|(_, _, s)| *s == 503),
        "a refusal other than 503"
    );

    // Every install after the takeover started once the heir had lost its only replica: none
    // of them may have been acknowledged on the heir's slots.
    let on_lonely_heir: Vec<&str> = acknowledged
        .iter()
        .filter(|i| **i > failover_at)
        .map(|i| &sites[*i])
        .filter(|site| stored_on(heir, prefix, site))
        .map(|site| site.client_key.as_str())
        .collect();
    assert!(
        on_lonely_heir.is_empty(),
        "acknowledged by a primary without a replica: {on_lonely_heir:?}"
    );

    // The old primary comes back and rejoins as the replica of its heir, so writes to its
    // slots can be confirmed again.
    cluster.node_mut(victim).restart();
    cluster.await_healthy(Duration::from_secs(25));

    // Atlassian retries every refused callback, identically, until it is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, token, _) in &refused {
        let site = &sites[*i];
        loop {
            let response = app
                .post_lifecycle("/installed", Some(token), &site.body("installed"))
                .await;
            if response.status() == 204 {
                break;
            }
            assert_eq!(response.status(), 503);
            let error = error_of(response).await;
            assert!(Instant::now() < deadline, "a retry kept failing: {error}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Nothing acknowledged is lost: every install is in the store and serves its secret.
    for site in &sites {
        let stored = app.stored(&site.client_key).await;
        let stored = stored.unwrap_or_else(|| panic!("{} lost", site.client_key));
        assert_eq!(stored.current_secret().secret.expose(), site.secret);
        assert_eq!(app.tenant_status(site, &site.secret).await, 200);
    }
    eprintln!("failover test took {:?}", started.elapsed());
}
