//! The harness of the integration tests: [`app::TestApp`] (warden in-process or as a spawned
//! process), the host's tokens ([`tokens`]), a private Redis ([`redis_server`]), store helpers
//! ([`store`]) and the `devtenant` binary ([`binaries`]).

pub mod app;
pub mod binaries;
pub mod redis_server;
pub mod store;
pub mod tokens;

use std::net::TcpListener;

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `count` distinct free loopback ports.
pub fn free_ports(count: usize) -> Vec<u16> {
    // Held together so that no port is handed out twice.
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
