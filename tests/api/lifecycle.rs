//! The signed-install lifecycle over HTTP, from the host's side and from the attacker's.
//! Every refused callback is checked for its status, its message, and that nothing was stored.

use crate::helpers::app::{both_stores, error_of, spawn_app, Backend, Site, TestApp, APP_BASE_URL};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use connect_protocol::jwt::{self, Audience};
use connect_warden::store::InstallState;
use devtenant::{sign_rs256, sign_rs256_with_kid, SigningKey};
use serde_json::json;

/// A refused first install: status, message fragment, and an empty store.
async fn assert_refused_first_install(
    app: &TestApp,
    response: reqwest::Response,
    status: u16,
    fragment: &str,
) {
    assert_eq!(response.status().as_u16(), status);
    let message = error_of(response).await;
    assert!(
        message.contains(fragment),
        "message {message:?} lacks {fragment:?}"
    );
    assert_eq!(
        app.stored_count().await,
        0,
        "a refused callback stored something"
    );
}

async fn signed_install_then_product_request(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;

    let stored = app
        .stored(&site.client_key)
        .await
        .expect("installation stored");
    assert_eq!(stored.state, InstallState::Installed);
    assert!(stored.signed_install);
    assert_eq!(stored.current_secret().secret.expose(), site.secret);
    assert_eq!(
        stored.oauth_client_id.as_deref(),
        Some(site.oauth_client_id.as_str())
    );

    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    let response = app.tenant(&token).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["clientKey"], site.client_key);
    assert_eq!(body["baseUrl"], site.base_url);
    assert_eq!(body["productType"], "jira");
    assert_eq!(body["accountId"], "557058:user-account-id");
}

async fn unsigned_install_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let response = app
        .post_lifecycle("/installed", None, &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "must carry Atlassian's signature").await;
}

async fn hs256_install_with_attacker_secret_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let token = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "expected RS256").await;
}

async fn install_signed_by_another_private_key_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let attacker = SigningKey::generate();
    let claims = app.install_claims(&site.client_key, "/installed");
    // The attacker's key under the real kid: the signature cannot verify.
    let real_kid = app.keys.keyring().read().unwrap().current().kid.clone();
    let token = sign_rs256_with_kid(&attacker, &real_kid, &claims);
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "signature does not verify").await;
}

async fn unknown_kid_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let attacker = SigningKey::generate();
    let token = sign_rs256(
        &attacker,
        &app.install_claims(&site.client_key, "/installed"),
    );
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "does not know kid").await;
    assert_eq!(app.keys.fetches(&attacker.kid), 1);
}

async fn kid_that_is_not_a_uuid_never_reaches_the_network(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let key = crate::helpers::app::shared_signing_key();
    let claims = app.install_claims(&site.client_key, "/installed");
    for kid in [
        "../../admin",
        "https://evil.example.com/key.pem",
        "%2e%2e%2fx",
        "a/b",
        "",
    ] {
        let token = sign_rs256_with_kid(&key, kid, &claims);
        let response = app
            .post_lifecycle("/installed", Some(&token), &site.body("installed"))
            .await;
        assert_refused_first_install(&app, response, 401, "kid is not a UUID").await;
    }
    assert_eq!(app.keys.total_fetches(), 0, "a bad kid caused a key fetch");
}

async fn alg_none_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let claims = app.install_claims(&site.client_key, "/installed");
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let token = format!("{header}.{payload}.");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, r#"alg "none" is not accepted"#).await;
}

async fn hs256_signed_with_the_public_key_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let public_pem = app
        .keys
        .keyring()
        .read()
        .unwrap()
        .current()
        .public_pem()
        .to_owned();
    let kid = app.keys.keyring().read().unwrap().current().kid.clone();
    let claims = app.install_claims(&site.client_key, "/installed");
    // Algorithm confusion: the public key (known to all) used as an HMAC secret.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid);
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, r#"alg "HS256" is not accepted"#).await;
}

async fn wrong_audience_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let mut claims = app.install_claims(&site.client_key, "/installed");
    claims.aud = Some(Audience::One("https://other-app.example.com".into()));
    let token = app.sign_install(&claims);
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "aud").await;

    // A list naming this app (with a trailing slash) is fine.
    claims.aud = Some(Audience::Many(vec![
        "https://x.example.com".into(),
        format!("{APP_BASE_URL}/"),
    ]));
    let token = app.sign_install(&claims);
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 204);
}

async fn iss_other_than_body_client_key_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let other = Site::new();
    let token = app.install_token(&other.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 403, "iss does not equal").await;
}

async fn wrong_or_missing_qsh_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    // A token made for /uninstalled replayed against /installed.
    let token = app.install_token(&site.client_key, "/uninstalled");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 401, "qsh does not match").await;

    let mut claims = app.install_claims(&site.client_key, "/installed");
    claims.qsh = None;
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &site.body("installed"),
        )
        .await;
    assert_refused_first_install(&app, response, 401, "no qsh claim").await;

    claims.qsh = Some("context-qsh".into());
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &site.body("installed"),
        )
        .await;
    assert_refused_first_install(&app, response, 401, "context token").await;
}

async fn expired_or_future_tokens_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let mut claims = app.install_claims(&site.client_key, "/installed");
    let now = jwt::now();
    claims.iat = Some(now - 600);
    claims.exp = Some(now - 300);
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &site.body("installed"),
        )
        .await;
    assert_refused_first_install(&app, response, 401, "expired").await;

    claims.iat = Some(now + 300);
    claims.exp = Some(now + 600);
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &site.body("installed"),
        )
        .await;
    assert_refused_first_install(&app, response, 401, "in the future").await;

    claims.iat = None;
    let response = app
        .post_lifecycle(
            "/installed",
            Some(&app.sign_install(&claims)),
            &site.body("installed"),
        )
        .await;
    assert_refused_first_install(&app, response, 401, "no iat").await;
}

async fn host_not_allowed_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    site.base_url = "https://acme.atlassian.net.evil.example.com".into();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 403, "not an allowed product host").await;
}

async fn malformed_and_oversized_bodies_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_raw("/installed", Some(&token), b"{not json".to_vec())
        .await;
    assert_refused_first_install(&app, response, 400, "not a JSON lifecycle payload").await;

    let mut body = site.body("installed");
    body.as_object_mut().unwrap().remove("sharedSecret");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_refused_first_install(&app, response, 400, "sharedSecret").await;

    let mut body = site.body("installed");
    body["clientKey"] = json!("has{hash}tag");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_refused_first_install(&app, response, 400, "clientKey").await;

    let mut body = site.body("installed");
    body["padding"] = json!("x".repeat(70 * 1024));
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_refused_first_install(&app, response, 413, "larger than 65536 bytes").await;
}

async fn retry_is_idempotent_and_replay_with_other_body_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let body = site.body("installed");
    assert_eq!(
        app.post_lifecycle("/installed", Some(&token), &body)
            .await
            .status(),
        204
    );
    let first = app.stored(&site.client_key).await.unwrap();

    // The host retries a timed-out callback: same token, same body.
    assert_eq!(
        app.post_lifecycle("/installed", Some(&token), &body)
            .await
            .status(),
        204
    );
    assert_eq!(
        app.stored(&site.client_key).await.unwrap().version,
        first.version,
        "a retry wrote"
    );

    // A captured token with the attacker's secret in the body.
    let mut forged = body.clone();
    forged["sharedSecret"] = json!("attacker-chosen-secret");
    let response = app
        .post_lifecycle("/installed", Some(&token), &forged)
        .await;
    assert_eq!(response.status(), 409);
    assert!(error_of(response).await.contains("replay"));
    let after = app.stored(&site.client_key).await.unwrap();
    assert_eq!(after.version, first.version);
    assert_eq!(after.current_secret().secret.expose(), site.secret);
}

async fn older_install_cannot_roll_the_secret_back(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    let old_claims = {
        let mut c = app.install_claims(&site.client_key, "/installed");
        c.iat = Some(jwt::now() - 60);
        c
    };
    let old_token = app.sign_install(&old_claims);
    let old_body = site.body("installed");
    app.installed(&site).await; // newer install (iat now)
    site.secret = "rolled-secret-newer".into();
    app.installed(&site).await;
    let before = app.stored(&site.client_key).await.unwrap();

    let response = app
        .post_lifecycle("/installed", Some(&old_token), &old_body)
        .await;
    assert_eq!(response.status(), 409);
    assert!(error_of(response).await.contains("stale"));
    let after = app.stored(&site.client_key).await.unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(
        after.current_secret().secret.expose(),
        "rolled-secret-newer"
    );
}

async fn cross_tenant_overwrite_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let victim = Site::new();
    app.installed(&victim).await;
    let before = app.stored(&victim.client_key).await.unwrap();

    // The attacker owns a real site (a genuine Atlassian token for its own clientKey) and
    // posts the victim's clientKey with a secret of its choosing.
    let attacker = Site::new();
    let token = app.install_token(&attacker.client_key, "/installed");
    let mut body = victim.body("installed");
    body["sharedSecret"] = json!("attacker-secret");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 403);
    let after = app.stored(&victim.client_key).await.unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(after.current_secret().secret.expose(), victim.secret);
    assert!(app.stored(&attacker.client_key).await.is_none());
}

async fn secret_roll_keeps_history_and_new_secret_works(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let old_secret = site.secret.clone();
    site.secret = "the-rolled-secret".into();
    app.installed(&site).await;

    let stored = app.stored(&site.client_key).await.unwrap();
    let history: Vec<&str> = stored.secrets.iter().map(|s| s.secret.expose()).collect();
    assert_eq!(history, vec![old_secret.as_str(), "the-rolled-secret"]);
    assert_eq!(app.tenant_status(&site, "the-rolled-secret").await, 200);
    // In flight from before the roll, within the grace window: accepted.
    let in_flight = app.product_token(
        &site.client_key,
        &old_secret,
        "GET",
        "/api/tenant",
        stored.current_secret().since - 5,
    );
    assert_eq!(app.tenant(&in_flight).await.status(), 200);
    // Issued after the roll with the old secret: refused even within the grace window.
    assert_eq!(app.tenant_status(&site, &old_secret).await, 401);
}

async fn uninstall_keeps_the_record_and_blocks_requests_until_reinstall(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let token = app.install_token(&site.client_key, "/uninstalled");
    assert_eq!(
        app.post_lifecycle("/uninstalled", Some(&token), &site.body("uninstalled"))
            .await
            .status(),
        204
    );

    let stored = app
        .stored(&site.client_key)
        .await
        .expect("record kept after uninstall");
    assert_eq!(stored.state, InstallState::Uninstalled);
    assert_eq!(stored.current_secret().secret.expose(), site.secret);
    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    let response = app.tenant(&token).await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response).await.contains("uninstalled"));

    // Unsigned uninstall (an attacker knocking a tenant out) is refused.
    app.installed(&site).await;
    let response = app
        .post_lifecycle("/uninstalled", None, &site.body("uninstalled"))
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        app.stored(&site.client_key).await.unwrap().state,
        InstallState::Installed
    );
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

async fn disable_and_enable_need_the_tenant_secret(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;

    let forged = app.tenant_lifecycle_token(&site.client_key, "not-the-secret", "/disabled");
    assert_eq!(
        app.post_lifecycle("/disabled", Some(&forged), &site.body("disabled"))
            .await
            .status(),
        401
    );
    assert!(app.stored(&site.client_key).await.unwrap().enabled);

    let token = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/disabled");
    assert_eq!(
        app.post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
            .await
            .status(),
        204
    );
    assert!(!app.stored(&site.client_key).await.unwrap().enabled);
    let response = app
        .get_with_token(
            "/api/tenant",
            &app.product_token(
                &site.client_key,
                &site.secret,
                "GET",
                "/api/tenant",
                jwt::now(),
            ),
        )
        .await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response).await.contains("disabled"));

    let token = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/enabled");
    assert_eq!(
        app.post_lifecycle("/enabled", Some(&token), &site.body("enabled"))
            .await
            .status(),
        204
    );
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

async fn disabled_and_uninstalled_milliseconds_apart(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let disable = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/disabled");
    let uninstall = app.install_token(&site.client_key, "/uninstalled");
    let (disabled_body, uninstalled_body) = (site.body("disabled"), site.body("uninstalled"));
    let (a, b) = tokio::join!(
        app.post_lifecycle("/disabled", Some(&disable), &disabled_body),
        app.post_lifecycle("/uninstalled", Some(&uninstall), &uninstalled_body),
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (204, 204));
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.state, InstallState::Uninstalled);
    assert!(!stored.enabled);
}

async fn key_server_outage_is_503_and_stores_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.keys.set_failing(true);
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_refused_first_install(&app, response, 503, "install-key server is unavailable").await;
    // Not cached: once the server is back the same install goes through.
    app.keys.set_failing(false);
    assert_eq!(
        app.post_lifecycle("/installed", Some(&token), &site.body("installed"))
            .await
            .status(),
        204
    );
}

async fn hundred_concurrent_installs_fetch_the_key_once(backend: Backend) {
    let app = spawn_app(backend).await;
    app.keys.set_delay(std::time::Duration::from_millis(200));
    let sites: Vec<Site> = (0..100).map(|_| Site::new()).collect();
    let responses = futures_util::future::join_all(sites.iter().map(|site| async {
        let token = app.install_token(&site.client_key, "/installed");
        app.post_lifecycle("/installed", Some(&token), &site.body("installed"))
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert!(responses.iter().all(|s| *s == 204), "{responses:?}");
    assert_eq!(app.keys.total_fetches(), 1);
    assert_eq!(app.stored_count().await, 100);
}

/// The install key server is chosen by the body's baseUrl, which the token does not cover: a
/// clientKey may not move between production and staging sites.
async fn a_tenant_cannot_move_to_a_staging_site(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let before = app.stored(&site.client_key).await.unwrap();
    site.base_url = "https://acme.jira-dev.com".into();
    site.secret = "staging-signed-secret".into();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response).await.contains("production and staging"));
    let after = app.stored(&site.client_key).await.unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(after.base_url, before.base_url);
}

both_stores!(
    signed_install_then_product_request,
    unsigned_install_is_refused,
    hs256_install_with_attacker_secret_is_refused,
    install_signed_by_another_private_key_is_refused,
    unknown_kid_is_refused,
    kid_that_is_not_a_uuid_never_reaches_the_network,
    alg_none_is_refused,
    hs256_signed_with_the_public_key_is_refused,
    wrong_audience_is_refused,
    iss_other_than_body_client_key_is_refused,
    wrong_or_missing_qsh_is_refused,
    expired_or_future_tokens_are_refused,
    host_not_allowed_is_refused,
    malformed_and_oversized_bodies_are_refused,
    retry_is_idempotent_and_replay_with_other_body_is_refused,
    older_install_cannot_roll_the_secret_back,
    cross_tenant_overwrite_is_refused,
    secret_roll_keeps_history_and_new_secret_works,
    uninstall_keeps_the_record_and_blocks_requests_until_reinstall,
    disable_and_enable_need_the_tenant_secret,
    disabled_and_uninstalled_milliseconds_apart,
    key_server_outage_is_503_and_stores_nothing,
    hundred_concurrent_installs_fetch_the_key_once,
    a_tenant_cannot_move_to_a_staging_site,
);
