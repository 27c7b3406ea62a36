//! `POST /installed`, `/uninstalled`, `/enabled`, `/disabled`: read and parse the body within
//! its limit, hand the callback to the lifecycle, answer `204`.

use actix_web::http::header;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt as _;

use connect_protocol::lifecycle::{LifecycleEvent, LifecyclePayload, MAX_BODY_BYTES};
use connect_protocol::qsh::CanonicalRequest;

use crate::error::ApiError;
use crate::lifecycle::Callback;
use crate::startup::AppState;

pub async fn installed(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    handle(LifecycleEvent::Installed, req, body, state).await
}

pub async fn uninstalled(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    handle(LifecycleEvent::Uninstalled, req, body, state).await
}

pub async fn enabled(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    handle(LifecycleEvent::Enabled, req, body, state).await
}

pub async fn disabled(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    handle(LifecycleEvent::Disabled, req, body, state).await
}

/// Handles the callback and counts its outcome (`warden_lifecycle_callbacks_total`).
async fn handle(
    event: LifecycleEvent,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = apply(event, req, body, state).await;
    crate::monitoring::lifecycle_callback(
        event,
        result.as_ref().map(|_| ()).map_err(ApiError::refusal),
    );
    result
}

async fn apply(
    event: LifecycleEvent,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, body, MAX_BODY_BYTES).await?;
    let payload = LifecyclePayload::parse(event, &body, &state.settings.app_key)?;
    let callback = Callback {
        event,
        payload: &payload,
        request: CanonicalRequest::new(
            req.method().as_str(),
            req.path(),
            req.query_string(),
            state.settings.base_url.path(),
        ),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        source: state.settings.request_source(
            req.peer_addr().map(|a| a.ip()),
            req.headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok()),
        ),
    };
    let applied = state.lifecycle().apply(&callback).await?;
    tracing::info!(
        event = event.name(),
        client_key = %payload.client_key,
        base_url = %payload.base_url,
        proof = ?applied.proof,
        written = applied.written,
        superseded = ?applied.superseded,
        site_proof = applied.installation.as_ref().and_then(|i| i.site_proof).map(|p| p.as_str()),
        "lifecycle callback accepted"
    );
    if applied.prove_site {
        AppState::start_site_proof(&state, payload.client_key.clone());
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The whole body, refusing more than `limit` bytes (by `Content-Length` up front, and while
/// reading for chunked bodies) with 413.
pub(crate) async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the body could not be read: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
