//! devtenant: the Atlassian side of the Connect protocol, played over real HTTP on a loopback
//! address, for the integration tests and the `devtenant` binary.
//!
//! - [`keys`]: the install-signing RSA keys ([`KeyRing`]) and RS256 install tokens;
//! - [`key_server`]: the install-key CDN (`GET /{kid}` -> public key PEM).

pub mod key_server;
pub mod keys;

pub use key_server::{KeyServer, KeyService};
pub use keys::{install_claims, sign_rs256, sign_rs256_with_kid, KeyError, KeyRing, SigningKey};
