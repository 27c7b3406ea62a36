//! The service around the protocol: descriptor, health and readiness, JSON errors, and what a
//! store outage looks like to callers.

use crate::helpers::app::{error_of, spawn_app, spawn_app_with, Backend, Options, Site};

#[tokio::test]
async fn descriptor_declares_lifecycle_and_migrations() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app.descriptor().await;
    assert_eq!(response.status(), 200);
    let d: serde_json::Value = response.json().await.unwrap();
    assert_eq!(d["baseUrl"], crate::helpers::app::APP_BASE_URL);
    assert_eq!(d["key"], "connect-warden");
    assert_eq!(d["apiMigrations"]["signed-install"], true);
    assert_eq!(d["apiMigrations"]["context-qsh"], true);
    for event in ["installed", "uninstalled", "enabled", "disabled"] {
        assert_eq!(d["lifecycle"][event], format!("/{event}"));
    }
}

#[tokio::test]
async fn app_key_setting_overrides_the_descriptor_and_checks_bodies() {
    let app =
        spawn_app_with(Options::new(Backend::Embedded).set("WARDEN_APP_KEY", "vendor-app")).await;
    let d: serde_json::Value = app.descriptor().await.json().await.unwrap();
    assert_eq!(d["key"], "vendor-app");
    // A body for another app key is refused.
    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 400);
    assert!(error_of(response).await.contains("app key"));
    assert_eq!(app.stored_count().await, 0);
}

#[tokio::test]
async fn health_and_readiness() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let app = spawn_app(backend).await;
        for route in ["/healthz", "/readyz"] {
            let response = app.client.get(app.url(route)).send().await.unwrap();
            assert_eq!(response.status(), 200, "{route} on {backend:?}");
        }
    }
    // One process, nothing to hear from others: always served from the cache.
    let app = spawn_app(Backend::Embedded).await;
    let body: serde_json::Value = app.readyz().await.json().await.unwrap();
    assert_eq!(body["invalidations"], "subscribed");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_of(response).await, "no such route");
}

/// A Redis that is down: the service starts, says it is not ready, and answers 503 (never a
/// silent success) until Redis is back.
#[tokio::test]
async fn store_outage_is_503() {
    let dead_port = crate::helpers::free_port();
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_REDIS_URL", format!("redis://127.0.0.1:{dead_port}"))
            .set("WARDEN_REDIS_PREFIX", "outage"),
    )
    .await;
    assert_eq!(app.healthz().await.status(), 200);
    let response = app.readyz().await;
    assert_eq!(response.status(), 503);
    assert!(error_of(response).await.contains("store is unavailable"));

    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 503);

    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant",
        connect_protocol::jwt::now(),
    );
    assert_eq!(app.tenant(&token).await.status(), 503);
}

/// A vendor route registered with `Application::build_with_routes` sits under the base path
/// and is guarded like warden's own.
#[tokio::test]
async fn vendor_routes_are_served_under_the_base_path_and_guarded() {
    use actix_web::{web, HttpResponse};
    use connect_warden::guard::ProductRequest;

    async fn hello(tenant: ProductRequest) -> HttpResponse {
        HttpResponse::Ok().body(format!("hello {}", tenant.client_key))
    }
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_BASE_URL", "https://warden.example.com/app")
            .routes(|cfg| {
                cfg.route("/api/hello", web::get().to(hello));
            }),
    )
    .await;
    let site = Site::new();
    app.installed(&site).await;
    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/hello",
        connect_protocol::jwt::now(),
    );
    let response = app.get_with_token("/api/hello", &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        format!("hello {}", site.client_key)
    );
    let forged = app.product_token(
        &site.client_key,
        "guess",
        "GET",
        "/api/hello",
        connect_protocol::jwt::now(),
    );
    assert_eq!(
        app.get_with_token("/api/hello", &forged).await.status(),
        401
    );
    // warden's own routes are still there.
    assert_eq!(app.healthz().await.status(), 200);
}
