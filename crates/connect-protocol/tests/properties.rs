//! Property tests of the parsers that read what anyone on the network sends (docs/PROTOCOL.md
//! §14): the token parser, the `qsh` canonicalizer, where the token travels, and the lifecycle
//! body. Each must answer every input with a value or an error, never a panic; a few
//! properties pin what the protocol promises. The case count is bounded so the suite runs in
//! seconds; a failing case is shrunk and printed with its seed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{json, Value};

use connect_protocol::authorization::find_token;
use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_protocol::jwt::{RsaVerifyingKey, Token};
use connect_protocol::lifecycle::{LifecycleEvent, LifecyclePayload};
use connect_protocol::qsh::CanonicalRequest;

/// 1024 cases per property (about a second in all), or `PROPTEST_CASES` for a longer hunt.
fn config() -> ProptestConfig {
    let defaults = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        return defaults;
    }
    ProptestConfig {
        cases: 1024,
        ..defaults
    }
}

/// An RSA public key for `verify_rs256` (any key: no generated token verifies).
const PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAmcnzJuOt7vkyjCmDOTKp
uq7w3ZvB1+BAwPxiYBRARL9ENqkzsUdXsqH8Gw20l7v6nfYyoNgsXA4I2sgNazgx
IAUgPRoxjr1syCyQ6VEl2AOJdVp3imPKo02PA4ihmwY1SC0bPZ2lA38DJN6KKb33
TS/WGsd+J8jtg4G09WI7/jGSgTUPx2/xrenYfNfLjidGtgzFetHh1YnMlZuQSxGq
0hKSSEPX56f3/5+u7e0NquiJ5Pb5oqCVHbyPzMZrFThXaVVFobNhXaSBf1INHVag
4uNQI/Q4ihCjzrWgT4FOuulkEjzJlsxb2oREHCw2jkSe2VtImu8Vg2QsHhQ2QESQ
UQIDAQAB
-----END PUBLIC KEY-----";

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object with the claim (or header) names tokens use, each holding any JSON value,
/// plus other names: how a forger would try the decoder.
fn claims_like() -> impl Strategy<Value = Value> {
    let names = prop_oneof![
        Just("alg".to_owned()),
        Just("kid".to_owned()),
        Just("iss".to_owned()),
        Just("sub".to_owned()),
        Just("aud".to_owned()),
        Just("iat".to_owned()),
        Just("exp".to_owned()),
        Just("qsh".to_owned()),
        Just("context".to_owned()),
        "[a-z]{1,6}",
    ];
    prop::collection::btree_map(names, json_value(), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// One base64url part: of JSON, of any bytes, or not base64 at all.
fn token_part() -> impl Strategy<Value = String> {
    prop_oneof![
        claims_like().prop_map(|v| URL_SAFE_NO_PAD.encode(v.to_string())),
        json_value().prop_map(|v| URL_SAFE_NO_PAD.encode(v.to_string())),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        "[A-Za-z0-9_=+/.-]{0,40}",
    ]
}

/// A query component: plain characters, `+`, valid and invalid `%` escapes, escaped bytes
/// that are not UTF-8, raw non-ASCII. Never `&`, which would split it.
fn query_component() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[A-Za-z0-9._~*:/?=,+-]{1,4}",
        any::<u8>().prop_map(|b| format!("%{b:02X}")),
        any::<u8>().prop_map(|b| format!("%{b:02x}")),
        Just("%".to_owned()),
        Just("%z".to_owned()),
        Just("%4".to_owned()),
        Just("jwt".to_owned()),
        "[^&]{1,2}",
    ];
    prop::collection::vec(piece, 0..5).prop_map(|p| p.concat())
}

/// A query string's pieces (`name=value`, a bare name, or empty), none holding `&`.
fn query_pieces() -> impl Strategy<Value = Vec<String>> {
    let piece = prop_oneof![
        (query_component(), query_component()).prop_map(|(n, v)| format!("{n}={v}")),
        query_component(),
        Just(String::new()),
    ];
    prop::collection::vec(piece, 0..8)
}

/// A lifecycle body: the fields the parser reads, each absent or any JSON value, plus
/// unknown ones.
fn lifecycle_body() -> impl Strategy<Value = Value> {
    let field = |name: &'static str| {
        prop::option::of(prop_oneof![json_value(), ".{0,30}".prop_map(Value::from),])
            .prop_map(move |v| (name, v))
    };
    (
        field("key"),
        field("clientKey"),
        field("sharedSecret"),
        field("baseUrl"),
        field("productType"),
        field("displayUrl"),
        field("oauthClientId"),
        prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..4),
    )
        .prop_map(|(a, b, c, d, e, f, g, extra)| {
            let mut object: serde_json::Map<String, Value> = extra.into_iter().collect();
            for (name, value) in [a, b, c, d, e, f, g] {
                if let Some(value) = value {
                    object.insert(name.to_owned(), value);
                }
            }
            Value::Object(object)
        })
}

const EVENTS: [LifecycleEvent; 4] = [
    LifecycleEvent::Installed,
    LifecycleEvent::Uninstalled,
    LifecycleEvent::Enabled,
    LifecycleEvent::Disabled,
];

/// Everything a parsed token offers, exercised: none of it may panic.
fn exercise(token: &Token<'_>, key: &RsaVerifyingKey) {
    let _ = token.alg();
    let _ = token.kid();
    let _ = token.digest();
    let _ = token.verify_hs256(&SharedSecret::parse("secret").unwrap());
    let _ = token.verify_rs256(key);
    let claims = token.claims();
    let _ = claims.check_times(connect_protocol::jwt::now());
    let _ = claims.check_times(i64::MAX);
    let _ = claims.check_times(i64::MIN);
    let _ = claims.check_audience(&[BaseUrl::parse("https://app.example.com").unwrap()]);
    let _ = claims.check_qsh(&CanonicalRequest::new("GET", "/", "", ""), true);
    let _ = claims.check_qsh(&CanonicalRequest::new("POST", "/installed", "", ""), false);
}

/// A time claim or clock reading, the edges of `i64` included.
fn instant() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MAX),
        Just(i64::MIN),
        Just(0),
        (i64::MAX - 100)..=i64::MAX,
        i64::MIN..=(i64::MIN + 100),
        -10_000_000_000i64..10_000_000_000,
        any::<i64>(),
    ]
}

/// Claims of the right types, with any values: these get past the decoder to the rules.
fn typed_claims() -> impl Strategy<Value = Value> {
    (
        prop::option::of(instant()),
        prop::option::of(instant()),
        prop::option::of(".{0,20}"),
        prop::option::of(prop_oneof![
            ".{0,20}".prop_map(Value::from),
            prop::collection::vec(".{0,20}", 0..3).prop_map(Value::from),
        ]),
    )
        .prop_map(|(iat, exp, qsh, aud)| {
            let mut claims = json!({ "iss": "client" });
            let object = claims.as_object_mut().unwrap();
            for (name, value) in [
                ("iat", iat.map(Value::from)),
                ("exp", exp.map(Value::from)),
                ("qsh", qsh.map(Value::from)),
                ("aud", aud),
            ] {
                if let Some(value) = value {
                    object.insert(name.to_owned(), value);
                }
            }
            claims
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn time_rules_take_any_instants(claims in typed_claims(), now in instant()) {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#);
        let raw = format!("{header}.{}.sig", URL_SAFE_NO_PAD.encode(claims.to_string()));
        let token = Token::parse(&raw).expect("claims of the right types parse");
        let _ = token.claims().check_times(now);
        exercise(&token, &RsaVerifyingKey::from_pem(PUBLIC_KEY).unwrap());
    }

    #[test]
    fn token_parser_takes_any_string(raw in ".{0,200}") {
        let key = RsaVerifyingKey::from_pem(PUBLIC_KEY).unwrap();
        if let Ok(token) = Token::parse(&raw) {
            exercise(&token, &key);
        }
    }

    #[test]
    fn token_parser_takes_any_dot_separated_parts(
        parts in prop::collection::vec(token_part(), 0..5),
    ) {
        let key = RsaVerifyingKey::from_pem(PUBLIC_KEY).unwrap();
        let raw = parts.join(".");
        match Token::parse(&raw) {
            Ok(token) => {
                prop_assert_eq!(parts.len(), 3, "only three parts make a token");
                exercise(&token, &key);
            }
            Err(error) => { let _ = error.to_string(); }
        }
    }

    #[test]
    fn token_parser_takes_any_claim_values(
        header in claims_like(),
        claims in claims_like(),
        signature in prop::collection::vec(any::<u8>(), 0..600),
    ) {
        let key = RsaVerifyingKey::from_pem(PUBLIC_KEY).unwrap();
        let raw = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature),
        );
        if let Ok(token) = Token::parse(&raw) {
            exercise(&token, &key);
        }
    }

    #[test]
    fn canonicalizer_takes_any_request(
        method in ".{0,10}",
        path in ".{0,40}",
        query in ".{0,80}",
        base_path in prop_oneof![Just(String::new()), Just("/app".to_owned()), ".{0,10}"],
    ) {
        let canonical = CanonicalRequest::new(&method, &path, &query, &base_path);
        let _ = canonical.qsh();
        let _ = canonical.without_query_values();
        prop_assert!(canonical.matches(&canonical.qsh()));
        let _ = CanonicalRequest::from_url(&method, &format!("{path}?{query}"), &base_path);
        let _ = CanonicalRequest::from_url(&method, &format!("https://{path}"), &base_path);
        let _ = find_token(Some(path.as_bytes()), &query);
        let _ = find_token(None, &query);
    }

    #[test]
    fn canonical_query_is_encoded_ascii_and_shows_no_value(pieces in query_pieces()) {
        let canonical = CanonicalRequest::new("GET", "/p", &pieces.join("&"), "");
        let query = canonical.as_str().strip_prefix("GET&/p&").unwrap();
        prop_assert!(
            query.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%=,&".contains(&b)),
            "{}", query
        );
        let shown = canonical.without_query_values();
        let shown_query = shown.strip_prefix("GET&/p&").unwrap();
        for pair in shown_query.split('&').filter(|p| !p.is_empty()) {
            prop_assert!(pair.ends_with("=…"), "{}", shown);
        }
    }

    #[test]
    fn canonicalization_ignores_parameter_order(
        (pieces, shuffled) in query_pieces().prop_flat_map(|p| {
            let shuffled = Just(p.clone()).prop_shuffle();
            (Just(p), shuffled)
        }),
        jwt_at in any::<prop::sample::Index>(),
    ) {
        let original = CanonicalRequest::new("GET", "/p", &pieces.join("&"), "");
        let reordered = CanonicalRequest::new("GET", "/p", &shuffled.join("&"), "");
        prop_assert_eq!(original.as_str(), reordered.as_str());
        // The token parameter, wherever it stands, is never part of the hash.
        let mut with_token = shuffled.clone();
        with_token.insert(jwt_at.index(with_token.len() + 1), "jwt=a.b.c".to_owned());
        let with_token = CanonicalRequest::new("GET", "/p", &with_token.join("&"), "");
        prop_assert_eq!(original.as_str(), with_token.as_str());
    }

    #[test]
    fn lifecycle_parser_takes_any_bytes(body in prop::collection::vec(any::<u8>(), 0..300)) {
        for event in EVENTS {
            let _ = LifecyclePayload::parse(event, &body, "connect-warden");
        }
    }

    #[test]
    fn lifecycle_parser_takes_any_json(value in prop_oneof![json_value(), lifecycle_body()]) {
        let body = serde_json::to_vec(&value).unwrap();
        for event in EVENTS {
            if let Ok(payload) = LifecyclePayload::parse(event, &body, "connect-warden") {
                let _ = format!("{payload:?}");
            }
        }
    }

    #[test]
    fn a_parsed_client_key_round_trips(
        client_key in "[A-Za-z0-9._:-]{1,200}",
        base_url in "https://[a-z]{1,20}\\.atlassian\\.net(/wiki)?/?",
        extra in prop::collection::btree_map("[a-z]{1,8}", json_value(), 0..4),
    ) {
        let mut body = json!({
            "clientKey": client_key,
            "baseUrl": base_url,
            "sharedSecret": "a-secret",
        });
        // Unknown fields are ignored (`key`, a known one, must name the app: left out).
        for (name, value) in extra.into_iter().filter(|(name, _)| name != "key") {
            body.as_object_mut().unwrap().entry(name).or_insert(value);
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        let payload = LifecyclePayload::parse(LifecycleEvent::Installed, &bytes, "app")
            .expect("a valid body parses");
        prop_assert_eq!(payload.client_key.as_str(), client_key.as_str());
        prop_assert_eq!(&payload.client_key, &ClientKey::parse(&client_key).unwrap());
        prop_assert_eq!(payload.base_url.as_str(), base_url.trim_end_matches('/'));
    }

    #[test]
    fn a_parsed_base_url_is_bounded_and_parses_to_itself(raw in prop_oneof![
        ".{0,60}",
        "https?://[a-z0-9.-]{0,20}(:[0-9]{1,5})?(/[^?#]{0,30})?",
    ]) {
        if let Ok(url) = BaseUrl::parse(&raw) {
            prop_assert!(url.as_str().chars().count() <= BaseUrl::MAX_LEN);
            let again = BaseUrl::parse(url.as_str()).expect("a normalised baseUrl parses");
            prop_assert_eq!(again.as_str(), url.as_str());
            let _ = (url.host(), url.path(), url.origin(), url.join("/x?y=1"));
        }
    }
}
