//! The Universal Plugin Manager (UPM) of devtenant's fake sites: the REST API a developer's tool
//! uses to install an app from its descriptor URL on a development site (what `warden dev
//! register` talks to). Each site has the basic-auth credentials of one administrator.
//!
//! Routes, relative to where [`configure`] mounts them (`<site>` is `<mount>/t/{site}`, the
//! site's `baseUrl`, the same path the fake host serves the site's REST API under):
//!
//! | Route | Answer |
//! |---|---|
//! | `GET <site>/rest/plugins/1.0/` | `200 {"plugins": [...]}` with a `upm-token` header (single use) |
//! | `POST <site>/rest/plugins/1.0/?token=T` | body `{"pluginUri"}` as `application/vnd.atl.plugins.install.uri+json`: `202` pending task |
//! | `GET <site>/rest/plugins/1.0/pending/{id}` | `200` pending task; once installed, `303` to the plugin |
//! | `GET <site>/rest/plugins/1.0/{appKey}-key` | `200` the plugin (`key`, `enabled`); `404` |
//! | `DELETE <site>/rest/plugins/1.0/{appKey}-key` | sends the signed `uninstalled`, `204`; `404` |
//!
//! Every route wants `Authorization: Basic` with the site's credentials (`401` otherwise); an
//! install wants development mode on ([`UpmService::set_development_mode`], `403` otherwise). A
//! pending task reads `{"type": "INSTALL", "pingAfter", "status": {"done", "contentType"},
//! "links": {"self"}}`; a failed one has `status.done = true` with `errorMessage` and `subCode`.
//! An install reads the descriptor (loopback only), checks it has a `key`, a `baseUrl` and a
//! `lifecycle.installed` path, then sends the RS256-signed `installed` callback exactly as
//! `devtenant install` does (keys from the server's [`KeyRing`]); the app's refusal fails the
//! task with the app's status and answer. The sub codes are devtenant's own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{json, Value};

use super::client::{http_client, AppCaller, AppDescriptor, DescriptorOptions, DEFAULT_TIMEOUT};
use super::host::HostService;
use super::keys::KeyRing;
use super::state::{new_secret, Tenant};
use connect_protocol::lifecycle::LifecycleEvent;

/// Media type of the install request body.
pub const INSTALL_URI_MEDIA_TYPE: &str = "application/vnd.atl.plugins.install.uri+json";
/// Media type of a pending task.
pub const PENDING_TASK_MEDIA_TYPE: &str = "application/vnd.atl.plugins.pending-task+json";
/// `status.contentType` of a task still running, and of one that failed.
const INSTALLING: &str = "application/vnd.atl.plugins.install.installing+json";
const INSTALL_FAILED: &str = "application/vnd.atl.plugins.install.err+json";
/// How long a client is told to wait between two polls of a task, in milliseconds.
const PING_AFTER_MS: u64 = 100;

/// Sub codes of a failed install task.
pub mod sub_code {
    /// The descriptor could not be read, or is not one of an app this site can install.
    pub const DESCRIPTOR: &str = "devtenant.install.descriptor.error";
    pub const INSTALLED_REFUSED: &str = "devtenant.install.installed.callback.refused";
}

/// One fake site's plugin manager.
struct UpmSite {
    user: String,
    api_token: SecretString,
    /// Issued by `GET /rest/plugins/1.0/`, each good for one install request.
    upm_tokens: HashSet<String>,
    /// Off: the site installs apps from the Marketplace only, never from a descriptor URL.
    development_mode: bool,
    installed: Option<Installation>,
}

/// The app installed on a site, and the site's side of the installation.
#[derive(Clone)]
struct Installation {
    caller: AppCaller,
    tenant: Tenant,
}

#[derive(Debug, Clone)]
enum Task {
    Running,
    Failed { message: String, sub_code: String },
    Installed { key: String },
}

/// State of the plugin managers of all fake sites, shared through `web::Data`.
pub struct UpmService {
    sites: Mutex<HashMap<String, UpmSite>>,
    tasks: Mutex<HashMap<String, (String, Task)>>,
    keyring: Arc<RwLock<KeyRing>>,
    host: web::Data<HostService>,
    http: reqwest::Client,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl UpmService {
    /// Install tokens are signed with the current key of `keyring`; installed sites are
    /// registered on `host`, so that the app's calls to them are answered.
    pub fn new(keyring: Arc<RwLock<KeyRing>>, host: web::Data<HostService>) -> Self {
        Self {
            sites: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            keyring,
            host,
            http: http_client(DEFAULT_TIMEOUT),
        }
    }

    /// Adds a site named `site` (its `baseUrl` is `<server>/t/{site}`) whose administrator
    /// signs in as `user` with `api_token`. Returns its path, `/t/{site}`.
    pub fn add_site(&self, site: &str, user: &str, api_token: &str) -> String {
        lock(&self.sites).insert(
            site.to_owned(),
            UpmSite {
                user: user.to_owned(),
                api_token: SecretString::from(api_token.to_owned()),
                upm_tokens: HashSet::new(),
                development_mode: true,
                installed: None,
            },
        );
        format!("/t/{site}")
    }

    /// Switches the site's development mode (on for a new site); while it is off, an install
    /// from a descriptor URL is refused with 403. `false` if the site is unknown.
    pub fn set_development_mode(&self, site: &str, on: bool) -> bool {
        lock(&self.sites)
            .get_mut(site)
            .map(|s| s.development_mode = on)
            .is_some()
    }

    /// The site's side of the installation of the app on `site`, if one is installed.
    pub fn installation(&self, site: &str) -> Option<Tenant> {
        lock(&self.sites)
            .get(site)?
            .installed
            .as_ref()
            .map(|i| i.tenant.clone())
    }

    /// The key of the app installed on `site`.
    pub fn installed_app(&self, site: &str) -> Option<String> {
        lock(&self.sites)
            .get(site)?
            .installed
            .as_ref()
            .map(|i| i.caller.app.key.clone())
    }

    fn set_task(&self, id: &str, task: Task) {
        if let Some(entry) = lock(&self.tasks).get_mut(id) {
            entry.1 = task;
        }
    }
}

impl std::fmt::Debug for UpmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpmService")
            .field("sites", &lock(&self.sites).keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Mounts the routes above with `service` as their state. Configure it before
/// [`super::host::configure`], whose `/t/{site}/...` route would take these paths.
pub fn configure(service: web::Data<UpmService>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(service)
            .route("/t/{site}/rest/plugins/1.0/", web::get().to(list))
            .route("/t/{site}/rest/plugins/1.0/", web::post().to(install))
            .route(
                "/t/{site}/rest/plugins/1.0/pending/{id}",
                web::get().to(pending),
            )
            .route("/t/{site}/rest/plugins/1.0/{plugin}", web::get().to(plugin))
            .route(
                "/t/{site}/rest/plugins/1.0/{plugin}",
                web::delete().to(uninstall),
            );
    }
}

fn message(status: StatusCode, text: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "message": text.into() }))
}

/// The site's path as received (`<mount>/t/{site}`).
fn site_path(req: &HttpRequest, site: &str) -> String {
    let marker = format!("/t/{site}/");
    let path = req.path();
    let at = path.find(&marker).unwrap_or(0);
    format!("{}/t/{site}", &path[..at])
}

/// The refusal of a request without the site's basic-auth credentials; `None` when it has them.
fn refusal(req: &HttpRequest, service: &UpmService, site: &str) -> Option<HttpResponse> {
    let sites = lock(&service.sites);
    let Some(known) = sites.get(site) else {
        return Some(message(
            StatusCode::NOT_FOUND,
            format!("no site {site} (or no plugin manager) on this host"),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let matches = given
        .as_deref()
        .and_then(|g| g.split_once(':'))
        .is_some_and(|(user, token)| {
            user == known.user && token == known.api_token.expose_secret()
        });
    if matches {
        None
    } else {
        Some(
            HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"devtenant\""))
                .json(
                    json!({ "message": "authentication failed: unknown user or wrong API token" }),
                ),
        )
    }
}

async fn list(
    req: HttpRequest,
    service: web::Data<UpmService>,
    path: web::Path<String>,
) -> HttpResponse {
    let site = path.into_inner();
    if let Some(refused) = refusal(&req, &service, &site) {
        return refused;
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut sites = lock(&service.sites);
    let Some(entry) = sites.get_mut(&site) else {
        return message(StatusCode::NOT_FOUND, format!("no site {site}"));
    };
    entry.upm_tokens.insert(token.clone());
    let plugins: Vec<Value> = entry
        .installed
        .iter()
        .map(|i| plugin_json(&site_path(&req, &site), &i.caller.app.key))
        .collect();
    HttpResponse::Ok()
        .insert_header(("upm-token", token))
        .json(json!({ "plugins": plugins }))
}

fn plugin_json(site_path: &str, key: &str) -> Value {
    json!({
        "key": key,
        "enabled": true,
        "userInstalled": true,
        "links": { "self": format!("{site_path}/rest/plugins/1.0/{key}-key") },
    })
}

fn task_json(site_path: &str, id: &str, task: &Task) -> Value {
    let status = match task {
        Task::Running | Task::Installed { .. } => {
            json!({ "done": false, "contentType": INSTALLING })
        }
        Task::Failed { message, sub_code } => json!({
            "done": true,
            "contentType": INSTALL_FAILED,
            "errorMessage": message,
            "subCode": sub_code,
        }),
    };
    json!({
        "type": "INSTALL",
        "pingAfter": PING_AFTER_MS,
        "status": status,
        "links": { "self": format!("{site_path}/rest/plugins/1.0/pending/{id}") },
    })
}

#[derive(serde::Deserialize)]
struct InstallQuery {
    token: Option<String>,
}

async fn install(
    req: HttpRequest,
    service: web::Data<UpmService>,
    path: web::Path<String>,
    query: web::Query<InstallQuery>,
    body: web::Bytes,
) -> HttpResponse {
    let site = path.into_inner();
    if let Some(refused) = refusal(&req, &service, &site) {
        return refused;
    }
    let token_ok = query.token.as_deref().is_some_and(|t| {
        lock(&service.sites)
            .get_mut(&site)
            .is_some_and(|s| s.upm_tokens.remove(t))
    });
    if !token_ok {
        return message(
            StatusCode::FORBIDDEN,
            "the token query parameter must be a upm-token from GET /rest/plugins/1.0/ (each is good once)",
        );
    }
    let development_mode = lock(&service.sites)
        .get(&site)
        .is_some_and(|s| s.development_mode);
    if !development_mode {
        return message(
            StatusCode::FORBIDDEN,
            "development mode is off on this site: apps install from the Marketplace only",
        );
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with(INSTALL_URI_MEDIA_TYPE) {
        return message(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("an install from a URI is sent as {INSTALL_URI_MEDIA_TYPE}"),
        );
    }
    let Some(plugin_uri) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("pluginUri")?.as_str().map(str::to_owned))
    else {
        return message(StatusCode::BAD_REQUEST, "the body needs a pluginUri");
    };
    let site_path = site_path(&req, &site);
    let site_url = {
        let info = req.connection_info();
        format!("{}://{}{site_path}", info.scheme(), info.host())
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    lock(&service.tasks).insert(id.clone(), (site.clone(), Task::Running));
    let worker = service.clone();
    let task_id = id.clone();
    actix_web::rt::spawn(async move {
        let outcome = run_install(&worker, &site, &site_url, &plugin_uri).await;
        worker.set_task(&task_id, outcome);
    });
    HttpResponse::Accepted()
        .content_type(PENDING_TASK_MEDIA_TYPE)
        .json(task_json(&site_path, &id, &Task::Running))
}

/// Reads the descriptor, sends the signed `installed` and records the installation.
async fn run_install(service: &UpmService, site: &str, site_url: &str, descriptor: &str) -> Task {
    let failed = |sub_code: &str, message: String| Task::Failed {
        message,
        sub_code: sub_code.to_owned(),
    };
    let app = match AppDescriptor::fetch(&service.http, descriptor, &DescriptorOptions::default())
        .await
    {
        Ok(app) => app,
        Err(e) => {
            return failed(
                sub_code::DESCRIPTOR,
                format!("the app descriptor could not be installed: {e:#}"),
            )
        }
    };
    if app.installed.is_none() {
        return failed(
            sub_code::DESCRIPTOR,
            format!(
                "the descriptor at {descriptor} declares no lifecycle.installed path: the app could never receive its shared secret"
            ),
        );
    }
    let caller = AppCaller::new(service.http.clone(), app);
    let previous = lock(&service.sites)
        .get(site)
        .and_then(|s| s.installed.clone())
        .filter(|i| i.caller.app.key == caller.app.key);
    let mut tenant = match previous {
        // An upgrade keeps the site's clientKey; the secret is new.
        Some(previous) => {
            let mut tenant = previous.tenant;
            tenant.roll_to(new_secret());
            tenant
        }
        None => {
            let mut tenant = Tenant::generate(Some(site), "http://unused");
            tenant.base_url = site_url.to_owned();
            tenant.site_key = site.to_owned();
            tenant
        }
    };
    tenant.app_key = Some(caller.app.key.clone());
    tenant.descriptor_url = Some(descriptor.to_owned());
    let key = service
        .keyring
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .current()
        .clone();
    let token = match caller.install_token(&key, &mut tenant, LifecycleEvent::Installed) {
        Ok(token) => token,
        Err(e) => return failed(sub_code::DESCRIPTOR, format!("{e:#}")),
    };
    // The site answers the app's calls from the moment the app may make them.
    let before = service.host.tenant(site);
    if let Some(record) = tenant.host_record() {
        service.host.register_tenant(record);
    }
    let body = tenant.body(&caller.app.key, "installed");
    let exchange = match caller
        .send_callback(LifecycleEvent::Installed, Some(&token), &body)
        .await
    {
        Ok(exchange) => exchange,
        Err(e) => return failed(sub_code::DESCRIPTOR, format!("{e:#}")),
    };
    if !exchange.is_success() {
        match before {
            Some(record) => {
                service.host.register_tenant(record);
            }
            None => {
                service.host.remove_tenant(site);
            }
        }
        let answer = if exchange.body.is_empty() {
            String::new()
        } else {
            format!(": {}", exchange.body)
        };
        return failed(
            sub_code::INSTALLED_REFUSED,
            format!(
                "the app answered {} to the installed callback at {}{answer}",
                exchange.observed(),
                exchange.url
            ),
        );
    }
    tenant.installed = true;
    let app_key = caller.app.key.clone();
    if let Some(entry) = lock(&service.sites).get_mut(site) {
        entry.installed = Some(Installation { caller, tenant });
    }
    Task::Installed { key: app_key }
}

async fn pending(
    req: HttpRequest,
    service: web::Data<UpmService>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (site, id) = path.into_inner();
    if let Some(refused) = refusal(&req, &service, &site) {
        return refused;
    }
    let task = lock(&service.tasks)
        .get(&id)
        .filter(|(of, _)| *of == site)
        .map(|(_, task)| task.clone());
    let site_path = site_path(&req, &site);
    match task {
        None => message(StatusCode::NOT_FOUND, format!("no pending task {id}")),
        Some(Task::Installed { key }) => HttpResponse::SeeOther()
            .insert_header((
                header::LOCATION,
                format!("{site_path}/rest/plugins/1.0/{key}-key"),
            ))
            .finish(),
        Some(task) => HttpResponse::Ok()
            .content_type(PENDING_TASK_MEDIA_TYPE)
            .json(task_json(&site_path, &id, &task)),
    }
}

/// The app key of `{appKey}-key`, when that app is the one installed on `site`.
fn installed_key(service: &UpmService, site: &str, plugin: &str) -> Option<String> {
    let key = plugin.strip_suffix("-key")?;
    (service.installed_app(site)? == key).then(|| key.to_owned())
}

async fn plugin(
    req: HttpRequest,
    service: web::Data<UpmService>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (site, plugin) = path.into_inner();
    if let Some(refused) = refusal(&req, &service, &site) {
        return refused;
    }
    match installed_key(&service, &site, &plugin) {
        Some(key) => HttpResponse::Ok().json(plugin_json(&site_path(&req, &site), &key)),
        None => message(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin} on this site"),
        ),
    }
}

async fn uninstall(
    req: HttpRequest,
    service: web::Data<UpmService>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (site, plugin) = path.into_inner();
    if let Some(refused) = refusal(&req, &service, &site) {
        return refused;
    }
    if installed_key(&service, &site, &plugin).is_none() {
        return message(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin} on this site"),
        );
    }
    let Some(Installation { caller, mut tenant }) = lock(&service.sites)
        .get_mut(&site)
        .and_then(|s| s.installed.take())
    else {
        return message(
            StatusCode::NOT_FOUND,
            format!("no plugin {plugin} on this site"),
        );
    };
    service.host.remove_tenant(&site);
    // The site removes the app whatever the app answers, like Atlassian.
    if caller
        .app
        .lifecycle_path(LifecycleEvent::Uninstalled)
        .is_some()
    {
        let key = service
            .keyring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .current()
            .clone();
        match caller.install_token(&key, &mut tenant, LifecycleEvent::Uninstalled) {
            Ok(token) => {
                let body = tenant.body(&caller.app.key, "uninstalled");
                match caller
                    .send_callback(LifecycleEvent::Uninstalled, Some(&token), &body)
                    .await
                {
                    Ok(exchange) => tracing::info!(
                        site = %site,
                        answer = %exchange.observed(),
                        "uninstalled callback sent"
                    ),
                    Err(e) => {
                        tracing::warn!(site = %site, error = %e, "uninstalled callback not sent")
                    }
                }
            }
            Err(e) => tracing::warn!(site = %site, error = %e, "uninstalled token not made"),
        }
    }
    HttpResponse::NoContent().finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test, App};

    fn basic(user: &str, token: &str) -> (header::HeaderName, String) {
        (
            header::AUTHORIZATION,
            format!("Basic {}", STANDARD.encode(format!("{user}:{token}"))),
        )
    }

    #[actix_web::test]
    async fn credentials_upm_tokens_and_development_mode_are_required() {
        let service = web::Data::new(UpmService::new(
            Arc::new(RwLock::new(KeyRing::in_memory())),
            web::Data::new(HostService::new()),
        ));
        service.add_site("acme", "admin@example.com", "right");
        let app = test::init_service(App::new().configure(configure(service.clone()))).await;
        let list = |auth: Option<(header::HeaderName, String)>| {
            let mut req = test::TestRequest::get().uri("/t/acme/rest/plugins/1.0/");
            if let Some(auth) = auth {
                req = req.insert_header(auth);
            }
            req.to_request()
        };
        for auth in [
            None,
            Some(basic("admin@example.com", "wrong")),
            Some(basic("other", "right")),
        ] {
            let res = test::call_service(&app, list(auth)).await;
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
            assert!(res.headers().get("upm-token").is_none());
        }
        let res = test::call_service(&app, list(Some(basic("admin@example.com", "right")))).await;
        assert_eq!(res.status(), StatusCode::OK);
        let token = res
            .headers()
            .get("upm-token")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();

        let post = |token: &str, content_type: &str| {
            test::TestRequest::post()
                .uri(&format!("/t/acme/rest/plugins/1.0/?token={token}"))
                .insert_header(basic("admin@example.com", "right"))
                .insert_header((header::CONTENT_TYPE, content_type.to_owned()))
                .set_payload(r#"{"pluginUri": "http://127.0.0.1:1/atlassian-connect.json"}"#)
                .to_request()
        };
        let res = test::call_service(&app, post("made-up", INSTALL_URI_MEDIA_TYPE)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let res = test::call_service(&app, post(&token, "application/json")).await;
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        // A token is good for one install request, whatever came of it.
        let res = test::call_service(&app, post(&token, INSTALL_URI_MEDIA_TYPE)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);

        assert!(service.set_development_mode("acme", false));
        let res = test::call_service(&app, list(Some(basic("admin@example.com", "right")))).await;
        let token = res
            .headers()
            .get("upm-token")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let res = test::call_service(&app, post(&token, INSTALL_URI_MEDIA_TYPE)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let body: Value = test::read_body_json(res).await;
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("development mode"));

        let res = test::call_service(
            &app,
            test::TestRequest::get()
                .uri("/t/nowhere/rest/plugins/1.0/")
                .insert_header(basic("admin@example.com", "right"))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert!(service.installation("acme").is_none());
    }
}
