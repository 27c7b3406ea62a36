//! The install-key server of the fake Atlassian side: `GET /{kid}` answers the public key of a
//! [`KeyRing`] as PEM text, like `connect-install-keys.atlassian.com`.
//!
//! [`KeyService`] is the shared state and [`configure`] mounts the route into any actix `App`
//! or scope (e.g. `/keys` beside devtenant's other endpoints); [`KeyServer`] runs it alone on
//! its own address. Test knobs: failure mode (503), an artificial delay, and raw bodies served
//! in place of a key.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use actix_web::{web, HttpResponse};

use super::keys::KeyRing;
use super::local_server::{loopback_addrs, LocalServer};
use connect_protocol::domain::BaseUrl;

/// Content type of a served key.
pub const PEM_CONTENT_TYPE: &str = "application/x-pem-file";

/// Distinct kids counted one by one; requests for further kids only count in the total, so a
/// long-running server cannot be made to grow without bound.
const MAX_COUNTED_KIDS: usize = 10_000;

/// State of the key endpoint, shared by every worker through `web::Data`.
#[derive(Debug)]
pub struct KeyService {
    keyring: Arc<RwLock<KeyRing>>,
    failing: AtomicBool,
    delay_ms: AtomicU64,
    raw_bodies: Mutex<HashMap<String, String>>,
    revoked: Mutex<std::collections::HashSet<String>>,
    fetches: Mutex<HashMap<String, u64>>,
    total_fetches: AtomicU64,
}

impl KeyService {
    /// Serves the keys of `keyring`; keys added to it later (rotation) are served at once.
    pub fn new(keyring: Arc<RwLock<KeyRing>>) -> Self {
        Self {
            keyring,
            failing: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            raw_bodies: Mutex::new(HashMap::new()),
            revoked: Mutex::new(Default::default()),
            fetches: Mutex::new(HashMap::new()),
            total_fetches: AtomicU64::new(0),
        }
    }

    pub fn keyring(&self) -> &Arc<RwLock<KeyRing>> {
        &self.keyring
    }

    /// Requests received for `kid` (whatever the answer was).
    pub fn fetches(&self, kid: &str) -> u64 {
        lock(&self.fetches).get(kid).copied().unwrap_or(0)
    }

    /// Requests received for any kid.
    pub fn total_fetches(&self) -> u64 {
        self.total_fetches.load(Ordering::SeqCst)
    }

    /// While on, every request is answered `503 Service Unavailable`.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Every answer waits this long first (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Answers `200` with `body` for `kid` instead of a key (`None` removes the override);
    /// for tests of a key server that sends garbage.
    pub fn serve_raw(&self, kid: &str, body: Option<String>) {
        let mut raw = lock(&self.raw_bodies);
        match body {
            Some(body) => raw.insert(kid.to_owned(), body),
            None => raw.remove(kid),
        };
    }

    fn count(&self, kid: &str) {
        self.total_fetches.fetch_add(1, Ordering::SeqCst);
        let mut fetches = lock(&self.fetches);
        if let Some(n) = fetches.get_mut(kid) {
            *n += 1;
        } else if fetches.len() < MAX_COUNTED_KIDS {
            fetches.insert(kid.to_owned(), 1);
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    /// Answers `404` for `kid` from now on, as Atlassian's server does for a revoked key
    /// (the key itself stays in the ring, so tokens can still be signed with it).
    pub fn revoke(&self, kid: &str) {
        lock(&self.revoked).insert(kid.to_owned());
    }

    fn answer(&self, kid: &str) -> HttpResponse {
        if self.failing.load(Ordering::SeqCst) {
            return HttpResponse::ServiceUnavailable()
                .content_type("text/plain")
                .body("the key server is in failure mode\n");
        }
        if let Some(body) = lock(&self.raw_bodies).get(kid) {
            return HttpResponse::Ok()
                .content_type("text/plain")
                .body(body.clone());
        }
        let ring = self.keyring.read().unwrap_or_else(PoisonError::into_inner);
        match ring.get(kid).filter(|_| !lock(&self.revoked).contains(kid)) {
            Some(key) => HttpResponse::Ok()
                .content_type(PEM_CONTENT_TYPE)
                .body(key.public_pem().to_owned()),
            None => HttpResponse::NotFound()
                .content_type("text/plain")
                .body("no such key\n"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Mounts `GET /{kid}` relative to where it is configured, with `service` as its state:
/// `App::new().configure(configure(service))` or
/// `web::scope("/keys").configure(configure(service))`.
pub fn configure(service: web::Data<KeyService>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(service)
            .route("/{kid}", web::get().to(get_key));
    }
}

async fn get_key(service: web::Data<KeyService>, kid: web::Path<String>) -> HttpResponse {
    let kid = kid.into_inner();
    service.count(&kid);
    tracing::debug!(%kid, "devtenant key server: key requested");
    let delay = service.delay();
    if !delay.is_zero() {
        actix_web::rt::time::sleep(delay).await;
    }
    service.answer(&kid)
}

/// A [`KeyService`] on its own HTTP server. Stopped when dropped.
pub struct KeyServer {
    server: LocalServer,
    service: web::Data<KeyService>,
}

impl KeyServer {
    /// Binds `addr` (`"127.0.0.1:0"` picks a free port) and runs the server as a task of the
    /// current tokio runtime.
    pub async fn start(
        addr: impl ToSocketAddrs,
        keyring: Arc<RwLock<KeyRing>>,
    ) -> io::Result<Self> {
        let addrs = loopback_addrs(addr, "the key server binds loopback addresses only")?;
        let service = web::Data::new(KeyService::new(keyring));
        let shared = service.clone();
        let server = LocalServer::start(&addrs[..], "devtenant key server", move |cfg| {
            configure(shared.clone())(cfg);
        })?;
        Ok(Self { server, service })
    }

    /// `http://ADDR:PORT`, the value for `WARDEN_KEYS_URL`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// [`url`](Self::url) as a [`BaseUrl`].
    pub fn base_url(&self) -> BaseUrl {
        BaseUrl::parse(&self.url()).expect("http://<socket address> is a valid base URL")
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn service(&self) -> &KeyService {
        &self.service
    }

    pub fn keyring(&self) -> &Arc<RwLock<KeyRing>> {
        self.service.keyring()
    }

    /// See [`KeyService::fetches`].
    pub fn fetches(&self, kid: &str) -> u64 {
        self.service.fetches(kid)
    }

    /// See [`KeyService::total_fetches`].
    pub fn total_fetches(&self) -> u64 {
        self.service.total_fetches()
    }

    /// See [`KeyService::set_failing`].
    pub fn set_failing(&self, failing: bool) {
        self.service.set_failing(failing);
    }

    /// See [`KeyService::set_delay`].
    pub fn set_delay(&self, delay: Duration) {
        self.service.set_delay(delay);
    }

    /// See [`KeyService::revoke`].
    pub fn revoke(&self, kid: &str) {
        self.service.revoke(kid);
    }

    /// See [`KeyService::serve_raw`].
    pub fn serve_raw(&self, kid: &str, body: Option<String>) {
        self.service.serve_raw(kid, body);
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

impl std::fmt::Debug for KeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServer")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::test_keys;
    use actix_web::{http::StatusCode, test, App};

    #[actix_web::test]
    async fn serves_known_kids_under_any_mount_point() {
        let [a, b] = test_keys();
        let ring = Arc::new(RwLock::new(KeyRing::with_key(a.clone())));
        let service = web::Data::new(KeyService::new(ring.clone()));
        let app = test::init_service(
            App::new().service(web::scope("/keys").configure(configure(service.clone()))),
        )
        .await;

        let res = test::call_service(
            &app,
            test::TestRequest::get()
                .uri(&format!("/keys/{}", a.kid))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers().get("content-type").unwrap(), PEM_CONTENT_TYPE);
        assert_eq!(test::read_body(res).await, a.public_pem().as_bytes());

        let unknown = test::TestRequest::get()
            .uri(&format!("/keys/{}", b.kid))
            .to_request();
        assert_eq!(
            test::call_service(&app, unknown).await.status(),
            StatusCode::NOT_FOUND
        );

        ring.write().unwrap().rotate_to(b.clone()).unwrap();
        let rotated = test::TestRequest::get()
            .uri(&format!("/keys/{}", b.kid))
            .to_request();
        assert_eq!(
            test::call_service(&app, rotated).await.status(),
            StatusCode::OK
        );

        service.set_failing(true);
        let failing = test::TestRequest::get()
            .uri(&format!("/keys/{}", a.kid))
            .to_request();
        assert_eq!(
            test::call_service(&app, failing).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );

        assert_eq!(service.fetches(&a.kid), 2);
        assert_eq!(service.fetches(&b.kid), 2);
        assert_eq!(service.total_fetches(), 4);
    }
}
