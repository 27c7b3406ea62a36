//! HTTP handlers. Each is thin: it parses what arrives and hands over to the module that owns
//! the rule (lifecycle policy, product-request guard, store).

pub mod descriptor;
pub mod forge;
pub mod health;
pub mod lifecycle;
pub mod tenant;
pub mod webhooks;

use actix_web::HttpResponse;

use crate::error::ApiError;

/// Unknown routes answer JSON too.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::NotFound().json(serde_json::json!({ "error": "no such route" })))
}
