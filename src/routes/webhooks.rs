//! `POST <url>` of each `modules.webhooks` entry of the descriptor: authenticated like a
//! product request, then handed to the webhook queue; `204` at once.

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};

use crate::error::ApiError;
use crate::guard::ProductRequest;
use crate::routes::descriptor::DeclaredWebhook;
use crate::routes::lifecycle::read_body;
use crate::startup::AppState;
use crate::webhooks::{Delivery, Webhook, IDENTIFIER_HEADER, MAX_BODY_BYTES, MAX_IDENTIFIER_CHARS};

/// One `POST` route per declared webhook, at its path under `base_path`.
pub fn configure(cfg: &mut web::ServiceConfig, base_path: &str, declared: &[DeclaredWebhook]) {
    for webhook in declared {
        let event = webhook.event.clone();
        cfg.route(
            &format!("{base_path}{}", webhook.path),
            web::post().to(
                move |req: HttpRequest,
                      tenant: ProductRequest,
                      body: web::Payload,
                      state: web::Data<AppState>| {
                    deliver(event.clone(), req, tenant, body, state)
                },
            ),
        );
    }
}

async fn deliver(
    event: String,
    req: HttpRequest,
    tenant: ProductRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if !state.webhooks.handles(&event) {
        // Authenticated, but nothing here wants it.
        tracing::debug!(%event, client_key = %tenant.client_key, "webhook without a handler: dropped");
        return Ok(HttpResponse::NoContent().finish());
    }
    let identifier = identifier(&req)?;
    let body = parse_body(read_body(&req, body, MAX_BODY_BYTES).await?)?;
    let client_key = tenant.client_key.clone();
    let delivery = state.webhooks.accept(Webhook {
        event: event.clone(),
        tenant,
        body,
        identifier,
        state: state.clone(),
    })?;
    if delivery == Delivery::Duplicate {
        tracing::debug!(%event, %client_key, "webhook delivered again: already accepted");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// `X-Atlassian-Webhook-Identifier`, if sent: printable ASCII, at most
/// [`MAX_IDENTIFIER_CHARS`].
fn identifier(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(IDENTIFIER_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= MAX_IDENTIFIER_CHARS)
        .map(|v| Some(v.to_owned()))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "the X-Atlassian-Webhook-Identifier header must be 1 to {MAX_IDENTIFIER_CHARS} visible ASCII characters"
            ))
        })
}

fn parse_body(body: Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the webhook body is not JSON: {e}")))
}
