//! Real `warden` processes (the built binary) for tests about several instances sharing one
//! Redis. Each [`WardenProcess`] is killed when dropped, so a failing test leaves none behind.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use connect_warden::devtenant::{KeyRing, KeyServer};
use connect_warden::jwt;

use super::app::{shared_signing_key, Site, APP_BASE_URL};
use super::{redis_server, tokens};

/// How long a fresh process may take to answer `GET /readyz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// What several instances share: the Redis (this binary's private server), a key prefix no
/// other test uses, and the install-key server.
pub struct Cluster {
    pub redis_url: String,
    pub redis_prefix: String,
    pub keys: KeyServer,
}

impl Cluster {
    pub async fn new() -> Self {
        let keyring = Arc::new(RwLock::new(KeyRing::with_key(shared_signing_key())));
        Self {
            redis_url: redis_server::redis_url().to_owned(),
            redis_prefix: redis_server::unique_prefix(),
            keys: KeyServer::start("127.0.0.1:0", keyring)
                .await
                .expect("key server starts"),
        }
    }

    /// Starts one more `warden` on this cluster's Redis and prefix, with extra `WARDEN_*`
    /// settings, and waits until it is ready.
    pub async fn spawn(&self, name: &str, env: &[(&str, &str)]) -> WardenProcess {
        let data_dir = tempfile::tempdir().unwrap();
        let log_path = data_dir.path().join("warden.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let port = redis_server::free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        command
            .env("WARDEN_BIND", format!("127.0.0.1:{port}"))
            .env("WARDEN_BASE_URL", APP_BASE_URL)
            .env("WARDEN_KEYS_URL", self.keys.url())
            .env("WARDEN_REDIS_URL", &self.redis_url)
            .env("WARDEN_REDIS_PREFIX", &self.redis_prefix)
            .env("WARDEN_DATA_DIR", data_dir.path())
            .env(
                "WARDEN_DESCRIPTOR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/atlassian-connect.json"),
            )
            .env("RUST_LOG", "warn");
        for (var, value) in env {
            command.env(var, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the warden binary starts");
        let process = WardenProcess {
            name: name.to_owned(),
            address: format!("http://127.0.0.1:{port}"),
            port,
            base_path: String::new(),
            base_url: APP_BASE_URL.to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            child: Mutex::new(child),
            log_path,
            _data_dir: data_dir,
        };
        process.wait_ready().await;
        process
    }
}

/// One running `warden`; killed on drop.
pub struct WardenProcess {
    pub name: String,
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    pub port: u16,
    pub base_path: String,
    pub base_url: String,
    pub client: reqwest::Client,
    child: Mutex<Child>,
    log_path: std::path::PathBuf,
    _data_dir: tempfile::TempDir,
}

impl Drop for WardenProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl WardenProcess {
    async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(response) = self
                .client
                .get(self.url("/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if response.status() == 200 {
                    return;
                }
            }
            if let Some(status) = self.child_exited() {
                panic!(
                    "warden {} exited ({status}) before it was ready; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!("warden {} did not answer /readyz with 200 within {READY_WITHIN:?}; its log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn child_exited(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().unwrap().try_wait().ok().flatten()
    }

    /// What the process logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}{}", self.address, self.base_path, path)
    }

    /// POSTs a lifecycle body with an optional `Authorization: JWT` token.
    pub async fn post_lifecycle(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap());
        if let Some(token) = token {
            request = request.header("authorization", format!("JWT {token}"));
        }
        request.send().await.expect("request reaches warden")
    }

    /// A signed `installed` of `site` (a roll when the clientKey is known); asserts 204.
    pub async fn install(&self, keys: &KeyServer, site: &Site) {
        self.signed_callback(keys, site, "installed").await;
    }

    /// A signed `uninstalled` of `site`; asserts 204.
    pub async fn uninstall(&self, keys: &KeyServer, site: &Site) {
        self.signed_callback(keys, site, "uninstalled").await;
    }

    /// `POST /<event>` for `site` with Atlassian's RS256 token; asserts 204.
    async fn signed_callback(&self, keys: &KeyServer, site: &Site, event: &str) {
        let path = format!("/{event}");
        let claims =
            tokens::install_claims(&self.base_url, &self.base_path, &site.client_key, &path);
        let token = tokens::sign_install(keys, &claims);
        self.accepted(site, event, &token).await;
    }

    /// `enabled` or `disabled` (`event`), signed with the site's current secret; asserts 204.
    pub async fn toggle(&self, site: &Site, event: &str) {
        let path = format!("/{event}");
        let token =
            tokens::tenant_lifecycle_token(&self.base_path, &site.client_key, &site.secret, &path);
        self.accepted(site, event, &token).await;
    }

    /// `POST /<event>` for `site` with `token`; asserts 204.
    async fn accepted(&self, site: &Site, event: &str, token: &str) {
        let response = self
            .post_lifecycle(&format!("/{event}"), Some(token), &site.body(event))
            .await;
        assert_eq!(
            response.status(),
            204,
            "{event} on {} failed: {}",
            self.name,
            response.text().await.unwrap()
        );
    }

    /// `GET /api/tenant` as `site`, signed with `secret`, issued at `iat`; returns the status.
    pub async fn tenant_status_at(&self, site: &Site, secret: &str, iat: i64) -> u16 {
        let token = tokens::product_token(
            &self.base_path,
            &site.client_key,
            secret,
            "GET",
            "/api/tenant",
            iat,
        );
        self.client
            .get(self.url("/api/tenant"))
            .header("authorization", format!("JWT {token}"))
            .send()
            .await
            .expect("request reaches warden")
            .status()
            .as_u16()
    }

    /// `GET /api/tenant` as `site`, signed with `secret`, issued now; returns the status.
    pub async fn tenant_status(&self, site: &Site, secret: &str) -> u16 {
        self.tenant_status_at(site, secret, jwt::now()).await
    }
}

/// Polls `status` until it returns `expected` or `within` has passed (checked at least once);
/// returns how long it took, or panics with the last status seen.
pub async fn eventually<F, Fut>(
    what: &str,
    within: Duration,
    expected: u16,
    mut status: F,
) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let start = Instant::now();
    loop {
        let seen = status().await;
        if seen == expected {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!(
                "{what}: still {seen} after {:?}, expected {expected} within {within:?}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
