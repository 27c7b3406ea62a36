//! Legacy (symmetric) installs, `WARDEN_INSTALL_AUTH=legacy`: the unsigned first install, HS256
//! reinstalls signed with a secret the installation holds or held, and seed 001's secret
//! migration rehearsal (install, ignore the uninstall, install again signed with the old secret).

use crate::helpers::app::{both_stores, error_of, spawn_app_with, Backend, Options, Site, TestApp};
use serde_json::json;

async fn legacy_app(backend: Backend) -> TestApp {
    spawn_app_with(
        Options::new(backend)
            .legacy()
            .set("WARDEN_SECRET_GRACE_SECONDS", "0"),
    )
    .await
}

async fn unsigned_install(app: &TestApp, site: &Site) -> reqwest::Response {
    app.post_lifecycle("/installed", None, &site.body("installed"))
        .await
}

async fn signed_reinstall(app: &TestApp, site: &Site, signing_secret: &str) -> reqwest::Response {
    let token = app.tenant_lifecycle_token(&site.client_key, signing_secret, "/installed");
    app.post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await
}

async fn unsigned_first_install_is_accepted(backend: Backend) {
    let app = legacy_app(backend).await;
    let site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    let stored = app.stored(&site.client_key).await.unwrap();
    assert!(!stored.signed_install);
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

async fn unsigned_install_for_a_known_client_key_is_refused(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    let original = site.secret.clone();
    site.secret = "attacker-secret".into();
    let response = unsigned_install(&app, &site).await;
    assert_eq!(response.status(), 401);
    assert!(error_of(response).await.contains("must be signed"));
    assert_eq!(
        app.stored(&site.client_key)
            .await
            .unwrap()
            .current_secret()
            .secret
            .expose(),
        original
    );
}

async fn reinstall_signed_with_an_attacker_secret_is_refused(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    let original = site.secret.clone();
    site.secret = "attacker-secret".into();
    let response = signed_reinstall(&app, &site, "attacker-secret").await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        app.stored(&site.client_key)
            .await
            .unwrap()
            .current_secret()
            .secret
            .expose(),
        original
    );
}

/// Seed 001: install, ignore the uninstall, install again signed with the old secret and
/// carrying a new one. The new secret is stored and works; the old one no longer does.
async fn seed_001_migration_rehearsal(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    let old = site.secret.clone();
    // (The uninstall is ignored: nothing is sent.)
    site.secret = "migrated-secret".into();
    assert_eq!(signed_reinstall(&app, &site, &old).await.status(), 204);

    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.current_secret().secret.expose(), "migrated-secret");
    assert_eq!(app.tenant_status(&site, "migrated-secret").await, 200);
    assert_eq!(app.tenant_status(&site, &old).await, 401);
}

/// Seed 001 #12: the uninstall WAS processed; the reinstall is still signed with the secret of
/// the uninstalled installation, which is why secrets are kept after an uninstall.
async fn reinstall_after_processed_uninstall_verifies_with_the_kept_secret(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    let old = site.secret.clone();
    let uninstall = app.tenant_lifecycle_token(&site.client_key, &old, "/uninstalled");
    assert_eq!(
        app.post_lifecycle("/uninstalled", Some(&uninstall), &site.body("uninstalled"))
            .await
            .status(),
        204
    );
    assert_eq!(app.tenant_status(&site, &old).await, 403);

    site.secret = "after-uninstall-secret".into();
    assert_eq!(signed_reinstall(&app, &site, &old).await.status(), 204);
    assert_eq!(
        app.tenant_status(&site, "after-uninstall-secret").await,
        200
    );
}

async fn reinstall_signed_with_an_older_secret_from_history_is_accepted(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);
    let first = site.secret.clone();
    site.secret = "second".into();
    assert_eq!(signed_reinstall(&app, &site, &first).await.status(), 204);
    site.secret = "third".into();
    // Signed with the first secret, two rolls back: still one this installation held.
    assert_eq!(signed_reinstall(&app, &site, &first).await.status(), 204);
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.secrets.len(), 3);
    assert_eq!(stored.current_secret().secret.expose(), "third");
}

async fn signed_install_is_still_verified_in_legacy_mode(backend: Backend) {
    let app = legacy_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    assert!(app.stored(&site.client_key).await.unwrap().signed_install);

    // An RS256 token that fails verification is not "downgraded" to the unsigned path.
    let other = Site::new();
    let mut claims = app.install_claims(&other.client_key, "/installed");
    claims.aud = Some(connect_protocol::jwt::Audience::One(
        "https://elsewhere.example.com".into(),
    ));
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &other.body("installed"),
        )
        .await;
    assert_eq!(response.status(), 401);
    assert!(app.stored(&other.client_key).await.is_none());
}

async fn unsigned_install_from_a_foreign_host_is_refused(backend: Backend) {
    let app = legacy_app(backend).await;
    let site = Site::new();
    let mut body = site.body("installed");
    body["baseUrl"] = json!("https://evil.example.com");
    let response = app.post_lifecycle("/installed", None, &body).await;
    assert_eq!(response.status(), 403);
    assert_eq!(app.stored_count().await, 0);
}

/// A squatter registers a clientKey with an unsigned install before the site really installs
/// the app; Atlassian's signed install then takes over. The squatter's secret stays in the
/// history but proves nothing any more: no HS256 reinstall signed with it, and no grace for
/// product requests signed with it.
async fn a_squatted_secret_is_worthless_after_the_signed_install(backend: Backend) {
    let app = spawn_app_with(
        Options::new(backend)
            .legacy()
            .set("WARDEN_SECRET_GRACE_SECONDS", "180"),
    )
    .await;
    let mut site = Site::new();
    let genuine_secret = site.secret.clone();
    site.secret = "squatter-secret".into();
    let squatted_at = connect_protocol::jwt::now();
    assert_eq!(unsigned_install(&app, &site).await.status(), 204);

    site.secret = genuine_secret.clone();
    app.installed(&site).await; // Atlassian's RS256 install with the genuine secret
    assert_eq!(app.tenant_status(&site, &genuine_secret).await, 200);

    // Grace: a token "issued before the roll" with the squatter's secret.
    let old = app.product_token(
        &site.client_key,
        "squatter-secret",
        "GET",
        "/api/tenant",
        squatted_at - 5,
    );
    assert_eq!(app.tenant(&old).await.status(), 401);

    // Reinstall signed with the squatter's secret, carrying yet another secret.
    let mut takeover = site.clone();
    takeover.secret = "squatter-second-secret".into();
    let response = signed_reinstall(&app, &takeover, "squatter-secret").await;
    assert_eq!(response.status(), 401);
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.current_secret().secret.expose(), genuine_secret);

    // The genuine secret still signs a legacy reinstall.
    let mut roll = site.clone();
    roll.secret = "genuine-rolled".into();
    assert_eq!(
        signed_reinstall(&app, &roll, &genuine_secret)
            .await
            .status(),
        204
    );
    assert_eq!(app.tenant_status(&roll, "genuine-rolled").await, 200);
}

both_stores!(
    unsigned_first_install_is_accepted,
    unsigned_install_for_a_known_client_key_is_refused,
    reinstall_signed_with_an_attacker_secret_is_refused,
    seed_001_migration_rehearsal,
    reinstall_after_processed_uninstall_verifies_with_the_kept_secret,
    reinstall_signed_with_an_older_secret_from_history_is_accepted,
    signed_install_is_still_verified_in_legacy_mode,
    unsigned_install_from_a_foreign_host_is_refused,
    a_squatted_secret_is_worthless_after_the_signed_install,
);

/// A tenant-signed event whose `exp` is as late as a number allows is applied whole on Redis:
/// its replay memory is kept too (a script is not rolled back, so a refused write of it after
/// the record's would store the change yet answer an error and announce nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_with_the_latest_exp_is_applied_whole_on_redis() {
    use connect_protocol::{claims, domain::SharedSecret, jwt, qsh::CanonicalRequest};
    let app = spawn_app_with(Options::new(Backend::Redis).legacy()).await;
    let site = Site::new();
    app.installed(&site).await;
    let request = CanonicalRequest::new("POST", "/disabled", "", "");
    let claims = claims::tenant_claims(&site.client_key, &request, jwt::now(), i64::MAX);
    let token = jwt::sign_hs256(&claims, &SharedSecret::parse(&site.secret).unwrap());
    let response = app
        .post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
        .await;
    assert_eq!(response.status(), 204);
    let after = app.stored(&site.client_key).await.unwrap();
    assert!(!after.enabled);
    // Remembered: the same token again is a retry, which writes nothing.
    let again = app
        .post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
        .await;
    assert_eq!(again.status(), 204);
    assert_eq!(
        app.stored(&site.client_key).await.unwrap().version,
        after.version
    );
}
