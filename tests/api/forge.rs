//! Forge Remote from the caller's side: Forge Invocation Tokens on `GET /api/tenant`, each
//! rule refused with its own message, Forge's JWKS (rotation, outage, made-up kids) counted at
//! devtenant's JWKS server, and the link to a stored Connect installation.

use std::sync::OnceLock;

use crate::helpers::app::{
    error_of, shared_signing_key, spawn_app_with, Backend, Cluster, Options, Site, TestApp,
};
use connect_protocol::jwt;
use devtenant::{FitSigner, JwksServer, JwksService, SigningKey};
use serde_json::json;

const APP_UUID: &str = "7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";
const APP_ARI: &str = "ari:cloud:ecosystem::app/7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";

/// A key Forge does not publish (until a test rotates to it).
fn other_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate).clone()
}

/// Forge's JWKS publishing [`shared_signing_key`], and warden with Forge Remote on.
async fn forge_app() -> (JwksServer, TestApp) {
    let jwks = JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap();
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_FORGE_APP_ID", APP_UUID)
            .set("WARDEN_FORGE_JWKS_URL", jwks.jwks_url()),
    )
    .await;
    (jwks, app)
}

/// A valid FIT for the app, signed by the published key.
fn fit() -> FitSigner {
    FitSigner::new(&shared_signing_key(), APP_ARI)
}

/// `GET /api/tenant` with `Authorization: <authorization>`.
async fn tenant_with(app: &TestApp, authorization: &str) -> reqwest::Response {
    app.client
        .get(app.url("/api/tenant"))
        .header("authorization", authorization)
        .send()
        .await
        .expect("request reaches the app")
}

async fn tenant_as(app: &TestApp, fit: &FitSigner) -> reqwest::Response {
    tenant_with(app, &format!("Bearer {}", fit.sign())).await
}

/// Asserts `status` and that the error names `message`.
async fn refused(response: reqwest::Response, status: u16, message: &str, case: &str) {
    assert_eq!(response.status(), status, "{case}");
    let error = error_of(response).await;
    assert!(
        error.contains(message),
        "{case}: {error:?} lacks {message:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_fit_gets_the_forge_tenant_view() {
    let (_jwks, app) = forge_app().await;
    let installation = uuid::Uuid::new_v4();
    let token = fit()
        .installation_id(&installation.to_string())
        .site("3c1e2d4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", "confluence")
        .user_call("557058:f00d", "https://acme.atlassian.net/wiki");
    let response = tenant_as(&app, &token).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["via"], "forge");
    // A bare UUID comes back as the installation ARI: one id, one form.
    assert_eq!(
        body["installationId"],
        format!("ari:cloud:ecosystem::installation/{installation}")
    );
    assert_eq!(body["cloudId"], "3c1e2d4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f");
    assert_eq!(
        body["apiBaseUrl"],
        "https://api.atlassian.com/ex/confluence/3c1e2d4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
    );
    assert_eq!(body["productType"], "confluence");
    assert_eq!(body["baseUrl"], "https://acme.atlassian.net/wiki");
    assert_eq!(body["accountId"], "557058:f00d");
    assert_eq!(body["moduleKey"], "warden-remote");
    assert_eq!(body["environmentType"], "DEVELOPMENT");
    assert_eq!(body["license"], json!({ "isActive": true }));
    assert_eq!(body["appVersion"], "2.1.0");
    assert_eq!(
        body["clientKey"],
        serde_json::Value::Null,
        "no Connect install stored"
    );

    // Connect tokens keep working on the same route, and say how they came.
    let site = Site::new();
    app.installed(&site).await;
    let connect = app.tenant_body(&site).await;
    assert_eq!(connect["via"], "connect");
    assert_eq!(connect["clientKey"], site.client_key.as_str());
}

/// Every FIT rule, from the attacker's side: its own `401` message, nothing stored or changed.
/// The algorithm and `kid` rules refuse before Forge's JWKS is asked anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fit_rule_refuses_with_its_own_message() {
    let (jwks, app) = forge_app().await;
    let site = Site::new();
    app.installed(&site).await;
    let before = serde_json::to_value(app.stored(&site.client_key).await.unwrap()).unwrap();
    let published = shared_signing_key();

    let before_any_key_lookup: Vec<(&str, String, &str)> = vec![
        (
            "empty bearer",
            "Bearer ".into(),
            "no Forge Invocation Token",
        ),
        ("not a JWT", "Bearer abc".into(), "is malformed"),
        (
            "alg none",
            format!("Bearer {}", fit().alg_none().sign()),
            "alg \"none\" is not accepted",
        ),
        (
            "HS256 with the public key as secret",
            format!(
                "Bearer {}",
                fit().hs256(published.public_pem().as_bytes()).sign()
            ),
            "alg \"HS256\" is not accepted",
        ),
        (
            "no kid",
            format!("Bearer {}", fit().without_kid().sign()),
            "no kid header",
        ),
    ];
    for (case, authorization, message) in &before_any_key_lookup {
        refused(tenant_with(&app, authorization).await, 401, message, case).await;
    }
    assert_eq!(
        jwks.service().fetches(),
        0,
        "a key was looked up for a token refused before"
    );

    let now = jwt::now();
    let cases: Vec<(&str, FitSigner, &str)> = vec![
        (
            "kid not published",
            fit().kid(&uuid::Uuid::new_v4().to_string()),
            "kid is not in Forge's key set",
        ),
        (
            "signed by another key under the published kid",
            fit().signed_by(&other_key()),
            "signature does not verify",
        ),
        ("wrong iss", fit().iss("forge/other"), "iss is not"),
        (
            "another app's aud",
            fit().aud("ari:cloud:ecosystem::app/00000000-0000-4000-8000-000000000000"),
            "aud does not name this app's ARI",
        ),
        ("bare uuid as aud", fit().aud(APP_UUID), "aud does not name"),
        (
            "expired beyond the leeway",
            fit().exp(now - 31).iat(now - 90).nbf(now - 90),
            "has expired",
        ),
        (
            "nbf beyond the leeway",
            fit().nbf(now + 31).exp(now + 90),
            "not valid yet",
        ),
        (
            "iat beyond the leeway",
            fit().iat(now + 31).exp(now + 90),
            "iat is in the future",
        ),
        ("no jti", fit().jti(None), "no jti claim"),
        (
            "no installationId",
            fit().with_claims(|c| c.app.as_mut().unwrap().installation_id = None),
            "no app.installationId claim",
        ),
        (
            "installationId not an id",
            fit().installation_id("ari:cloud:ecosystem::installation/../x"),
            "app.installationId is invalid",
        ),
        (
            "no apiBaseUrl",
            fit().with_claims(|c| c.app.as_mut().unwrap().api_base_url = None),
            "no app.apiBaseUrl claim",
        ),
    ];
    for (case, token, message) in &cases {
        refused(tenant_as(&app, token).await, 401, message, case).await;
    }
    // One fetch answered for the published kid and the made-up one alike.
    assert_eq!(jwks.service().fetches(), 1);

    assert_eq!(
        app.stored_count().await,
        1,
        "a refused FIT stored something"
    );
    let after = serde_json::to_value(app.stored(&site.client_key).await.unwrap()).unwrap();
    assert_eq!(
        before, after,
        "a refused FIT changed the Connect installation"
    );
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200, "the valid FIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_forge_remote_off_every_fit_is_refused() {
    let jwks = JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap();
    let app = spawn_app_with(Options::new(Backend::Embedded)).await;
    refused(
        tenant_as(&app, &fit()).await,
        401,
        "Forge Remote is off",
        "off",
    )
    .await;
    assert_eq!(jwks.service().fetches(), 0);
}

/// A Forge call for a tenant installed through Connect shows its clientKey: by installationId
/// (in either form), else by cloudId when the product matches too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_shows_the_client_key_of_the_same_connect_installation() {
    let (_jwks, app) = forge_app().await;
    let site = Site::new();
    let installation = uuid::Uuid::new_v4();
    let cloud_id = uuid::Uuid::new_v4().to_string();
    let mut body = site.body("installed");
    body["installationId"] = format!("ari:cloud:ecosystem::installation/{installation}").into();
    body["cloudId"] = cloud_id.as_str().into();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 204);

    let client_key_for = |token: FitSigner| {
        let app = &app;
        async move {
            let response = tenant_as(app, &token).await;
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()["clientKey"].clone()
        }
    };
    let by_installation = fit()
        .installation_id(&installation.to_string())
        .site(&cloud_id, "jira");
    assert_eq!(
        client_key_for(by_installation).await,
        site.client_key.as_str()
    );
    // The same installationId from another site is not this tenant.
    let from_another_site = fit()
        .installation_id(&installation.to_string())
        .site(&uuid::Uuid::new_v4().to_string(), "jira");
    assert_eq!(
        client_key_for(from_another_site).await,
        serde_json::Value::Null
    );
    let by_cloud = fit().site(&cloud_id, "jira");
    assert_eq!(client_key_for(by_cloud).await, site.client_key.as_str());
    let other_product = fit().site(&cloud_id, "confluence");
    assert_eq!(client_key_for(other_product).await, serde_json::Value::Null);
    let stranger = fit();
    assert_eq!(client_key_for(stranger).await, serde_json::Value::Null);
}

/// Forge starts signing with a new key it published: warden fetches the JWKS once for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_kid_in_the_jwks_is_fetched_once_and_verifies() {
    let (jwks, app) = forge_app().await;
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200);
    assert_eq!(jwks.service().fetches(), 1);

    let rotated = other_key();
    jwks.service().add(rotated.clone());
    // Twenty calls at once with the new kid, while the JWKS is slow: they share one fetch.
    jwks.service()
        .set_delay(std::time::Duration::from_millis(300));
    let calls = (0..20).map(|_| {
        let token = FitSigner::new(&rotated, APP_ARI);
        let app = &app;
        async move { tenant_as(app, &token).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(jwks.service().fetches(), 2, "one fetch for the new kid");
    assert_eq!(
        tenant_as(&app, &fit()).await.status(),
        200,
        "the older key still verifies"
    );
    assert_eq!(jwks.service().fetches(), 2);
}

/// While the JWKS is down, kids already fetched keep verifying; a kid never seen is `503`
/// (retry) rather than `401`: nobody can tell yet whether Forge signs with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_keeps_known_kids_working_and_unknown_ones_are_503() {
    let (jwks, app) = forge_app().await;
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200);
    jwks.service().set_failing(true);

    assert_eq!(
        tenant_as(&app, &fit()).await.status(),
        200,
        "known kid during the outage"
    );
    let unknown = FitSigner::new(&other_key(), APP_ARI);
    refused(
        tenant_as(&app, &unknown).await,
        503,
        "JWKS) is unavailable",
        "unknown kid during the outage",
    )
    .await;
    assert_eq!(
        jwks.service().fetches(),
        2,
        "the unknown kid made one fetch"
    );
    assert_eq!(
        tenant_as(&app, &fit()).await.status(),
        200,
        "known kid after a failed fetch"
    );
    assert_eq!(app.stored_count().await, 0);
}

/// A key Forge stopped publishing stops verifying once warden has fetched the new set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_dropped_from_the_jwks_stops_verifying_after_the_next_fetch() {
    let (jwks, app) = forge_app().await;
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200);
    jwks.service().rotate_to(other_key());
    let rotated = FitSigner::new(&other_key(), APP_ARI);
    assert_eq!(tenant_as(&app, &rotated).await.status(), 200);
    refused(
        tenant_as(&app, &fit()).await,
        401,
        "kid is not in Forge's key set",
        "the dropped key",
    )
    .await;
    assert_eq!(jwks.service().fetches(), 2);
}

/// Made-up kids cost nothing to send: however many, warden fetches the JWKS a bounded number of
/// times, refuses each with `401`, and the published kid keeps verifying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_kids_makes_a_bounded_number_of_jwks_fetches() {
    let (jwks, app) = forge_app().await;
    let requests = (0..60).map(|_| {
        let token = fit().kid(&uuid::Uuid::new_v4().to_string());
        let app = &app;
        async move { tenant_as(app, &token).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let burst = u64::from(connect_warden::forge::jwks::JWKS_FETCH_BUDGET.burst);
    let fetches = jwks.service().fetches();
    assert!(
        (1..=burst + 1).contains(&fetches),
        "{fetches} JWKS fetches for 60 made-up kids"
    );
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200);
    assert_eq!(app.stored_count().await, 0);
}

/// devtenant's own server publishes Forge's JWKS too (empty until keys are added), so a
/// rehearsal can point `WARDEN_FORGE_JWKS_URL` at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devtenants_server_serves_the_forge_jwks() {
    let keyring = std::sync::Arc::new(std::sync::RwLock::new(devtenant::KeyRing::with_key(
        shared_signing_key(),
    )));
    let server = devtenant::server::DevServer::start("127.0.0.1:0", keyring)
        .await
        .unwrap();
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_FORGE_APP_ID", APP_ARI)
            .set("WARDEN_FORGE_JWKS_URL", server.forge_jwks_url()),
    )
    .await;
    refused(
        tenant_as(&app, &fit()).await,
        503,
        "JWKS) is unavailable",
        "an empty JWKS is no key set",
    )
    .await;
    server.forge_jwks().add(shared_signing_key());
    assert_eq!(tenant_as(&app, &fit()).await.status(), 200);
    assert_eq!(server.forge_jwks().fetches(), 2);
}

// ---------------------------------------------------------------------------------------------
// Issue 9: the Forge identity index (docs/PROTOCOL.md §12)

/// Forge's JWKS publishing [`shared_signing_key`].
async fn forge_jwks() -> JwksServer {
    JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap()
}

/// Warden with Forge Remote on, on `backend`, with `extra` settings.
async fn forge_app_on(backend: Backend, extra: &[(&str, &str)]) -> (JwksServer, TestApp) {
    let jwks = forge_jwks().await;
    let options = extra.iter().fold(
        Options::new(backend)
            .set("WARDEN_FORGE_APP_ID", APP_UUID)
            .set("WARDEN_FORGE_JWKS_URL", jwks.jwks_url()),
        |options, (var, value)| options.set(var, *value),
    );
    (jwks, spawn_app_with(options).await)
}

/// The Forge Remote settings of a `warden` process trusting `jwks`.
fn forge_env(jwks: &JwksServer) -> [(&'static str, String); 2] {
    [
        ("WARDEN_FORGE_APP_ID", APP_UUID.to_owned()),
        ("WARDEN_FORGE_JWKS_URL", jwks.jwks_url()),
    ]
}

/// A signed `installed` of `site` for `product`, carrying `installationId` (as an ARI) and
/// `cloudId`.
async fn install_on_forge(
    app: &TestApp,
    site: &Site,
    product: &str,
    installation: &str,
    cloud: &str,
) {
    let mut body = site.body("installed");
    body["productType"] = product.into();
    body["installationId"] = format!("ari:cloud:ecosystem::installation/{installation}").into();
    body["cloudId"] = cloud.into();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 204, "{}", app.name);
}

/// A FIT naming only an installation (no site context): linked by `installationId` or not at
/// all.
fn fit_of_installation(installation: &str) -> FitSigner {
    fit()
        .installation_id(installation)
        .with_claims(|c| c.app.as_mut().unwrap().installation = None)
}

/// A FIT of a new installation on the site `cloud` for `product`: linked by `cloudId` only.
fn fit_of_site(cloud: &str, product: &str) -> FitSigner {
    fit().site(cloud, product)
}

/// The clientKey `GET /api/tenant` shows for `fit` (`null`: not linked).
async fn linked_client_key(app: &TestApp, fit: &FitSigner) -> serde_json::Value {
    let response = tenant_as(app, fit).await;
    assert_eq!(response.status(), 200, "{}", app.name);
    response.json::<serde_json::Value>().await.unwrap()["clientKey"].clone()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// On both stores: a FIT is linked through the index by `installationId`, and by `cloudId`
/// per product (Jira and Confluence on one site share the `cloudId`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_is_found_on_both_stores_per_product() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app_on(backend, &[]).await;
        let (jira, confluence) = (Site::new(), Site::new());
        let (jira_installation, confluence_installation, cloud) = (new_id(), new_id(), new_id());
        install_on_forge(&app, &jira, "jira", &jira_installation, &cloud).await;
        install_on_forge(
            &app,
            &confluence,
            "confluence",
            &confluence_installation,
            &cloud,
        )
        .await;

        let jira_key = serde_json::Value::from(jira.client_key.as_str());
        let confluence_key = serde_json::Value::from(confluence.client_key.as_str());
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&jira_installation)).await,
            jira_key
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&confluence_installation)).await,
            confluence_key
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&cloud, "jira")).await,
            jira_key
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&cloud, "confluence")).await,
            confluence_key
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&new_id(), "jira")).await,
            serde_json::Value::Null
        );
    }
}

/// A reinstall brings a new `installationId` for the same clientKey and `cloudId`: the new
/// one links, the old one no longer does (only the site's `cloudId` still would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinstall_with_a_new_installation_id_moves_the_link() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app_on(backend, &[]).await;
        let site = Site::new();
        let (first, second, cloud) = (new_id(), new_id(), new_id());
        install_on_forge(&app, &site, "jira", &first, &cloud).await;
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&first)).await,
            site.client_key.as_str()
        );
        let mut rolled = site.clone();
        rolled.secret = format!("{}-rolled", site.secret);
        install_on_forge(&app, &rolled, "jira", &second, &cloud).await;

        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&second)).await,
            site.client_key.as_str()
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&first)).await,
            serde_json::Value::Null,
            "the old installationId is no longer this installation's"
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&cloud, "jira")).await,
            site.client_key.as_str()
        );
    }
}

/// A site import: a new clientKey on the same site (same `cloudId`, a new `installationId`)
/// supersedes the old installation, which is never linked again, by either identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_installation_is_never_shown() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app_on(backend, &[("WARDEN_SITE_PROOF", "off")]).await;
        let old = Site::new();
        let mut new = Site::new();
        new.base_url = old.base_url.clone();
        let (old_installation, new_installation, cloud) = (new_id(), new_id(), new_id());
        install_on_forge(&app, &old, "jira", &old_installation, &cloud).await;
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&cloud, "jira")).await,
            old.client_key.as_str()
        );
        install_on_forge(&app, &new, "jira", &new_installation, &cloud).await;
        assert_eq!(
            app.tenant_status(&old, &old.secret).await,
            403,
            "superseded"
        );

        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&old_installation)).await,
            serde_json::Value::Null
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&new_installation)).await,
            new.client_key.as_str()
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_site(&cloud, "jira")).await,
            new.client_key.as_str(),
            "the cloudId maps to the active installation only"
        );
    }
}

/// Embedded: the index is on disk with the records; a restarted process links the FIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_survives_a_restart_on_embedded() {
    let jwks = forge_jwks().await;
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().display().to_string();
    let spawn = |name: &'static str| {
        let options = forge_env(&jwks).into_iter().fold(
            Options::new(Backend::Embedded).set("WARDEN_DATA_DIR", dir.as_str()),
            |options, (var, value)| options.set(var, value),
        );
        TestApp::spawn_process(name, options)
    };
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    let first = spawn("first").await;
    install_on_forge(&first, &site, "jira", &installation, &cloud).await;
    drop(first);

    let second = spawn("second").await;
    assert_eq!(
        linked_client_key(&second, &fit_of_installation(&installation)).await,
        site.client_key.as_str()
    );
    assert_eq!(
        linked_client_key(&second, &fit_of_site(&cloud, "jira")).await,
        site.client_key.as_str()
    );
}

/// Redis: an install through instance A is linked by instance B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_link() {
    let jwks = forge_jwks().await;
    let cluster = Cluster::new().await;
    let env = forge_env(&jwks);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = cluster.spawn("A", &env).await;
    let b = cluster.spawn("B", &env).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    install_on_forge(&a, &site, "jira", &installation, &cloud).await;
    assert_eq!(
        linked_client_key(&b, &fit_of_installation(&installation)).await,
        site.client_key.as_str()
    );
    assert_eq!(
        linked_client_key(&b, &fit_of_site(&cloud, "jira")).await,
        site.client_key.as_str()
    );
}

/// Records stored before the index existed (simulated: their index entries deleted) are
/// indexed by the next start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stored_before_the_index_are_indexed_at_start_up() {
    let jwks = forge_jwks().await;
    let cluster = Cluster::new().await;
    let env = forge_env(&jwks);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = cluster.spawn("A", &env).await;
    let site = Site::new();
    let (installation, cloud) = (new_id(), new_id());
    install_on_forge(&a, &site, "jira", &installation, &cloud).await;

    let mut redis = redis::Client::open(cluster.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let index: Vec<String> =
        redis::AsyncCommands::keys(&mut redis, format!("{}:forge-*", cluster.redis_prefix))
            .await
            .unwrap();
    assert_eq!(index.len(), 2, "{index:?}");
    let _: () = redis::AsyncCommands::del(&mut redis, &index).await.unwrap();
    assert_eq!(
        linked_client_key(&a, &fit_of_installation(&installation)).await,
        serde_json::Value::Null,
        "without its index entries the record is not found"
    );

    let b = cluster.spawn("B", &env).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let linked = linked_client_key(&b, &fit_of_installation(&installation)).await;
        if linked == site.client_key.as_str() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never backfilled: {linked}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Two active installations naming one `installationId` (which Forge never sends, but an
/// install body can claim): the newest binding wins, whatever the clientKeys' order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_installations_claiming_one_installation_id_the_newest_is_linked() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app_on(backend, &[]).await;
        let mut older = Site::new();
        older.client_key = format!("zz-{}", older.client_key);
        let mut newer = Site::new();
        newer.client_key = format!("aa-{}", newer.client_key);
        let installation = new_id();
        install_on_forge(&app, &older, "jira", &installation, &new_id()).await;
        // `installed_at` is in seconds.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        install_on_forge(&app, &newer, "jira", &installation, &new_id()).await;
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&installation)).await,
            newer.client_key.as_str()
        );
    }
}

/// Legacy mode accepts unsigned first installs, whose body may claim any `installationId`: a
/// newer unsigned claim never takes the link from an installation Atlassian's signature proved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_claim_of_an_installation_id_never_takes_the_link() {
    for backend in [Backend::Redis, Backend::Embedded] {
        let (_jwks, app) = forge_app_on(backend, &[("WARDEN_INSTALL_AUTH", "legacy")]).await;
        let genuine = Site::new();
        let installation = new_id();
        install_on_forge(&app, &genuine, "jira", &installation, &new_id()).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

        let claimer = Site::new();
        let mut body = claimer.body("installed");
        body["installationId"] = installation.as_str().into();
        body["cloudId"] = new_id().into();
        let response = app.post_lifecycle("/installed", None, &body).await;
        assert_eq!(
            response.status(),
            204,
            "legacy mode takes an unsigned first install"
        );
        assert_eq!(
            linked_client_key(&app, &fit_of_installation(&installation)).await,
            genuine.client_key.as_str()
        );
    }
}

/// Legacy mode: an attacker whose own site Atlassian installed sends an HS256 reinstall, with
/// their own secret, whose body names the victim's installationId. The claim is covered by no
/// signature of Atlassian's, so the victim's FITs stay linked to the victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_reinstall_naming_another_installation_never_takes_its_link() {
    let (_jwks, app) = forge_app_on(Backend::Embedded, &[("WARDEN_INSTALL_AUTH", "legacy")]).await;
    let victim = Site::new();
    let installation = new_id();
    install_on_forge(&app, &victim, "jira", &installation, &new_id()).await;
    // Newer than the victim's install, as the attacker's would be.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let attacker = Site::new();
    install_on_forge(&app, &attacker, "jira", &new_id(), &new_id()).await;
    let mut body = attacker.body("installed");
    body["installationId"] = format!("ari:cloud:ecosystem::installation/{installation}").into();
    let token = app.tenant_lifecycle_token(&attacker.client_key, &attacker.secret, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(
        response.status(),
        204,
        "legacy mode takes the HS256 reinstall"
    );
    assert_eq!(
        linked_client_key(&app, &fit_of_installation(&installation)).await,
        victim.client_key.as_str()
    );
}

/// Legacy mode: unsigned installs naming ids are never linked, neither alone nor beside the
/// genuine installation they would make ambiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_claims_are_never_linked_nor_hide_a_signed_link() {
    let (_jwks, app) = forge_app_on(Backend::Embedded, &[("WARDEN_INSTALL_AUTH", "legacy")]).await;
    let installation = new_id();
    let squatter = Site::new();
    let mut body = squatter.body("installed");
    body["installationId"] = installation.as_str().into();
    assert_eq!(
        app.post_lifecycle("/installed", None, &body).await.status(),
        204
    );
    assert_eq!(
        linked_client_key(&app, &fit_of_installation(&installation)).await,
        serde_json::Value::Null,
        "an unsigned claim alone is not linked"
    );

    let victim = Site::new();
    let cloud = new_id();
    install_on_forge(&app, &victim, "jira", &new_id(), &cloud).await;
    let squatter = Site::new();
    let mut body = squatter.body("installed");
    body["cloudId"] = cloud.as_str().into();
    assert_eq!(
        app.post_lifecycle("/installed", None, &body).await.status(),
        204
    );
    assert_eq!(
        linked_client_key(&app, &fit_of_site(&cloud, "jira")).await,
        victim.client_key.as_str(),
        "an unsigned claim of the same cloudId does not hide the genuine link"
    );
}
