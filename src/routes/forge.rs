//! `POST /forge/events`: Forge lifecycle events and the `preUninstall` trigger, with a Forge
//! Invocation Token (docs/PROTOCOL.md §12). Answered at once: the one store write is inline.

use actix_web::{web, HttpRequest, HttpResponse};

use crate::error::ApiError;
use crate::forge::events::{self, ForgeEvent, MAX_EVENT_BODY_BYTES};
use crate::forge::ForgeRequest;
use crate::routes::lifecycle::read_body;
use crate::startup::AppState;

/// `200` `{"eventType","installationId","clientKey","outcome","retry"}` once the event is
/// applied (or was already); the token is checked before the body is read.
pub async fn events(
    forge: ForgeRequest,
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, body, MAX_EVENT_BODY_BYTES).await?;
    let fit = &forge.fit;
    let event = ForgeEvent::parse(&body, fit)?;
    let remote = state
        .forge
        .as_ref()
        .expect("a verified FIT means Forge Remote is on");
    let now = connect_protocol::jwt::now();
    let (outcome, client_key) = events::apply(&state, &remote.seen_events, fit, event, now).await?;
    tracing::info!(
        event = event.kind.as_str(),
        installation_id = %fit.installation_id,
        client_key = client_key.as_ref().map(|k| k.as_str()),
        outcome = outcome.as_str(),
        retry = event.retry,
        "Forge lifecycle event"
    );
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "eventType": event.kind.as_str(),
        "installationId": fit.installation_id.to_string(),
        "clientKey": client_key.as_ref().map(|k| k.as_str()),
        "outcome": outcome.as_str(),
        "retry": event.retry,
    })))
}
