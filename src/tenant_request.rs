//! [`TenantRequest`]: a request from a tenant, authenticated either way a tenant can call —
//! a Connect JWT (`Authorization: JWT` or `?jwt=`, through [`crate::guard`]) or a Forge
//! Invocation Token (`Authorization: Bearer`, through [`crate::forge`]) — and described the same
//! way ([`TenantView`]), so a handler serves Connect and Forge calls alike.
//!
//! A Forge call is linked to the Connect installation of the same tenant when one is stored:
//! first by `installationId` (the Connect `installed` body carries it once the app adopted
//! Forge), else by `cloudId` and product among active installations, when exactly one matches
//! (docs/PROTOCOL.md §12). The store's Forge identity index names the candidates in O(1); each
//! candidate record is re-checked, so an index entry a reinstall or a site import left behind
//! never links the wrong installation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use secrecy::SecretString;

use crate::error::ApiError;
use crate::forge;
use crate::guard::ProductRequest;
use crate::startup::AppState;
use crate::store::{ForgeIdentity, Installation, StoreError, Usability};
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

/// The active Connect installation of the tenant a FIT names: the one holding its
/// `installationId` (several: see below), else the only one with its
/// `cloudId` and product.
pub(crate) async fn linked_installation(
    state: &AppState,
    fit: &VerifiedFit,
) -> Result<Option<Arc<Installation>>, StoreError> {
    let by_installation = ForgeIdentity::Installation(fit.installation_id);
    let mut same_installation = candidates(state, &by_installation).await?;
    // An installation on another site than the token's is not this tenant, whatever id it
    // claims.
    same_installation.retain(|installation| {
        match (fit.cloud_id.as_deref(), installation.cloud_id.as_deref()) {
            (Some(token), Some(stored)) => token.trim() == stored.trim(),
            _ => true,
        }
    });
    // Normally one. Otherwise one Atlassian's signature proved beats one it never did (an
    // unsigned legacy install could name any installationId), then the newest binding wins.
    same_installation
        .sort_by_key(|i| (i.atlassian_installed, i.installed_at, i.client_key.clone()));
    if let Some(newest) = same_installation.pop() {
        return Ok(Some(newest));
    }
    let Some(cloud_id) = fit.cloud_id.as_deref() else {
        return Ok(None);
    };
    let mut same_site: Vec<_> =
        candidates(state, &ForgeIdentity::Cloud(cloud_id.trim().to_owned()))
            .await?
            .into_iter()
            .filter(|installation| fit.product() == Some(installation.product_type.as_str()))
            .collect();
    Ok(match same_site.len() {
        1 => same_site.pop(),
        _ => None,
    })
}

/// The active installations the identity index names under `identity` that still carry it.
async fn candidates(
    state: &AppState,
    identity: &ForgeIdentity,
) -> Result<Vec<Arc<Installation>>, StoreError> {
    let mut found = Vec::new();
    for client_key in state.store.client_keys_for_forge(identity).await? {
        let Some(installation) = state.tenants.get(&client_key).await? else {
            continue;
        };
        if installation.usability() == Usability::Active
            && identity.names(&installation)
            && vouched_for(&installation)
        {
            found.push(installation);
        }
    }
    Ok(found)
}

/// Whether the ids an installation carries can be trusted to link it (docs/PROTOCOL.md §12):
/// the body that set them is covered by no signature, so only an install Atlassian signed last
/// (not an unsigned legacy install or an HS256 reinstall naming someone else's ids), and one
/// its site did not leave unconfirmed.
fn vouched_for(installation: &Installation) -> bool {
    installation.signed_install
        && !installation
            .site_proof
            .is_some_and(crate::store::SiteProof::is_unproven)
}
