//! Polite calls to a site (`HostClient`'s `CallPolicy`) against devtenant's fake host playing a
//! rate-limited site: `429`/`503` with `Retry-After`, slow answers, two tenants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_warden::host_client::{CallPolicy, HostClient, HostClientError};
use connect_warden::store::Installation;
use devtenant::{FakeHost, TenantRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};

const APP_KEY: &str = "connect-warden";

/// A fake host with two tenants and a client with `policy`.
struct Site {
    host: FakeHost,
    client: HostClient,
    first: Installation,
    second: Installation,
}

fn tenant(host: &FakeHost) -> Installation {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let client_key = format!("ck-{}", &id[..12]);
    let secret = format!("shared-secret-{id}");
    let base_url: BaseUrl = host.add_tenant(TenantRecord {
        client_key: client_key.clone(),
        base_path: String::new(),
        shared_secret: SharedSecret::parse(&secret).unwrap(),
        oauth_client_id: format!("oauth-{}", &id[..10]),
        app_key: APP_KEY.into(),
    });
    let mut installation = Installation::new(
        ClientKey::parse(&client_key).unwrap(),
        base_url,
        "jira",
        SharedSecret::parse(&secret).unwrap(),
        true,
        0,
    );
    installation.version = 1;
    installation
}

impl Site {
    async fn new(policy: CallPolicy) -> Self {
        let host = FakeHost::start("127.0.0.1:0")
            .await
            .expect("fake host starts");
        let first = tenant(&host);
        let second = tenant(&host);
        let client = HostClient::new(APP_KEY.into(), host.token_url(), Duration::from_secs(10))
            .with_call_policy(policy);
        Self {
            host,
            client,
            first,
            second,
        }
    }

    fn requests(&self, installation: &Installation) -> u64 {
        self.host
            .rest_requests_for(installation.client_key.as_str())
    }
}

fn policy(max_retries: u32) -> CallPolicy {
    CallPolicy {
        max_retries,
        backoff_base: Duration::from_millis(20),
        ..CallPolicy::default()
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_the_wait_and_re_signed() {
    let site = Site::new(policy(3)).await;
    site.host.throttle_rest(1, 429, Some("1"));
    let started = Instant::now();
    let answer: Value = site
        .client
        .as_app(&site.first)
        .get("/rest/api/3/myself")
        .send_json()
        .await
        .expect("the retry succeeds");
    let took = started.elapsed();
    // The fake host checks the JWT of every request, the retry's included.
    assert_eq!(answer["auth"], "jwt");
    assert_eq!(site.requests(&site.first), 2, "one retry");
    assert!(took >= Duration::from_millis(950), "waited only {took:?}");
    let iats = site.host.app_token_iats(site.first.client_key.as_str());
    assert_eq!(iats.len(), 2);
    assert!(
        iats[1] > iats[0],
        "the retry reused the first token: {iats:?}"
    );
}

#[tokio::test]
async fn a_503_with_an_http_date_retry_after_is_retried() {
    let site = Site::new(policy(3)).await;
    let in_a_second =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
    site.host.throttle_rest(1, 503, Some(&in_a_second));
    let started = Instant::now();
    let response = site
        .client
        .as_app(&site.first)
        .delete("/rest/api/3/issue/ABC-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(site.requests(&site.first), 2);
    // The date has a one-second resolution: at least a second of the two is left.
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_post_answered_429_is_not_retried_unless_the_caller_allows_it() {
    let site = Site::new(policy(3)).await;
    site.host.throttle_rest(1, 429, Some("0"));
    let err = site
        .client
        .as_app(&site.first)
        .post("/rest/api/3/issue")
        .json(&json!({"fields": {"summary": "once"}}))
        .send_checked()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(site.requests(&site.first), 1, "a POST is never sent twice");

    site.host.throttle_rest(1, 429, Some("0"));
    let answer: Value = site
        .client
        .as_app(&site.first)
        .post("/rest/api/3/issue")
        .json(&json!({"fields": {"summary": "safe to repeat"}}))
        .retry_non_idempotent()
        .send_json()
        .await
        .expect("allowed, the POST is retried");
    assert_eq!(answer["body"]["fields"]["summary"], "safe to repeat");
    assert_eq!(site.requests(&site.first), 3);
}

#[tokio::test]
async fn retries_are_bounded_and_the_error_shows_the_status_and_rate_limit_headers() {
    let site = Site::new(policy(2)).await;
    site.host.throttle_rest(100, 429, None);
    let err = site
        .client
        .as_app(&site.first)
        .get("/rest/api/3/search")
        .send_checked()
        .await
        .unwrap_err();
    assert_eq!(site.requests(&site.first), 3, "the first try and 2 retries");
    let HostClientError::Status {
        status,
        attempts,
        rate_limit,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(*attempts, 3);
    assert_eq!(rate_limit.limit, Some(100));
    assert_eq!(rate_limit.remaining, Some(0));
    assert_eq!(rate_limit.near_limit, Some(true));
    assert_eq!(rate_limit.reason.as_deref(), Some("jira-burst-based"));
    assert_eq!(rate_limit.reset.as_deref(), Some("2026-01-01T00:00Z"));
    assert_eq!(err.rate_limit(), Some(&**rate_limit));
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
}

#[tokio::test]
async fn a_retry_after_beyond_the_longest_wait_is_not_waited_for() {
    let site = Site::new(CallPolicy {
        max_retry_wait: Duration::from_secs(5),
        ..policy(3)
    })
    .await;
    site.host.throttle_rest(1, 429, Some("60"));
    let started = Instant::now();
    let err = site
        .client
        .as_app(&site.first)
        .get("/rest/api/3/search")
        .send_checked()
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(site.requests(&site.first), 1);
    assert_eq!(
        err.rate_limit().and_then(|r| r.retry_after),
        Some(Duration::from_secs(60)),
        "the caller learns when to come back"
    );
}

#[tokio::test]
async fn in_flight_requests_per_site_are_capped_and_other_sites_are_not_held_up() {
    let cap = 3;
    let site = Arc::new(
        Site::new(CallPolicy {
            concurrency_per_site: cap,
            ..policy(0)
        })
        .await,
    );
    site.host.set_rest_delay(Duration::from_millis(300));
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let site = site.clone();
            tokio::spawn(async move {
                site.client
                    .as_app(&site.first)
                    .get(&format!("/rest/api/3/issue/ABC-{i}"))
                    .send_checked()
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    // The first site's queue holds 20 * 300 ms / 3 = 2 s of work; the second site is served
    // at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    site.client
        .as_app(&site.second)
        .get("/rest/api/3/myself")
        .send_checked()
        .await
        .expect("the other site answers");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the second site waited {:?} behind the first one's queue",
        started.elapsed()
    );
    for call in calls {
        call.await.unwrap().expect("every queued call succeeds");
    }
    assert_eq!(site.requests(&site.first), 20);
    let seen = site.host.max_in_flight(site.first.client_key.as_str());
    assert!(seen <= cap as u64, "{seen} in flight at once, cap {cap}");
    assert_eq!(seen, cap as u64, "the cap is used, not serialized");
}
