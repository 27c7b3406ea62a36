//! The one harness: warden in-process ([`TestApp::spawn`], with its state at hand) or as the
//! built `warden` binary ([`TestApp::spawn_process`], for several instances sharing one
//! Redis, see [`Cluster`]). Either way it gets its own store (a fresh prefix on the private
//! Redis, or a fresh embedded database) and an install-key server, and the same methods speak
//! the host's side of each route.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use actix_web::web;
use connect_protocol::domain::ClientKey;
use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt::{self, Claims};
use connect_warden::configuration::Settings;
use connect_warden::startup::{AppState, Application};
use connect_warden::store::Installation;
use connect_warden::webhooks::{Webhook, WebhookHandlers};
use devtenant::{FakeHost, KeyRing, KeyServer, SigningKey, TenantRecord};
use serde_json::json;

use super::{free_port, redis_server, tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Embedded,
}

/// The app key of the bundled descriptor.
pub const APP_KEY: &str = "connect-warden";

/// The app's public base URL in tests: what install tokens name as `aud`.
pub const APP_BASE_URL: &str = "https://warden.example.com";

/// How long a fresh `warden` process may take to answer `GET /readyz` with 200.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// RSA key generation is slow in debug builds: one key per test binary.
pub fn shared_signing_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate).clone()
}

/// An install-key server holding [`shared_signing_key`].
async fn start_key_server() -> Arc<KeyServer> {
    let keyring = Arc::new(RwLock::new(KeyRing::with_key(shared_signing_key())));
    Arc::new(
        KeyServer::start("127.0.0.1:0", keyring)
            .await
            .expect("key server starts"),
    )
}

/// Vendor routes registered beside warden's.
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// How to start a [`TestApp`]: the store, extra settings, vendor routes, what it shares with
/// other instances.
pub struct Options {
    backend: Backend,
    /// Extra `WARDEN_*` settings (name, value).
    env: Vec<(String, String)>,
    /// Vendor routes (in-process only).
    routes: Option<Routes>,
    /// A Redis other than this binary's private one.
    redis_url: Option<String>,
    /// A Redis prefix shared with other instances instead of a fresh one.
    redis_prefix: Option<String>,
    /// An install-key server shared with other instances instead of a fresh one.
    keys: Option<Arc<KeyServer>>,
    /// Webhook handlers (in-process only).
    webhooks: WebhookHandlers,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            env: Vec::new(),
            routes: None,
            redis_url: None,
            redis_prefix: None,
            keys: None,
            webhooks: WebhookHandlers::default(),
        }
    }

    /// Runs `handler` for the descriptor's webhook `event`.
    pub fn on_webhook<F, Fut>(mut self, event: &str, handler: F) -> Self
    where
        F: Fn(Webhook) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.webhooks.on(event, handler);
        self
    }

    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    pub fn routes(
        mut self,
        routes: impl Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    ) -> Self {
        self.routes = Some(Arc::new(routes));
        self
    }

    pub fn legacy(self) -> Self {
        self.set("WARDEN_INSTALL_AUTH", "legacy")
    }

    /// Shares `cluster`'s Redis, prefix and install-key server.
    pub fn shared(mut self, cluster: &Cluster) -> Self {
        self.backend = Backend::Redis;
        self.redis_url = Some(cluster.redis_url.clone());
        self.redis_prefix = Some(cluster.redis_prefix.clone());
        self.keys = Some(cluster.keys.clone());
        self
    }
}

/// In-process warden on `backend` with default settings.
pub async fn spawn_app(backend: Backend) -> TestApp {
    TestApp::spawn(Options::new(backend)).await
}

/// In-process warden with `options`.
pub async fn spawn_app_with(options: Options) -> TestApp {
    TestApp::spawn(options).await
}

/// How the app under test runs.
enum Runner {
    InProcess(web::Data<AppState>),
    /// The `warden` binary; killed when the [`TestApp`] drops, so a failing test leaves none
    /// behind.
    Process {
        child: Mutex<Child>,
        log_path: PathBuf,
    },
}

pub struct TestApp {
    /// Names the instance in assertion messages (`"app"` in-process).
    pub name: String,
    /// `http://127.0.0.1:PORT` plus the base path.
    pub address: String,
    pub base_path: String,
    /// The app's public base URL (`aud` of install tokens).
    pub base_url: String,
    pub client: reqwest::Client,
    pub keys: Arc<KeyServer>,
    runner: Runner,
    _data_dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Runner::Process { child, .. } = &mut self.runner {
            let child = child.get_mut().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What an app needs before it starts: its settings as `WARDEN_*` pairs, its key server, its
/// data directory.
struct Prepared {
    env: Vec<(String, String)>,
    keys: Arc<KeyServer>,
    data_dir: tempfile::TempDir,
    base_path: String,
    base_url: String,
}

async fn prepare(options: &mut Options, bind: String) -> Prepared {
    let keys = match options.keys.take() {
        Some(keys) => keys,
        None => start_key_server().await,
    };
    let data_dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("WARDEN_BIND".into(), bind),
        ("WARDEN_BASE_URL".into(), APP_BASE_URL.into()),
        ("WARDEN_KEYS_URL".into(), keys.url()),
        (
            "WARDEN_DATA_DIR".into(),
            data_dir.path().display().to_string(),
        ),
        (
            "WARDEN_DESCRIPTOR".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/atlassian-connect.json").into(),
        ),
        // A site proof that cannot succeed (a site on no host) gives up within a second.
        ("WARDEN_SITE_PROOF_BACKOFF_MS".into(), "20".into()),
    ];
    if options.backend == Backend::Redis {
        let prefix = options
            .redis_prefix
            .take()
            .unwrap_or_else(redis_server::unique_prefix);
        let url = options
            .redis_url
            .take()
            .unwrap_or_else(|| redis_server::redis_url().into());
        env.push(("WARDEN_REDIS_URL".into(), url));
        env.push(("WARDEN_REDIS_PREFIX".into(), prefix));
    }
    env.append(&mut options.env);
    let settings = Settings::from_sources(None, env.clone()).expect("test settings are valid");
    Prepared {
        env,
        keys,
        data_dir,
        base_path: settings.base_url.path().to_owned(),
        base_url: settings.base_url.as_str().to_owned(),
    }
}

impl TestApp {
    /// Warden in-process, on a free port.
    pub async fn spawn(mut options: Options) -> TestApp {
        let prepared = prepare(&mut options, "127.0.0.1:0".into()).await;
        let settings = Settings::from_sources(None, prepared.env).expect("test settings are valid");
        let base_path = prepared.base_path;
        let routes = options
            .routes
            .unwrap_or_else(|| Arc::new(|_: &mut web::ServiceConfig| {}));
        let mut builder = Application::builder(settings).routes(move |cfg| routes(cfg));
        builder = builder.with_handlers(std::mem::take(&mut options.webhooks));
        let app = builder.build().await.expect("application builds");
        let port = app.port();
        let state = app.state();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            name: "app".to_owned(),
            address: format!("http://127.0.0.1:{port}{base_path}"),
            base_path,
            base_url: prepared.base_url,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            keys: prepared.keys,
            runner: Runner::InProcess(state),
            _data_dir: prepared.data_dir,
        }
    }

    /// The built `warden` binary (`warden serve`'s defaults) named `name`, on a free port;
    /// returns once it answers `GET /readyz` with 200.
    pub async fn spawn_process(name: &str, mut options: Options) -> TestApp {
        assert!(
            options.routes.is_none() && options.webhooks.is_empty(),
            "vendor routes and webhook handlers need an in-process app"
        );
        let port = free_port();
        let prepared = prepare(&mut options, format!("127.0.0.1:{port}")).await;
        let log_path = prepared.data_dir.path().join("warden.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        if !prepared.env.iter().any(|(var, _)| var == "RUST_LOG") {
            command.env("RUST_LOG", "warn");
        }
        command.envs(prepared.env);
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the warden binary starts");
        let app = TestApp {
            name: name.to_owned(),
            address: format!("http://127.0.0.1:{port}{}", prepared.base_path),
            base_path: prepared.base_path,
            base_url: prepared.base_url,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            keys: prepared.keys,
            runner: Runner::Process {
                child: Mutex::new(child),
                log_path,
            },
            _data_dir: prepared.data_dir,
        };
        app.wait_ready().await;
        app
    }

    /// What the spawned process has logged so far (empty in-process).
    pub fn log(&self) -> String {
        match &self.runner {
            Runner::Process { log_path, .. } => {
                std::fs::read_to_string(log_path).unwrap_or_default()
            }
            Runner::InProcess(_) => String::new(),
        }
    }

    async fn wait_ready(&self) {
        let Runner::Process { child, log_path } = &self.runner else {
            return;
        };
        let log = || std::fs::read_to_string(log_path).unwrap_or_default();
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
            if let Some(status) = child.lock().unwrap().try_wait().ok().flatten() {
                panic!(
                    "warden {} exited ({status}) before it was ready; its log:\n{}",
                    self.name,
                    log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "warden {} did not answer /readyz with 200 within {READY_WITHIN:?}; its log:\n{}",
                    self.name,
                    log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The in-process app's state (store, caches, settings).
    pub fn state(&self) -> &web::Data<AppState> {
        match &self.runner {
            Runner::InProcess(state) => state,
            Runner::Process { .. } => panic!("warden {} runs in its own process", self.name),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    // -- Tokens ----------------------------------------------------------------------------

    /// The RS256 token Atlassian would send with `POST <path>` for `client_key`.
    pub fn install_token(&self, client_key: &str, path: &str) -> String {
        let claims = self.install_claims(client_key, path);
        self.sign_install(&claims)
    }

    pub fn install_claims(&self, client_key: &str, path: &str) -> Claims {
        tokens::install_claims(&self.base_url, &self.base_path, client_key, path)
    }

    pub fn sign_install(&self, claims: &Claims) -> String {
        tokens::sign_install(&self.keys, claims)
    }

    /// An HS256 token for an enabled/disabled callback (or legacy reinstall), signed with `secret`.
    pub fn tenant_lifecycle_token(&self, client_key: &str, secret: &str, path: &str) -> String {
        tokens::tenant_lifecycle_token(&self.base_path, client_key, secret, path)
    }

    /// A product-request token: HS256 with `secret`, `qsh` of `<method> <path_and_query>`.
    pub fn product_token(
        &self,
        client_key: &str,
        secret: &str,
        method: &str,
        path_and_query: &str,
        iat: i64,
    ) -> String {
        tokens::product_token(
            &self.base_path,
            client_key,
            secret,
            method,
            path_and_query,
            iat,
        )
    }

    // -- Lifecycle routes ------------------------------------------------------------------

    /// POSTs a lifecycle body with an optional `Authorization: JWT` token.
    pub async fn post_lifecycle(
        &self,
        path: &str,
        token: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.post_raw(path, token, serde_json::to_vec(body).unwrap())
            .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.header("authorization", format!("JWT {token}"));
        }
        request.send().await.expect("request reaches the app")
    }

    /// A signed `installed` of `site` (a roll when the clientKey is known), as Atlassian
    /// sends it; asserts 204.
    pub async fn installed(&self, site: &Site) {
        self.signed_callback(site, "installed").await;
    }

    /// A signed `uninstalled` of `site`; asserts 204.
    pub async fn uninstalled(&self, site: &Site) {
        self.signed_callback(site, "uninstalled").await;
    }

    /// `enabled`, signed with the site's current secret; asserts 204.
    pub async fn enabled(&self, site: &Site) {
        self.tenant_callback(site, "enabled").await;
    }

    /// `disabled`, signed with the site's current secret; asserts 204.
    pub async fn disabled(&self, site: &Site) {
        self.tenant_callback(site, "disabled").await;
    }

    /// `POST /<event>` for `site` with Atlassian's RS256 token; asserts 204.
    async fn signed_callback(&self, site: &Site, event: &str) {
        let token = self.install_token(&site.client_key, &format!("/{event}"));
        self.accepted(site, event, &token).await;
    }

    /// `POST /<event>` for `site` with an HS256 token signed with its secret; asserts 204.
    async fn tenant_callback(&self, site: &Site, event: &str) {
        let token =
            self.tenant_lifecycle_token(&site.client_key, &site.secret, &format!("/{event}"));
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

    // -- Webhooks --------------------------------------------------------------------------

    /// The token a site sends with `POST <path_and_query>` (a webhook): HS256 with `secret`,
    /// `qsh` of exactly that request.
    pub fn webhook_token(&self, client_key: &str, secret: &str, path_and_query: &str) -> String {
        tokens::webhook_token(&self.base_path, client_key, secret, path_and_query)
    }

    /// POSTs a webhook delivery to `path_and_query` as `site` (signed with its secret), with
    /// `X-Atlassian-Webhook-Identifier: identifier` when given.
    pub async fn webhook(
        &self,
        site: &Site,
        path_and_query: &str,
        identifier: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let token = self.webhook_token(&site.client_key, &site.secret, path_and_query);
        self.post_webhook(path_and_query, Some(&token), identifier, body)
            .await
    }

    /// POSTs a webhook delivery with `token` (if any) and `identifier` (if any).
    pub async fn post_webhook(
        &self,
        path_and_query: &str,
        token: Option<&str>,
        identifier: Option<&str>,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path_and_query)).json(body);
        if let Some(token) = token {
            request = request.header("authorization", format!("JWT {token}"));
        }
        if let Some(identifier) = identifier {
            request = request.header("x-atlassian-webhook-identifier", identifier);
        }
        request.send().await.expect("request reaches the app")
    }

    // -- Product routes --------------------------------------------------------------------

    /// GET `path_and_query` with `Authorization: JWT <token>`.
    pub async fn get_with_token(&self, path_and_query: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path_and_query))
            .header("authorization", format!("JWT {token}"))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// `GET /api/tenant` with `token`.
    pub async fn tenant(&self, token: &str) -> reqwest::Response {
        self.get_with_token("/api/tenant", token).await
    }

    /// `GET /api/context` with `token`.
    pub async fn context(&self, token: &str) -> reqwest::Response {
        self.get_with_token("/api/context", token).await
    }

    /// `GET /api/tenant` as `site` with its secret, issued now: the JSON body (asserting 200).
    pub async fn tenant_body(&self, site: &Site) -> serde_json::Value {
        let token = self.product_token(
            &site.client_key,
            &site.secret,
            "GET",
            "/api/tenant",
            jwt::now(),
        );
        let response = self.tenant(&token).await;
        assert_eq!(
            response.status(),
            200,
            "GET /api/tenant as {}",
            site.client_key
        );
        response.json().await.unwrap()
    }

    /// `GET /api/tenant` as `site`, signed with `secret`, issued at `iat`; returns the status.
    pub async fn tenant_status_at(&self, site: &Site, secret: &str, iat: i64) -> u16 {
        let token = self.product_token(&site.client_key, secret, "GET", "/api/tenant", iat);
        self.tenant(&token).await.status().as_u16()
    }

    /// `GET /api/tenant` as `site`, signed with `secret`, issued now; returns the status.
    pub async fn tenant_status(&self, site: &Site, secret: &str) -> u16 {
        self.tenant_status_at(site, secret, jwt::now()).await
    }

    // -- Service routes --------------------------------------------------------------------

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// `GET /atlassian-connect.json`.
    pub async fn descriptor(&self) -> reqwest::Response {
        self.get("/atlassian-connect.json").await
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> reqwest::Response {
        self.get("/healthz").await
    }

    /// `GET /readyz`.
    pub async fn readyz(&self) -> reqwest::Response {
        self.get("/readyz").await
    }

    // -- The store, in-process -------------------------------------------------------------

    pub async fn stored(&self, client_key: &str) -> Option<Installation> {
        self.state()
            .store
            .load(&ClientKey::parse(client_key).unwrap())
            .await
            .unwrap()
    }

    pub async fn stored_count(&self) -> usize {
        self.state().store.list_client_keys().await.unwrap().len()
    }
}

/// What several instances share: the Redis (this binary's private server unless told
/// otherwise), a key prefix no other test uses, and the install-key server.
pub struct Cluster {
    pub redis_url: String,
    pub redis_prefix: String,
    pub keys: Arc<KeyServer>,
}

impl Cluster {
    pub async fn new() -> Self {
        Self::on(redis_server::redis_url()).await
    }

    /// Instances on the Redis at `redis_url` (e.g. a test's own [`redis_server::OwnRedis`]).
    pub async fn on(redis_url: &str) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            redis_prefix: redis_server::unique_prefix(),
            keys: start_key_server().await,
        }
    }

    /// Starts one more `warden` process on this cluster's Redis and prefix, with extra
    /// `WARDEN_*` settings, and waits until it is ready.
    pub async fn spawn(&self, name: &str, env: &[(&str, &str)]) -> TestApp {
        let options = env.iter().fold(
            Options::new(Backend::Redis).shared(self),
            |options, (var, value)| options.set(var, *value),
        );
        TestApp::spawn_process(name, options).await
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

/// A site as the host describes it in lifecycle bodies.
#[derive(Debug, Clone)]
pub struct Site {
    pub client_key: String,
    pub base_url: String,
    pub secret: String,
    pub oauth_client_id: String,
}

static SITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Site {
    /// A new site with unique names and a random secret.
    pub fn new() -> Self {
        let n = SITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            client_key: format!("ck-{n}-{}", &id[..12]),
            base_url: format!("https://site{n}-{}.atlassian.net", &id[..8]),
            secret: format!("secret-{id}"),
            oauth_client_id: format!("oauth-{}", &id[..16]),
        }
    }

    /// A new site on `host` under `base_path` (`""` or e.g. `/wiki`): the host knows it by its
    /// clientKey, secret and oauthClientId, and answers the app's calls signed with its secret.
    pub fn on_host(host: &FakeHost, base_path: &str) -> Self {
        let mut site = Self::new();
        let base_url = host.add_tenant(TenantRecord {
            client_key: site.client_key.clone(),
            base_path: base_path.into(),
            shared_secret: SharedSecret::parse(&site.secret).unwrap(),
            oauth_client_id: site.oauth_client_id.clone(),
            app_key: APP_KEY.into(),
        });
        site.base_url = base_url.to_string();
        site
    }

    /// The lifecycle body for `event_type`.
    pub fn body(&self, event_type: &str) -> serde_json::Value {
        let mut body = json!({
            "key": APP_KEY,
            "clientKey": self.client_key,
            "baseUrl": self.base_url,
            "displayUrl": self.base_url,
            "productType": "jira",
            "description": "Atlassian JIRA at https://example.atlassian.net",
            "oauthClientId": self.oauth_client_id,
            "serverVersion": "100237",
            "pluginsVersion": "1001.0.0",
            "eventType": event_type,
            "someFieldFromTheFuture": {"tolerated": true},
        });
        if event_type == "installed" {
            body["sharedSecret"] = json!(self.secret);
        }
        body
    }
}

impl Default for Site {
    fn default() -> Self {
        Self::new()
    }
}

/// The `{"error": ...}` message of a response.
pub async fn error_of(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("error bodies are JSON");
    body["error"]
        .as_str()
        .expect("error bodies have an error string")
        .to_owned()
}

/// Runs one async test body against both stores.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::app::Backend::Redis).await
                }
            )*
        }
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::app::Backend::Embedded).await
                }
            )*
        }
    };
}
pub(crate) use both_stores;
