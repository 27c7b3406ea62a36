//! devtenant: the Atlassian side of the Connect protocol, played over real HTTP on a loopback
//! address, for the integration tests and the `devtenant` binary.
//!
//! - [`keys`]: the install-signing RSA keys ([`KeyRing`]) and RS256 install tokens;
//! - [`key_server`]: the install-key CDN (`GET /{kid}` -> public key PEM);
//! - [`forge`]: Forge's JWKS and a Forge Invocation Token signer with attacker overrides;
//! - [`host`]: the host site and its OAuth2 authorization server, for calls from the app;
//! - [`server`]: key server and fake host on one address; [`state`]: the state directory;
//!   [`client`]: descriptors, tokens and callbacks; [`rehearse`]: the catalogue; [`cli`];
//! - [`upm`]: the sites' plugin manager (install an app from its descriptor URL, as a developer
//!   does on a development site).

pub mod cli;
pub mod client;
pub mod forge;
pub mod host;
pub mod key_server;
pub mod keys;
mod local_server;
pub mod rehearse;
pub mod server;
pub mod state;
pub mod upm;

pub use forge::{as_retry, deliver_event, lifecycle_event, FitSigner, JwksServer, JwksService};
pub use host::{FakeHost, HostRoute, HostService, TenantRecord};
pub use key_server::{KeyServer, KeyService};
pub use keys::{sign_rs256, sign_rs256_with_kid, KeyError, KeyRing, SigningKey};
