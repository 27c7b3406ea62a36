//! Site imports (seed 003): a new clientKey and oauthClientId on the same baseUrl, with no
//! uninstall for the old one. Only Atlassian's signature may retire the old tenant.

use crate::helpers::app::{
    both_stores, error_of, spawn_app, spawn_app_with, Backend, Options, Site,
};
use connect_protocol::jwt;

fn imported(old: &Site) -> Site {
    let mut new = Site::new();
    new.base_url = old.base_url.clone();
    new
}

async fn import_supersedes_the_old_tenant_and_links_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let old = Site::new();
    app.installed(&old).await;
    let new = imported(&old);
    app.installed(&new).await;

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

    let token = app.product_token(
        &new.client_key,
        &new.secret,
        "GET",
        "/api/tenant",
        jwt::now(),
    );
    let body: serde_json::Value = app.tenant(&token).await.json().await.unwrap();
    assert_eq!(body["supersedes"], serde_json::json!([old.client_key]));

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
    let app = spawn_app_with(Options::new(backend).legacy()).await;
    let real = Site::new();
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
    let app = spawn_app(backend).await;
    let old = Site::new();
    app.installed(&old).await;
    let new = imported(&old);
    let import_token = app.install_token(&new.client_key, "/installed");
    let import_body = new.body("installed");
    assert_eq!(
        app.post_lifecycle("/installed", Some(&import_token), &import_body)
            .await
            .status(),
        204
    );
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
    assert_eq!(
        app.tenant_status(&old, &old.secret).await,
        200,
        "the old site was knocked out again"
    );
}

/// Two new clientKeys installed on one site at once: exactly one of them stays active.
async fn racing_imports_never_retire_each_other(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = Site::new();
    let second = imported(&first);
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

both_stores!(
    import_supersedes_the_old_tenant_and_links_it,
    unsigned_legacy_install_never_supersedes,
    reinstall_with_a_new_oauth_client_id_replaces_it,
    tenants_on_other_sites_are_untouched,
    a_retried_import_install_does_not_supersede_again,
    racing_imports_never_retire_each_other,
);
