//! Product routes guarded by the tenant's JWT. `/api/tenant` refuses context tokens;
//! `/api/context` is the example of a route that opts in to them.

use actix_web::HttpResponse;

use crate::guard::{ContextRequest, ProductRequest};

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

pub async fn tenant(request: ProductRequest) -> HttpResponse {
    HttpResponse::Ok().json(describe(&request))
}

pub async fn context(ContextRequest(request): ContextRequest) -> HttpResponse {
    let mut body = describe(&request);
    body["context"] = request.context.clone().unwrap_or(serde_json::Value::Null);
    HttpResponse::Ok().json(body)
}
