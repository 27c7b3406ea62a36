//! The Forge side of the fake Atlassian: the JWKS that publishes the keys of Forge Invocation
//! Tokens (`GET /.well-known/jwks.json`), and a FIT signer whose every claim and header can be
//! overridden, for tests written from an attacker's side.
//!
//! [`JwksService`] is the shared state (keys published, added, rotated, revoked; a failure mode;
//! a request counter) and [`configure`] mounts it into any actix `App` or scope;
//! [`JwksServer`] runs it alone on its own loopback address.
//!
//! Beside the JWKS, the same service plays the product API behind a FIT's `app.apiBaseUrl`
//! ([`ForgeApi`], under [`FORGE_API_PATH`]): it issues the app's system tokens (what Forge
//! sends as `x-forge-oauth-system`) and answers `GET .../rest/api/3/myself` only with one of
//! them, unexpired.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use actix_web::{web, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use serde_json::{json, Value};

use super::keys::SigningKey;
use super::local_server::{loopback_addrs, LocalServer};
use connect_protocol::forge::{
    FitApp, FitClaims, FitContext, FitEnvironment, FitInstallation, FitInstallationContext,
    FitModule, FIT_ISSUER, INSTALLATION_ARI_PREFIX,
};
use connect_protocol::jwt::Audience;

/// Where the JWKS is served, relative to the mount point (as on Forge's CDN).
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// Where the product API is served: `apiBaseUrl`s are `<server>/forge-api/ex/<product>/<cloudId>`.
pub const FORGE_API_PATH: &str = "/forge-api";

/// The product API behind `apiBaseUrl`: the system tokens it issued, and the calls it got.
#[derive(Debug, Default)]
pub struct ForgeApi {
    /// token -> expiry (Unix seconds).
    issued: Mutex<std::collections::HashMap<String, i64>>,
    calls: AtomicU64,
    accepted: AtomicU64,
}

impl ForgeApi {
    /// A new system token valid until `exp`, shaped as a JWT whose payload carries `exp`
    /// (as Atlassian's are); only this API accepts it.
    pub fn issue_system_token(&self, exp: i64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD
            .encode(json!({ "exp": exp, "jti": uuid::Uuid::new_v4().to_string() }).to_string());
        let signature = URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
        let token = format!("{header}.{payload}.{signature}");
        lock(&self.issued).insert(token.clone(), exp);
        token
    }

    /// A new system token that is not a JWT (its lifetime cannot be read), valid until `exp`.
    pub fn issue_opaque_system_token(&self, exp: i64) -> String {
        let token = format!("opaque-{}", uuid::Uuid::new_v4().simple());
        lock(&self.issued).insert(token.clone(), exp);
        token
    }

    /// Requests received, whatever the answer.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Requests answered `200` (they carried an unexpired token issued here).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn myself(&self, authorization: Option<&str>, cloud_id: &str) -> HttpResponse {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = connect_protocol::jwt::now();
        let valid = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|token| lock(&self.issued).get(token).copied())
            .is_some_and(|exp| exp > now);
        if !valid {
            return HttpResponse::Unauthorized()
                .json(json!({ "message": "a valid system token is required" }));
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
        HttpResponse::Ok().json(json!({
            "accountId": "forge-app-system-user",
            "accountType": "app",
            "cloudId": cloud_id,
        }))
    }
}

/// The public half of `key` as a JWK (`kty` RSA, `n`, `e`, `kid`, `alg` RS256, `use` sig).
pub fn jwk(key: &SigningKey) -> serde_json::Value {
    let public = rsa::RsaPublicKey::from_public_key_pem(key.public_pem())
        .expect("a SigningKey's public PEM parses");
    json!({
        "kty": "RSA",
        "kid": key.kid,
        "alg": "RS256",
        "use": "sig",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    })
}

/// State of the JWKS endpoint, shared by every worker through `web::Data`.
#[derive(Debug, Default)]
pub struct JwksService {
    /// Published keys, oldest first.
    published: Mutex<Vec<SigningKey>>,
    failing: AtomicBool,
    delay_ms: AtomicU64,
    fetches: AtomicU64,
    /// The product API behind `apiBaseUrl`.
    pub api: ForgeApi,
}

impl JwksService {
    /// A JWKS publishing `keys`.
    pub fn new(keys: impl IntoIterator<Item = SigningKey>) -> Self {
        let service = Self::default();
        for key in keys {
            service.add(key);
        }
        service
    }

    /// Publishes `key` beside the others (a key announced before it signs).
    pub fn add(&self, key: SigningKey) {
        let mut published = lock(&self.published);
        if !published.iter().any(|k| k.kid == key.kid) {
            published.push(key);
        }
    }

    /// Publishes `key` and drops every other one: a rotation after which old kids are gone.
    pub fn rotate_to(&self, key: SigningKey) {
        *lock(&self.published) = vec![key];
    }

    /// Stops publishing `kid`.
    pub fn revoke(&self, kid: &str) {
        lock(&self.published).retain(|k| k.kid != kid);
    }

    /// The kids published now, oldest first.
    pub fn kids(&self) -> Vec<String> {
        lock(&self.published)
            .iter()
            .map(|k| k.kid.clone())
            .collect()
    }

    /// While on, every request is answered `503 Service Unavailable`.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Every answer waits this long first (zero: no delay).
    pub fn set_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Requests received (whatever the answer was).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The JWKS document as served now.
    pub fn document(&self) -> serde_json::Value {
        let keys: Vec<_> = lock(&self.published).iter().map(jwk).collect();
        json!({ "keys": keys })
    }

    fn answer(&self) -> HttpResponse {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return HttpResponse::ServiceUnavailable()
                .content_type("text/plain")
                .body("the JWKS is in failure mode\n");
        }
        HttpResponse::Ok().json(self.document())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Mounts `GET /.well-known/jwks.json` and the product API ([`FORGE_API_PATH`]) relative to
/// where it is configured.
pub fn configure(service: web::Data<JwksService>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(service)
            .route(JWKS_PATH, web::get().to(get_jwks))
            .route(
                &format!("{FORGE_API_PATH}/ex/{{product}}/{{cloud_id}}/rest/api/3/myself"),
                web::get().to(get_myself),
            );
    }
}

async fn get_myself(
    service: web::Data<JwksService>,
    path: web::Path<(String, String)>,
    req: actix_web::HttpRequest,
) -> HttpResponse {
    let authorization = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    service.api.myself(authorization, &path.1)
}

async fn get_jwks(service: web::Data<JwksService>) -> HttpResponse {
    let delay = service.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    service.answer()
}

/// A [`JwksService`] on its own HTTP server. Stopped when dropped.
pub struct JwksServer {
    server: LocalServer,
    service: web::Data<JwksService>,
}

impl JwksServer {
    /// Binds `addr` (loopback only; `"127.0.0.1:0"` picks a free port) and serves `service`.
    pub async fn start(addr: impl ToSocketAddrs, service: JwksService) -> io::Result<Self> {
        let addrs = loopback_addrs(addr, "the JWKS server binds loopback addresses only")?;
        let service = web::Data::new(service);
        let shared = service.clone();
        let server = LocalServer::start(&addrs[..], "devtenant Forge JWKS", move |cfg| {
            configure(shared.clone())(cfg);
        })?;
        Ok(Self { server, service })
    }

    /// The value for `WARDEN_FORGE_JWKS_URL`.
    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.server.url())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn service(&self) -> &JwksService {
        &self.service
    }

    /// An `apiBaseUrl` served by this server's [`ForgeApi`].
    pub fn api_base_url(&self, product: &str, cloud_id: &str) -> String {
        format!(
            "{}{FORGE_API_PATH}/ex/{product}/{cloud_id}",
            self.server.url()
        )
    }

    /// Stops the server and waits until it has stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

impl std::fmt::Debug for JwksServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksServer")
            .field("addr", &self.server.addr())
            .finish_non_exhaustive()
    }
}

/// How a FIT is signed.
#[derive(Clone)]
enum Signature {
    Rs256(SigningKey),
    /// `alg` `none` and an empty signature.
    None,
    /// HS256 with this secret (the classic attack: the RSA public key as an HMAC secret).
    Hs256(Vec<u8>),
}

/// A Forge Invocation Token, valid for the app by default (RS256 by the key given, `iss`,
/// `aud`, times, `jti`, an installation with a cloudId), every part of which a test can change.
#[derive(Clone)]
pub struct FitSigner {
    claims: FitClaims,
    kid: Option<String>,
    signature: Signature,
}

impl FitSigner {
    /// A FIT for `app_ari` (`ari:cloud:ecosystem::app/<uuid>`), signed by `key` and naming
    /// its kid; issued now, valid 60 s, for a new installation on a new Jira site.
    pub fn new(key: &SigningKey, app_ari: &str) -> Self {
        let now = connect_protocol::jwt::now();
        let cloud_id = uuid::Uuid::new_v4().to_string();
        Self {
            claims: FitClaims {
                iss: Some(FIT_ISSUER.into()),
                aud: Some(Audience::One(app_ari.into())),
                iat: Some(now),
                nbf: Some(now),
                exp: Some(now + 60),
                jti: Some(uuid::Uuid::new_v4().to_string()),
                principal: None,
                app: Some(FitApp {
                    id: Some(app_ari.into()),
                    installation_id: Some(format!(
                        "{INSTALLATION_ARI_PREFIX}{}",
                        uuid::Uuid::new_v4()
                    )),
                    api_base_url: Some(format!("https://api.atlassian.com/ex/jira/{cloud_id}")),
                    app_version: Some("2.1.0".into()),
                    environment: Some(FitEnvironment {
                        kind: Some("DEVELOPMENT".into()),
                        id: Some(uuid::Uuid::new_v4().to_string()),
                    }),
                    module: Some(FitModule {
                        kind: Some("core:endpoint".into()),
                        key: Some("warden-remote".into()),
                    }),
                    installation: Some(FitInstallation {
                        contexts: vec![FitInstallationContext {
                            cloud_id: Some(cloud_id),
                        }],
                    }),
                    license: Some(json!({ "isActive": true })),
                }),
                context: None,
            },
            kid: Some(key.kid.clone()),
            signature: Signature::Rs256(key.clone()),
        }
    }

    /// The claims as they will be signed.
    pub fn claims(&self) -> &FitClaims {
        &self.claims
    }

    /// Changes any claim.
    pub fn with_claims(mut self, change: impl FnOnce(&mut FitClaims)) -> Self {
        change(&mut self.claims);
        self
    }

    fn app(&mut self) -> &mut FitApp {
        self.claims.app.get_or_insert_with(FitApp::default)
    }

    pub fn aud(self, aud: &str) -> Self {
        self.with_claims(|c| c.aud = Some(Audience::One(aud.into())))
    }

    pub fn iss(self, iss: &str) -> Self {
        self.with_claims(|c| c.iss = Some(iss.into()))
    }

    pub fn iat(self, at: i64) -> Self {
        self.with_claims(|c| c.iat = Some(at))
    }

    pub fn nbf(self, at: i64) -> Self {
        self.with_claims(|c| c.nbf = Some(at))
    }

    pub fn exp(self, at: i64) -> Self {
        self.with_claims(|c| c.exp = Some(at))
    }

    pub fn jti(self, jti: Option<&str>) -> Self {
        self.with_claims(|c| c.jti = jti.map(str::to_owned))
    }

    /// `app.installationId` as given (an ARI or a bare UUID).
    pub fn installation_id(mut self, id: &str) -> Self {
        self.app().installation_id = Some(id.into());
        self
    }

    /// `app.apiBaseUrl`.
    pub fn api_base_url(mut self, url: &str) -> Self {
        self.app().api_base_url = Some(url.into());
        self
    }

    /// The site: `app.installation.contexts[0].cloudId` and `app.apiBaseUrl` for `product`.
    pub fn site(mut self, cloud_id: &str, product: &str) -> Self {
        let app = self.app();
        app.api_base_url = Some(format!("https://api.atlassian.com/ex/{product}/{cloud_id}"));
        app.installation = Some(FitInstallation {
            contexts: vec![FitInstallationContext {
                cloud_id: Some(cloud_id.into()),
            }],
        });
        self
    }

    /// A call a user made from the UI: `principal` and `context.{cloudId,siteUrl}`.
    pub fn user_call(self, account_id: &str, site_url: &str) -> Self {
        self.with_claims(|c| {
            c.principal = Some(account_id.into());
            let cloud_id = c
                .app
                .as_ref()
                .and_then(|a| a.installation.as_ref())
                .and_then(|i| i.contexts.first())
                .and_then(|x| x.cloud_id.clone());
            c.context = Some(FitContext {
                cloud_id,
                site_url: Some(site_url.into()),
            });
        })
    }

    /// Names `kid` in the header whatever key signs.
    pub fn kid(mut self, kid: &str) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// No `kid` in the header.
    pub fn without_kid(mut self) -> Self {
        self.kid = None;
        self
    }

    /// Signed by `key` while the header keeps naming the kid it named (a forgery with a
    /// key Forge does not publish under that kid).
    pub fn signed_by(mut self, key: &SigningKey) -> Self {
        self.signature = Signature::Rs256(key.clone());
        self
    }

    /// `alg` `none`, no signature.
    pub fn alg_none(mut self) -> Self {
        self.signature = Signature::None;
        self
    }

    /// HS256 with `secret` (e.g. a published public key's PEM).
    pub fn hs256(mut self, secret: &[u8]) -> Self {
        self.signature = Signature::Hs256(secret.to_vec());
        self
    }

    /// The compact token.
    pub fn sign(&self) -> String {
        let (algorithm, key) = match &self.signature {
            Signature::Rs256(key) => (Algorithm::RS256, key.encoding_key().clone()),
            Signature::Hs256(secret) => (Algorithm::HS256, EncodingKey::from_secret(secret)),
            Signature::None => {
                let mut header = json!({ "alg": "none", "typ": "JWT" });
                if let Some(kid) = &self.kid {
                    header["kid"] = kid.as_str().into();
                }
                let part = |v: &serde_json::Value| {
                    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("JSON encodes"))
                };
                let claims = serde_json::to_value(&self.claims).expect("claims encode");
                return format!("{}.{}.", part(&header), part(&claims));
            }
        };
        let mut header = Header::new(algorithm);
        header.typ = Some("JWT".into());
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &self.claims, &key).expect("signing a FIT cannot fail")
    }
}

impl std::fmt::Debug for FitSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FitSigner")
            .field("kid", &self.kid)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// A Forge lifecycle event as Forge sends it to a remote's `/forge/events` endpoint: the
/// event's name (`avi:forge:installed:app`, `avi:forge:upgraded:app` or `preUninstall`), the
/// installation (`id`) and the app; send it with a FIT of the same installation.
pub fn lifecycle_event(event_type: &str, installation_id: &str, app_version: &str) -> Value {
    json!({
        "eventType": event_type,
        "id": installation_id,
        "app": { "version": app_version },
        "environment": { "id": uuid::Uuid::new_v4().to_string() },
    })
}

/// `event` as Atlassian re-sends it after a failed delivery: with `retryContext`.
pub fn as_retry(mut event: Value, retry_count: u32, retry_reason: &str) -> Value {
    event["retryContext"] = json!({ "retryCount": retry_count, "retryReason": retry_reason });
    event
}

/// Sends `event` to `url` (a remote's `/forge/events`) with a fresh FIT from `fit`, the way
/// Forge delivers events: `POST`, and on a non-2xx answer (3xx included) or a failure, again
/// after `interval` with `retryContext`, at most 4 more times (Forge waits 60 s). The answers,
/// in order.
pub async fn deliver_event(
    client: &reqwest::Client,
    url: &str,
    fit: &FitSigner,
    event: &Value,
    interval: std::time::Duration,
) -> Vec<Result<reqwest::StatusCode, String>> {
    let mut answers = Vec::new();
    for attempt in 0..=4u32 {
        let body = match attempt {
            0 => event.clone(),
            n => as_retry(event.clone(), n, "NON_SUCCESS_RESPONSE"),
        };
        let answer = client
            .post(url)
            .bearer_auth(fit.sign())
            .json(&body)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .map(|r| r.status())
            .map_err(|e| e.to_string());
        let delivered = matches!(&answer, Ok(status) if status.is_success());
        answers.push(answer);
        if delivered {
            break;
        }
        tokio::time::sleep(interval).await;
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::test_keys;
    use connect_protocol::forge::{AppAri, ForgeToken};
    use connect_protocol::jwt::RsaVerifyingKey;

    const APP: &str = "ari:cloud:ecosystem::app/5f1c1b2e-0c1d-4a51-9a2b-3c4d5e6f7a8b";

    #[test]
    fn a_default_fit_verifies_with_its_published_jwk() {
        let [a, b] = test_keys();
        let service = JwksService::new([a.clone()]);
        let doc = service.document();
        let published = &doc["keys"][0];
        assert_eq!(published["kid"], a.kid.as_str());
        let component = |name: &str| {
            URL_SAFE_NO_PAD
                .decode(published[name].as_str().unwrap())
                .unwrap()
        };
        let key = RsaVerifyingKey::from_components(&component("n"), &component("e")).unwrap();

        let raw = FitSigner::new(a, APP).sign();
        let token = ForgeToken::parse(&raw).unwrap();
        assert_eq!(token.key_id(), Ok(a.kid.as_str()));
        let fit = token
            .verify(&key)
            .unwrap()
            .check(&AppAri::parse(APP).unwrap(), connect_protocol::jwt::now())
            .unwrap();
        assert_eq!(fit.product(), Some("jira"));

        let forged = FitSigner::new(a, APP).signed_by(b).sign();
        assert!(ForgeToken::parse(&forged).unwrap().verify(&key).is_err());

        service.add(b.clone());
        service.revoke(&a.kid);
        assert_eq!(service.kids(), vec![b.kid.as_str()]);
        service.rotate_to(a.clone());
        assert_eq!(service.kids(), vec![a.kid.as_str()]);
    }
}
