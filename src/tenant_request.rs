//! [`TenantRequest`]: a request from a tenant, authenticated either way a tenant can call —
//! a Connect JWT (`Authorization: JWT` or `?jwt=`, through [`crate::guard`]) or a Forge
//! Invocation Token (`Authorization: Bearer`, through [`crate::forge`]) — and described the same
//! way ([`TenantView`]), so a handler serves Connect and Forge calls alike.
//!
//! A Forge call is linked to the Connect installation of the same tenant when one is stored:
//! first by `installationId` (the Connect `installed` body carries it once the app adopted
//! Forge), else by `cloudId` and product among active installations, when exactly one matches.
//! The lookup lists the installations (fine for a handful; an identity index is the next step).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use secrecy::SecretString;

use crate::error::ApiError;
use crate::forge;
use crate::guard::ProductRequest;
use crate::startup::AppState;
use crate::store::{Installation, StoreError, Usability};
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::forge::{InstallationId, VerifiedFit};

/// How the tenant authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Connect,
    Forge,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Connect => "connect",
            Via::Forge => "forge",
        }
    }
}

/// The tenant, whichever way it called. `None` where that way does not tell.
#[derive(Debug, Clone)]
pub struct TenantView {
    pub via: Via,
    /// Connect's id: from the token, or for a Forge call from the linked Connect installation.
    pub client_key: Option<ClientKey>,
    pub installation_id: Option<InstallationId>,
    pub cloud_id: Option<String>,
    /// The site: Connect's `baseUrl`, or a Forge call's `context.siteUrl`.
    pub base_url: Option<BaseUrl>,
    /// Forge's `app.apiBaseUrl`.
    pub api_base_url: Option<BaseUrl>,
    /// `jira`, `confluence`, ...
    pub product: Option<String>,
    pub account_id: Option<String>,
    pub module_key: Option<String>,
    pub environment_type: Option<String>,
    pub environment_id: Option<String>,
    pub license: Option<serde_json::Value>,
    pub app_version: Option<String>,
    /// Forge's `x-forge-oauth-user` (a Forge call): the user's token, for this request only.
    pub user_token: Option<SecretString>,
}

/// An authenticated tenant request: the common view, and what the way it came adds.
#[derive(Debug, Clone)]
pub struct TenantRequest {
    pub view: TenantView,
    /// The Connect installation: the caller's own, or the one linked to a Forge call.
    pub installation: Option<Arc<Installation>>,
    /// The Connect request, for a Connect call.
    pub connect: Option<ProductRequest>,
    /// The verified FIT, for a Forge call.
    pub fit: Option<VerifiedFit>,
}

impl FromRequest for TenantRequest {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        if !forge::is_bearer(&req) {
            let connect = ProductRequest::from_request(&req, payload);
            return Box::pin(async move { Ok(from_connect(connect.await?)) });
        }
        Box::pin(async move {
            let fit = forge::authenticate(&req).await?;
            let state = req
                .app_data::<web::Data<AppState>>()
                .expect("AppState is registered by startup::build_app");
            let installation = linked_installation(state, &fit).await?;
            let mut request = from_forge(fit, installation);
            request.view.user_token = forge::user_token(&req);
            Ok(request)
        })
    }
}

fn from_connect(request: ProductRequest) -> TenantRequest {
    let installation = request.installation.clone();
    let view = TenantView {
        via: Via::Connect,
        client_key: Some(request.client_key.clone()),
        installation_id: installation
            .installation_id
            .as_deref()
            .and_then(|id| InstallationId::parse(id).ok()),
        cloud_id: installation.cloud_id.clone(),
        base_url: Some(request.base_url.clone()),
        api_base_url: None,
        product: Some(request.product_type.clone()),
        account_id: request.account_id.clone(),
        module_key: None,
        environment_type: None,
        environment_id: None,
        license: None,
        app_version: None,
        user_token: None,
    };
    TenantRequest {
        view,
        installation: Some(installation),
        connect: Some(request),
        fit: None,
    }
}

fn from_forge(fit: VerifiedFit, installation: Option<Arc<Installation>>) -> TenantRequest {
    let view = TenantView {
        via: Via::Forge,
        client_key: installation.as_ref().map(|i| i.client_key.clone()),
        installation_id: Some(fit.installation_id),
        cloud_id: fit.cloud_id.clone(),
        base_url: fit.site_url.clone(),
        api_base_url: Some(fit.api_base_url.clone()),
        product: fit.product().map(str::to_owned),
        account_id: fit.account_id.clone(),
        module_key: fit.module_key.clone(),
        environment_type: fit.environment_type.clone(),
        environment_id: fit.environment_id.clone(),
        license: fit.license.clone(),
        app_version: fit.app_version.clone(),
        user_token: None,
    };
    TenantRequest {
        view,
        installation,
        connect: None,
        fit: Some(fit),
    }
}

/// The active Connect installation of the tenant a FIT names: the one with its
/// `installationId`, else the only one with its `cloudId` and product.
async fn linked_installation(
    state: &AppState,
    fit: &VerifiedFit,
) -> Result<Option<Arc<Installation>>, StoreError> {
    let mut same_site = Vec::new();
    for client_key in state.store.list_client_keys().await? {
        let Some(installation) = state.tenants.get(&client_key).await? else {
            continue;
        };
        if installation.usability() != Usability::Active {
            continue;
        }
        let same_installation = installation
            .installation_id
            .as_deref()
            .and_then(|id| InstallationId::parse(id).ok())
            == Some(fit.installation_id);
        if same_installation {
            return Ok(Some(installation));
        }
        let same_cloud = fit.cloud_id.is_some() && installation.cloud_id == fit.cloud_id;
        if same_cloud && fit.product() == Some(installation.product_type.as_str()) {
            same_site.push(installation);
        }
    }
    Ok(match same_site.len() {
        1 => same_site.pop(),
        _ => None,
    })
}
