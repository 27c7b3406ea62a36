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
use crate::host_client::HostClient;
use crate::install_keys::InstallKeys;
use crate::invalidation::{self, Invalidation, Invalidations};
use crate::lifecycle::apply::Applier;
use crate::lifecycle::LifecycleContext;
use crate::routes;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::{RedisStore, Replication};
use crate::store::sealing::{self, Sealer};
use crate::store::SharedStore;
use crate::telemetry::{self, RedactingRootSpan};
use crate::tenants::TenantCache;
use crate::webhooks::{Webhook, WebhookHandlers, WebhookQueue};
use connect_protocol::domain::ClientKey;

/// Bound on one call to a host site or the authorization server.
const HOST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Everything a handler needs, shared by all workers.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: SharedStore,
    pub keys: InstallKeys,
    pub tenants: TenantCache,
    /// Every tenant invalidation (local lifecycle writes and other instances' via Redis):
    /// subscribe to drop other per-tenant caches.
    pub invalidations: Invalidations,
    /// The descriptor, rendered once.
    pub descriptor: String,
    /// Calls to host sites, as the app or as a user.
    pub host: HostClient,
    /// Forge Remote, when `WARDEN_FORGE_APP_ID` is set.
    pub forge: Option<crate::forge::ForgeRemote>,
    /// Webhook deliveries on their way to the vendor's handlers.
    pub webhooks: WebhookQueue,
    /// The clientKeys whose site proof runs in this process now (one run each at a time).
    site_proofs: std::sync::Mutex<std::collections::HashSet<ClientKey>>,
    /// The installations gauge of `GET /metrics`.
    pub census: crate::monitoring::Census,
}

impl AppState {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let sealer =
            Sealer::for_service(settings.secret_keys.clone(), settings.require_encryption)?;
        match sealer.sealing_key() {
            Some(key_id) => tracing::info!(%key_id, "shared secrets are sealed at rest"),
            None => tracing::warn!("{}", sealing::PLAINTEXT_WARNING),
        }
        let store = open_store(&settings, sealer).await?;
        let state = Self::with_store(settings, store)?;
        if let Some(forge) = &state.settings.forge {
            tracing::info!(app = %forge.app, jwks = %forge.jwks_url, "Forge Remote is on");
        }
        // Keys any instance fetched: verified without the key server. A store that is down
        // now only costs the fetches.
        match state.keys.preload().await {
            Ok(count) => tracing::info!(count, "install keys loaded from the store"),
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&error), "cannot load remembered install keys; they will be fetched")
            }
        }
        // Cached impersonation tokens follow the installation: a reinstall with a new
        // oauthClientId, an uninstall or a site import drops them.
        let host = state.host.clone();
        state
            .invalidations
            .forward_to(move |invalidation| match invalidation {
                Invalidation::Tenant(client_key) => host.forget_tenant(&client_key),
                Invalidation::All => host.forget_all(),
            });
        Ok(state)
    }

    /// Where lifecycle callbacks are applied.
    pub fn lifecycle(&self) -> Applier<'_> {
        Applier {
            policy: LifecycleContext {
                settings: &self.settings,
                keys: &self.keys,
            },
            store: self.store.as_ref(),
            tenants: &self.tenants,
        }
    }

    /// Runs the site proof of `client_key` (docs/PROTOCOL.md §7) in the background, after the
    /// callback was answered: the site may take a while to answer. One run per clientKey at a
    /// time in this process; a run that ends while another install made the record pending
    /// again starts once more.
    pub fn start_site_proof(state: &web::Data<AppState>, client_key: ClientKey) {
        fn running(
            s: &AppState,
        ) -> std::sync::MutexGuard<'_, std::collections::HashSet<ClientKey>> {
            s.site_proofs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
        if !running(state).insert(client_key.clone()) {
            return;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let settings = state.settings.site_proof;
            let result = state
                .lifecycle()
                .prove_site(&state.host, &client_key, settings)
                .await;
            running(&state).remove(&client_key);
            match result {
                Err(error) => {
                    tracing::error!(client_key = %client_key, error = %crate::error::error_chain(&error),
                        "site proof: cannot record the outcome; it runs again on the install's retry or at the next start")
                }
                Ok(_) => {
                    let pending = state
                        .store
                        .load(&client_key)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.site_proof == Some(crate::store::SiteProof::Pending));
                    if pending {
                        Self::start_site_proof(&state, client_key);
                    }
                }
            }
        });
    }

    /// At start-up, one listing of the store in the background, for two jobs: the site proofs
    /// a stopped process left pending run again, and, with Forge Remote on, installations
    /// stored before the Forge identity index existed are indexed (docs/PROTOCOL.md §12;
    /// idempotent). A store error ends the pass; what it did not reach waits for the next start.
    pub fn resume_at_start_up(state: &web::Data<AppState>) {
        let resume_proofs = state.settings.site_proof.enabled;
        let index_forge = state.settings.forge.is_some();
        if !resume_proofs && !index_forge {
            return;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let mut indexed = 0u64;
            let mut cursor = crate::store::ScanCursor::default();
            loop {
                let page = match state.store.scan_installations(cursor).await {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::warn!(error = %crate::error::error_chain(&error), "cannot list installations to resume pending site proofs and index Forge identities; retried at the next start");
                        return;
                    }
                };
                // Records that cannot be read are skipped.
                for record in page.installations.into_iter().filter_map(|l| l.record.ok()) {
                    if index_forge && !crate::store::ForgeIdentity::of(&record).is_empty() {
                        if let Err(error) = state.store.index_forge(&record).await {
                            tracing::warn!(error = %crate::error::error_chain(&error), "cannot backfill the Forge identity index; it is retried at the next start");
                            return;
                        }
                        indexed += 1;
                    }
                    if resume_proofs && record.site_proof == Some(crate::store::SiteProof::Pending)
                    {
                        Self::start_site_proof(&state, record.client_key);
                    }
                }
                match page.next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
            if index_forge {
                tracing::info!(count = indexed, "Forge identity index backfilled");
            }
        });
    }

    pub fn with_store(settings: Settings, store: SharedStore) -> anyhow::Result<Self> {
        // Every store operation is timed and its failures counted (`GET /metrics`).
        let store = crate::monitoring::InstrumentedStore::wrap(store);
        let descriptor = settings.descriptor.to_pretty_string();
        let invalidations = Invalidations::new();
        Ok(Self {
            keys: InstallKeys::new(settings.keys_urls.clone(), settings.key_fetch_timeout)
                .remembering(store.clone()),
            tenants: TenantCache::with_invalidations(
                store.clone(),
                settings.secret_cache_ttl,
                invalidations.clone(),
            ),
            invalidations,
            store,
            descriptor,
            host: HostClient::new(
                settings.app_key.clone(),
                settings.oauth_token_url.clone(),
                HOST_TIMEOUT,
            )
            .with_call_policy(settings.host_calls),
            site_proofs: Default::default(),
            forge: settings
                .forge
                .as_ref()
                .map(|f| crate::forge::ForgeRemote::new(f, settings.key_fetch_timeout)),
            // No handler yet, so no worker: see `with_webhooks`.
            webhooks: WebhookQueue::start(WebhookHandlers::default(), settings.webhooks),
            census: Default::default(),
            settings: Arc::new(settings),
        })
    }

    /// Hands the descriptor's webhooks to `handlers`, starting the worker pool. A handler for
    /// an event the descriptor does not declare is an error.
    pub fn with_webhooks(mut self, handlers: WebhookHandlers) -> anyhow::Result<Self> {
        handlers.check_declared(self.settings.descriptor.webhooks())?;
        self.webhooks = WebhookQueue::start(handlers, self.settings.webhooks);
        Ok(self)
    }
}

/// The store `settings` name, sealing shared secrets with `sealer`. Nothing is sent to Redis
/// yet; the embedded store's file is opened (and locked: one process at a time).
pub async fn open_store(settings: &Settings, sealer: Sealer) -> anyhow::Result<SharedStore> {
    let replication = Some(Replication {
        min_replicas: settings.redis_min_replicas,
        timeout: settings.redis_wait_timeout,
    });
    Ok(match &settings.redis_url {
        Some(urls) if settings.redis_cluster => Arc::new(
            RedisStore::connect_cluster(
                &crate::store::redis::seed_urls(urls.expose_secret()),
                &settings.redis_prefix,
            )
            .await
            .context("cannot set up the Redis Cluster store (WARDEN_REDIS_URL)")?
            .with_replication(replication)
            .with_sealer(sealer),
        ),
        Some(url) => Arc::new(
            RedisStore::connect(url.expose_secret(), &settings.redis_prefix)
                .await
                .context("cannot set up the Redis store (WARDEN_REDIS_URL)")?
                .with_replication(replication)
                .with_sealer(sealer),
        ),
        None => Arc::new(
            EmbeddedStore::open(&settings.data_dir)
                .with_context(|| {
                    format!(
                        "cannot open the embedded store in {} (WARDEN_DATA_DIR; one process at a time)",
                        settings.data_dir.display()
                    )
                })?
                .with_sealer(sealer),
        ),
    })
}

pub struct Application {
    port: u16,
    server: Server,
    /// `GET /metrics` on `WARDEN_METRICS_BIND`, when set.
    metrics_server: Option<Server>,
    state: web::Data<AppState>,
    /// With Redis: the subscription to other instances' writes; stops when this is dropped.
    _invalidation: Option<invalidation::Listener>,
}

impl Application {
    /// Opens the store and binds `settings.bind` (port 0 picks a free one).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::builder(settings).build().await
    }

    /// Like [`build`](Self::build), with the vendor's own routes registered under the base
    /// path beside warden's (see `examples/protected_route.rs`).
    pub async fn build_with_routes(
        settings: Settings,
        routes: impl Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        Self::builder(settings).routes(routes).build().await
    }

    /// An application with vendor routes and webhook handlers:
    /// `Application::builder(settings).routes(..).on_webhook("jira:issue_created", handler).build()`.
    pub fn builder(settings: Settings) -> ApplicationBuilder {
        ApplicationBuilder {
            settings,
            routes: Arc::new(|_| {}),
            webhooks: WebhookHandlers::default(),
        }
    }
}

/// What [`Application::builder`] collects before the application starts.
pub struct ApplicationBuilder {
    settings: Settings,
    routes: ExtraRoutes,
    webhooks: WebhookHandlers,
}

impl ApplicationBuilder {
    /// The vendor's own routes, registered under the base path beside warden's.
    pub fn routes(
        mut self,
        routes: impl Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    ) -> Self {
        self.routes = Arc::new(routes);
        self
    }

    /// Runs `handler` for each accepted delivery of the descriptor's webhook `event` (README
    /// "Webhooks"). The event must be declared in `modules.webhooks`, or `build` fails.
    pub fn on_webhook<F, Fut>(mut self, event: &str, handler: F) -> Self
    where
        F: Fn(Webhook) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.webhooks.on(event, handler);
        self
    }

    /// Every handler of `handlers` (a set built elsewhere), in addition to those registered so
    /// far; a handler for the same event replaces the earlier one.
    pub fn with_handlers(mut self, handlers: WebhookHandlers) -> Self {
        self.webhooks.extend(handlers);
        self
    }

    /// Opens the store, starts the webhook workers and binds `settings.bind`.
    pub async fn build(self) -> anyhow::Result<Application> {
        let Self {
            settings,
            routes,
            webhooks,
        } = self;
        let listener = TcpListener::bind(&settings.bind)
            .with_context(|| format!("cannot listen on {} (WARDEN_BIND)", settings.bind))?;
        let metrics_listener = settings
            .metrics_bind
            .map(|addr| {
                TcpListener::bind(addr)
                    .with_context(|| format!("cannot listen on {addr} (WARDEN_METRICS_BIND)"))
            })
            .transpose()?;
        // Before anything is counted: a count made without a recorder is lost.
        let metrics = crate::monitoring::install();
        let state = web::Data::new(AppState::build(settings).await?.with_webhooks(webhooks)?);
        // Started before serving: from here the tenant cache is not subscribed (reads go to
        // the store) until the listener is, so no request is answered from a cache that may
        // miss another instance's write.
        let invalidation = match &state.settings.redis_url {
            Some(url) => {
                let channel = invalidation::channel(&state.settings.redis_prefix);
                let listener = if state.settings.redis_cluster {
                    // PUBLISH reaches every node of a cluster: one subscription on any seed
                    // node hears every commit.
                    invalidation::Listener::start_on_any(
                        &crate::store::redis::seed_urls(url.expose_secret()),
                        channel,
                        state.tenants.clone(),
                    )
                } else {
                    invalidation::Listener::start(
                        url.expose_secret(),
                        channel,
                        state.tenants.clone(),
                    )
                };
                Some(
                    listener
                        .context("cannot subscribe to Redis invalidations (WARDEN_REDIS_URL)")?,
                )
            }
            None => None,
        };
        let port = listener.local_addr()?.port();
        let server = run(listener, state.clone(), routes)?;
        let metrics_server = match metrics_listener {
            Some(listener) if metrics.is_some() => Some(run_metrics(listener, state.clone())?),
            _ => None,
        };
        AppState::resume_at_start_up(&state);
        Ok(Application {
            port,
            server,
            metrics_server,
            state,
            _invalidation: invalidation,
        })
    }
}

impl Application {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running service's state: tests use it to look into the store.
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        match self.metrics_server {
            // Both stop on the same signal; the first failure ends both.
            Some(metrics) => futures_util::future::try_join(self.server, metrics)
                .await
                .map(|_| ()),
            None => self.server.await,
        }
    }
}

/// Vendor routes, registered under the base path before warden's own.
type ExtraRoutes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// Registers every route under the base URL's path (`""` or e.g. `/app`): `extra` first (the
/// vendor's), then warden's. `GET /metrics` is among them only when `metrics` (no listener of
/// its own). Each of warden's paths is also listed in `routes::descriptor` (`LIFECYCLE_PATHS`,
/// `SERVICE_PATHS`), so that no descriptor webhook can take it.
pub fn configure(
    cfg: &mut web::ServiceConfig,
    base_path: &str,
    extra: &dyn Fn(&mut web::ServiceConfig),
    metrics: bool,
) {
    let mut scope = web::scope(base_path).configure(extra);
    if metrics {
        scope = scope.route("/metrics", web::get().to(crate::monitoring::metrics));
    }
    cfg.service(
        scope
            .route(
                "/atlassian-connect.json",
                web::get().to(routes::descriptor::descriptor),
            )
            .route("/installed", web::post().to(routes::lifecycle::installed))
            .route(
                "/uninstalled",
                web::post().to(routes::lifecycle::uninstalled),
            )
            .route("/enabled", web::post().to(routes::lifecycle::enabled))
            .route("/disabled", web::post().to(routes::lifecycle::disabled))
            .route("/forge/events", web::post().to(routes::forge::events))
            .route("/api/tenant", web::get().to(routes::tenant::tenant))
            .route("/api/context", web::get().to(routes::tenant::context))
            .route("/healthz", web::get().to(routes::health::healthz))
            .route("/readyz", web::get().to(routes::health::readyz)),
    );
}

fn run(
    listener: TcpListener,
    state: web::Data<AppState>,
    extra: ExtraRoutes,
) -> anyhow::Result<Server> {
    let base_path = state.settings.base_url.path().to_owned();
    let header_timeout = state.settings.header_timeout;
    let public_metrics = state.settings.metrics_bind.is_none();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(crate::limits::body_deadline))
            .wrap(actix_web::middleware::from_fn(telemetry::request_id_scope))
            .wrap(TracingLogger::<RedactingRootSpan>::new())
            .app_data(state.clone())
            // Before the base-path scope, which would answer 404 for any path it lacks.
            .configure(|cfg| {
                routes::webhooks::configure(cfg, &base_path, state.settings.descriptor.webhooks())
            })
            .configure(|cfg| configure(cfg, &base_path, extra.as_ref(), public_metrics))
            .default_service(web::to(routes::not_found))
    })
    // Headers not complete in time: actix answers 408 and closes (docs/PROTOCOL.md §14).
    .client_request_timeout(header_timeout)
    .listen(listener)?
    .run();
    Ok(server)
}

/// `GET /metrics` alone, on `WARDEN_METRICS_BIND` (not under the base path); anything else
/// answers `404`. One worker: a scrape every few seconds needs no more.
fn run_metrics(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Server> {
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(crate::monitoring::metrics))
            .default_service(web::to(routes::not_found))
    })
    .workers(1)
    .listen(listener)?
    .run();
    Ok(server)
}
