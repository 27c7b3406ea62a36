//! `warden dev register` / `unregister` (the built binary) against the plugin manager (UPM) of a
//! devtenant site on 127.0.0.1: the site installs the app from its descriptor URL and sends the
//! signed `installed`; bad credentials and UPM's install errors come back as clear messages
//! and a failing exit code; `unregister` makes the site send `uninstalled`.

use std::process::Output;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::helpers::app::{
    shared_signing_key, spawn_app_with, Backend, Options, TestApp, APP_BASE_URL, APP_KEY,
};
use crate::helpers::free_port;
use connect_protocol::jwt;
use connect_warden::store::InstallState;
use devtenant::client::{http_client, AppCaller, AppDescriptor, DescriptorOptions};
use devtenant::server::DevServer;
use devtenant::state::Tenant;
use devtenant::upm::sub_code;
use devtenant::KeyRing;

const ADMIN: &str = "admin@example.com";
const API_TOKEN: &str = "atl-api-token-7f3a9c1e5b";
const SITE: &str = "acme";

struct Fixture {
    dev: DevServer,
    app: TestApp,
    /// The site's base URL, `--site`.
    site_url: String,
}

/// A devtenant server with a UPM site (admin [`ADMIN`] / [`API_TOKEN`]) and warden trusting its
/// install keys; with `allow_site_host`, warden also accepts sites on 127.0.0.1.
async fn fixture(allow_site_host: bool) -> Fixture {
    let ring = Arc::new(RwLock::new(KeyRing::with_key(shared_signing_key())));
    let dev = DevServer::start("127.0.0.1:0", ring).await.unwrap();
    let site_url = dev.add_upm_site(SITE, ADMIN, API_TOKEN);
    let mut options = Options::new(Backend::Embedded)
        .set("WARDEN_KEYS_URL", dev.keys_url())
        .set("WARDEN_OAUTH_TOKEN_URL", dev.token_url());
    if allow_site_host {
        options = options.set("WARDEN_PRODUCT_HOSTS", "127.0.0.1");
    }
    let app = spawn_app_with(options).await;
    Fixture { dev, app, site_url }
}

impl Fixture {
    fn descriptor_url(&self) -> String {
        self.app.url("/atlassian-connect.json")
    }

    /// `warden dev <args...>` with `ATLASSIAN_API_TOKEN=token`.
    async fn warden_dev(&self, token: &str, args: &[&str]) -> Run {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        command
            .env("ATLASSIAN_API_TOKEN", token)
            .env("WARDEN_BASE_URL", APP_BASE_URL)
            .env("RUST_LOG", "warn")
            .arg("dev")
            .args(args)
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("warden dev finishes within a minute")
            .expect("the warden binary runs");
        Run::from(output)
    }

    async fn register(&self, token: &str, descriptor_url: &str) -> Run {
        self.warden_dev(
            token,
            &[
                "register",
                "--site",
                &self.site_url,
                "--user",
                ADMIN,
                "--descriptor-url",
                descriptor_url,
                "--timeout",
                "10",
                "--wait",
                "30",
            ],
        )
        .await
    }

    async fn unregister(&self, token: &str) -> Run {
        self.warden_dev(
            token,
            &["unregister", "--site", &self.site_url, "--user", ADMIN],
        )
        .await
    }

    /// `GET /api/tenant` as `tenant`, the product JWT made and sent by devtenant.
    async fn product_request(&self, tenant: &Tenant) -> (u16, serde_json::Value) {
        let http = http_client(Duration::from_secs(10));
        let descriptor =
            AppDescriptor::fetch(&http, &self.descriptor_url(), &DescriptorOptions::default())
                .await
                .unwrap();
        let caller = AppCaller::new(http, descriptor);
        let token = caller
            .product_token(
                &tenant.shared_secret,
                &tenant.client_key,
                "GET",
                "/api/tenant",
                "acct-dev-1",
                jwt::now(),
            )
            .unwrap();
        let exchange = caller
            .product_request("GET", "/api/tenant", &token, None)
            .await
            .unwrap();
        (
            exchange.status.expect("the app answers"),
            exchange.json().unwrap_or_default(),
        )
    }
}

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    fn assert_ok(&self) {
        assert!(
            self.success,
            "warden dev failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
    }

    /// Fails with `needles` in its error output, and no secret anywhere in what it printed.
    fn assert_failed_saying(&self, needles: &[&str], secrets: &[&str]) {
        assert!(!self.success, "warden dev succeeded:\n{}", self.stdout);
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "the error does not say {needle:?}:\n{}",
                self.stderr
            );
        }
        self.assert_no_secrets(secrets);
    }

    fn assert_no_secrets(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret) && !self.stderr.contains(secret),
                "a secret was printed:\nstdout: {}\nstderr: {}",
                self.stdout,
                self.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_installs_through_upm_and_the_site_can_make_product_requests() {
    let f = fixture(true).await;
    let run = f.register(API_TOKEN, &f.descriptor_url()).await;
    run.assert_ok();
    run.assert_no_secrets(&[API_TOKEN]);
    assert!(
        run.stdout
            .contains(&format!("installed {APP_KEY} on {}", f.site_url)),
        "{}",
        run.stdout
    );

    // The site sent a signed `installed`, and warden stored the site's secret.
    let tenant = f
        .dev
        .upm()
        .installation(SITE)
        .expect("UPM recorded the installation");
    assert_eq!(tenant.base_url, f.site_url);
    let stored = f
        .app
        .stored(&tenant.client_key)
        .await
        .expect("warden stored the installation");
    assert_eq!(stored.state, InstallState::Installed);
    assert_eq!(
        stored.current_secret().secret.expose(),
        tenant.shared_secret
    );

    let (status, body) = f.product_request(&tenant).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["clientKey"], tenant.client_key.as_str());
    assert_eq!(body["baseUrl"], f.site_url.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_token_is_a_clear_error_and_installs_nothing() {
    let f = fixture(true).await;
    let wrong = "atl-api-token-wrong-0000";
    let run = f.register(wrong, &f.descriptor_url()).await;
    run.assert_failed_saying(&["401", "ATLASSIAN_API_TOKEN", ADMIN], &[wrong, API_TOKEN]);
    assert!(f.dev.upm().installation(SITE).is_none());
    assert_eq!(f.app.stored_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upm_install_errors_are_reported_with_upms_text() {
    let f = fixture(true).await;

    // The site cannot read the descriptor.
    let nowhere = format!("http://127.0.0.1:{}/atlassian-connect.json", free_port());
    let run = f.register(API_TOKEN, &nowhere).await;
    run.assert_failed_saying(
        &[
            "UPM could not install the app",
            "cannot read the descriptor",
            &nowhere,
            sub_code::DESCRIPTOR,
        ],
        &[API_TOKEN],
    );
    assert!(f.dev.upm().installation(SITE).is_none());
    assert_eq!(f.app.stored_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_refusal_of_the_installed_callback_is_reported() {
    // Warden does not accept sites on 127.0.0.1: it refuses the site's signed `installed`.
    let f = fixture(false).await;
    let run = f.register(API_TOKEN, &f.descriptor_url()).await;
    run.assert_failed_saying(
        &[
            "UPM could not install the app",
            "the app answered 403 to the installed callback",
            "WARDEN_PRODUCT_HOSTS",
            sub_code::INSTALLED_REFUSED,
        ],
        &[API_TOKEN],
    );
    assert!(f.dev.upm().installation(SITE).is_none());
    assert_eq!(f.app.stored_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_makes_the_site_send_uninstalled() {
    let f = fixture(true).await;
    f.register(API_TOKEN, &f.descriptor_url()).await.assert_ok();
    let tenant = f.dev.upm().installation(SITE).unwrap();
    assert_eq!(f.product_request(&tenant).await.0, 200);

    let run = f.unregister(API_TOKEN).await;
    run.assert_ok();
    run.assert_no_secrets(&[API_TOKEN]);
    assert!(
        run.stdout.contains(&format!("removed {APP_KEY}")),
        "{}",
        run.stdout
    );
    assert!(f.dev.upm().installation(SITE).is_none());
    let stored = f.app.stored(&tenant.client_key).await.unwrap();
    assert_eq!(stored.state, InstallState::Uninstalled);
    assert_ne!(f.product_request(&tenant).await.0, 200);

    // Once removed, the app is not there to remove.
    let again = f.unregister(API_TOKEN).await;
    again.assert_failed_saying(&["is not installed on", "404"], &[API_TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_off_and_a_site_without_upm_are_named_as_such() {
    let f = fixture(true).await;
    assert!(f.dev.upm().set_development_mode(SITE, false));
    let run = f.register(API_TOKEN, &f.descriptor_url()).await;
    run.assert_failed_saying(
        &[
            "403",
            "site administrator",
            "development mode",
            "development mode is off on this site",
        ],
        &[API_TOKEN],
    );
    assert!(f.dev.upm().installation(SITE).is_none());

    // A URL where no plugin manager answers: not a site's base URL.
    let run = f
        .warden_dev(
            API_TOKEN,
            &[
                "register",
                "--site",
                &format!("{}/t/no-such-site", f.dev.url()),
                "--user",
                ADMIN,
                "--descriptor-url",
                &f.descriptor_url(),
            ],
        )
        .await;
    run.assert_failed_saying(&["404", "no plugin manager at", "base URL"], &[API_TOKEN]);
    assert_eq!(f.app.stored_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_does_not_answer_is_a_timeout() {
    let f = fixture(true).await;
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let run = f
        .warden_dev(
            API_TOKEN,
            &[
                "register",
                "--site",
                &site,
                "--user",
                ADMIN,
                "--timeout",
                "1",
            ],
        )
        .await;
    held.abort();
    run.assert_failed_saying(&["did not answer within 1s", "--timeout"], &[API_TOKEN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_is_never_sent_over_plain_http_to_a_remote_site() {
    let f = fixture(true).await;
    let run = f
        .warden_dev(
            API_TOKEN,
            &[
                "register",
                "--site",
                "http://acme.atlassian.net",
                "--user",
                ADMIN,
            ],
        )
        .await;
    run.assert_failed_saying(&["must use https"], &[API_TOKEN]);
}
