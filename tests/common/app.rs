//! Spawns the real `warden` server in-process on a free loopback port, with its own store
//! (a fresh prefix on the private Redis, or a fresh embedded database) and its own install-key
//! server, and helps tests speak the host's side of the protocol.

use std::sync::{Arc, OnceLock, RwLock};

use actix_web::web;
use connect_warden::configuration::Settings;
use connect_warden::devtenant::{KeyRing, KeyServer, SigningKey};
use connect_warden::domain::ClientKey;
use connect_warden::jwt::{self, Claims};
use connect_warden::startup::{AppState, Application};
use connect_warden::store::Installation;
use serde_json::json;

use super::{redis_server, tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Embedded,
}

/// The app's public base URL in tests: what install tokens name as `aud`.
pub const APP_BASE_URL: &str = "https://warden.example.com";

pub struct TestApp {
    /// `http://127.0.0.1:PORT` plus the base path.
    pub address: String,
    pub port: u16,
    pub base_path: String,
    /// The app's public base URL (`aud` of install tokens).
    pub base_url: String,
    pub state: web::Data<AppState>,
    pub client: reqwest::Client,
    pub keys: KeyServer,
    pub redis_prefix: Option<String>,
    _data_dir: tempfile::TempDir,
}

/// RSA key generation is slow in debug builds: one key per test binary.
pub fn shared_signing_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate).clone()
}

/// Vendor routes registered beside warden's.
pub type Routes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

pub struct Options {
    pub backend: Backend,
    /// Extra `WARDEN_*` settings (name, value).
    pub env: Vec<(String, String)>,
    pub routes: Option<Routes>,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            env: Vec::new(),
            routes: None,
        }
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
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(Options::new(backend)).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let keyring = Arc::new(RwLock::new(KeyRing::with_key(shared_signing_key())));
    let keys = KeyServer::start("127.0.0.1:0", keyring)
        .await
        .expect("key server starts");
    let data_dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("WARDEN_BIND".into(), "127.0.0.1:0".into()),
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
    ];
    let mut redis_prefix = None;
    if options.backend == Backend::Redis {
        let prefix = redis_server::unique_prefix();
        env.push(("WARDEN_REDIS_URL".into(), redis_server::redis_url().into()));
        env.push(("WARDEN_REDIS_PREFIX".into(), prefix.clone()));
        redis_prefix = Some(prefix);
    }
    env.extend(options.env);
    let settings = Settings::from_sources(None, env).expect("test settings are valid");
    let base_path = settings.base_url.path().to_owned();
    let base_url = settings.base_url.as_str().to_owned();
    let routes = options
        .routes
        .unwrap_or_else(|| Arc::new(|_: &mut web::ServiceConfig| {}));
    let app = Application::build_with_routes(settings, move |cfg| routes(cfg))
        .await
        .expect("application builds");
    let port = app.port();
    let state = app.state();
    tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}{base_path}"),
        port,
        base_path,
        base_url,
        state,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        keys,
        redis_prefix,
        _data_dir: data_dir,
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

    pub fn client_key(&self) -> ClientKey {
        ClientKey::parse(&self.client_key).unwrap()
    }

    /// The lifecycle body for `event_type`.
    pub fn body(&self, event_type: &str) -> serde_json::Value {
        let mut body = json!({
            "key": "connect-warden",
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

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

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

    /// A signed install of `site`, as Atlassian sends it; asserts 204.
    pub async fn install(&self, site: &Site) {
        let token = self.install_token(&site.client_key, "/installed");
        let response = self
            .post_lifecycle("/installed", Some(&token), &site.body("installed"))
            .await;
        assert_eq!(
            response.status(),
            204,
            "install failed: {}",
            response.text().await.unwrap()
        );
    }

    /// An HS256 token for an enabled/disabled callback (or legacy reinstall), signed with `secret`.
    pub fn tenant_lifecycle_token(&self, client_key: &str, secret: &str, path: &str) -> String {
        tokens::tenant_lifecycle_token(&self.base_path, client_key, secret, path)
    }

    /// A product-request token: HS256 with `secret`, `qsh` of `GET <path_and_query>`.
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

    /// GET `path_and_query` with `Authorization: JWT <token>`.
    pub async fn get_with_token(&self, path_and_query: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path_and_query))
            .header("authorization", format!("JWT {token}"))
            .send()
            .await
            .expect("request reaches the app")
    }

    /// `GET /api/tenant` as `site` signed with `secret`; returns the status.
    pub async fn tenant_status(&self, site: &Site, secret: &str) -> u16 {
        let token = self.product_token(&site.client_key, secret, "GET", "/api/tenant", jwt::now());
        self.get_with_token("/api/tenant", &token)
            .await
            .status()
            .as_u16()
    }

    pub async fn stored(&self, client_key: &str) -> Option<Installation> {
        self.state
            .store
            .load(&ClientKey::parse(client_key).unwrap())
            .await
            .unwrap()
    }

    pub async fn stored_count(&self) -> usize {
        self.state.store.list_client_keys().await.unwrap().len()
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
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::app::Backend::Redis).await
                }
            )*
        }
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::app::Backend::Embedded).await
                }
            )*
        }
    };
}
