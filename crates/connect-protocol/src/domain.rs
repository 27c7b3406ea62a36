//! Newtypes built once at the edge. Every `parse` rejects bad input with a message that names
//! what was wrong; code that holds one of these types never re-checks it.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

/// Why a value from outside was refused. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn invalid(msg: impl Into<String>) -> ParseError {
    ParseError(msg.into())
}

/// The host's identity (`clientKey`). It becomes part of Redis keys, so the character set is
/// closed: no braces (hash tags), no whitespace, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientKey(String);

impl ClientKey {
    pub const MAX_LEN: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        if raw.is_empty() {
            return Err(invalid("clientKey is empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(invalid(format!(
                "clientKey is longer than {} characters",
                Self::MAX_LEN
            )));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(invalid(format!(
                "clientKey contains the character {bad:?}; only letters, digits and - _ . : are allowed"
            )));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClientKey {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ClientKey> for String {
    fn from(value: ClientKey) -> Self {
        value.0
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute `http(s)` URL without query, fragment or credentials, kept without a trailing
/// `/` so that `https://x/wiki` and `https://x/wiki/` compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BaseUrl(String);

impl BaseUrl {
    /// The limit of every text field of a lifecycle body applies to `baseUrl` too: it is
    /// stored, cached and indexed, and a message naming it must stay readable.
    pub const MAX_LEN: usize = crate::lifecycle::MAX_FIELD_CHARS;

    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        // Before anything echoes `raw` into a message. Counted again once normalised, as
        // percent-encoding lengthens.
        Self::check_len(raw)?;
        let url = Url::parse(raw.trim())
            .map_err(|e| invalid(format!("baseUrl {raw:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("baseUrl {raw:?} must use http or https")));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(format!("baseUrl {raw:?} has no host")));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(format!(
                "baseUrl {raw:?} must not carry credentials"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(format!(
                "baseUrl {raw:?} must not have a query or fragment"
            )));
        }
        let text = url.as_str().trim_end_matches('/').to_owned();
        Self::check_len(&text)?;
        Ok(Self(text))
    }

    fn check_len(text: &str) -> Result<(), ParseError> {
        if text.chars().count() > Self::MAX_LEN {
            return Err(invalid(format!(
                "baseUrl is longer than {} characters",
                Self::MAX_LEN
            )));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Lower-case host name, without port.
    pub fn host(&self) -> String {
        Url::parse(&self.0)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default()
    }

    /// The path part without trailing `/`: empty for `https://x`, `/wiki` for `https://x/wiki`.
    pub fn path(&self) -> &str {
        let after_scheme = self.0.find("://").map(|i| i + 3).unwrap_or(0);
        match self.0[after_scheme..].find('/') {
            Some(i) => &self.0[after_scheme + i..],
            None => "",
        }
    }

    /// Scheme and authority, e.g. `https://acme.atlassian.net`.
    pub fn origin(&self) -> &str {
        let path = self.path();
        &self.0[..self.0.len() - path.len()]
    }

    /// Joins a path relative to this base URL (`/rest/api` -> `https://x/wiki/rest/api`).
    pub fn join(&self, path_and_query: &str) -> String {
        if path_and_query.starts_with('/') {
            format!("{}{}", self.0, path_and_query)
        } else {
            format!("{}/{}", self.0, path_and_query)
        }
    }
}

impl TryFrom<String> for BaseUrl {
    type Error = ParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<BaseUrl> for String {
    fn from(value: BaseUrl) -> Self {
        value.0
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `kid` of an install token. Only a UUID is accepted, so it can be put into a URL
/// without being able to steer the request anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(uuid::Uuid);

impl KeyId {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        // `Uuid::parse_str` also takes braced and URN forms; only the plain hyphenated one is real.
        if raw.len() != 36 {
            return Err(invalid("kid is not a UUID"));
        }
        uuid::Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| invalid("kid is not a UUID"))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

/// An installation's shared secret. `Debug` prints `[REDACTED]`; the value leaves only through
/// [`SharedSecret::expose`], for signing and verifying.
#[derive(Clone)]
pub struct SharedSecret(SecretString);

impl SharedSecret {
    pub const MAX_LEN: usize = 512;

    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        if raw.is_empty() {
            return Err(invalid("sharedSecret is empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(invalid(format!(
                "sharedSecret is longer than {} bytes",
                Self::MAX_LEN
            )));
        }
        Ok(Self(SecretString::from(raw.to_owned())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Constant-time equality, so comparing secrets leaks no timing.
    pub fn same_as(&self, other: &SharedSecret) -> bool {
        let (a, b) = (self.expose().as_bytes(), other.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret([REDACTED])")
    }
}

/// A host-name pattern from `WARDEN_PRODUCT_HOSTS`: `*.atlassian.net` matches any sub-domain
/// (at any depth) but not `atlassian.net` itself; a pattern without `*` matches exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern(String);

impl HostPattern {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let p = raw.trim().to_ascii_lowercase();
        if p.is_empty() {
            return Err(invalid("empty host pattern"));
        }
        let rest = p.strip_prefix("*.").unwrap_or(&p);
        if rest.is_empty()
            || rest
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(invalid(format!(
                "host pattern {raw:?} must be a host name, optionally starting with \"*.\""
            )));
        }
        Ok(Self(p))
    }

    pub fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match self.0.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == self.0,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_rejects_hash_tags_and_whitespace() {
        assert!(ClientKey::parse("jira:abc-123_x.y").is_ok());
        assert!(ClientKey::parse("").is_err());
        assert!(ClientKey::parse("a{b}").is_err());
        assert!(ClientKey::parse("a b").is_err());
        assert!(ClientKey::parse(&"x".repeat(201)).is_err());
    }

    #[test]
    fn base_url_normalises_trailing_slash_and_splits_path() {
        let u = BaseUrl::parse("https://acme.atlassian.net/wiki/").unwrap();
        assert_eq!(u.as_str(), "https://acme.atlassian.net/wiki");
        assert_eq!(u.path(), "/wiki");
        assert_eq!(u.origin(), "https://acme.atlassian.net");
        assert_eq!(u.host(), "acme.atlassian.net");
        assert_eq!(
            u.join("/rest/x?a=1"),
            "https://acme.atlassian.net/wiki/rest/x?a=1"
        );
        let root = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(root.path(), "");
        assert_eq!(root.host(), "127.0.0.1");
    }

    #[test]
    fn base_url_rejects_non_http_credentials_and_queries() {
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("https://u:p@x").is_err());
        assert!(BaseUrl::parse("https://x/?a=1").is_err());
        assert!(BaseUrl::parse("not a url").is_err());
    }

    #[test]
    fn base_url_is_bounded_like_any_body_field() {
        let at_limit = format!(
            "https://x.atlassian.net/{}",
            "a".repeat(BaseUrl::MAX_LEN - 24)
        );
        assert_eq!(at_limit.len(), BaseUrl::MAX_LEN);
        assert!(BaseUrl::parse(&at_limit).is_ok());
        let err = BaseUrl::parse(&format!("{at_limit}b")).unwrap_err();
        assert_eq!(err.0, "baseUrl is longer than 2048 characters");
        // Percent-encoding lengthens: the stored form is bounded too.
        let encoded = format!("https://x.atlassian.net/{}", "\u{e9}".repeat(1000));
        assert!(encoded.chars().count() < BaseUrl::MAX_LEN);
        assert!(BaseUrl::parse(&encoded).is_err());
    }

    #[test]
    fn key_id_accepts_only_plain_uuids() {
        assert!(KeyId::parse("0b6c1d3e-2f4a-4b5c-8d9e-0f1a2b3c4d5e").is_ok());
        for bad in [
            "../../etc/passwd",
            "https://evil.example/key",
            "{0b6c1d3e-2f4a-4b5c-8d9e-0f1a2b3c4d5e}",
            "urn:uuid:0b6c1d3e-2f4a-4b5c-8d9e-0f1a2b3c4d5e",
            "0b6c1d3e2f4a4b5c8d9e0f1a2b3c4d5e",
            "",
        ] {
            assert!(KeyId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn shared_secret_debug_is_redacted() {
        let s = SharedSecret::parse("super-secret-value").unwrap();
        assert!(!format!("{s:?}").contains("super-secret-value"));
        assert!(s.same_as(&SharedSecret::parse("super-secret-value").unwrap()));
        assert!(!s.same_as(&SharedSecret::parse("other").unwrap()));
    }

    #[test]
    fn host_pattern_matches_subdomains_only() {
        let p = HostPattern::parse("*.atlassian.net").unwrap();
        assert!(p.matches("acme.atlassian.net"));
        assert!(p.matches("ACME.Atlassian.net"));
        assert!(!p.matches("atlassian.net"));
        assert!(!p.matches("evilatlassian.net"));
        assert!(!p.matches("acme.atlassian.net.evil.com"));
        let exact = HostPattern::parse("127.0.0.1").unwrap();
        assert!(exact.matches("127.0.0.1"));
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a/b").is_err());
    }
}
