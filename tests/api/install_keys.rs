//! `InstallKeys` against devtenant's key server over real HTTP on 127.0.0.1.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use connect_protocol::claims::install_claims;
use connect_protocol::domain::{BaseUrl, KeyId};
use connect_protocol::jwt::{now, Token};
use connect_protocol::qsh::CanonicalRequest;
use connect_warden::install_keys::{
    FetchBudget, InstallKeys, KeyFetchError, FETCHES_PER_SECOND, FETCH_BURST,
};
use devtenant::{sign_rs256, KeyRing, KeyServer, SigningKey};

/// Keys made once for this test binary: RSA key generation is slow in debug builds.
fn test_keys() -> &'static [SigningKey; 2] {
    static KEYS: OnceLock<[SigningKey; 2]> = OnceLock::new();
    KEYS.get_or_init(|| [SigningKey::generate(), SigningKey::generate()])
}

fn host() -> BaseUrl {
    BaseUrl::parse("https://acme.atlassian.net").unwrap()
}

fn kid(key: &SigningKey) -> KeyId {
    KeyId::parse(&key.kid).unwrap()
}

fn unknown_kid() -> KeyId {
    KeyId::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
}

/// A key server serving the first test key, and an `InstallKeys` pointed at it.
async fn setup(timeout: Duration) -> (KeyServer, InstallKeys) {
    let ring = Arc::new(RwLock::new(KeyRing::with_key(test_keys()[0].clone())));
    let server = KeyServer::start("127.0.0.1:0", ring).await.unwrap();
    let keys = InstallKeys::new(vec![server.base_url()], timeout);
    (server, keys)
}

#[tokio::test]
async fn fetched_key_verifies_tokens_and_is_cached() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let signer = &test_keys()[0];
    let iat = now();
    let claims = install_claims(
        "jira:42",
        "https://app.example.com",
        &CanonicalRequest::new("POST", "/installed", "", ""),
        iat,
        iat + 180,
    );
    let token = sign_rs256(signer, &claims);

    let key = keys.key(&kid(signer), &host()).await.unwrap();
    let parsed = Token::parse(&token).unwrap();
    assert_eq!(parsed.verify_rs256(&key), Ok(()));
    assert_eq!(server.fetches(&signer.kid), 1);
    assert_eq!(keys.fetches(), 1);

    let again = keys.key(&kid(signer), &host()).await.unwrap();
    assert!(
        Arc::ptr_eq(&key, &again),
        "second call not served from the cache"
    );
    assert_eq!(server.fetches(&signer.kid), 1);
    assert_eq!(keys.fetches(), 1);

    // A token signed by another key does not verify with this one.
    let forged = sign_rs256(&test_keys()[1], &claims);
    assert!(Token::parse(&forged).unwrap().verify_rs256(&key).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_a_new_kid_make_one_fetch() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let keys = Arc::new(keys);
    let rotated = &test_keys()[1];
    server
        .keyring()
        .write()
        .unwrap()
        .rotate_to(rotated.clone())
        .unwrap();
    server.set_delay(Duration::from_millis(200));

    let calls: Vec<_> = (0..100)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move { keys.key(&kid(rotated), &host()).await })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        call.await.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, 100);
    assert_eq!(server.fetches(&rotated.kid), 1);
    assert_eq!(server.total_fetches(), 1);
    assert_eq!(keys.fetches(), 1);
}

#[tokio::test]
async fn unknown_kid_is_not_found_and_remembered() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let missing = unknown_kid();

    let first = keys.key(&missing, &host()).await.unwrap_err();
    assert!(
        matches!(&first, KeyFetchError::NotFound { kid } if *kid == missing.to_string()),
        "{first:?}"
    );
    assert!(!first.is_unavailable());
    assert_eq!(server.fetches(&missing.to_string()), 1);

    let second = keys.key(&missing, &host()).await.unwrap_err();
    assert!(
        matches!(second, KeyFetchError::NotFound { .. }),
        "{second:?}"
    );
    assert_eq!(
        server.fetches(&missing.to_string()),
        1,
        "negative answer not remembered"
    );
    assert_eq!(keys.fetches(), 1);
}

#[tokio::test]
async fn outage_is_unavailable_and_not_cached() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let signer = &test_keys()[0];
    server.set_failing(true);

    for attempt in 1..=2 {
        let err = keys.key(&kid(signer), &host()).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        assert_eq!(server.fetches(&signer.kid), attempt, "outage was cached");
    }

    server.set_failing(false);
    keys.key(&kid(signer), &host()).await.unwrap();
    assert_eq!(server.fetches(&signer.kid), 3);
    assert_eq!(keys.fetches(), 3);
}

#[tokio::test]
async fn unreachable_server_is_unavailable_quickly() {
    // A port that was just free and is now closed: connections are refused at once.
    let port = crate::helpers::free_port();
    let keys = InstallKeys::new(
        vec![BaseUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap()],
        Duration::from_secs(5),
    );

    let started = Instant::now();
    let err = keys.key(&kid(&test_keys()[0]), &host()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(keys.fetches(), 1);
}

#[tokio::test]
async fn body_that_is_not_a_public_key_is_invalid() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let garbage = unknown_kid();
    server.serve_raw(&garbage.to_string(), Some("<html>not a key</html>".into()));
    let err = keys.key(&garbage, &host()).await.unwrap_err();
    assert!(matches!(err, KeyFetchError::InvalidKey), "{err:?}");

    let private = unknown_kid();
    server.serve_raw(
        &private.to_string(),
        Some(test_keys()[0].private_pem().to_owned()),
    );
    let err = keys.key(&private, &host()).await.unwrap_err();
    assert!(
        matches!(err, KeyFetchError::InvalidKey),
        "a private key PEM was accepted: {err:?}"
    );

    // 20 KiB of PEM-looking text: refused by size, not buffered in full.
    let huge = unknown_kid();
    let body = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        "QUFB".repeat(5 * 1024)
    );
    server.serve_raw(&huge.to_string(), Some(body));
    let err = keys.key(&huge, &host()).await.unwrap_err();
    assert!(matches!(err, KeyFetchError::InvalidKey), "{err:?}");
}

#[tokio::test]
async fn slow_server_times_out_as_unavailable() {
    let (server, keys) = setup(Duration::from_secs(1)).await;
    server.set_delay(Duration::from_secs(3));

    let started = Instant::now();
    let err = keys.key(&kid(&test_keys()[0]), &host()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
}

/// An attacker needs no credential to make a miss: an install callback with any JSON body and
/// an RS256 header naming a fresh random kid. `count` such kids at once.
async fn flood(keys: &Arc<InstallKeys>, count: usize) -> (usize, usize) {
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let keys = keys.clone();
            tokio::spawn(async move { keys.key(&unknown_kid(), &host()).await })
        })
        .collect();
    let (mut not_found, mut over_budget) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Err(KeyFetchError::NotFound { .. }) => not_found += 1,
            Err(e) if e.is_over_budget() => {
                assert!(e.is_unavailable(), "over budget must be a retryable 503");
                assert_eq!(e.to_string(), "too many install-key fetches; retry");
                over_budget += 1;
            }
            other => panic!("unexpected answer for a random kid: {other:?}"),
        }
    }
    (not_found, over_budget)
}

/// Most requests the budget allows within `elapsed` (the burst plus the refill).
fn allowed(burst: u32, per_second: f64, elapsed: Duration) -> u64 {
    u64::from(burst) + (elapsed.as_secs_f64() * per_second).ceil() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kids_cannot_hammer_the_key_server() {
    let (server, keys) = setup(Duration::from_secs(5)).await;
    let keys = Arc::new(keys);
    let count = 3 * FETCH_BURST as usize;

    let started = Instant::now();
    let (not_found, over_budget) = flood(&keys, count).await;
    let elapsed = started.elapsed();

    let requests = server.total_fetches();
    assert!(
        requests <= allowed(FETCH_BURST, f64::from(FETCHES_PER_SECOND), elapsed),
        "{requests} requests to the key server for {count} random kids in {elapsed:?}"
    );
    assert!(requests >= u64::from(FETCH_BURST), "the burst is allowed");
    assert_eq!(not_found as u64, requests);
    assert_eq!(not_found + over_budget, count);
    assert_eq!(keys.fetches(), requests);
    assert_eq!(keys.over_budget(), over_budget as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_misses_make_no_request_and_the_budget_refills() {
    let ring = Arc::new(RwLock::new(KeyRing::with_key(test_keys()[0].clone())));
    let server = KeyServer::start("127.0.0.1:0", ring).await.unwrap();
    let budget = FetchBudget {
        per_second: 4.0,
        burst: 5,
    };
    let keys = Arc::new(InstallKeys::with_fetch_budget(
        vec![server.base_url()],
        Duration::from_secs(5),
        budget,
    ));

    let started = Instant::now();
    let (not_found, over_budget) = flood(&keys, 50).await;
    let elapsed = started.elapsed();
    let requests = server.total_fetches();
    assert!(
        requests <= allowed(budget.burst, budget.per_second, elapsed),
        "{requests} requests for 50 random kids in {elapsed:?}"
    );
    assert_eq!(not_found as u64, requests);
    assert_eq!(not_found + over_budget, 50);
    assert!(over_budget > 0);

    // Once the budget is spent, a miss is refused without a request, and the refusal is
    // not remembered: after the refill, a genuine kid works and a refused kid is asked for.
    let refused = loop {
        let kid = unknown_kid();
        match keys.key(&kid, &host()).await {
            Err(e) if e.is_over_budget() => break kid,
            Err(KeyFetchError::NotFound { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never refused");
    };
    assert_eq!(server.fetches(&refused.to_string()), 0);

    tokio::time::sleep(Duration::from_secs_f64(2.5 / budget.per_second)).await;
    let genuine = kid(&test_keys()[0]);
    keys.key(&genuine, &host())
        .await
        .expect("a genuine kid works after the refill");
    assert_eq!(server.fetches(&test_keys()[0].kid), 1);
    let err = keys.key(&refused, &host()).await.unwrap_err();
    assert!(matches!(err, KeyFetchError::NotFound { .. }), "{err:?}");
    assert_eq!(server.fetches(&refused.to_string()), 1);
    assert_eq!(keys.fetches(), server.total_fetches());
}

// ---------------------------------------------------------------------------------------------
// Several key servers (`WARDEN_KEYS_URL=a,b`)

/// A key server holding `key` only.
async fn server_with(key: &SigningKey) -> KeyServer {
    let ring = Arc::new(RwLock::new(KeyRing::with_key(key.clone())));
    KeyServer::start("127.0.0.1:0", ring).await.unwrap()
}

fn dead_server() -> BaseUrl {
    BaseUrl::parse(&format!("http://127.0.0.1:{}", crate::helpers::free_port())).unwrap()
}

#[tokio::test]
async fn a_first_key_server_that_is_down_or_failing_hands_the_kid_to_the_next() {
    let signer = &test_keys()[0];
    let second = server_with(signer).await;

    let keys = InstallKeys::new(
        vec![dead_server(), second.base_url()],
        Duration::from_secs(5),
    );
    keys.key(&kid(signer), &host())
        .await
        .expect("the second server has the key");
    assert_eq!(keys.fetches(), 2, "the first server was tried first");
    assert_eq!(second.fetches(&signer.kid), 1);

    let failing = server_with(signer).await;
    failing.set_failing(true);
    let keys = InstallKeys::new(
        vec![failing.base_url(), second.base_url()],
        Duration::from_secs(5),
    );
    keys.key(&kid(signer), &host())
        .await
        .expect("a 503 from the first server hands over to the second");
    assert_eq!(failing.fetches(&signer.kid), 1);
    assert_eq!(second.fetches(&signer.kid), 2);
}

#[tokio::test]
async fn a_kid_unknown_to_the_first_server_is_taken_from_the_second() {
    let (wanted, other) = (&test_keys()[0], &test_keys()[1]);
    let first = server_with(other).await;
    let second = server_with(wanted).await;
    let keys = InstallKeys::new(
        vec![first.base_url(), second.base_url()],
        Duration::from_secs(5),
    );
    let key = keys
        .key(&kid(wanted), &host())
        .await
        .expect("found on the second");
    let iat = now();
    let claims = install_claims(
        "jira:42",
        "https://app.example.com",
        &CanonicalRequest::new("POST", "/installed", "", ""),
        iat,
        iat + 180,
    );
    assert_eq!(
        Token::parse(&sign_rs256(wanted, &claims))
            .unwrap()
            .verify_rs256(&key),
        Ok(())
    );
    assert_eq!(first.fetches(&wanted.kid), 1);
    assert_eq!(second.fetches(&wanted.kid), 1);
}

/// The rule of docs/PROTOCOL.md §3: a kid is forgotten (a revoked key) only when every key
/// server answers 404. One 404 while another server cannot answer keeps the remembered key.
#[tokio::test]
async fn a_kid_is_forgotten_only_when_every_key_server_answers_404() {
    use connect_warden::store::embedded::EmbeddedStore;
    use connect_warden::store::SharedStore;

    let (remembered, other) = (&test_keys()[0], &test_keys()[1]);
    let first = server_with(other).await;
    let second = server_with(other).await;
    let servers = vec![first.base_url(), second.base_url()];
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    // Remembered long ago (no time recorded): trusted only while the servers cannot answer.
    let url = format!("{}/{}", first.base_url(), remembered.kid);
    store
        .remember_install_key(&url, remembered.public_pem())
        .await
        .unwrap();

    second.set_failing(true);
    let keys = InstallKeys::new(servers.clone(), Duration::from_secs(5)).remembering(store.clone());
    assert_eq!(keys.preload().await.unwrap(), 1);
    keys.key(&kid(remembered), &host())
        .await
        .expect("one 404 and one outage: the remembered key still serves");
    assert_eq!(
        store.install_keys().await.unwrap().len(),
        1,
        "not forgotten"
    );

    // A kid nobody remembers: 404 from the first, outage at the second, is an outage (503),
    // not an unknown kid; once the second answers, the kid is found there.
    let fresh = unknown_kid();
    let err = keys.key(&fresh, &host()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    second.set_failing(false);
    second.serve_raw(&fresh.to_string(), Some(remembered.public_pem().to_owned()));
    keys.key(&fresh, &host())
        .await
        .expect("the 404 of the first server was not remembered");

    // Every server answers 404: refused and forgotten.
    let keys = InstallKeys::new(servers, Duration::from_secs(5)).remembering(store.clone());
    keys.preload().await.unwrap();
    let err = keys.key(&kid(remembered), &host()).await.unwrap_err();
    assert!(matches!(err, KeyFetchError::NotFound { .. }), "{err:?}");
    let left: Vec<String> = store
        .install_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|(url, _)| url)
        .collect();
    assert!(
        !left.contains(&url),
        "the revoked key is still remembered: {left:?}"
    );
}

#[tokio::test]
async fn each_key_server_has_its_own_fetch_budget() {
    let (busy_key, wanted) = (&test_keys()[0], &test_keys()[1]);
    let first = server_with(busy_key).await;
    let second = server_with(wanted).await;
    let budget = FetchBudget {
        per_second: 0.01,
        burst: 3,
    };
    let keys = InstallKeys::with_fetch_budget(
        vec![first.base_url(), second.base_url()],
        Duration::from_secs(5),
        budget,
    );
    // Three kids the first server has spend its whole budget, none of the second's.
    for _ in 0..3 {
        let kid = unknown_kid();
        first.serve_raw(&kid.to_string(), Some(busy_key.public_pem().to_owned()));
        keys.key(&kid, &host()).await.unwrap();
    }
    assert_eq!(second.total_fetches(), 0);

    keys.key(&kid(wanted), &host())
        .await
        .expect("the second server still has its budget");
    assert_eq!(
        first.fetches(&wanted.kid),
        0,
        "the spent server was skipped"
    );
    assert_eq!(second.fetches(&wanted.kid), 1);
    assert_eq!(keys.over_budget(), 1);
}

/// Through the app: an install succeeds while the first key server is down, and is refused
/// `401` when every key server says it does not know the kid.
#[tokio::test]
async fn installs_use_the_next_key_server_and_are_refused_when_all_say_404() {
    use crate::helpers::app::{shared_signing_key, spawn_app_with, Backend, Options, Site};

    let holder = server_with(&shared_signing_key()).await;
    let app = spawn_app_with(Options::new(Backend::Embedded).set(
        "WARDEN_KEYS_URL",
        format!("{},{}", dead_server(), holder.base_url()),
    ))
    .await;
    let site = Site::new();
    app.installed(&site).await;
    assert!(app.stored(&site.client_key).await.is_some());
    assert_eq!(holder.fetches(&shared_signing_key().kid), 1);

    let (a, b) = (
        server_with(&test_keys()[0]).await,
        server_with(&test_keys()[1]).await,
    );
    let app = spawn_app_with(Options::new(Backend::Embedded).set(
        "WARDEN_KEYS_URL",
        format!("{},{}", a.base_url(), b.base_url()),
    ))
    .await;
    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 401);
    assert!(app.stored(&site.client_key).await.is_none());
    assert_eq!(a.total_fetches() + b.total_fetches(), 2, "both were asked");
}
