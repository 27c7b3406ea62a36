//! "A roll made anywhere is honoured everywhere within 1 s of the roll, whatever the outage
//! before it" (docs/PROTOCOL.md §10), from the fault's side: two real `warden` processes on a
//! Redis the test owns, which it kills (`SIGKILL`) and restarts on the same port, or on which
//! one instance is not allowed to subscribe at all.
//!
//! Tenant caches live for an hour here, so only an invalidation, or not serving the cache,
//! can explain an instance's change of mind within the bounds asserted.

use std::time::{Duration, Instant};

use crate::helpers::app::{eventually, Cluster, Site, TestApp};
use crate::helpers::redis_server::OwnRedis;

/// The promise: a roll is honoured everywhere within one second of it.
const WITHIN: Duration = Duration::from_secs(1);

/// The listener retries at least once a second: once Redis is back it is subscribed within
/// that, plus a few milliseconds on loopback; the rest is room for a loaded machine.
const RESUBSCRIBED_WITHIN: Duration = Duration::from_millis(1500);

/// Long enough for the listener's backoff to reach its cap (100 ms doubling: 6.3 s of
/// failures before the sixth wait), so an instance that caches while unsubscribed would serve
/// a stale secret for most of a capped wait after Redis is back.
const OUTAGE: Duration = Duration::from_secs(7);

const ENV: [(&str, &str); 2] = [
    ("WARDEN_SECRET_GRACE_SECONDS", "0"),
    ("WARDEN_SECRET_CACHE_TTL_SECONDS", "3600"),
];

/// The site after Atlassian rolled its secret; returns the old secret too.
fn rolled(site: &Site) -> (Site, String) {
    let mut next = site.clone();
    next.secret = format!("{}-rolled", site.secret);
    (next, site.secret.clone())
}

/// `"invalidations"` of `GET /readyz`, which must answer 200.
async fn invalidations(app: &TestApp) -> String {
    let response = app.readyz().await;
    assert_eq!(response.status(), 200, "{} is ready", app.name);
    let body: serde_json::Value = response.json().await.unwrap();
    body["invalidations"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "{}: /readyz says nothing of invalidations: {body}",
                app.name
            )
        })
        .to_owned()
}

/// Polls until `app` says `wanted` on `/readyz`, until `deadline`.
async fn until_invalidations(app: &TestApp, wanted: &str, deadline: Instant) {
    loop {
        let seen = invalidations(app).await;
        if seen == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: invalidations still {seen:?}, expected {wanted:?}",
            app.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// By `WITHIN` after `rolled_at`, B refuses the old secret and accepts the new one. The old
/// secret is polled alone, as whoever leaked it would: a request with the new secret makes B
/// re-read the store (a failed signature against a cached secret) and would hide a stale cache.
async fn honoured_within_a_second(b: &TestApp, rolled: &Site, old: &str, rolled_at: Instant) {
    let deadline = rolled_at + WITHIN;
    for (what, secret, wanted) in [
        ("the old secret", old, 401),
        ("the new secret", rolled.secret.as_str(), 200),
    ] {
        loop {
            let seen = b.tenant_status(rolled, secret).await;
            if seen == wanted {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "B still answers {seen} to {what} {:?} after the roll",
                rolled_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("B honoured the roll {:?} after it", rolled_at.elapsed());
}

/// Redis down for 7 s, then a roll through A right after it is back: B, whose subscription is
/// still waiting to reconnect and who served (and could have cached) the tenant since Redis
/// returned, honours the roll within a second, not when it next subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_right_after_a_redis_outage_is_honoured_everywhere_within_a_second() {
    let mut redis = OwnRedis::start();
    let cluster = Cluster::on(&redis.url).await;
    let a = cluster.spawn("A", &ENV).await;
    let b = cluster.spawn("B", &ENV).await;
    for app in [&a, &b] {
        until_invalidations(app, "subscribed", Instant::now() + Duration::from_secs(5)).await;
    }
    let site = Site::new();
    a.installed(&site).await;
    assert_eq!(b.tenant_status(&site, &site.secret).await, 200);

    tokio::task::block_in_place(|| redis.kill());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.tenant_status(&site, &site.secret).await,
        503,
        "B does not answer from memory what it cannot check"
    );
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| redis.restart());
    let back_at = Instant::now();

    // Redis is back, B's subscription not yet: requests keep coming to B.
    eventually(
        "B serves the tenant once Redis is back",
        Duration::from_secs(5),
        200,
        || b.tenant_status(&site, &site.secret),
    )
    .await;
    let (rolled, old) = rolled(&site);
    a.installed(&rolled).await;
    let rolled_at = Instant::now();
    honoured_within_a_second(&b, &rolled, &old, rolled_at).await;

    // B subscribes again within about a second of Redis's return, and messages flow again.
    until_invalidations(&b, "subscribed", back_at + RESUBSCRIBED_WITHIN).await;
    eprintln!(
        "B subscribed again within {:?} of Redis's return",
        back_at.elapsed()
    );
    a.disabled(&rolled).await;
    eventually(
        "B honours a disable after resubscribing",
        WITHIN,
        403,
        || b.tenant_status(&rolled, &rolled.secret),
    )
    .await;
}

/// An instance whose Redis user may not `SUBSCRIBE` never hears other instances' writes: it
/// stays ready (its store answers), says it is reconnecting, and reads the store for every
/// lookup, so a roll or a disable made elsewhere is honoured by its very next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_subscribe_reads_the_store_and_says_so() {
    let redis = OwnRedis::start();
    let mut admin = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "deaf",
            "on",
            ">deaf-password",
            "~*",
            "&*",
            "+@all",
            "-subscribe",
            "-psubscribe",
            "-ssubscribe",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let cluster = Cluster::on(&redis.url).await;
    let deaf = Cluster {
        redis_url: format!("redis://deaf:deaf-password@127.0.0.1:{}", redis.port),
        redis_prefix: cluster.redis_prefix.clone(),
        keys: cluster.keys.clone(),
    };
    let a = cluster.spawn("A", &ENV).await;
    let b = deaf.spawn("B", &ENV).await;
    until_invalidations(&a, "subscribed", Instant::now() + Duration::from_secs(5)).await;
    // Its listener keeps trying (and failing) to subscribe.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(invalidations(&b).await, "reconnecting");

    let site = Site::new();
    a.installed(&site).await;
    for _ in 0..3 {
        assert_eq!(b.tenant_status(&site, &site.secret).await, 200);
    }
    let (rolled, old) = rolled(&site);
    a.installed(&rolled).await;
    assert_eq!(
        b.tenant_status(&rolled, &old).await,
        401,
        "B refuses the old secret at once"
    );
    assert_eq!(b.tenant_status(&rolled, &rolled.secret).await, 200);
    a.disabled(&rolled).await;
    assert_eq!(b.tenant_status(&rolled, &rolled.secret).await, 403);
    assert_eq!(invalidations(&b).await, "reconnecting");
}
