//! The claims of each kind of token Connect signs, built in one place for whoever signs them:
//! the host side (devtenant, tests) and warden's calls to a host.

use crate::jwt::{Audience, Claims};
use crate::qsh::CanonicalRequest;

/// Atlassian's RS256 install token (`installed`, `uninstalled`): `iss` = the site's clientKey,
/// `aud` = the app's base URL, `qsh` of the callback.
pub fn install_claims(
    client_key: &str,
    app_base_url: &str,
    request: &CanonicalRequest,
    iat: i64,
    exp: i64,
) -> Claims {
    Claims {
        aud: Some(Audience::One(app_base_url.to_owned())),
        ..tenant_claims(client_key, request, iat, exp)
    }
}

/// A site's HS256 token for a callback signed with its shared secret (`enabled`, `disabled`,
/// a legacy reinstall): `iss` = clientKey, `qsh` of the callback.
pub fn tenant_claims(client_key: &str, request: &CanonicalRequest, iat: i64, exp: i64) -> Claims {
    Claims {
        iss: Some(client_key.to_owned()),
        iat: Some(iat),
        exp: Some(exp),
        qsh: Some(request.qsh()),
        ..Claims::default()
    }
}

/// A site's HS256 product-request token, on behalf of user `account_id` (`sub`).
pub fn product_claims(
    client_key: &str,
    account_id: &str,
    request: &CanonicalRequest,
    iat: i64,
    exp: i64,
) -> Claims {
    Claims {
        sub: Some(account_id.to_owned()),
        ..tenant_claims(client_key, request, iat, exp)
    }
}

/// The app's HS256 token for a call to a host as the app: `iss` = the app key, `qsh` of the
/// outgoing request (path relative to the site's base URL).
pub fn app_claims(app_key: &str, request: &CanonicalRequest, iat: i64, exp: i64) -> Claims {
    tenant_claims(app_key, request, iat, exp)
}

/// The OAuth2 grant an app uses to act as a user: a JWT-bearer assertion.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// `iss` of an impersonation assertion: this prefix and the installation's `oauthClientId`.
pub const CLIENT_ID_PREFIX: &str = "urn:atlassian:connect:clientid:";
/// `sub` of an impersonation assertion: this prefix and the user's accountId.
pub const ACCOUNT_ID_PREFIX: &str = "urn:atlassian:connect:useraccountid:";

/// The claims of an impersonation assertion (HS256 with the installation's shared secret),
/// sent to the authorization server for a user's access token. Every claim is optional when
/// read, so the receiving side can name the one that is missing.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AssertionClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The site's base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tnt: Option<String>,
    /// The origin of the token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

/// The assertion for user `account_id` on the site at `site_base_url`, whose installation has
/// `oauth_client_id`, for the token endpoint at `endpoint_origin`.
pub fn assertion_claims(
    oauth_client_id: &str,
    account_id: &str,
    site_base_url: &str,
    endpoint_origin: &str,
    iat: i64,
    exp: i64,
) -> AssertionClaims {
    AssertionClaims {
        iss: Some(format!("{CLIENT_ID_PREFIX}{oauth_client_id}")),
        sub: Some(format!("{ACCOUNT_ID_PREFIX}{account_id}")),
        tnt: Some(site_base_url.to_owned()),
        aud: Some(Audience::One(endpoint_origin.to_owned())),
        iat: Some(iat),
        exp: Some(exp),
    }
}
