//! `GET /metrics`: what an operator's Prometheus sees. Counts are read from `warden` processes
//! of their own: the metrics recorder is global to a process, and this test binary runs many
//! apps in one, so only a separate process has counts that are this test's traffic alone.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::helpers::app::{spawn_app, Backend, Options, Site, TestApp};
use crate::helpers::free_port;
use connect_protocol::jwt;
use connect_warden::monitoring;

/// The value of the sample `name{labels}` (labels in any order, all of them), if exported.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    scrape.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let mut have: Vec<String> = series_labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        have.sort();
        (series_name == name && have == wanted).then(|| value.parse().ok())?
    })
}

/// Like [`sample`], 0 when not exported (a counter never incremented).
fn count(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scrape, name, labels).unwrap_or(0.0)
}

/// Every metric family named in the scrape's `# TYPE` lines.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

async fn scrape_at(app: &TestApp, url: &str) -> String {
    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

async fn scrape(app: &TestApp) -> String {
    scrape_at(app, &app.url("/metrics")).await
}

/// The metric names the Grafana dashboard's queries use (histogram series resolved to their
/// family).
fn dashboard_metric_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "the dashboard has queries");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("warden_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(family.to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A signed install, a callback without a token, a forged and an accepted product request and
/// a site import (whose site proof calls the host) each move their counter, with bounded
/// labels only; the installations gauge counts what the store holds; no clientKey, URL or
/// secret is in the scrape; every metric the dashboard queries is exported (store errors
/// once one happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_bounded_labels_and_name_no_tenant() {
    let host = devtenant::FakeHost::start("127.0.0.1:0").await.unwrap();
    let app = TestApp::spawn_process(
        "metrics",
        Options::new(Backend::Redis).set("WARDEN_PRODUCT_HOSTS", "127.0.0.1"),
    )
    .await;
    let old = Site::on_host(&host, "");
    app.installed(&old).await;
    let unsigned = app
        .post_lifecycle("/installed", None, &Site::new().body("installed"))
        .await;
    assert_eq!(unsigned.status(), 401);
    assert_eq!(
        app.tenant_status(&old, "forged-secret-of-an-attacker")
            .await,
        401
    );
    assert_eq!(app.tenant_status(&old, &old.secret).await, 200);

    // A site import: same site, new clientKey; the host now knows the site by the new one, so
    // the site proof (a call to the host) succeeds and the old installation is superseded.
    let mut imported = Site::new();
    imported.base_url = old.base_url.clone();
    host.set_shared_secret(
        &old.client_key,
        connect_protocol::domain::SharedSecret::parse(&imported.secret).unwrap(),
    );
    app.installed(&imported).await;
    let (mut served, mut refused) = (0.0, 0.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match app.tenant_status(&old, &old.secret).await {
            200 => served += 1.0,
            403 => {
                refused += 1.0;
                break;
            }
            other => panic!("the old installation answered {other}"),
        }
        assert!(Instant::now() < deadline, "the import was never proven");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let text = scrape(&app).await;
    let lifecycle = monitoring::LIFECYCLE_CALLBACKS;
    assert_eq!(
        count(
            &text,
            lifecycle,
            &[("event", "installed"), ("outcome", "accepted")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        count(
            &text,
            lifecycle,
            &[("event", "installed"), ("outcome", "unauthenticated")]
        ),
        1.0
    );
    let product = monitoring::PRODUCT_REQUESTS;
    assert_eq!(
        count(&text, product, &[("outcome", "accepted")]),
        1.0 + served
    );
    assert_eq!(count(&text, product, &[("outcome", "bad_signature")]), 1.0);
    assert_eq!(count(&text, product, &[("outcome", "superseded")]), refused);
    // Both installs were signed with the same key: one fetch.
    let fetches = monitoring::INSTALL_KEY_FETCHES;
    assert_eq!(count(&text, fetches, &[("result", "ok")]), 1.0);

    // Every product request looks its tenant up once; only the forged one reloads.
    let lookups = monitoring::TENANT_CACHE_LOOKUPS;
    let gets = count(&text, lookups, &[("lookup", "get"), ("result", "hit")])
        + count(&text, lookups, &[("lookup", "get"), ("result", "miss")]);
    assert_eq!(gets, 2.0 + served + refused);
    let reloads = count(&text, lookups, &[("lookup", "reload"), ("result", "hit")])
        + count(&text, lookups, &[("lookup", "reload"), ("result", "miss")]);
    assert_eq!(reloads, 1.0);

    let commits = format!("{}_count", monitoring::STORE_OPERATION_SECONDS);
    assert!(count(&text, &commits, &[("op", "commit")]) >= 2.0, "{text}");
    assert!(count(&text, monitoring::INVALIDATIONS_SENT, &[]) >= 2.0);
    assert!(count(&text, monitoring::INVALIDATIONS_RECEIVED, &[]) >= 1.0);
    assert_eq!(count(&text, monitoring::INVALIDATION_SUBSCRIBED, &[]), 1.0);
    assert!(
        count(
            &text,
            monitoring::HOST_CALLS,
            &[("call", "request"), ("status", "2xx")]
        ) >= 1.0,
        "{text}"
    );
    let installations = monitoring::INSTALLATIONS;
    assert_eq!(count(&text, installations, &[("state", "active")]), 1.0);
    assert_eq!(count(&text, installations, &[("state", "superseded")]), 1.0);

    for site in [&old, &imported] {
        for value in [&site.client_key, &site.base_url, &site.secret] {
            assert!(
                !text.contains(value.as_str()),
                "{value} is in the scrape:\n{text}"
            );
        }
    }
    assert!(!text.contains("127.0.0.1"), "{text}");

    let exported = families(&text);
    // Store errors are exported from the first failure on; this store did not fail.
    let on_failure_only = [monitoring::STORE_ERRORS];
    for name in dashboard_metric_names()
        .into_iter()
        .filter(|n| !on_failure_only.contains(&n.as_str()))
    {
        assert!(
            exported.contains(&name),
            "the dashboard queries {name}, which is not exported:\n{text}"
        );
    }
}

/// With `WARDEN_METRICS_BIND`, `/metrics` is served there only; the public port answers 404,
/// and the metrics listener serves nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_bind_moves_metrics_off_the_public_port() {
    let metrics_port = free_port();
    let app = TestApp::spawn_process(
        "metrics-bind",
        Options::new(Backend::Embedded)
            .set("WARDEN_METRICS_BIND", format!("127.0.0.1:{metrics_port}")),
    )
    .await;
    let public = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404);

    let unknown = Site::new();
    let token = app.product_token(
        &unknown.client_key,
        &unknown.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    assert_eq!(app.tenant(&token).await.status(), 401);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let text = scrape_at(&app, &metrics_url).await;
    assert_eq!(
        count(
            &text,
            monitoring::PRODUCT_REQUESTS,
            &[("outcome", "unknown_tenant")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, monitoring::INSTALLATIONS, &[("state", "active")]),
        Some(0.0)
    );
    assert!(!text.contains(&unknown.client_key));

    let other = app
        .client
        .get(format!("http://127.0.0.1:{metrics_port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

/// Several applications in one process (tests, embedders) share the one recorder: building a
/// second does not fail, and both serve `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_applications_in_one_process_share_the_recorder() {
    let first = spawn_app(Backend::Embedded).await;
    let second = spawn_app(Backend::Embedded).await;
    for app in [&first, &second] {
        let text = scrape(app).await;
        assert!(
            families(&text).contains(monitoring::INSTALLATIONS),
            "{text}"
        );
    }
}

/// Every metric the dashboard queries is one warden declares.
#[test]
fn the_dashboard_queries_only_declared_metrics() {
    let declared: BTreeSet<String> = monitoring::ALL_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in dashboard_metric_names() {
        assert!(declared.contains(&name), "{name} is not a warden metric");
    }
}
