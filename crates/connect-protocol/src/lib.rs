//! The rules of Atlassian Connect that have nothing to do with serving HTTP or storing data,
//! shared by the `warden` service and the `devtenant` test double. No web framework, no store.
//!
//! Layout, one job each:
//! - [`domain`]: newtypes parsed once at the edge (`ClientKey`, `BaseUrl`, `KeyId`,
//!   `SharedSecret`, `HostPattern`);
//! - [`jwt`]: a token split and decoded once, its signature (HS256, RS256) and claim rules;
//! - [`qsh`]: the one canonical-request (`qsh`) builder;
//! - [`authorization`]: where the token travels (`Authorization: JWT` or `?jwt=`);
//! - [`lifecycle`]: lifecycle event names and the callback body;
//! - [`claims`]: the claims of every token Connect signs;
//! - [`forge`]: Forge Remote: app and installation ids, the Forge Invocation Token's rules.
//!
//! `docs/PROTOCOL.md` in the repository states each rule and names its home.

pub mod authorization;
pub mod claims;
pub mod domain;
pub mod forge;
pub mod jwt;
pub mod lifecycle;
pub mod qsh;
