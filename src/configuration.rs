//! Layered settings: built-in defaults, then an optional TOML file (`WARDEN_CONFIG`), then
//! `WARDEN_*` environment variables. Everything is parsed here, once, into typed values; a bad
//! setting stops start-up with a message naming the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use connect_protocol::domain::{BaseUrl, HostPattern};
use connect_protocol::forge::AppAri;

use crate::host_client::CallPolicy;
use crate::routes::descriptor::{Descriptor, Placeholders};
use crate::store::sealing::KeyRing;
use crate::webhooks::WebhookSettings;

/// Production install-key CDN.
pub const PRODUCTION_KEYS_URL: &str = "https://connect-install-keys.atlassian.com";
/// Staging install-key CDN, used for `*.jira-dev.com` hosts.
pub const STAGING_KEYS_URL: &str =
    "https://cs-migrations--cdn.us-east-1.staging.public.atl-paas.net";
/// The install-key servers of production sites, tried in order. Only the server Atlassian
/// documents: a further default would turn every unknown kid into a `503` while it cannot
/// answer (a kid is forgotten only when every server says 404), so a fallback server is set in
/// `WARDEN_KEYS_URL` by whoever knows it exists.
pub const PRODUCTION_KEYS_URLS: &[&str] = &[PRODUCTION_KEYS_URL];
/// The install-key servers of staging sites, tried in order.
pub const STAGING_KEYS_URLS: &[&str] = &[STAGING_KEYS_URL];
/// Sites whose install keys come from the staging CDN.
pub fn is_staging_host(host: &str) -> bool {
    host.to_ascii_lowercase().ends_with(".jira-dev.com")
}

/// Forge's production JWKS: the keys of Forge Invocation Tokens. Staging is chosen only by
/// setting `WARDEN_FORGE_JWKS_URL`, never from a claim of a token not verified yet.
pub const FORGE_JWKS_URL: &str = "https://forge.cdn.prod.atlassian-dev.net/.well-known/jwks.json";

/// Atlassian's OAuth2 authorization server (user impersonation).
pub const OAUTH_TOKEN_URL: &str =
    "https://oauth-2-authorization-server.services.atlassian.com/oauth2/token";

/// Upper bound of `WARDEN_REDIS_WAIT_TIMEOUT_MS`: the host expects a quick answer to a
/// lifecycle callback, and a Redis command of the store times out after 2 s.
pub const MAX_WAIT_TIMEOUT_MS: u64 = 1_500;
/// Upper bound of `WARDEN_REDIS_MIN_REPLICAS` (a sanity bound, not a Redis limit).
pub const MAX_MIN_REPLICAS: u32 = 16;
/// The descriptor shipped with the binary, used when no template file is found on disk.
pub const BUNDLED_DESCRIPTOR: &str = include_str!("../atlassian-connect.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallAuth {
    /// `installed`/`uninstalled` must carry Atlassian's RS256 signature.
    Signed,
    /// Also accepts the unsigned first install and HS256 reinstalls signed with a known secret.
    Legacy,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: String,
    pub base_url: BaseUrl,
    pub allowed_base_urls: Vec<BaseUrl>,
    pub app_key: String,
    /// With Redis: the Redis URL, or in cluster mode one or more comma-separated seed node URLs.
    pub redis_url: Option<SecretString>,
    /// `WARDEN_REDIS_URL` names a Redis Cluster (its seed nodes), not one Redis.
    pub redis_cluster: bool,
    /// Prefix of every Redis key and the invalidation channel; lets several apps share a Redis.
    pub redis_prefix: String,
    /// Replicas that must confirm a lifecycle write (`WAIT`) before it is acknowledged; 0: off
    /// (docs/PROTOCOL.md §10).
    pub redis_min_replicas: u32,
    /// How long a write waits for those replicas before the callback answers `503`.
    pub redis_wait_timeout: Duration,
    pub data_dir: PathBuf,
    /// `WARDEN_KEYS_URL`: key servers tried in order for every host; empty: chosen per host.
    pub keys_urls: Vec<BaseUrl>,
    pub product_hosts: Vec<HostPattern>,
    pub install_auth: InstallAuth,
    pub secret_grace: Duration,
    pub oauth_token_url: String,
    /// The descriptor rendered from `WARDEN_DESCRIPTOR` and checked (README "Descriptor").
    pub descriptor: Descriptor,
    /// Backstop lifetime of cached secrets, should an invalidation message be lost.
    pub secret_cache_ttl: Duration,
    /// Timeout of one install-key fetch.
    pub key_fetch_timeout: Duration,
    /// Keys that seal shared secrets at rest (`WARDEN_SECRET_KEYS`); empty: plaintext.
    pub secret_keys: KeyRing,
    /// Refuse to start without `secret_keys` (`WARDEN_REQUIRE_ENCRYPTION`).
    pub require_encryption: bool,
    /// Reverse proxies whose `X-Forwarded-For` names the real sender of a request.
    pub trusted_proxies: Vec<IpAddr>,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body, counted from its headers.
    pub body_timeout: Duration,
    /// Site imports are confirmed by the site before they retire anyone (docs/PROTOCOL.md §7).
    pub site_proof: SiteProofSettings,
    /// `WARDEN_HOST_*`: retries and in-flight limit of the app's calls to a site.
    pub host_calls: CallPolicy,
    /// The queue between webhook routes and their handlers (`WARDEN_WEBHOOK_*`).
    pub webhooks: WebhookSettings,
    /// `GET /metrics` on a listener of its own (`WARDEN_METRICS_BIND`) instead of the public
    /// port.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Forge Remote (docs/PROTOCOL.md §12); `None`: off, every Forge Invocation Token refused.
    pub forge: Option<ForgeSettings>,
    /// The app warden fronts as its gateway (`WARDEN_UPSTREAM_*`); `None`: no upstream, only
    /// warden's own routes and the crate's handlers answer.
    pub upstream: Option<UpstreamSettings>,
}

/// `WARDEN_UPSTREAM_URL` / `WARDEN_UPSTREAM_SECRET`: the vendor's app behind warden, and the key
/// that proves to it what warden verified (README "Put warden in front of your app").
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http(s)://host[:port]`, no query or fragment; a path is a prefix of every forwarded path.
    pub url: url::Url,
    /// HS256 key of the proof header and of event signatures; at least 32 bytes.
    pub secret: SecretString,
}

/// `WARDEN_FORGE_*`: the app whose Forge Invocation Tokens are accepted, and their keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeSettings {
    /// `WARDEN_FORGE_APP_ID`: the `aud` of every accepted token.
    pub app: AppAri,
    /// `WARDEN_FORGE_JWKS_URL`.
    pub jwks_url: BaseUrl,
}

/// `WARDEN_SITE_PROOF*`: how an install on a site shared with other installations is proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteProofSettings {
    /// `false` (`off`): a signed import retires the site's older installations at once.
    pub enabled: bool,
    /// Calls to the site before the proof is given up as unreachable.
    pub attempts: u32,
    /// Wait after the first failed attempt; doubled after each further one.
    pub backoff: Duration,
}

impl Settings {
    /// Every base URL an install token's `aud` may name.
    pub fn accepted_audiences(&self) -> Vec<BaseUrl> {
        let mut all = vec![self.base_url.clone()];
        all.extend(self.allowed_base_urls.iter().cloned());
        all
    }

    pub fn host_allowed(&self, host: &str) -> bool {
        self.product_hosts.iter().any(|p| p.matches(host))
    }

    /// The address a request came from: the peer, or, when the peer is a trusted proxy, the
    /// right-most `X-Forwarded-For` entry that is not a trusted proxy (entries further left
    /// are whatever the sender wrote). An entry that is not an address ends the walk at the
    /// last trusted hop.
    pub fn request_source(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: Option<&str>,
    ) -> Option<IpAddr> {
        let mut source = peer?;
        if !self.trusted_proxies.contains(&source) {
            return Some(source);
        }
        for hop in forwarded_for.unwrap_or("").rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    source = ip;
                    if !self.trusted_proxies.contains(&ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(source)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {message}")]
pub struct SettingsError {
    pub name: &'static str,
    pub message: String,
}

fn bad(name: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        name,
        message: message.into(),
    }
}

/// A list given as an array (TOML) or a comma-separated string (environment).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum List {
    Many(Vec<String>),
    Joined(String),
}

impl List {
    fn items(&self) -> Vec<String> {
        let raw: Vec<String> = match self {
            List::Many(v) => v.clone(),
            List::Joined(s) => s.split(',').map(str::to_owned).collect(),
        };
        raw.into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// What the file and the environment say, before parsing.
#[derive(Debug, Default, Deserialize)]
struct Raw {
    bind: Option<String>,
    base_url: Option<String>,
    allowed_base_urls: Option<List>,
    app_key: Option<String>,
    redis_url: Option<String>,
    redis_cluster: Option<String>,
    redis_prefix: Option<String>,
    redis_min_replicas: Option<String>,
    redis_wait_timeout_ms: Option<String>,
    data_dir: Option<String>,
    keys_url: Option<List>,
    product_hosts: Option<List>,
    install_auth: Option<String>,
    secret_grace_seconds: Option<String>,
    oauth_token_url: Option<String>,
    descriptor: Option<String>,
    secret_cache_ttl_seconds: Option<String>,
    key_fetch_timeout_seconds: Option<String>,
    trusted_proxies: Option<List>,
    header_timeout_seconds: Option<String>,
    body_timeout_seconds: Option<String>,
    site_proof: Option<String>,
    site_proof_attempts: Option<String>,
    site_proof_backoff_ms: Option<String>,
    secret_keys: Option<List>,
    require_encryption: Option<String>,
    host_max_retries: Option<String>,
    host_max_retry_wait_seconds: Option<String>,
    host_concurrency_per_site: Option<String>,
    forge_app_id: Option<String>,
    forge_jwks_url: Option<String>,
    upstream_url: Option<String>,
    upstream_secret: Option<String>,
    webhook_queue_size: Option<String>,
    webhook_workers: Option<String>,
    webhook_dedupe_seconds: Option<String>,
    metrics_bind: Option<String>,
}

impl Settings {
    /// Reads `WARDEN_CONFIG` (if set) and the `WARDEN_*` environment.
    pub fn load() -> Result<Self, SettingsError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::from_sources(std::env::var("WARDEN_CONFIG").ok().as_deref(), vars)
    }

    /// `config_file` first, then `env` (pairs of `WARDEN_NAME`, value) on top.
    pub fn from_sources(
        config_file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = config_file {
            builder = builder
                .add_source(config::File::new(path, config::FileFormat::Toml).required(true));
        }
        // Every variable, for the descriptor's `{{env.NAME}}` placeholders.
        let all_env: std::collections::HashMap<String, String> = env.into_iter().collect();
        let env_map: std::collections::HashMap<String, String> = all_env
            .iter()
            .filter(|(k, _)| k.starts_with("WARDEN_") && k.as_str() != "WARDEN_CONFIG")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("WARDEN")
                .prefix_separator("_")
                .source(Some(env_map)),
        );
        let raw: Raw = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| bad("WARDEN_CONFIG", e.to_string()))?;
        Self::parse(raw, &all_env)
    }

    fn parse(
        raw: Raw,
        all_env: &std::collections::HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let base_url = BaseUrl::parse(raw.base_url.as_deref().unwrap_or("http://localhost:8080"))
            .map_err(|e| bad("WARDEN_BASE_URL", e.0))?;
        let allowed_base_urls = raw
            .allowed_base_urls
            .map(|l| l.items())
            .unwrap_or_default()
            .iter()
            .map(|u| BaseUrl::parse(u).map_err(|e| bad("WARDEN_ALLOWED_BASE_URLS", e.0)))
            .collect::<Result<_, _>>()?;
        let descriptor_path = raw
            .descriptor
            .unwrap_or_else(|| "atlassian-connect.json".into());
        let descriptor_template = match std::fs::read_to_string(&descriptor_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BUNDLED_DESCRIPTOR.to_owned(),
            Err(e) => {
                return Err(bad(
                    "WARDEN_DESCRIPTOR",
                    format!("cannot read {descriptor_path}: {e}"),
                ))
            }
        };
        let descriptor: serde_json::Value =
            serde_json::from_str(&descriptor_template).map_err(|e| {
                bad(
                    "WARDEN_DESCRIPTOR",
                    format!("{descriptor_path} is not JSON: {e}"),
                )
            })?;
        // The template's own `key` may name environment variables, not the app key.
        let placeholders = |app_key| Placeholders {
            base_url: base_url.as_str(),
            app_key,
            env: all_env,
        };
        let descriptor_error = |e| bad("WARDEN_DESCRIPTOR", format!("{descriptor_path}: {e}"));
        let app_key = match raw.app_key.filter(|k| !k.trim().is_empty()) {
            Some(k) => k.trim().to_owned(),
            None => {
                let key = descriptor
                    .get("key")
                    .and_then(|k| k.as_str())
                    .ok_or_else(|| {
                        bad(
                            "WARDEN_APP_KEY",
                            "not set and the descriptor has no \"key\"",
                        )
                    })?;
                placeholders(None)
                    .substitute(key, "key")
                    .map_err(descriptor_error)?
            }
        };
        let descriptor = Descriptor::render(&descriptor, &placeholders(Some(&app_key)), &app_key)
            .map_err(descriptor_error)?;
        let product_hosts = raw
            .product_hosts
            .map(|l| l.items())
            .unwrap_or_else(|| {
                vec![
                    "*.atlassian.net".into(),
                    "*.jira.com".into(),
                    "*.jira-dev.com".into(),
                ]
            })
            .iter()
            .map(|p| HostPattern::parse(p).map_err(|e| bad("WARDEN_PRODUCT_HOSTS", e.0)))
            .collect::<Result<Vec<_>, _>>()?;
        if product_hosts.is_empty() {
            return Err(bad(
                "WARDEN_PRODUCT_HOSTS",
                "no host pattern given; no install could ever be accepted",
            ));
        }
        let trusted_proxies = raw
            .trusted_proxies
            .map(|l| l.items())
            .unwrap_or_default()
            .iter()
            .map(|ip| {
                ip.parse::<IpAddr>().map_err(|_| {
                    bad(
                        "WARDEN_TRUSTED_PROXIES",
                        format!("{ip:?} is not an IP address"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let install_auth = match raw.install_auth.as_deref().map(str::trim) {
            None | Some("signed") => InstallAuth::Signed,
            Some("legacy") => InstallAuth::Legacy,
            Some(other) => {
                return Err(bad(
                    "WARDEN_INSTALL_AUTH",
                    format!("{other:?} is neither \"signed\" nor \"legacy\""),
                ))
            }
        };
        let seconds = |name: &'static str, value: Option<String>, default: u64, max: u64| {
            whole_number(name, value, default, 0..=max, "seconds").map(Duration::from_secs)
        };
        // A timeout of 0 would refuse every request (actix would even take it as "none").
        let timeout = |name: &'static str,
                       value: Option<String>,
                       default: u64,
                       max: u64|
         -> Result<Duration, SettingsError> {
            let duration = seconds(name, value, default, max)?;
            if duration.is_zero() {
                return Err(bad(name, "must be at least 1 second"));
            }
            Ok(duration)
        };
        let keys_urls = raw
            .keys_url
            .map(|l| l.items())
            .unwrap_or_default()
            .iter()
            .map(|u| BaseUrl::parse(u).map_err(|e| bad("WARDEN_KEYS_URL", e.0)))
            .collect::<Result<Vec<_>, _>>()?;
        let oauth_token_url = raw
            .oauth_token_url
            .unwrap_or_else(|| OAUTH_TOKEN_URL.into());
        url::Url::parse(&oauth_token_url)
            .map_err(|e| bad("WARDEN_OAUTH_TOKEN_URL", e.to_string()))?;
        let redis_prefix = raw.redis_prefix.unwrap_or_else(|| "warden".into());
        if redis_prefix.is_empty() || redis_prefix.contains(['{', '}', ' ']) {
            return Err(bad(
                "WARDEN_REDIS_PREFIX",
                "must be non-empty, without braces or spaces",
            ));
        }
        let redis_url = raw
            .redis_url
            .filter(|u| !u.trim().is_empty())
            .map(SecretString::from);
        let redis_cluster = boolean("WARDEN_REDIS_CLUSTER", raw.redis_cluster.as_deref())?;
        let whole = |name: &'static str, value: Option<String>, default: u64| {
            value.map_or(Ok(default), |v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(name, format!("{v:?} is not a whole number")))
            })
        };
        let redis_min_replicas = whole("WARDEN_REDIS_MIN_REPLICAS", raw.redis_min_replicas, 0)?;
        let redis_min_replicas = u32::try_from(redis_min_replicas)
            .ok()
            .filter(|n| *n <= MAX_MIN_REPLICAS)
            .ok_or_else(|| {
                bad(
                    "WARDEN_REDIS_MIN_REPLICAS",
                    format!("{redis_min_replicas} is more than the maximum of {MAX_MIN_REPLICAS}"),
                )
            })?;
        if redis_min_replicas > 0 && redis_url.is_none() {
            return Err(bad(
                "WARDEN_REDIS_MIN_REPLICAS",
                "replicas are a Redis feature: set WARDEN_REDIS_URL too",
            ));
        }
        // Bounded so that a callback waiting for replicas still answers the host quickly.
        let wait_ms = whole(
            "WARDEN_REDIS_WAIT_TIMEOUT_MS",
            raw.redis_wait_timeout_ms,
            500,
        )?;
        if !(1..=MAX_WAIT_TIMEOUT_MS).contains(&wait_ms) {
            return Err(bad(
                "WARDEN_REDIS_WAIT_TIMEOUT_MS",
                format!("{wait_ms} is not between 1 and {MAX_WAIT_TIMEOUT_MS} milliseconds"),
            ));
        }
        if redis_cluster && redis_url.is_none() {
            return Err(bad(
                "WARDEN_REDIS_CLUSTER",
                "a Redis Cluster needs its seed node URLs in WARDEN_REDIS_URL",
            ));
        }
        let site_proof = parse_site_proof(
            raw.site_proof,
            raw.site_proof_attempts,
            raw.site_proof_backoff_ms,
        )?;
        let secret_keys = KeyRing::parse(&raw.secret_keys.map(|l| l.items()).unwrap_or_default())
            .map_err(|e| bad("WARDEN_SECRET_KEYS", e))?;
        let require_encryption = boolean(
            "WARDEN_REQUIRE_ENCRYPTION",
            raw.require_encryption.as_deref(),
        )?;
        let host_calls = parse_host_calls(
            raw.host_max_retries,
            raw.host_max_retry_wait_seconds,
            raw.host_concurrency_per_site,
        )?;
        let forge = parse_forge(raw.forge_app_id, raw.forge_jwks_url)?;
        let upstream = parse_upstream(raw.upstream_url, raw.upstream_secret)?;
        let webhooks = WebhookSettings {
            queue_size: whole_number(
                "WARDEN_WEBHOOK_QUEUE_SIZE",
                raw.webhook_queue_size,
                1_000,
                1..=1_000_000,
                "deliveries",
            )? as usize,
            workers: whole_number(
                "WARDEN_WEBHOOK_WORKERS",
                raw.webhook_workers,
                8,
                1..=1_024,
                "workers",
            )? as usize,
            dedupe_window: Duration::from_secs(whole_number(
                "WARDEN_WEBHOOK_DEDUPE_SECONDS",
                raw.webhook_dedupe_seconds,
                3_600,
                1..=86_400,
                "seconds",
            )?),
        };
        let metrics_bind = raw
            .metrics_bind
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.trim().parse().map_err(|_| {
                    bad(
                        "WARDEN_METRICS_BIND",
                        format!("{v:?} is not an IP address and port, e.g. 127.0.0.1:9090"),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            host_calls,
            forge,
            upstream,
            webhooks,
            metrics_bind,
            site_proof,
            bind: raw.bind.unwrap_or_else(|| "127.0.0.1:8080".into()),
            base_url,
            allowed_base_urls,
            app_key,
            redis_url,
            redis_cluster,
            redis_prefix,
            redis_min_replicas,
            redis_wait_timeout: Duration::from_millis(wait_ms),
            data_dir: PathBuf::from(raw.data_dir.unwrap_or_else(|| "./data".into())),
            keys_urls,
            product_hosts,
            install_auth,
            secret_grace: seconds(
                "WARDEN_SECRET_GRACE_SECONDS",
                raw.secret_grace_seconds,
                180,
                86_400,
            )?,
            oauth_token_url,
            descriptor,
            secret_cache_ttl: seconds(
                "WARDEN_SECRET_CACHE_TTL_SECONDS",
                raw.secret_cache_ttl_seconds,
                30,
                3_600,
            )?,
            key_fetch_timeout: seconds(
                "WARDEN_KEY_FETCH_TIMEOUT_SECONDS",
                raw.key_fetch_timeout_seconds,
                5,
                60,
            )?,
            trusted_proxies,
            header_timeout: timeout(
                "WARDEN_HEADER_TIMEOUT_SECONDS",
                raw.header_timeout_seconds,
                5,
                60,
            )?,
            body_timeout: timeout(
                "WARDEN_BODY_TIMEOUT_SECONDS",
                raw.body_timeout_seconds,
                5,
                60,
            )?,
            secret_keys,
            require_encryption,
        })
    }
}

/// A whole number of `unit` within `range`, `default` when unset.
fn whole_number(
    name: &'static str,
    value: Option<String>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> Result<u64, SettingsError> {
    let n = match value {
        None => default,
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| bad(name, format!("{v:?} is not a whole number of {unit}")))?,
    };
    if !range.contains(&n) {
        return Err(bad(
            name,
            format!(
                "{n} is not between {} and {} {unit}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(n)
}

/// The gateway is on when `WARDEN_UPSTREAM_URL` is set, and then needs its secret: headers an
/// upstream cannot check are headers anyone who reaches it could write.
fn parse_upstream(
    url: Option<String>,
    secret: Option<String>,
) -> Result<Option<UpstreamSettings>, SettingsError> {
    let secret = secret.filter(|s| !s.is_empty());
    let Some(raw_url) = url.filter(|u| !u.trim().is_empty()) else {
        return match secret {
            Some(_) => Err(bad(
                "WARDEN_UPSTREAM_SECRET",
                "set, but there is no upstream: set WARDEN_UPSTREAM_URL too",
            )),
            None => Ok(None),
        };
    };
    let url = url::Url::parse(raw_url.trim()).map_err(|e| {
        bad(
            "WARDEN_UPSTREAM_URL",
            format!("{raw_url:?} is not a URL: {e}"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad(
            "WARDEN_UPSTREAM_URL",
            format!(
                "{raw_url:?} must be http:// or https:// with a host, e.g. http://127.0.0.1:3000"
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad(
            "WARDEN_UPSTREAM_URL",
            format!("{raw_url:?} may not carry a query, a fragment or credentials"),
        ));
    }
    let Some(secret) = secret else {
        return Err(bad(
            "WARDEN_UPSTREAM_SECRET",
            "missing: the upstream needs it to check the tenant headers warden adds (32 bytes or more, e.g. `openssl rand -hex 32`)",
        ));
    };
    if secret.len() < 32 {
        return Err(bad(
            "WARDEN_UPSTREAM_SECRET",
            format!("{} bytes is too short: use 32 or more", secret.len()),
        ));
    }
    Ok(Some(UpstreamSettings {
        url,
        secret: SecretString::from(secret),
    }))
}

/// Forge Remote is on when `WARDEN_FORGE_APP_ID` is set; a JWKS URL without it is a mistake.
fn parse_forge(
    app_id: Option<String>,
    jwks_url: Option<String>,
) -> Result<Option<ForgeSettings>, SettingsError> {
    let jwks_url = jwks_url.filter(|u| !u.trim().is_empty());
    let Some(app_id) = app_id.filter(|a| !a.trim().is_empty()) else {
        return match jwks_url {
            Some(_) => Err(bad(
                "WARDEN_FORGE_JWKS_URL",
                "set, but Forge Remote is off: set WARDEN_FORGE_APP_ID too",
            )),
            None => Ok(None),
        };
    };
    let app = AppAri::parse(&app_id).map_err(|e| bad("WARDEN_FORGE_APP_ID", e.0))?;
    let jwks_url = BaseUrl::parse(jwks_url.as_deref().unwrap_or(FORGE_JWKS_URL))
        .map_err(|e| bad("WARDEN_FORGE_JWKS_URL", e.0))?;
    Ok(Some(ForgeSettings { app, jwks_url }))
}

fn parse_site_proof(
    enabled: Option<String>,
    attempts: Option<String>,
    backoff_ms: Option<String>,
) -> Result<SiteProofSettings, SettingsError> {
    let enabled = match enabled
        .as_deref()
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("on") | Some("true") => true,
        Some("off") | Some("false") => false,
        Some(other) => {
            return Err(bad(
                "WARDEN_SITE_PROOF",
                format!("{other:?} is neither \"on\" nor \"off\""),
            ))
        }
    };
    let attempts = whole_number(
        "WARDEN_SITE_PROOF_ATTEMPTS",
        attempts,
        5,
        1..=20,
        "attempts",
    )?;
    let backoff = whole_number(
        "WARDEN_SITE_PROOF_BACKOFF_MS",
        backoff_ms,
        1000,
        0..=600_000,
        "milliseconds",
    )?;
    Ok(SiteProofSettings {
        enabled,
        attempts: u32::try_from(attempts).expect("at most 20"),
        backoff: Duration::from_millis(backoff),
    })
}

/// `WARDEN_HOST_MAX_RETRIES` (0-10), `WARDEN_HOST_MAX_RETRY_WAIT_SECONDS` (1-300),
/// `WARDEN_HOST_CONCURRENCY_PER_SITE` (1-256).
fn parse_host_calls(
    max_retries: Option<String>,
    max_retry_wait_seconds: Option<String>,
    concurrency_per_site: Option<String>,
) -> Result<CallPolicy, SettingsError> {
    let defaults = CallPolicy::default();
    let max_retries = whole_number(
        "WARDEN_HOST_MAX_RETRIES",
        max_retries,
        u64::from(defaults.max_retries),
        0..=10,
        "retries",
    )?;
    let max_retry_wait = whole_number(
        "WARDEN_HOST_MAX_RETRY_WAIT_SECONDS",
        max_retry_wait_seconds,
        defaults.max_retry_wait.as_secs(),
        1..=300,
        "seconds",
    )?;
    let concurrency = whole_number(
        "WARDEN_HOST_CONCURRENCY_PER_SITE",
        concurrency_per_site,
        defaults.concurrency_per_site as u64,
        1..=256,
        "requests",
    )?;
    Ok(CallPolicy {
        max_retries: u32::try_from(max_retries).expect("at most 10"),
        max_retry_wait: Duration::from_secs(max_retry_wait),
        concurrency_per_site: usize::try_from(concurrency).expect("at most 256"),
        ..defaults
    })
}

/// A boolean setting: `true`/`1`/`yes` or `false`/`0`/`no` (unset or empty: false).
fn boolean(name: &'static str, value: Option<&str>) -> Result<bool, SettingsError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(bad(
            name,
            format!("{other:?} is neither \"true\" nor \"false\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let s = Settings::from_sources(None, env(&[])).unwrap();
        assert_eq!(s.bind, "127.0.0.1:8080");
        assert_eq!(s.base_url.as_str(), "http://localhost:8080");
        assert!(s.allowed_base_urls.is_empty());
        assert!(s.redis_url.is_none());
        assert!(!s.redis_cluster);
        assert_eq!(s.redis_min_replicas, 0);
        assert_eq!(s.redis_wait_timeout, Duration::from_millis(500));
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert!(s.keys_urls.is_empty());
        assert_eq!(s.install_auth, InstallAuth::Signed);
        assert_eq!(s.secret_grace, Duration::from_secs(180));
        assert_eq!(s.header_timeout, Duration::from_secs(5));
        assert_eq!(s.body_timeout, Duration::from_secs(5));
        assert!(s.host_allowed("acme.atlassian.net"));
        assert!(s.host_allowed("x.jira-dev.com"));
        assert!(!s.host_allowed("evil.example.com"));
        assert!(!s.app_key.is_empty());
        assert_eq!(
            s.site_proof,
            SiteProofSettings {
                enabled: true,
                attempts: 5,
                backoff: Duration::from_millis(1000),
            }
        );
        assert!(s.secret_keys.is_empty());
        assert!(!s.require_encryption);
        assert_eq!(s.host_calls, CallPolicy::default());
        assert_eq!(s.host_calls.max_retries, 3);
        assert_eq!(s.host_calls.max_retry_wait, Duration::from_secs(30));
        assert_eq!(s.host_calls.concurrency_per_site, 8);
        assert_eq!(
            s.webhooks,
            WebhookSettings {
                queue_size: 1_000,
                workers: 8,
                dedupe_window: Duration::from_secs(3_600),
            }
        );
    }

    #[test]
    fn several_key_servers_are_kept_in_order() {
        let s = Settings::from_sources(
            None,
            env(&[(
                "WARDEN_KEYS_URL",
                "https://keys-a.example.com, https://keys-b.example.com/",
            )]),
        )
        .unwrap();
        let urls: Vec<&str> = s.keys_urls.iter().map(BaseUrl::as_str).collect();
        assert_eq!(
            urls,
            ["https://keys-a.example.com", "https://keys-b.example.com"]
        );
        let err = Settings::from_sources(
            None,
            env(&[("WARDEN_KEYS_URL", "https://keys-a.example.com,nope")]),
        )
        .unwrap_err();
        assert_eq!(err.name, "WARDEN_KEYS_URL");
    }

    #[test]
    fn host_call_settings_are_read_and_bounded() {
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_HOST_MAX_RETRIES", "0"),
                ("WARDEN_HOST_MAX_RETRY_WAIT_SECONDS", "5"),
                ("WARDEN_HOST_CONCURRENCY_PER_SITE", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.host_calls.max_retries, 0);
        assert_eq!(s.host_calls.max_retry_wait, Duration::from_secs(5));
        assert_eq!(s.host_calls.concurrency_per_site, 2);
        assert!(s.forge.is_none());
    }

    #[test]
    fn an_upstream_needs_a_long_secret_and_a_plain_http_url() {
        let secret = "0123456789abcdef0123456789abcdef";
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_UPSTREAM_URL", "http://127.0.0.1:3000"),
                ("WARDEN_UPSTREAM_SECRET", secret),
            ]),
        )
        .unwrap();
        let upstream = s.upstream.unwrap();
        assert_eq!(upstream.url.as_str(), "http://127.0.0.1:3000/");
        assert!(
            !format!("{upstream:?}").contains(secret),
            "Debug leaks the secret"
        );
        for (name, pairs) in [
            (
                "WARDEN_UPSTREAM_SECRET",
                vec![("WARDEN_UPSTREAM_URL", "http://127.0.0.1:3000")],
            ),
            (
                "WARDEN_UPSTREAM_SECRET",
                vec![
                    ("WARDEN_UPSTREAM_URL", "http://app:3000"),
                    ("WARDEN_UPSTREAM_SECRET", "short"),
                ],
            ),
            (
                "WARDEN_UPSTREAM_SECRET",
                vec![("WARDEN_UPSTREAM_SECRET", secret)],
            ),
            (
                "WARDEN_UPSTREAM_URL",
                vec![
                    ("WARDEN_UPSTREAM_URL", "ftp://app"),
                    ("WARDEN_UPSTREAM_SECRET", secret),
                ],
            ),
            (
                "WARDEN_UPSTREAM_URL",
                vec![
                    ("WARDEN_UPSTREAM_URL", "http://app/?a=b"),
                    ("WARDEN_UPSTREAM_SECRET", secret),
                ],
            ),
        ] {
            let err = Settings::from_sources(None, env(&pairs)).unwrap_err();
            assert_eq!(err.name, name, "{pairs:?}: {err}");
        }
    }

    #[test]
    fn forge_remote_needs_an_app_id_and_defaults_to_the_production_jwks() {
        let uuid = "5f1c1b2e-0c1d-4a51-9a2b-3c4d5e6f7a8b";
        let s = Settings::from_sources(None, env(&[("WARDEN_FORGE_APP_ID", uuid)])).unwrap();
        let forge = s.forge.unwrap();
        assert_eq!(
            forge.app.as_str(),
            format!("ari:cloud:ecosystem::app/{uuid}")
        );
        assert_eq!(forge.jwks_url.as_str(), FORGE_JWKS_URL);
        let staging = "https://forge.cdn.stg.atlassian-dev.net/.well-known/jwks.json";
        let s = Settings::from_sources(
            None,
            env(&[
                (
                    "WARDEN_FORGE_APP_ID",
                    &format!("ari:cloud:ecosystem::app/{uuid}"),
                ),
                ("WARDEN_FORGE_JWKS_URL", staging),
            ]),
        )
        .unwrap();
        assert_eq!(s.forge.unwrap().jwks_url.as_str(), staging);
        for (name, pairs) in [
            (
                "WARDEN_FORGE_APP_ID",
                vec![("WARDEN_FORGE_APP_ID", "my-app")],
            ),
            (
                "WARDEN_FORGE_JWKS_URL",
                vec![("WARDEN_FORGE_JWKS_URL", staging)],
            ),
            (
                "WARDEN_FORGE_JWKS_URL",
                vec![
                    ("WARDEN_FORGE_APP_ID", uuid),
                    ("WARDEN_FORGE_JWKS_URL", "ftp://keys"),
                ],
            ),
        ] {
            let err = Settings::from_sources(None, env(&pairs)).unwrap_err();
            assert_eq!(err.name, name, "{err}");
        }
    }

    #[test]
    fn secret_keys_are_a_ring_whose_debug_hides_the_keys() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_SECRET_KEYS", &format!("new:{key}, old:{key}")),
                ("WARDEN_REQUIRE_ENCRYPTION", "true"),
            ]),
        )
        .unwrap();
        let ids: Vec<&str> = s.secret_keys.ids().map(|id| id.as_str()).collect();
        assert_eq!(ids, ["new", "old"]);
        assert!(s.require_encryption);
        assert!(!format!("{s:?}").contains(key));
        let err =
            Settings::from_sources(None, env(&[("WARDEN_SECRET_KEYS", "new:short")])).unwrap_err();
        assert_eq!(err.name, "WARDEN_SECRET_KEYS");
    }

    #[test]
    fn environment_overrides_and_lists_split_on_commas() {
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_BASE_URL", "https://app.example.com/"),
                (
                    "WARDEN_ALLOWED_BASE_URLS",
                    "https://a.example.com, https://b.example.com",
                ),
                ("WARDEN_PRODUCT_HOSTS", "127.0.0.1,*.example.net"),
                ("WARDEN_INSTALL_AUTH", "legacy"),
                ("WARDEN_SECRET_GRACE_SECONDS", "5"),
                ("WARDEN_APP_KEY", "my-app"),
            ]),
        )
        .unwrap();
        assert_eq!(s.base_url.as_str(), "https://app.example.com");
        assert_eq!(s.accepted_audiences().len(), 3);
        assert!(s.host_allowed("127.0.0.1"));
        assert!(!s.host_allowed("acme.atlassian.net"));
        assert_eq!(s.install_auth, InstallAuth::Legacy);
        assert_eq!(s.secret_grace, Duration::from_secs(5));
        assert_eq!(s.app_key, "my-app");
    }

    #[test]
    fn the_sender_behind_a_trusted_proxy_is_the_right_most_untrusted_hop() {
        let s = Settings::from_sources(
            None,
            env(&[("WARDEN_TRUSTED_PROXIES", "10.0.0.1, 10.0.0.2")]),
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let source = |peer: &str, xff: Option<&str>| s.request_source(Some(ip(peer)), xff);
        // Not from a proxy: what the sender wrote is ignored.
        assert_eq!(
            source("203.0.113.9", Some("1.2.3.4")),
            Some(ip("203.0.113.9"))
        );
        // Through two proxies; the left-most entry is the sender's own claim.
        assert_eq!(
            source("10.0.0.1", Some("1.2.3.4, 198.51.100.7, 10.0.0.2")),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            source("10.0.0.1", Some("junk, 10.0.0.2")),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(source("10.0.0.1", None), Some(ip("10.0.0.1")));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("WARDEN_BASE_URL", "ftp://x"),
            ("WARDEN_INSTALL_AUTH", "maybe"),
            ("WARDEN_SITE_PROOF", "maybe"),
            ("WARDEN_SITE_PROOF_ATTEMPTS", "0"),
            ("WARDEN_SITE_PROOF_BACKOFF_MS", "soon"),
            ("WARDEN_SECRET_GRACE_SECONDS", "soon"),
            ("WARDEN_PRODUCT_HOSTS", "a/b"),
            ("WARDEN_KEYS_URL", "not a url"),
            ("WARDEN_REDIS_CLUSTER", "maybe"),
            ("WARDEN_TRUSTED_PROXIES", "proxy.example.com"),
            ("WARDEN_HEADER_TIMEOUT_SECONDS", "0"),
            ("WARDEN_HEADER_TIMEOUT_SECONDS", "61"),
            ("WARDEN_BODY_TIMEOUT_SECONDS", "0"),
            ("WARDEN_BODY_TIMEOUT_SECONDS", "-1"),
            ("WARDEN_BODY_TIMEOUT_SECONDS", "61"),
            ("WARDEN_REDIS_MIN_REPLICAS", "two"),
            ("WARDEN_REDIS_MIN_REPLICAS", "1"),
            ("WARDEN_REDIS_WAIT_TIMEOUT_MS", "0"),
            ("WARDEN_REDIS_WAIT_TIMEOUT_MS", "1501"),
            ("WARDEN_SECRET_KEYS", "a:c2hvcnQ="),
            ("WARDEN_REQUIRE_ENCRYPTION", "maybe"),
            ("WARDEN_HOST_MAX_RETRIES", "11"),
            ("WARDEN_HOST_MAX_RETRY_WAIT_SECONDS", "0"),
            ("WARDEN_HOST_CONCURRENCY_PER_SITE", "0"),
            ("WARDEN_HOST_CONCURRENCY_PER_SITE", "many"),
            ("WARDEN_WEBHOOK_QUEUE_SIZE", "0"),
            ("WARDEN_WEBHOOK_WORKERS", "many"),
            ("WARDEN_WEBHOOK_WORKERS", "1025"),
            ("WARDEN_WEBHOOK_DEDUPE_SECONDS", "0"),
        ] {
            let err = Settings::from_sources(None, env(&[(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{err}");
        }
    }

    #[test]
    fn the_descriptor_template_is_rendered_from_the_whole_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("atlassian-connect.json");
        let template = |key: &str| {
            serde_json::json!({
                "key": key, "baseUrl": "{{baseUrl}}", "authentication": {"type": "jwt"},
                "vendor": {"name": "{{env.VENDOR_NAME}}"},
                "lifecycle": {"installed": "/installed", "uninstalled": "/uninstalled"}
            })
            .to_string()
        };
        std::fs::write(&path, template("{{env.APP_KEY}}")).unwrap();
        let descriptor = ("WARDEN_DESCRIPTOR", path.to_str().unwrap());
        let s = Settings::from_sources(
            None,
            env(&[descriptor, ("VENDOR_NAME", "Acme"), ("APP_KEY", "acme-app")]),
        )
        .unwrap();
        assert_eq!(s.app_key, "acme-app");
        assert_eq!(s.descriptor.json()["vendor"]["name"], "Acme");
        assert_eq!(s.descriptor.json()["key"], "acme-app");
        let err = Settings::from_sources(None, env(&[descriptor, ("APP_KEY", "a")])).unwrap_err();
        assert_eq!(err.name, "WARDEN_DESCRIPTOR");
        assert!(
            err.message.contains("VENDOR_NAME") && err.message.contains("vendor.name"),
            "{err}"
        );
        std::fs::write(&path, template("bad key")).unwrap();
        let err =
            Settings::from_sources(None, env(&[descriptor, ("VENDOR_NAME", "A")])).unwrap_err();
        assert_eq!(err.name, "WARDEN_DESCRIPTOR");
        assert!(err.message.contains("key: "), "{err}");
    }

    #[test]
    fn redis_cluster_is_a_boolean_and_needs_seed_urls() {
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_REDIS_CLUSTER", "true"),
                (
                    "WARDEN_REDIS_URL",
                    "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
                ),
            ]),
        )
        .unwrap();
        assert!(s.redis_cluster);
        let s = Settings::from_sources(None, env(&[("WARDEN_REDIS_CLUSTER", "false")])).unwrap();
        assert!(!s.redis_cluster);
        let err =
            Settings::from_sources(None, env(&[("WARDEN_REDIS_CLUSTER", "true")])).unwrap_err();
        assert_eq!(err.name, "WARDEN_REDIS_CLUSTER", "{err}");
    }

    #[test]
    fn replicas_to_wait_for_need_redis() {
        let s = Settings::from_sources(
            None,
            env(&[
                ("WARDEN_REDIS_URL", "redis://10.0.0.1:6379"),
                ("WARDEN_REDIS_MIN_REPLICAS", "2"),
                ("WARDEN_REDIS_WAIT_TIMEOUT_MS", "1500"),
            ]),
        )
        .unwrap();
        assert_eq!(s.redis_min_replicas, 2);
        assert_eq!(s.redis_wait_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn toml_file_is_read_and_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warden.toml");
        std::fs::write(
            &path,
            "bind = \"0.0.0.0:9000\"\nbase_url = \"https://file.example.com\"\nproduct_hosts = [\"*.example.org\"]\n",
        )
        .unwrap();
        let s = Settings::from_sources(
            Some(path.to_str().unwrap()),
            env(&[("WARDEN_BASE_URL", "https://env.example.com")]),
        )
        .unwrap();
        assert_eq!(s.bind, "0.0.0.0:9000");
        assert_eq!(s.base_url.as_str(), "https://env.example.com");
        assert!(s.host_allowed("x.example.org"));
    }

    #[test]
    fn metrics_bind_is_an_address_and_port() {
        let unset = Settings::from_sources(None, env(&[])).unwrap();
        assert_eq!(unset.metrics_bind, None);
        let set = Settings::from_sources(None, env(&[("WARDEN_METRICS_BIND", "127.0.0.1:9090")]))
            .unwrap();
        assert_eq!(set.metrics_bind, Some("127.0.0.1:9090".parse().unwrap()));
        for bad in ["9090", "localhost:9090", "127.0.0.1"] {
            let err =
                Settings::from_sources(None, env(&[("WARDEN_METRICS_BIND", bad)])).unwrap_err();
            assert_eq!(err.name, "WARDEN_METRICS_BIND", "{err}");
        }
    }
}
