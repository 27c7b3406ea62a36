//! Builds the actix `App` from [`Settings`]: the store, the caches, the routes. Binding port 0
//! gives a free port, which is how the tests run the real server in-process.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use secrecy::ExposeSecret as _;
use tracing_actix_web::TracingLogger;

use crate::configuration::Settings;
use crate::install_keys::InstallKeys;
use crate::routes;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::store::SharedStore;
use crate::telemetry::RedactingRootSpan;
use crate::tenants::TenantCache;

/// Everything a handler needs, shared by all workers.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: SharedStore,
    pub keys: InstallKeys,
    pub tenants: TenantCache,
    /// The descriptor, rendered once.
    pub descriptor: String,
}

impl AppState {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store: SharedStore = match &settings.redis_url {
            Some(url) => Arc::new(
                RedisStore::connect(url.expose_secret(), &settings.redis_prefix)
                    .await
                    .context("cannot set up the Redis store (WARDEN_REDIS_URL)")?,
            ),
            None => Arc::new(
                EmbeddedStore::open(&settings.data_dir)
                    .with_context(|| format!("cannot open the embedded store in {} (WARDEN_DATA_DIR)", settings.data_dir.display()))?,
            ),
        };
        Self::with_store(settings, store)
    }

    pub fn with_store(settings: Settings, store: SharedStore) -> anyhow::Result<Self> {
        let descriptor = routes::descriptor::render(&settings).context("the descriptor template is not a JSON object")?;
        Ok(Self {
            keys: InstallKeys::new(settings.keys_url.clone(), settings.key_fetch_timeout),
            tenants: TenantCache::new(store.clone(), settings.secret_cache_ttl),
            store,
            descriptor,
            settings: Arc::new(settings),
        })
    }
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

impl Application {
    /// Opens the store and binds `settings.bind` (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&settings.bind).with_context(|| format!("cannot listen on {} (WARDEN_BIND)", settings.bind))?;
        let state = web::Data::new(AppState::build(settings).await?);
        Self::from_parts(listener, state)
    }

    pub fn from_parts(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let server = run(listener, state.clone())?;
        Ok(Self { port, server, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running service's state: tests use it to look into the store.
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// Registers every route under the base URL's path (`""` or e.g. `/app`).
pub fn configure(cfg: &mut web::ServiceConfig, base_path: &str) {
    cfg.service(
        web::scope(base_path)
            .route("/atlassian-connect.json", web::get().to(routes::descriptor::descriptor))
            .route("/installed", web::post().to(routes::lifecycle::installed))
            .route("/uninstalled", web::post().to(routes::lifecycle::uninstalled))
            .route("/enabled", web::post().to(routes::lifecycle::enabled))
            .route("/disabled", web::post().to(routes::lifecycle::disabled))
            .route("/api/tenant", web::get().to(routes::tenant::tenant))
            .route("/api/context", web::get().to(routes::tenant::context))
            .route("/healthz", web::get().to(routes::health::healthz))
            .route("/readyz", web::get().to(routes::health::readyz)),
    );
}

fn run(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Server> {
    let base_path = state.settings.base_url.path().to_owned();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(TracingLogger::<RedactingRootSpan>::new())
            .app_data(state.clone())
            .configure(|cfg| configure(cfg, &base_path))
            .default_service(web::to(routes::not_found))
    })
    .listen(listener)?
    .run();
    Ok(server)
}
