//! The integration tests: one test binary (one link, one private Redis for the whole run),
//! one module per area, the shared harness in [`helpers`].

mod helpers;

mod cli;
mod cluster;
mod coherence;
mod devtenant;
mod host_client;
mod install_keys;
mod instances;
mod legacy;
mod lifecycle;
mod limits;
mod logging;
mod metrics;
mod ordering;
mod product_requests;
mod replication;
mod secrets_at_rest;
mod service;
mod site_import;
mod store;
