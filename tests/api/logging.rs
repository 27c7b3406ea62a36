//! No log line ever holds a shared secret or a token. The logs of a whole session (installs,
//! rolls, product requests in the header and in `?jwt=`, refused forgeries, replays) are
//! captured at the most verbose level and searched for every secret and token used.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::helpers::app::{spawn_app, Backend, Site};
use connect_protocol::jwt;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_is_ever_logged() {
    let capture = Capture::default();
    connect_warden::telemetry::init_with_writer(
        tracing_subscriber::EnvFilter::new("trace"),
        false,
        capture.clone(),
    );

    let mut needles: Vec<String> = Vec::new();
    for backend in [Backend::Redis, Backend::Embedded] {
        let app = spawn_app(backend).await;
        let mut site = Site::new();
        let token = app.install_token(&site.client_key, "/installed");
        let response = app
            .post_lifecycle("/installed", Some(&token), &site.body("installed"))
            .await;
        assert_eq!(response.status(), 204);
        needles.extend([site.secret.clone(), token.clone()]);

        // A replay with an attacker's secret, refused.
        let mut forged = site.body("installed");
        forged["sharedSecret"] = serde_json::json!("attacker-secret-value-123");
        assert_eq!(
            app.post_lifecycle("/installed", Some(&token), &forged)
                .await
                .status(),
            409
        );
        needles.push("attacker-secret-value-123".into());

        // Roll.
        site.secret = format!("rolled-{}", site.secret);
        let roll = app.install_token(&site.client_key, "/installed");
        assert_eq!(
            app.post_lifecycle("/installed", Some(&roll), &site.body("installed"))
                .await
                .status(),
            204
        );
        needles.extend([site.secret.clone(), roll]);

        // Product requests: header, query, and a refused one.
        let good = app.product_token(
            &site.client_key,
            &site.secret,
            "GET",
            "/api/tenant",
            jwt::now(),
        );
        assert_eq!(app.tenant(&good).await.status(), 200);
        let in_query = app
            .client
            .get(app.url(&format!("/api/tenant?jwt={good}")))
            .send()
            .await
            .unwrap();
        assert_eq!(in_query.status(), 200);
        let bad = app.product_token(
            &site.client_key,
            "wrong-secret-xyz",
            "GET",
            "/api/tenant",
            jwt::now(),
        );
        assert_eq!(app.tenant(&bad).await.status(), 401);
        needles.extend([good, bad, "wrong-secret-xyz".into()]);

        // Enable/disable tokens.
        let disable = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/disabled");
        assert_eq!(
            app.post_lifecycle("/disabled", Some(&disable), &site.body("disabled"))
                .await
                .status(),
            204
        );
        needles.push(disable);
    }

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("lifecycle callback accepted"),
        "the capture saw no warden log line"
    );
    assert!(logs.contains("status=401"), "refusals are logged");
    for needle in &needles {
        assert!(
            !logs.contains(needle.as_str()),
            "a log line contains a secret or token: {needle:.12}…"
        );
        // Token parts (the signature alone would be enough to replay nothing, but the claims part
        // together with the header is the token): check the signature part separately too.
        if let Some(signature) = needle
            .rsplit('.')
            .next()
            .filter(|s| s.len() > 20 && needle.matches('.').count() == 2)
        {
            assert!(
                !logs.contains(signature),
                "a log line contains a token signature"
            );
        }
    }
}

/// A flood of forged product requests costs one log line each (the request's own line, with
/// its status and reason), none at WARN; an accepted request also has exactly one line.
#[tokio::test]
async fn a_refused_request_is_one_info_line() {
    use crate::helpers::app::{Options, TestApp};
    let app = TestApp::spawn_process(
        "logs",
        Options::new(Backend::Embedded).set("RUST_LOG", "info"),
    )
    .await;
    let site = Site::new();
    app.installed(&site).await;
    let before = app.log().lines().count();
    const FORGED: usize = 20;
    for _ in 0..FORGED {
        let forged =
            app.product_token(&site.client_key, "forged", "GET", "/api/tenant", jwt::now());
        assert_eq!(app.tenant(&forged).await.status(), 401);
    }
    let good = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    assert_eq!(app.tenant(&good).await.status(), 200);
    // The process writes its lines as it answers; give the last one a moment.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = app.log();
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert_eq!(
        new.len(),
        FORGED + 1,
        "one line per request:\n{}",
        new.join("\n")
    );
    assert_eq!(
        new.iter()
            .filter(|l| l.contains("status=401") && l.contains("signature"))
            .count(),
        FORGED,
        "each refusal's line names its status and reason:\n{}",
        new.join("\n")
    );
    // (Start-up may warn, e.g. that secrets are stored in plaintext: only the requests count.)
    assert!(
        !new.iter().any(|l| l.contains(" WARN ")),
        "an ordinary 4xx is not a warning:\n{log}"
    );
}

/// A customer's report names the request id an error body gave them; the vendor finds the
/// one log line of that request. A sane `X-Request-Id` from a proxy is kept end to end; one
/// that could forge a log line is replaced.
#[tokio::test]
async fn a_request_id_ties_an_error_body_to_its_log_line() {
    use crate::helpers::app::{Options, TestApp};
    let app = TestApp::spawn_process(
        "request-id",
        Options::new(Backend::Embedded).set("RUST_LOG", "info"),
    )
    .await;
    let response = app
        .client
        .get(app.url("/api/tenant"))
        .header("x-request-id", "lb-7f3a:42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-request-id"], "lb-7f3a:42");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["requestId"], "lb-7f3a:42");

    let response = app
        .client
        .get(app.url("/api/tenant"))
        .header("x-request-id", "x status=200 forged")
        .send()
        .await
        .unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["requestId"], generated.as_str());

    let ok = app.healthz().await;
    assert!(ok.headers().contains_key("x-request-id"));

    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = app.log();
    for id in ["lb-7f3a:42", generated.as_str()] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
        assert_eq!(lines.len(), 1, "{id}:\n{log}");
        assert!(lines[0].contains("status=401"), "{}", lines[0]);
    }
    assert!(!log.contains("forged"), "{log}");
}

/// A `qsh` that does not match is explained by method, path and parameter names only: the
/// query's values (anything the caller put in the URL) reach neither the answer nor the log.
#[tokio::test]
async fn a_qsh_mismatch_shows_no_query_value() {
    use crate::helpers::app::{error_of, Options, TestApp};
    let app = TestApp::spawn_process(
        "qsh-log",
        Options::new(Backend::Embedded).set("RUST_LOG", "trace"),
    )
    .await;
    let site = Site::new();
    app.installed(&site).await;
    // Signed for another value of `name`.
    let token = app.product_token(
        &site.client_key,
        &site.secret,
        "GET",
        "/api/tenant?name=othervalue",
        jwt::now(),
    );
    let response = app
        .get_with_token("/api/tenant?name=secretvalue123", &token)
        .await;
    assert_eq!(response.status(), 401);
    let error = error_of(response).await;
    assert!(
        error.contains("GET&/api/tenant&name=…"),
        "the message names method, path and parameter: {error}"
    );
    assert!(!error.contains("secretvalue123"), "{error}");
    // The process writes its line as it answers; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = app.log();
    assert!(
        log.contains("qsh does not match"),
        "the refusal is logged:\n{log}"
    );
    assert!(!log.contains("secretvalue123"), "{log}");
}
