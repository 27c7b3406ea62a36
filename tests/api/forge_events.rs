//! `POST /forge/events` from Forge's side: lifecycle events with a Forge Invocation Token bind
//! the Forge installation to the Connect one, Atlassian's retries are never applied twice
//! (on one instance or two), and nothing but a verified token of the same installation
//! changes anything.

use std::time::Duration;

use crate::helpers::app::{
    error_of, shared_signing_key, spawn_app_with, Backend, Cluster, Options, Site, TestApp,
};
use connect_warden::store::Installation;
use devtenant::{
    as_retry, deliver_event, lifecycle_event, FitSigner, JwksServer, JwksService, SigningKey,
};
use serde_json::Value;

const APP_UUID: &str = "7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";
const APP_ARI: &str = "ari:cloud:ecosystem::app/7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";
const INSTALLED: &str = "avi:forge:installed:app";

async fn forge_jwks() -> JwksServer {
    JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap()
}

async fn forge_app(backend: Backend) -> (JwksServer, TestApp) {
    let jwks = forge_jwks().await;
    let app = spawn_app_with(
        Options::new(backend)
            .set("WARDEN_FORGE_APP_ID", APP_UUID)
            .set("WARDEN_FORGE_JWKS_URL", jwks.jwks_url()),
    )
    .await;
    (jwks, app)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn ari(installation: &str) -> String {
    format!("ari:cloud:ecosystem::installation/{installation}")
}

/// A FIT of `installation` on the Jira site `cloud`, as Forge sends with an event.
fn fit_of(installation: &str, cloud: &str) -> FitSigner {
    FitSigner::new(&shared_signing_key(), APP_ARI)
        .installation_id(installation)
        .site(cloud, "jira")
}

/// A signed Connect `installed` of `site` on Jira, with `cloudId` and, if given, the
/// `installationId`.
async fn connect_install(app: &TestApp, site: &Site, installation: Option<&str>, cloud: &str) {
    let mut body = site.body("installed");
    body["productType"] = "jira".into();
    if let Some(installation) = installation {
        body["installationId"] = ari(installation).into();
    }
    body["cloudId"] = cloud.into();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 204);
}

async fn post_event(
    app: &TestApp,
    authorization: Option<String>,
    event: &Value,
) -> reqwest::Response {
    let mut request = app.client.post(app.url("/forge/events")).json(event);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    request.send().await.expect("request reaches the app")
}

/// Sends `event` with `fit`; asserts `200` and returns the answer.
async fn send(app: &TestApp, fit: &FitSigner, event: &Value) -> Value {
    let response = post_event(app, Some(format!("Bearer {}", fit.sign())), event).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn record(app: &TestApp, site: &Site) -> Installation {
    app.stored(&site.client_key).await.expect("stored")
}

/// The clientKey `GET /api/tenant` links to `fit` (`null`: none).
async fn linked(app: &TestApp, fit: &FitSigner) -> Value {
    let response = app
        .client
        .get(app.url("/api/tenant"))
        .bearer_auth(fit.sign())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["clientKey"].clone()
}

/// A missing, forged or expired FIT is `401`; nothing is stored or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_valid_fit_is_refused_and_changes_nothing() {
    let (_jwks, app) = forge_app(Backend::Embedded).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    connect_install(&app, &site, None, &cloud).await;
    let before = serde_json::to_value(record(&app, &site).await).unwrap();
    let event = lifecycle_event(INSTALLED, &ari(&installation), "2.1.0");
    let good = fit_of(&installation, &cloud);
    let cases = [
        ("no token", None, "no Forge Invocation Token"),
        (
            "forged: another key, under a published kid",
            Some(
                good.clone()
                    .signed_by(&SigningKey::generate())
                    .kid(&shared_signing_key().kid),
            ),
            "signature does not verify",
        ),
        (
            "expired",
            Some(
                good.clone()
                    .iat(connect_protocol::jwt::now() - 600)
                    .nbf(connect_protocol::jwt::now() - 600)
                    .exp(connect_protocol::jwt::now() - 300),
            ),
            "expired",
        ),
    ];
    for (case, fit, message) in cases {
        let response = post_event(&app, fit.map(|f| format!("Bearer {}", f.sign())), &event).await;
        assert_eq!(response.status(), 401, "{case}");
        let error = error_of(response).await;
        assert!(error.contains(message), "{case}: {error}");
    }
    assert_eq!(
        serde_json::to_value(record(&app, &site).await).unwrap(),
        before
    );
    assert_eq!(
        linked(&app, &fit_of(&installation, &new_id())).await,
        Value::Null
    );
}

/// `avi:forge:installed:app` binds the Forge installation to the Connect installation of the
/// same site (found by `cloudId` and product): its record now carries the `installationId`,
/// so a FIT naming only that installation is linked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_event_binds_the_connect_installation() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app(backend).await;
        let site = Site::new();
        let (installation, cloud) = (new_id(), new_id());
        connect_install(&app, &site, None, &cloud).await;
        let only_installation = fit_of(&installation, &new_id())
            .with_claims(|c| c.app.as_mut().unwrap().installation = None);
        assert_eq!(linked(&app, &only_installation).await, Value::Null);

        // Delivered the way Forge does: answered 2xx at once, so never resent.
        let answers = deliver_event(
            &app.client,
            &app.url("/forge/events"),
            &fit_of(&installation, &cloud),
            &lifecycle_event(INSTALLED, &installation, "2.1.0"),
            Duration::from_millis(10),
        )
        .await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0].as_ref().unwrap().as_u16(), 200);

        let stored = record(&app, &site).await;
        assert_eq!(stored.installation_id, Some(ari(&installation)));
        let binding = stored.forge.expect("bound");
        assert_eq!(binding.installation_id, ari(&installation));
        assert_eq!(binding.app_version.as_deref(), Some("2.1.0"));
        assert_eq!(
            linked(&app, &only_installation).await,
            site.client_key.as_str()
        );
    }
}

/// A reinstall: an installed event with a new `installationId` for the same `cloudId` moves
/// the binding (the newest wins); a late retry of the old installation's event never moves it
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinstall_event_moves_the_binding_and_a_late_retry_does_not_move_it_back() {
    let (_jwks, app) = forge_app(Backend::Redis).await;
    let site = Site::new();
    let (first, second, cloud) = (new_id(), new_id(), new_id());
    connect_install(&app, &site, Some(&first), &cloud).await;

    let answer = send(
        &app,
        &fit_of(&second, &cloud),
        &lifecycle_event(INSTALLED, &second, "2.1.0"),
    )
    .await;
    assert_eq!(answer["outcome"], "applied");
    assert_eq!(answer["clientKey"], site.client_key.as_str());
    let stored = record(&app, &site).await;
    assert_eq!(stored.installation_id, Some(ari(&second)));
    assert_eq!(stored.forge.unwrap().retired, vec![ari(&first)]);
    let only = |id: &str| {
        fit_of(id, &new_id()).with_claims(|c| c.app.as_mut().unwrap().installation = None)
    };
    assert_eq!(linked(&app, &only(&second)).await, site.client_key.as_str());
    assert_eq!(linked(&app, &only(&first)).await, Value::Null);

    let version = record(&app, &site).await.version;
    let late = as_retry(lifecycle_event(INSTALLED, &first, "2.1.0"), 3, "TIMEOUT");
    let answer = send(&app, &fit_of(&first, &cloud), &late).await;
    assert_eq!(answer["outcome"], "stale");
    let stored = record(&app, &site).await;
    assert_eq!(stored.version, version);
    assert_eq!(stored.installation_id, Some(ari(&second)));
}

/// Atlassian resends an event with `retryContext`; the retry is answered `200` and never
/// applied twice: on the instance that applied it (remembered) and on another one behind the
/// same load balancer (the record already says so: nothing written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_not_applied_twice_on_either_instance() {
    let jwks = forge_jwks().await;
    let cluster = Cluster::new().await;
    let env = [
        ("WARDEN_FORGE_APP_ID", APP_UUID.to_owned()),
        ("WARDEN_FORGE_JWKS_URL", jwks.jwks_url()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // A in this process (its store is read below), B in its own.
    let a = spawn_app_with(env.iter().fold(
        Options::new(Backend::Redis).shared(&cluster),
        |o, (k, v)| o.set(k, *v),
    ))
    .await;
    let b = cluster.spawn("B", &env).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    connect_install(&a, &site, None, &cloud).await;
    let event = lifecycle_event(INSTALLED, &installation, "2.1.0");
    let first = send(&a, &fit_of(&installation, &cloud), &event).await;
    assert_eq!(first["outcome"], "applied");
    let applied = record(&a, &site).await;

    let retry = as_retry(event, 1, "TIMEOUT");
    let on_a = send(&a, &fit_of(&installation, &cloud), &retry).await;
    assert_eq!(on_a["outcome"], "duplicate");
    assert_eq!(on_a["retry"], true);
    let on_b = send(&b, &fit_of(&installation, &cloud), &retry).await;
    assert_eq!(on_b["outcome"], "unchanged");
    let after = record(&a, &site).await;
    assert_eq!(after.version, applied.version, "written again");
    assert_eq!(after.updated_at, applied.updated_at);
}

/// `preUninstall` is recorded on the bound installation, which is still served (Connect's
/// `uninstalled` or the end of the subscription ends it, not this trigger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_uninstall_is_recorded_and_the_installation_still_served() {
    let (_jwks, app) = forge_app(Backend::Embedded).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    connect_install(&app, &site, Some(&installation), &cloud).await;
    let answer = send(
        &app,
        &fit_of(&installation, &cloud),
        &lifecycle_event("preUninstall", &installation, "2.1.0"),
    )
    .await;
    assert_eq!(answer["outcome"], "applied");
    let stored = record(&app, &site).await;
    let since = stored.forge.unwrap().uninstalling_since.expect("recorded");
    assert!((connect_protocol::jwt::now() - since).abs() < 60);
    assert_eq!(
        app.tenant_body(&site).await["clientKey"],
        site.client_key.as_str()
    );
    assert_eq!(
        linked(&app, &fit_of(&installation, &cloud)).await,
        site.client_key.as_str()
    );
}

/// The FIT does not cover the body: a body naming another installation than its token is
/// refused (`400`, naming both), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_naming_another_installation_than_its_token_is_refused() {
    let (_jwks, app) = forge_app(Backend::Embedded).await;
    let site = Site::new();
    let (installation, other, cloud) = (new_id(), new_id(), new_id());
    connect_install(&app, &site, Some(&installation), &cloud).await;
    let before = serde_json::to_value(record(&app, &site).await).unwrap();
    for field in ["id", "installationId"] {
        let mut event = lifecycle_event(INSTALLED, &installation, "2.1.0");
        event[field] = ari(&other).into();
        let response = post_event(
            &app,
            Some(format!("Bearer {}", fit_of(&installation, &cloud).sign())),
            &event,
        )
        .await;
        assert_eq!(response.status(), 400, "{field}");
        let error = error_of(response).await;
        assert!(error.contains(&other), "{error}");
        assert!(error.contains("does not match"), "{error}");
    }
    let unknown = lifecycle_event("avi:forge:uninstalled:app", &installation, "2.1.0");
    let response = post_event(
        &app,
        Some(format!("Bearer {}", fit_of(&installation, &cloud).sign())),
        &unknown,
    )
    .await;
    assert_eq!(response.status(), 400);
    assert!(error_of(response)
        .await
        .contains("avi:forge:uninstalled:app"));
    assert_eq!(
        serde_json::to_value(record(&app, &site).await).unwrap(),
        before
    );
}

/// Forge events never re-enable an installation Connect disabled: it is not linked, and the
/// event stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_never_re_enables_a_disabled_installation() {
    let (_jwks, app) = forge_app(Backend::Embedded).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    connect_install(&app, &site, Some(&installation), &cloud).await;
    app.disabled(&site).await;
    let before = record(&app, &site).await;
    assert!(!before.enabled);
    let answer = send(
        &app,
        &fit_of(&installation, &cloud),
        &lifecycle_event(INSTALLED, &installation, "3.0.0"),
    )
    .await;
    assert_eq!(answer["outcome"], "unlinked");
    let after = record(&app, &site).await;
    assert!(!after.enabled);
    assert_eq!(after.version, before.version);
}
