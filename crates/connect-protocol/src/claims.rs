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
