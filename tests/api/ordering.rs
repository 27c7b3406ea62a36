//! Event ordering and squatters, from the attacker's side: a leaked shared secret or an
//! unsigned (legacy) install must never hold Atlassian's own signed events out, nor retire or
//! get linked from a genuine site; a product clock a second ahead must not lose an uninstall;
//! a junk install token must cost no key fetch.

use crate::helpers::app::{
    both_stores, error_of, spawn_app, spawn_app_with, Backend, Options, Site, TestApp,
};
use connect_protocol::jwt::{self, Audience, Claims};
use connect_protocol::qsh::CanonicalRequest;
use connect_protocol::{claims, domain::SharedSecret};
use connect_warden::store::InstallState;

/// An HS256 lifecycle token for `path` issued at `iat` (in the future, if asked).
fn tenant_token_at(app: &TestApp, client_key: &str, secret: &str, path: &str, iat: i64) -> String {
    let base = &app.base_path;
    let request = CanonicalRequest::new("POST", &format!("{base}{path}"), "", base);
    let claims = claims::tenant_claims(client_key, &request, iat, iat + 120);
    jwt::sign_hs256(&claims, &SharedSecret::parse(secret).unwrap())
}

/// Atlassian's RS256 token for `path`, issued at `iat`.
fn install_token_at(app: &TestApp, client_key: &str, path: &str, iat: i64) -> String {
    let mut claims: Claims = app.install_claims(client_key, path);
    claims.exp = Some(iat + 120 + (claims.exp.unwrap() - claims.iat.unwrap()));
    claims.iat = Some(iat);
    app.sign_install(&claims)
}

async fn post(app: &TestApp, site: &Site, event: &str, token: &str) -> u16 {
    app.post_lifecycle(&format!("/{event}"), Some(token), &site.body(event))
        .await
        .status()
        .as_u16()
}

/// Someone holding a tenant's leaked secret sends `enabled` dated 29 s ahead (inside the
/// leeway). Atlassian's signed secret roll and signed uninstall that follow still land, and
/// the leaked secret stops working.
async fn a_leaked_secret_cannot_hold_back_atlassians_signed_events(backend: Backend) {
    let app = spawn_app_with(Options::new(backend).set("WARDEN_SECRET_GRACE_SECONDS", "0")).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let leaked = site.secret.clone();

    let now = jwt::now();
    let bump = tenant_token_at(&app, &site.client_key, &leaked, "/enabled", now + 29);
    assert_eq!(post(&app, &site, "enabled", &bump).await, 204);

    site.secret = "rolled-by-atlassian".into();
    let roll = install_token_at(&app, &site.client_key, "/installed", now);
    assert_eq!(
        post(&app, &site, "installed", &roll).await,
        204,
        "the signed roll is refused"
    );
    assert_eq!(app.tenant_status(&site, "rolled-by-atlassian").await, 200);
    assert_eq!(app.tenant_status(&site, &leaked).await, 401);

    let bump = tenant_token_at(
        &app,
        &site.client_key,
        "rolled-by-atlassian",
        "/disabled",
        now + 29,
    );
    assert_eq!(post(&app, &site, "disabled", &bump).await, 204);
    let uninstall = install_token_at(&app, &site.client_key, "/uninstalled", now + 1);
    assert_eq!(post(&app, &site, "uninstalled", &uninstall).await, 204);
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.state, InstallState::Uninstalled);
    assert!(
        stored.last_tenant_event_iat <= jwt::now(),
        "a stored event time is never ahead of the server clock"
    );
}

/// A product whose clock runs a second ahead sends `disabled` at t+1, then Atlassian's signed
/// `uninstalled` at t: both land, and the installation ends uninstalled.
async fn disabled_ahead_then_uninstalled_both_land(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    app.installed(&site).await;
    let t = jwt::now();
    let disabled = tenant_token_at(&app, &site.client_key, &site.secret, "/disabled", t + 1);
    assert_eq!(post(&app, &site, "disabled", &disabled).await, 204);
    let uninstalled = install_token_at(&app, &site.client_key, "/uninstalled", t);
    assert_eq!(post(&app, &site, "uninstalled", &uninstalled).await, 204);
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(stored.state, InstallState::Uninstalled);
}

/// Signed events still refuse an older signed event (a captured old install cannot roll the
/// secret back).
async fn an_older_signed_install_is_still_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    let t = jwt::now();
    let first = install_token_at(&app, &site.client_key, "/installed", t);
    assert_eq!(post(&app, &site, "installed", &first).await, 204);
    site.secret = "older".into();
    let older = install_token_at(&app, &site.client_key, "/installed", t - 10);
    assert_eq!(post(&app, &site, "installed", &older).await, 409);
}

/// A tenant-signed `disabled` issued before Atlassian's last signed install and delivered
/// after it is stale: it cannot undo what the signed event established.
async fn a_tenant_event_older_than_the_last_signed_one_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let site = Site::new();
    let t = jwt::now();
    let install = install_token_at(&app, &site.client_key, "/installed", t);
    assert_eq!(post(&app, &site, "installed", &install).await, 204);
    let delayed = tenant_token_at(&app, &site.client_key, &site.secret, "/disabled", t - 60);
    assert_eq!(post(&app, &site, "disabled", &delayed).await, 409);
    assert!(app.stored(&site.client_key).await.unwrap().enabled);
    // Within the leeway of the signed event it still lands (clock skew between the two).
    let skewed = tenant_token_at(&app, &site.client_key, &site.secret, "/disabled", t - 5);
    assert_eq!(post(&app, &site, "disabled", &skewed).await, 204);
}

/// Legacy mode: someone holding a genuine tenant's leaked secret rolls it ten times with
/// HS256 reinstalls, pushing the secret of Atlassian's signed install out of the history. The
/// tenant is still known as installed by Atlassian: the next reinstall cannot move it to a
/// staging site (where staging-signed tokens would then rewrite it).
async fn secret_rolls_do_not_erase_that_atlassian_installed_a_tenant(backend: Backend) {
    let app = legacy_app(backend).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let now = jwt::now();
    for i in 0..connect_warden::secrets::SECRET_HISTORY_LEN as i64 {
        let token = tenant_token_at(&app, &site.client_key, &site.secret, "/installed", now + i);
        site.secret = format!("rolled-by-the-attacker-{i}");
        assert_eq!(
            post(&app, &site, "installed", &token).await,
            204,
            "roll {i}"
        );
    }
    let stored = app.stored(&site.client_key).await.unwrap();
    assert!(
        stored.secrets.iter().all(|s| !s.signed),
        "the signed secret is out of the history"
    );
    let token = tenant_token_at(&app, &site.client_key, &site.secret, "/installed", now + 11);
    site.base_url = "https://moved.jira-dev.com".into();
    let response = app
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response).await.contains("production and staging"));
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_ne!(stored.base_url.as_str(), "https://moved.jira-dev.com");
}

async fn legacy_app(backend: Backend) -> TestApp {
    spawn_app_with(
        Options::new(backend)
            .legacy()
            .set("WARDEN_SECRET_GRACE_SECONDS", "0"),
    )
    .await
}

/// Legacy mode: a squatter installs unsigned on a real site's baseUrl and bumps its event time
/// with its own secret. The site's genuine signed first install stays active, is neither
/// superseded by the squatter nor linked to it, and the squatter is not retired through it.
async fn a_legacy_squatter_cannot_retire_or_be_linked_from_the_genuine_site(backend: Backend) {
    let app = legacy_app(backend).await;
    let genuine = Site::new();
    let mut squatter = Site::new();
    squatter.base_url = genuine.base_url.clone();
    let response = app
        .post_lifecycle("/installed", None, &squatter.body("installed"))
        .await;
    assert_eq!(response.status(), 204);
    let bump = tenant_token_at(
        &app,
        &squatter.client_key,
        &squatter.secret,
        "/enabled",
        jwt::now() + 29,
    );
    assert_eq!(post(&app, &squatter, "enabled", &bump).await, 204);

    app.installed(&genuine).await;
    assert_eq!(app.tenant_status(&genuine, &genuine.secret).await, 200);
    let stored = app.stored(&genuine.client_key).await.unwrap();
    assert_eq!(stored.superseded_by, None);
    assert!(stored.supersedes.is_empty(), "{:?}", stored.supersedes);
    let squatted = app.stored(&squatter.client_key).await.unwrap();
    assert_eq!(
        squatted.superseded_by, None,
        "a squatter is not the site's predecessor"
    );
}

/// Legacy mode: a clientKey squatted before its first install, its event time bumped with the
/// squatter's secret and its baseUrl moved to a staging host: Atlassian's signed install still
/// takes over, and the squatter's secret stops working.
async fn a_signed_install_takes_over_a_squatted_client_key(backend: Backend) {
    let app = legacy_app(backend).await;
    let genuine = Site::new();
    let mut squatter = genuine.clone();
    squatter.secret = "squatter-secret".into();
    squatter.base_url = "https://squatted.jira-dev.com".into();
    let response = app
        .post_lifecycle("/installed", None, &squatter.body("installed"))
        .await;
    assert_eq!(response.status(), 204);
    let bump = tenant_token_at(
        &app,
        &squatter.client_key,
        "squatter-secret",
        "/enabled",
        jwt::now() + 29,
    );
    assert_eq!(post(&app, &squatter, "enabled", &bump).await, 204);

    app.installed(&genuine).await;
    assert_eq!(app.tenant_status(&genuine, &genuine.secret).await, 200);
    assert_eq!(app.tenant_status(&genuine, "squatter-secret").await, 401);
    let stored = app.stored(&genuine.client_key).await.unwrap();
    assert_eq!(stored.base_url.as_str(), genuine.base_url);
}

/// Install tokens that fail a check on their claims (wrong `aud`, wrong `qsh`, `iss` not the
/// body's clientKey, expired, a disallowed host) with a new `kid` each: refused without a
/// single request to the key server, so junk cannot spend the fetch budget genuine installs
/// with a new key need.
async fn junk_install_tokens_cost_no_key_fetch(backend: Backend) {
    let app = spawn_app(backend).await;
    let before = app.keys.total_fetches();
    let now = jwt::now();
    for i in 0..40 {
        let site = Site::new();
        let mut claims = app.install_claims(&site.client_key, "/installed");
        let mut body = site.body("installed");
        match i % 5 {
            0 => claims.aud = Some(Audience::One("https://another-app.example.com".into())),
            1 => claims.qsh = Some("0".repeat(64)),
            2 => claims.iss = Some("someone-else".into()),
            3 => {
                claims.iat = Some(now - 3600);
                claims.exp = Some(now - 3000);
            }
            _ => body["baseUrl"] = "https://evil.example.com".into(),
        }
        let kid = uuid::Uuid::new_v4().to_string();
        let ring = app.keys.keyring().read().unwrap().current().clone();
        let token = devtenant::sign_rs256_with_kid(&ring, &kid, &claims);
        let response = app.post_lifecycle("/installed", Some(&token), &body).await;
        assert!(
            matches!(response.status().as_u16(), 401 | 403),
            "junk token {i}: {}",
            response.status()
        );
    }
    assert_eq!(app.keys.total_fetches(), before, "junk made key fetches");
    assert_eq!(app.stored_count().await, 0);

    // A genuine install with a kid not seen before still gets its key.
    let site = Site::new();
    app.installed(&site).await;
}

both_stores!(
    a_leaked_secret_cannot_hold_back_atlassians_signed_events,
    disabled_ahead_then_uninstalled_both_land,
    an_older_signed_install_is_still_refused,
    a_tenant_event_older_than_the_last_signed_one_is_refused,
    secret_rolls_do_not_erase_that_atlassian_installed_a_tenant,
    a_legacy_squatter_cannot_retire_or_be_linked_from_the_genuine_site,
    a_signed_install_takes_over_a_squatted_client_key,
    junk_install_tokens_cost_no_key_fetch,
);

/// Install callbacks whose claims are all right but whose `kid`s are made up (the signature,
/// the only thing an attacker cannot make, is never reached): from one address they cost at
/// most that address's own small fetch budget, so a genuine install with a new key, from
/// another address, still gets its key.
#[tokio::test]
async fn one_source_cannot_spend_the_global_key_fetch_budget() {
    let app = spawn_app(Backend::Embedded).await;
    let attacker = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let before = app.keys.total_fetches();
    let mut refused_without_fetch = 0;
    for _ in 0..3 * connect_warden::install_keys::FETCH_BURST {
        let site = Site::new();
        let claims = app.install_claims(&site.client_key, "/installed");
        let key = app.keys.keyring().read().unwrap().current().clone();
        let token =
            devtenant::sign_rs256_with_kid(&key, &uuid::Uuid::new_v4().to_string(), &claims);
        let status = attacker
            .post(app.url("/installed"))
            .header("authorization", format!("JWT {token}"))
            .json(&site.body("installed"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        match status {
            401 => {}
            503 => refused_without_fetch += 1,
            other => panic!("unexpected answer {other}"),
        }
    }
    let spent = app.keys.total_fetches() - before;
    let per_source = connect_warden::install_keys::PER_SOURCE_BUDGET;
    assert!(
        spent <= u64::from(per_source.burst) + 2,
        "one source caused {spent} key fetches"
    );
    assert!(refused_without_fetch > 0);

    // Atlassian rotates its key: the genuine install with the new kid gets it.
    app.keys.keyring().write().unwrap().rotate().unwrap();
    let site = Site::new();
    app.installed(&site).await;
}

/// A key fetched by one instance is remembered in the shared store: an instance started while
/// the key server is down verifies installs signed with it.
#[tokio::test]
async fn a_new_instance_verifies_known_kids_while_the_key_server_is_down() {
    let cluster = crate::helpers::app::Cluster::new().await;
    let first = TestApp::spawn(Options::new(Backend::Redis).shared(&cluster)).await;
    first.installed(&Site::new()).await;
    let fetched = cluster.keys.total_fetches();
    assert_eq!(fetched, 1);

    cluster.keys.set_failing(true);
    let second = TestApp::spawn(Options::new(Backend::Redis).shared(&cluster)).await;
    second.installed(&Site::new()).await;
    assert_eq!(
        cluster.keys.total_fetches(),
        fetched,
        "the second instance asked the key server"
    );

    // A kid nobody has seen still needs the key server: 503 while it is down.
    cluster.keys.keyring().write().unwrap().rotate().unwrap();
    let site = Site::new();
    let token = second.install_token(&site.client_key, "/installed");
    let response = second
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(response.status(), 503);
}

/// A key remembered long ago (here: by a version that did not record when) is not trusted on
/// its own. While the key server is down it still verifies; once the key server answers that
/// it no longer knows the kid (a revoked key), installs signed with it are refused and the
/// store forgets it, so no instance started later trusts it again.
#[tokio::test]
async fn a_revoked_install_key_is_not_trusted_from_the_store() {
    let cluster = crate::helpers::app::Cluster::new().await;
    let first = TestApp::spawn(Options::new(Backend::Redis).shared(&cluster)).await;
    first.installed(&Site::new()).await;
    let store = first.state().store.clone();
    let (url, entry) = store.install_keys().await.unwrap().pop().unwrap();
    let (_, pem) = entry
        .split_once('\n')
        .expect("an entry records when it was fetched");
    store.remember_install_key(&url, pem).await.unwrap();

    cluster.keys.set_failing(true);
    let second = TestApp::spawn(Options::new(Backend::Redis).shared(&cluster)).await;
    second.installed(&Site::new()).await;

    cluster.keys.set_failing(false);
    let kid = cluster.keys.keyring().read().unwrap().current().kid.clone();
    cluster.keys.revoke(&kid);
    let third = TestApp::spawn(Options::new(Backend::Redis).shared(&cluster)).await;
    let site = Site::new();
    let token = third.install_token(&site.client_key, "/installed");
    let response = third
        .post_lifecycle("/installed", Some(&token), &site.body("installed"))
        .await;
    assert_eq!(
        response.status(),
        401,
        "an install signed with a revoked key"
    );
    assert!(third.stored(&site.client_key).await.is_none());
    assert!(
        store.install_keys().await.unwrap().is_empty(),
        "the revoked key is still remembered"
    );
}

/// Behind a reverse proxy every callback comes from the proxy's address. With the proxy
/// trusted (`WARDEN_TRUSTED_PROXIES`), the per-source budget applies to the sender it names:
/// junk from one sender does not spend the budget of a genuine install through the same proxy,
/// and an untrusted sender cannot pick its own source by writing `X-Forwarded-For`.
#[tokio::test]
async fn behind_a_trusted_proxy_the_budget_is_per_real_sender() {
    let app =
        spawn_app_with(Options::new(Backend::Embedded).set("WARDEN_TRUSTED_PROXIES", "127.0.0.1"))
            .await;
    let junk = |forwarded_for: &'static str| {
        let site = Site::new();
        let claims = app.install_claims(&site.client_key, "/installed");
        let key = app.keys.keyring().read().unwrap().current().clone();
        let token =
            devtenant::sign_rs256_with_kid(&key, &uuid::Uuid::new_v4().to_string(), &claims);
        app.client
            .post(app.url("/installed"))
            .header("authorization", format!("JWT {token}"))
            .header("x-forwarded-for", forwarded_for)
            .json(&site.body("installed"))
    };
    let per_source = connect_warden::install_keys::PER_SOURCE_BUDGET;
    let before = app.keys.total_fetches();
    for _ in 0..3 * per_source.burst {
        let status = junk("203.0.113.66").send().await.unwrap().status().as_u16();
        assert!(matches!(status, 401 | 503), "{status}");
    }
    let spent = app.keys.total_fetches() - before;
    assert!(spent <= u64::from(per_source.burst) + 1, "{spent} fetches");

    // A sender not behind the proxy cannot claim another source.
    let outsider = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 3]))
        .build()
        .unwrap();
    let before = app.keys.total_fetches();
    for i in 0..3 * per_source.burst {
        let site = Site::new();
        let claims = app.install_claims(&site.client_key, "/installed");
        let key = app.keys.keyring().read().unwrap().current().clone();
        let token =
            devtenant::sign_rs256_with_kid(&key, &uuid::Uuid::new_v4().to_string(), &claims);
        outsider
            .post(app.url("/installed"))
            .header("authorization", format!("JWT {token}"))
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .json(&site.body("installed"))
            .send()
            .await
            .unwrap();
    }
    let spent = app.keys.total_fetches() - before;
    assert!(spent <= u64::from(per_source.burst) + 1, "{spent} fetches");

    // The genuine install through the proxy, for another sender, with Atlassian's new key.
    app.keys.keyring().write().unwrap().rotate().unwrap();
    let site = Site::new();
    let token = app.install_token(&site.client_key, "/installed");
    let response = app
        .client
        .post(app.url("/installed"))
        .header("authorization", format!("JWT {token}"))
        .header("x-forwarded-for", "192.0.2.10")
        .json(&site.body("installed"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
}
