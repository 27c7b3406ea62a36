//! The Forge app token (docs/PROTOCOL.md §12): `x-forge-oauth-system` sent with a verified FIT
//! is kept per installation (newest expiry wins, sealed at rest, never logged) and used by
//! `HostClient::as_forge_app` to call the FIT's `apiBaseUrl` — devtenant's product API, which
//! accepts only system tokens it issued. `x-forge-oauth-user` reaches the handler of its own
//! request only. A forged FIT stores nothing.

use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use connect_protocol::forge::InstallationId;
use connect_protocol::jwt;
use connect_warden::host_client::HostClientError;
use connect_warden::store::forge_token::ForgeAppToken;
use connect_warden::tenant_request::TenantRequest;
use devtenant::{FitSigner, JwksServer, JwksService, SigningKey};
use secrecy::{ExposeSecret as _, SecretString};

use crate::helpers::app::{shared_signing_key, spawn_app_with, Backend, Options, TestApp};
use crate::helpers::redis_server;

const APP_UUID: &str = "7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";
const APP_ARI: &str = "ari:cloud:ecosystem::app/7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a";
const SYSTEM: &str = "x-forge-oauth-system";
const USER: &str = "x-forge-oauth-user";

fn other_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate).clone()
}

/// Echoes whether the handler got the user's token, and which.
async fn whoami(tenant: TenantRequest) -> HttpResponse {
    let user_token = tenant
        .view
        .user_token
        .as_ref()
        .map(|t| t.expose_secret().to_owned());
    HttpResponse::Ok().json(serde_json::json!({ "userToken": user_token }))
}

/// Forge's side (JWKS + product API) and warden with Forge Remote on, plus `extra` settings.
async fn forge_app(backend: Backend, extra: &[(&str, String)]) -> (JwksServer, TestApp) {
    let forge = JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap();
    let mut options = Options::new(backend)
        .set("WARDEN_FORGE_APP_ID", APP_UUID)
        .set("WARDEN_FORGE_JWKS_URL", forge.jwks_url())
        .routes(|cfg| {
            cfg.route("/api/whoami", web::get().to(whoami));
        });
    for (name, value) in extra {
        options = options.set(name, value.clone());
    }
    let app = spawn_app_with(options).await;
    (forge, app)
}

/// A valid FIT for a new installation whose `apiBaseUrl` is `forge`'s product API.
fn fit_for(forge: &JwksServer) -> (FitSigner, InstallationId) {
    let installation = uuid::Uuid::new_v4();
    let cloud_id = uuid::Uuid::new_v4().to_string();
    let fit = FitSigner::new(&shared_signing_key(), APP_ARI)
        .installation_id(&installation.to_string())
        .site(&cloud_id, "jira")
        .api_base_url(&forge.api_base_url("jira", &cloud_id));
    (
        fit,
        InstallationId::parse(&installation.to_string()).unwrap(),
    )
}

/// `GET /api/whoami` with `fit` and the given OAuth headers; returns the status and body.
async fn call(
    app: &TestApp,
    fit: &FitSigner,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut request = app
        .client
        .get(app.url("/api/whoami"))
        .header("authorization", format!("Bearer {}", fit.sign()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn kept(app: &TestApp, installation: &InstallationId) -> Option<ForgeAppToken> {
    app.state().store.forge_token(installation).await.unwrap()
}

async fn myself(app: &TestApp, installation: &InstallationId) -> Result<u16, HostClientError> {
    let state = app.state();
    let requests = state
        .host
        .as_forge_app(state.store.as_ref(), installation)
        .await?;
    Ok(requests
        .get("/rest/api/3/myself")
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_token_of_a_fit_call_lets_the_app_call_its_api_base_url() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let (forge, app) = forge_app(backend, &[]).await;
        let (fit, installation) = fit_for(&forge);
        // Before any call brought a token: a clear refusal naming the installation, no request.
        let error = myself(&app, &installation).await.unwrap_err();
        assert!(
            matches!(error, HostClientError::NoForgeAppToken { .. })
                && error.to_string().contains(&installation.to_string()),
            "{backend:?}: {error}"
        );
        assert_eq!(forge.service().api.calls(), 0);

        let token = forge
            .service()
            .api
            .issue_system_token(jwt::now() + 3 * 3600);
        let (status, _) = call(&app, &fit, &[(SYSTEM, &token)]).await;
        assert_eq!(status, 200, "{backend:?}");
        assert_eq!(
            myself(&app, &installation).await.unwrap(),
            200,
            "{backend:?}"
        );
        assert_eq!(forge.service().api.accepted(), 1, "{backend:?}");
        // The kept token names the apiBaseUrl of the verified FIT.
        let kept = kept(&app, &installation).await.unwrap();
        assert!(kept.api_base_url.as_str().contains("/forge-api/ex/jira/"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_token_never_replaces_a_newer_one_nor_does_a_call_without_one() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let (forge, app) = forge_app(backend, &[]).await;
        let (fit, installation) = fit_for(&forge);
        let now = jwt::now();
        let newer = forge.service().api.issue_system_token(now + 3 * 3600);
        let older = forge.service().api.issue_system_token(now + 3600);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &newer)]).await.0, 200);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &older)]).await.0, 200);
        assert_eq!(call(&app, &fit, &[]).await.0, 200);
        let kept_now = kept(&app, &installation).await.unwrap();
        assert_eq!(kept_now.token.expose_secret(), newer, "{backend:?}");
        assert_eq!(kept_now.expires_at, now + 3 * 3600);

        // The store itself refuses the older token (another instance, with no memory of
        // the newer one, would try to write it).
        let older = ForgeAppToken {
            token: SecretString::from(older),
            expires_at: now + 3600,
            api_base_url: kept_now.api_base_url.clone(),
        };
        let store = &app.state().store;
        assert!(!store.keep_forge_token(&installation, &older).await.unwrap());
        assert_eq!(
            kept(&app, &installation)
                .await
                .unwrap()
                .token
                .expose_secret(),
            newer
        );
        // A newer one does replace it.
        let newest = forge.service().api.issue_system_token(now + 4 * 3600 - 60);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &newest)]).await.0, 200);
        assert_eq!(
            kept(&app, &installation)
                .await
                .unwrap()
                .token
                .expose_secret(),
            newest,
            "{backend:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_token_reaches_its_request_only_and_is_never_stored() {
    let prefix = redis_server::unique_prefix();
    let (forge, app) = forge_app(Backend::Redis, &[("WARDEN_REDIS_PREFIX", prefix.clone())]).await;
    let (fit, installation) = fit_for(&forge);
    let user = format!("user-token-{}", uuid::Uuid::new_v4());
    let system = forge.service().api.issue_system_token(jwt::now() + 3600);
    let (status, body) = call(&app, &fit, &[(USER, &user), (SYSTEM, &system)]).await;
    assert_eq!(status, 200);
    assert_eq!(body["userToken"], user.as_str());
    // The next request does not see it.
    let (_, body) = call(&app, &fit, &[]).await;
    assert!(body["userToken"].is_null(), "{body}");
    // Only the system token is kept, and nothing in Redis holds the user's.
    assert_eq!(
        kept(&app, &installation)
            .await
            .unwrap()
            .token
            .expose_secret(),
        system
    );
    let dump = redis_dump(&prefix).await;
    assert!(
        dump.contains(&system),
        "the system token is kept in plaintext without keys"
    );
    assert!(!dump.contains(&user), "{dump}");

    // A call with the user's token only keeps nothing for a new installation.
    let (fit, installation) = fit_for(&forge);
    assert_eq!(call(&app, &fit, &[(USER, &user)]).await.0, 200);
    assert!(kept(&app, &installation).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_secret_keys_the_token_is_sealed_in_redis_and_copies_do_not_open() {
    let prefix = redis_server::unique_prefix();
    let keys = format!(
        "k1:{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32])
    );
    let (forge, app) = forge_app(
        Backend::Redis,
        &[
            ("WARDEN_REDIS_PREFIX", prefix.clone()),
            ("WARDEN_SECRET_KEYS", keys),
        ],
    )
    .await;
    let (fit, installation) = fit_for(&forge);
    let (other_fit, other) = fit_for(&forge);
    let system = forge.service().api.issue_system_token(jwt::now() + 3600);
    assert_eq!(call(&app, &fit, &[(SYSTEM, &system)]).await.0, 200);
    let dump = redis_dump(&prefix).await;
    assert!(dump.contains("forge-token"), "{dump}");
    assert!(
        !dump.contains(&system),
        "the token is in Redis in plaintext: {dump}"
    );
    assert_eq!(myself(&app, &installation).await.unwrap(), 200);

    // The sealed value copied onto another installation's key does not open there.
    let mut redis = raw_redis().await;
    let key = |i: &InstallationId| format!("{prefix}:forge-token:{{{}}}", i.uuid());
    let (exp, digest, value): (String, String, String) = redis::cmd("HMGET")
        .arg(key(&installation))
        .arg("exp")
        .arg("digest")
        .arg("value")
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(key(&other))
        .arg("exp")
        .arg(exp)
        .arg("digest")
        .arg(digest)
        .arg("value")
        .arg(value)
        .query_async(&mut redis)
        .await
        .unwrap();
    let error = myself(&app, &other).await.unwrap_err();
    assert!(
        matches!(error, HostClientError::ForgeAppTokenUnreadable { .. }),
        "{error}"
    );
    drop(other_fit);
    assert_eq!(forge.service().api.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_by_name_without_a_request() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let (forge, app) = forge_app(backend, &[]).await;
        let (fit, installation) = fit_for(&forge);
        // Expires in 2 s; Redis drops it by itself then, the embedded store keeps it expired.
        let token = forge.service().api.issue_system_token(jwt::now() + 2);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &token)]).await.0, 200);
        assert_eq!(myself(&app, &installation).await.unwrap(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let error = myself(&app, &installation).await.unwrap_err();
        let expected = match backend {
            Backend::Embedded => matches!(error, HostClientError::ForgeAppTokenExpired { .. }),
            Backend::Redis => matches!(error, HostClientError::NoForgeAppToken { .. }),
        };
        assert!(expected, "{backend:?}: {error}");
        assert!(error.to_string().contains(&installation.to_string()));
        assert_eq!(forge.service().api.calls(), 1, "{backend:?}");
        // A token whose `exp` has passed is not kept at all.
        let (fit, installation) = fit_for(&forge);
        let stale = forge.service().api.issue_system_token(jwt::now() - 10);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &stale)]).await.0, 200);
        assert!(kept(&app, &installation).await.is_none(), "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_fit_carrying_a_system_token_stores_nothing() {
    for backend in [Backend::Embedded, Backend::Redis] {
        let (forge, app) = forge_app(backend, &[]).await;
        let (fit, installation) = fit_for(&forge);
        let attacker = forge
            .service()
            .api
            .issue_system_token(jwt::now() + 4 * 3600);
        for (case, forged) in [
            ("unknown key", fit.clone().signed_by(&other_key())),
            (
                "other app",
                fit.clone().aud("ari:cloud:ecosystem::app/other"),
            ),
            ("expired", fit.clone().exp(jwt::now() - 3600)),
        ] {
            let (status, _) = call(&app, &forged, &[(SYSTEM, &attacker)]).await;
            assert_eq!(status, 401, "{backend:?} {case}");
        }
        assert!(kept(&app, &installation).await.is_none(), "{backend:?}");
        // Nor can a forged call replace the token a real call brought.
        let real = forge.service().api.issue_system_token(jwt::now() + 3600);
        assert_eq!(call(&app, &fit, &[(SYSTEM, &real)]).await.0, 200);
        let forged = fit.clone().signed_by(&other_key());
        assert_eq!(call(&app, &forged, &[(SYSTEM, &attacker)]).await.0, 401);
        assert_eq!(
            kept(&app, &installation)
                .await
                .unwrap()
                .token
                .expose_secret(),
            real,
            "{backend:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_forge_token_is_ever_logged() {
    let forge = JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap();
    let app = TestApp::spawn_process(
        "forge-token-logs",
        Options::new(Backend::Redis)
            .set("WARDEN_FORGE_APP_ID", APP_UUID)
            .set("WARDEN_FORGE_JWKS_URL", forge.jwks_url())
            .set("RUST_LOG", "trace"),
    )
    .await;
    let (fit, _) = fit_for(&forge);
    let system = forge.service().api.issue_system_token(jwt::now() + 3600);
    let opaque = forge
        .service()
        .api
        .issue_opaque_system_token(jwt::now() + 3600);
    let user = format!("user-token-{}", uuid::Uuid::new_v4());
    let forged = fit.clone().signed_by(&other_key());
    for (fit, system) in [(&fit, &system), (&fit, &opaque), (&forged, &system)] {
        let response = app
            .client
            .get(app.url("/api/tenant"))
            .header("authorization", format!("Bearer {}", fit.sign()))
            .header(SYSTEM, system.as_str())
            .header(USER, user.as_str())
            .send()
            .await
            .unwrap();
        assert!(matches!(response.status().as_u16(), 200 | 401));
    }
    let log = app.log();
    assert!(log.contains("Forge"), "the log holds the session: {log}");
    for needle in [&system, &opaque, &user] {
        assert!(
            !log.contains(needle.as_str()),
            "a token is in the log:\n{log}"
        );
    }
}

async fn raw_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_server::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key under `prefix` and every value it holds, as text.
async fn redis_dump(prefix: &str) -> String {
    let mut redis = raw_redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let mut read = match kind.as_str() {
            "hash" => redis::cmd("HGETALL"),
            "string" => redis::cmd("MGET"),
            "list" => redis::cmd("LRANGE"),
            _ => redis::cmd("ZRANGE"),
        };
        read.arg(&key);
        if matches!(kind.as_str(), "list" | "zset") {
            read.arg(0).arg(-1);
        }
        let value: Vec<String> = read.query_async(&mut redis).await.unwrap_or_default();
        dump.push_str(&format!("{key}: {value:?}\n"));
    }
    dump
}

/// docs/PERFORMANCE.md: Forge calls repeating the token kept cost the store no write. Counted
/// by a private `redis-server` (`INFO commandstats`; the script's `HMGET`/`HSET` are counted
/// too, so each is one run of the keeping script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_calls_with_the_same_token_writes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = redis_server::RedisNode::start(crate::helpers::free_port(), dir.path(), &[]);
    let cluster = crate::helpers::app::Cluster::on(&node.url).await;
    let forge = JwksServer::start("127.0.0.1:0", JwksService::new([shared_signing_key()]))
        .await
        .unwrap();
    let app = TestApp::spawn(
        Options::new(Backend::Redis)
            .shared(&cluster)
            .set("WARDEN_FORGE_APP_ID", APP_UUID)
            .set("WARDEN_FORGE_JWKS_URL", forge.jwks_url())
            .routes(|cfg| {
                cfg.route("/api/whoami", web::get().to(whoami));
            }),
    )
    .await;
    let (fit, installation) = fit_for(&forge);
    let token = forge.service().api.issue_system_token(jwt::now() + 3600);
    assert_eq!(node.cli(&["config", "resetstat"]).trim(), "OK");
    for _ in 0..20 {
        assert_eq!(call(&app, &fit, &[(SYSTEM, &token)]).await.0, 200);
        assert_eq!(call(&app, &fit, &[]).await.0, 200);
    }
    let runs = |command: &str| -> u64 {
        node.cli(&["info", "commandstats"])
            .lines()
            .find_map(|line| {
                let stats = line.trim().strip_prefix(&format!("cmdstat_{command}:"))?;
                stats
                    .split(',')
                    .find_map(|s| s.strip_prefix("calls="))?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    assert_eq!(runs("hmget"), 1, "the keeping script ran more than once");
    assert_eq!(runs("hset"), 1);
    assert_eq!(
        kept(&app, &installation)
            .await
            .unwrap()
            .token
            .expose_secret(),
        token
    );
}
