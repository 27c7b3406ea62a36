//! The tokens a host sends, for an app at `base_url` (whose path is `base_path`): shared by the
//! in-process app ([`super::app`]) and the `warden` processes ([`super::process`]).

use std::sync::atomic::{AtomicI64, Ordering};

use connect_protocol::claims;
use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt::{self, Claims};
use connect_protocol::qsh::CanonicalRequest;
use devtenant::KeyServer;

/// Real hosts make byte-identical tokens for callbacks in the same second (and a second body
/// under an identical token is refused as a replay); tests run faster than that, so each token
/// gets its own lifetime to stay distinct.
fn distinct_lifetime(counter: &AtomicI64) -> i64 {
    120 + counter.fetch_add(1, Ordering::Relaxed) % 120
}

/// The claims of the RS256 token Atlassian would send with `POST <path>` for `client_key`.
pub fn install_claims(base_url: &str, base_path: &str, client_key: &str, path: &str) -> Claims {
    static LIFETIME: AtomicI64 = AtomicI64::new(0);
    let request = CanonicalRequest::new("POST", &format!("{base_path}{path}"), "", base_path);
    let now = jwt::now();
    claims::install_claims(
        client_key,
        base_url,
        &request,
        now,
        now + distinct_lifetime(&LIFETIME),
    )
}

/// `claims` signed by the current key of `keys`, as Atlassian signs install callbacks.
pub fn sign_install(keys: &KeyServer, claims: &Claims) -> String {
    let ring = keys.keyring().read().unwrap();
    devtenant::sign_rs256(ring.current(), claims)
}

/// An HS256 token for an enabled/disabled callback (or legacy reinstall), signed with `secret`.
pub fn tenant_lifecycle_token(
    base_path: &str,
    client_key: &str,
    secret: &str,
    path: &str,
) -> String {
    // A lifecycle callback is signed as any other POST of the site's (no query).
    webhook_token(base_path, client_key, secret, path)
}

/// A product-request token: HS256 with `secret`, `qsh` of `<method> <path_and_query>`, issued
/// at `iat`, valid for 180 s.
pub fn product_token(
    base_path: &str,
    client_key: &str,
    secret: &str,
    method: &str,
    path_and_query: &str,
    iat: i64,
) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let request = CanonicalRequest::new(method, &format!("{base_path}{path}"), query, base_path);
    let claims = claims::product_claims(
        client_key,
        "557058:user-account-id",
        &request,
        iat,
        iat + 180,
    );
    jwt::sign_hs256(&claims, &SharedSecret::parse(secret).unwrap())
}

/// A site's token for a webhook delivery to `path_and_query`: HS256 with `secret`, `qsh` of the
/// `POST`, no user.
pub fn webhook_token(
    base_path: &str,
    client_key: &str,
    secret: &str,
    path_and_query: &str,
) -> String {
    static LIFETIME: AtomicI64 = AtomicI64::new(0);
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let request = CanonicalRequest::new("POST", &format!("{base_path}{path}"), query, base_path);
    let now = jwt::now();
    let claims = claims::tenant_claims(
        client_key,
        &request,
        now,
        now + distinct_lifetime(&LIFETIME),
    );
    jwt::sign_hs256(&claims, &SharedSecret::parse(secret).unwrap())
}
