//! The fake host site and its OAuth2 authorization server: what the app calls when it talks to
//! Atlassian ([`crate::host_client`]). Every check is the real one, so a request this fake
//! accepts is signed the way Atlassian wants.
//!
//! Routes, relative to where [`configure`] mounts them (`<mount>`, empty at the root):
//!
//! | Route | Auth | Answer |
//! |---|---|---|
//! | `GET <tenant>/rest/atlassian-connect/1/addons/{appKey}` | app JWT | `200 {"key", "state": "ENABLED"}`; `404` for another app key |
//! | `ANY <tenant>/rest/api/{tail}` | app JWT or `Bearer` token | `200 {"method", "path", "query", "canonical", "auth", "iss" \| "accountId", "scope", "body"}` |
//! | `POST /oauth2/token` | form `grant_type`, `assertion`, `scope` | `200 {"access_token", "expires_in", "token_type": "Bearer"}`; `400 {"error", "error_description"}` |
//!
//! `<tenant>` is `<mount>/t/{clientKey}{basePath}` (`basePath` is `""` or e.g. `/wiki`), so a
//! tenant's `baseUrl` is `http://ADDR<mount>/t/{clientKey}{basePath}`
//! ([`HostService::tenant_path`], [`FakeHost::tenant_base_url`]).
//!
//! An app JWT must be HS256 with the tenant's shared secret, `iss` = the tenant's app key,
//! `iat`/`exp` valid, `qsh` = the hash of this request with the path relative to the tenant's
//! base path; a refusal is `401 {"error": <failed check>, "message"}` with the check one of
//! `token`, `malformed`, `alg`, `iss`, `signature`, `time`, `qsh`.
//!
//! The token endpoint checks the assertion like Atlassian: HS256 with the shared secret of the
//! tenant named by `tnt` (its `baseUrl`), `iss` = `urn:atlassian:connect:clientid:<current
//! oauthClientId>` (an old one after [`HostService::set_oauth_client_id`] is refused, as after
//! a site import), `sub` = `urn:atlassian:connect:useraccountid:<accountId>`, `aud` = this
//! server's origin, `exp - iat <= 60`; any failure is `400 invalid_grant` with a description.
//!
//! A rate-limited site is played with [`HostService::throttle_rest`]: the next N `rest/api`
//! requests that pass the signature check are answered `429` or `503` with Atlassian's
//! rate-limit headers (and `Retry-After` when asked). [`HostService::set_rest_delay`] makes
//! every `rest/api` answer slow, and [`HostService::max_in_flight`] tells the most `rest/api`
//! requests one tenant had in flight at once.
//!
//! [`HostService`] is the shared state (tenants, issued tokens, request counters, failure
//! knobs); [`FakeHost`] runs it alone on a loopback address.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use connect_protocol::claims::{
    AssertionClaims, ACCOUNT_ID_PREFIX, CLIENT_ID_PREFIX, JWT_BEARER_GRANT,
};
use connect_protocol::domain::{BaseUrl, SharedSecret};
use connect_protocol::jwt::{self, Audience, Token};
use connect_protocol::qsh::CanonicalRequest;

use super::local_server::{loopback_addrs, LocalServer};

/// Longest assertion lifetime (`exp - iat`) accepted.
pub const MAX_ASSERTION_LIFETIME: i64 = 60;
/// `expires_in` of issued tokens unless [`HostService::set_token_expires_in`] says otherwise.
pub const DEFAULT_EXPIRES_IN: u64 = 900;
/// Issued tokens kept at most; expired ones are dropped first.
const MAX_ISSUED_TOKENS: usize = 100_000;

/// One site with the app installed, as the host knows it.
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub client_key: String,
    /// `""` (Jira) or e.g. `"/wiki"` (Confluence), below the tenant's own `/t/{clientKey}`.
    pub base_path: String,
    pub shared_secret: SharedSecret,
    pub oauth_client_id: String,
    pub app_key: String,
}

/// What the counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostRoute {
    /// `GET <tenant>/rest/atlassian-connect/1/addons/{appKey}`
    Addon,
    /// `<tenant>/rest/api/{tail}`
    Rest,
    /// `POST /oauth2/token`
    Token,
}

#[derive(Debug, Clone)]
struct IssuedToken {
    client_key: String,
    account_id: String,
    scope: String,
    expires_at: i64,
}

/// State of the fake host, shared by every worker through `web::Data`.
#[derive(Debug)]
pub struct HostService {
    tenants: RwLock<HashMap<String, TenantRecord>>,
    /// Further secrets a site's app JWTs may be signed with ([`HostService::accept_also`]).
    extra_secrets: RwLock<HashMap<String, Vec<SharedSecret>>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    expires_in: AtomicU64,
    token_delay_ms: AtomicU64,
    /// `0`: answer normally; else every token request gets this status.
    token_failure: AtomicU16,
    addon_requests: AtomicU64,
    rest_requests: AtomicU64,
    token_requests: AtomicU64,
    token_requests_by_tenant: Mutex<HashMap<String, u64>>,
    last_token_scope: Mutex<Option<String>>,
    throttle: Mutex<Option<Throttle>>,
    rest_delay_ms: AtomicU64,
    /// Per tenant: `rest/api` requests in flight now, and the most at once.
    in_flight: Mutex<HashMap<String, (u64, u64)>>,
    rest_requests_by_tenant: Mutex<HashMap<String, u64>>,
    /// Per tenant, the `iat` of each app JWT accepted on `rest/api` (the last 100).
    app_token_iats: Mutex<HashMap<String, Vec<i64>>>,
}

/// The next `remaining` signed `rest/api` requests are refused with `status`.
#[derive(Debug, Clone)]
struct Throttle {
    remaining: u64,
    status: u16,
    retry_after: Option<String>,
}

/// Counts a tenant's request as in flight until dropped.
struct InFlight<'a> {
    service: &'a HostService,
    client_key: String,
}

impl<'a> InFlight<'a> {
    fn enter(service: &'a HostService, client_key: &str) -> Self {
        let mut all = lock(&service.in_flight);
        let entry = all.entry(client_key.to_owned()).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
        Self {
            service,
            client_key: client_key.to_owned(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(entry) = lock(&self.service.in_flight).get_mut(&self.client_key) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }
}

impl Default for HostService {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HostService {
    pub fn new() -> Self {
        Self {
            tenants: RwLock::new(HashMap::new()),
            extra_secrets: RwLock::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            expires_in: AtomicU64::new(DEFAULT_EXPIRES_IN),
            token_delay_ms: AtomicU64::new(0),
            token_failure: AtomicU16::new(0),
            addon_requests: AtomicU64::new(0),
            rest_requests: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            token_requests_by_tenant: Mutex::new(HashMap::new()),
            last_token_scope: Mutex::new(None),
            throttle: Mutex::new(None),
            rest_delay_ms: AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            rest_requests_by_tenant: Mutex::new(HashMap::new()),
            app_token_iats: Mutex::new(HashMap::new()),
        }
    }

    /// The next `count` `rest/api` requests whose signature passes are answered `status`
    /// (`429` or `503`) with `X-RateLimit-*` and `RateLimit-Reason` headers, and
    /// `Retry-After: <retry_after>` when given (seconds or an HTTP date, sent as is).
    pub fn throttle_rest(&self, count: u64, status: u16, retry_after: Option<&str>) {
        *lock(&self.throttle) = Some(Throttle {
            remaining: count,
            status,
            retry_after: retry_after.map(str::to_owned),
        });
    }

    /// Every `rest/api` request waits this long before it is answered (zero: no delay).
    pub fn set_rest_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.rest_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// The most `rest/api` requests of `client_key` in flight at once so far.
    pub fn max_in_flight(&self, client_key: &str) -> u64 {
        lock(&self.in_flight)
            .get(client_key)
            .map_or(0, |(_, max)| *max)
    }

    /// `rest/api` requests received for `client_key` (whatever the answer was).
    pub fn rest_requests_for(&self, client_key: &str) -> u64 {
        lock(&self.rest_requests_by_tenant)
            .get(client_key)
            .copied()
            .unwrap_or(0)
    }

    /// The `iat` of each app JWT of `client_key` accepted on `rest/api`, oldest first (the
    /// last 100): a retry signed anew shows a later one.
    pub fn app_token_iats(&self, client_key: &str) -> Vec<i64> {
        lock(&self.app_token_iats)
            .get(client_key)
            .cloned()
            .unwrap_or_default()
    }

    /// Takes one throttled answer, if any is left.
    fn take_throttle(&self) -> Option<Throttle> {
        let mut throttle = lock(&self.throttle);
        let current = throttle.as_mut()?;
        if current.remaining == 0 {
            *throttle = None;
            return None;
        }
        current.remaining -= 1;
        Some(current.clone())
    }

    /// Adds (or replaces) a tenant. Returns its path below the mount point, `/t/{clientKey}{basePath}`.
    pub fn register_tenant(&self, mut tenant: TenantRecord) -> String {
        let trimmed = tenant.base_path.trim().trim_end_matches('/');
        tenant.base_path = match trimmed {
            "" => String::new(),
            p if p.starts_with('/') => p.to_owned(),
            p => format!("/{p}"),
        };
        let path = format!("/t/{}{}", tenant.client_key, tenant.base_path);
        self.tenants
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tenant.client_key.clone(), tenant);
        path
    }

    pub fn remove_tenant(&self, client_key: &str) -> Option<TenantRecord> {
        self.tenants
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(client_key)
    }

    pub fn tenant(&self, client_key: &str) -> Option<TenantRecord> {
        self.tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client_key)
            .cloned()
    }

    /// `/t/{clientKey}{basePath}`: append it to the URL where the service is mounted to get the
    /// tenant's `baseUrl`.
    pub fn tenant_path(&self, client_key: &str) -> Option<String> {
        self.tenant(client_key)
            .map(|t| format!("/t/{}{}", t.client_key, t.base_path))
    }

    /// Gives the tenant a new `oauthClientId`; assertions naming the old one are refused from
    /// now on (what a site import does). `false` if the tenant is unknown.
    pub fn set_oauth_client_id(&self, client_key: &str, oauth_client_id: &str) -> bool {
        self.update(client_key, |t| {
            t.oauth_client_id = oauth_client_id.to_owned()
        })
    }

    /// The site also accepts app JWTs signed with `secret`, besides its tenant's own: two
    /// installations of the app on one site at once (imports racing).
    pub fn accept_also(&self, client_key: &str, secret: SharedSecret) {
        self.extra_secrets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(client_key.to_owned())
            .or_default()
            .push(secret);
    }

    fn extra_secrets(&self, client_key: &str) -> Vec<SharedSecret> {
        self.extra_secrets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client_key)
            .cloned()
            .unwrap_or_default()
    }

    /// Rolls the tenant's shared secret. `false` if the tenant is unknown.
    pub fn set_shared_secret(&self, client_key: &str, secret: SharedSecret) -> bool {
        self.update(client_key, |t| t.shared_secret = secret)
    }

    fn update(&self, client_key: &str, f: impl FnOnce(&mut TenantRecord)) -> bool {
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        match tenants.get_mut(client_key) {
            Some(t) => {
                f(t);
                true
            }
            None => false,
        }
    }

    /// `expires_in` of tokens issued from now on.
    pub fn set_token_expires_in(&self, seconds: u64) {
        self.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// Every token request waits this long before it is answered (zero: no delay).
    pub fn set_token_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.token_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// While `Some(status)`, every token request is answered with that status and
    /// `{"error": "server_error"}`.
    pub fn set_token_failure(&self, status: Option<u16>) {
        self.token_failure
            .store(status.unwrap_or(0), Ordering::SeqCst);
    }

    /// Requests received on `route` (whatever the answer was).
    pub fn requests(&self, route: HostRoute) -> u64 {
        match route {
            HostRoute::Addon => &self.addon_requests,
            HostRoute::Rest => &self.rest_requests,
            HostRoute::Token => &self.token_requests,
        }
        .load(Ordering::SeqCst)
    }

    /// Token requests whose `tnt` named this tenant (whatever the answer was).
    pub fn token_requests_for(&self, client_key: &str) -> u64 {
        lock(&self.token_requests_by_tenant)
            .get(client_key)
            .copied()
            .unwrap_or(0)
    }

    /// The `scope` of the last token request.
    pub fn last_token_scope(&self) -> Option<String> {
        lock(&self.last_token_scope).clone()
    }

    /// Forgets every issued access token (they are refused from now on).
    pub fn revoke_tokens(&self) {
        lock(&self.tokens).clear();
    }

    fn issue(&self, token: IssuedToken) -> String {
        let value = format!(
            "fake-at-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut tokens = lock(&self.tokens);
        if tokens.len() >= MAX_ISSUED_TOKENS {
            let now = jwt::now();
            tokens.retain(|_, t| t.expires_at > now);
            if tokens.len() >= MAX_ISSUED_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(value.clone(), token);
        value
    }

    fn issued(&self, token: &str) -> Option<IssuedToken> {
        lock(&self.tokens).get(token).cloned()
    }
}

/// Mounts the routes above relative to where it is configured, with `service` as their state:
/// `App::new().configure(configure(service))` or `web::scope("/host").configure(...)`.
pub fn configure(service: web::Data<HostService>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(service)
            .route("/oauth2/token", web::post().to(token_endpoint))
            .route("/t/{client_key}/{tail:.*}", web::route().to(tenant_route));
    }
}

/// `{"error": check, "message": ...}` with 401.
fn refused(check: &'static str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::Unauthorized().json(json!({ "error": check, "message": message.into() }))
}

fn not_found(message: impl Into<String>) -> HttpResponse {
    HttpResponse::NotFound().json(json!({ "error": "not_found", "message": message.into() }))
}

async fn tenant_route(
    req: HttpRequest,
    service: web::Data<HostService>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let (client_key, _) = path.into_inner();
    let Some(tenant) = service.tenant(&client_key) else {
        return not_found(format!("no site {client_key} on this host"));
    };
    let raw_path = req.path();
    // The mount point is whatever precedes `/t/{clientKey}/` in the path as received.
    let marker = format!("/t/{client_key}/");
    let Some(at) = raw_path.find(&marker) else {
        return not_found("the path does not name the tenant literally");
    };
    let tenant_base = format!("{}/t/{}{}", &raw_path[..at], client_key, tenant.base_path);
    let Some(relative) = raw_path
        .strip_prefix(&tenant_base)
        .filter(|rest| rest.starts_with('/'))
    else {
        return not_found(format!("this site's base path is {:?}", tenant.base_path));
    };

    if let Some(app_key) = relative.strip_prefix("/rest/atlassian-connect/1/addons/") {
        service.addon_requests.fetch_add(1, Ordering::SeqCst);
        if req.method() != actix_web::http::Method::GET {
            return HttpResponse::MethodNotAllowed().finish();
        }
        let extra = service.extra_secrets(&client_key);
        if let Err((check, message)) = verify_app_jwt(&req, &tenant, &extra, &tenant_base) {
            return refused(check, message);
        }
        let app_key = app_key.trim_end_matches('/');
        if app_key != tenant.app_key {
            return not_found(format!("the app {app_key:?} is not installed on this site"));
        }
        return HttpResponse::Ok().json(json!({ "key": app_key, "state": "ENABLED" }));
    }

    if relative.starts_with("/rest/api/") {
        service.rest_requests.fetch_add(1, Ordering::SeqCst);
        *lock(&service.rest_requests_by_tenant)
            .entry(client_key.clone())
            .or_default() += 1;
        let _in_flight = InFlight::enter(&service, &client_key);
        let delay = Duration::from_millis(service.rest_delay_ms.load(Ordering::SeqCst));
        if !delay.is_zero() {
            actix_web::rt::time::sleep(delay).await;
        }
        let canonical = CanonicalRequest::new(
            req.method().as_str(),
            raw_path,
            req.query_string(),
            &tenant_base,
        );
        let body = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
            })
        };
        let mut echo = json!({
            "method": req.method().as_str(),
            "path": relative,
            "query": req.query_string(),
            "canonical": canonical.as_str(),
            "body": body,
        });
        let bearer = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if let Some(bearer) = bearer {
            let Some(issued) = service.issued(bearer) else {
                return refused("bearer", "the access token is unknown or revoked");
            };
            if issued.client_key != tenant.client_key {
                return refused("bearer", "the access token was issued for another site");
            }
            if issued.expires_at <= jwt::now() {
                return refused("bearer", "the access token has expired");
            }
            echo["auth"] = json!("bearer");
            echo["accountId"] = json!(issued.account_id);
            echo["scope"] = json!(issued.scope);
        } else {
            let extra = service.extra_secrets(&client_key);
            let (iss, iat) = match verify_app_jwt(&req, &tenant, &extra, &tenant_base) {
                Ok(verified) => verified,
                Err((check, message)) => return refused(check, message),
            };
            {
                let mut all = lock(&service.app_token_iats);
                let iats = all.entry(client_key.clone()).or_default();
                if iats.len() >= 100 {
                    iats.remove(0);
                }
                iats.push(iat);
            }
            echo["auth"] = json!("jwt");
            echo["iss"] = json!(iss);
        }
        if let Some(throttle) = service.take_throttle() {
            return throttled(&throttle);
        }
        return HttpResponse::Ok().json(echo);
    }

    not_found(format!("no route {relative} on this fake host"))
}

/// A rate-limited answer, with the headers Jira Cloud sends on one.
fn throttled(throttle: &Throttle) -> HttpResponse {
    let status = StatusCode::from_u16(throttle.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut answer = HttpResponse::build(status);
    answer
        .insert_header(("X-RateLimit-Limit", "100"))
        .insert_header(("X-RateLimit-Remaining", "0"))
        .insert_header(("X-RateLimit-NearLimit", "true"))
        .insert_header(("X-RateLimit-Reset", "2026-01-01T00:00Z"))
        .insert_header(("RateLimit-Reason", "jira-burst-based"));
    if let Some(retry_after) = &throttle.retry_after {
        answer.insert_header(("Retry-After", retry_after.as_str()));
    }
    answer.json(json!({ "error": "rate_limited", "message": "too many requests; slow down" }))
}

/// The failed check and its message; [`refused`] makes the answer.
type Refusal = (&'static str, String);

fn failed(check: &'static str, message: impl Into<String>) -> Refusal {
    (check, message.into())
}

/// Checks the app's JWT like the host does; returns its `iss` and `iat`.
fn verify_app_jwt(
    req: &HttpRequest,
    tenant: &TenantRecord,
    extra_secrets: &[SharedSecret],
    tenant_base: &str,
) -> Result<(String, i64), Refusal> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("JWT "))
        .map(str::trim);
    let query = req
        .query_string()
        .split('&')
        .find_map(|pair| pair.strip_prefix("jwt="));
    let raw = header
        .or(query)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| failed("token", "no token: send Authorization: JWT <token>"))?;
    let token = Token::parse(raw).map_err(|e| failed("malformed", e.to_string()))?;
    token
        .require_alg("HS256")
        .map_err(|e| failed("alg", e.to_string()))?;
    let iss = token.claims().iss.clone().unwrap_or_default();
    if iss != tenant.app_key {
        return Err(failed(
            "iss",
            format!(
                "the token's iss {iss:?} is not the app key {:?}",
                tenant.app_key
            ),
        ));
    }
    let signed = std::iter::once(&tenant.shared_secret)
        .chain(extra_secrets)
        .any(|secret| token.verify_hs256(secret).is_ok());
    if !signed {
        return Err(failed(
            "signature",
            "the token is not signed with this installation's shared secret",
        ));
    }
    let claims = token.into_claims();
    claims
        .check_times(jwt::now())
        .map_err(|e| failed("time", e.to_string()))?;
    let canonical = CanonicalRequest::new(
        req.method().as_str(),
        req.path(),
        req.query_string(),
        tenant_base,
    );
    claims
        .check_qsh(&canonical, false)
        .map_err(|e| failed("qsh", e.to_string()))?;
    Ok((iss, claims.iat.unwrap_or_default()))
}

#[derive(Debug, Deserialize)]
struct TokenForm {
    #[serde(default)]
    grant_type: Option<String>,
    #[serde(default)]
    assertion: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

fn oauth_error(
    status: StatusCode,
    error: &'static str,
    description: impl Into<String>,
) -> HttpResponse {
    HttpResponse::build(status)
        .json(json!({ "error": error, "error_description": description.into() }))
}

fn invalid_grant(description: impl Into<String>) -> HttpResponse {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

async fn token_endpoint(
    req: HttpRequest,
    service: web::Data<HostService>,
    form: web::Form<TokenForm>,
) -> HttpResponse {
    service.token_requests.fetch_add(1, Ordering::SeqCst);
    let delay = Duration::from_millis(service.token_delay_ms.load(Ordering::SeqCst));
    if !delay.is_zero() {
        actix_web::rt::time::sleep(delay).await;
    }
    let form = form.into_inner();
    *lock(&service.last_token_scope) = form.scope.clone();

    let failure = service.token_failure.load(Ordering::SeqCst);
    if failure != 0 {
        let status = StatusCode::from_u16(failure).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return oauth_error(
            status,
            "server_error",
            "the authorization server is in failure mode",
        );
    }
    if form.grant_type.as_deref() != Some(JWT_BEARER_GRANT) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("grant_type must be {JWT_BEARER_GRANT}"),
        );
    }
    let Some(assertion) = form.assertion.as_deref().filter(|a| !a.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "no assertion");
    };
    let Ok(token) = Token::parse(assertion) else {
        return invalid_grant("the assertion is not a JWT");
    };
    if token.require_alg("HS256").is_err() {
        return invalid_grant("the assertion must be signed with HS256");
    }
    let Some(claims) = assertion
        .split('.')
        .nth(1)
        .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
        .and_then(|bytes| serde_json::from_slice::<AssertionClaims>(&bytes).ok())
    else {
        return invalid_grant("the assertion's claims are not a JSON object of the expected types");
    };

    let origin = {
        let info = req.connection_info();
        format!("{}://{}", info.scheme(), info.host())
    };
    let Some(tnt) = claims.tnt.as_deref() else {
        return invalid_grant("the assertion has no tnt claim");
    };
    let Some(tenant) = tenant_for(&service, tnt, &origin) else {
        return invalid_grant(format!("tnt {tnt:?} names no site of this host"));
    };
    *lock(&service.token_requests_by_tenant)
        .entry(tenant.client_key.clone())
        .or_default() += 1;

    if token.verify_hs256(&tenant.shared_secret).is_err() {
        return invalid_grant(
            "the assertion's signature does not verify with the installation's shared secret",
        );
    }
    let expected_iss = format!("{CLIENT_ID_PREFIX}{}", tenant.oauth_client_id);
    match claims.iss.as_deref() {
        Some(iss) if iss == expected_iss => {}
        Some(iss) if iss.starts_with(CLIENT_ID_PREFIX) => {
            return invalid_grant(format!(
                "the oauthClientId {:?} is not the current one of this site",
                &iss[CLIENT_ID_PREFIX.len()..]
            ))
        }
        _ => return invalid_grant(format!("iss must be {CLIENT_ID_PREFIX}<oauthClientId>")),
    }
    let account_id = match claims
        .sub
        .as_deref()
        .and_then(|s| s.strip_prefix(ACCOUNT_ID_PREFIX))
    {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => return invalid_grant(format!("sub must be {ACCOUNT_ID_PREFIX}<accountId>")),
    };
    let aud_ok = match &claims.aud {
        Some(Audience::One(a)) => a.trim_end_matches('/') == origin,
        Some(Audience::Many(v)) => v.iter().any(|a| a.trim_end_matches('/') == origin),
        None => false,
    };
    if !aud_ok {
        return invalid_grant(format!("aud must be {origin}"));
    }
    let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
        return invalid_grant("the assertion needs iat and exp");
    };
    let now = jwt::now();
    if exp - iat > MAX_ASSERTION_LIFETIME {
        return invalid_grant(format!(
            "exp may be at most {MAX_ASSERTION_LIFETIME} seconds after iat"
        ));
    }
    if exp < iat || exp + jwt::LEEWAY_SECONDS < now || iat > now + jwt::LEEWAY_SECONDS {
        return invalid_grant("the assertion has expired or is not yet valid");
    }
    let scope = form.scope.unwrap_or_default();
    let scope_ok = !scope.trim().is_empty()
        && scope
            .split(' ')
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
    if !scope_ok {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must be upper-case words separated by single spaces",
        );
    }

    let expires_in = service.expires_in.load(Ordering::SeqCst);
    let access_token = service.issue(IssuedToken {
        client_key: tenant.client_key.clone(),
        account_id,
        scope,
        expires_at: now.saturating_add(i64::try_from(expires_in).unwrap_or(i64::MAX)),
    });
    HttpResponse::Ok().json(json!({
        "access_token": access_token,
        "expires_in": expires_in,
        "token_type": "Bearer",
    }))
}

/// The tenant whose `baseUrl` is `tnt`: on this origin, path ending in `/t/{clientKey}{basePath}`.
fn tenant_for(service: &HostService, tnt: &str, origin: &str) -> Option<TenantRecord> {
    let tnt = BaseUrl::parse(tnt).ok()?;
    if tnt.origin() != origin {
        return None;
    }
    let path = tnt.path();
    service
        .tenants
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .find(|t| path.ends_with(&format!("/t/{}{}", t.client_key, t.base_path)))
        .cloned()
}

/// A [`HostService`] on its own HTTP server on a loopback address. Derefs to the service (so
/// `host.register_tenant(...)`, `host.requests(...)`). Stopped when dropped.
pub struct FakeHost {
    server: LocalServer,
    service: web::Data<HostService>,
}

impl FakeHost {
    /// Binds `addr` (`"127.0.0.1:0"` picks a free port; anything but a loopback address is
    /// refused) and runs the server as a task of the current tokio runtime.
    pub async fn start(addr: impl ToSocketAddrs) -> io::Result<Self> {
        let addrs = loopback_addrs(addr, "the fake host binds loopback addresses only")?;
        let service = web::Data::new(HostService::new());
        let shared = service.clone();
        let server = LocalServer::start(&addrs[..], "devtenant fake host", move |cfg| {
            configure(shared.clone())(cfg);
        })?;
        Ok(Self { server, service })
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `http://ADDR:PORT/oauth2/token`, the value for `WARDEN_OAUTH_TOKEN_URL`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.url())
    }

    /// The `baseUrl` of a registered tenant.
    pub fn tenant_base_url(&self, client_key: &str) -> Option<BaseUrl> {
        let path = self.service.tenant_path(client_key)?;
        BaseUrl::parse(&format!("{}{path}", self.url())).ok()
    }

    /// Registers `tenant` and returns its `baseUrl`.
    pub fn add_tenant(&self, tenant: TenantRecord) -> BaseUrl {
        let path = self.service.register_tenant(tenant);
        BaseUrl::parse(&format!("{}{path}", self.url()))
            .expect("http://<socket address>/t/<clientKey> is a valid base URL")
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn service(&self) -> &HostService {
        &self.service
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

impl Deref for FakeHost {
    type Target = HostService;
    fn deref(&self) -> &HostService {
        &self.service
    }
}

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeHost")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test, App};
    use serde::Serialize;

    const HOST: &str = "fake.test";

    fn secret(s: &str) -> SharedSecret {
        SharedSecret::parse(s).unwrap()
    }

    fn tenant(client_key: &str, base_path: &str) -> TenantRecord {
        TenantRecord {
            client_key: client_key.into(),
            base_path: base_path.into(),
            shared_secret: secret("tenant-secret"),
            oauth_client_id: "oauth-1".into(),
            app_key: "my-app".into(),
        }
    }

    fn app_jwt(method: &str, path_and_query: &str, base_path: &str, secret_value: &str) -> String {
        let now = jwt::now();
        let request = CanonicalRequest::from_url(method, path_and_query, base_path);
        let claims = connect_protocol::claims::app_claims("my-app", &request, now, now + 180);
        jwt::sign_hs256(&claims, &secret(secret_value))
    }

    #[derive(Serialize)]
    struct Assertion<'a> {
        iss: String,
        sub: &'a str,
        tnt: String,
        aud: &'a str,
        iat: i64,
        exp: i64,
    }

    fn assertion(oauth_client_id: &str, tnt: &str, lifetime: i64) -> String {
        let now = jwt::now();
        jwt::sign_hs256(
            &Assertion {
                iss: format!("{CLIENT_ID_PREFIX}{oauth_client_id}"),
                sub: "urn:atlassian:connect:useraccountid:acct-1",
                tnt: tnt.to_owned(),
                aud: "http://fake.test",
                iat: now,
                exp: now + lifetime,
            },
            &secret("tenant-secret"),
        )
    }

    macro_rules! app {
        ($service:expr) => {
            test::init_service(
                App::new().service(web::scope("/mnt").configure(configure($service.clone()))),
            )
            .await
        };
    }

    #[actix_web::test]
    async fn app_jwt_is_checked_relative_to_the_tenant_base_path() {
        let service = web::Data::new(HostService::new());
        assert_eq!(
            service.register_tenant(tenant("ck-1", "/wiki/")),
            "/t/ck-1/wiki"
        );
        let app = app!(service);
        let path = "/mnt/t/ck-1/wiki/rest/atlassian-connect/1/addons/my-app";
        let good = app_jwt("GET", path, "/mnt/t/ck-1/wiki", "tenant-secret");
        let res = test::call_service(
            &app,
            test::TestRequest::get()
                .uri(path)
                .insert_header(("authorization", format!("JWT {good}")))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::OK);

        for (token, check) in [
            (
                app_jwt("GET", path, "/mnt/t/ck-1/wiki", "wrong-secret"),
                "signature",
            ),
            (app_jwt("GET", path, "", "tenant-secret"), "qsh"),
            (
                app_jwt("POST", path, "/mnt/t/ck-1/wiki", "tenant-secret"),
                "qsh",
            ),
        ] {
            let res = test::call_service(
                &app,
                test::TestRequest::get()
                    .uri(path)
                    .insert_header(("authorization", format!("JWT {token}")))
                    .to_request(),
            )
            .await;
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
            let body: serde_json::Value = test::read_body_json(res).await;
            assert_eq!(body["error"], check, "{body}");
        }
        assert_eq!(service.requests(HostRoute::Addon), 4);
    }

    #[actix_web::test]
    async fn token_endpoint_checks_the_current_oauth_client_id() {
        let service = web::Data::new(HostService::new());
        let path = service.register_tenant(tenant("ck-2", ""));
        let tnt = format!("http://{HOST}/mnt{path}");
        let app = app!(service);
        let request = |assertion: String| {
            test::TestRequest::post()
                .uri("/mnt/oauth2/token")
                .insert_header(("host", HOST))
                .set_form([
                    ("grant_type", JWT_BEARER_GRANT),
                    ("assertion", assertion.as_str()),
                    ("scope", "READ WRITE"),
                ])
                .to_request()
        };

        let res = test::call_service(&app, request(assertion("oauth-1", &tnt, 59))).await;
        assert_eq!(res.status(), StatusCode::OK);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], DEFAULT_EXPIRES_IN);
        let access = body["access_token"].as_str().unwrap().to_owned();

        let echo = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/mnt/t/ck-2/rest/api/user-echo")
                .insert_header(("authorization", format!("Bearer {access}")))
                .to_request(),
        )
        .await;
        assert_eq!(echo.status(), StatusCode::OK);
        let echo: serde_json::Value = test::read_body_json(echo).await;
        assert_eq!(echo["accountId"], "acct-1");
        assert_eq!(echo["scope"], "READ WRITE");

        let too_long = test::call_service(&app, request(assertion("oauth-1", &tnt, 61))).await;
        assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);

        assert!(service.set_oauth_client_id("ck-2", "oauth-2"));
        let res = test::call_service(&app, request(assertion("oauth-1", &tnt, 59))).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["error"], "invalid_grant");
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .contains("oauth-1"));
        assert_eq!(service.token_requests_for("ck-2"), 3);
        assert_eq!(service.requests(HostRoute::Token), 3);
    }

    #[actix_web::test]
    async fn start_refuses_non_loopback_addresses() {
        let err = FakeHost::start("0.0.0.0:0").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
