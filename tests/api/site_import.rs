//! Site imports (seed 003): a new clientKey and oauthClientId on the same baseUrl, with no
//! uninstall for the old one. Only Atlassian's signature may retire the old tenant, and only
//! once the site named by the body's `baseUrl` (which no token covers) confirmed the new
//! installation (docs/PROTOCOL.md §7). The sites live on a fake host on 127.0.0.1 that answers
//! warden's proof call only when it is signed with the secret of the installation it knows.

use std::time::{Duration, Instant};

use crate::helpers::app::{
    both_stores, error_of, eventually, spawn_app, spawn_app_with, Backend, Cluster, Options, Site,
    TestApp, APP_KEY,
};
use crate::helpers::free_port;
use connect_protocol::domain::SharedSecret;
use connect_protocol::jwt;
use connect_warden::store::SiteProof;
use devtenant::{FakeHost, TenantRecord};

/// Longest a site proof may take in these tests (20 ms backoff, 5 attempts).
const PROOF_WITHIN: Duration = Duration::from_secs(15);

async fn fake_host() -> FakeHost {
    FakeHost::start("127.0.0.1:0")
        .await
        .expect("fake host starts")
}

/// warden trusting sites on 127.0.0.1, with `options`' other settings.
async fn app_for_sites(options: Options) -> TestApp {
    spawn_app_with(options.set("WARDEN_PRODUCT_HOSTS", "127.0.0.1")).await
}

/// The key `host` knows a site by: the last segment of its `baseUrl`.
fn site_key(site: &Site) -> &str {
    site.base_url.rsplit('/').next().unwrap()
}

/// A new clientKey on `old`'s baseUrl (an attacker's install names a site this way too).
fn imported(old: &Site) -> Site {
    let mut new = Site::new();
    new.base_url = old.base_url.clone();
    new
}

/// The genuine import of `old`: from now on its host knows the site by the new installation.
fn genuinely_imported(host: &FakeHost, old: &Site) -> Site {
    let new = imported(old);
    assert!(host.set_shared_secret(site_key(old), SharedSecret::parse(&new.secret).unwrap()));
    new
}

/// The stored site proof of `site` once it is no longer pending.
async fn settled_proof(app: &TestApp, site: &Site) -> Option<SiteProof> {
    let start = Instant::now();
    loop {
        let proof = app.stored(&site.client_key).await.unwrap().site_proof;
        if proof != Some(SiteProof::Pending) {
            return proof;
        }
        assert!(
            start.elapsed() < PROOF_WITHIN,
            "the site proof of {} still pending after {PROOF_WITHIN:?}",
            site.client_key
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn import_supersedes_the_old_tenant_and_links_it(backend: Backend) {
    let host = fake_host().await;
    let app = app_for_sites(Options::new(backend)).await;
    let old = Site::on_host(&host, "");
    app.installed(&old).await;
    let new = genuinely_imported(&host, &old);
    app.installed(&new).await;
    assert_eq!(settled_proof(&app, &new).await, Some(SiteProof::Proven));

    let token = app.product_token(
        &old.client_key,
        &old.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    let response = app.tenant(&token).await;
    assert_eq!(response.status(), 403);
    assert!(error_of(response)
        .await
        .contains(&format!("superseded by {}", new.client_key)));

    let body = app.tenant_body(&new).await;
    assert_eq!(body["supersedes"], serde_json::json!([old.client_key]));
    assert_eq!(body["siteProof"], "proven");

    let stored_old = app.stored(&old.client_key).await.unwrap();
    assert_eq!(
        stored_old.superseded_by.as_ref().map(|k| k.as_str()),
        Some(new.client_key.as_str())
    );
    // The old record (and its secret) stays, so the vendor can migrate tenant data.
    assert_eq!(stored_old.current_secret().secret.expose(), old.secret);
    let stored_new = app.stored(&new.client_key).await.unwrap();
    assert_eq!(
        stored_new.oauth_client_id.as_deref(),
        Some(new.oauth_client_id.as_str())
    );
}

async fn unsigned_legacy_install_never_supersedes(backend: Backend) {
    let host = fake_host().await;
    let app = app_for_sites(Options::new(backend).legacy()).await;
    let real = Site::on_host(&host, "");
    app.installed(&real).await;
    // A forged unsigned first install on the real tenant's baseUrl.
    let forged = imported(&real);
    assert_eq!(
        app.post_lifecycle("/installed", None, &forged.body("installed"))
            .await
            .status(),
        204
    );

    assert_eq!(
        app.tenant_status(&real, &real.secret).await,
        200,
        "the real tenant was knocked out"
    );
    assert!(app
        .stored(&real.client_key)
        .await
        .unwrap()
        .superseded_by
        .is_none());
    assert!(app
        .stored(&forged.client_key)
        .await
        .unwrap()
        .supersedes
        .is_empty());
    // The site does not know the forged installation: the squatter is visible as such.
    assert_eq!(settled_proof(&app, &forged).await, Some(SiteProof::Refused));
    assert_eq!(settled_proof(&app, &real).await, Some(SiteProof::Skipped));
}

async fn reinstall_with_a_new_oauth_client_id_replaces_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut site = Site::new();
    app.installed(&site).await;
    site.oauth_client_id = "oauth-after-reinstall".into();
    app.installed(&site).await;
    let stored = app.stored(&site.client_key).await.unwrap();
    assert_eq!(
        stored.oauth_client_id.as_deref(),
        Some("oauth-after-reinstall")
    );
    assert!(stored.superseded_by.is_none());
    assert_eq!(stored.site_proof, Some(SiteProof::Skipped));
}

async fn tenants_on_other_sites_are_untouched(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = Site::new();
    let b = Site::new();
    app.installed(&a).await;
    app.installed(&b).await;
    assert_eq!(app.tenant_status(&a, &a.secret).await, 200);
    assert_eq!(app.tenant_status(&b, &b.secret).await, 200);
}

/// A host retry of the import's install, after the old site was reinstalled by Atlassian and
/// the imported one uninstalled, must not retire the old site again.
async fn a_retried_import_install_does_not_supersede_again(backend: Backend) {
    let host = fake_host().await;
    let app = app_for_sites(Options::new(backend)).await;
    let old = Site::on_host(&host, "");
    app.installed(&old).await;
    let new = genuinely_imported(&host, &old);
    let import_token = app.install_token(&new.client_key, "/installed");
    let import_body = new.body("installed");
    assert_eq!(
        app.post_lifecycle("/installed", Some(&import_token), &import_body)
            .await
            .status(),
        204
    );
    assert_eq!(settled_proof(&app, &new).await, Some(SiteProof::Proven));
    assert_eq!(app.tenant_status(&old, &old.secret).await, 403);

    let uninstall = app.install_token(&new.client_key, "/uninstalled");
    assert_eq!(
        app.post_lifecycle("/uninstalled", Some(&uninstall), &new.body("uninstalled"))
            .await
            .status(),
        204
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // a later iat
    app.installed(&old).await;
    assert_eq!(app.tenant_status(&old, &old.secret).await, 200);

    // The same token and body again (a retry, or a captured request).
    assert_eq!(
        app.post_lifecycle("/installed", Some(&import_token), &import_body)
            .await
            .status(),
        204
    );
    assert_eq!(settled_proof(&app, &new).await, Some(SiteProof::Proven));
    assert_eq!(
        app.tenant_status(&old, &old.secret).await,
        200,
        "the old site was knocked out again"
    );
}

/// Two new clientKeys installed on one site at once: exactly one of them stays active.
async fn racing_imports_never_retire_each_other(backend: Backend) {
    let host = fake_host().await;
    let app = app_for_sites(Options::new(backend)).await;
    let first = Site::on_host(&host, "");
    let second = imported(&first);
    // The site answers both installations while they race.
    host.accept_also(
        site_key(&first),
        SharedSecret::parse(&second.secret).unwrap(),
    );
    let (a, b) = (first.body("installed"), second.body("installed"));
    let (ta, tb) = (
        app.install_token(&first.client_key, "/installed"),
        app.install_token(&second.client_key, "/installed"),
    );
    let (ra, rb) = tokio::join!(
        app.post_lifecycle("/installed", Some(&ta), &a),
        app.post_lifecycle("/installed", Some(&tb), &b),
    );
    assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (204, 204));
    for site in [&first, &second] {
        let proof = settled_proof(&app, site).await;
        assert!(
            matches!(proof, Some(SiteProof::Proven | SiteProof::Skipped)),
            "{proof:?}"
        );
    }
    let active = [
        app.tenant_status(&first, &first.secret).await,
        app.tenant_status(&second, &second.secret).await,
    ];
    assert_eq!(
        active.iter().filter(|s| **s == 200).count(),
        1,
        "{active:?}"
    );
}

/// The attack: an unused Atlassian-signed install token for the attacker's own new clientKey,
/// with a body naming the victim's baseUrl. The victim's site does not know the attacker's
/// secret (401): the victim stays active and unlinked, the attacker's record shows `refused`.
async fn an_install_its_site_refuses_retires_nobody(backend: Backend) {
    let host = fake_host().await;
    let app = app_for_sites(Options::new(backend)).await;
    let victim = Site::on_host(&host, "");
    app.installed(&victim).await;
    let attacker = imported(&victim);
    app.installed(&attacker).await;

    assert_eq!(
        settled_proof(&app, &attacker).await,
        Some(SiteProof::Refused)
    );
    assert_eq!(
        app.tenant_status(&victim, &victim.secret).await,
        200,
        "the victim was retired by an install its site never confirmed"
    );
    assert_eq!(
        app.stored(&victim.client_key).await.unwrap().superseded_by,
        None
    );
    let body = app.tenant_body(&attacker).await;
    assert_eq!(body["siteProof"], "refused");
    assert_eq!(body["supersedes"], serde_json::json!([]));

    // A later genuine import still retires the victim's installation, and only it.
    let genuine = genuinely_imported(&host, &victim);
    app.installed(&genuine).await;
    assert_eq!(settled_proof(&app, &genuine).await, Some(SiteProof::Proven));
    assert_eq!(app.tenant_status(&victim, &victim.secret).await, 403);
    assert_eq!(
        app.stored(&genuine.client_key).await.unwrap().supersedes,
        vec![connect_protocol::domain::ClientKey::parse(&victim.client_key).unwrap()]
    );
}

/// The same attack naming a site that does not answer at all: every attempt fails, the record
/// shows `unreachable`, and the victim stays active.
async fn an_install_whose_site_never_answers_retires_nobody(backend: Backend) {
    let app = app_for_sites(Options::new(backend)).await;
    let mut victim = Site::new();
    victim.base_url = format!("http://127.0.0.1:{}/t/{}", free_port(), victim.client_key);
    app.installed(&victim).await;
    let attacker = imported(&victim);
    app.installed(&attacker).await;

    assert_eq!(
        settled_proof(&app, &attacker).await,
        Some(SiteProof::Unreachable)
    );
    assert_eq!(app.tenant_status(&victim, &victim.secret).await, 200);
    assert_eq!(
        app.stored(&victim.client_key).await.unwrap().superseded_by,
        None
    );
    assert!(app
        .stored(&attacker.client_key)
        .await
        .unwrap()
        .supersedes
        .is_empty());
}

/// `WARDEN_SITE_PROOF=off`: a signed import retires the old installation at once, as before.
async fn with_proofs_off_an_import_supersedes_at_once(backend: Backend) {
    let app = spawn_app_with(Options::new(backend).set("WARDEN_SITE_PROOF", "off")).await;
    let old = Site::new();
    app.installed(&old).await;
    let new = imported(&old);
    app.installed(&new).await;
    assert_eq!(app.tenant_status(&old, &old.secret).await, 403);
    assert_eq!(app.stored(&new.client_key).await.unwrap().site_proof, None);
}

/// A proof left pending by a process that was killed is picked up by the next one at
/// start-up: the site, down during the first attempt, is up by then and confirms the import.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_proof_is_resumed_after_a_restart() {
    let cluster = Cluster::new().await;
    let port = free_port();
    let mut old = Site::new();
    old.base_url = format!("http://127.0.0.1:{port}/t/{}", old.client_key);
    let new = imported(&old);
    let slow = [
        ("WARDEN_PRODUCT_HOSTS", "127.0.0.1"),
        ("WARDEN_SITE_PROOF_ATTEMPTS", "20"),
        ("WARDEN_SITE_PROOF_BACKOFF_MS", "600000"),
    ];
    let first = cluster.spawn("first", &slow).await;
    first.installed(&old).await;
    first.installed(&new).await;
    assert_eq!(first.tenant_body(&new).await["siteProof"], "pending");
    drop(first); // killed while its proof waits for the next attempt

    let host = FakeHost::start(("127.0.0.1", port)).await.unwrap();
    host.add_tenant(TenantRecord {
        client_key: old.client_key.clone(),
        base_path: String::new(),
        shared_secret: SharedSecret::parse(&new.secret).unwrap(),
        oauth_client_id: new.oauth_client_id.clone(),
        app_key: APP_KEY.into(),
    });
    let second = cluster
        .spawn("second", &[("WARDEN_PRODUCT_HOSTS", "127.0.0.1")])
        .await;
    eventually(
        "the old installation is superseded after the restart",
        PROOF_WITHIN,
        403,
        || second.tenant_status(&old, &old.secret),
    )
    .await;
    let body = second.tenant_body(&new).await;
    assert_eq!(body["siteProof"], "proven");
    assert_eq!(body["supersedes"], serde_json::json!([old.client_key]));
}

both_stores!(
    an_install_its_site_refuses_retires_nobody,
    an_install_whose_site_never_answers_retires_nobody,
    with_proofs_off_an_import_supersedes_at_once,
    import_supersedes_the_old_tenant_and_links_it,
    unsigned_legacy_install_never_supersedes,
    reinstall_with_a_new_oauth_client_id_replaces_it,
    tenants_on_other_sites_are_untouched,
    a_retried_import_install_does_not_supersede_again,
    racing_imports_never_retire_each_other,
);
