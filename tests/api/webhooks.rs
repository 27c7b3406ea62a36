//! Webhooks declared in the descriptor: authenticated like product requests, answered at once,
//! handed to the registered handler through a bounded queue, deduplicated per tenant.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::descriptor::write_template;
use crate::helpers::app::{error_of, spawn_app_with, Backend, Options, Site, TestApp};

const CREATED: &str = "jira:issue_created";
const UPDATED: &str = "jira:issue_updated";
const DELETED: &str = "jira:issue_deleted";

/// What a handler saw of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    event: String,
    client_key: String,
    base_url: String,
    body: serde_json::Value,
    identifier: Option<String>,
}

/// An app whose descriptor declares three webhooks (`issue_deleted` has no handler), with one
/// worker, a queue of `queue_size`, and handlers that report each delivery on the returned
/// channel once `gate` gives them a permit (an open gate: `Semaphore::MAX_PERMITS`).
async fn app_with_webhooks(
    queue_size: usize,
    gate: Arc<Semaphore>,
) -> (TestApp, mpsc::UnboundedReceiver<Seen>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let template = write_template(dir.path(), |t| {
        t["modules"]["webhooks"] = json!([
            {"event": CREATED, "url": "/webhooks/created?issue={issue.id}"},
            {"event": UPDATED, "url": "/webhooks/updated"},
            {"event": DELETED, "url": "/webhooks/deleted"},
        ]);
    });
    let (sender, seen) = mpsc::unbounded_channel();
    let handler = move |webhook: connect_warden::webhooks::Webhook| {
        let sender = sender.clone();
        let gate = gate.clone();
        async move {
            let seen = Seen {
                event: webhook.event.clone(),
                client_key: webhook.tenant.client_key.as_str().to_owned(),
                base_url: webhook.tenant.base_url.as_str().to_owned(),
                body: webhook.body.clone(),
                identifier: webhook.identifier.clone(),
            };
            // Reported before waiting, so a test knows the worker holds this delivery.
            sender.send(seen).ok();
            gate.acquire().await?.forget();
            Ok(())
        }
    };
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_DESCRIPTOR", template)
            .set("WARDEN_WEBHOOK_WORKERS", "1")
            .set("WARDEN_WEBHOOK_QUEUE_SIZE", queue_size.to_string())
            .on_webhook(CREATED, handler.clone())
            .on_webhook(UPDATED, handler),
    )
    .await;
    (app, seen, dir)
}

fn open_gate() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
}

async fn next(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("a handler ran within 10 s")
        .expect("the handlers are alive")
}

/// Nothing more reaches a handler: checked after a last delivery that must arrive, which the
/// one worker takes after everything sent before it.
async fn nothing_else_handled(
    app: &TestApp,
    site: &Site,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
) {
    let marker = json!({"marker": uuid::Uuid::new_v4().to_string()});
    let response = app.webhook(site, "/webhooks/updated", None, &marker).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        next(seen).await.body,
        marker,
        "a delivery was handed over unexpectedly"
    );
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn a_registered_handler_receives_the_event_of_the_tenant_that_sent_it() {
    let (app, mut seen, _dir) = app_with_webhooks(10, open_gate()).await;
    let (acme, other) = (Site::new(), Site::new());
    app.installed(&acme).await;
    app.installed(&other).await;

    let body = json!({"webhookEvent": CREATED, "issue": {"id": "10001", "key": "ACME-1"}});
    let response = app
        .webhook(&acme, "/webhooks/created?issue=10001", Some("wh-1"), &body)
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        next(&mut seen).await,
        Seen {
            event: CREATED.into(),
            client_key: acme.client_key.clone(),
            base_url: acme.base_url.clone(),
            body,
            identifier: Some("wh-1".into()),
        }
    );

    // An event declared without a handler is acknowledged and dropped.
    let response = app
        .webhook(&other, "/webhooks/deleted", None, &json!({"issue": {}}))
        .await;
    assert_eq!(response.status(), 204);
    let updated = json!({"issue": {"key": "OTHER-2"}});
    assert_eq!(
        app.webhook(&other, "/webhooks/updated", None, &updated)
            .await
            .status(),
        204
    );
    let next_seen = next(&mut seen).await;
    assert_eq!(
        (next_seen.event.as_str(), next_seen.client_key.as_str()),
        (UPDATED, other.client_key.as_str())
    );
    assert_eq!(next_seen.body, updated);
    assert!(seen.try_recv().is_err());
}

/// The attacker's side: no secret, a guessed one, a token for another request, an
/// uninstalled site. None is handed over.
#[tokio::test]
async fn forged_or_misdirected_deliveries_are_refused_and_never_handed_over() {
    let (app, mut seen, _dir) = app_with_webhooks(10, open_gate()).await;
    let site = Site::new();
    app.installed(&site).await;
    let body = json!({"issue": {"id": "1"}});
    let path = "/webhooks/created?issue=1";

    let response = app.post_webhook(path, None, Some("a"), &body).await;
    assert_eq!(response.status(), 401);
    let guessed = app.webhook_token(&site.client_key, "guessed-secret", path);
    let response = app
        .post_webhook(path, Some(&guessed), Some("b"), &body)
        .await;
    assert_eq!(response.status(), 401);
    // Signed for another issue: the qsh covers the query.
    let other_request =
        app.webhook_token(&site.client_key, &site.secret, "/webhooks/created?issue=2");
    let response = app
        .post_webhook(path, Some(&other_request), Some("c"), &body)
        .await;
    assert_eq!(response.status(), 401);
    assert!(error_of(response).await.contains("qsh"));
    nothing_else_handled(&app, &site, &mut seen).await;

    let gone = Site::new();
    app.installed(&gone).await;
    app.uninstalled(&gone).await;
    let response = app.webhook(&gone, path, Some("d"), &body).await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response).await.contains("uninstalled"));
    nothing_else_handled(&app, &site, &mut seen).await;
}

#[tokio::test]
async fn a_delivery_sent_twice_is_handed_over_once_per_tenant() {
    let (app, mut seen, _dir) = app_with_webhooks(10, open_gate()).await;
    let (acme, other) = (Site::new(), Site::new());
    app.installed(&acme).await;
    app.installed(&other).await;
    let body = json!({"issue": {"id": "7"}});
    let path = "/webhooks/created?issue=7";

    for _ in 0..2 {
        let response = app.webhook(&acme, path, Some("same-id"), &body).await;
        assert_eq!(response.status(), 204, "a duplicate is acknowledged too");
    }
    // Another tenant's delivery with the same identifier is its own.
    let response = app.webhook(&other, path, Some("same-id"), &body).await;
    assert_eq!(response.status(), 204);

    assert_eq!(next(&mut seen).await.client_key, acme.client_key);
    assert_eq!(next(&mut seen).await.client_key, other.client_key);
    nothing_else_handled(&app, &acme, &mut seen).await;
}

/// One worker held by its handler, a queue of one: the third delivery finds no room. It is
/// refused so that Atlassian retries, and its retry (same identifier) is processed.
#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_and_the_retry_is_processed() {
    let gate = Arc::new(Semaphore::new(0));
    let (app, mut seen, _dir) = app_with_webhooks(1, gate.clone()).await;
    let site = Site::new();
    app.installed(&site).await;
    let deliver = |id: &'static str| {
        let app = &app;
        let site = &site;
        async move {
            app.webhook(site, "/webhooks/updated", Some(id), &json!({"n": id}))
                .await
        }
    };

    assert_eq!(deliver("first").await.status(), 204);
    assert_eq!(next(&mut seen).await.body["n"], "first"); // the worker holds it
    assert_eq!(deliver("second").await.status(), 204); // waits in the queue
    let response = deliver("third").await;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    assert!(error_of(response).await.contains("queue is full"));

    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    assert_eq!(next(&mut seen).await.body["n"], "second");
    // Atlassian's retry of the refused delivery: not taken for a duplicate.
    assert_eq!(deliver("third").await.status(), 204);
    assert_eq!(next(&mut seen).await.body["n"], "third");
    assert!(seen.try_recv().is_err());
}

/// A handler for an event the descriptor does not declare would never run: start-up fails.
#[tokio::test]
async fn a_handler_for_an_undeclared_event_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_template(dir.path(), |_| {});
    let settings = connect_warden::configuration::Settings::from_sources(
        None,
        [
            ("WARDEN_DESCRIPTOR".to_owned(), template),
            ("WARDEN_BIND".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "WARDEN_DATA_DIR".to_owned(),
                dir.path().display().to_string(),
            ),
        ],
    )
    .unwrap();
    let error = connect_warden::startup::Application::builder(settings)
        .on_webhook("jira:issue_craeted", |_| async { Ok(()) })
        .build()
        .await
        .err()
        .expect("start-up fails");
    assert!(error.to_string().contains("jira:issue_craeted"), "{error}");
}

/// devtenant delivers webhooks as Atlassian does (its own token code, the identifier header):
/// its retry of a delivery is acknowledged and not handed over again.
#[tokio::test]
async fn devtenant_delivers_webhooks_and_their_retries() {
    use devtenant::client::{http_client, AppCaller, AppDescriptor, DescriptorOptions};

    let (app, mut seen, _dir) = app_with_webhooks(10, open_gate()).await;
    let site = Site::new();
    app.installed(&site).await;
    let http = http_client(Duration::from_secs(10));
    let descriptor = AppDescriptor::fetch(
        &http,
        &app.url("/atlassian-connect.json"),
        &DescriptorOptions::default(),
    )
    .await
    .unwrap();
    let caller = AppCaller::new(http, descriptor);
    let path = "/webhooks/created?issue=42";
    for attempt in 0..2 {
        let token = caller
            .product_token(
                &site.secret,
                &site.client_key,
                "POST",
                path,
                "user",
                connect_protocol::jwt::now(),
            )
            .unwrap();
        let exchange = caller
            .webhook(
                path,
                &token,
                "delivery-42",
                Some(r#"{"issue":{"id":"42"}}"#.into()),
            )
            .await;
        assert_eq!(exchange.status, Some(204), "attempt {attempt}: {exchange}");
    }
    let handled = next(&mut seen).await;
    assert_eq!(handled.identifier.as_deref(), Some("delivery-42"));
    assert_eq!(handled.body, json!({"issue": {"id": "42"}}));
    nothing_else_handled(&app, &site, &mut seen).await;
}

/// Under a base path the webhook routes sit under it too, and the `qsh` is of the path
/// relative to the base URL.
#[tokio::test]
async fn webhooks_are_served_under_the_base_path() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_template(dir.path(), |t| {
        t["modules"]["webhooks"] = json!([{"event": CREATED, "url": "/webhooks/created"}]);
    });
    let (sender, mut seen) = mpsc::unbounded_channel();
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_BASE_URL", "https://warden.example.com/app")
            .set("WARDEN_DESCRIPTOR", template)
            .on_webhook(CREATED, move |webhook| {
                let sender = sender.clone();
                async move {
                    sender.send(webhook.tenant.client_key.as_str().to_owned())?;
                    Ok(())
                }
            }),
    )
    .await;
    assert_eq!(app.base_path, "/app");
    let site = Site::new();
    app.installed(&site).await;
    let response = app
        .webhook(&site, "/webhooks/created", Some("x"), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    let handled = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await;
    assert_eq!(handled.unwrap().unwrap(), site.client_key);
}

/// One site's burst fills its own share of the queue (an eighth), never the queue of the
/// others: a quiet tenant's delivery is still accepted while the busy one is told to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_site_never_takes_the_queue_from_the_others() {
    let gate = Arc::new(Semaphore::new(0));
    let (app, mut seen, _dir) = app_with_webhooks(16, gate.clone()).await;
    let (busy, quiet) = (Site::new(), Site::new());
    app.installed(&busy).await;
    app.installed(&quiet).await;
    let deliver = |site: &Site, id: String| {
        let app = &app;
        let site = site.clone();
        async move {
            app.webhook(&site, "/webhooks/updated", Some(&id), &json!({"n": id}))
                .await
        }
    };
    // The worker holds the first; its share of 16 / 8 = 2 then waits in the queue.
    assert_eq!(deliver(&busy, "b0".into()).await.status(), 204);
    assert_eq!(next(&mut seen).await.body["n"], "b0");
    for n in 1..=2 {
        assert_eq!(deliver(&busy, format!("b{n}")).await.status(), 204);
    }
    let refused = deliver(&busy, "b3".into()).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(error_of(refused).await.contains("share of the queue"));
    // The queue has room for the others.
    assert_eq!(deliver(&quiet, "q0".into()).await.status(), 204);
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let mut handled = Vec::new();
    for _ in 0..3 {
        handled.push(next(&mut seen).await.body["n"].as_str().unwrap().to_owned());
    }
    handled.sort();
    assert_eq!(handled, ["b1", "b2", "q0"]);
    // Room again once the busy site's deliveries were taken: its retry is processed.
    assert_eq!(deliver(&busy, "b3".into()).await.status(), 204);
    assert_eq!(next(&mut seen).await.body["n"], "b3");
}
