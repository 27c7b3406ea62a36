//! The JWT rules of Connect: how a token is split, which claims it must carry, how the clock,
//! the audience and the `qsh` are checked, and how `warden` signs its own tokens.
//!
//! Tokens are parsed once ([`Token::parse`]); the signature is checked against whichever key
//! the caller selects, so the claims are never decoded twice on the hot path.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{BaseUrl, SharedSecret};
use crate::qsh::{CanonicalRequest, CONTEXT_QSH};

/// Clock skew tolerated on `exp` and `iat`.
pub const LEEWAY_SECONDS: i64 = 30;

/// Longest token accepted; real Connect tokens are well under 2 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Each way a token can fail, with the message the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the token's alg {found:?} is not accepted here; expected {expected}")]
    WrongAlgorithm {
        found: String,
        expected: &'static str,
    },
    #[error("the install token has no kid header")]
    MissingKid,
    #[error("the install token's kid is not a UUID")]
    InvalidKid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has no {0} claim")]
    MissingClaim(&'static str),
    #[error("the token has expired")]
    Expired,
    #[error("the token's iat is in the future")]
    IssuedInFuture,
    #[error("the token's exp is before its iat")]
    ExpiresBeforeIssued,
    #[error("the token's aud does not name this app's base URL")]
    WrongAudience,
    /// `canonical` is [`CanonicalRequest::without_query_values`]: query values never reach a
    /// message or a log.
    #[error(
        "the token's qsh does not match this request (expected canonical request {canonical:?}, query values hidden)"
    )]
    QshMismatch { canonical: String },
    #[error("a context token (qsh \"context-qsh\") is not accepted on this route")]
    ContextTokenNotAllowed,
}

/// `aud` is a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            Audience::One(a) => (Some(a.as_str()), &[][..]),
            Audience::Many(v) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().map(String::as_str))
    }
}

/// The claims Connect tokens carry. Unknown claims are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qsh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug)]
pub struct Token<'a> {
    raw: &'a str,
    signing_input_len: usize,
    alg: String,
    kid: Option<String>,
    claims: Claims,
}

impl<'a> Token<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, JwtError> {
        if raw.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed("longer than 8 KiB"));
        }
        let mut parts = raw.splitn(4, '.');
        let (Some(header), Some(payload), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("expected three dot-separated parts"));
        };
        let header: RawHeader = decode_part(header, "header")?;
        let claims: Claims = decode_part(payload, "claims")?;
        Ok(Self {
            raw,
            signing_input_len: raw.len() - raw.rsplit('.').next().map_or(0, str::len) - 1,
            alg: header.alg,
            kid: header.kid,
            claims,
        })
    }

    pub fn alg(&self) -> &str {
        &self.alg
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Claims as sent; trust them only after a `verify_*` call succeeded.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn into_claims(self) -> Claims {
        self.claims
    }

    /// SHA-256 of the whole token: how replays are recognised without storing the token.
    pub fn digest(&self) -> [u8; 32] {
        token_digest(self.raw)
    }

    pub fn require_alg(&self, name: &'static str) -> Result<(), JwtError> {
        if self.alg == name {
            Ok(())
        } else {
            Err(JwtError::WrongAlgorithm {
                found: self.alg.clone(),
                expected: name,
            })
        }
    }

    /// HMAC-SHA256 with a shared secret. The header must say HS256. Computed here rather than
    /// through `jsonwebtoken`, which would copy the secret into a key, box a verifier and
    /// decode the signature into a `Vec` for every product request; the comparison is
    /// constant-time all the same.
    pub fn verify_hs256(&self, secret: &SharedSecret) -> Result<(), JwtError> {
        self.require_alg("HS256")?;
        let (input, sig) = (
            &self.raw[..self.signing_input_len],
            &self.raw[self.signing_input_len + 1..],
        );
        // 32 bytes are 43 base64url characters; a little slack for the decoder's size estimate.
        let mut decoded = [0u8; 36];
        let len = match URL_SAFE_NO_PAD.decode_slice(sig, &mut decoded) {
            Ok(len) => len,
            Err(_) => return Err(JwtError::BadSignature),
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(input.as_bytes());
        mac.verify_slice(&decoded[..len])
            .map_err(|_| JwtError::BadSignature)
    }

    /// RS256 with a public key from the install-key server. The header must say RS256.
    pub fn verify_rs256(&self, key: &RsaVerifyingKey) -> Result<(), JwtError> {
        self.require_alg("RS256")?;
        if key.verify_compact(self.raw, self.signing_input_len) {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

/// An RSA public key ready to verify RS256 signatures, parsed once from its PEM (SPKI
/// `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`). Verification uses `ring`, several times faster
/// than a pure-Rust big-number backend; only keys of 2048 to 8192 bits verify.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaVerifyingKey {
    pkcs1_der: Vec<u8>,
}

impl RsaVerifyingKey {
    /// Refuses anything but an RSA public key in PEM (a private key too).
    pub fn from_pem(pem: &str) -> Result<Self, NotAnRsaPublicKey> {
        use rsa::pkcs1::{DecodeRsaPublicKey as _, EncodeRsaPublicKey as _};
        use rsa::pkcs8::DecodePublicKey as _;

        let pem = pem.trim();
        let key = rsa::RsaPublicKey::from_public_key_pem(pem)
            .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
            .map_err(|_| NotAnRsaPublicKey)?;
        let der = key.to_pkcs1_der().map_err(|_| NotAnRsaPublicKey)?;
        Ok(Self {
            pkcs1_der: der.as_bytes().to_vec(),
        })
    }
}

impl RsaVerifyingKey {
    /// A key from its JWK components: the big-endian modulus `n` and exponent `e` (already
    /// base64url-decoded). Refuses what is not an RSA public key of 2048 to 8192 bits.
    pub fn from_components(n: &[u8], e: &[u8]) -> Result<Self, NotAnRsaPublicKey> {
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        use rsa::traits::PublicKeyParts as _;

        let key = rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
        )
        .map_err(|_| NotAnRsaPublicKey)?;
        if !(2048..=8192).contains(&key.n().bits()) {
            return Err(NotAnRsaPublicKey);
        }
        let der = key.to_pkcs1_der().map_err(|_| NotAnRsaPublicKey)?;
        Ok(Self {
            pkcs1_der: der.as_bytes().to_vec(),
        })
    }

    /// Whether `raw` (a compact JWS whose signing input is its first `signing_input_len`
    /// bytes) carries a valid RS256 signature by this key. The caller checked the `alg`.
    pub(crate) fn verify_compact(&self, raw: &str, signing_input_len: usize) -> bool {
        let (input, sig) = (&raw[..signing_input_len], &raw[signing_input_len + 1..]);
        // A 2048-bit signature is 342 base64url characters; 4096 bits at most are accepted.
        let mut decoded = [0u8; 520];
        let Ok(len) = URL_SAFE_NO_PAD.decode_slice(sig, &mut decoded) else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &self.pkcs1_der,
        )
        .verify(input.as_bytes(), &decoded[..len])
        .is_ok()
    }
}

impl std::fmt::Debug for RsaVerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaVerifyingKey")
            .field("der_bytes", &self.pkcs1_der.len())
            .finish()
    }
}

/// The text is not an RSA public key in PEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an RSA public key in PEM")]
pub struct NotAnRsaPublicKey;

fn decode_part<T: serde::de::DeserializeOwned>(
    part: &str,
    what: &'static str,
) -> Result<T, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| {
            JwtError::Malformed(if what == "header" {
                "header is not base64url"
            } else {
                "claims are not base64url"
            })
        })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        JwtError::Malformed(if what == "header" {
            "header is not a JSON object with alg"
        } else {
            "claims are not a JSON object of the expected types"
        })
    })
}

impl Claims {
    /// `exp` and `iat` present, `exp` not passed and `iat` not in the future (with leeway).
    /// Returns `(iat, exp)`.
    pub fn check_times(&self, now: i64) -> Result<(i64, i64), JwtError> {
        let exp = self.exp.ok_or(JwtError::MissingClaim("exp"))?;
        let iat = self.iat.ok_or(JwtError::MissingClaim("iat"))?;
        // Saturating: the claims are anyone's numbers, `i64::MAX` included (an overflow
        // panicked in debug builds and wrapped to "expired" in release ones).
        if exp.saturating_add(LEEWAY_SECONDS) < now {
            return Err(JwtError::Expired);
        }
        if iat > now.saturating_add(LEEWAY_SECONDS) {
            return Err(JwtError::IssuedInFuture);
        }
        if exp < iat {
            return Err(JwtError::ExpiresBeforeIssued);
        }
        Ok((iat, exp))
    }

    /// `aud` names one of `accepted`; a trailing `/` is insignificant on either side.
    pub fn check_audience(&self, accepted: &[BaseUrl]) -> Result<(), JwtError> {
        let aud = self.aud.as_ref().ok_or(JwtError::MissingClaim("aud"))?;
        let hit = aud.iter().any(|claimed| {
            let claimed = claimed.trim_end_matches('/');
            accepted.iter().any(|b| b.as_str() == claimed)
        });
        if hit {
            Ok(())
        } else {
            Err(JwtError::WrongAudience)
        }
    }

    /// `qsh` present and equal to the hash of `request`. Context tokens pass only where allowed.
    pub fn check_qsh(
        &self,
        request: &CanonicalRequest,
        allow_context: bool,
    ) -> Result<(), JwtError> {
        let claimed = self.qsh.as_deref().ok_or(JwtError::MissingClaim("qsh"))?;
        if claimed == CONTEXT_QSH {
            return if allow_context {
                Ok(())
            } else {
                Err(JwtError::ContextTokenNotAllowed)
            };
        }
        if request.matches(claimed) {
            Ok(())
        } else {
            Err(JwtError::QshMismatch {
                canonical: request.without_query_values(),
            })
        }
    }

    pub fn is_context_token(&self) -> bool {
        self.qsh.as_deref() == Some(CONTEXT_QSH)
    }
}

/// Signs claims with HS256 and a shared secret (calls to the host, tests, `devtenant`).
pub fn sign_hs256<C: Serialize>(claims: &C, secret: &SharedSecret) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 signing of serializable claims cannot fail")
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// [`Token::digest`] of the token `raw`, without parsing it: a store may look its replay
/// memory up before the token is checked.
pub fn token_digest(raw: &str) -> [u8; 32] {
    Sha256::digest(raw.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SharedSecret {
        SharedSecret::parse(s).unwrap()
    }

    #[test]
    fn hs256_round_trip_and_wrong_secret() {
        let claims = Claims {
            iss: Some("ck".into()),
            iat: Some(10),
            exp: Some(20),
            ..Default::default()
        };
        let token = sign_hs256(&claims, &secret("s1"));
        let parsed = Token::parse(&token).unwrap();
        assert_eq!(parsed.claims().iss.as_deref(), Some("ck"));
        assert!(parsed.verify_hs256(&secret("s1")).is_ok());
        assert_eq!(
            parsed.verify_hs256(&secret("s2")),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn alg_none_and_tampered_tokens_are_refused() {
        let token = sign_hs256(
            &Claims {
                iss: Some("a".into()),
                ..Default::default()
            },
            &secret("s"),
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        parts[0] = &none_header;
        let unsigned = format!("{}.{}.", parts[0], parts[1]);
        let parsed = Token::parse(&unsigned).unwrap();
        assert!(matches!(
            parsed.verify_hs256(&secret("s")),
            Err(JwtError::WrongAlgorithm { .. })
        ));
        assert_eq!(
            parsed.require_alg("HS256").unwrap_err().to_string(),
            r#"the token's alg "none" is not accepted here; expected HS256"#
        );

        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"iss":"b"}"#);
        let tampered = format!(
            "{}.{}.{}",
            token.split('.').next().unwrap(),
            forged_claims,
            token.rsplit('.').next().unwrap()
        );
        assert_eq!(
            Token::parse(&tampered).unwrap().verify_hs256(&secret("s")),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn signatures_of_the_wrong_size_or_encoding_are_refused() {
        let token = sign_hs256(
            &Claims {
                iss: Some("a".into()),
                ..Default::default()
            },
            &secret("s"),
        );
        let (input, sig) = token.rsplit_once('.').unwrap();
        for bad in [
            &sig[..42],
            &sig[..40],
            "",
            &format!("{sig}A"),
            &format!("{sig}="),
            &sig.replace('-', "+"),
        ] {
            if bad == sig {
                continue;
            }
            let forged = format!("{input}.{bad}");
            assert_eq!(
                Token::parse(&forged).unwrap().verify_hs256(&secret("s")),
                Err(JwtError::BadSignature),
                "{bad:?}"
            );
        }
        // The last character carries 2 unused bits: setting them is another encoding, refused.
        let last = sig.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.iter().position(|&c| c == last).unwrap();
        let sloppy = format!("{input}.{}{}", &sig[..42], alphabet[index | 1] as char);
        if index & 1 == 0 {
            assert_eq!(
                Token::parse(&sloppy).unwrap().verify_hs256(&secret("s")),
                Err(JwtError::BadSignature)
            );
        }
    }

    #[test]
    fn malformed_tokens_name_the_problem() {
        assert!(matches!(Token::parse("abc"), Err(JwtError::Malformed(_))));
        assert!(matches!(
            Token::parse("a.b.c.d"),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            Token::parse("!!.!!.!!"),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            Token::parse(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn time_rules() {
        let c = |iat, exp| Claims {
            iat,
            exp,
            ..Default::default()
        };
        assert_eq!(c(Some(100), Some(200)).check_times(150), Ok((100, 200)));
        assert_eq!(
            c(None, Some(200)).check_times(150),
            Err(JwtError::MissingClaim("iat"))
        );
        assert_eq!(
            c(Some(100), None).check_times(150),
            Err(JwtError::MissingClaim("exp"))
        );
        assert_eq!(
            c(Some(100), Some(200)).check_times(231),
            Err(JwtError::Expired)
        );
        assert!(c(Some(100), Some(200)).check_times(229).is_ok());
        assert_eq!(
            c(Some(200), Some(300)).check_times(169),
            Err(JwtError::IssuedInFuture)
        );
        assert_eq!(
            c(Some(120), Some(100)).check_times(110),
            Err(JwtError::ExpiresBeforeIssued)
        );
    }

    #[test]
    fn audience_string_or_list_trailing_slash_insignificant() {
        let accepted = [BaseUrl::parse("https://app.example.com/base").unwrap()];
        let with = |aud| Claims {
            aud: Some(aud),
            ..Default::default()
        };
        assert!(with(Audience::One("https://app.example.com/base/".into()))
            .check_audience(&accepted)
            .is_ok());
        assert!(with(Audience::Many(vec![
            "x".into(),
            "https://app.example.com/base".into()
        ]))
        .check_audience(&accepted)
        .is_ok());
        assert_eq!(
            with(Audience::One("https://evil.example".into())).check_audience(&accepted),
            Err(JwtError::WrongAudience)
        );
        assert_eq!(
            Claims::default().check_audience(&accepted),
            Err(JwtError::MissingClaim("aud"))
        );
    }

    #[test]
    fn context_qsh_only_where_allowed() {
        let req = CanonicalRequest::new("GET", "/x", "", "");
        let ctx = Claims {
            qsh: Some(CONTEXT_QSH.into()),
            ..Default::default()
        };
        assert!(ctx.check_qsh(&req, true).is_ok());
        assert_eq!(
            ctx.check_qsh(&req, false),
            Err(JwtError::ContextTokenNotAllowed)
        );
        let good = Claims {
            qsh: Some(req.qsh()),
            ..Default::default()
        };
        assert!(good.check_qsh(&req, false).is_ok());
        let other = CanonicalRequest::new("GET", "/y", "", "");
        assert!(matches!(
            good.check_qsh(&other, false),
            Err(JwtError::QshMismatch { .. })
        ));
        assert_eq!(
            Claims::default().check_qsh(&req, true),
            Err(JwtError::MissingClaim("qsh"))
        );
    }

    #[test]
    fn an_attacker_alg_cannot_forge_log_lines() {
        // The header's alg is the attacker's: its message is logged and answered. Quoted and
        // escaped, it cannot end the line or pass for another field.
        let forged =
            "RS256\n2025-01-01T00:00:00Z  INFO warden: install accepted client_key=victim\u{1b}[2K";
        let header = URL_SAFE_NO_PAD.encode(serde_json::json!({ "alg": forged }).to_string());
        let claims = URL_SAFE_NO_PAD.encode(br#"{"iss":"a"}"#);
        let raw = format!("{header}.{claims}.sig");
        let token = Token::parse(&raw).unwrap();
        assert_eq!(token.alg(), forged);
        let message = token.require_alg("HS256").unwrap_err().to_string();
        assert!(!message.chars().any(char::is_control), "{message:?}");
        assert!(
            message.contains(r#"alg "RS256\n2025-01-01T00:00:00Z  INFO"#),
            "{message}"
        );
    }
}
