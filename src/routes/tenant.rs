//! Product routes guarded by the tenant's JWT. `/api/tenant` refuses context tokens and also
//! serves Forge calls (a Forge Invocation Token); `/api/context` is the example of a route that
//! opts in to context tokens.

use actix_web::HttpResponse;

use crate::guard::{ContextRequest, ProductRequest};
use crate::tenant_request::TenantRequest;

fn describe(request: &ProductRequest) -> serde_json::Value {
    serde_json::json!({
        "clientKey": request.client_key.as_str(),
        "baseUrl": request.base_url.as_str(),
        "productType": request.product_type,
        "accountId": request.account_id,
        "supersedes": request.installation.supersedes.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        "siteProof": request.installation.site_proof.map(|p| p.as_str()),
    })
}

/// A Connect call: the fields above; a Forge call: what its token says, and the clientKey of
/// the linked Connect installation (`null` when none is stored). Either way `"via"`.
pub async fn tenant(request: TenantRequest) -> HttpResponse {
    let view = &request.view;
    let mut body = match &request.connect {
        Some(connect) => describe(connect),
        None => serde_json::json!({
            "clientKey": view.client_key.as_ref().map(|k| k.as_str()),
            "baseUrl": view.base_url.as_ref().map(|u| u.as_str()),
            "productType": view.product,
            "accountId": view.account_id,
            "apiBaseUrl": view.api_base_url.as_ref().map(|u| u.as_str()),
            "moduleKey": view.module_key,
            "environmentType": view.environment_type,
            "environmentId": view.environment_id,
            "license": view.license,
            "appVersion": view.app_version,
        }),
    };
    body["via"] = view.via.as_str().into();
    body["installationId"] = view.installation_id.map(|id| id.to_string()).into();
    body["cloudId"] = view.cloud_id.clone().into();
    HttpResponse::Ok().json(body)
}

pub async fn context(ContextRequest(request): ContextRequest) -> HttpResponse {
    let mut body = describe(&request);
    body["context"] = request.context.clone().unwrap_or(serde_json::Value::Null);
    HttpResponse::Ok().json(body)
}
