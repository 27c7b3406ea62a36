//! The query string hash: the one canonicalizer of the crate. Every `qsh` that `warden` checks
//! or produces (install tokens, product requests, calls to the host, `warden jwt canonical`)
//! comes from [`CanonicalRequest`].

use std::borrow::Cow;
use std::fmt::Write as _;

use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// The literal `qsh` carried by context tokens (`AP.context.getToken`).
pub const CONTEXT_QSH: &str = "context-qsh";

/// RFC 3986 unreserved characters stay; everything else is `%XX` (so space is `%20`, `*` is `%2A`).
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `METHOD&PATH&QUERY` as Atlassian defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRequest {
    text: String,
    /// Where QUERY starts in `text`: the method may hold a `&` (the CLI takes any), so the
    /// parts are not found again by splitting.
    query_start: usize,
}

impl CanonicalRequest {
    /// `path` is the request path as received (still percent-encoded), `query` the raw query
    /// string without `?`, and `base_path` the path of the receiver's base URL (`""` or `/app`),
    /// which is stripped first.
    pub fn new(method: &str, path: &str, query: &str, base_path: &str) -> Self {
        let mut out = String::with_capacity(method.len() + path.len() + query.len() + 2);
        out.extend(method.chars().map(|c| c.to_ascii_uppercase()));
        out.push('&');
        push_canonical_path(&mut out, path, base_path);
        out.push('&');
        let query_start = out.len();
        push_canonical_query(&mut out, query);
        Self {
            text: out,
            query_start,
        }
    }

    /// Splits a URL (absolute, or a path with optional query) and canonicalizes it relative to
    /// `base_path`.
    pub fn from_url(method: &str, url: &str, base_path: &str) -> Self {
        let without_fragment = url.split('#').next().unwrap_or("");
        let after_authority = match without_fragment.find("://") {
            Some(i) => {
                let rest = &without_fragment[i + 3..];
                match rest.find(['/', '?']) {
                    Some(j) => &rest[j..],
                    None => "",
                }
            }
            None => without_fragment,
        };
        let (path, query) = after_authority
            .split_once('?')
            .unwrap_or((after_authority, ""));
        Self::new(method, path, query, base_path)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The canonical request with every query value replaced by `…` (`GET&/p&id=…&q=…`):
    /// what error messages and logs may show. Query values can be anything the caller put in
    /// a URL (search terms, ids, tokens of other systems); method, path and parameter names
    /// are enough to see why a `qsh` did not match (docs/PROTOCOL.md §9).
    pub fn without_query_values(&self) -> String {
        let (head, query) = self.text.split_at(self.query_start);
        let mut out = String::with_capacity(self.text.len());
        out.push_str(head);
        // Encoded names hold neither `&` nor `=`, so the split is exact.
        for (i, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(pair.split_once('=').map_or(pair, |(name, _)| name));
            out.push_str("=…");
        }
        out
    }

    /// Lower-case hex SHA-256 of the canonical request.
    pub fn qsh(&self) -> String {
        let digest = Sha256::digest(self.text.as_bytes());
        let mut hex = String::with_capacity(64);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }

    /// Compares with a claimed `qsh` without building the hex string.
    pub fn matches(&self, claimed: &str) -> bool {
        let digest = Sha256::digest(self.text.as_bytes());
        claimed.len() == 64
            && digest
                .iter()
                .zip(claimed.as_bytes().chunks(2))
                .all(|(byte, pair)| {
                    let hex = [nibble(byte >> 4), nibble(byte & 0xf)];
                    hex == pair
                })
    }
}

fn nibble(n: u8) -> u8 {
    if n < 10 {
        b'0' + n
    } else {
        b'a' + n - 10
    }
}

fn push_canonical_path(out: &mut String, path: &str, base_path: &str) {
    let base_path = base_path.trim_end_matches('/');
    let relative = match path.strip_prefix(base_path) {
        // Strip only at a segment boundary: base `/app` must not eat the front of `/apple`.
        Some(rest) if !base_path.is_empty() && (rest.is_empty() || rest.starts_with('/')) => rest,
        _ => path,
    };
    if relative.is_empty() {
        out.push('/');
        return;
    }
    if !relative.starts_with('/') {
        out.push('/');
    }
    // Like Atlassian: exactly one trailing `/` goes, unless the path is `/` itself. `/a//` is
    // `/a/`, not `/a`: stripping them all would give two different paths one signature.
    let trimmed = match relative.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => relative,
    };
    for (i, part) in trimmed.split('&').enumerate() {
        if i > 0 {
            out.push_str("%26");
        }
        out.push_str(part);
    }
}

fn push_canonical_query(out: &mut String, query: &str) {
    if query.is_empty() {
        return;
    }
    // (encoded name, decoded value) pairs; `jwt` is the token itself and never hashed.
    // Names sort encoded, the values of a repeated name sort decoded (byte order) and are
    // encoded only when written, as Atlassian's reference does: `ids=:1&ids=.1` ->
    // `ids=.1,%3A1`. Borrowed where decoding changes nothing, which is most parameters.
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, [u8]>)> = query_pairs(query)
        .filter_map(|(name, value)| {
            let name = decode_component(name);
            if *name == *TOKEN_PARAMETER {
                return None;
            }
            Some((encode(name), decode_component(value)))
        })
        .collect();
    pairs.sort();
    let mut first = true;
    let mut i = 0;
    while i < pairs.len() {
        let name = &pairs[i].0;
        if !first {
            out.push('&');
        }
        first = false;
        out.push_str(name);
        out.push('=');
        // Repeated names: values already sorted by the tuple sort, joined with `,`.
        let mut j = i;
        while j < pairs.len() && pairs[j].0 == *name {
            if j > i {
                out.push(',');
            }
            out.push_str(&encode(Cow::Borrowed(&pairs[j].1)));
            j += 1;
        }
        i = j;
    }
}

/// The decoded name of the query parameter that carries the token; never part of the qsh.
const TOKEN_PARAMETER: &[u8] = b"jwt";

/// The raw `(name, value)` pairs of a query string, as the qsh sees them: split on `&`, empty
/// pieces skipped, a piece without `=` is a name with an empty value.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Whether a raw (still encoded) parameter name is the token parameter once decoded, as the
/// qsh decides it: `jwt`, `j%77t`, `%6A%77%74`... are all left out of the hash.
pub fn is_token_parameter(raw_name: &str) -> bool {
    *decode_component(raw_name) == *TOKEN_PARAMETER
}

/// Query components arrive form-encoded: `+` is a space, `%XX` a byte. Decoded to bytes, never
/// through (lossy) UTF-8: `%FF`, `%FE` and `%EF%BF%BD` must stay three different values.
fn decode_component(raw: &str) -> Cow<'_, [u8]> {
    if !raw.contains(['+', '%']) {
        return Cow::Borrowed(raw.as_bytes());
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).collect())
}

/// The bytes with everything but RFC 3986 unreserved characters as `%XX` (upper-case hex;
/// non-ASCII bytes are always escaped, so the result is ASCII).
fn encode(decoded: Cow<'_, [u8]>) -> Cow<'_, str> {
    match decoded {
        Cow::Borrowed(raw) => percent_encode(raw, RFC3986).into(),
        Cow::Owned(raw) => {
            // `Cow::Borrowed` here does not mean "unchanged": a single escaped byte comes back
            // as a borrowed static `%XX`. Escaping lengthens, so equal length means unchanged.
            let encoded = Cow::from(percent_encode(&raw, RFC3986));
            if encoded.len() == raw.len() {
                Cow::Owned(String::from_utf8(raw).expect("unescaped bytes are unreserved ASCII"))
            } else {
                Cow::Owned(encoded.into_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qsh(method: &str, path: &str, query: &str) -> String {
        CanonicalRequest::new(method, path, query, "").qsh()
    }

    #[test]
    fn protocol_vectors() {
        assert_eq!(
            qsh("POST", "/installed", ""),
            "4a2e1de8ca74e6cafe8862d332fa3ac7a8e51e692bc6d798ea4dfedc14948bf4"
        );
        assert_eq!(
            qsh("GET", "/path", ""),
            "799be84a7fa35570087163c0cd9af3abff7ac05c2c12ba0bb1d7eebc984b3ac2"
        );
        assert_eq!(
            qsh("GET", "/", ""),
            "c88caad15a1c1a900b8ac08aa9686f4e8184539bea1deda36e2f649430df3239"
        );
        assert_eq!(
            qsh(
                "GET",
                "/test",
                "param=some%20spaces%20in%20this%20parameter"
            ),
            "ef4097d05395eaf1a133956f140116a9c411afad768d4f06daac9e305764265d"
        );
        assert_eq!(
            qsh("GET", "/test", "query=connect*"),
            "0d28bc10d1972d9cab59e123ce17976eb32aad6957a13cfb8b97ced6d3fc8a29"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/test", "ids=20&ids=2&ids=-1&ids=1&ids=10", "").as_str(),
            "GET&/test&ids=-1,1,10,2,20"
        );
    }

    #[test]
    fn repeated_values_sort_by_their_decoded_bytes() {
        // `.` < `:` decoded, though `%` (of `%3A`) < `.` once encoded.
        assert_eq!(
            CanonicalRequest::new("GET", "/test", "ids=:1&ids=.1", "").as_str(),
            "GET&/test&ids=.1,%3A1"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/test", "ids=%3A1&ids=.1", "").as_str(),
            "GET&/test&ids=.1,%3A1"
        );
    }

    #[test]
    fn method_is_upper_cased_and_empty_path_is_slash() {
        assert_eq!(CanonicalRequest::new("get", "", "", "").as_str(), "GET&/&");
    }

    #[test]
    fn trailing_slash_is_dropped_unless_whole_path() {
        assert_eq!(
            CanonicalRequest::new("GET", "/a/b/", "", "").as_str(),
            "GET&/a/b&"
        );
        assert_eq!(CanonicalRequest::new("GET", "/", "", "").as_str(), "GET&/&");
        assert_eq!(
            CanonicalRequest::new("GET", "//", "", "").as_str(),
            "GET&/&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "a/", "", "").as_str(),
            "GET&/a&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/app/", "", "/app").as_str(),
            "GET&/&"
        );
    }

    #[test]
    fn only_one_trailing_slash_is_dropped() {
        // A token for `/a` must not be replayable on `/a//` (another resource to the app).
        assert_eq!(
            CanonicalRequest::new("GET", "/a//", "", "").as_str(),
            "GET&/a/&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/a///", "", "").as_str(),
            "GET&/a//&"
        );
        assert_ne!(qsh("GET", "/a//", ""), qsh("GET", "/a", ""));
        assert_ne!(qsh("GET", "/a//", ""), qsh("GET", "/a/", ""));
        assert_eq!(qsh("GET", "/a/", ""), qsh("GET", "/a", ""));
        assert_eq!(
            CanonicalRequest::new("GET", "/app/x//", "", "/app").as_str(),
            "GET&/x/&"
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_do_not_collide() {
        // With a lossy UTF-8 decode all three were `id=%EF%BF%BD`: one token, three requests.
        let canonical = |q| {
            CanonicalRequest::new("GET", "/p", q, "")
                .as_str()
                .to_owned()
        };
        assert_eq!(canonical("id=%FF"), "GET&/p&id=%FF");
        assert_eq!(canonical("id=%fe"), "GET&/p&id=%FE");
        assert_eq!(canonical("id=%EF%BF%BD"), "GET&/p&id=%EF%BF%BD");
        let hashes = [
            qsh("GET", "/p", "id=%FF"),
            qsh("GET", "/p", "id=%FE"),
            qsh("GET", "/p", "id=%EF%BF%BD"),
            qsh("GET", "/p", "id=%C3%28"),
            qsh("GET", "/p", "id=%C3"),
        ];
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // In names too, and a truncated sequence stays what it is.
        assert_eq!(canonical("%FF=1&%FE=2"), "GET&/p&%FE=2&%FF=1");
        assert_eq!(canonical("n=%E2%82"), "GET&/p&n=%E2%82");
        // Valid UTF-8 is unchanged: the same bytes, upper-case hex.
        assert_eq!(canonical("n=%e2%82%ac"), "GET&/p&n=%E2%82%AC");
        // Raw (unescaped) non-ASCII is its UTF-8 bytes.
        assert_eq!(canonical("n=\u{20ac}"), "GET&/p&n=%E2%82%AC");
        // A `%` not followed by two hex digits is a literal `%`.
        assert_eq!(canonical("n=%zz&m=%"), "GET&/p&m=%25&n=%25zz");
    }

    #[test]
    fn a_value_that_is_one_escaped_byte_stays_escaped() {
        let canonical = |q| {
            CanonicalRequest::new("GET", "/p", q, "")
                .as_str()
                .to_owned()
        };
        assert_eq!(canonical("q=%20"), "GET&/p&q=%20");
        assert_eq!(canonical("q=+"), "GET&/p&q=%20");
        assert_eq!(canonical("r=%2F"), "GET&/p&r=%2F");
        assert_eq!(canonical("%26=1"), "GET&/p&%26=1");
    }

    #[test]
    fn components_that_need_no_work_stay_borrowed() {
        assert!(matches!(
            encode(decode_component("plain-Value_1.2~")),
            Cow::Borrowed("plain-Value_1.2~")
        ));
        assert!(matches!(encode(decode_component("a%41")), Cow::Owned(s) if s == "aA"));
    }

    #[test]
    fn the_token_parameter_is_recognised_by_its_decoded_name() {
        for name in ["jwt", "j%77t", "%6A%77%74", "%6a%77%74"] {
            assert!(is_token_parameter(name), "{name}");
            assert_eq!(
                CanonicalRequest::new("GET", "/p", &format!("{name}=x&a=1"), "").as_str(),
                "GET&/p&a=1",
                "{name}"
            );
        }
        for name in ["JWT", "jwt%00", "j+wt", "jwt ", "xjwt", ""] {
            assert!(!is_token_parameter(name), "{name}");
        }
    }

    #[test]
    fn ampersand_in_path_is_escaped() {
        assert_eq!(
            CanonicalRequest::new("GET", "/a&b", "", "").as_str(),
            "GET&/a%26b&"
        );
    }

    #[test]
    fn base_path_is_stripped_at_segment_boundary_only() {
        assert_eq!(
            CanonicalRequest::new("GET", "/app/x", "", "/app").as_str(),
            "GET&/x&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/app", "", "/app/").as_str(),
            "GET&/&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/apple", "", "/app").as_str(),
            "GET&/apple&"
        );
        assert_eq!(
            CanonicalRequest::new("GET", "/wiki/rest/api/space", "", "/wiki").as_str(),
            "GET&/rest/api/space&"
        );
    }

    #[test]
    fn jwt_parameter_is_dropped_and_names_sorted() {
        assert_eq!(
            CanonicalRequest::new("GET", "/p", "b=2&jwt=abc.def.ghi&a=1", "").as_str(),
            "GET&/p&a=1&b=2"
        );
    }

    #[test]
    fn query_encoding_follows_rfc3986() {
        // `+` from form encoding is a space; `~` stays; reserved characters are escaped.
        assert_eq!(
            CanonicalRequest::new("GET", "/p", "q=a+b&t=x~y&r=%2F%3F&e", "").as_str(),
            "GET&/p&e=&q=a%20b&r=%2F%3F&t=x~y"
        );
        // Non-ASCII is percent-encoded as UTF-8, upper-case hex.
        assert_eq!(
            CanonicalRequest::new("GET", "/p", "n=%C3%A9", "").as_str(),
            "GET&/p&n=%C3%A9"
        );
    }

    #[test]
    fn from_url_handles_absolute_and_relative_urls() {
        assert_eq!(
            CanonicalRequest::from_url(
                "get",
                "https://acme.atlassian.net/wiki/rest/api?b=1&a=2#frag",
                "/wiki"
            )
            .as_str(),
            "GET&/rest/api&a=2&b=1"
        );
        assert_eq!(
            CanonicalRequest::from_url("POST", "https://host:8443", "").as_str(),
            "POST&/&"
        );
        assert_eq!(
            CanonicalRequest::from_url("GET", "/installed?x=1", "").as_str(),
            "GET&/installed&x=1"
        );
    }

    #[test]
    fn without_query_values_keeps_method_path_and_names_only() {
        let shown = |method, path, query| {
            CanonicalRequest::new(method, path, query, "").without_query_values()
        };
        assert_eq!(
            shown(
                "GET",
                "/api/tenant",
                "name=secretvalue123&ids=1&ids=2&jwt=x&e"
            ),
            "GET&/api/tenant&e=…&ids=…&name=…"
        );
        assert_eq!(shown("POST", "/installed", ""), "POST&/installed&");
        // A method with `&` (the CLI takes any) does not shift the query.
        assert_eq!(shown("A&B", "/p", "k=v"), "A&B&/p&k=…");
    }

    #[test]
    fn matches_agrees_with_qsh() {
        let c = CanonicalRequest::new("GET", "/p", "a=1", "");
        assert!(c.matches(&c.qsh()));
        assert!(!c.matches(&CanonicalRequest::new("GET", "/p", "a=2", "").qsh()));
        assert!(!c.matches("context-qsh"));
        assert!(!c.matches(&c.qsh().to_uppercase()));
    }
}
