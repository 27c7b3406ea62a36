//! connect-warden: the backend of an Atlassian Connect app.
//!
//! The Connect rules that need neither HTTP serving nor storage (tokens, `qsh`, lifecycle
//! bodies, domain newtypes) are the `connect-protocol` crate. This crate serves them.
//!
//! Layout, one job each, in the order an install callback meets them:
//! - [`startup`]: builds the actix `App` and binds it; [`limits`]: how long a client may take
//!   to send headers and body; [`routes`]: thin handlers that read the request and answer;
//! - [`lifecycle`]: what each install callback may do (a decision), and the one place that
//!   applies a decision to the store and announces what it invalidates;
//! - [`install_keys`]: Atlassian's RS256 install keys, fetched by `kid` through a cache;
//! - [`secrets`]: the secret rules (roll, history, grace window, which secrets verify what);
//! - [`store`]: installations on Redis (one or a Cluster) or embedded (redb), their shared
//!   secrets sealed at rest under `WARDEN_SECRET_KEYS`;
//! - [`tenants`]: the cache in front of the store; [`invalidation`]: how instances tell each
//!   other that a cached installation is stale;
//! - [`guard`]: product-request authentication (the `ProductRequest` extractor);
//! - [`forge`]: Forge Remote: Forge Invocation Tokens and Forge's keys (`ForgeRequest`);
//!   [`tenant_request`]: either way in, one view of the tenant (`TenantRequest`);
//! - [`host_client`]: calls from the app to a host, as the app or as a user;
//! - [`webhooks`]: the descriptor's webhooks, queued for the vendor's handlers;
//! - [`error`]: the one place where failures become HTTP statuses;
//! - [`configuration`], [`telemetry`], [`cli`]: settings, logs, the `warden` command;
//!   [`inventory`]: what `warden tenants` shows operators of the store.
//!   [`monitoring`]: Prometheus metrics (`GET /metrics`).
//! - [`upm`]: installing the app on a development site through its plugin manager (`warden dev`).
//!
//! `docs/PROTOCOL.md` states each protocol rule and names its home.

pub mod cli;
pub mod configuration;
pub mod error;
pub mod forge;
pub mod guard;
pub mod host_client;
pub mod install_keys;
pub mod invalidation;
pub mod inventory;
pub mod lifecycle;
pub mod limits;
pub mod monitoring;
pub mod routes;
pub mod secrets;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tenant_request;
pub mod tenants;
pub mod upm;
pub mod webhooks;
