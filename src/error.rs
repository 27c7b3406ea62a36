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
/// ... except when the app has no usable Forge app token yet: `503` until Forge sends one.
impl From<HostClientError> for ApiError {
    fn from(e: HostClientError) -> Self {
        match e {
            HostClientError::NoForgeAppToken { .. }
            | HostClientError::ForgeAppTokenExpired { .. }
            | HostClientError::ForgeAppTokenUnreadable { .. } => {
                ApiError::Unavailable(e.to_string())
            }
            e => ApiError::Upstream(error_chain(&e)),
        }
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
            ApiError::Webhook(
                WebhookError::QueueFull { .. } | WebhookError::TenantShareFull { .. },
            ) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Why a request was refused, as a metrics label (see [`crate::monitoring`]): a fixed set
/// derived from the error's kind, so a label never carries a clientKey, URL, kid or anything
/// else the caller sent. The one place where errors become labels, beside `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    PayloadTooLarge,
    BodyTimeout,
    NoToken,
    Unauthenticated,
    MalformedToken,
    BadSignature,
    TokenTime,
    WrongAudience,
    QshMismatch,
    ContextToken,
    InvalidIssuer,
    UnknownTenant,
    OtherTenant,
    Forbidden,
    Superseded,
    Uninstalled,
    Disabled,
    Stale,
    Contention,
    InstallKeyNotFound,
    InstallKeyInvalid,
    InstallKeyUnavailable,
    InstallKeyOverBudget,
    StoreUnavailable,
    StoreNotReplicated,
    StoreCorrupt,
    StoreUnsealable,
    Upstream,
    ForgeOff,
    ForgeToken,
    ForgeKeysUnavailable,
    WebhookQueueFull,
}

impl Refusal {
    /// Every refusal, in the order of [`Refusal::index`].
    pub const ALL: [Refusal; 33] = [
        Refusal::Malformed,
        Refusal::PayloadTooLarge,
        Refusal::BodyTimeout,
        Refusal::NoToken,
        Refusal::Unauthenticated,
        Refusal::MalformedToken,
        Refusal::BadSignature,
        Refusal::TokenTime,
        Refusal::WrongAudience,
        Refusal::QshMismatch,
        Refusal::ContextToken,
        Refusal::InvalidIssuer,
        Refusal::UnknownTenant,
        Refusal::OtherTenant,
        Refusal::Forbidden,
        Refusal::Superseded,
        Refusal::Uninstalled,
        Refusal::Disabled,
        Refusal::Stale,
        Refusal::Contention,
        Refusal::InstallKeyNotFound,
        Refusal::InstallKeyInvalid,
        Refusal::InstallKeyUnavailable,
        Refusal::InstallKeyOverBudget,
        Refusal::StoreUnavailable,
        Refusal::StoreNotReplicated,
        Refusal::StoreCorrupt,
        Refusal::StoreUnsealable,
        Refusal::Upstream,
        Refusal::ForgeOff,
        Refusal::ForgeToken,
        Refusal::ForgeKeysUnavailable,
        Refusal::WebhookQueueFull,
    ];

    /// Position in [`Refusal::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::NoToken => "no_token",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::MalformedToken => "malformed_token",
            Refusal::BadSignature => "bad_signature",
            Refusal::TokenTime => "token_time",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::QshMismatch => "qsh_mismatch",
            Refusal::ContextToken => "context_token",
            Refusal::InvalidIssuer => "invalid_issuer",
            Refusal::UnknownTenant => "unknown_tenant",
            Refusal::OtherTenant => "other_tenant",
            Refusal::Forbidden => "forbidden",
            Refusal::Superseded => "superseded",
            Refusal::Uninstalled => "uninstalled",
            Refusal::Disabled => "disabled",
            Refusal::Stale => "stale",
            Refusal::Contention => "contention",
            Refusal::InstallKeyNotFound => "install_key_not_found",
            Refusal::InstallKeyInvalid => "install_key_invalid",
            Refusal::InstallKeyUnavailable => "install_key_unavailable",
            Refusal::InstallKeyOverBudget => "install_key_over_budget",
            Refusal::StoreUnavailable => "store_unavailable",
            Refusal::StoreNotReplicated => "store_not_replicated",
            Refusal::StoreCorrupt => "store_corrupt",
            Refusal::StoreUnsealable => "store_unsealable",
            Refusal::Upstream => "upstream",
            Refusal::ForgeOff => "forge_off",
            Refusal::ForgeToken => "forge_token",
            Refusal::ForgeKeysUnavailable => "forge_keys_unavailable",
            Refusal::WebhookQueueFull => "webhook_queue_full",
        }
    }

    fn of_token(e: &JwtError) -> Self {
        match e {
            JwtError::Malformed(_)
            | JwtError::WrongAlgorithm { .. }
            | JwtError::MissingKid
            | JwtError::InvalidKid
            | JwtError::MissingClaim(_) => Refusal::MalformedToken,
            JwtError::BadSignature => Refusal::BadSignature,
            JwtError::Expired | JwtError::IssuedInFuture | JwtError::ExpiresBeforeIssued => {
                Refusal::TokenTime
            }
            JwtError::WrongAudience => Refusal::WrongAudience,
            JwtError::QshMismatch { .. } => Refusal::QshMismatch,
            JwtError::ContextTokenNotAllowed => Refusal::ContextToken,
        }
    }

    fn of_authorization(e: AuthorizationError) -> Self {
        if e.is_malformed() {
            Refusal::Malformed
        } else {
            Refusal::NoToken
        }
    }

    pub fn of_store(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Refusal::StoreUnavailable,
            StoreError::NotReplicated { .. } => Refusal::StoreNotReplicated,
            StoreError::Corrupt(_) => Refusal::StoreCorrupt,
            StoreError::Unsealable(_) => Refusal::StoreUnsealable,
        }
    }

    pub fn of_install_key(e: &KeyFetchError) -> Self {
        match e {
            KeyFetchError::NotFound { .. } => Refusal::InstallKeyNotFound,
            KeyFetchError::InvalidKey => Refusal::InstallKeyInvalid,
            e if e.is_over_budget() => Refusal::InstallKeyOverBudget,
            KeyFetchError::Unavailable(_) => Refusal::InstallKeyUnavailable,
        }
    }
}

impl ApiError {
    /// The metrics label of this refusal.
    pub fn refusal(&self) -> Refusal {
        match self {
            ApiError::BadRequest(_) => Refusal::Malformed,
            ApiError::Unauthenticated(_) => Refusal::Unauthenticated,
            ApiError::Token(e) => Refusal::of_token(e),
            ApiError::Forbidden(_) => Refusal::Forbidden,
            ApiError::Conflict(_) => Refusal::Stale,
            ApiError::Unavailable(_) => Refusal::Contention,
            ApiError::PayloadTooLarge { .. } => Refusal::PayloadTooLarge,
            ApiError::BodyTimeout { .. } => Refusal::BodyTimeout,
            ApiError::Store(e) => Refusal::of_store(e),
            ApiError::InstallKey(e) => Refusal::of_install_key(e),
            ApiError::Upstream(_) => Refusal::Upstream,
            ApiError::Forge(ForgeAuthError::Off) => Refusal::ForgeOff,
            ApiError::Forge(ForgeAuthError::Token(_)) => Refusal::ForgeToken,
            ApiError::Forge(ForgeAuthError::KeysUnavailable(_)) => Refusal::ForgeKeysUnavailable,
            ApiError::Webhook(
                WebhookError::QueueFull { .. } | WebhookError::TenantShareFull { .. },
            ) => Refusal::WebhookQueueFull,
        }
    }
}

impl ProductAuthError {
    /// The metrics label of this refusal: finer than [`ApiError::refusal`], which sees these
    /// only as 401 or 403.
    pub fn refusal(&self) -> Refusal {
        match self {
            ProductAuthError::Authorization(e) => Refusal::of_authorization(*e),
            ProductAuthError::Token(e) => Refusal::of_token(e),
            ProductAuthError::InvalidIssuer => Refusal::InvalidIssuer,
            ProductAuthError::UnknownTenant(_) => Refusal::UnknownTenant,
            ProductAuthError::OtherTenant { .. } => Refusal::OtherTenant,
            ProductAuthError::Superseded { .. } => Refusal::Superseded,
            ProductAuthError::Uninstalled(_) => Refusal::Uninstalled,
            ProductAuthError::Disabled(_) => Refusal::Disabled,
            ProductAuthError::Store(e) => Refusal::of_store(e),
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
        if matches!(
            self,
            ApiError::Webhook(
                WebhookError::QueueFull { .. } | WebhookError::TenantShareFull { .. }
            )
        ) {
            response.insert_header((
                actix_web::http::header::RETRY_AFTER,
                RETRY_AFTER_SECONDS.to_string(),
            ));
        }
        response.json(body)
    }
}
