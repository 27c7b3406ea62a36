//! The one place where failures become HTTP answers: every handler returns [`ApiError`], whose
//! `ResponseError` impl picks the status, writes `{"error": "..."}` and logs the cause chain once.

use std::fmt::Write as _;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use connect_protocol::authorization::AuthorizationError;
use connect_protocol::domain::ParseError;
use connect_protocol::jwt::JwtError;

use crate::forge::ForgeAuthError;
use crate::guard::ProductAuthError;
use crate::host_client::HostClientError;
use crate::install_keys::KeyFetchError;
use crate::lifecycle::LifecycleError;
use crate::store::StoreError;
use crate::webhooks::{WebhookError, RETRY_AFTER_SECONDS};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request itself is malformed (bad JSON, missing field, both token locations).
    #[error("{0}")]
    BadRequest(String),
    /// 401: the caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// 401 from a token rule.
    #[error(transparent)]
    Token(#[from] JwtError),
    /// 403: authenticated, but not allowed (host not permitted, clientKey mismatch, uninstalled).
    #[error("{0}")]
    Forbidden(String),
    /// 409: a stale or replayed lifecycle callback.
    #[error("{0}")]
    Conflict(String),
    /// 503: a transient condition (e.g. write contention); the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    /// 413
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 408: the body did not arrive in full within `WARDEN_BODY_TIMEOUT_SECONDS`.
    #[error("the request body was not received within {seconds} s")]
    BodyTimeout { seconds: u64 },
    /// 503 (unavailable, or a write not confirmed by enough replicas); 500 for a record it
    /// cannot read or whose secret does not open
    #[error(transparent)]
    Store(#[from] StoreError),
    /// 401 or 503 depending on whether the key server answered.
    #[error(transparent)]
    InstallKey(#[from] KeyFetchError),
    /// 401 for a refused Forge Invocation Token or Forge Remote off; 503 when Forge's JWKS
    /// cannot answer for the token's kid.
    #[error(transparent)]
    Forge(#[from] ForgeAuthError),
    /// 502: a call to the host or its authorization server failed.
    #[error("{0}")]
    Upstream(String),
    /// 503 with `Retry-After`: the webhook queue is full; the sender retries later.
    #[error(transparent)]
    Webhook(#[from] WebhookError),
}

/// A value from outside that does not parse: the request is malformed.
impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        ApiError::BadRequest(e.0)
    }
}

/// A token sent twice is malformed; a missing or non-JWT one is unauthenticated.
impl From<AuthorizationError> for ApiError {
    fn from(e: AuthorizationError) -> Self {
        if e.is_malformed() {
            ApiError::BadRequest(e.to_string())
        } else {
            ApiError::Unauthenticated(e.to_string())
        }
    }
}

/// The product-request guard's refusals: unauthenticated (401) unless the token was good and
/// the installation may not be served (403).
impl From<ProductAuthError> for ApiError {
    fn from(e: ProductAuthError) -> Self {
        match e {
            ProductAuthError::Authorization(e) => e.into(),
            ProductAuthError::Token(e) => ApiError::Token(e),
            ProductAuthError::Store(e) => ApiError::Store(e),
            e @ (ProductAuthError::InvalidIssuer
            | ProductAuthError::UnknownTenant(_)
            | ProductAuthError::OtherTenant { .. }) => ApiError::Unauthenticated(e.to_string()),
            e @ (ProductAuthError::Superseded { .. }
            | ProductAuthError::Uninstalled(_)
            | ProductAuthError::Disabled(_)) => ApiError::Forbidden(e.to_string()),
        }
    }
}

/// Handlers answer `502` when a call to the host fails.
impl From<HostClientError> for ApiError {
    fn from(e: HostClientError) -> Self {
        ApiError::Upstream(error_chain(&e))
    }
}

/// The lifecycle policy's refusals, each with its status.
impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Malformed(e) => e.into(),
            LifecycleError::Authorization(e) => e.into(),
            LifecycleError::Token(e) => ApiError::Token(e),
            LifecycleError::InstallKey(e) => ApiError::InstallKey(e),
            LifecycleError::Store(e) => ApiError::Store(e),
            LifecycleError::Unauthenticated(m) => ApiError::Unauthenticated(m),
            LifecycleError::NotAllowed(m) => ApiError::Forbidden(m),
            LifecycleError::Stale(m) => ApiError::Conflict(m),
            e @ LifecycleError::Contention(_) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) | ApiError::Token(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_)
            | ApiError::Store(StoreError::Unavailable(_) | StoreError::NotReplicated { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Store(StoreError::Corrupt(_) | StoreError::Unsealable(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::InstallKey(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InstallKey(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forge(ForgeAuthError::KeysUnavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Forge(ForgeAuthError::Off | ForgeAuthError::Token(_)) => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Webhook(WebhookError::QueueFull { .. }) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// `message: cause: cause` for the log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(out, ": {cause}");
        source = cause.source();
    }
    out
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status()
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %error_chain(self), "request failed");
        } else {
            // An ordinary refusal: its reason goes on the request's own log line, so a flood of
            // forged requests costs one line each. Outside a request span, a line of its own.
            let span = tracing::Span::current();
            if span.is_disabled() {
                tracing::info!(status = status.as_u16(), error = %error_chain(self), "request refused");
            } else {
                span.record("error", tracing::field::display(error_chain(self)));
            }
        }
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let Some(request_id) = crate::telemetry::RequestId::current() {
            body["requestId"] = request_id.into();
        }
        let mut response = HttpResponse::build(status);
        if matches!(self, ApiError::Webhook(WebhookError::QueueFull { .. })) {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                RETRY_AFTER_SECONDS.to_string(),
            ));
        }
        response.json(body)
    }
}
