//! The product-request guard over HTTP: where the token may come from, which tokens pass, the
//! grace window of a rolled secret, context tokens, and base URLs with a path.

use std::time::Duration;

use crate::helpers::app::{
    both_stores, error_of, spawn_app, spawn_app_with, Backend, Options, Site,
};
use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt::{self, Claims};
use connect_protocol::qsh::CanonicalRequest;
use serde_json::json;

async fn token_in_query_works_and_both_places_is_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant?b=2&a=1",
        jwt::now(),
    );
    let response = app
        .client
        .get(app.url(&format!("/api/tenant?b=2&a=1&jwt={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let response = app
        .client
        .get(app.url(&format!("/api/tenant?b=2&a=1&jwt={token}")))
        .header("authorization", format!("JWT {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(error_of(response).await.contains("both"));

    let response = app.client.get(app.url("/api/tenant")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(error_of(response).await.contains("no token"));
}

/// The qsh leaves out every parameter whose decoded name is `jwt`. A second one, or one next
/// to the header, would be an unsigned parameter riding along a valid token (the handler reads
/// `jwt` through the decoded query): refused, however the name is spelled.
async fn jwt_parameters_by_decoded_name_are_counted(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    let get = |query: String, header: bool| {
        let mut request = app.client.get(app.url(&format!("/api/tenant?{query}")));
        if header {
            request = request.header("authorization", format!("JWT {token}"));
        }
        request.send()
    };

    // An encoded name next to the header.
    for name in ["j%77t", "%6A%77%74", "%6awt"] {
        let response = get(format!("{name}={token}"), true).await.unwrap();
        assert_eq!(response.status(), 400, "?{name}= plus the header");
        assert!(error_of(response).await.contains("both"));
    }
    let response = get("j%77t=smuggled".into(), true).await.unwrap();
    assert_eq!(
        response.status(),
        400,
        "an unsigned j%77t next to the header"
    );
    let response = get("jwt".into(), true).await.unwrap();
    assert_eq!(response.status(), 400, "a bare ?jwt next to the header");

    // Two token parameters, with or without the header.
    for query in [
        format!("jwt={token}&jwt={token}"),
        format!("jwt={token}&jwt=smuggled"),
        format!("jwt={token}&j%77t=smuggled"),
        format!("j%77t=smuggled&jwt={token}"),
    ] {
        let response = get(query.clone(), false).await.unwrap();
        assert_eq!(response.status(), 400, "?{query}");
        assert!(error_of(response).await.contains("more than one jwt"));
        assert_eq!(
            get(query.clone(), true).await.unwrap().status(),
            400,
            "?{query} plus the header"
        );
    }

    // The token under an encoded name alone is the token, as the qsh sees it.
    assert_eq!(
        get(format!("j%77t={token}"), false).await.unwrap().status(),
        200
    );
    assert_eq!(
        get(format!("jwt={token}"), false).await.unwrap().status(),
        200
    );
    assert_eq!(get(String::new(), true).await.unwrap().status(), 200);
}

async fn forged_and_mismatched_tokens_are_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let now = jwt::now();
    let cases = [
        (
            "wrong secret",
            app.product_token(&site.client_key, "guessed", "GET", "/api/tenant", now),
            "signature",
        ),
        (
            "unknown tenant",
            app.product_token(
                "ck-never-installed",
                &site.secret,
                "GET",
                "/api/tenant",
                now,
            ),
            "no installation",
        ),
        (
            "other path",
            app.product_token(&site.client_key, &site.secret, "GET", "/api/other", now),
            "qsh does not match",
        ),
        (
            "other query",
            app.product_token(
                &site.client_key,
                &site.secret,
                "GET",
                "/api/tenant?admin=true",
                now,
            ),
            "qsh does not match",
        ),
        (
            "other method",
            app.product_token(&site.client_key, &site.secret, "POST", "/api/tenant", now),
            "qsh does not match",
        ),
        (
            "expired",
            app.product_token(
                &site.client_key,
                &site.secret,
                "GET",
                "/api/tenant",
                now - 1000,
            ),
            "expired",
        ),
        (
            "future",
            app.product_token(
                &site.client_key,
                &site.secret,
                "GET",
                "/api/tenant",
                now + 600,
            ),
            "future",
        ),
        ("garbage", "not.a.token".to_owned(), "malformed"),
    ];
    for (what, token, fragment) in cases {
        let response = app.tenant(&token).await;
        assert_eq!(response.status(), 401, "{what}");
        let message = error_of(response).await;
        assert!(message.contains(fragment), "{what}: {message:?}");
    }
    // A token signed with the install key (RS256) is no product token.
    let rs = app.sign_install(&Claims {
        iss: Some(site.client_key.clone()),
        iat: Some(now),
        exp: Some(now + 60),
        qsh: Some(CanonicalRequest::new("GET", "/api/tenant", "", "").qsh()),
        ..Default::default()
    });
    assert_eq!(app.tenant(&rs).await.status(), 401);
}

fn context_token(client_key: &str, secret: &str) -> String {
    let now = jwt::now();
    let claims = Claims {
        iss: Some(client_key.into()),
        iat: Some(now),
        exp: Some(now + 60),
        qsh: Some("context-qsh".into()),
        context: Some(
            json!({"user": {"accountId": "5b10ac8d82e05b22cc7d4ef5"}, "jira": {"issue": {"key": "ABC-1"}}}),
        ),
        ..Default::default()
    };
    jwt::sign_hs256(&claims, &SharedSecret::parse(secret).unwrap())
}

async fn context_tokens_only_on_opted_in_routes(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let token = context_token(&site.client_key, &site.secret);
    let response = app.tenant(&token).await;
    assert_eq!(response.status(), 401);
    assert!(error_of(response).await.contains("context token"));

    let response = app.context(&token).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["accountId"], "5b10ac8d82e05b22cc7d4ef5");
    assert_eq!(body["context"]["jira"]["issue"]["key"], "ABC-1");
    // Regular tokens work on the context route too.
    let regular = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/context",
        jwt::now(),
    );
    assert_eq!(app.context(&regular).await.status(), 200);
}

async fn previous_secret_stops_working_after_the_grace_window(backend: Backend) {
    let app = spawn_app_with(Options::new(backend).set("WARDEN_SECRET_GRACE_SECONDS", "1")).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let old = site.secret.clone();
    // Issued before the roll (the host's in-flight request).
    let in_flight = app.product_token(
        &site.client_key,
        &old,
        "GET",
        "/api/tenant",
        jwt::now() - 10,
    );
    site.secret = "rolled".into();
    app.installed(&site).await;
    assert_eq!(app.tenant(&in_flight).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(app.tenant(&in_flight).await.status(), 401);
    assert_eq!(app.tenant_status(&site, "rolled").await, 200);
}

async fn secrets_older_than_the_previous_never_verify(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let first = site.secret.clone();
    site.secret = "second".into();
    app.installed(&site).await;
    site.secret = "third".into();
    app.installed(&site).await;
    let ancient = app.product_token(
        &site.client_key,
        &first,
        "GET",
        "/api/tenant",
        jwt::now() - 30,
    );
    assert_eq!(app.tenant(&ancient).await.status(), 401);
}

async fn base_url_with_a_path(backend: Backend) {
    let app = spawn_app_with(
        Options::new(backend).set("WARDEN_BASE_URL", "https://warden.example.com/app"),
    )
    .await;
    assert!(app.address.ends_with("/app"));
    let site = Site::new();
    app.installed(&site).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    let descriptor: serde_json::Value = app.descriptor().await.json().await.unwrap();
    assert_eq!(descriptor["baseUrl"], "https://warden.example.com/app");
}

/// From the attacker's side: floods of forged tokens for a real tenant, and of tokens naming a
/// tenant that does not exist, are refused without starving genuine requests, and the
/// negative answer does not outlive an install.
async fn token_floods_are_refused_and_do_not_hide_genuine_tenants(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);

    let forged = (0..200).map(|i| {
        let token = app.product_token(
            &site.client_key,
            &format!("guessed-{i}"),
            "GET",
            "/api/tenant",
            jwt::now(),
        );
        let app = &app;
        async move { app.tenant(&token).await }
    });
    for response in futures_util::future::join_all(forged).await {
        assert_eq!(response.status(), 401);
        assert!(error_of(response).await.contains("signature"));
    }
    assert_eq!(
        app.tenant_status(&site, &site.secret).await,
        200,
        "the genuine tenant right after the flood"
    );

    // A clientKey nobody installed yet, hammered, then installed: found at once.
    let newcomer = Site::new();
    let unknown = (0..200).map(|_| app.tenant_status(&newcomer, &newcomer.secret));
    for status in futures_util::future::join_all(unknown).await {
        assert_eq!(status, 401);
    }
    app.installed(&newcomer).await;
    assert_eq!(
        app.tenant_status(&newcomer, &newcomer.secret).await,
        200,
        "an install is found at once, unknown or not a moment ago"
    );

    // A roll on this instance is honoured at once, even right after forged tokens.
    let mut rolled = site.clone();
    rolled.secret = format!("{}-rolled", site.secret);
    app.installed(&rolled).await;
    assert_eq!(app.tenant_status(&rolled, &rolled.secret).await, 200);
    assert_eq!(app.tenant_status(&rolled, "guessed").await, 401);
    assert_eq!(app.tenant_status(&rolled, &rolled.secret).await, 200);
}

both_stores!(
    token_in_query_works_and_both_places_is_400,
    jwt_parameters_by_decoded_name_are_counted,
    forged_and_mismatched_tokens_are_401,
    context_tokens_only_on_opted_in_routes,
    previous_secret_stops_working_after_the_grace_window,
    secrets_older_than_the_previous_never_verify,
    base_url_with_a_path,
    token_floods_are_refused_and_do_not_hide_genuine_tenants,
);
