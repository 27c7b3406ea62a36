//! Where a Connect token travels in a request: `Authorization: JWT <token>` or the `jwt` query
//! parameter. The one place that finds it, for every route that reads one.

use crate::qsh;

/// Why no single token could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    #[error("the Authorization header must be \"JWT <token>\"")]
    NotJwtScheme,
    #[error("no token: send Authorization: JWT <token> or ?jwt=<token>")]
    Missing,
    #[error("the query carries more than one jwt parameter; send the token once")]
    RepeatedQueryParameter,
    #[error("the token is given both in the Authorization header and as ?jwt=; send it once")]
    TwoPlaces,
}

impl AuthorizationError {
    /// Whether the request is malformed (sent the token ambiguously) rather than
    /// unauthenticated.
    pub fn is_malformed(self) -> bool {
        matches!(self, Self::RepeatedQueryParameter | Self::TwoPlaces)
    }
}

/// The token of an `Authorization` header value: `JWT <token>`, nothing else.
pub fn token_from_header(value: &[u8]) -> Result<&str, AuthorizationError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.strip_prefix("JWT "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthorizationError::NotJwtScheme)
}

/// The token of a request from its `Authorization` header (if any) or its raw query string.
/// Both at once, or two query parameters that decode to `jwt`, are refused: a second token
/// would ride along unchecked.
pub fn find_token<'a>(
    authorization: Option<&'a [u8]>,
    query: &'a str,
) -> Result<&'a str, AuthorizationError> {
    let header = authorization.map(token_from_header).transpose()?;
    // Every parameter the qsh leaves out as the token (decoded name `jwt`, so `j%77t` too).
    let mut in_query = qsh::query_pairs(query)
        .filter(|(name, _)| qsh::is_token_parameter(name))
        .map(|(_, value)| value);
    let from_query = in_query.next();
    if in_query.next().is_some() {
        return Err(AuthorizationError::RepeatedQueryParameter);
    }
    match (header, from_query) {
        (Some(_), Some(_)) => Err(AuthorizationError::TwoPlaces),
        (Some(t), None) | (None, Some(t)) if !t.is_empty() => Ok(t),
        _ => Err(AuthorizationError::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_or_query_but_not_both() {
        assert_eq!(find_token(Some(b"JWT abc"), ""), Ok("abc"));
        assert_eq!(find_token(None, "a=1&jwt=abc"), Ok("abc"));
        assert_eq!(
            find_token(Some(b"JWT abc"), "jwt=abc"),
            Err(AuthorizationError::TwoPlaces)
        );
        assert_eq!(find_token(None, "x=1"), Err(AuthorizationError::Missing));
        assert_eq!(find_token(None, "jwt="), Err(AuthorizationError::Missing));
    }

    #[test]
    fn a_hidden_second_token_parameter_is_refused() {
        assert_eq!(
            find_token(None, "jwt=a&j%77t=b"),
            Err(AuthorizationError::RepeatedQueryParameter)
        );
    }

    #[test]
    fn only_the_jwt_scheme_is_accepted() {
        for header in [&b"Bearer abc"[..], b"JWT ", b"jwt abc", b"\xff"] {
            assert_eq!(
                token_from_header(header),
                Err(AuthorizationError::NotJwtScheme)
            );
        }
    }
}
