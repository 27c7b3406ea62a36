//! devtenant's HTTP server: the install-key server ([`super::key_server`]) and the fake host
//! ([`super::host`]) on one loopback address. Keys are `GET /{kid}` at the root, so the server's
//! URL is the app's `WARDEN_KEYS_URL`; sites live under `/t/{siteKey}` and the OAuth2 token
//! endpoint is `/oauth2/token` (the app's `WARDEN_OAUTH_TOKEN_URL`).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, RwLock};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};

use super::host::{self, HostService};
use super::key_server::{self, KeyService};
use super::keys::KeyRing;

/// Key server and fake host on one address. Stopped when dropped.
pub struct DevServer {
    keys: web::Data<KeyService>,
    host: web::Data<HostService>,
    addr: SocketAddr,
    handle: ServerHandle,
}

impl DevServer {
    /// Binds `addr` (loopback only; port 0 picks a free port) and runs the server as a task of
    /// the current tokio runtime, serving the keys of `keyring`.
    pub async fn start(
        addr: impl ToSocketAddrs,
        keyring: Arc<RwLock<KeyRing>>,
    ) -> io::Result<Self> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "devtenant listens on loopback addresses only (e.g. 127.0.0.1:8090)",
            ));
        }
        let keys = web::Data::new(KeyService::new(keyring));
        let host = web::Data::new(HostService::new());
        let (k, h) = (keys.clone(), host.clone());
        let server = HttpServer::new(move || {
            App::new()
                .configure(host::configure(h.clone()))
                .configure(key_server::configure(k.clone()))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(&addrs[..])?;
        let addr = *server.addrs().first().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "bound to no address")
        })?;
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        tracing::info!(%addr, "devtenant server listening");
        Ok(Self {
            keys,
            host,
            addr,
            handle,
        })
    }

    /// `http://ADDR:PORT`: the fake host, and the value for `WARDEN_KEYS_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value for `WARDEN_KEYS_URL` (the same as [`url`](Self::url)).
    pub fn keys_url(&self) -> String {
        self.url()
    }

    /// The value for `WARDEN_OAUTH_TOKEN_URL`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.url())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    pub fn host(&self) -> &HostService {
        &self.host
    }

    pub fn keyring(&self) -> &Arc<RwLock<KeyRing>> {
        self.keys.keyring()
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

impl std::fmt::Debug for DevServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
