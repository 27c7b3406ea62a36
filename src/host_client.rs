//! Calls from the app to a host site, the two ways Connect allows:
//!
//! - **as the app** ([`HostClient::as_app`]): every request carries a fresh HS256 JWT signed with
//!   the installation's current shared secret, `iss` = the app key and a `qsh` computed by the
//!   crate's one canonicalizer ([`CanonicalRequest`]) from the URL that is actually sent, path
//!   relative to the host `baseUrl` path (`/wiki` for Confluence);
//! - **as a user** ([`HostClient::as_user`], [`HostClient::as_user_requests`]): an impersonation
//!   access token from Atlassian's OAuth2 authorization server (JWT-bearer grant, assertion signed
//!   with the shared secret, `iss` naming the installation's `oauthClientId`). Tokens are cached
//!   per (clientKey, oauthClientId, account, scopes) until shortly before they expire; concurrent
//!   misses for one key make one token request.
//!
//! ```no_run
//! # async fn demo(host: &connect_warden::host_client::HostClient,
//! #               installation: &connect_warden::store::Installation)
//! #               -> Result<(), connect_warden::host_client::HostClientError> {
//! let me: serde_json::Value = host
//!     .as_app(installation)
//!     .get("/rest/api/3/search")
//!     .query(&[("jql", "project = ABC"), ("maxResults", "10")])
//!     .send_json()
//!     .await?;
//! let issue: serde_json::Value = host
//!     .as_user_requests(installation, "557058:account-id", &["READ"])
//!     .await?
//!     .get("/rest/api/3/issue/ABC-1")
//!     .send_json()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Calls are polite to the site ([`CallPolicy`], docs/PROTOCOL.md §11): at most
//! [`CallPolicy::concurrency_per_site`] requests to one installation are in flight at once (one
//! tenant's queue never blocks another's); a `429` or `503` is retried after its `Retry-After`
//! (seconds or an HTTP date), or after a jittered exponential backoff when it has none, at
//! most [`CallPolicy::max_retries`] times; a `Retry-After` longer than
//! [`CallPolicy::max_retry_wait`] is not waited for (the call fails at once: asking earlier is
//! refused again). Only idempotent requests (GET, HEAD, PUT, DELETE, OPTIONS) with a body that
//! can be replayed are retried, unless the caller says a request is safe to repeat
//! ([`HostRequest::retry_non_idempotent`]). Every attempt is signed anew (fresh `iat`/`exp`).
//! Atlassian's rate-limit headers are read into [`RateLimit`] ([`RateLimit::of`] on an
//! answer; [`HostClientError::rate_limit`] on a refusal).
//!
//! Secrets never leave this module except inside the `Authorization` header of the request they
//! sign: [`AccessToken`]'s `Debug` is redacted, error messages never carry the shared secret, a
//! token or an assertion, and bodies quoted in errors are scrubbed of them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use rand::Rng as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::error_chain;
use crate::monitoring::HostCall;
use crate::store::{Installation, InstallationStore, Usability};
use connect_protocol::claims::{self, JWT_BEARER_GRANT};
use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_protocol::forge::InstallationId;
use connect_protocol::jwt;
use connect_protocol::qsh::CanonicalRequest;

/// Lifetime of the JWT on an app request.
pub const APP_TOKEN_LIFETIME_SECONDS: i64 = 180;
/// Lifetime of an impersonation assertion: the authorization server allows at most 60 s.
pub const ASSERTION_LIFETIME_SECONDS: i64 = 59;
/// A cached access token is dropped this long before it expires.
pub const DEFAULT_TOKEN_MARGIN: Duration = Duration::from_secs(60);

const MAX_CACHED_TOKENS: u64 = 10_000;
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_REDIRECTS: usize = 5;
/// Longest piece of a response body quoted in an error.
const SNIPPET_CHARS: usize = 300;
/// Most of an error body read at all.
const MAX_ERROR_BODY: usize = 8 * 1024;
/// Most of a token endpoint answer read.
const MAX_TOKEN_BODY: usize = 64 * 1024;
/// An `expires_in` above this is taken as this (a day).
const MAX_EXPIRES_IN: u64 = 86_400;
/// How long a tenant's generation is kept after it was forgotten: longer than any token is
/// cached (at most [`MAX_EXPIRES_IN`]).
const GENERATION_TTL: Duration = Duration::from_secs(MAX_EXPIRES_IN + 3600);
const REDACTED: &str = "[REDACTED]";

/// Why a call to the host or its authorization server failed. `Display` and `Debug` never
/// contain the shared secret, an access token or an assertion.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostClientError {
    #[error("the path {path:?} cannot be requested from the host {base_url}: {reason}")]
    InvalidPath {
        base_url: String,
        path: String,
        reason: &'static str,
    },
    #[error("cannot build the request to the host: {0}")]
    Build(String),
    #[error("the request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: Arc<reqwest::Error>,
    },
    #[error("{method} {url} answered {status}{}: {body}", describe_attempts(*.attempts, .rate_limit))]
    Status {
        method: String,
        url: String,
        status: StatusCode,
        /// The start of the answer, scrubbed of secrets.
        body: String,
        /// Requests sent, retries included.
        attempts: u32,
        /// Atlassian's rate-limit headers of the last answer (boxed: keeps the error small).
        rate_limit: Box<RateLimit>,
    },
    #[error(
        "installation {client_key} has no oauthClientId, so the app cannot act as a user on it; \
         a reinstall of the app on that site sends one"
    )]
    NoOauthClientId { client_key: ClientKey },
    /// A site import replaced the installation: its `oauthClientId` (and shared secret) belong
    /// to a site that no longer exists and are never used again. No request is made.
    #[error(
        "installation {client_key} was superseded by {successor} (site import); its credentials \
         are never used again: call the host through installation {successor}"
    )]
    Superseded {
        client_key: ClientKey,
        successor: ClientKey,
    },
    /// The app was uninstalled from the site: no impersonation token is requested for it.
    #[error("installation {client_key} is uninstalled; the app cannot act as a user on it")]
    Uninstalled { client_key: ClientKey },
    #[error(
        "the authorization server refused an impersonation token for clientKey {client_key} \
         (400 {}); likely cause: the installation's oauthClientId {oauth_client_id} is outdated \
         (after a site import the site has a new clientKey and oauthClientId and only those are \
         accepted; the app must be reinstalled there and the new installation used)",
        describe_oauth_error(.error, .description)
    )]
    OutdatedOauthClientId {
        client_key: ClientKey,
        oauth_client_id: String,
        /// The endpoint's `error` field, e.g. `invalid_grant`.
        error: Option<String>,
        /// The endpoint's `error_description`, scrubbed of secrets.
        description: Option<String>,
    },
    #[error("{0:?} is not an impersonation scope (expected words such as READ, WRITE, DELETE, ACT_AS_USER)")]
    InvalidScope(String),
    #[error("an impersonation token needs at least one scope")]
    NoScope,
    #[error("{0:?} is not a valid account id")]
    InvalidAccountId(String),
    #[error("the token endpoint {0:?} (WARDEN_OAUTH_TOKEN_URL) is not an absolute http(s) URL")]
    BadTokenEndpoint(String),
    #[error("the token endpoint's answer for clientKey {client_key} is not usable: {reason}")]
    BadTokenResponse {
        client_key: ClientKey,
        reason: &'static str,
    },
    /// No Forge app token was ever kept for the installation (docs/PROTOCOL.md §12).
    #[error(
        "no Forge app token is kept for installation {installation}: Forge sends one \
         (x-forge-oauth-system, when the manifest asks for appSystemToken) with its calls; the \
         app can call as itself once such a call arrived"
    )]
    NoForgeAppToken { installation: InstallationId },
    /// The token kept is past its expiry: no request is made with it.
    #[error(
        "the Forge app token kept for installation {installation} expired at {expired_at} (Unix \
         time) and Forge sent no newer one since; the next Forge call (e.g. a scheduled \
         trigger) brings one"
    )]
    ForgeAppTokenExpired {
        installation: InstallationId,
        expired_at: i64,
    },
    /// The store could not say which token is kept.
    #[error("the Forge app token of installation {installation} cannot be read: {reason}")]
    ForgeAppTokenUnreadable {
        installation: InstallationId,
        reason: String,
    },
}

fn describe_oauth_error(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "no error field".into(),
    }
}

fn describe_attempts(attempts: u32, rate_limit: &RateLimit) -> String {
    let mut out = String::new();
    if attempts > 1 {
        out.push_str(&format!(" (after {attempts} attempts)"));
    }
    if let Some(wait) = rate_limit.retry_after {
        out.push_str(&format!(" (Retry-After {} s)", wait.as_secs()));
    }
    out
}

impl HostClientError {
    /// Atlassian's rate-limit headers of the answer that failed the call, if it answered.
    pub fn rate_limit(&self) -> Option<&RateLimit> {
        match self {
            HostClientError::Status { rate_limit, .. } => Some(rate_limit.as_ref()),
            _ => None,
        }
    }

    /// The HTTP status the host or the authorization server answered, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HostClientError::Status { status, .. } => Some(*status),
            HostClientError::OutdatedOauthClientId { .. } => Some(StatusCode::BAD_REQUEST),
            _ => None,
        }
    }
}

/// An impersonation access token. `Debug` does not print it; it leaves only through
/// [`AccessToken::expose_secret`] (or inside the `Authorization` header of a request).
#[derive(Clone)]
pub struct AccessToken(Arc<TokenInner>);

struct TokenInner {
    token: SecretString,
    token_type: String,
    scopes: String,
    expires_at: Instant,
    /// When the cache stops handing it out (`expires_at` minus the margin, never before issue).
    refresh_at: Instant,
}

impl AccessToken {
    pub fn expose_secret(&self) -> &str {
        self.0.token.expose_secret()
    }

    /// `token_type` as answered (`Bearer`).
    pub fn token_type(&self) -> &str {
        &self.0.token_type
    }

    /// The normalized scopes it was requested with, e.g. `"READ WRITE"`.
    pub fn scopes(&self) -> &str {
        &self.0.scopes
    }

    /// When the authorization server says it expires.
    pub fn expires_at(&self) -> Instant {
        self.0.expires_at
    }

    fn is_fresh(&self) -> bool {
        Instant::now() < self.0.refresh_at
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &REDACTED)
            .field("token_type", &self.0.token_type)
            .field("scopes", &self.0.scopes)
            .field("expires_at", &self.0.expires_at)
            .finish()
    }
}

/// What a cached access token is for. The `oauthClientId` is part of it, so a token minted for
/// an old one is never served once the installation carries a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    client_key: ClientKey,
    /// The tenant's generation when the token was cached: [`HostClient::forget_tenant`] moves
    /// the tenant to a new one, so its older tokens are never found again (and expire on their
    /// own) without a scan of the cache. A fetch in flight during the move caches its token
    /// under the old generation, where nobody looks.
    generation: u64,
    /// The same for [`HostClient::forget_all`], across every tenant.
    epoch: u64,
    oauth_client_id: String,
    base_url: BaseUrl,
    account_id: String,
    scopes: String,
}

struct UntilRefresh;

impl Expiry<TokenKey, AccessToken> for UntilRefresh {
    fn expire_after_create(
        &self,
        _: &TokenKey,
        token: &AccessToken,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(token.0.refresh_at.saturating_duration_since(created_at))
    }
}

#[derive(Debug, Clone)]
struct TokenEndpoint {
    url: Url,
    /// Scheme, host and port: the assertion's `aud`.
    origin: String,
}

/// Default of [`CallPolicy::max_retries`] (`WARDEN_HOST_MAX_RETRIES`).
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default of [`CallPolicy::max_retry_wait`] (`WARDEN_HOST_MAX_RETRY_WAIT_SECONDS`).
pub const DEFAULT_MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// Default of [`CallPolicy::concurrency_per_site`] (`WARDEN_HOST_CONCURRENCY_PER_SITE`).
pub const DEFAULT_CONCURRENCY_PER_SITE: usize = 8;
/// Default of [`CallPolicy::backoff_base`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Sites whose in-flight limit is tracked at once; the least recently used are dropped.
const MAX_TRACKED_SITES: u64 = 100_000;
/// A site not called for this long loses its limiter (a fresh one is made on its next call).
const SITE_LIMITER_IDLE: Duration = Duration::from_secs(3600);

/// How politely the app calls a site: how many requests are in flight per installation, how
/// often and how long a throttled (`429`) or overloaded (`503`) answer is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// Retries after a `429`/`503` (0: never retry).
    pub max_retries: u32,
    /// The longest wait before a retry; a `Retry-After` beyond it ends the call at once.
    pub max_retry_wait: Duration,
    /// Requests to one installation in flight at once; further ones wait their turn.
    pub concurrency_per_site: usize,
    /// Without `Retry-After`, the n-th retry waits a random time in
    /// `[0, min(max_retry_wait, backoff_base * 2^n)]` (full jitter).
    pub backoff_base: Duration,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            max_retries: DEFAULT_MAX_RETRIES,
            max_retry_wait: DEFAULT_MAX_RETRY_WAIT,
            concurrency_per_site: DEFAULT_CONCURRENCY_PER_SITE,
            backoff_base: DEFAULT_BACKOFF_BASE,
        }
    }
}

impl CallPolicy {
    /// How long to wait before retry number `retry` (0-based) after `answer`; `None`: do not
    /// retry (not a `429`/`503`, retries spent, or the site asks for a longer wait than allowed).
    fn retry_wait(&self, status: StatusCode, answer: &RateLimit, retry: u32) -> Option<Duration> {
        let throttled =
            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        if !throttled || retry >= self.max_retries {
            return None;
        }
        match answer.retry_after {
            Some(wait) if wait > self.max_retry_wait => None,
            Some(wait) => Some(wait),
            None => {
                let ceiling = self
                    .backoff_base
                    .saturating_mul(2u32.saturating_pow(retry))
                    .min(self.max_retry_wait);
                let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
                Some(Duration::from_millis(
                    rand::thread_rng().gen_range(0..=millis),
                ))
            }
        }
    }
}

/// Atlassian's rate-limit headers on an answer (any of them may be absent). See
/// docs/PROTOCOL.md §11.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// `X-RateLimit-Limit`: the most requests allowed in the current window.
    pub limit: Option<u64>,
    /// `X-RateLimit-Remaining`: requests left in the current window.
    pub remaining: Option<u64>,
    /// `X-RateLimit-Reset`: when the limit resets, as sent (an ISO 8601 timestamp).
    pub reset: Option<String>,
    /// `X-RateLimit-NearLimit`: `true` when less than a fifth of a budget remains.
    pub near_limit: Option<bool>,
    /// `RateLimit-Reason`: which limit refused the request (e.g. `jira-burst-based`).
    pub reason: Option<String>,
    /// `Retry-After`, in seconds or as an HTTP date, as a wait from now.
    pub retry_after: Option<Duration>,
}

impl RateLimit {
    /// The rate-limit headers of `response`.
    pub fn of(response: &reqwest::Response) -> Self {
        Self::from_headers(response.headers())
    }

    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| v.chars().take(100).collect::<String>())
        };
        Self {
            limit: text("x-ratelimit-limit").and_then(|v| v.parse().ok()),
            remaining: text("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            reset: text("x-ratelimit-reset"),
            near_limit: text("x-ratelimit-nearlimit")
                .and_then(|v| v.to_ascii_lowercase().parse().ok()),
            reason: text("ratelimit-reason"),
            retry_after: text(RETRY_AFTER.as_str())
                .and_then(|v| parse_retry_after(&v, std::time::SystemTime::now())),
        }
    }
}

/// `Retry-After` as whole seconds or an HTTP date (a date in the past: no wait).
fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// What every clone of a [`HostClient`] shares: the policy and one in-flight limiter per site.
struct Politeness {
    policy: CallPolicy,
    sites: moka::sync::Cache<ClientKey, Arc<Semaphore>>,
}

impl Politeness {
    fn new(policy: CallPolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            // A limiter dropped while requests hold it only lets the next ones start sooner;
            // idle for an hour, it holds no permit anyway.
            sites: moka::sync::Cache::builder()
                .name("host_site_limiters")
                .max_capacity(MAX_TRACKED_SITES)
                .time_to_idle(SITE_LIMITER_IDLE)
                .build(),
        })
    }

    fn site(&self, client_key: &ClientKey) -> Arc<Semaphore> {
        self.sites.get_with_by_ref(client_key, || {
            Arc::new(Semaphore::new(self.policy.concurrency_per_site.max(1)))
        })
    }
}

/// The app's client for calls to host sites. Cheap to clone (clones share the connection pool
/// and the token cache).
#[derive(Clone)]
pub struct HostClient {
    http: reqwest::Client,
    app_key: String,
    token_endpoint: Result<TokenEndpoint, String>,
    token_margin: Duration,
    tokens: Cache<TokenKey, AccessToken>,
    /// Per tenant forgotten lately, the generation of its cached tokens (absent = 0); each
    /// generation is a fresh value of `next_generation`. An entry outlives every token cached
    /// before it was set ([`GENERATION_TTL`] > the longest a token is cached), so a tenant
    /// that falls back to 0 has no forgotten token left to find.
    generations: moka::sync::Cache<ClientKey, u64>,
    next_generation: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
    polite: Arc<Politeness>,
}

impl fmt::Debug for HostClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostClient")
            .field("app_key", &self.app_key)
            .field(
                "token_endpoint",
                &self.token_endpoint.as_ref().map(|e| e.url.as_str()),
            )
            .field("token_margin", &self.token_margin)
            .finish_non_exhaustive()
    }
}

impl HostClient {
    /// `timeout` bounds each whole request; redirects are followed only within the same origin.
    pub fn new(app_key: String, oauth_token_url: String, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(MAX_CONNECT_TIMEOUT))
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let same_origin = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() == attempt.url().origin());
                if attempt.previous().len() > MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if same_origin {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .user_agent(concat!("connect-warden/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with rustls and no custom certificates always builds");
        let token_endpoint = Url::parse(oauth_token_url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .map(|url| TokenEndpoint {
                origin: url.origin().ascii_serialization(),
                url,
            })
            .ok_or(oauth_token_url);
        Self {
            http,
            app_key,
            token_endpoint,
            token_margin: DEFAULT_TOKEN_MARGIN,
            tokens: Cache::builder()
                .name("impersonation_tokens")
                .max_capacity(MAX_CACHED_TOKENS)
                .expire_after(UntilRefresh)
                .build(),
            generations: moka::sync::Cache::builder()
                .name("impersonation_token_generations")
                .time_to_live(GENERATION_TTL)
                .build(),
            next_generation: Arc::default(),
            epoch: Arc::default(),
            polite: Politeness::new(CallPolicy::default()),
        }
    }

    /// How politely sites are called (default [`CallPolicy::default`]).
    pub fn with_call_policy(mut self, policy: CallPolicy) -> Self {
        self.polite = Politeness::new(policy);
        self
    }

    pub fn call_policy(&self) -> CallPolicy {
        self.polite.policy
    }

    /// How long before its expiry a cached access token is replaced (default 60 s). A token
    /// that lives less than the margin is used once and not cached.
    pub fn with_token_margin(mut self, margin: Duration) -> Self {
        self.token_margin = margin;
        self
    }

    pub fn app_key(&self) -> &str {
        &self.app_key
    }

    /// Requests to `installation`'s site signed as the app (fresh JWT per request). For an
    /// installation superseded by a site import, every request fails to build and send with
    /// [`HostClientError::Superseded`], without a request.
    pub fn as_app(&self, installation: &Installation) -> HostRequests {
        let auth = match refusal(installation, false) {
            Some(refusal) => Auth::Refused(refusal),
            None => Auth::App {
                app_key: self.app_key.clone(),
                secret: installation.current_secret().secret.clone(),
            },
        };
        HostRequests {
            http: self.http.clone(),
            base_url: installation.base_url.clone(),
            client_key: installation.client_key.clone(),
            polite: self.polite.clone(),
            auth,
        }
    }

    /// Requests as the Forge app to the `apiBaseUrl` of Forge installation `installation`
    /// (paths such as `/rest/api/3/myself`), with the system token kept from Forge's calls
    /// (`Authorization: Bearer`, docs/PROTOCOL.md §12). Refused, without a request, when no
    /// token is kept or it expired.
    pub async fn as_forge_app(
        &self,
        store: &dyn InstallationStore,
        installation: &InstallationId,
    ) -> Result<HostRequests, HostClientError> {
        let installation = *installation;
        let kept = store.forge_token(&installation).await.map_err(|e| {
            HostClientError::ForgeAppTokenUnreadable {
                installation,
                reason: error_chain(&e),
            }
        })?;
        let token = kept.ok_or(HostClientError::NoForgeAppToken { installation })?;
        if token.expires_at <= jwt::now() {
            return Err(HostClientError::ForgeAppTokenExpired {
                installation,
                expired_at: token.expires_at,
            });
        }
        // Calls to one installation share one per-site cap, under a key no clientKey has.
        let site = ClientKey::parse(&format!("forge-installation:{}", installation.uuid()))
            .expect("a UUID with this prefix is a valid clientKey");
        Ok(HostRequests {
            http: self.http.clone(),
            base_url: token.api_base_url,
            client_key: site,
            polite: self.polite.clone(),
            auth: Auth::ForgeApp(token.token),
        })
    }

    /// Requests to `installation`'s site as the user `account_id` (`Authorization: Bearer`).
    pub async fn as_user_requests(
        &self,
        installation: &Installation,
        account_id: &str,
        scopes: &[&str],
    ) -> Result<HostRequests, HostClientError> {
        let token = self.as_user(installation, account_id, scopes).await?;
        Ok(HostRequests {
            http: self.http.clone(),
            base_url: installation.base_url.clone(),
            client_key: installation.client_key.clone(),
            polite: self.polite.clone(),
            auth: Auth::Bearer(token),
        })
    }

    /// An impersonation access token for `account_id` on `installation`'s site, from the cache
    /// or the authorization server. `scopes` are case-insensitive (`["read", "WRITE"]` asks
    /// for `READ WRITE`).
    /// An installation superseded by a site import ([`HostClientError::Superseded`]) or
    /// uninstalled ([`HostClientError::Uninstalled`]) is refused before the cache and the
    /// authorization server: its `oauthClientId` is never used again.
    pub async fn as_user(
        &self,
        installation: &Installation,
        account_id: &str,
        scopes: &[&str],
    ) -> Result<AccessToken, HostClientError> {
        let client_key = &installation.client_key;
        if let Some(refusal) = refusal(installation, true) {
            return Err(refusal);
        }
        let oauth_client_id = installation
            .oauth_client_id
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| HostClientError::NoOauthClientId {
                client_key: client_key.clone(),
            })?;
        check_account_id(account_id)?;
        let scopes = normalize_scopes(scopes)?;
        let key = TokenKey {
            client_key: client_key.clone(),
            generation: self.generations.get(client_key).unwrap_or(0),
            epoch: self.epoch.load(Ordering::SeqCst),
            oauth_client_id: oauth_client_id.to_owned(),
            base_url: installation.base_url.clone(),
            account_id: account_id.to_owned(),
            scopes,
        };
        let secret = &installation.current_secret().secret;
        for attempt in 0..2 {
            let mut fetched_here = false;
            let token = self
                .tokens
                .try_get_with(key.clone(), async {
                    fetched_here = true;
                    self.fetch_token(&key, secret).await
                })
                .await
                .map_err(Arc::unwrap_or_clone)?;
            // moka expires on its own schedule; never hand out a token past its refresh time
            // that someone else fetched (one retry, then whatever the server gave).
            if fetched_here || attempt == 1 || token.is_fresh() {
                return Ok(token);
            }
            self.tokens.invalidate(&key).await;
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Drops every cached access token of `client_key`. Call it when the installation changes:
    /// reinstall (new `oauthClientId` or secret), site import, uninstall.
    /// O(1) whatever the number of cached tokens.
    pub fn forget_tenant(&self, client_key: &ClientKey) {
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.generations.insert(client_key.clone(), generation);
    }

    /// Drops every cached access token (when invalidation messages may have been lost),
    /// including those of fetches still in flight.
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.tokens.invalidate_all();
    }

    async fn fetch_token(
        &self,
        key: &TokenKey,
        secret: &SharedSecret,
    ) -> Result<AccessToken, HostClientError> {
        let endpoint = self
            .token_endpoint
            .as_ref()
            .map_err(|raw| HostClientError::BadTokenEndpoint(raw.clone()))?;
        let now = jwt::now();
        let claims = claims::assertion_claims(
            &key.oauth_client_id,
            &key.account_id,
            key.base_url.as_str(),
            &endpoint.origin,
            now,
            now + ASSERTION_LIFETIME_SECONDS,
        );
        let assertion = jwt::sign_hs256(&claims, secret);
        let scrub = [secret.expose(), assertion.as_str()];
        tracing::debug!(client_key = %key.client_key, scopes = %key.scopes, "requesting an impersonation token");
        let sent_at = Instant::now();
        let response = self
            .http
            .post(endpoint.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", JWT_BEARER_GRANT),
                ("assertion", assertion.as_str()),
                ("scope", key.scopes.as_str()),
            ])
            .send()
            .await;
        crate::monitoring::host_call(
            HostCall::Token,
            response.as_ref().ok().map(reqwest::Response::status),
        );
        let response = response.map_err(|e| request_error(endpoint.url.as_str(), e))?;
        let status = response.status();
        if status == StatusCode::BAD_REQUEST {
            let body = read_capped(response, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            let fields: OauthError = serde_json::from_slice(&body).unwrap_or_default();
            let clean = |s: Option<String>| s.map(|s| scrubbed(&s, &scrub, 200));
            let err = HostClientError::OutdatedOauthClientId {
                client_key: key.client_key.clone(),
                oauth_client_id: key.oauth_client_id.clone(),
                error: clean(fields.error),
                description: clean(fields.error_description),
            };
            tracing::warn!(client_key = %key.client_key, error = %err, "impersonation token refused");
            return Err(err);
        }
        if !status.is_success() {
            let rate_limit = Box::new(RateLimit::of(&response));
            let body = read_capped(response, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            return Err(HostClientError::Status {
                method: "POST".into(),
                url: endpoint.url.to_string(),
                status,
                body: scrubbed(&String::from_utf8_lossy(&body), &scrub, SNIPPET_CHARS),
                attempts: 1,
                rate_limit,
            });
        }
        let bad = |reason| HostClientError::BadTokenResponse {
            client_key: key.client_key.clone(),
            reason,
        };
        let body = read_capped(response, MAX_TOKEN_BODY)
            .await
            .map_err(|e| request_error(endpoint.url.as_str(), e))?;
        // serde's messages may quote values; none of them goes into the error.
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| bad("not a JSON object with access_token and expires_in"))?;
        if answer.access_token.trim().is_empty() {
            return Err(bad("access_token is empty"));
        }
        let expires_in = match &answer.expires_in {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or_else(|| bad("expires_in is not a whole number of seconds"))?
        .min(MAX_EXPIRES_IN);
        let token_type = answer.token_type.unwrap_or_else(|| "Bearer".into());
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(bad("token_type is not Bearer"));
        }
        let lifetime = Duration::from_secs(expires_in);
        Ok(AccessToken(Arc::new(TokenInner {
            token: SecretString::from(answer.access_token),
            token_type,
            scopes: key.scopes.clone(),
            expires_at: sent_at + lifetime,
            refresh_at: sent_at + lifetime.saturating_sub(self.token_margin),
        })))
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: serde_json::Value,
    #[serde(default)]
    token_type: Option<String>,
}

#[derive(Default, Deserialize)]
struct OauthError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// Upper-cased, split on whitespace, deduplicated, sorted and joined with a space.
fn normalize_scopes(scopes: &[&str]) -> Result<String, HostClientError> {
    let mut words: Vec<String> = Vec::new();
    for word in scopes.iter().flat_map(|s| s.split_whitespace()) {
        let upper = word.to_ascii_uppercase();
        if !upper.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return Err(HostClientError::InvalidScope(word.to_owned()));
        }
        words.push(upper);
    }
    if words.is_empty() {
        return Err(HostClientError::NoScope);
    }
    words.sort();
    words.dedup();
    Ok(words.join(" "))
}

/// [`HostClientError::Superseded`] if a site import replaced `installation`; with
/// `as_user`, [`HostClientError::Uninstalled`] too.
fn refusal(installation: &Installation, as_user: bool) -> Option<HostClientError> {
    let client_key = installation.client_key.clone();
    match installation.usability() {
        Usability::Superseded { successor } => Some(HostClientError::Superseded {
            client_key,
            successor,
        }),
        Usability::Uninstalled if as_user => Some(HostClientError::Uninstalled { client_key }),
        _ => None,
    }
}

fn check_account_id(account_id: &str) -> Result<(), HostClientError> {
    let ok = !account_id.is_empty()
        && account_id.len() <= 128
        && account_id.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(HostClientError::InvalidAccountId(
            account_id.chars().take(140).collect(),
        ))
    }
}

fn request_error(url: &str, e: reqwest::Error) -> HostClientError {
    HostClientError::Request {
        url: url.to_owned(),
        source: Arc::new(e),
    }
}

/// Reads at most `cap` bytes of the body.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    Ok(out)
}

/// `text` without any of `secrets`, cut to `max_chars`, control characters replaced. Secrets
/// are replaced before the cut, so no prefix of one can survive at the end.
fn scrubbed(text: &str, secrets: &[&str], max_chars: usize) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, REDACTED);
    }
    let mut cut: String = out
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    if out.chars().count() > max_chars {
        cut.push('…');
    }
    cut
}

#[derive(Clone)]
enum Auth {
    App {
        app_key: String,
        secret: SharedSecret,
    },
    Bearer(AccessToken),
    /// The Forge app's system token.
    ForgeApp(SecretString),
    /// Nothing may be sent with this identity (a superseded installation).
    Refused(HostClientError),
}

/// Requests to one installation's site with one identity (the app, or a user's token).
/// Paths are relative to the site's `baseUrl` (`/rest/api/space` on `https://x/wiki`
/// requests `https://x/wiki/rest/api/space`) and may carry a query.
#[derive(Clone)]
pub struct HostRequests {
    http: reqwest::Client,
    base_url: BaseUrl,
    client_key: ClientKey,
    polite: Arc<Politeness>,
    auth: Auth,
}

impl fmt::Debug for HostRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity = match &self.auth {
            Auth::App { app_key, .. } => format!("app {app_key}"),
            Auth::Bearer(_) => "user (bearer token)".into(),
            Auth::ForgeApp(_) => "Forge app (system token)".into(),
            Auth::Refused(_) => "nobody (refused)".into(),
        };
        f.debug_struct("HostRequests")
            .field("base_url", &self.base_url)
            .field("as", &identity)
            .finish_non_exhaustive()
    }
}

impl HostRequests {
    pub fn base_url(&self) -> &BaseUrl {
        &self.base_url
    }

    pub fn get(&self, path: &str) -> HostRequest {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> HostRequest {
        self.request(Method::POST, path)
    }

    pub fn put(&self, path: &str) -> HostRequest {
        self.request(Method::PUT, path)
    }

    pub fn delete(&self, path: &str) -> HostRequest {
        self.request(Method::DELETE, path)
    }

    pub fn request(&self, method: Method, path: &str) -> HostRequest {
        let builder = match &self.auth {
            Auth::Refused(refusal) => Err(refusal.clone()),
            _ => self
                .url_for(path)
                .map(|url| self.http.request(method.clone(), url)),
        };
        HostRequest {
            http: self.http.clone(),
            method,
            builder,
            base_url: self.base_url.clone(),
            auth: self.auth.clone(),
            client_key: self.client_key.clone(),
            polite: self.polite.clone(),
            retry_non_idempotent: false,
        }
    }

    fn url_for(&self, path: &str) -> Result<Url, HostClientError> {
        let invalid = |reason| HostClientError::InvalidPath {
            base_url: self.base_url.to_string(),
            path: path.chars().take(200).collect(),
            reason,
        };
        if path.contains('#') {
            return Err(invalid("a fragment is never sent"));
        }
        let url = Url::parse(&self.base_url.join(path)).map_err(|_| invalid("not a URL path"))?;
        check_within(&url, &self.base_url).map_err(invalid)?;
        Ok(url)
    }
}

/// `url` is on the base URL's origin and under its path (at a segment boundary).
fn check_within(url: &Url, base_url: &BaseUrl) -> Result<(), &'static str> {
    let base =
        Url::parse(base_url.as_str()).map_err(|_| "the installation's baseUrl is not a URL")?;
    if url.origin() != base.origin() {
        return Err("it leaves the site's origin");
    }
    let base_path = base_url.path();
    let inside = match url.path().strip_prefix(base_path) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || base_path.is_empty(),
        None => false,
    };
    if inside {
        Ok(())
    } else {
        Err("it leaves the site's base path")
    }
}

/// One request being built: a `reqwest::RequestBuilder` whose URL is fixed, plus the identity
/// that signs it when it is sent. The signature (JWT `qsh`) is computed from the finished
/// request's URL, after every query parameter was added, so they cannot disagree.
pub struct HostRequest {
    http: reqwest::Client,
    method: Method,
    builder: Result<reqwest::RequestBuilder, HostClientError>,
    base_url: BaseUrl,
    auth: Auth,
    client_key: ClientKey,
    polite: Arc<Politeness>,
    retry_non_idempotent: bool,
}

/// The answer of the last attempt, how many were made, and the strings an error built from
/// it must never show.
struct Sent {
    response: reqwest::Response,
    attempts: u32,
    scrub: Vec<String>,
}

/// Methods that may be repeated without changing the outcome (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

impl fmt::Debug for HostRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRequest")
            .field("method", &self.method)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl HostRequest {
    fn map(mut self, f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder) -> Self {
        self.builder = self.builder.map(f);
        self
    }

    /// Adds query parameters (form-encoded: anything `reqwest`'s `query` takes, e.g.
    /// `&[("expand", "names"), ("id", "1"), ("id", "2")]`).
    pub fn query<T: Serialize + ?Sized>(self, query: &T) -> Self {
        self.map(|b| b.query(query))
    }

    /// A JSON body (and `Content-Type: application/json`).
    pub fn json<T: Serialize + ?Sized>(self, body: &T) -> Self {
        self.map(|b| b.json(body))
    }

    /// A raw body.
    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        self.map(|b| b.body(body))
    }

    /// A header; an `Authorization` header is replaced by the signature.
    pub fn header(self, name: HeaderName, value: HeaderValue) -> Self {
        self.map(|b| b.header(name, value))
    }

    /// A timeout for this request instead of the client's.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.map(|b| b.timeout(timeout))
    }

    /// A `429`/`503` answer to this request may be retried although its method is not
    /// idempotent (POST, PATCH): the caller knows that repeating it is harmless. A body that
    /// cannot be replayed (a stream) is still never sent twice.
    pub fn retry_non_idempotent(mut self) -> Self {
        self.retry_non_idempotent = true;
        self
    }

    /// The finished, signed request (what [`send`](Self::send) executes first).
    pub fn build(self) -> Result<reqwest::Request, HostClientError> {
        let mut request = finish(self.builder, &self.base_url)?;
        sign(&mut request, &self.auth, &self.base_url)?;
        Ok(request)
    }

    /// Sends the request; any answer, whatever its status, is returned (after the retries a
    /// `429`/`503` earns, see [`CallPolicy`]).
    pub async fn send(self) -> Result<reqwest::Response, HostClientError> {
        self.send_inner().await.map(|sent| sent.response)
    }

    async fn send_inner(self) -> Result<Sent, HostClientError> {
        let request = finish(self.builder, &self.base_url)?;
        let policy = self.polite.policy;
        let replayable = self.retry_non_idempotent || is_idempotent(request.method());
        let url = redacted_url(request.url());
        let site = self.polite.site(&self.client_key);
        let mut next = Some(request);
        let mut attempts = 0;
        loop {
            let mut request = next.take().expect("each pass has a request to send");
            // Kept unsigned for the next attempt, which is signed anew.
            let spare = if replayable && attempts < policy.max_retries {
                request.try_clone()
            } else {
                None
            };
            let scrub = sign(&mut request, &self.auth, &self.base_url)?;
            attempts += 1;
            let response = {
                let _turn = site
                    .acquire()
                    .await
                    .expect("a site's limiter is never closed");
                let response = self.http.execute(request).await;
                crate::monitoring::host_call(
                    HostCall::Request,
                    response.as_ref().ok().map(reqwest::Response::status),
                );
                response.map_err(|e| request_error(&url, e))?
            };
            let wait = spare.as_ref().and_then(|_| {
                policy.retry_wait(response.status(), &RateLimit::of(&response), attempts - 1)
            });
            let Some(wait) = wait else {
                return Ok(Sent {
                    response,
                    attempts,
                    scrub,
                });
            };
            tracing::info!(
                client_key = %self.client_key,
                method = %self.method,
                status = response.status().as_u16(),
                attempt = attempts,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "the site is throttling; retrying after a wait"
            );
            drop(response);
            tokio::time::sleep(wait).await;
            next = spare;
        }
    }

    /// Sends the request; a non-2xx answer becomes [`HostClientError::Status`] with the start
    /// of its body and its rate-limit headers.
    pub async fn send_checked(self) -> Result<reqwest::Response, HostClientError> {
        let method = self.method.to_string();
        let Sent {
            response,
            attempts,
            scrub,
        } = self.send_inner().await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let url = redacted_url(response.url());
        let rate_limit = Box::new(RateLimit::of(&response));
        let body = read_capped(response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let scrub: Vec<&str> = scrub.iter().map(String::as_str).collect();
        Err(HostClientError::Status {
            method,
            url,
            status,
            body: scrubbed(&String::from_utf8_lossy(&body), &scrub, SNIPPET_CHARS),
            attempts,
            rate_limit,
        })
    }

    /// Sends the request, requires a 2xx answer and parses its JSON body.
    pub async fn send_json<T: DeserializeOwned>(self) -> Result<T, HostClientError> {
        let response = self.send_checked().await?;
        let url = redacted_url(response.url());
        response.json().await.map_err(|e| request_error(&url, e))
    }
}

/// The built request, unsigned, once it is known to stay on the site.
fn finish(
    builder: Result<reqwest::RequestBuilder, HostClientError>,
    base_url: &BaseUrl,
) -> Result<reqwest::Request, HostClientError> {
    let request = builder?
        .build()
        .map_err(|e| HostClientError::Build(error_chain(&e.without_url())))?;
    check_within(request.url(), base_url).map_err(|reason| HostClientError::InvalidPath {
        base_url: base_url.to_string(),
        path: request.url().path().chars().take(200).collect(),
        reason,
    })?;
    Ok(request)
}

/// Puts the identity's `Authorization` on `request` (for the app: a fresh JWT whose `qsh` is
/// computed from the request's URL); returns the strings an error must never show.
fn sign(
    request: &mut reqwest::Request,
    auth: &Auth,
    base_url: &BaseUrl,
) -> Result<Vec<String>, HostClientError> {
    let (value, scrub) = match auth {
        Auth::App { app_key, secret } => {
            let canonical = CanonicalRequest::from_url(
                request.method().as_str(),
                request.url().as_str(),
                base_url.path(),
            );
            let now = jwt::now();
            let claims =
                claims::app_claims(app_key, &canonical, now, now + APP_TOKEN_LIFETIME_SECONDS);
            let token = jwt::sign_hs256(&claims, secret);
            (
                format!("JWT {token}"),
                vec![secret.expose().to_owned(), token],
            )
        }
        Auth::Bearer(token) => (
            format!("Bearer {}", token.expose_secret()),
            vec![token.expose_secret().to_owned()],
        ),
        Auth::ForgeApp(token) => (
            format!("Bearer {}", token.expose_secret()),
            vec![token.expose_secret().to_owned()],
        ),
        Auth::Refused(refusal) => return Err(refusal.clone()),
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        HostClientError::Build("the access token is not a valid header value".into())
    })?;
    value.set_sensitive(true);
    request.headers_mut().insert(AUTHORIZATION, value);
    Ok(scrub)
}

/// The URL for messages: a `jwt` query parameter (should a caller add one) is not shown.
fn redacted_url(url: &Url) -> String {
    if !url.query_pairs().any(|(name, _)| name == "jwt") {
        return url.to_string();
    }
    let mut shown = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(n, v)| {
            let v = if n == "jwt" {
                REDACTED.to_owned()
            } else {
                v.into_owned()
            };
            (n.into_owned(), v)
        })
        .collect();
    shown.query_pairs_mut().clear().extend_pairs(pairs);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_normalized_and_validated() {
        assert_eq!(normalize_scopes(&["write", "READ"]).unwrap(), "READ WRITE");
        assert_eq!(
            normalize_scopes(&["read write", "READ"]).unwrap(),
            "READ WRITE"
        );
        assert_eq!(normalize_scopes(&["act_as_user"]).unwrap(), "ACT_AS_USER");
        assert!(matches!(
            normalize_scopes(&[]),
            Err(HostClientError::NoScope)
        ));
        assert!(matches!(
            normalize_scopes(&["  "]),
            Err(HostClientError::NoScope)
        ));
        assert!(matches!(
            normalize_scopes(&["READ&x=1"]),
            Err(HostClientError::InvalidScope(_))
        ));
    }

    #[test]
    fn scrubbing_removes_secrets_before_cutting() {
        let secret = "0123456789abcdef";
        assert_eq!(
            scrubbed("x 0123456789abcdef y", &[secret], 100),
            "x [REDACTED] y"
        );
        let long = format!("{}{}", "a".repeat(10), secret);
        let cut = scrubbed(&long, &[secret], 14);
        assert!(!cut.contains("0123"), "{cut}");
        assert_eq!(scrubbed("line\nbreak", &[], 100), "line break");
    }

    #[test]
    fn paths_stay_on_the_site() {
        let base = BaseUrl::parse("https://acme.atlassian.net/wiki").unwrap();
        let ok = |p: &str| check_within(&Url::parse(&base.join(p)).unwrap(), &base);
        assert!(ok("/rest/api/space?x=1").is_ok());
        assert!(ok("rest/api/space").is_ok());
        assert!(ok("/../../etc").is_err());
        assert!(ok("/rest/../../x").is_err());
        let other = Url::parse("https://evil.example/wiki/x").unwrap();
        assert!(check_within(&other, &base).is_err());
        let sibling = Url::parse("https://acme.atlassian.net/wikipedia").unwrap();
        assert!(check_within(&sibling, &base).is_err());
    }

    #[test]
    fn access_token_debug_is_redacted() {
        let token = AccessToken(Arc::new(TokenInner {
            token: SecretString::from("tok-very-secret".to_owned()),
            token_type: "Bearer".into(),
            scopes: "READ".into(),
            expires_at: Instant::now(),
            refresh_at: Instant::now(),
        }));
        assert!(!format!("{token:?}").contains("tok-very-secret"));
        assert_eq!(token.expose_secret(), "tok-very-secret");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn only_throttled_answers_are_retried_and_the_backoff_is_bounded() {
        let policy = CallPolicy {
            max_retries: 2,
            max_retry_wait: Duration::from_secs(3),
            backoff_base: Duration::from_secs(1),
            ..CallPolicy::default()
        };
        let none = RateLimit::default();
        let asks = |secs| RateLimit {
            retry_after: Some(Duration::from_secs(secs)),
            ..RateLimit::default()
        };
        assert_eq!(
            policy.retry_wait(StatusCode::BAD_GATEWAY, &asks(1), 0),
            None
        );
        assert_eq!(policy.retry_wait(StatusCode::OK, &none, 0), None);
        assert_eq!(
            policy.retry_wait(StatusCode::TOO_MANY_REQUESTS, &asks(2), 1),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            policy.retry_wait(StatusCode::TOO_MANY_REQUESTS, &asks(2), 2),
            None
        );
        assert_eq!(
            policy.retry_wait(StatusCode::SERVICE_UNAVAILABLE, &asks(4), 0),
            None
        );
        for retry in 0..2 {
            for _ in 0..50 {
                let wait = policy
                    .retry_wait(StatusCode::SERVICE_UNAVAILABLE, &none, retry)
                    .unwrap();
                assert!(wait <= Duration::from_secs(1 << retry), "{wait:?}");
            }
        }
    }

    #[test]
    fn jwt_query_parameter_is_hidden_in_messages() {
        let url = Url::parse("https://x/p?a=1&jwt=abc.def.ghi").unwrap();
        let shown = redacted_url(&url);
        assert!(!shown.contains("abc.def"), "{shown}");
        assert!(shown.contains("a=1"));
    }
}
