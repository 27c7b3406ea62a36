//! connect-warden: the backend of an Atlassian Connect app.
//!
//! Building blocks, one concept each: [`domain`] (parsed newtypes), [`jwt`] (token and `qsh`
//! rules), [`install_keys`] (Atlassian's RS256 keys through a cache), [`lifecycle`] (what each
//! install callback may do), [`store`] (installations on Redis or embedded), [`tenants`] (the
//! cache in front of the store), [`guard`] (product-request authentication), [`error`] (HTTP
//! answers), [`configuration`], [`telemetry`], [`startup`] (the actix `App`), [`routes`],
//! [`cli`]. [`devtenant`] plays the Atlassian side for tests and rehearsals.

pub mod cli;
pub mod configuration;
pub mod devtenant;
pub mod domain;
pub mod error;
pub mod guard;
pub mod host_client;
pub mod install_keys;
pub mod invalidation;
pub mod jwt;
pub mod lifecycle;
pub mod routes;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tenants;
