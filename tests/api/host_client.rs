//! The app's calls to the host (`HostClient`) against devtenant's fake host site and
//! authorization server (`FakeHost`), which checks every signature the way Atlassian does.

use std::time::Duration;

use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_warden::error::ApiError;
use connect_warden::host_client::{HostClient, HostClientError};
use connect_warden::store::{InstallState, Installation};
use devtenant::{FakeHost, HostRoute, TenantRecord};
use serde_json::{json, Value};

use crate::helpers::app::{spawn_app_with, Backend, Options, Site};

const APP_KEY: &str = "connect-warden";
const ADDON_PATH: &str = "/rest/atlassian-connect/1/addons/connect-warden";

fn installation(
    client_key: &str,
    base_url: &BaseUrl,
    secret: &str,
    oauth_client_id: Option<&str>,
) -> Installation {
    let mut installation = Installation::new(
        ClientKey::parse(client_key).unwrap(),
        base_url.clone(),
        "jira",
        SharedSecret::parse(secret).unwrap(),
        true,
        0,
    );
    installation.oauth_client_id = oauth_client_id.map(str::to_owned);
    installation.version = 1;
    installation
}

/// A fake host with one tenant, a client pointed at its token endpoint, and the installation
/// as the app would have stored it.
struct Fixture {
    host: FakeHost,
    client: HostClient,
    inst: Installation,
    secret: String,
}

impl Fixture {
    async fn new(base_path: &str) -> Self {
        let host = FakeHost::start("127.0.0.1:0")
            .await
            .expect("fake host starts");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let client_key = format!("ck-{}", &id[..12]);
        let secret = format!("shared-secret-{id}");
        let oauth_client_id = format!("oauth-{}", &id[..10]);
        let base_url = host.add_tenant(TenantRecord {
            client_key: client_key.clone(),
            base_path: base_path.into(),
            shared_secret: SharedSecret::parse(&secret).unwrap(),
            oauth_client_id: oauth_client_id.clone(),
            app_key: APP_KEY.into(),
        });
        let client = HostClient::new(APP_KEY.into(), host.token_url(), Duration::from_secs(10));
        let inst = installation(&client_key, &base_url, &secret, Some(&oauth_client_id));
        Self {
            host,
            client,
            inst,
            secret,
        }
    }

    fn token_requests(&self) -> u64 {
        self.host.requests(HostRoute::Token)
    }
}

fn assert_no_secrets(err: &HostClientError, secrets: &[&str]) {
    let shown = [
        format!("{err}"),
        format!("{err:?}"),
        ApiError::from(err.clone()).to_string(),
    ];
    for text in &shown {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret:?} appears in {text:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// As the app

#[tokio::test]
async fn as_app_addon_check_passes_on_a_root_base_url() {
    let f = Fixture::new("").await;
    assert_eq!(f.inst.base_url.path(), format!("/t/{}", f.inst.client_key));
    let answer: Value = f
        .client
        .as_app(&f.inst)
        .get(ADDON_PATH)
        .send_json()
        .await
        .unwrap();
    assert_eq!(answer, json!({"key": APP_KEY, "state": "ENABLED"}));
    assert_eq!(f.host.requests(HostRoute::Addon), 1);
}

#[tokio::test]
async fn as_app_addon_check_passes_on_a_wiki_base_url() {
    let f = Fixture::new("/wiki").await;
    assert!(
        f.inst.base_url.as_str().ends_with("/wiki"),
        "{}",
        f.inst.base_url
    );
    let response = f
        .client
        .as_app(&f.inst)
        .get(ADDON_PATH)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    // Relative paths without a leading slash go to the same place.
    let answer: Value = f
        .client
        .as_app(&f.inst)
        .get(ADDON_PATH.trim_start_matches('/'))
        .send_json()
        .await
        .unwrap();
    assert_eq!(answer["state"], "ENABLED");
}

#[tokio::test]
async fn as_app_another_app_key_is_not_found_but_authenticated() {
    let f = Fixture::new("").await;
    let response = f
        .client
        .as_app(&f.inst)
        .get("/rest/atlassian-connect/1/addons/someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn query_parameters_are_signed_as_sent() {
    for base_path in ["", "/wiki"] {
        let f = Fixture::new(base_path).await;
        let echo: Value = f
            .client
            .as_app(&f.inst)
            .get("/rest/api/3/search?inline=a%20b&z=last")
            .query(&[
                ("jql", "project = ABC order by key"),
                ("q", "connect*"),
                ("ids", "20"),
                ("ids", "2"),
                ("ids", "-1"),
                ("ids", "10"),
                ("tilde", "a~b"),
                ("plus", "1+1"),
                ("unicode", "é"),
            ])
            .send_json()
            .await
            .unwrap_or_else(|e| panic!("base path {base_path:?}: {e}"));
        assert_eq!(echo["auth"], "jwt");
        assert_eq!(echo["iss"], APP_KEY);
        assert_eq!(echo["method"], "GET");
        assert_eq!(echo["path"], "/rest/api/3/search");
        let canonical = echo["canonical"].as_str().unwrap();
        assert_eq!(
            canonical,
            "GET&/rest/api/3/search&ids=-1,10,2,20&inline=a%20b&jql=project%20%3D%20ABC%20order%20by%20key\
             &plus=1%2B1&q=connect%2A&tilde=a~b&unicode=%C3%A9&z=last"
        );
    }
}

#[tokio::test]
async fn every_method_carries_a_matching_signature_and_json_body() {
    let f = Fixture::new("/wiki").await;
    let app = f.client.as_app(&f.inst);
    let body = json!({"title": "A page", "n": 1});
    for (request, method) in [
        (app.post("/rest/api/content").json(&body), "POST"),
        (
            app.put("/rest/api/content/1")
                .json(&body)
                .query(&[("status", "current")]),
            "PUT",
        ),
        (app.delete("/rest/api/content/1"), "DELETE"),
        (app.get("/rest/api/content/1/"), "GET"),
    ] {
        let echo: Value = request
            .send_json()
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(echo["method"], method);
        if method == "POST" || method == "PUT" {
            assert_eq!(echo["body"], body);
        }
    }
    assert_eq!(f.host.requests(HostRoute::Rest), 4);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_by_the_fake_host() {
    let f = Fixture::new("").await;
    let wrong = installation(
        f.inst.client_key.as_str(),
        &f.inst.base_url,
        "not-the-shared-secret",
        f.inst.oauth_client_id.as_deref(),
    );
    let response = f
        .client
        .as_app(&wrong)
        .get(ADDON_PATH)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "signature", "{body}");

    let err = f
        .client
        .as_app(&wrong)
        .get(ADDON_PATH)
        .send_checked()
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));
    assert!(err.to_string().contains("401"), "{err}");
    assert_no_secrets(&err, &["not-the-shared-secret", &f.secret]);

    // Another app key in `iss` is refused as well.
    let other = HostClient::new(
        "other-app".into(),
        f.host.token_url(),
        Duration::from_secs(5),
    );
    let response = other.as_app(&f.inst).get(ADDON_PATH).send().await.unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn paths_cannot_leave_the_site() {
    let f = Fixture::new("/wiki").await;
    let app = f.client.as_app(&f.inst);
    for path in ["/../../oauth2/token", "/rest/../../../x", "/x#fragment"] {
        let err = app.get(path).send().await.unwrap_err();
        assert!(
            matches!(err, HostClientError::InvalidPath { .. }),
            "{path}: {err}"
        );
    }
    assert_eq!(f.host.requests(HostRoute::Rest), 0);
}

// ---------------------------------------------------------------------------------------------
// As a user

#[tokio::test]
async fn as_user_token_is_accepted_by_the_host() {
    let f = Fixture::new("/wiki").await;
    let token = f
        .client
        .as_user(&f.inst, "557058:user-1", &["write", "READ"])
        .await
        .unwrap();
    assert_eq!(token.token_type(), "Bearer");
    assert_eq!(token.scopes(), "READ WRITE");
    assert_eq!(f.host.last_token_scope().as_deref(), Some("READ WRITE"));
    assert!(!format!("{token:?}").contains(token.expose_secret()));

    let echo: Value = f
        .client
        .as_user_requests(&f.inst, "557058:user-1", &["READ", "WRITE"])
        .await
        .unwrap()
        .get("/rest/api/user-echo")
        .query(&[("expand", "groups")])
        .send_json()
        .await
        .unwrap();
    assert_eq!(echo["auth"], "bearer");
    assert_eq!(echo["accountId"], "557058:user-1");
    assert_eq!(echo["scope"], "READ WRITE");
    assert_eq!(
        f.token_requests(),
        1,
        "the second call used the cached token"
    );
    assert_eq!(f.host.token_requests_for(f.inst.client_key.as_str()), 1);
}

#[tokio::test]
async fn tokens_are_cached_per_account_and_scopes() {
    let f = Fixture::new("").await;
    let a1 = f
        .client
        .as_user(&f.inst, "acct-a", &["READ"])
        .await
        .unwrap();
    let a2 = f
        .client
        .as_user(&f.inst, "acct-a", &["read"])
        .await
        .unwrap();
    assert_eq!(a1.expose_secret(), a2.expose_secret());
    assert_eq!(f.token_requests(), 1);

    let rw = f
        .client
        .as_user(&f.inst, "acct-a", &["READ", "WRITE"])
        .await
        .unwrap();
    assert_ne!(rw.expose_secret(), a1.expose_secret());
    assert_eq!(f.token_requests(), 2);
    f.client
        .as_user(&f.inst, "acct-a", &["WRITE", "READ", "read"])
        .await
        .unwrap();
    assert_eq!(
        f.token_requests(),
        2,
        "same scopes in another order and case"
    );

    f.client
        .as_user(&f.inst, "acct-b", &["READ"])
        .await
        .unwrap();
    assert_eq!(f.token_requests(), 3);
    f.client
        .as_user(&f.inst, "acct-b", &["READ"])
        .await
        .unwrap();
    assert_eq!(f.token_requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_make_one_token_request() {
    let f = Fixture::new("").await;
    f.host.set_token_delay(Duration::from_millis(300));
    let calls = (0..20).map(|_| f.client.as_user(&f.inst, "acct-c", &["READ", "WRITE"]));
    let tokens = futures_util::future::join_all(calls).await;
    let first = tokens[0].as_ref().unwrap().expose_secret().to_owned();
    for token in &tokens {
        assert_eq!(token.as_ref().unwrap().expose_secret(), first);
    }
    assert_eq!(f.token_requests(), 1);
}

#[tokio::test]
async fn forget_tenant_drops_only_that_tenants_tokens() {
    let f = Fixture::new("").await;
    let other_key = format!("{}-b", f.inst.client_key);
    let other_url = f.host.add_tenant(TenantRecord {
        client_key: other_key.clone(),
        base_path: String::new(),
        shared_secret: SharedSecret::parse("other-secret").unwrap(),
        oauth_client_id: "oauth-other".into(),
        app_key: APP_KEY.into(),
    });
    let other = installation(&other_key, &other_url, "other-secret", Some("oauth-other"));

    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    f.client.as_user(&other, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 2);

    f.client.forget_tenant(&f.inst.client_key);
    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 3, "a new request after forget_tenant");
    f.client.as_user(&other, "acct", &["READ"]).await.unwrap();
    assert_eq!(
        f.token_requests(),
        3,
        "the other tenant's token is still cached"
    );

    f.client.forget_all();
    f.client.as_user(&other, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 4);
}

/// A token request still in flight when every token is forgotten (invalidation messages may
/// have been lost) must not leave its answer in the cache: the next call asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_all_covers_a_token_request_in_flight() {
    let f = Fixture::new("").await;
    f.host.set_token_delay(Duration::from_millis(500));
    let in_flight = {
        let (client, inst) = (f.client.clone(), f.inst.clone());
        tokio::spawn(async move { client.as_user(&inst, "acct", &["READ"]).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.client.forget_all();
    in_flight.await.unwrap().unwrap();
    assert_eq!(f.token_requests(), 1);
    f.host.set_token_delay(Duration::ZERO);
    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(
        f.token_requests(),
        2,
        "the forgotten token was served from the cache"
    );
}

#[tokio::test]
async fn a_token_is_replaced_shortly_before_it_expires() {
    let f = Fixture::new("").await;
    // 62 s with the default 60 s margin: served from the cache for about 2 s.
    f.host.set_token_expires_in(62);
    let first = f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    let again = f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(first.expose_secret(), again.expose_secret());
    assert_eq!(f.token_requests(), 1);

    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let renewed = f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_ne!(renewed.expose_secret(), first.expose_secret());
    assert_eq!(f.token_requests(), 2);
}

#[tokio::test]
async fn a_token_shorter_lived_than_the_margin_is_not_cached() {
    let f = Fixture::new("").await;
    f.host.set_token_expires_in(30);
    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 2);

    // A smaller margin keeps it.
    let client = HostClient::new(APP_KEY.into(), f.host.token_url(), Duration::from_secs(5))
        .with_token_margin(Duration::from_secs(5));
    client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 3);
}

#[tokio::test]
async fn an_outdated_oauth_client_id_is_named_in_the_error() {
    let f = Fixture::new("").await;
    let old = f.inst.oauth_client_id.clone().unwrap();
    // A site import: the authorization server only accepts the new oauthClientId.
    assert!(f
        .host
        .set_oauth_client_id(f.inst.client_key.as_str(), "oauth-after-import"));

    let err = f
        .client
        .as_user(&f.inst, "acct", &["READ"])
        .await
        .unwrap_err();
    match &err {
        HostClientError::OutdatedOauthClientId {
            client_key,
            oauth_client_id,
            error,
            ..
        } => {
            assert_eq!(client_key, &f.inst.client_key);
            assert_eq!(oauth_client_id, &old);
            assert_eq!(error.as_deref(), Some("invalid_grant"));
        }
        other => panic!("expected OutdatedOauthClientId, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("oauthClientId"), "{message}");
    assert!(message.contains(&old), "{message}");
    assert!(message.contains(f.inst.client_key.as_str()), "{message}");
    assert!(message.contains("invalid_grant"), "{message}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400));
    assert_no_secrets(&err, &[&f.secret]);

    // Failures are not cached: the next call asks again.
    f.client
        .as_user(&f.inst, "acct", &["READ"])
        .await
        .unwrap_err();
    assert_eq!(f.token_requests(), 2);

    // The reinstalled installation carries the new id and works without forget_tenant.
    let mut current = f.inst.clone();
    current.oauth_client_id = Some("oauth-after-import".into());
    f.client.as_user(&current, "acct", &["READ"]).await.unwrap();
}

#[tokio::test]
async fn a_changed_oauth_client_id_is_never_served_the_old_token() {
    let f = Fixture::new("").await;
    let old = f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    f.host
        .set_oauth_client_id(f.inst.client_key.as_str(), "oauth-new");
    let mut changed = f.inst.clone();
    changed.oauth_client_id = Some("oauth-new".into());
    // No forget_tenant call: the oauthClientId is part of the cache key.
    let new = f.client.as_user(&changed, "acct", &["READ"]).await.unwrap();
    assert_ne!(new.expose_secret(), old.expose_secret());
    assert_eq!(f.token_requests(), 2);
}

#[tokio::test]
async fn other_token_endpoint_failures_are_not_blamed_on_the_oauth_client_id() {
    let f = Fixture::new("").await;
    f.host.set_token_failure(Some(503));
    let err = f
        .client
        .as_user(&f.inst, "acct", &["READ"])
        .await
        .unwrap_err();
    assert!(matches!(err, HostClientError::Status { .. }), "{err:?}");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(503));
    assert!(!err.to_string().contains("oauthClientId"), "{err}");
    assert_no_secrets(&err, &[&f.secret]);
}

#[tokio::test]
async fn no_oauth_client_id_fails_without_a_request() {
    let f = Fixture::new("").await;
    for missing in [None, Some(""), Some("  ")] {
        let mut inst = f.inst.clone();
        inst.oauth_client_id = missing.map(str::to_owned);
        let err = f
            .client
            .as_user(&inst, "acct", &["READ"])
            .await
            .unwrap_err();
        assert!(
            matches!(err, HostClientError::NoOauthClientId { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("oauthClientId"), "{err}");
        assert!(
            err.to_string().contains(f.inst.client_key.as_str()),
            "{err}"
        );
    }
    let err = f
        .client
        .as_user_requests(
            &{
                let mut inst = f.inst.clone();
                inst.oauth_client_id = None;
                inst
            },
            "acct",
            &["READ"],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HostClientError::NoOauthClientId { .. }));
    assert_eq!(f.token_requests(), 0);
}

/// After a site import the old installation's oauthClientId is obsolete and must never be used
/// again, even though the (fake) authorization server would still honour it and a token for it
/// may still be cached.
#[tokio::test]
async fn a_superseded_installation_never_gets_a_user_token() {
    let f = Fixture::new("").await;
    f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    assert_eq!(f.token_requests(), 1);

    let successor = ClientKey::parse("ck-imported-site").unwrap();
    let mut superseded = f.inst.clone();
    superseded.superseded_by = Some(successor.clone());
    for account in ["acct", "other-acct"] {
        let err = f
            .client
            .as_user(&superseded, account, &["READ"])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HostClientError::Superseded { client_key, successor: s }
                if *client_key == f.inst.client_key && *s == successor),
            "{account}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("superseded by ck-imported-site"),
            "{message}"
        );
        assert_eq!(err.status(), None);
        assert!(
            matches!(ApiError::from(err.clone()), ApiError::Upstream(m) if m.contains("superseded"))
        );
        assert_no_secrets(&err, &[&f.secret]);
    }
    let err = f
        .client
        .as_user_requests(&superseded, "acct", &["READ"])
        .await
        .unwrap_err();
    assert!(matches!(err, HostClientError::Superseded { .. }), "{err:?}");
    assert_eq!(
        f.token_requests(),
        1,
        "a superseded installation reached the token endpoint"
    );
    assert_eq!(f.host.requests(HostRoute::Rest), 0);
}

#[tokio::test]
async fn an_uninstalled_installation_never_gets_a_user_token() {
    let f = Fixture::new("").await;
    let mut uninstalled = f.inst.clone();
    uninstalled.state = InstallState::Uninstalled;
    let err = f
        .client
        .as_user(&uninstalled, "acct", &["READ"])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HostClientError::Uninstalled { client_key } if *client_key == f.inst.client_key),
        "{err:?}"
    );
    assert!(err.to_string().contains("uninstalled"), "{err}");
    assert!(f
        .client
        .as_user_requests(&uninstalled, "acct", &["READ"])
        .await
        .is_err());
    assert_eq!(f.token_requests(), 0);
}

#[tokio::test]
async fn a_superseded_installation_sends_nothing_as_the_app() {
    let f = Fixture::new("/wiki").await;
    let mut superseded = f.inst.clone();
    superseded.superseded_by = Some(ClientKey::parse("ck-imported-site").unwrap());
    let app = f.client.as_app(&superseded);
    let refused = |result: Result<_, HostClientError>, what: &str| match result {
        Err(HostClientError::Superseded { .. }) => {}
        Err(e) => panic!("{what}: wrong error {e:?}"),
        Ok(_) => panic!("{what}: not refused"),
    };
    refused(app.get(ADDON_PATH).build().map(drop), "build");
    refused(app.get(ADDON_PATH).send().await.map(drop), "send");
    refused(
        app.get(ADDON_PATH).send_checked().await.map(drop),
        "send_checked",
    );
    refused(
        app.post("/rest/api/content")
            .json(&json!({"title": "x"}))
            .query(&[("a", "1")])
            .send_json::<Value>()
            .await
            .map(drop),
        "send_json",
    );
    refused(
        app.delete("/../../escape").send().await.map(drop),
        "a bad path too",
    );
    assert_eq!(f.host.requests(HostRoute::Addon), 0);
    assert_eq!(f.host.requests(HostRoute::Rest), 0);
    // The same installation before the import was served: only the import stops it.
    let answer: Value = f
        .client
        .as_app(&f.inst)
        .get(ADDON_PATH)
        .send_json()
        .await
        .unwrap();
    assert_eq!(answer["state"], "ENABLED");
}

#[tokio::test]
async fn bad_scopes_and_account_ids_fail_without_a_request() {
    let f = Fixture::new("").await;
    for scopes in [&[][..], &["READ&scope=ADMIN"][..], &["rëad"][..]] {
        assert!(
            f.client.as_user(&f.inst, "acct", scopes).await.is_err(),
            "{scopes:?}"
        );
    }
    for account in ["", "a b", "a\nb"] {
        assert!(
            f.client.as_user(&f.inst, account, &["READ"]).await.is_err(),
            "{account:?}"
        );
    }
    assert_eq!(f.token_requests(), 0);
}

#[tokio::test]
async fn errors_never_show_the_secret_or_the_access_token() {
    let f = Fixture::new("").await;
    let requests = f
        .client
        .as_user_requests(&f.inst, "acct", &["READ"])
        .await
        .unwrap();
    let token = f.client.as_user(&f.inst, "acct", &["READ"]).await.unwrap();
    let access = token.expose_secret().to_owned();

    // The host no longer knows the token: a 401 quoted in the error.
    f.host.revoke_tokens();
    let err = requests
        .get("/rest/api/user-echo")
        .send_checked()
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401));
    assert_no_secrets(&err, &[&f.secret, &access]);

    // A host that cannot be reached.
    let gone = HostClient::new(
        APP_KEY.into(),
        "http://127.0.0.1:9/oauth2/token".into(),
        Duration::from_secs(2),
    );
    let err = gone.as_user(&f.inst, "acct", &["READ"]).await.unwrap_err();
    assert!(matches!(err, HostClientError::Request { .. }), "{err:?}");
    assert_no_secrets(&err, &[&f.secret]);
    let mut unreachable = f.inst.clone();
    unreachable.base_url = BaseUrl::parse("http://127.0.0.1:9/wiki").unwrap();
    let err = gone
        .as_app(&unreachable)
        .get(ADDON_PATH)
        .send()
        .await
        .unwrap_err();
    assert_no_secrets(&err, &[&f.secret]);
}

// ---------------------------------------------------------------------------------------------
// Through the real app

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_made_through_the_app_calls_the_host() {
    let host = FakeHost::start("127.0.0.1:0").await.unwrap();
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_PRODUCT_HOSTS", "127.0.0.1")
            .set("WARDEN_OAUTH_TOKEN_URL", host.token_url()),
    )
    .await;
    let app_key = app.state().settings.app_key.clone();
    let mut site = Site::new();
    let base_url = host.add_tenant(TenantRecord {
        client_key: site.client_key.clone(),
        base_path: "/wiki".into(),
        shared_secret: SharedSecret::parse(&site.secret).unwrap(),
        oauth_client_id: site.oauth_client_id.clone(),
        app_key: app_key.clone(),
    });
    site.base_url = base_url.to_string();
    app.installed(&site).await;

    let inst = app
        .stored(&site.client_key)
        .await
        .expect("the install was stored");
    assert_eq!(inst.base_url, base_url);
    let answer: Value = app
        .state()
        .host
        .as_app(&inst)
        .get(&format!("/rest/atlassian-connect/1/addons/{app_key}"))
        .send_json()
        .await
        .unwrap();
    assert_eq!(answer["key"], app_key.as_str());
    assert_eq!(answer["state"], "ENABLED");

    let echo: Value = app
        .state()
        .host
        .as_user_requests(&inst, "557058:admin", &["READ"])
        .await
        .unwrap()
        .get("/rest/api/user-echo")
        .send_json()
        .await
        .unwrap();
    assert_eq!(echo["accountId"], "557058:admin");
    assert_eq!(host.requests(HostRoute::Token), 1);
}

/// An uninstall processed by the app drops the installation's cached impersonation tokens:
/// after a reinstall the next as-user call asks the authorization server again.
#[tokio::test]
async fn a_lifecycle_write_drops_cached_impersonation_tokens() {
    let host = FakeHost::start("127.0.0.1:0").await.unwrap();
    let app = spawn_app_with(
        Options::new(Backend::Redis)
            .set("WARDEN_PRODUCT_HOSTS", "127.0.0.1")
            .set("WARDEN_OAUTH_TOKEN_URL", host.token_url()),
    )
    .await;
    let mut site = Site::new();
    let base_url = host.add_tenant(TenantRecord {
        client_key: site.client_key.clone(),
        base_path: String::new(),
        shared_secret: SharedSecret::parse(&site.secret).unwrap(),
        oauth_client_id: site.oauth_client_id.clone(),
        app_key: app.state().settings.app_key.clone(),
    });
    site.base_url = base_url.to_string();
    app.installed(&site).await;
    let inst = app.stored(&site.client_key).await.unwrap();

    app.state()
        .host
        .as_user(&inst, "557058:admin", &["READ"])
        .await
        .unwrap();
    app.state()
        .host
        .as_user(&inst, "557058:admin", &["READ"])
        .await
        .unwrap();
    assert_eq!(
        host.token_requests_for(&site.client_key),
        1,
        "the token was not cached"
    );

    let token = app.install_token(&site.client_key, "/uninstalled");
    let response = app
        .post_lifecycle("/uninstalled", Some(&token), &site.body("uninstalled"))
        .await;
    assert_eq!(response.status(), 204);
    app.installed(&site).await;
    let inst = app.stored(&site.client_key).await.unwrap();
    // The drop travels through the invalidation broadcast: allow it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        app.state()
            .host
            .as_user(&inst, "557058:admin", &["READ"])
            .await
            .unwrap();
        if host.token_requests_for(&site.client_key) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cached token survived the uninstall"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
