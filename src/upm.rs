//! Installing the app on a development site from the command line (`warden dev register` and
//! `unregister`), through the site's Universal Plugin Manager (UPM) REST API: the way a developer
//! installs a Connect app from its descriptor URL (docs/PROTOCOL.md, "Installing from the CLI").
//!
//! 1. `GET <site>/rest/plugins/1.0/?os_authType=basic` with basic auth (account email, API
//!    token) answers a `upm-token` header;
//! 2. `POST <site>/rest/plugins/1.0/?token=<upm-token>` with `{"pluginUri", "pluginName"}` as
//!    `application/vnd.atl.plugins.install.uri+json` answers `202` with a pending task;
//! 3. the task (`links.self`) is polled until it turns into the installed plugin (a body with
//!    `key`) or reports `status.done` with UPM's `errorMessage` / `subCode`;
//! 4. `DELETE <site>/rest/plugins/1.0/<appKey>-key` removes the app.
//!
//! The site itself fetches the descriptor and sends the signed `installed` callback to the app.
//! The API token goes only to the site, only over HTTPS (plain HTTP for loopback sites only, for
//! tests), never into an error message or a `Debug` output.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;

/// Where UPM's REST API lives below a site's base URL.
const UPM_PATH: &str = "rest/plugins/1.0/";
/// `Accept` of the token request: the list of installed plugins.
const INSTALLED_MEDIA_TYPE: &str = "application/vnd.atl.plugins.installed+json";
/// `Content-Type` of an install from a URI.
const INSTALL_URI_MEDIA_TYPE: &str = "application/vnd.atl.plugins.install.uri+json";
/// The response header carrying the token an install request must quote.
const UPM_TOKEN_HEADER: &str = "upm-token";
/// Bounds of the pause between two polls of a pending task (UPM suggests one in `pingAfter`).
const MIN_PING: Duration = Duration::from_millis(100);
const MAX_PING: Duration = Duration::from_secs(5);
/// Longest error text from the site that is repeated in a message.
const MAX_QUOTED: usize = 400;

/// A site's base URL (`https://NAME.atlassian.net`, `https://NAME.atlassian.net/wiki`): HTTPS,
/// or plain HTTP to a loopback address; no credentials, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteUrl(Url);

impl SiteUrl {
    pub fn parse(raw: &str) -> Result<Self, UpmError> {
        let bad = |why: &str| UpmError::BadSite(format!("{raw:?} {why}"));
        let mut url = Url::parse(raw.trim()).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        match url.scheme() {
            "https" => {}
            "http" if url.host_str().is_some_and(is_loopback) => {}
            "http" => {
                return Err(bad(
                    "must use https: the API token would cross the network in clear",
                ))
            }
            _ => return Err(bad("must be an https URL")),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "must not carry credentials: pass --user and set ATLASSIAN_API_TOKEN",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        // One trailing slash, so that joining `rest/...` keeps a path such as `/wiki`.
        let path = format!("{}/", url.path().trim_end_matches('/'));
        url.set_path(&path);
        Ok(Self(url))
    }

    /// `<site>/rest/plugins/1.0/<tail>`.
    fn upm(&self, tail: &str) -> Url {
        self.0
            .join(UPM_PATH)
            .and_then(|u| u.join(tail))
            .expect("a relative path joins onto an http(s) URL")
    }

    /// The site's base URL without its trailing slash, as printed.
    pub fn as_str(&self) -> &str {
        self.0.as_str().trim_end_matches('/')
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A site administrator's account email and API token.
pub struct SiteCredentials {
    user: String,
    api_token: SecretString,
}

impl SiteCredentials {
    pub fn new(user: &str, api_token: SecretString) -> Result<Self, UpmError> {
        let user = user.trim();
        if user.is_empty() {
            return Err(UpmError::BadCredentialsInput(
                "--user is empty: give the Atlassian account email of a site administrator".into(),
            ));
        }
        if api_token.expose_secret().trim().is_empty() {
            return Err(UpmError::BadCredentialsInput(
                "ATLASSIAN_API_TOKEN is empty: create an API token at \
                 https://id.atlassian.com/manage-profile/security/api-tokens"
                    .into(),
            ));
        }
        Ok(Self {
            user: user.to_owned(),
            api_token,
        })
    }
}

impl std::fmt::Debug for SiteCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCredentials")
            .field("user", &self.user)
            .field("api_token", &"[REDACTED]")
            .finish()
    }
}

/// Why an install or an uninstall did not happen. Messages never contain the API token.
#[derive(Debug, thiserror::Error)]
pub enum UpmError {
    #[error("--site {0}")]
    BadSite(String),
    #[error("{0}")]
    BadCredentialsInput(String),
    #[error("--descriptor-url {0}")]
    BadDescriptorUrl(String),
    #[error(
        "the site refused the credentials of {user} (401 Unauthorized): --user must be the \
         Atlassian account email and ATLASSIAN_API_TOKEN an API token of that account (not its \
         password){}",
        quoted(.text)
    )]
    BadCredentials { user: String, text: String },
    #[error(
        "the site refused (403 Forbidden): {} must be a site administrator, and development mode \
         must be on (Settings > Apps > Manage apps > Settings > Enable development mode){}",
        .user, quoted(.text)
    )]
    Forbidden { user: String, text: String },
    #[error(
        "no plugin manager at {url} (404 Not Found): --site must be the site's base URL, e.g. \
         https://NAME.atlassian.net (with /wiki for Confluence){}",
        quoted(.text)
    )]
    UpmMissing { url: String, text: String },
    #[error("the app {key} is not installed on {site} (404 Not Found){}", quoted(.text))]
    NotInstalled {
        key: String,
        site: String,
        text: String,
    },
    #[error("{what}: the site did not answer within {}s (--timeout)", .after.as_secs())]
    Timeout { what: String, after: Duration },
    #[error(
        "UPM had not finished installing after {}s (--wait); see the site's Manage apps page",
        .0.as_secs()
    )]
    StillPending(Duration),
    #[error("{what}: {cause}")]
    Transport { what: String, cause: String },
    #[error("the site answered without a upm-token header: is {0} a Jira or Confluence site?")]
    NoUpmToken(String),
    #[error("UPM could not install the app: {message}{}", sub_code.as_deref().map(|c| format!(" (subCode {c})")).unwrap_or_default())]
    InstallFailed {
        message: String,
        sub_code: Option<String>,
    },
    #[error("{what}: the site answered {status}{}", quoted(.text))]
    Unexpected {
        what: String,
        status: StatusCode,
        text: String,
    },
}

fn quoted(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("; the site said: {text}")
    }
}

/// What the site reported once the app was installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The app key, when the site named it.
    pub key: Option<String>,
    /// `false` when the site installed the app disabled (it was disabled before an upgrade).
    pub enabled: bool,
}

/// Talks to one site's plugin manager as one administrator.
#[derive(Debug)]
pub struct UpmClient {
    http: reqwest::Client,
    site: SiteUrl,
    credentials: SiteCredentials,
    timeout: Duration,
}

impl UpmClient {
    /// `timeout` bounds each request.
    pub fn new(
        site: SiteUrl,
        credentials: SiteCredentials,
        timeout: Duration,
    ) -> Result<Self, UpmError> {
        let http = reqwest::Client::builder()
            // A pending task turns into the plugin by a redirect; never follow one to another
            // origin, where the credentials would go too.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                let same_origin = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() == attempt.url().origin());
                if attempt.previous().len() > 5 || !same_origin {
                    attempt.stop()
                } else {
                    attempt.follow()
                }
            }))
            .timeout(timeout)
            .user_agent(concat!("connect-warden/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpmError::Transport {
                what: "building the HTTP client".into(),
                cause: e.to_string(),
            })?;
        Ok(Self {
            http,
            site,
            credentials,
            timeout,
        })
    }

    pub fn site(&self) -> &SiteUrl {
        &self.site
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        self.http.request(method, url).basic_auth(
            &self.credentials.user,
            Some(self.credentials.api_token.expose_secret()),
        )
    }

    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, HeaderMap, String), UpmError> {
        let response = request.send().await.map_err(|e| self.transport(what, e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|e| self.transport(what, e))?;
        Ok((status, headers, text))
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> UpmError {
        if e.is_timeout() {
            return UpmError::Timeout {
                what: what.to_owned(),
                after: self.timeout,
            };
        }
        // `what` names the URL; without it here, the upm-token of an install URL stays out too.
        // reqwest never puts headers (the credentials) in its messages.
        let e = e.without_url();
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            cause.push_str(": ");
            cause.push_str(&s.to_string());
            source = s.source();
        }
        UpmError::Transport {
            what: what.to_owned(),
            cause,
        }
    }

    /// The error for a refusal common to every UPM request.
    fn refusal(&self, what: &str, status: StatusCode, text: &str) -> UpmError {
        let text = site_text(text);
        match status {
            StatusCode::UNAUTHORIZED => UpmError::BadCredentials {
                user: self.credentials.user.clone(),
                text,
            },
            StatusCode::FORBIDDEN => UpmError::Forbidden {
                user: self.credentials.user.clone(),
                text,
            },
            StatusCode::NOT_FOUND => UpmError::UpmMissing {
                url: self.site.upm("").to_string(),
                text,
            },
            _ => UpmError::Unexpected {
                what: what.to_owned(),
                status,
                text,
            },
        }
    }

    /// Step 1: a token for one install request.
    async fn upm_token(&self) -> Result<String, UpmError> {
        let mut url = self.site.upm("");
        url.set_query(Some("os_authType=basic"));
        let what = format!("GET {url}");
        let (status, headers, text) = self
            .send(
                &what,
                self.request(reqwest::Method::GET, url)
                    .header(ACCEPT, INSTALLED_MEDIA_TYPE),
            )
            .await?;
        if !status.is_success() {
            return Err(self.refusal(&what, status, &text));
        }
        headers
            .get(UPM_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| UpmError::NoUpmToken(self.site.as_str().to_owned()))
    }

    /// Installs the app whose descriptor is at `descriptor_url` and waits up to `wait` for UPM
    /// to report the outcome.
    pub async fn install(
        &self,
        descriptor_url: &Url,
        plugin_name: &str,
        wait: Duration,
    ) -> Result<Installed, UpmError> {
        let token = self.upm_token().await?;
        let mut url = self.site.upm("");
        url.query_pairs_mut().append_pair("token", &token);
        let what = format!("POST {}", self.site.upm(""));
        let body = serde_json::json!({
            "pluginUri": descriptor_url.as_str(),
            "pluginName": plugin_name,
        });
        let (status, _, text) = self
            .send(
                &what,
                self.request(reqwest::Method::POST, url)
                    .header(ACCEPT, "application/json")
                    .header(CONTENT_TYPE, INSTALL_URI_MEDIA_TYPE)
                    .body(body.to_string()),
            )
            .await?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(match upm_failure(&json) {
                Some(failed) if status == StatusCode::BAD_REQUEST => failed,
                _ => self.refusal(&what, status, &text),
            });
        }
        let deadline = Instant::now() + wait;
        let mut task = json;
        loop {
            match TaskState::of(&task) {
                TaskState::Installed(installed) => return Ok(installed),
                TaskState::Failed(failure) => return Err(failure),
                TaskState::Pending { ping_after } => {
                    let Some(link) = task.pointer("/links/self").and_then(Value::as_str) else {
                        return Err(UpmError::Unexpected {
                            what,
                            status,
                            text: "a pending task without links.self".into(),
                        });
                    };
                    let link = self.task_url(link)?;
                    if Instant::now() >= deadline {
                        return Err(UpmError::StillPending(wait));
                    }
                    tokio::time::sleep(ping_after.clamp(MIN_PING, MAX_PING)).await;
                    task = self.poll(link).await?;
                }
            }
        }
    }

    /// The pending task's URL: `links.self` is a path on the site's origin.
    fn task_url(&self, link: &str) -> Result<Url, UpmError> {
        let url = self.site.0.join(link).map_err(|e| UpmError::Unexpected {
            what: "reading the pending task".into(),
            status: StatusCode::ACCEPTED,
            text: format!("links.self {link:?} is not a URL: {e}"),
        })?;
        if url.origin() != self.site.0.origin() {
            return Err(UpmError::Unexpected {
                what: "reading the pending task".into(),
                status: StatusCode::ACCEPTED,
                text: format!("links.self {link:?} points away from the site"),
            });
        }
        Ok(url)
    }

    async fn poll(&self, url: Url) -> Result<Value, UpmError> {
        let what = format!("GET {url}");
        let (status, _, text) = self
            .send(
                &what,
                self.request(reqwest::Method::GET, url)
                    .header(ACCEPT, "application/json"),
            )
            .await?;
        if !status.is_success() {
            return Err(self.refusal(&what, status, &text));
        }
        serde_json::from_str(&text).map_err(|_| UpmError::Unexpected {
            what,
            status,
            text: site_text(&text),
        })
    }

    /// Removes the app `app_key` from the site (the site sends `uninstalled` to the app).
    pub async fn uninstall(&self, app_key: &str) -> Result<(), UpmError> {
        let url = self.site.upm(&format!("{app_key}-key"));
        let what = format!("DELETE {url}");
        let (status, _, text) = self
            .send(&what, self.request(reqwest::Method::DELETE, url))
            .await?;
        if status.is_success() {
            return Ok(());
        }
        Err(match status {
            StatusCode::NOT_FOUND => UpmError::NotInstalled {
                key: app_key.to_owned(),
                site: self.site.as_str().to_owned(),
                text: site_text(&text),
            },
            _ => self.refusal(&what, status, &text),
        })
    }
}

/// What a pending task (or what it turned into) says.
#[derive(Debug)]
enum TaskState {
    Pending { ping_after: Duration },
    Installed(Installed),
    Failed(UpmError),
}

impl TaskState {
    fn of(body: &Value) -> Self {
        // The plugin itself: the task is over and the app installed.
        if let Some(key) = body.get("key").and_then(Value::as_str) {
            return Self::Installed(Installed {
                key: Some(key.to_owned()),
                enabled: body.get("enabled").and_then(Value::as_bool).unwrap_or(true),
            });
        }
        if let Some(failure) = upm_failure(body) {
            return Self::Failed(failure);
        }
        let done = body
            .pointer("/status/done")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if done {
            return Self::Installed(Installed {
                key: None,
                enabled: true,
            });
        }
        let ping_after = body
            .get("pingAfter")
            .and_then(Value::as_u64)
            .map_or(MIN_PING, Duration::from_millis);
        Self::Pending { ping_after }
    }
}

/// UPM's own account of a failure: `errorMessage` and `subCode`, in `status` (a finished task)
/// or at the top (a refused request); `None` when the body has neither.
fn upm_failure(body: &Value) -> Option<UpmError> {
    let field = |name: &str| {
        body.pointer(&format!("/status/{name}"))
            .or_else(|| body.get(name))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let message = field("errorMessage").or_else(|| field("message"));
    let sub_code = field("subCode");
    if message.is_none() && sub_code.is_none() {
        return None;
    }
    Some(UpmError::InstallFailed {
        message: message.unwrap_or_else(|| "no message".into()),
        sub_code,
    })
}

/// The site's answer as quoted in a message: one line, bounded, nothing of an HTML page.
fn site_text(text: &str) -> String {
    let text = text.trim();
    if text.starts_with('<') {
        return String::new();
    }
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED)
        .collect();
    if text.chars().count() > MAX_QUOTED {
        format!("{one_line}…")
    } else {
        one_line
    }
}

/// The descriptor URL UPM is given: absolute http(s).
pub fn descriptor_url(raw: &str) -> Result<Url, UpmError> {
    let url = Url::parse(raw.trim())
        .map_err(|e| UpmError::BadDescriptorUrl(format!("{raw:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UpmError::BadDescriptorUrl(format!(
            "{raw:?} must be an http(s) URL the site can fetch"
        )));
    }
    Ok(url)
}

/// Whether the site, on another machine, can fetch `descriptor`: not when it names this one.
pub fn unreachable_from(site: &SiteUrl, descriptor: &Url) -> bool {
    let site_local = site.0.host_str().is_some_and(is_loopback);
    let descriptor_local = descriptor.host_str().is_some_and(is_loopback);
    descriptor_local && !site_local
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn site_urls_use_https_except_on_loopback() {
        let site = SiteUrl::parse("https://acme.atlassian.net").unwrap();
        assert_eq!(site.as_str(), "https://acme.atlassian.net");
        assert_eq!(
            site.upm("").as_str(),
            "https://acme.atlassian.net/rest/plugins/1.0/"
        );
        let wiki = SiteUrl::parse("https://acme.atlassian.net/wiki/").unwrap();
        assert_eq!(
            wiki.upm("my-app-key").as_str(),
            "https://acme.atlassian.net/wiki/rest/plugins/1.0/my-app-key"
        );
        assert!(SiteUrl::parse("http://127.0.0.1:9/t/acme").is_ok());
        assert!(SiteUrl::parse("http://localhost:9").is_ok());
        for bad in [
            "http://acme.atlassian.net",
            "http://127.0.0.1.evil.com",
            "ftp://acme.atlassian.net",
            "https://me:pw@acme.atlassian.net",
            "https://acme.atlassian.net/?x=1",
            "acme.atlassian.net",
        ] {
            assert!(SiteUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_never_show_the_token() {
        let creds = SiteCredentials::new(
            "me@example.com",
            SecretString::from("tok-SECRET".to_owned()),
        )
        .unwrap();
        assert!(!format!("{creds:?}").contains("tok-SECRET"));
        let client = UpmClient::new(
            SiteUrl::parse("https://acme.atlassian.net").unwrap(),
            creds,
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(!format!("{client:?}").contains("tok-SECRET"));
        assert!(SiteCredentials::new(" ", SecretString::from("t".to_owned())).is_err());
        assert!(SiteCredentials::new("me", SecretString::from(" ".to_owned())).is_err());
    }

    #[test]
    fn task_states() {
        let pending = json!({"type": "INSTALL", "pingAfter": 300, "status": {"done": false}, "links": {"self": "/rest/plugins/1.0/pending/1"}});
        assert!(matches!(
            TaskState::of(&pending),
            TaskState::Pending { ping_after } if ping_after == Duration::from_millis(300)
        ));
        let failed = json!({"status": {"done": true, "errorMessage": "descriptor unreachable", "subCode": "x.y"}});
        match TaskState::of(&failed) {
            TaskState::Failed(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("descriptor unreachable") && text.contains("x.y"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        let plugin = json!({"key": "my-app", "enabled": false});
        assert!(matches!(
            TaskState::of(&plugin),
            TaskState::Installed(Installed { key: Some(k), enabled: false }) if k == "my-app"
        ));
    }

    #[test]
    fn site_text_is_one_bounded_line_and_no_html() {
        assert_eq!(site_text("<html><body>login</body></html>"), "");
        assert_eq!(site_text("a\nb"), "a b");
        assert!(site_text(&"x".repeat(1000)).chars().count() <= MAX_QUOTED + 1);
    }

    #[test]
    fn a_local_descriptor_is_unreachable_from_a_remote_site() {
        let remote = SiteUrl::parse("https://acme.atlassian.net").unwrap();
        let local = SiteUrl::parse("http://127.0.0.1:9").unwrap();
        let d = descriptor_url("http://localhost:8080/atlassian-connect.json").unwrap();
        assert!(unreachable_from(&remote, &d));
        assert!(!unreachable_from(&local, &d));
        assert!(descriptor_url("file:///etc/passwd").is_err());
    }
}
