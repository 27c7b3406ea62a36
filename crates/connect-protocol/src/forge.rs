//! The Forge Remote rules that need neither HTTP nor storage: the app and installation
//! identifiers, where the Forge Invocation Token (FIT) travels, and its signature and claim
//! rules. Which key verifies a FIT (Forge's JWKS) is the service's business.
//!
//! The order is enforced by types: [`ForgeToken::key_id`] refuses every `alg` but RS256 before
//! a key can be looked up, [`ForgeToken::verify`] turns a signed token into a [`SignedFit`],
//! and only that one's [`SignedFit::check`] yields the [`VerifiedFit`] a handler may trust.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::domain::{BaseUrl, ParseError};
use crate::jwt::{Audience, RsaVerifyingKey};

/// The `iss` of every FIT.
pub const FIT_ISSUER: &str = "forge/invocation-token";
/// What an app ARI starts with; the rest is the app's UUID.
pub const APP_ARI_PREFIX: &str = "ari:cloud:ecosystem::app/";
/// What an installation ARI starts with; the rest is the installation's UUID.
pub const INSTALLATION_ARI_PREFIX: &str = "ari:cloud:ecosystem::installation/";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const FIT_LEEWAY_SECONDS: i64 = 30;
/// Longest FIT accepted (a real one, with its installation contexts, is a few KiB).
pub const MAX_FIT_LEN: usize = 16 * 1024;
/// Longest `kid` accepted.
const MAX_KID_LEN: usize = 200;

/// A UUID in its plain hyphenated form (braced and URN forms are not ids Atlassian sends).
fn uuid_of(raw: &str, what: &str) -> Result<uuid::Uuid, ParseError> {
    let invalid = || ParseError(format!("{what} is not a UUID or an ARI ending in one"));
    if raw.len() != 36 {
        return Err(invalid());
    }
    uuid::Uuid::parse_str(raw).map_err(|_| invalid())
}

/// The app's ARI, `ari:cloud:ecosystem::app/<uuid>`: the `aud` of every FIT. Parsed from the
/// ARI or the bare UUID (the prefix is added).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppAri(String);

impl AppAri {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let raw = raw.trim();
        let id = uuid_of(
            raw.strip_prefix(APP_ARI_PREFIX).unwrap_or(raw),
            "the app id",
        )?;
        Ok(Self(format!("{APP_ARI_PREFIX}{}", id.hyphenated())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppAri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Forge installation, from its ARI (`ari:cloud:ecosystem::installation/<uuid>`, as FITs and
/// the Connect `installed` body carry it) or the bare UUID (as some events do): both forms of
/// one installation are equal. Shown as the ARI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstallationId(uuid::Uuid);

impl InstallationId {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let raw = raw.trim();
        uuid_of(
            raw.strip_prefix(INSTALLATION_ARI_PREFIX).unwrap_or(raw),
            "installationId",
        )
        .map(Self)
    }

    pub fn uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl fmt::Display for InstallationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{INSTALLATION_ARI_PREFIX}{}", self.0.hyphenated())
    }
}

/// Each way a FIT can fail, with the message the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    #[error("no Forge Invocation Token: send Authorization: Bearer <token>")]
    MissingBearer,
    #[error("the Forge Invocation Token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the Forge Invocation Token's alg {0:?} is not accepted; only RS256 is")]
    WrongAlgorithm(String),
    #[error("the Forge Invocation Token has no kid header")]
    MissingKid,
    #[error("the Forge Invocation Token's kid is not in Forge's key set")]
    UnknownKid,
    #[error("the Forge Invocation Token's signature does not verify")]
    BadSignature,
    #[error("the Forge Invocation Token's iss is not \"forge/invocation-token\"")]
    WrongIssuer,
    #[error("the Forge Invocation Token's aud does not name this app's ARI")]
    WrongAudience,
    #[error("the Forge Invocation Token has no {0} claim")]
    MissingClaim(&'static str),
    #[error("the Forge Invocation Token has expired")]
    Expired,
    #[error("the Forge Invocation Token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("the Forge Invocation Token's iat is in the future")]
    IssuedInFuture,
    #[error("the Forge Invocation Token's exp is before its iat")]
    ExpiresBeforeIssued,
    #[error("the Forge Invocation Token's {claim} is invalid: {message}")]
    InvalidClaim {
        claim: &'static str,
        message: String,
    },
}

/// The token of an `Authorization` header value when its scheme is `Bearer` (any case):
/// `None` for another scheme (a Connect `JWT` one), an error for `Bearer` with no token.
pub fn bearer_token(value: &[u8]) -> Option<Result<&str, FitError>> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let token = rest.trim();
    Some(if token.is_empty() {
        Err(FitError::MissingBearer)
    } else {
        Ok(token)
    })
}

/// The claims of a FIT as sent. Unknown claims are ignored; serialised by devtenant's signer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The user's accountId, on calls a user made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<FitApp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<FitContext>,
}

/// The `app` claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitApp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<FitEnvironment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<FitModule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<FitInstallation>,
    /// As sent (`isActive`, ...): its fields are Atlassian's to extend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitEnvironment {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitModule {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitInstallation {
    #[serde(default)]
    pub contexts: Vec<FitInstallationContext>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitInstallationContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_id: Option<String>,
}

/// The `context` claim of UI calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_url: Option<String>,
}

#[derive(Deserialize)]
struct FitHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A FIT split and decoded; nothing in it is trusted yet.
#[derive(Debug)]
pub struct ForgeToken<'a> {
    raw: &'a str,
    signing_input_len: usize,
    alg: String,
    kid: Option<String>,
    claims: FitClaims,
}

impl<'a> ForgeToken<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, FitError> {
        if raw.len() > MAX_FIT_LEN {
            return Err(FitError::Malformed("longer than 16 KiB"));
        }
        let mut parts = raw.splitn(4, '.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(FitError::Malformed("expected three dot-separated parts"));
        };
        let header: FitHeader = decode(header).ok_or(FitError::Malformed(
            "the header is not base64url JSON with alg",
        ))?;
        let claims: FitClaims = decode(claims).ok_or(FitError::Malformed(
            "the claims are not base64url JSON of the expected types",
        ))?;
        Ok(Self {
            raw,
            signing_input_len: raw.len() - signature.len() - 1,
            alg: header.alg,
            kid: header.kid,
            claims,
        })
    }

    /// The `kid` to look up in Forge's key set, once the `alg` is RS256: `none`, HS256 (a
    /// public key used as an HMAC secret) and every other algorithm end here, before any key
    /// is looked up.
    pub fn key_id(&self) -> Result<&str, FitError> {
        if self.alg != "RS256" {
            return Err(FitError::WrongAlgorithm(self.alg.clone()));
        }
        let kid = self.kid.as_deref().ok_or(FitError::MissingKid)?;
        if kid.is_empty() || kid.len() > MAX_KID_LEN || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FitError::Malformed("the kid is not a short printable name"));
        }
        Ok(kid)
    }

    /// The RS256 signature by `key` (the key named by [`key_id`](Self::key_id)).
    pub fn verify(self, key: &RsaVerifyingKey) -> Result<SignedFit, FitError> {
        self.key_id()?;
        if key.verify_compact(self.raw, self.signing_input_len) {
            Ok(SignedFit {
                claims: self.claims,
            })
        } else {
            Err(FitError::BadSignature)
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A FIT whose signature verified; its claims are not checked yet.
#[derive(Debug)]
pub struct SignedFit {
    claims: FitClaims,
}

/// What a verified FIT says, parsed once. Every value comes from the token, never from the
/// body or a header of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedFit {
    pub installation_id: InstallationId,
    /// `app.apiBaseUrl`: where product API calls for this installation go.
    pub api_base_url: BaseUrl,
    /// `app.installation.contexts[].cloudId`, else `context.cloudId`.
    pub cloud_id: Option<String>,
    /// `context.siteUrl` (UI calls).
    pub site_url: Option<BaseUrl>,
    /// `principal`: the user's accountId (UI calls).
    pub account_id: Option<String>,
    pub module_key: Option<String>,
    pub module_type: Option<String>,
    pub environment_type: Option<String>,
    pub environment_id: Option<String>,
    pub app_version: Option<String>,
    pub license: Option<serde_json::Value>,
    pub jti: String,
    pub expires_at: i64,
}

impl VerifiedFit {
    /// The product of `apiBaseUrl` (`.../ex/jira/<cloudId>` -> `jira`), when it has that form.
    pub fn product(&self) -> Option<&str> {
        let mut segments = self.api_base_url.path().split('/').skip(1);
        match (segments.next(), segments.next()) {
            (Some("ex"), Some(product)) if !product.is_empty() => Some(product),
            _ => None,
        }
    }
}

impl SignedFit {
    /// Issuer, audience, times (with [`FIT_LEEWAY_SECONDS`]), `jti`, and the installation
    /// claims every handler relies on.
    pub fn check(self, app: &AppAri, now: i64) -> Result<VerifiedFit, FitError> {
        let c = self.claims;
        if c.iss.as_deref() != Some(FIT_ISSUER) {
            return Err(match c.iss {
                None => FitError::MissingClaim("iss"),
                Some(_) => FitError::WrongIssuer,
            });
        }
        let aud = c.aud.as_ref().ok_or(FitError::MissingClaim("aud"))?;
        let names_app = match aud {
            Audience::One(a) => a == app.as_str(),
            Audience::Many(all) => all.iter().any(|a| a == app.as_str()),
        };
        if !names_app {
            return Err(FitError::WrongAudience);
        }
        let exp = c.exp.ok_or(FitError::MissingClaim("exp"))?;
        let nbf = c.nbf.ok_or(FitError::MissingClaim("nbf"))?;
        let iat = c.iat.ok_or(FitError::MissingClaim("iat"))?;
        // Saturating: the claims are anyone's numbers, `i64::MAX` included.
        if exp.saturating_add(FIT_LEEWAY_SECONDS) < now {
            return Err(FitError::Expired);
        }
        if nbf > now.saturating_add(FIT_LEEWAY_SECONDS) {
            return Err(FitError::NotYetValid);
        }
        if iat > now.saturating_add(FIT_LEEWAY_SECONDS) {
            return Err(FitError::IssuedInFuture);
        }
        if exp < iat {
            return Err(FitError::ExpiresBeforeIssued);
        }
        let jti = c
            .jti
            .filter(|j| !j.trim().is_empty())
            .ok_or(FitError::MissingClaim("jti"))?;
        let app_claim = c.app.unwrap_or_default();
        let installation_id = app_claim
            .installation_id
            .as_deref()
            .ok_or(FitError::MissingClaim("app.installationId"))?;
        let installation_id =
            InstallationId::parse(installation_id).map_err(|e| FitError::InvalidClaim {
                claim: "app.installationId",
                message: e.0,
            })?;
        let api_base_url = app_claim
            .api_base_url
            .as_deref()
            .ok_or(FitError::MissingClaim("app.apiBaseUrl"))?;
        let api_base_url = BaseUrl::parse(api_base_url).map_err(|e| FitError::InvalidClaim {
            claim: "app.apiBaseUrl",
            message: e.0,
        })?;
        let context = c.context.unwrap_or_default();
        let cloud_id = app_claim
            .installation
            .iter()
            .flat_map(|i| i.contexts.iter())
            .find_map(|c| c.cloud_id.clone())
            .or(context.cloud_id);
        if let Some(id) = &cloud_id {
            if id.is_empty()
                || id.len() > 100
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(FitError::InvalidClaim {
                    claim: "cloudId",
                    message: "not an id of letters, digits and hyphens".into(),
                });
            }
        }
        let site_url = context
            .site_url
            .as_deref()
            .map(BaseUrl::parse)
            .transpose()
            .map_err(|e| FitError::InvalidClaim {
                claim: "context.siteUrl",
                message: e.0,
            })?;
        let (environment_type, environment_id) = app_claim
            .environment
            .map_or((None, None), |e| (e.kind, e.id));
        let (module_type, module_key) = app_claim.module.map_or((None, None), |m| (m.kind, m.key));
        Ok(VerifiedFit {
            installation_id,
            api_base_url,
            cloud_id,
            site_url,
            account_id: c.principal,
            module_key,
            module_type,
            environment_type,
            environment_id,
            app_version: app_claim.app_version,
            license: app_claim.license,
            jti,
            expires_at: exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "ari:cloud:ecosystem::app/5f1c1b2e-0c1d-4a51-9a2b-3c4d5e6f7a8b";

    #[test]
    fn app_ari_takes_the_ari_or_the_bare_uuid() {
        let bare = AppAri::parse("5F1C1B2E-0C1D-4A51-9A2B-3C4D5E6F7A8B").unwrap();
        assert_eq!(bare.as_str(), APP);
        assert_eq!(AppAri::parse(APP).unwrap(), bare);
        for bad in [
            "",
            "my-app",
            "ari:cloud:ecosystem::app/",
            "ari:cloud:ecosystem::installation/5f1c1b2e-0c1d-4a51-9a2b-3c4d5e6f7a8b",
            "{5f1c1b2e-0c1d-4a51-9a2b-3c4d5e6f7a8b}",
        ] {
            assert!(AppAri::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn installation_ids_in_either_form_are_one_id() {
        let uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
        let ari = InstallationId::parse(&format!("{INSTALLATION_ARI_PREFIX}{uuid}")).unwrap();
        assert_eq!(InstallationId::parse(uuid).unwrap(), ari);
        assert_eq!(ari.to_string(), format!("{INSTALLATION_ARI_PREFIX}{uuid}"));
        assert!(InstallationId::parse("ari:cloud:ecosystem::app/x").is_err());
        assert!(InstallationId::parse(&format!("{APP_ARI_PREFIX}{uuid}")).is_err());
    }

    #[test]
    fn only_the_bearer_scheme_is_a_fit() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(Ok("abc")));
        assert_eq!(bearer_token(b"bearer  abc "), Some(Ok("abc")));
        assert_eq!(bearer_token(b"Bearer "), Some(Err(FitError::MissingBearer)));
        assert_eq!(bearer_token(b"Bearer"), Some(Err(FitError::MissingBearer)));
        assert_eq!(bearer_token(b"JWT abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"\xff"), None);
    }

    fn claims(now: i64) -> FitClaims {
        FitClaims {
            iss: Some(FIT_ISSUER.into()),
            aud: Some(Audience::One(APP.into())),
            iat: Some(now),
            nbf: Some(now),
            exp: Some(now + 60),
            jti: Some("j-1".into()),
            principal: Some("557058:abc".into()),
            app: Some(FitApp {
                installation_id: Some("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d".into()),
                api_base_url: Some("https://api.atlassian.com/ex/jira/c-1".into()),
                installation: Some(FitInstallation {
                    contexts: vec![FitInstallationContext {
                        cloud_id: Some("c-1".into()),
                    }],
                }),
                ..FitApp::default()
            }),
            context: None,
        }
    }

    fn check(claims: FitClaims, now: i64) -> Result<VerifiedFit, FitError> {
        SignedFit { claims }.check(&AppAri::parse(APP).unwrap(), now)
    }

    #[test]
    fn claims_rules_each_refuse_with_their_own_error() {
        let now = 1_800_000_000;
        let fit = check(claims(now), now).unwrap();
        assert_eq!(fit.cloud_id.as_deref(), Some("c-1"));
        assert_eq!(fit.product(), Some("jira"));
        assert_eq!(fit.account_id.as_deref(), Some("557058:abc"));

        let with = |f: &dyn Fn(&mut FitClaims)| {
            let mut c = claims(now);
            f(&mut c);
            check(c, now).unwrap_err()
        };
        assert_eq!(with(&|c| c.iss = Some("x".into())), FitError::WrongIssuer);
        assert_eq!(with(&|c| c.iss = None), FitError::MissingClaim("iss"));
        assert_eq!(
            with(&|c| c.aud = Some(Audience::One("ari:cloud:ecosystem::app/other".into()))),
            FitError::WrongAudience
        );
        assert_eq!(with(&|c| c.exp = Some(now - 31)), FitError::Expired);
        assert_eq!(with(&|c| c.nbf = Some(now + 31)), FitError::NotYetValid);
        assert_eq!(with(&|c| c.iat = Some(now + 31)), FitError::IssuedInFuture);
        assert_eq!(with(&|c| c.exp = Some(i64::MIN)), FitError::Expired);
        assert_eq!(with(&|c| c.nbf = None), FitError::MissingClaim("nbf"));
        assert_eq!(with(&|c| c.jti = None), FitError::MissingClaim("jti"));
        assert_eq!(
            with(&|c| c.app.as_mut().unwrap().installation_id = None),
            FitError::MissingClaim("app.installationId")
        );
        // Within the leeway: still good.
        let mut late = claims(now);
        late.exp = Some(now - 30);
        late.iat = Some(now - 90);
        late.nbf = Some(now - 90);
        assert!(check(late, now).is_ok());
    }

    #[test]
    fn a_wrong_alg_is_refused_before_the_kid_is_read() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","kid":"k"}"#);
        let body = URL_SAFE_NO_PAD.encode(b"{}");
        let raw = format!("{header}.{body}.sig");
        let token = ForgeToken::parse(&raw).unwrap();
        assert_eq!(
            token.key_id(),
            Err(FitError::WrongAlgorithm("HS256".into()))
        );
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        let raw = format!("{header}.{body}.sig");
        assert_eq!(
            ForgeToken::parse(&raw).unwrap().key_id(),
            Err(FitError::MissingKid)
        );
    }
}
