//! The product-request guard: an actix extractor that authenticates a request sent by a host
//! site (webhook, iframe load, REST call) with its HS256 JWT. A handler that takes a
//! [`ProductRequest`] (or [`ContextRequest`], which also accepts context tokens) runs only for
//! a verified, active installation.
//!
//! ```ignore
//! async fn my_route(tenant: ProductRequest) -> HttpResponse {
//!     HttpResponse::Ok().body(format!("hello {}", tenant.client_key))
//! }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use crate::error::ApiError;
use crate::secrets::verify_product_signature;
use crate::startup::AppState;
use crate::store::{Installation, StoreError, Usability};
use connect_protocol::authorization::{find_token, AuthorizationError};
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::jwt::{self, Claims, JwtError, Token};
use connect_protocol::qsh::CanonicalRequest;

/// Why a product request was refused. `error.rs` gives each kind its status.
#[derive(Debug, thiserror::Error)]
pub enum ProductAuthError {
    #[error(transparent)]
    Authorization(#[from] AuthorizationError),
    #[error(transparent)]
    Token(#[from] JwtError),
    #[error("the token's iss is not a valid clientKey")]
    InvalidIssuer,
    #[error("no installation is known for clientKey {0}")]
    UnknownTenant(ClientKey),
    #[error("the token is for clientKey {token}, not {installation}")]
    OtherTenant {
        token: ClientKey,
        installation: ClientKey,
    },
    #[error("the installation {client_key} was superseded by {successor} (site import)")]
    Superseded {
        client_key: ClientKey,
        successor: ClientKey,
    },
    #[error("the installation {0} is uninstalled")]
    Uninstalled(ClientKey),
    #[error("the installation {0} is disabled")]
    Disabled(ClientKey),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A request from a host site, authenticated. Context tokens are refused.
#[derive(Debug, Clone)]
pub struct ProductRequest {
    pub client_key: ClientKey,
    pub base_url: BaseUrl,
    pub product_type: String,
    /// `sub`, or `context.user.accountId`.
    pub account_id: Option<String>,
    /// The raw `context` claim.
    pub context: Option<serde_json::Value>,
    /// The installation as stored (secrets stay redacted in `Debug`).
    pub installation: Arc<Installation>,
}

/// Like [`ProductRequest`], on a route that opts in to context tokens (`qsh` = `context-qsh`).
#[derive(Debug, Clone)]
pub struct ContextRequest(pub ProductRequest);

impl FromRequest for ProductRequest {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move { Ok(counted(authenticate(&req, false).await)?) })
    }
}

impl FromRequest for ContextRequest {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move { Ok(ContextRequest(counted(authenticate(&req, true).await)?)) })
    }
}

/// Counts the guard's outcome (`warden_product_requests_total`).
fn counted(
    result: Result<ProductRequest, ProductAuthError>,
) -> Result<ProductRequest, ProductAuthError> {
    crate::monitoring::product_request(result.as_ref().map(|_| ()).map_err(|e| e.refusal()));
    result
}

/// The token from `Authorization: JWT <token>` or `?jwt=<token>`; both at once is refused.
pub fn extract_token(req: &HttpRequest) -> Result<&str, AuthorizationError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    find_token(header, req.query_string())
}

async fn authenticate(
    req: &HttpRequest,
    allow_context: bool,
) -> Result<ProductRequest, ProductAuthError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered by startup::build_app");
    let raw = extract_token(req)?;
    let (token, client_key) = parse_product_token(raw)?;

    let now = jwt::now();
    let grace = state.settings.secret_grace.as_secs() as i64;
    let unknown = || ProductAuthError::UnknownTenant(client_key.clone());
    let mut installation = state.tenants.get(&client_key).await?.ok_or_else(unknown)?;
    if verify_product_signature(&token, &installation, grace, now).is_err() {
        // The cached secret may be stale (a roll on another instance): read the store once.
        // Forged tokens must not turn this into a store read each: `reload` shares one read
        // among concurrent callers and answers from an entry read after the key's last
        // invalidation less than `tenants::FRESH_FOR` ago. A roll invalidates the key (here,
        // or through pub/sub), so a brand-new secret still leads to a fresh read.
        installation = state
            .tenants
            .reload(&client_key)
            .await?
            .ok_or_else(unknown)?;
        verify_product_signature(&token, &installation, grace, now)?;
    }

    let line = RequestLine {
        method: req.method().as_str(),
        path: req.path(),
        query: req.query_string(),
        base_path: state.settings.base_url.path(),
        allow_context,
    };
    let claims = check_verified_token(token, &installation, &line, now)?;

    let account_id = claims.sub.clone().or_else(|| {
        claims
            .context
            .as_ref()
            .and_then(|c| c.pointer("/user/accountId"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    Ok(ProductRequest {
        client_key,
        base_url: installation.base_url.clone(),
        product_type: installation.product_type.clone(),
        account_id,
        context: claims.context,
        installation,
    })
}

/// The request a product token is checked against.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    /// As received, still percent-encoded, base path included.
    pub path: &'a str,
    /// Raw, without `?`.
    pub query: &'a str,
    /// Path of the app's base URL (`""` or e.g. `/app`).
    pub base_path: &'a str,
    /// Whether context tokens (`qsh` = `context-qsh`) are accepted.
    pub allow_context: bool,
}

/// Step 1 of the guard: the token split and decoded, HS256, with a valid `iss`.
pub fn parse_product_token(raw: &str) -> Result<(Token<'_>, ClientKey), ProductAuthError> {
    let token = Token::parse(raw)?;
    token.require_alg("HS256")?;
    let iss = token
        .claims()
        .iss
        .as_deref()
        .ok_or(JwtError::MissingClaim("iss"))?;
    let client_key = ClientKey::parse(iss).map_err(|_| ProductAuthError::InvalidIssuer)?;
    Ok((token, client_key))
}

/// Step 3 of the guard, after [`verify_product_signature`] passed: times, `qsh`, and an active
/// installation. Returns the claims.
pub fn check_verified_token(
    token: Token<'_>,
    installation: &Installation,
    line: &RequestLine<'_>,
    now: i64,
) -> Result<Claims, ProductAuthError> {
    let claims = token.into_claims();
    claims.check_times(now)?;
    let canonical = CanonicalRequest::new(line.method, line.path, line.query, line.base_path);
    claims.check_qsh(&canonical, line.allow_context)?;
    check_active(installation)?;
    Ok(claims)
}

/// The whole guard for a token and the installation it names, without the lookup: what the
/// extractor does once it holds the installation (and what `benches/guard.rs` measures).
pub fn verify_product_token(
    raw: &str,
    installation: &Installation,
    line: &RequestLine<'_>,
    grace_seconds: i64,
    now: i64,
) -> Result<Claims, ProductAuthError> {
    let (token, client_key) = parse_product_token(raw)?;
    if client_key != installation.client_key {
        return Err(ProductAuthError::OtherTenant {
            token: client_key,
            installation: installation.client_key.clone(),
        });
    }
    verify_product_signature(&token, installation, grace_seconds, now)?;
    check_verified_token(token, installation, line, now)
}

fn check_active(installation: &Installation) -> Result<(), ProductAuthError> {
    let client_key = installation.client_key.clone();
    match installation.usability() {
        Usability::Active => Ok(()),
        Usability::Superseded { successor } => Err(ProductAuthError::Superseded {
            client_key,
            successor,
        }),
        Usability::Uninstalled => Err(ProductAuthError::Uninstalled(client_key)),
        Usability::Disabled => Err(ProductAuthError::Disabled(client_key)),
    }
}
