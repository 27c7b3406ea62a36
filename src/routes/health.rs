//! `GET /healthz`: the process answers. `GET /readyz`: and so does the store; also says whether
//! this instance hears other instances' writes (docs/PROTOCOL.md §10). Not hearing them is no
//! reason to take it out of rotation: its lookups then read the store, which answers.

use actix_web::{web, HttpResponse};

use crate::error::ApiError;
use crate::startup::AppState;
use crate::tenants::Subscription;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.ping().await?;
    let invalidations = match state.tenants.subscription() {
        Subscription::Subscribed => "subscribed",
        Subscription::NotSubscribed => "reconnecting",
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "status": "ready",
        "invalidations": invalidations,
    })))
}
