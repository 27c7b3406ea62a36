//! What devtenant's servers share: an actix server with one worker, bound to a local address
//! and run as a task of the current tokio runtime ([`LocalServer`]), and the check that an
//! address is loopback only ([`loopback_addrs`]).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};

/// The addresses `addr` resolves to, when there are some and all of them are loopback
/// addresses; otherwise an `InvalidInput` error saying `refusal`.
pub(super) fn loopback_addrs(
    addr: impl ToSocketAddrs,
    refusal: &'static str,
) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, refusal));
    }
    Ok(addrs)
}

/// A running server: where it listens and how to stop it. Stopped when dropped.
pub(super) struct LocalServer {
    addr: SocketAddr,
    handle: ServerHandle,
}

impl LocalServer {
    /// Binds `addr` (port 0 picks a free port) and runs an `App` set up by `configure` as a
    /// task of the current tokio runtime; logs "`{what}` listening".
    pub(super) fn start<F>(addr: impl ToSocketAddrs, what: &str, configure: F) -> io::Result<Self>
    where
        F: Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
    {
        let server = HttpServer::new(move || App::new().configure(configure.clone()))
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(addr)?;
        let addr = *server.addrs().first().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "bound to no address")
        })?;
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        tracing::info!(%addr, "{what} listening");
        Ok(Self { addr, handle })
    }

    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR:PORT`.
    pub(super) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits until it has stopped.
    pub(super) async fn stop(self) {
        self.handle.stop(false).await;
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        // The stop command is sent when `stop` is called; awaiting it only waits for completion.
        drop(self.handle.stop(false));
    }
}
