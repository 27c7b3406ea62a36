//! devtenant's HTTP server: the install-key server ([`super::key_server`]) and the fake host
//! ([`super::host`]) on one loopback address. Keys are `GET /{kid}` at the root, so the server's
//! URL is the app's `WARDEN_KEYS_URL`; sites live under `/t/{siteKey}` and the OAuth2 token
//! endpoint is `/oauth2/token` (the app's `WARDEN_OAUTH_TOKEN_URL`). Forge's JWKS is
//! `/forge/.well-known/jwks.json` (the app's `WARDEN_FORGE_JWKS_URL`), empty until keys are
//! added to [`DevServer::forge_jwks`].

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, RwLock};

use actix_web::web;

use super::forge::{self, JwksService};
use super::host::{self, HostService};
use super::key_server::{self, KeyService};
use super::keys::KeyRing;
use super::local_server::{loopback_addrs, LocalServer};
use super::upm::{self, UpmService};

/// Key server and fake host on one address. Stopped when dropped.
pub struct DevServer {
    server: LocalServer,
    keys: web::Data<KeyService>,
    host: web::Data<HostService>,
    upm: web::Data<UpmService>,
    forge: web::Data<JwksService>,
}

impl DevServer {
    /// Binds `addr` (loopback only; port 0 picks a free port) and runs the server as a task of
    /// the current tokio runtime, serving the keys of `keyring`.
    pub async fn start(
        addr: impl ToSocketAddrs,
        keyring: Arc<RwLock<KeyRing>>,
    ) -> io::Result<Self> {
        let addrs = loopback_addrs(
            addr,
            "devtenant listens on loopback addresses only (e.g. 127.0.0.1:8090)",
        )?;
        let keys = web::Data::new(KeyService::new(keyring));
        let host = web::Data::new(HostService::new());
        let upm = web::Data::new(UpmService::new(keys.keyring().clone(), host.clone()));
        let forge = web::Data::new(JwksService::default());
        let (k, h, u, f) = (keys.clone(), host.clone(), upm.clone(), forge.clone());
        let server = LocalServer::start(&addrs[..], "devtenant server", move |cfg| {
            // Before the host's `/t/{site}/...`, which would take the plugin manager's paths.
            upm::configure(u.clone())(cfg);
            host::configure(h.clone())(cfg);
            cfg.service(web::scope("/forge").configure(forge::configure(f.clone())));
            key_server::configure(k.clone())(cfg);
        })?;
        Ok(Self {
            server,
            keys,
            host,
            upm,
            forge,
        })
    }

    /// `http://ADDR:PORT`: the fake host, and the value for `WARDEN_KEYS_URL`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The value for `WARDEN_KEYS_URL` (the same as [`url`](Self::url)).
    pub fn keys_url(&self) -> String {
        self.url()
    }

    /// The value for `WARDEN_OAUTH_TOKEN_URL`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.url())
    }

    /// The value for `WARDEN_FORGE_JWKS_URL`.
    pub fn forge_jwks_url(&self) -> String {
        format!("{}/forge{}", self.url(), forge::JWKS_PATH)
    }

    /// Forge's JWKS: add, rotate and revoke the keys of Forge Invocation Tokens.
    pub fn forge_jwks(&self) -> &JwksService {
        &self.forge
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    pub fn host(&self) -> &HostService {
        &self.host
    }

    /// The sites' plugin manager ([`super::upm`]).
    pub fn upm(&self) -> &UpmService {
        &self.upm
    }

    /// Adds a site with a plugin manager whose administrator signs in as `user` with
    /// `api_token`; returns its base URL, `http://ADDR:PORT/t/{site}` (the `--site` of
    /// `warden dev register`).
    pub fn add_upm_site(&self, site: &str, user: &str, api_token: &str) -> String {
        format!("{}{}", self.url(), self.upm.add_site(site, user, api_token))
    }

    pub fn keyring(&self) -> &Arc<RwLock<KeyRing>> {
        self.keys.keyring()
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

impl std::fmt::Debug for DevServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevServer")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}
