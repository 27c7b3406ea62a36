//! devtenant against the real warden: the whole rehearsal as a library call (signed and legacy
//! mode), the same rehearsal failing against a deliberately broken app, the tokens devtenant
//! makes checked by warden's own JWT rules, and the `devtenant` binary end to end.

use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use crate::helpers::app::{
    shared_signing_key, spawn_app_with, Backend, Options as AppOptions, TestApp,
};
use actix_web::{web, App, HttpResponse, HttpServer};
use connect_protocol::domain::{BaseUrl, SharedSecret};
use connect_protocol::jwt::{self, Token};
use connect_protocol::lifecycle::LifecycleEvent;
use connect_protocol::qsh::CanonicalRequest;
use devtenant::client::{AppCaller, AppDescriptor, DescriptorOptions};
use devtenant::rehearse::{self, scenario, Options, Rehearsal, Report, Verdict};
use devtenant::state::Tenant;
use devtenant::{KeyRing, SigningKey};
use serde_json::json;

/// A second key for the test binary (the first is `shared_signing_key`): the spare key of a
/// rehearsal whose ring holds the first, and the other way round.
fn second_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate).clone()
}

/// Keys for one rehearsal: a fresh ring with `current`, and `spare` (not in it).
fn keys(current: SigningKey, spare: SigningKey) -> (Arc<RwLock<KeyRing>>, SigningKey) {
    (Arc::new(RwLock::new(KeyRing::with_key(current))), spare)
}

/// Warden configured for a rehearsal: its keys from the rehearsal's server, sites on 127.0.0.1.
async fn warden_for(rehearsal: &Rehearsal, backend: Backend, extra: &[(&str, &str)]) -> TestApp {
    let mut options = AppOptions::new(backend)
        .set("WARDEN_KEYS_URL", rehearsal.keys_url())
        .set("WARDEN_PRODUCT_HOSTS", "127.0.0.1")
        .set("WARDEN_OAUTH_TOKEN_URL", rehearsal.token_url());
    for (name, value) in extra {
        options = options.set(name, *value);
    }
    spawn_app_with(options).await
}

fn descriptor_url(app: &TestApp) -> String {
    app.url("/atlassian-connect.json")
}

fn assert_all_pass(report: &Report) {
    assert!(report.passed(), "the rehearsal failed:\n{report}");
    assert!(
        report.rows.iter().all(|r| r.verdict == Verdict::Pass),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_passes_against_warden_in_signed_mode() {
    let (ring, spare) = keys(shared_signing_key(), second_key());
    let rehearsal = Rehearsal::start(
        Options::signed()
            .with_keys(ring.clone(), spare.clone())
            .strict(true),
    )
    .await
    .unwrap();
    let app = warden_for(
        &rehearsal,
        Backend::Embedded,
        &[("WARDEN_SECRET_GRACE_SECONDS", "0")],
    )
    .await;
    let report = rehearsal.run_against(&descriptor_url(&app)).await.unwrap();
    assert_all_pass(&report);
    for name in [
        scenario::SIGNED_INSTALL,
        scenario::SECRET_ROLL,
        scenario::UNSIGNED_INSTALL_REFUSED,
        scenario::UNINSTALL_REINSTALL,
        scenario::DISABLE_ENABLE,
        scenario::SITE_IMPORT,
        scenario::KEY_ROTATION,
        scenario::FORGED_UNSIGNED,
        scenario::FORGED_WRONG_KEY,
        scenario::FORGED_WRONG_AUD,
        scenario::FORGED_REPLAY,
        scenario::FORGED_ISS_MISMATCH,
        scenario::FORGED_FOREIGN_HOST,
        scenario::FORGED_EXPIRED,
        scenario::FORGED_ALG_NONE,
    ] {
        assert!(
            report.scenario_passed(name),
            "{name} did not run or failed:\n{report}"
        );
    }
    assert!(report.scenario(scenario::SEED_001).is_empty());
    // The rotation happened on the ring the key server serves.
    assert_eq!(ring.read().unwrap().current().kid, spare.kid);
    assert!(report.to_string().contains("0 failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_passes_against_warden_in_legacy_mode_with_a_base_path() {
    let (ring, spare) = keys(second_key(), shared_signing_key());
    let mut options = Options::legacy().with_keys(ring, spare).strict(true);
    options.grace_seconds = 1;
    let rehearsal = Rehearsal::start(options).await.unwrap();
    let app = warden_for(
        &rehearsal,
        Backend::Redis,
        &[
            ("WARDEN_INSTALL_AUTH", "legacy"),
            ("WARDEN_SECRET_GRACE_SECONDS", "1"),
            // The public base URL has a path and is not where the app listens: callbacks go
            // to where the descriptor was read, the qsh is relative to /app, the aud is this.
            ("WARDEN_BASE_URL", "https://warden.example.com/app"),
        ],
    )
    .await;
    assert_eq!(app.base_path, "/app");
    let report = rehearsal.run_against(&descriptor_url(&app)).await.unwrap();
    assert_all_pass(&report);
    assert!(report.scenario_passed(scenario::SEED_001), "{report}");
    assert!(report
        .scenario(scenario::UNSIGNED_INSTALL_REFUSED)
        .is_empty());
    assert!(report.legacy);
}

/// An app that accepts everything: a descriptor, 204 to every callback, 200 to every request.
async fn spawn_broken_app() -> (String, actix_web::dev::ServerHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let descriptor = json!({
        "key": "broken-app",
        "baseUrl": base,
        "authentication": {"type": "jwt"},
        "apiMigrations": {"signed-install": true},
        "lifecycle": {"installed": "/installed", "uninstalled": "/uninstalled", "enabled": "/enabled", "disabled": "/disabled"},
    });
    let server = HttpServer::new(move || {
        let descriptor = descriptor.clone();
        App::new()
            .route(
                "/atlassian-connect.json",
                web::get().to(move || {
                    let d = descriptor.clone();
                    async move { HttpResponse::Ok().json(d) }
                }),
            )
            .route(
                "/{tail:.*}",
                web::post().to(|| async { HttpResponse::NoContent().finish() }),
            )
            .route(
                "/{tail:.*}",
                web::get().to(|| async { HttpResponse::Ok().json(json!({})) }),
            )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("{base}/atlassian-connect.json"), handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehearsal_fails_against_an_app_that_accepts_everything() {
    let (ring, spare) = keys(shared_signing_key(), second_key());
    let (descriptor, handle) = spawn_broken_app().await;
    let report = rehearse::run(
        Options::signed()
            .with_keys(ring, spare)
            .with_descriptor(descriptor),
    )
    .await
    .unwrap();
    assert!(!report.passed(), "{report}");
    assert!(
        report.scenario_failed(scenario::UNSIGNED_INSTALL_REFUSED),
        "{report}"
    );
    for name in [
        scenario::FORGED_UNSIGNED,
        scenario::FORGED_WRONG_KEY,
        scenario::FORGED_WRONG_AUD,
        scenario::FORGED_REPLAY,
        scenario::FORGED_ISS_MISMATCH,
        scenario::FORGED_FOREIGN_HOST,
        scenario::FORGED_EXPIRED,
        scenario::FORGED_ALG_NONE,
    ] {
        assert!(
            report.scenario_failed(name),
            "{name} passed against a broken app:\n{report}"
        );
    }
    // What the broken app does right still passes, and the failures are explained.
    assert!(report.scenario_passed(scenario::SIGNED_INSTALL), "{report}");
    let unsigned = report.scenario(scenario::UNSIGNED_INSTALL_REFUSED);
    assert_eq!(unsigned[0].observed, "204");
    assert_eq!(unsigned[0].expected, "4xx (401)");
    let text = report.to_string();
    assert!(
        text.contains("FAIL") && text.contains("failed checks:"),
        "{text}"
    );
    // The link check has nothing to read: skipped, not passed.
    assert!(report
        .scenario(scenario::SITE_IMPORT)
        .iter()
        .any(|r| r.verdict == Verdict::Skip));
    handle.stop(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_off_loopback_is_refused_without_allow_remote() {
    let http = devtenant::client::http_client(Duration::from_secs(2));
    let err = AppDescriptor::fetch(
        &http,
        "https://app.example.com/atlassian-connect.json",
        &DescriptorOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--allow-remote"), "{err}");
}

/// devtenant's tokens pass warden's JWT rules, for an app whose base URL has a path.
#[test]
fn devtenant_tokens_verify_under_the_protocol_rules() {
    let descriptor = json!({
        "key": "rules-app",
        "baseUrl": "https://app.example.com/base",
        "apiMigrations": {"signed-install": true},
        "lifecycle": {"installed": "/lifecycle/installed", "enabled": "/lifecycle/enabled"},
    });
    let app = AppDescriptor::from_json(
        "http://127.0.0.1:9/base/atlassian-connect.json",
        &descriptor,
        &DescriptorOptions::default(),
    )
    .unwrap();
    assert_eq!(
        app.url_for("/lifecycle/installed"),
        "http://127.0.0.1:9/base/lifecycle/installed"
    );
    let client = AppCaller::new(devtenant::client::http_client(Duration::from_secs(1)), app);
    let key = shared_signing_key();
    let mut tenant = Tenant::generate(Some("rules"), "http://127.0.0.1:1");
    let audiences = [BaseUrl::parse("https://app.example.com/base").unwrap()];

    // The install token, as the app receives it on POST /base/lifecycle/installed.
    let raw = client
        .install_token(&key, &mut tenant, LifecycleEvent::Installed)
        .unwrap();
    let token = Token::parse(&raw).unwrap();
    assert_eq!(token.alg(), "RS256");
    assert_eq!(token.kid(), Some(key.kid.as_str()));
    token.verify_rs256(&key.verifying_key()).unwrap();
    let claims = token.claims();
    claims.check_times(jwt::now()).unwrap();
    claims.check_audience(&audiences).unwrap();
    let received = CanonicalRequest::new("POST", "/base/lifecycle/installed", "", "/base");
    claims.check_qsh(&received, false).unwrap();
    assert_eq!(claims.iss.as_deref(), Some(tenant.client_key.as_str()));
    // Another path does not match: the qsh is the request's.
    let other = CanonicalRequest::new("POST", "/base/lifecycle/enabled", "", "/base");
    assert!(claims.check_qsh(&other, false).is_err());

    // Two callbacks in the same second still carry distinct tokens.
    let again = client
        .install_token(&key, &mut tenant, LifecycleEvent::Installed)
        .unwrap();
    assert_ne!(raw, again);

    // A tenant-signed callback: HS256 with the secret.
    let secret = SharedSecret::parse(&tenant.shared_secret).unwrap();
    let raw = client
        .tenant_token(
            &tenant.shared_secret.clone(),
            &mut tenant,
            LifecycleEvent::Enabled,
        )
        .unwrap();
    let token = Token::parse(&raw).unwrap();
    token.verify_hs256(&secret).unwrap();
    token.claims().check_times(jwt::now()).unwrap();
    token
        .claims()
        .check_qsh(
            &CanonicalRequest::new("POST", "/base/lifecycle/enabled", "", "/base"),
            false,
        )
        .unwrap();

    // A product request with a query, as the app receives it (form-encoded, any order).
    let raw = client
        .product_token(
            &tenant.shared_secret,
            &tenant.client_key,
            "GET",
            "/api/x?b=2&a=1&q=a%20b*",
            "557058:u",
            jwt::now(),
        )
        .unwrap();
    let token = Token::parse(&raw).unwrap();
    token.verify_hs256(&secret).unwrap();
    let claims = token.claims();
    claims.check_times(jwt::now()).unwrap();
    let received = CanonicalRequest::new(
        "GET",
        "/base/api/x",
        "q=a+b%2A&a=1&b=2&jwt=ignored",
        "/base",
    );
    assert_eq!(received.as_str(), "GET&/api/x&a=1&b=2&q=a%20b%2A");
    claims.check_qsh(&received, false).unwrap();
    assert_eq!(claims.sub.as_deref(), Some("557058:u"));
    let tampered = CanonicalRequest::new("GET", "/base/api/x", "a=1&b=3&q=a%20b*", "/base");
    assert!(claims.check_qsh(&tampered, false).is_err());
    assert!(token
        .verify_hs256(&SharedSecret::parse("another secret").unwrap())
        .is_err());
}

fn devtenant() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(crate::helpers::binaries::devtenant());
    command
        .env_remove("DEVTENANT_STATE_DIR")
        .env_remove("DEVTENANT_DESCRIPTOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_explains_itself() {
    let out = devtenant().arg("--help").output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "serve",
        "install",
        "uninstall",
        "enable",
        "disable",
        "roll",
        "import",
        "request",
        "rehearse",
        "--state-dir",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let out = devtenant()
        .args(["rehearse", "--help"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--keys-listen",
        "--legacy",
        "--grace-seconds",
        "--probe-path",
        "--strict",
        "WARDEN_KEYS_URL",
    ] {
        assert!(text.contains(word), "rehearse --help lacks {word}:\n{text}");
    }
    let out = devtenant()
        .args(["rehearse", "--descriptor", "https://app.example.com/d.json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_rehearses_against_warden() {
    // A port for the binary's key server, known before warden starts (as in CI).
    let port = crate::helpers::free_port();
    let keys_url = format!("http://127.0.0.1:{port}");
    let app = spawn_app_with(
        AppOptions::new(Backend::Embedded)
            .set("WARDEN_KEYS_URL", keys_url.clone())
            .set("WARDEN_PRODUCT_HOSTS", "127.0.0.1")
            .set("WARDEN_SECRET_GRACE_SECONDS", "0"),
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let run = devtenant()
        .args([
            "rehearse",
            "--descriptor",
            &descriptor_url(&app),
            "--keys-listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(state.path())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the rehearsal finishes in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(&keys_url), "{stdout}");
    assert!(
        stdout.contains("SCENARIO") && stdout.contains("RESULT"),
        "{stdout}"
    );
    assert!(stdout.contains("forged: replay"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // The keys were kept in the state directory, the rotation included.
    let ring = KeyRing::load_or_create(state.path()).unwrap();
    assert_eq!(ring.keys().len(), 2);
}
