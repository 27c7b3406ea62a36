//! Forge's key set (JWKS), fetched from the one configured URL and kept as ready verifiers.
//!
//! The whole set is one document, so one fetch answers for every kid: a kid is looked up in the
//! set held; a kid it lacks makes one fetch (concurrent misses wait for it: single-flight) and
//! is then either in the new set or unknown (`401`, remembered for [`UNKNOWN_KID_TTL`]). A
//! successful fetch replaces the set, so a key Forge stopped publishing stops verifying (and
//! is remembered unknown like any other).
//!
//! Anyone can send a made-up kid, so fetches are bounded by a token bucket
//! ([`JWKS_FETCH_BUDGET`]). Over the budget, a miss is answered from the last fetch: unknown
//! (`401`) if that fetch succeeded, unavailable (`503`) if it failed or none was made. A failed
//! fetch keeps the set held, so an outage of the JWKS does not stop known kids; a kid never seen
//! during an outage is `503` (retry), as nobody can tell yet whether Forge signs with it.
//! A set older than [`KEY_SET_MAX_AGE`] is fetched again on the next request (within the same
//! budget); meanwhile, and when that fetch fails, the set held still verifies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::StatusCode;
use serde::Deserialize;

use crate::install_keys::{FetchBudget, TokenBucket};
use connect_protocol::domain::BaseUrl;
use connect_protocol::jwt::RsaVerifyingKey;

/// Largest JWKS body read.
const MAX_JWKS_BODY_BYTES: usize = 256 * 1024;
/// Most keys taken from one JWKS.
const MAX_KEYS: usize = 100;
/// After this long, the set is fetched again on the next request.
pub const KEY_SET_MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// How long a kid absent from a freshly fetched set is answered unknown without a fetch.
pub const UNKNOWN_KID_TTL: Duration = Duration::from_secs(60);
/// Fetches of the JWKS: 3 at once, then one every 10 s. Forge publishes a key before it signs
/// with it, so a real new kid finds it in the first fetch it causes.
pub const JWKS_FETCH_BUDGET: FetchBudget = FetchBudget {
    per_second: 0.1,
    burst: 3,
};
/// Most unknown kids remembered.
const MAX_UNKNOWN_KIDS: u64 = 10_000;

/// Why no key could be found for a kid.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    /// The set fetched from Forge does not hold the kid.
    #[error("the kid is not in Forge's key set")]
    UnknownKid,
    /// The set held lacks the kid and cannot be fetched now (down, or over the fetch budget).
    #[error("Forge's key set (JWKS) is unavailable and does not hold this kid; retry")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The key set held, and how the last fetch went.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<RsaVerifyingKey>>,
    fetched_at: Option<Instant>,
    /// Whether the last attempt got a usable set (false before the first one).
    last_ok: bool,
}

/// Forge's JWKS, fetched through a bounded, single-flight cache.
pub struct ForgeJwks {
    url: BaseUrl,
    client: reqwest::Client,
    set: RwLock<KeySet>,
    /// Held while fetching: concurrent misses wait for one fetch.
    refresh: tokio::sync::Mutex<()>,
    /// Fetch attempts completed.
    generation: AtomicU64,
    budget: TokenBucket,
    unknown: moka::sync::Cache<String, ()>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for ForgeJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgeJwks")
            .field("url", &self.url)
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RsaJwk {
    kty: String,
    kid: String,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    n: String,
    e: String,
}

impl ForgeJwks {
    /// The JWKS at `url` (`WARDEN_FORGE_JWKS_URL`); one fetch takes at most `fetch_timeout`.
    pub fn new(url: BaseUrl, fetch_timeout: Duration) -> Self {
        Self::with_fetch_budget(url, fetch_timeout, JWKS_FETCH_BUDGET)
    }

    /// Like [`new`](Self::new), with another bound on fetches.
    pub fn with_fetch_budget(url: BaseUrl, fetch_timeout: Duration, budget: FetchBudget) -> Self {
        let client = crate::install_keys::key_fetch_client(fetch_timeout);
        Self {
            url,
            client,
            set: RwLock::new(KeySet::default()),
            refresh: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            budget: TokenBucket::new(budget),
            unknown: moka::sync::Cache::builder()
                .max_capacity(MAX_UNKNOWN_KIDS)
                .time_to_live(UNKNOWN_KID_TTL)
                .build(),
            fetches: AtomicU64::new(0),
        }
    }

    /// HTTP requests made to the JWKS so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key named `kid`.
    pub async fn key(&self, kid: &str) -> Result<Arc<RsaVerifyingKey>, KeyLookupError> {
        let seen = self.generation.load(Ordering::Acquire);
        let (held, fresh) = self.lookup(kid);
        if let (Some(key), true) = (&held, fresh) {
            return Ok(key.clone());
        }
        let _fetching = match (&held, self.refresh.try_lock()) {
            (_, Ok(guard)) => guard,
            // A stale set is being refreshed by someone else: the key held still verifies.
            (Some(key), Err(_)) => return Ok(key.clone()),
            (None, Err(_)) => {
                if self.unknown.contains_key(kid) {
                    return Err(KeyLookupError::UnknownKid);
                }
                self.refresh.lock().await
            }
        };
        if held.is_none() && self.unknown.contains_key(kid) {
            return Err(KeyLookupError::UnknownKid);
        }
        // A fetch completed while this one waited: its answer stands for this kid too.
        if self.generation.load(Ordering::Acquire) == seen {
            if !self.budget.try_take() {
                tracing::debug!(kid, "JWKS fetch refused: fetch budget spent");
                return self.answer(kid, "the bound on JWKS fetches is reached; retry");
            }
            self.refetch().await;
        }
        self.answer(kid, "the last JWKS fetch failed")
    }

    /// The key held for `kid`, and whether the set is younger than [`KEY_SET_MAX_AGE`].
    fn lookup(&self, kid: &str) -> (Option<Arc<RsaVerifyingKey>>, bool) {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        let fresh = set
            .fetched_at
            .is_some_and(|at| at.elapsed() < KEY_SET_MAX_AGE);
        (set.keys.get(kid).cloned(), fresh)
    }

    /// After the last fetch: the key, or unknown (that fetch succeeded without it), or
    /// unavailable (it failed and the set held lacks the kid).
    fn answer(
        &self,
        kid: &str,
        unavailable: &'static str,
    ) -> Result<Arc<RsaVerifyingKey>, KeyLookupError> {
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = set.keys.get(kid) {
            return Ok(key.clone());
        }
        if set.last_ok {
            self.unknown.insert(kid.to_owned(), ());
            Err(KeyLookupError::UnknownKid)
        } else {
            Err(KeyLookupError::Unavailable(unavailable.into()))
        }
    }

    /// One fetch; the caller holds `refresh`. A usable set replaces the one held; a failure
    /// keeps it.
    async fn refetch(&self) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        tracing::info!(url = %self.url, "fetching Forge's JWKS");
        let result = self.fetch().await;
        {
            let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(keys) => {
                    tracing::info!(keys = keys.len(), "Forge's JWKS fetched");
                    // Kids Forge stopped publishing are unknown now, without another fetch.
                    for dropped in set.keys.keys().filter(|kid| !keys.contains_key(*kid)) {
                        self.unknown.insert(dropped.clone(), ());
                    }
                    set.keys = keys;
                    set.fetched_at = Some(Instant::now());
                    set.last_ok = true;
                }
                Err(error) => {
                    tracing::warn!(url = %self.url, %error, "Forge's JWKS fetch failed; the keys held still verify");
                    set.last_ok = false;
                }
            }
        }
        if let Ok(set) = self.set.read() {
            // Kids of the new set are no longer unknown.
            for kid in set.keys.keys() {
                self.unknown.invalidate(kid);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<RsaVerifyingKey>>, String> {
        let url = self.url.as_str();
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| crate::error::error_chain(&e))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(format!("{url} answered {status}"));
        }
        let mut body = Vec::with_capacity(4096);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| crate::error::error_chain(&e))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BODY_BYTES {
                return Err(format!("{url} sent more than {MAX_JWKS_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}

/// The RS256 signing keys of a JWKS document, parsed once into verifiers. Keys of another type,
/// algorithm or use are skipped; a document with none usable is refused (and the set held is
/// kept), so a broken answer cannot revoke every key.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<RsaVerifyingKey>>, String> {
    let document: JwksDocument =
        serde_json::from_slice(body).map_err(|_| "the JWKS is not a JSON object with keys")?;
    let mut keys = HashMap::new();
    for jwk in document.keys.into_iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<RsaJwk>(jwk) else {
            continue;
        };
        if jwk.kty != "RSA"
            || jwk.alg.as_deref().is_some_and(|a| a != "RS256")
            || jwk.usage.as_deref().is_some_and(|u| u != "sig")
        {
            continue;
        }
        let (Ok(n), Ok(e)) = (
            URL_SAFE_NO_PAD.decode(&jwk.n),
            URL_SAFE_NO_PAD.decode(&jwk.e),
        ) else {
            continue;
        };
        match RsaVerifyingKey::from_components(&n, &e) {
            Ok(key) => {
                keys.insert(jwk.kid, Arc::new(key));
            }
            Err(_) => tracing::warn!(kid = %jwk.kid, "a JWKS key is not a usable RSA key; skipped"),
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no RS256 signing key".into());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rs256_signing_keys_are_taken() {
        let key = devtenant::SigningKey::generate();
        let good = devtenant::forge::jwk(&key);
        let mut hs = good.clone();
        hs["alg"] = "HS256".into();
        hs["kid"] = "hs".into();
        let mut enc = good.clone();
        enc["use"] = "enc".into();
        enc["kid"] = "enc".into();
        let mut ec = good.clone();
        ec["kty"] = "EC".into();
        ec["kid"] = "ec".into();
        let doc = serde_json::json!({ "keys": [good, hs, enc, ec, {"kid": 1}] });
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), [&key.kid]);

        for bad in [&b"{}"[..], b"{\"keys\": []}", b"<html>"] {
            assert!(parse_jwks(bad).is_err());
        }
    }
}
