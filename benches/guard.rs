//! The product-request guard on a cached tenant, without HTTP: token parse, HMAC-SHA256
//! verification, time checks and `qsh`, i.e. [`guard::verify_product_token`], the code the
//! `ProductRequest` extractor runs once it holds the installation.
//!
//! Also the install path's RS256 verify ([`bench_install_verify`]) and what counting a request
//! in the metrics costs ([`bench_counting`]).
//!
//! `cargo bench --bench guard -- --warm-up-time 1 --measurement-time 5`; figures in
//! docs/PERFORMANCE.md.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt::{self, Claims, Token};
use connect_protocol::qsh::CanonicalRequest;
use connect_warden::guard::{self, RequestLine};
use connect_warden::secrets::{self, SecretVersion};
use connect_warden::store::Installation;

const SECRET: &str = "a-shared-secret-of-realistic-length-0123456789-abcdefghij";
const CLIENT_KEY: &str = "jira:5b9c7a3e-2f1d-4c8b-9e6a-0d4f3b2a1c7e";

fn installation(now: i64) -> Installation {
    let mut installation: Installation = serde_json::from_value(serde_json::json!({
        "client_key": CLIENT_KEY,
        "base_url": "https://acme.atlassian.net",
        "product_type": "jira",
        "state": "installed",
        "enabled": true,
        "last_event_iat": now - 3600,
        "installed_at": now - 3600,
        "updated_at": now - 3600,
        "version": 2
    }))
    .expect("a valid installation");
    installation.secrets = [
        ("the-previous-secret-0123456789", now - 7200),
        (SECRET, now - 3600),
    ]
    .into_iter()
    .map(|(secret, since)| SecretVersion {
        secret: SharedSecret::parse(secret).unwrap(),
        since,
        signed: false,
    })
    .collect();
    installation
}

/// A token as Jira sends it on a REST call or iframe load.
fn token(now: i64, method: &str, path: &str, query: &str) -> String {
    let claims = Claims {
        iss: Some(CLIENT_KEY.into()),
        sub: Some("557058:f58131cb-b67d-43c7-b30d-6b58d40bd077".into()),
        iat: Some(now),
        exp: Some(now + 180),
        qsh: Some(CanonicalRequest::new(method, path, query, "").qsh()),
        context: Some(
            serde_json::json!({"user": {"accountId": "557058:f58131cb-b67d-43c7-b30d-6b58d40bd077"}}),
        ),
        ..Default::default()
    };
    jwt::sign_hs256(&claims, &SharedSecret::parse(SECRET).unwrap())
}

fn bench_guard(c: &mut Criterion) {
    let now = jwt::now();
    let installation = installation(now);
    let grace = 180;

    let plain = token(now, "GET", "/api/tenant", "");
    let line = RequestLine {
        method: "GET",
        path: "/api/tenant",
        query: "",
        base_path: "",
        allow_context: false,
    };
    guard::verify_product_token(&plain, &installation, &line, grace, now)
        .expect("the benchmark token verifies");
    c.bench_function("verify_product_token/no_query", |b| {
        b.iter(|| {
            guard::verify_product_token(
                black_box(&plain),
                black_box(&installation),
                black_box(&line),
                grace,
                now,
            )
            .unwrap()
        })
    });

    // What an iframe load looks like: a handful of query parameters, one of them `jwt`.
    let query = "xdm_e=https%3A%2F%2Facme.atlassian.net&xdm_c=channel-x&cp=&xdm_deprecated_addon_key_do_not_use=connect-warden&lic=active&cv=1001.0.0";
    let iframe = token(now, "GET", "/api/tenant", query);
    let full_query = format!("{query}&jwt={iframe}");
    let line_q = RequestLine {
        method: "GET",
        path: "/api/tenant",
        query: &full_query,
        base_path: "",
        allow_context: false,
    };
    guard::verify_product_token(&iframe, &installation, &line_q, grace, now)
        .expect("the iframe token verifies");
    c.bench_function("verify_product_token/iframe_query", |b| {
        b.iter(|| {
            guard::verify_product_token(
                black_box(&iframe),
                black_box(&installation),
                black_box(&line_q),
                grace,
                now,
            )
            .unwrap()
        })
    });

    // The pieces, to see where the time goes.
    c.bench_function("piece/token_parse", |b| {
        b.iter(|| Token::parse(black_box(&plain)).unwrap())
    });
    let parsed = Token::parse(&plain).unwrap();
    c.bench_function("piece/verify_signature", |b| {
        b.iter(|| {
            secrets::verify_product_signature(
                black_box(&parsed),
                black_box(&installation),
                grace,
                now,
            )
            .unwrap()
        })
    });
    let claims = parsed.claims().clone();
    c.bench_function("piece/check_times", |b| {
        b.iter(|| black_box(&claims).check_times(now).unwrap())
    });
    c.bench_function("piece/canonical_and_qsh/no_query", |b| {
        b.iter(|| {
            let canonical =
                CanonicalRequest::new("GET", black_box("/api/tenant"), black_box(""), "");
            black_box(&claims).check_qsh(&canonical, false).unwrap()
        })
    });
    let iframe_claims = Token::parse(&iframe).unwrap().into_claims();
    c.bench_function("piece/canonical_and_qsh/iframe_query", |b| {
        b.iter(|| {
            let canonical =
                CanonicalRequest::new("GET", black_box("/api/tenant"), black_box(&full_query), "");
            black_box(&iframe_claims)
                .check_qsh(&canonical, false)
                .unwrap()
        })
    });
}

/// The install path's signature check: an RS256 install token verified with a key parsed once
/// (what `InstallKeys` caches, verified through `ring`), beside jsonwebtoken's pure-Rust RSA
/// backend on the same token, so the ratio comes from one run.
fn bench_install_verify(c: &mut Criterion) {
    let key = devtenant::SigningKey::generate();
    let now = jwt::now();
    let claims = connect_protocol::claims::install_claims(
        CLIENT_KEY,
        "https://warden.example.com",
        &CanonicalRequest::new("POST", "/installed", "", ""),
        now,
        now + 180,
    );
    let token = devtenant::sign_rs256(&key, &claims);
    let verifying = key.verifying_key();
    c.bench_function("install/parse_and_verify_rs256", |b| {
        b.iter(|| {
            let parsed = Token::parse(black_box(&token)).unwrap();
            parsed.verify_rs256(black_box(&verifying)).unwrap()
        })
    });
    let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(key.public_pem().as_bytes()).unwrap();
    let (input, signature) = token.rsplit_once('.').unwrap();
    c.bench_function("install/baseline_jsonwebtoken_rust_crypto_rs256", |b| {
        b.iter(|| {
            jsonwebtoken::crypto::verify(
                black_box(signature),
                black_box(input.as_bytes()),
                &decoding,
                jsonwebtoken::Algorithm::RS256,
            )
            .unwrap()
        })
    });
}

/// What counting adds to a request: a product-request outcome (a handle registered once per
/// label set) and a tenant-cache lookup (a static key looked up in the recorder).
fn bench_counting(c: &mut Criterion) {
    use connect_warden::error::Refusal;
    use connect_warden::monitoring::{self, Lookup};
    monitoring::install().expect("no other recorder in the bench");
    c.bench_function("metrics/product_request accepted", |b| {
        b.iter(|| monitoring::product_request(black_box(Ok(()))))
    });
    c.bench_function("metrics/product_request refused", |b| {
        b.iter(|| monitoring::product_request(black_box(Err(Refusal::BadSignature))))
    });
    c.bench_function("metrics/tenant_cache hit", |b| {
        b.iter(|| monitoring::tenant_cache(black_box(Lookup::Get), black_box(true)))
    });
}

criterion_group!(benches, bench_guard, bench_install_verify, bench_counting);
criterion_main!(benches);
