//! Forge Remote: calls from Forge carry a Forge Invocation Token (FIT) as
//! `Authorization: Bearer <token>`. Its rules that need neither HTTP nor storage are
//! `connect_protocol::forge`; this module holds the two that do, one small type each:
//! [`jwks::ForgeJwks`] (Forge's keys, fetched through a bounded cache) and [`ForgeRequest`]
//! (the extractor: a handler taking one runs only for a verified FIT).
//!
//! The checks, in order (docs/PROTOCOL.md §12): Forge Remote on (`WARDEN_FORGE_APP_ID`); a
//! `Bearer` token; parsed; `alg` RS256 (before any key is looked up); a `kid`, known in the
//! JWKS; the signature; `iss`, `aud` (the app ARI), `exp`/`nbf`/`iat` with 30 s leeway, `jti`;
//! `app.installationId` and `app.apiBaseUrl`. Each failure has its own `401` message; only a
//! JWKS that cannot answer for an unknown kid is `503`.
//!
//! Once a FIT verified, the OAuth tokens sent with it are taken ([`app_token`]): the app's
//! system token kept per installation, the user's handed to the handler only.

pub mod app_token;
pub mod events;
pub mod jwks;
pub mod manifest;

use std::future::Future;
use std::pin::Pin;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use secrecy::SecretString;

use crate::configuration::ForgeSettings;
use crate::error::ApiError;
use crate::startup::AppState;
use connect_protocol::forge::{bearer_token, AppAri, FitError, ForgeToken, VerifiedFit};
use jwks::{ForgeJwks, KeyLookupError};

/// Why a FIT was refused. `error.rs` gives each kind its status.
#[derive(Debug, thiserror::Error)]
pub enum ForgeAuthError {
    #[error(
        "Forge Remote is off: WARDEN_FORGE_APP_ID is not set, so no Forge Invocation Token is accepted"
    )]
    Off,
    #[error(transparent)]
    Token(#[from] FitError),
    /// The JWKS cannot answer for the token's kid now: retry.
    #[error(transparent)]
    KeysUnavailable(KeyLookupError),
}

/// The app whose FITs are accepted, and Forge's keys.
#[derive(Debug)]
pub struct ForgeRemote {
    pub app: AppAri,
    pub keys: ForgeJwks,
    /// The system tokens sent with verified FITs.
    pub tokens: app_token::TokenKeeper,
    /// Lifecycle events this instance applied recently (`POST /forge/events`).
    pub seen_events: events::SeenEvents,
}

impl ForgeRemote {
    pub fn new(settings: &ForgeSettings, fetch_timeout: std::time::Duration) -> Self {
        Self {
            app: settings.app.clone(),
            keys: ForgeJwks::new(settings.jwks_url.clone(), fetch_timeout),
            tokens: app_token::TokenKeeper::default(),
            seen_events: events::SeenEvents::default(),
        }
    }

    /// Every check of a FIT, in order; `now` in Unix seconds.
    pub async fn verify(&self, raw: &str, now: i64) -> Result<VerifiedFit, ForgeAuthError> {
        let token = ForgeToken::parse(raw)?;
        let kid = token.key_id()?;
        let key = match self.keys.key(kid).await {
            Ok(key) => key,
            Err(KeyLookupError::UnknownKid) => return Err(FitError::UnknownKid.into()),
            Err(e @ KeyLookupError::Unavailable(_)) => {
                return Err(ForgeAuthError::KeysUnavailable(e))
            }
        };
        Ok(token.verify(&key)?.check(&self.app, now)?)
    }
}

/// A call from Forge, its FIT verified. Every field but `user_token` comes from the token.
#[derive(Debug, Clone)]
pub struct ForgeRequest {
    pub fit: VerifiedFit,
    /// `x-forge-oauth-user`: the user's token, for this request only (never kept).
    pub user_token: Option<SecretString>,
}

impl FromRequest for ForgeRequest {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let fit = authenticate(&req).await?;
            Ok(ForgeRequest {
                fit,
                user_token: user_token(&req),
            })
        })
    }
}

/// The FIT of `req`, verified.
pub async fn authenticate(req: &HttpRequest) -> Result<VerifiedFit, ForgeAuthError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered by startup::build_app");
    let forge = state.forge.as_ref().ok_or(ForgeAuthError::Off)?;
    let raw = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .unwrap_or(Err(FitError::MissingBearer))?;
    let now = connect_protocol::jwt::now();
    let fit = forge.verify(raw, now).await?;
    if let Some(token) = app_token::header_token(req, app_token::SYSTEM_TOKEN_HEADER) {
        // The call is served without it: a token not kept now comes again with the next call.
        if let Err(e) = forge
            .tokens
            .keep(state.store.as_ref(), &fit, token, now)
            .await
        {
            tracing::warn!(
                installation = %fit.installation_id,
                error = %e,
                "the Forge app token sent with this call could not be kept"
            );
        }
    }
    Ok(fit)
}

/// `x-forge-oauth-user` of `req`: use it only once its FIT verified, for that request only.
pub fn user_token(req: &HttpRequest) -> Option<SecretString> {
    app_token::header_token(req, app_token::USER_TOKEN_HEADER)
}

/// Whether `req` carries `Authorization: Bearer ...` (a FIT) rather than a Connect token.
pub fn is_bearer(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .is_some_and(|v| bearer_token(v.as_bytes()).is_some())
}
