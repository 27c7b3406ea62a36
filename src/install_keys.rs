//! Atlassian's install-signing public keys, fetched by `kid` through a moka cache.
//!
//! A rotated key always gets a new `kid`, so a fetched key stays valid for as long as it is
//! cached. Misses for one `kid` are coalesced into a single request; an unknown `kid` is
//! remembered for a minute so that a flood of made-up kids does not turn into a flood of
//! requests for the same URL; an outage is never cached, so the next install retries.
//!
//! There may be several key servers, tried in order ([`InstallKeys::new`], `WARDEN_KEYS_URL`):
//! one that is down, slow, failing or over its budget hands the kid to the next, and a kid
//! found on any of them is used. Only when every one of them answers that it does not know the
//! kid is the kid unknown (and forgotten, below); if any could not answer, the lookup is
//! [`KeyFetchError::Unavailable`]. The rule is stated in docs/PROTOCOL.md §3.
//!
//! Anyone can make a miss (an install callback with any body and a fresh random `kid` needs no
//! credential), so the requests that actually go to a key server are also limited, for all
//! kids together, by a token bucket per key server ([`FETCHES_PER_SECOND`], [`FETCH_BURST`]):
//! a server that is failing does not spend the budget of the next. A miss over the budget of
//! every server is answered [`KeyFetchError::Unavailable`] (503, retry) without a request.
//! Each source address also has a small budget of its own ([`PER_SOURCE_BUDGET`]), so one
//! sender cannot spend the global one; and the lifecycle policy checks every claim before it
//! asks for a key, so a token that fails any other check costs no fetch at all.
//!
//! With a store ([`InstallKeys::remembering`]), every fetched key is remembered there with the
//! time it was fetched, and loaded at start-up: an instance started while the key server is
//! down still verifies the kids any instance has seen. A remembered key is trusted without
//! asking the key server only for [`KEY_TTL`] after its fetch; after that it is a fallback,
//! used only while the key server cannot answer (down, or over the fetch budget), and a key
//! server that no longer knows the kid (a revoked key) makes every instance forget it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;
use reqwest::StatusCode;

use crate::configuration::{is_staging_host, PRODUCTION_KEYS_URLS, STAGING_KEYS_URLS};
use crate::error::Refusal;
use crate::monitoring;
use crate::store::{SharedStore, StoreError};
use connect_protocol::domain::{BaseUrl, KeyId};
use connect_protocol::jwt::RsaVerifyingKey;

/// Largest response body read from the key server; a 4096-bit key in PEM is under 1 KiB.
pub const MAX_KEY_BODY_BYTES: usize = 16 * 1024;
/// Most keys kept in the cache.
const MAX_CACHED_KEYS: u64 = 1_000;
/// Lifetime of a cached key (a key never changes under its kid; this only bounds memory).
const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Most "unknown kid" answers remembered.
const MAX_CACHED_MISSES: u64 = 10_000;
/// How long an "unknown kid" answer is remembered.
const NOT_FOUND_TTL: Duration = Duration::from_secs(60);
/// Upper bound of the TCP/TLS connect phase (never more than the whole fetch timeout).
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Sustained rate of requests to one key server, all kids together (cache misses only).
pub const FETCHES_PER_SECOND: u32 = 10;
/// Requests to one key server allowed at once after a quiet period.
pub const FETCH_BURST: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum KeyFetchError {
    #[error("the install-key server does not know kid {kid}")]
    NotFound { kid: String },
    /// The key server failed or could not be reached, or the request was not made because the
    /// global fetch budget is spent ([`KeyFetchError::is_over_budget`]). Never cached.
    #[error("{}", unavailable_message(.0.as_ref()))]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the install-key server returned a key that is not an RSA public key in PEM form")]
    InvalidKey,
}

impl KeyFetchError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KeyFetchError::Unavailable(_))
    }

    /// Whether this is a miss refused by the global fetch budget (no request was made).
    pub fn is_over_budget(&self) -> bool {
        match self {
            KeyFetchError::Unavailable(cause) => is_budget_cause(cause.as_ref()),
            _ => false,
        }
    }
}

fn unavailable_message(cause: &(dyn std::error::Error + Send + Sync + 'static)) -> &'static str {
    if is_budget_cause(cause) {
        "too many install-key fetches; retry"
    } else {
        "the install-key server is unavailable"
    }
}

/// Whether `cause` is, or shares, a [`FetchBudgetExhausted`] or [`SourceBudgetExhausted`].
fn is_budget_cause(cause: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    cause.is::<FetchBudgetExhausted>()
        || cause.is::<SourceBudgetExhausted>()
        || cause
            .downcast_ref::<SharedKeyFetchError>()
            .and_then(SharedKeyFetchError::cause)
            .is_some_and(is_budget_cause)
}

/// The cause of a [`KeyFetchError::Unavailable`] refused by the global fetch budget.
#[derive(Debug, thiserror::Error)]
#[error("the global limit on requests to install-key servers is reached")]
pub struct FetchBudgetExhausted;

/// The cause of a [`KeyFetchError::Unavailable`] refused by the sender's own fetch budget.
#[derive(Debug, thiserror::Error)]
#[error("this sender's limit on install-key fetches is reached")]
pub struct SourceBudgetExhausted;

/// How many requests to key servers may be made: [`FETCH_BURST`] at once, refilled at
/// [`FETCHES_PER_SECOND`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FetchBudget {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for FetchBudget {
    fn default() -> Self {
        Self {
            per_second: f64::from(FETCHES_PER_SECOND),
            burst: FETCH_BURST,
        }
    }
}

/// A token bucket: starts full, holds at most `burst` tokens, gains `per_second` per second.
/// Also bounds the fetches of Forge's key set (`forge::jwks`).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    budget: FetchBudget,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(budget: FetchBudget) -> Self {
        Self {
            budget,
            state: Mutex::new(BucketState {
                tokens: f64::from(budget.burst),
                refilled_at: Instant::now(),
            }),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now
            .saturating_duration_since(state.refilled_at)
            .as_secs_f64();
        state.tokens =
            (state.tokens + elapsed * self.budget.per_second).min(f64::from(self.budget.burst));
        state.refilled_at = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How many fetches one source address may cause: a burst, then one every 5 s. A source that
/// sends install callbacks with one new `kid` after another is not a host site.
pub const PER_SOURCE_BUDGET: FetchBudget = FetchBudget {
    per_second: 0.2,
    burst: 5,
};
/// Source addresses whose budget is tracked at once; the least recently seen are dropped.
const MAX_TRACKED_SOURCES: u64 = 100_000;

/// The install-key server's public keys, cached by URL, and remembered in the store (when
/// given one) so that a new instance needs no key server for a key any instance has fetched.
pub struct InstallKeys {
    /// Configured key servers, in order; empty: chosen per host.
    keys_urls: Vec<BaseUrl>,
    client: reqwest::Client,
    /// Keys by the kid's URL at the first server of its list (also the store's key).
    keys: Cache<String, Arc<RsaVerifyingKey>>,
    not_found: Cache<String, ()>,
    budget: FetchBudget,
    /// One bucket per key server (their number is fixed by the configuration).
    server_budgets: Mutex<std::collections::HashMap<String, Arc<TokenBucket>>>,
    per_source: Cache<IpAddr, Arc<TokenBucket>>,
    memory: Option<SharedStore>,
    /// Every key known, however old: used only when the key server cannot answer.
    fallback: Cache<String, Arc<RsaVerifyingKey>>,
    fetches: AtomicU64,
    over_budget: AtomicU64,
}

impl std::fmt::Debug for InstallKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallKeys")
            .field("keys_urls", &self.keys_urls)
            .field("cached_keys", &self.keys.entry_count())
            .field("fetches", &self.fetches())
            .field("over_budget", &self.over_budget())
            .field("budget", &self.budget)
            .finish()
    }
}

/// The HTTP client of key fetches (install keys, Forge's JWKS): bounded in time, and never
/// following a redirect, which could lead a fetch off the configured server.
pub(crate) fn key_fetch_client(fetch_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(fetch_timeout)
        .connect_timeout(fetch_timeout.min(MAX_CONNECT_TIMEOUT))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("connect-warden/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with rustls and no custom certificates always builds")
}

impl InstallKeys {
    /// `keys_urls` (`WARDEN_KEYS_URL`), tried in order, replace the key servers for every
    /// host; when empty, the production or staging servers are chosen per host.
    /// `fetch_timeout` bounds one whole request to one server. Requests to each key server
    /// are limited to [`FETCH_BURST`] at once and [`FETCHES_PER_SECOND`] sustained.
    pub fn new(keys_urls: Vec<BaseUrl>, fetch_timeout: Duration) -> Self {
        Self::with_fetch_budget(keys_urls, fetch_timeout, FetchBudget::default())
    }

    /// Like [`new`](Self::new), with another limit on requests to each key server.
    pub fn with_fetch_budget(
        keys_urls: Vec<BaseUrl>,
        fetch_timeout: Duration,
        budget: FetchBudget,
    ) -> Self {
        let client = key_fetch_client(fetch_timeout);
        Self {
            keys_urls,
            client,
            keys: Cache::builder()
                .name("install_keys")
                .max_capacity(MAX_CACHED_KEYS)
                .time_to_live(KEY_TTL)
                .build(),
            not_found: Cache::builder()
                .name("install_keys_not_found")
                .max_capacity(MAX_CACHED_MISSES)
                .time_to_live(NOT_FOUND_TTL)
                .build(),
            budget,
            server_budgets: Mutex::default(),
            per_source: Cache::builder()
                .name("install_key_sources")
                .max_capacity(MAX_TRACKED_SOURCES)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            memory: None,
            fallback: Cache::builder()
                .name("install_keys_fallback")
                .max_capacity(MAX_CACHED_KEYS)
                .build(),
            fetches: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
        }
    }

    /// Remembers every fetched key in `store` (see [`preload`](Self::preload)).
    pub fn remembering(mut self, store: SharedStore) -> Self {
        self.memory = Some(store);
        self
    }

    /// Loads every key remembered in the store; returns how many. Start-up calls it, so known
    /// kids need no key server even when it is down. Keys fetched within [`KEY_TTL`] are
    /// trusted at once; older ones (and entries of versions that did not record the time)
    /// only when the key server cannot answer.
    pub async fn preload(&self) -> Result<usize, StoreError> {
        let Some(store) = &self.memory else {
            return Ok(0);
        };
        let mut loaded = 0;
        let now = now_unix();
        for (url, entry) in store.install_keys().await? {
            let (fetched_at, pem) = decode_remembered(&entry);
            match parse_public_key(pem.as_bytes()) {
                Ok(key) => {
                    let key = Arc::new(key);
                    if now.saturating_sub(fetched_at) < KEY_TTL.as_secs() as i64 {
                        self.keys.insert(url.clone(), key.clone()).await;
                    }
                    self.fallback.insert(url, key).await;
                    loaded += 1;
                }
                Err(_) => {
                    tracing::warn!(%url, "a remembered install key is not an RSA public key; ignored")
                }
            }
        }
        Ok(loaded)
    }

    /// The public key named `kid`, for an install from `host`.
    pub async fn key(
        &self,
        kid: &KeyId,
        host: &BaseUrl,
    ) -> Result<Arc<RsaVerifyingKey>, KeyFetchError> {
        self.key_for(kid, host, None).await
    }

    /// Like [`key`](Self::key), for a callback from `source`: a fetch it causes is also
    /// charged to that address's own budget ([`PER_SOURCE_BUDGET`]), so one source cannot
    /// spend the global one.
    pub async fn key_for(
        &self,
        kid: &KeyId,
        host: &BaseUrl,
        source: Option<IpAddr>,
    ) -> Result<Arc<RsaVerifyingKey>, KeyFetchError> {
        let servers = self.servers(host);
        let url = kid_url(servers[0], kid);
        if self.not_found.contains_key(&url) {
            tracing::debug!(%kid, %url, "install key unknown (remembered)");
            return Err(KeyFetchError::NotFound {
                kid: kid.to_string(),
            });
        }
        // Concurrent misses share the fetch of whoever came first, charged to that sender's
        // budget. A genuine install that joined a fetch refused for its starter's budget must
        // not fail for it: it tries once more, as the starter of its own fetch.
        for attempt in 0..2 {
            let mut started_here = false;
            let fetch = async {
                started_here = true;
                self.fetch(kid, &url, &servers, source).await
            };
            match self.keys.try_get_with(url.clone(), fetch).await {
                Ok(key) => return Ok(key),
                Err(shared) if !started_here && attempt == 0 && is_source_refusal(&shared) => {}
                Err(shared) => return Err(unshare(kid, shared)),
            }
        }
        unreachable!("the second pass returns")
    }

    /// Number of HTTP requests made to key servers so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Number of misses refused by the global fetch budget so far (no request made).
    pub fn over_budget(&self) -> u64 {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// The key servers for an install from `host`, in the order they are asked (never empty).
    fn servers(&self, host: &BaseUrl) -> Vec<&str> {
        if !self.keys_urls.is_empty() {
            return self.keys_urls.iter().map(BaseUrl::as_str).collect();
        }
        if is_staging_host(&host.host()) {
            STAGING_KEYS_URLS.to_vec()
        } else {
            PRODUCTION_KEYS_URLS.to_vec()
        }
    }

    /// The kid's URL at its first key server: where it is cached and remembered.
    #[cfg(test)]
    fn key_url(&self, kid: &KeyId, host: &BaseUrl) -> String {
        kid_url(self.servers(host)[0], kid)
    }

    fn server_budget(&self, server: &str) -> Arc<TokenBucket> {
        let mut all = self
            .server_budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.entry(server.to_owned())
            .or_insert_with(|| Arc::new(TokenBucket::new(self.budget)))
            .clone()
    }

    /// One lookup: the servers in order until one has the key. Only the caller that won the
    /// cache's init race runs this, so concurrent misses for one kid spend one unit of each
    /// budget. A server over its budget is skipped without a request; an error is not cached
    /// (moka keeps no failed init), so a later install retries.
    async fn fetch(
        &self,
        kid: &KeyId,
        url: &str,
        servers: &[&str],
        source: Option<IpAddr>,
    ) -> Result<Arc<RsaVerifyingKey>, KeyFetchError> {
        if let Some(source) = source {
            if !self.source_budget(source).await.try_take() {
                self.over_budget.fetch_add(1, Ordering::Relaxed);
                monitoring::install_key_fetch(Err(Refusal::InstallKeyOverBudget));
                tracing::debug!(%kid, %source, "install-key fetch refused: this source's fetch budget is spent");
                return self
                    .fallback_or(url, unavailable(SourceBudgetExhausted))
                    .await;
            }
        }
        let mut not_found = 0;
        let mut invalid = false;
        let mut failure: Option<KeyFetchError> = None;
        for server in servers {
            let server_url = kid_url(server, kid);
            if !self.server_budget(server).try_take() {
                let refused = self.over_budget.fetch_add(1, Ordering::Relaxed) + 1;
                monitoring::install_key_fetch(Err(Refusal::InstallKeyOverBudget));
                if refused == 1 || refused.is_power_of_two() {
                    tracing::warn!(%kid, %server, refused, "install-key fetch refused: this key server's fetch budget is exhausted");
                }
                failure.get_or_insert_with(|| unavailable(FetchBudgetExhausted));
                continue;
            }
            self.fetches.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%kid, url = %server_url, "fetching install key");
            let result = self.fetch_uncounted(kid, &server_url).await;
            monitoring::install_key_fetch(
                result.as_ref().map(|_| ()).map_err(Refusal::of_install_key),
            );
            match result {
                Ok((key, pem)) => {
                    tracing::debug!(%kid, url = %server_url, "install key fetched");
                    self.remember(url, &key, &pem).await;
                    return Ok(key);
                }
                Err(KeyFetchError::NotFound { .. }) => {
                    tracing::info!(%kid, url = %server_url, "install key server does not know this kid");
                    not_found += 1;
                }
                Err(KeyFetchError::InvalidKey) => {
                    tracing::warn!(%kid, url = %server_url, "install key server answered something that is not a public key");
                    invalid = true;
                }
                Err(error) => {
                    tracing::warn!(%kid, url = %server_url, error = %ErrorChain(&error), "install key fetch failed");
                    // A real failure says more than a spent budget.
                    if failure.as_ref().is_none_or(KeyFetchError::is_over_budget) {
                        failure = Some(error);
                    }
                }
            }
        }
        if not_found == servers.len() {
            // Every server says so: a revoked (or made-up) kid.
            self.not_found.insert(url.to_owned(), ()).await;
            self.forget(url).await;
            return Err(KeyFetchError::NotFound {
                kid: kid.to_string(),
            });
        }
        match failure {
            Some(error) => self.fallback_or(url, error).await,
            None if invalid => Err(KeyFetchError::InvalidKey),
            None => unreachable!("every server was counted as not found, invalid or failed"),
        }
    }

    /// The per-source bucket of `source`; IPv6 senders are counted per /64, the block one
    /// host usually has, so a single sender cannot multiply its budget.
    async fn source_budget(&self, source: IpAddr) -> Arc<TokenBucket> {
        let source = match source {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            v4 => v4,
        };
        self.per_source
            .get_with(source, async {
                Arc::new(TokenBucket::new(PER_SOURCE_BUDGET))
            })
            .await
    }

    /// The key known for `url` from an earlier fetch, when the key server cannot answer now.
    async fn fallback_or(
        &self,
        url: &str,
        error: KeyFetchError,
    ) -> Result<Arc<RsaVerifyingKey>, KeyFetchError> {
        match self.fallback.get(url).await {
            Some(key) => {
                tracing::info!(%url, error = %ErrorChain(&error), "key server unavailable; using the key fetched earlier for this kid");
                Ok(key)
            }
            None => Err(error),
        }
    }

    async fn remember(&self, url: &str, key: &Arc<RsaVerifyingKey>, pem: &str) {
        self.fallback.insert(url.to_owned(), key.clone()).await;
        if let Some(store) = &self.memory {
            let entry = encode_remembered(now_unix(), pem);
            if let Err(error) = store.remember_install_key(url, &entry).await {
                tracing::warn!(%url, error = %ErrorChain(&error), "cannot remember an install key in the store");
            }
        }
    }

    /// The key server no longer knows the kid: no instance may trust it again.
    async fn forget(&self, url: &str) {
        self.keys.invalidate(url).await;
        self.fallback.invalidate(url).await;
        if let Some(store) = &self.memory {
            if let Err(error) = store.forget_install_key(url).await {
                tracing::warn!(%url, error = %ErrorChain(&error), "cannot forget a revoked install key in the store");
            }
        }
    }

    /// One request: the key and its PEM text (to remember).
    async fn fetch_uncounted(
        &self,
        kid: &KeyId,
        url: &str,
    ) -> Result<(Arc<RsaVerifyingKey>, String), KeyFetchError> {
        let mut response = self.client.get(url).send().await.map_err(unavailable)?;
        let status = response.status();
        if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            return Err(unavailable(format!("{url} answered {status}")));
        }
        if status.is_client_error() {
            return Err(KeyFetchError::NotFound {
                kid: kid.to_string(),
            });
        }
        if !status.is_success() {
            // Redirects are not followed: a key server has no reason to send one.
            return Err(unavailable(format!("{url} answered {status}")));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_KEY_BODY_BYTES as u64)
        {
            return Err(KeyFetchError::InvalidKey);
        }
        let mut body = Vec::with_capacity(1024);
        while let Some(chunk) = response.chunk().await.map_err(unavailable)? {
            if body.len() + chunk.len() > MAX_KEY_BODY_BYTES {
                return Err(KeyFetchError::InvalidKey);
            }
            body.extend_from_slice(&chunk);
        }
        let key = parse_public_key(&body)?;
        let pem = String::from_utf8(body).map_err(|_| KeyFetchError::InvalidKey)?;
        Ok((Arc::new(key), pem.trim().to_owned()))
    }
}

/// `kid` at `server`. `kid` is a parsed UUID: hex digits and hyphens only, nothing that can
/// steer the URL.
fn kid_url(server: &str, kid: &KeyId) -> String {
    format!("{}/{kid}", server.trim_end_matches('/'))
}

/// Whether a shared fetch failed only because its starter's own budget was spent.
fn is_source_refusal(error: &KeyFetchError) -> bool {
    matches!(error, KeyFetchError::Unavailable(cause) if cause.is::<SourceBudgetExhausted>())
}

/// A key as remembered in the store: when it was fetched (Unix seconds), a newline, its PEM.
fn encode_remembered(fetched_at: i64, pem: &str) -> String {
    format!("{fetched_at}\n{pem}")
}

/// `(fetched_at, pem)` of a remembered entry. Entries written before the time was recorded
/// are the bare PEM: fetched at an unknown time, so never trusted without the key server.
fn decode_remembered(entry: &str) -> (i64, &str) {
    match entry.split_once('\n') {
        Some((at, pem)) if !at.starts_with('-') => match at.parse() {
            Ok(at) => (at, pem),
            Err(_) => (0, entry),
        },
        _ => (0, entry),
    }
}

fn now_unix() -> i64 {
    connect_protocol::jwt::now()
}

/// An RSA public key in PEM form, SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`), parsed
/// once into a ready verifier; anything else (a private key too) is refused.
fn parse_public_key(body: &[u8]) -> Result<RsaVerifyingKey, KeyFetchError> {
    let pem = std::str::from_utf8(body).map_err(|_| KeyFetchError::InvalidKey)?;
    RsaVerifyingKey::from_pem(pem).map_err(|_| KeyFetchError::InvalidKey)
}

fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> KeyFetchError {
    KeyFetchError::Unavailable(cause.into())
}

/// moka hands every waiter of one failed fetch the same `Arc`; turn it back into an owned error.
fn unshare(kid: &KeyId, shared: Arc<KeyFetchError>) -> KeyFetchError {
    match &*shared {
        KeyFetchError::NotFound { .. } => KeyFetchError::NotFound {
            kid: kid.to_string(),
        },
        KeyFetchError::InvalidKey => KeyFetchError::InvalidKey,
        KeyFetchError::Unavailable(_) => {
            KeyFetchError::Unavailable(Box::new(SharedKeyFetchError(shared)))
        }
    }
}

/// The cause of an `Unavailable` shared between waiters, shown as the cause itself.
#[derive(Debug)]
struct SharedKeyFetchError(Arc<KeyFetchError>);

impl SharedKeyFetchError {
    fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match &*self.0 {
            KeyFetchError::Unavailable(cause) => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl std::fmt::Display for SharedKeyFetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.cause() {
            Some(cause) => std::fmt::Display::fmt(cause, f),
            None => std::fmt::Display::fmt(&self.0, f),
        }
    }
}

impl std::error::Error for SharedKeyFetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause().and_then(|c| c.source())
    }
}

/// An error and its causes on one line, for logs.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kid() -> KeyId {
        KeyId::parse("0b6c1d3e-2f4a-4b5c-8d9e-0f1a2b3c4d5e").unwrap()
    }

    #[test]
    fn key_server_is_chosen_by_host_unless_configured() {
        let keys = InstallKeys::new(vec![], Duration::from_secs(1));
        let prod = BaseUrl::parse("https://acme.atlassian.net/wiki").unwrap();
        let staging = BaseUrl::parse("https://acme.jira-dev.com").unwrap();
        assert_eq!(
            keys.key_url(&kid(), &prod),
            format!("{}/{}", PRODUCTION_KEYS_URLS[0], kid())
        );
        assert_eq!(
            keys.key_url(&kid(), &staging),
            format!("{}/{}", STAGING_KEYS_URLS[0], kid())
        );
        let fake_staging = BaseUrl::parse("https://jira-dev.com.evil.example").unwrap();
        assert_eq!(
            keys.key_url(&kid(), &fake_staging),
            format!("{}/{}", PRODUCTION_KEYS_URLS[0], kid())
        );

        let configured = InstallKeys::new(
            vec![
                BaseUrl::parse("http://127.0.0.1:9/keys/").unwrap(),
                BaseUrl::parse("http://127.0.0.1:10").unwrap(),
            ],
            Duration::from_secs(1),
        );
        assert_eq!(
            configured.key_url(&kid(), &staging),
            format!("http://127.0.0.1:9/keys/{}", kid())
        );
        assert_eq!(
            configured.servers(&prod),
            ["http://127.0.0.1:9/keys", "http://127.0.0.1:10"]
        );
    }

    #[test]
    fn a_remembered_entry_keeps_when_it_was_fetched() {
        let pem = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----";
        assert_eq!(
            decode_remembered(&encode_remembered(1_700_000_000, pem)),
            (1_700_000_000, pem)
        );
        // Written by a version that did not record the time: as old as can be.
        assert_eq!(decode_remembered(pem), (0, pem));
        assert_eq!(decode_remembered("junk\nmore"), (0, "junk\nmore"));
    }

    #[test]
    fn only_rsa_public_keys_in_pem_are_accepted() {
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        use rsa::pkcs8::DecodePublicKey as _;

        let key = &devtenant::SigningKey::generate();
        assert!(parse_public_key(key.public_pem().as_bytes()).is_ok());
        let pkcs1 = rsa::RsaPublicKey::from_public_key_pem(key.public_pem())
            .unwrap()
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PUBLIC KEY-----"));
        assert!(parse_public_key(pkcs1.as_bytes()).is_ok());
        for bad in [key.private_pem().as_bytes(), b"", b"<html>", &[0xff, 0xfe]] {
            assert!(matches!(
                parse_public_key(bad),
                Err(KeyFetchError::InvalidKey)
            ));
        }
    }

    #[test]
    fn shared_unavailable_keeps_its_cause() {
        let shared = Arc::new(unavailable("boom"));
        let owned = unshare(&kid(), shared);
        assert!(owned.is_unavailable());
        assert_eq!(
            ErrorChain(&owned).to_string(),
            "the install-key server is unavailable: boom"
        );
        assert!(!owned.is_over_budget());
    }

    #[test]
    fn over_budget_is_unavailable_and_says_so_also_when_shared() {
        let own = unavailable(FetchBudgetExhausted);
        let shared = unshare(&kid(), Arc::new(unavailable(FetchBudgetExhausted)));
        for err in [own, shared] {
            assert!(err.is_unavailable() && err.is_over_budget(), "{err:?}");
            assert_eq!(err.to_string(), "too many install-key fetches; retry");
            assert_eq!(
                ErrorChain(&err).to_string(),
                "too many install-key fetches; retry: \
                 the global limit on requests to install-key servers is reached"
            );
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_refills() {
        let bucket = TokenBucket::new(FetchBudget {
            per_second: 20.0,
            burst: 3,
        });
        assert!((0..3).all(|_| bucket.try_take()));
        assert!(!bucket.try_take());
        std::thread::sleep(Duration::from_millis(120));
        assert!(bucket.try_take(), "one token back after 1/20 s");
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            (0..10).filter(|_| bucket.try_take()).count(),
            3,
            "never more than the burst"
        );
    }
}
