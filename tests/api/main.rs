//! The integration tests: one test binary (one link, one private Redis for the whole run),
//! one module per area, the shared harness in [`helpers`].

mod helpers;

mod cli;
mod cluster;
mod coherence;
mod descriptor;
mod dev_register;
mod devtenant;
mod forge;
mod forge_events;
mod forge_token;
mod host_client;
mod install_keys;
mod instances;
mod legacy;
mod lifecycle;
mod limits;
mod logging;
mod metrics;
mod ordering;
mod polite_host;
mod product_requests;
mod redis_commands;
mod replication;
mod secrets_at_rest;
mod service;
mod site_import;
mod store;
mod tenants_cli;
mod webhooks;
