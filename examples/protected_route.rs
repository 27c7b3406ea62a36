//! How a vendor adds a protected route and calls the host: `cargo run --example protected_route`
//! (same `WARDEN_*` settings as `warden`).

use actix_web::{web, HttpResponse};
use connect_warden::{
    configuration::Settings,
    error::ApiError,
    guard::ProductRequest,
    startup::{AppState, Application},
};
use serde_json::{json, Value};

/// `GET /api/whoami`: runs only for a verified JWT from an installed, enabled site.
async fn whoami(
    tenant: ProductRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // As the app: a fresh HS256 JWT per request (iss = app key, qsh of exactly this request).
    // A failed call to the host becomes a 502 through `?`.
    let addon: Value = state
        .host
        .as_app(&tenant.installation)
        .get(&format!(
            "/rest/atlassian-connect/1/addons/{}",
            state.settings.app_key
        ))
        .send_json()
        .await?;
    // As the user who opened the page: OAuth2 impersonation, the token is cached.
    let account = tenant
        .account_id
        .as_deref()
        .ok_or_else(|| ApiError::BadRequest("no user".into()))?;
    let me: Value = state
        .host
        .as_user_requests(&tenant.installation, account, &["READ"])
        .await?
        .get("/rest/api/3/myself")
        .query(&[("expand", "groups")])
        .send_json()
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "app": addon["state"], "me": me })))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    connect_warden::telemetry::init("info");
    let settings = Settings::load()?;
    // warden's routes, caches and Redis invalidation listener, plus this route under the
    // base path (with WARDEN_BASE_URL=https://x/app it is /app/api/whoami).
    let app = Application::build_with_routes(settings, |cfg| {
        cfg.route("/api/whoami", web::get().to(whoami));
    })
    .await?;
    app.run_until_stopped().await?;
    Ok(())
}
