//! The host's side of the conversation with an app: reading its descriptor, making the tokens
//! Atlassian makes (RS256 install tokens, HS256 tenant tokens, product-request tokens), and
//! sending lifecycle callbacks and product requests. Every exchange is returned as an
//! [`Exchange`] that prints what was sent and what came back, with secrets fingerprinted.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::keys::{sign_rs256, SigningKey};
use super::state::{abbreviate_token, fingerprint, Tenant, TOKEN_LIFETIME_SECS};
use connect_protocol::claims;
use connect_protocol::domain::{BaseUrl, SharedSecret};
use connect_protocol::jwt::{self, Claims, Token};
use connect_protocol::lifecycle::LifecycleEvent;
use connect_protocol::qsh::CanonicalRequest;

/// Largest response body kept for printing.
const MAX_PRINTED_BODY: usize = 600;

/// Default timeout of one request to the app.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `host` (a URL host, IPv6 with or without brackets) is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An HTTP client for talking to apps and the fake host: no redirects, no proxy (everything
/// devtenant talks to is meant to be local), bounded time.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .user_agent(concat!("devtenant/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client without custom certificates builds")
}

/// The header Atlassian repeats on every attempt of one webhook delivery.
pub const WEBHOOK_IDENTIFIER_HEADER: &str = "X-Atlassian-Webhook-Identifier";

/// Where the app's descriptor is read and where requests go.
#[derive(Debug, Clone, Default)]
pub struct DescriptorOptions {
    /// Allow a descriptor or app URL whose host is not loopback.
    pub allow_remote: bool,
    /// Send callbacks and requests here instead of the descriptor's `baseUrl` (the `aud` stays
    /// the `baseUrl`): for an app whose public base URL is a tunnel or a name that does not
    /// resolve locally.
    pub app_url: Option<String>,
}

/// What devtenant learns from an app's descriptor.
#[derive(Debug, Clone)]
pub struct AppDescriptor {
    /// Where the descriptor was read.
    pub url: String,
    /// The app key (`key`).
    pub key: String,
    /// The descriptor's `baseUrl`: the `aud` of install tokens; paths are relative to its path.
    pub base_url: BaseUrl,
    /// Where requests are actually sent (scheme, host, port and the base path).
    pub target: BaseUrl,
    /// `lifecycle.installed` etc.; `None`: the callback is not sent.
    pub installed: Option<String>,
    pub uninstalled: Option<String>,
    pub enabled: Option<String>,
    pub disabled: Option<String>,
    /// `apiMigrations.signed-install`.
    pub signed_install: bool,
}

impl AppDescriptor {
    /// Reads the descriptor at `url` (loopback only unless `options.allow_remote`).
    pub async fn fetch(
        http: &reqwest::Client,
        url: &str,
        options: &DescriptorOptions,
    ) -> anyhow::Result<Self> {
        let parsed =
            url::Url::parse(url).with_context(|| format!("--descriptor {url:?} is not a URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("--descriptor {url:?} must be an http(s) URL");
        }
        let host = parsed.host_str().unwrap_or_default();
        if !options.allow_remote && !is_loopback_host(host) {
            bail!(
                "the descriptor host {host:?} is not a loopback address; devtenant talks to local apps only \
                 (pass --allow-remote to talk to {url} anyway)"
            );
        }
        let response = http.get(url).send().await.with_context(|| {
            format!("cannot read the descriptor at {url} (is the app running?)")
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("GET {url} answered {status}: {}", shorten(&text, 200));
        }
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("the descriptor at {url} is not JSON"))?;
        Self::from_json(url, &json, options)
    }

    /// Like [`fetch`](Self::fetch), retrying for up to `wait` while the app does not answer
    /// (it may still be starting).
    pub async fn fetch_waiting(
        http: &reqwest::Client,
        url: &str,
        options: &DescriptorOptions,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let deadline = Instant::now() + wait;
        loop {
            match Self::fetch(http, url, options).await {
                Ok(descriptor) => return Ok(descriptor),
                Err(e) if Instant::now() < deadline && is_connect_error(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Builds the descriptor read from `url`.
    pub fn from_json(url: &str, json: &Value, options: &DescriptorOptions) -> anyhow::Result<Self> {
        let key = json
            .get("key")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .with_context(|| format!("the descriptor at {url} has no \"key\""))?
            .to_owned();
        let base_url = json
            .get("baseUrl")
            .and_then(Value::as_str)
            .with_context(|| format!("the descriptor at {url} has no \"baseUrl\""))?;
        let base_url = BaseUrl::parse(base_url)
            .map_err(|e| anyhow::anyhow!("the descriptor's baseUrl: {e}"))?;
        let target = match &options.app_url {
            Some(app_url) => {
                let target =
                    BaseUrl::parse(app_url).map_err(|e| anyhow::anyhow!("--app-url: {e}"))?;
                if !options.allow_remote && !is_loopback_host(&target.host()) {
                    bail!("--app-url {app_url:?} is not a loopback address (pass --allow-remote to use it anyway)");
                }
                target
            }
            None if is_loopback_host(&base_url.host()) => base_url.clone(),
            None => {
                let descriptor = url::Url::parse(url)?;
                if is_loopback_host(descriptor.host_str().unwrap_or_default()) {
                    // The public baseUrl (a tunnel, a made-up name) is not where the app runs
                    // here: send to where its descriptor came from, under the same base path.
                    let origin = descriptor.origin().ascii_serialization();
                    BaseUrl::parse(&format!("{origin}{}", base_url.path()))
                        .map_err(|e| anyhow::anyhow!("cannot derive the app address: {e}"))?
                } else {
                    base_url.clone()
                }
            }
        };
        let lifecycle = json.get("lifecycle");
        let path = |name: &str| {
            lifecycle
                .and_then(|l| l.get(name))
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    if p.starts_with('/') {
                        p.to_owned()
                    } else {
                        format!("/{p}")
                    }
                })
        };
        let signed_install = json
            .pointer("/apiMigrations/signed-install")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            url: url.to_owned(),
            key,
            installed: path("installed"),
            uninstalled: path("uninstalled"),
            enabled: path("enabled"),
            disabled: path("disabled"),
            base_url,
            target,
            signed_install,
        })
    }

    /// The lifecycle path of `event`, if the descriptor declares one.
    pub fn lifecycle_path(&self, event: LifecycleEvent) -> Option<&str> {
        match event {
            LifecycleEvent::Installed => self.installed.as_deref(),
            LifecycleEvent::Uninstalled => self.uninstalled.as_deref(),
            LifecycleEvent::Enabled => self.enabled.as_deref(),
            LifecycleEvent::Disabled => self.disabled.as_deref(),
        }
    }

    /// The URL a request for `path_and_query` (relative to the base URL) is sent to.
    pub fn url_for(&self, path_and_query: &str) -> String {
        self.target.join(path_and_query)
    }

    /// The canonical request the app computes for `method` and `path_and_query` (relative to
    /// the base URL), for the `qsh`.
    pub fn canonical(&self, method: &str, path_and_query: &str) -> CanonicalRequest {
        let base_path = self.base_url.path();
        let rooted = if path_and_query.starts_with('/') {
            format!("{base_path}{path_and_query}")
        } else {
            format!("{base_path}/{path_and_query}")
        };
        CanonicalRequest::from_url(method, &rooted, base_path)
    }

    /// One line about the app, for the start of every subcommand's output.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "app {} (descriptor {}), baseUrl {} (the aud)",
            self.key, self.url, self.base_url
        );
        if self.target != self.base_url {
            out.push_str(&format!(", reached at {}", self.target));
        }
        out.push_str(if self.signed_install {
            ", signed installs"
        } else {
            ", signed-install not declared"
        });
        let declared: Vec<String> = [
            LifecycleEvent::Installed,
            LifecycleEvent::Uninstalled,
            LifecycleEvent::Enabled,
            LifecycleEvent::Disabled,
        ]
        .into_iter()
        .map(|e| match self.lifecycle_path(e) {
            Some(p) => format!("{}={p}", e.name()),
            None => format!("{}=(none)", e.name()),
        })
        .collect();
        out.push_str(&format!(", lifecycle {}", declared.join(" ")));
        out
    }
}

/// The host's side of the conversation with one app.
#[derive(Debug, Clone)]
pub struct AppCaller {
    pub http: reqwest::Client,
    pub app: AppDescriptor,
}

impl AppCaller {
    pub fn new(http: reqwest::Client, app: AppDescriptor) -> Self {
        Self { http, app }
    }

    /// The path of `event`, or an error naming it.
    pub fn path_of(&self, event: LifecycleEvent) -> anyhow::Result<&str> {
        self.app
            .lifecycle_path(event)
            .with_context(|| format!("the descriptor declares no {} lifecycle path", event.name()))
    }

    /// The claims of Atlassian's RS256 token for `event` of `tenant` issued at `now` (each call
    /// gets a later `exp` than the previous one for this tenant, see [`Tenant::next_exp`]).
    pub fn install_claims(
        &self,
        tenant: &mut Tenant,
        event: LifecycleEvent,
        now: i64,
    ) -> anyhow::Result<Claims> {
        let path = self.path_of(event)?;
        let canonical = self.app.canonical("POST", path);
        let exp = tenant.next_exp(now);
        Ok(claims::install_claims(
            &tenant.client_key,
            self.app.base_url.as_str(),
            &canonical,
            now,
            exp,
        ))
    }

    /// Atlassian's RS256 token for `event` of `tenant`, signed by `key`.
    pub fn install_token(
        &self,
        key: &SigningKey,
        tenant: &mut Tenant,
        event: LifecycleEvent,
    ) -> anyhow::Result<String> {
        let claims = self.install_claims(tenant, event, jwt::now())?;
        Ok(sign_rs256(key, &claims))
    }

    /// The HS256 token of a tenant-signed callback (`enabled`, `disabled`, a legacy
    /// `uninstalled` or reinstall), signed with `secret`.
    pub fn tenant_token(
        &self,
        secret: &str,
        tenant: &mut Tenant,
        event: LifecycleEvent,
    ) -> anyhow::Result<String> {
        let path = self.path_of(event)?;
        let canonical = self.app.canonical("POST", path);
        let now = jwt::now();
        let exp = tenant.next_exp(now);
        let claims = claims::tenant_claims(&tenant.client_key, &canonical, now, exp);
        Ok(jwt::sign_hs256(&claims, &parse_secret(secret)?))
    }

    /// The claims of a product request by the site `client_key` as user `account_id`.
    pub fn product_claims(
        &self,
        client_key: &str,
        method: &str,
        path_and_query: &str,
        account_id: &str,
        iat: i64,
    ) -> Claims {
        claims::product_claims(
            client_key,
            account_id,
            &self.app.canonical(method, path_and_query),
            iat,
            iat + TOKEN_LIFETIME_SECS,
        )
    }

    /// An HS256 product-request token, signed with `secret`.
    pub fn product_token(
        &self,
        secret: &str,
        client_key: &str,
        method: &str,
        path_and_query: &str,
        account_id: &str,
        iat: i64,
    ) -> anyhow::Result<String> {
        let claims = self.product_claims(client_key, method, path_and_query, account_id, iat);
        Ok(jwt::sign_hs256(&claims, &parse_secret(secret)?))
    }

    /// POSTs `body` to the lifecycle path of `event`, with `Authorization: JWT <token>` when a
    /// token is given. Fails only when the descriptor declares no path for `event`; transport
    /// errors come back as an exchange without status.
    pub async fn send_callback(
        &self,
        event: LifecycleEvent,
        token: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Exchange> {
        let path = self.path_of(event)?;
        let bytes = serde_json::to_vec(body).expect("JSON values serialize");
        let mut sent = vec![
            describe_auth(token),
            format!("body: {}", describe_body(body)),
        ];
        sent.retain(|l| !l.is_empty());
        let request = self
            .http
            .post(self.app.url_for(path))
            .header("content-type", "application/json")
            .body(bytes);
        let request = match token {
            Some(t) => request.header("authorization", format!("JWT {t}")),
            None => request,
        };
        Ok(Exchange::perform("POST", self.app.url_for(path), sent, request).await)
    }

    /// POSTs a webhook delivery to `path_and_query` as Atlassian does: `Authorization: JWT
    /// <token>` and `X-Atlassian-Webhook-Identifier: <identifier>` (the same on every retry).
    pub async fn webhook(
        &self,
        path_and_query: &str,
        token: &str,
        identifier: &str,
        body: Option<String>,
    ) -> Exchange {
        let url = self.app.url_for(path_and_query);
        let body = body.unwrap_or_else(|| "{}".to_owned());
        let sent = vec![
            describe_auth(Some(token)),
            format!("{WEBHOOK_IDENTIFIER_HEADER}: {identifier}"),
            format!("body: {}", shorten(&body, 200)),
        ];
        let request = self
            .http
            .post(&url)
            .header("authorization", format!("JWT {token}"))
            .header(WEBHOOK_IDENTIFIER_HEADER, identifier)
            .header("content-type", "application/json")
            .body(body);
        Exchange::perform("POST", url, sent, request).await
    }

    /// Sends a product request `method path_and_query` with `Authorization: JWT <token>`.
    pub async fn product_request(
        &self,
        method: &str,
        path_and_query: &str,
        token: &str,
        body: Option<String>,
    ) -> anyhow::Result<Exchange> {
        let method_value = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .with_context(|| format!("{method:?} is not an HTTP method"))?;
        let url = self.app.url_for(path_and_query);
        let mut request = self
            .http
            .request(method_value, &url)
            .header("authorization", format!("JWT {token}"));
        let mut sent = vec![describe_auth(Some(token))];
        if let Some(body) = body {
            sent.push(format!("body: {}", shorten(&body, 200)));
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        Ok(Exchange::perform(&method.to_ascii_uppercase(), url, sent, request).await)
    }
}

fn is_connect_error(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_connect() || r.is_timeout())
    })
}

fn parse_secret(secret: &str) -> anyhow::Result<SharedSecret> {
    SharedSecret::parse(secret).map_err(|e| anyhow::anyhow!("{e}"))
}

/// One request and its answer, printable.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub url: String,
    /// What was sent besides method and URL, one line each (secrets fingerprinted).
    pub sent: Vec<String>,
    /// `None` when no answer came (connection refused, timeout).
    pub status: Option<u16>,
    /// The transport error, when there is no status.
    pub error: Option<String>,
    /// The response body, shortened.
    pub body: String,
    pub elapsed: Duration,
}

impl Exchange {
    async fn perform(
        method: &str,
        url: String,
        sent: Vec<String>,
        request: reqwest::RequestBuilder,
    ) -> Self {
        let started = Instant::now();
        let mut exchange = Self {
            method: method.to_owned(),
            url,
            sent,
            status: None,
            error: None,
            body: String::new(),
            elapsed: Duration::ZERO,
        };
        match request.send().await {
            Ok(response) => {
                exchange.status = Some(response.status().as_u16());
                let text = response.text().await.unwrap_or_default();
                exchange.body = shorten(&text, MAX_PRINTED_BODY);
            }
            Err(e) => exchange.error = Some(error_chain(&e)),
        }
        exchange.elapsed = started.elapsed();
        exchange
    }

    pub fn is_success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// `204`, or `error: ...` when nothing came back.
    pub fn observed(&self) -> String {
        match (self.status, &self.error) {
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => format!("error: {}", shorten(e, 60)),
            (None, None) => "no answer".into(),
        }
    }

    /// The response body as JSON, if it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "> {} {}", self.method, self.url)?;
        for line in &self.sent {
            writeln!(f, ">   {line}")?;
        }
        match (self.status, &self.error) {
            (Some(status), _) => {
                let reason = reqwest::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("");
                write!(f, "< {status} {reason} ({} ms)", self.elapsed.as_millis())?;
                if !self.body.is_empty() {
                    write!(f, "\n<   {}", self.body)?;
                }
                Ok(())
            }
            (None, error) => write!(
                f,
                "< no answer: {} ({} ms)",
                error.as_deref().unwrap_or("unknown error"),
                self.elapsed.as_millis()
            ),
        }
    }
}

/// `Authorization: JWT RS256 kid=… iss=…` without the secret parts.
pub fn describe_auth(token: Option<&str>) -> String {
    let Some(token) = token else {
        return "Authorization: (none: unsigned)".into();
    };
    match Token::parse(token) {
        Ok(parsed) => {
            let claims = parsed.claims();
            let mut parts = vec![format!("alg={}", parsed.alg())];
            if let Some(kid) = parsed.kid() {
                parts.push(format!("kid={kid}"));
            }
            if let Some(iss) = &claims.iss {
                parts.push(format!("iss={iss}"));
            }
            if let Some(sub) = &claims.sub {
                parts.push(format!("sub={sub}"));
            }
            if let Some(aud) = &claims.aud {
                parts.push(format!(
                    "aud={}",
                    serde_json::to_string(aud).unwrap_or_default()
                ));
            }
            let now = jwt::now();
            if let Some(iat) = claims.iat {
                parts.push(format!("iat={}", relative(iat - now)));
            }
            if let Some(exp) = claims.exp {
                parts.push(format!("exp={}", relative(exp - now)));
            }
            if let Some(qsh) = &claims.qsh {
                parts.push(format!(
                    "qsh={}",
                    if qsh.len() > 12 {
                        format!("{}…", &qsh[..12])
                    } else {
                        qsh.clone()
                    }
                ));
            }
            format!(
                "Authorization: JWT {} [{}]",
                abbreviate_token(token),
                parts.join(" ")
            )
        }
        Err(e) => format!("Authorization: JWT {} [{e}]", abbreviate_token(token)),
    }
}

fn relative(seconds: i64) -> String {
    match seconds {
        0 => "now".into(),
        s if s > 0 => format!("now+{s}s"),
        s => format!("now-{}s", -s),
    }
}

/// The interesting fields of a lifecycle body, secrets fingerprinted.
pub fn describe_body(body: &Value) -> String {
    let Some(object) = body.as_object() else {
        return shorten(&body.to_string(), 200);
    };
    let mut parts = Vec::new();
    for field in ["eventType", "key", "clientKey", "baseUrl", "oauthClientId"] {
        if let Some(value) = object.get(field).and_then(Value::as_str) {
            parts.push(format!("{field}={value}"));
        }
    }
    if let Some(secret) = object.get("sharedSecret").and_then(Value::as_str) {
        parts.push(format!("sharedSecret={}", fingerprint(secret)));
    }
    let others = object.len().saturating_sub(parts.len());
    if others > 0 {
        parts.push(format!("(+{others} more fields)"));
    }
    parts.join(" ")
}

/// `text` on one line, at most `max` characters.
pub fn shorten(text: &str, max: usize) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// `message: cause: cause`, for a transport error that reqwest reports in layers.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn descriptor(base_url: &str, options: &DescriptorOptions) -> AppDescriptor {
        let json = json!({
            "key": "my-app",
            "baseUrl": base_url,
            "apiMigrations": {"signed-install": true},
            "lifecycle": {"installed": "/lifecycle/installed", "enabled": "enabled"},
        });
        AppDescriptor::from_json(
            "http://127.0.0.1:3000/app/atlassian-connect.json",
            &json,
            options,
        )
        .unwrap()
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "localhost",
            "LOCALHOST",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "localhost.evil.com", "[::2]", ""] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn descriptor_paths_and_target() {
        let app = descriptor("http://127.0.0.1:3000/app", &DescriptorOptions::default());
        assert_eq!(app.key, "my-app");
        assert!(app.signed_install);
        assert_eq!(
            app.lifecycle_path(LifecycleEvent::Installed),
            Some("/lifecycle/installed")
        );
        assert_eq!(
            app.lifecycle_path(LifecycleEvent::Enabled),
            Some("/enabled")
        );
        assert_eq!(app.lifecycle_path(LifecycleEvent::Uninstalled), None);
        assert_eq!(
            app.url_for("/lifecycle/installed"),
            "http://127.0.0.1:3000/app/lifecycle/installed"
        );
        // qsh relative to the base path.
        assert_eq!(
            app.canonical("POST", "/lifecycle/installed").as_str(),
            "POST&/lifecycle/installed&"
        );
        assert_eq!(
            app.canonical("get", "/api/x?b=2&a=1").as_str(),
            "GET&/api/x&a=1&b=2"
        );
    }

    #[test]
    fn public_base_url_is_reached_where_the_descriptor_came_from() {
        let app = descriptor("https://app.example.com/app", &DescriptorOptions::default());
        assert_eq!(app.base_url.as_str(), "https://app.example.com/app");
        assert_eq!(app.target.as_str(), "http://127.0.0.1:3000/app");
        let app = descriptor(
            "https://app.example.com/app",
            &DescriptorOptions {
                allow_remote: false,
                app_url: Some("http://localhost:9/app".into()),
            },
        );
        assert_eq!(app.target.as_str(), "http://localhost:9/app");
        let remote = AppDescriptor::from_json(
            "http://127.0.0.1:1/d.json",
            &json!({"key": "k", "baseUrl": "https://x.example.com"}),
            &DescriptorOptions {
                allow_remote: false,
                app_url: Some("https://x.example.com".into()),
            },
        );
        assert!(remote.is_err());
    }

    #[test]
    fn auth_and_body_descriptions_hide_secrets() {
        let mut tenant = Tenant::generate(Some("t"), "http://127.0.0.1:1");
        let body = tenant.body("my-app", "installed");
        let described = describe_body(&body);
        assert!(described.contains(&tenant.client_key));
        assert!(!described.contains(&tenant.shared_secret));
        assert!(described.contains(&fingerprint(&tenant.shared_secret)));

        let client = AppCaller::new(
            http_client(DEFAULT_TIMEOUT),
            descriptor("http://127.0.0.1:3000/app", &DescriptorOptions::default()),
        );
        let secret = tenant.shared_secret.clone();
        let token = client
            .tenant_token(&secret, &mut tenant, LifecycleEvent::Enabled)
            .unwrap();
        let auth = describe_auth(Some(&token));
        assert!(auth.contains("alg=HS256"), "{auth}");
        assert!(auth.contains(&format!("iss={}", tenant.client_key)));
        assert!(!auth.contains(&secret));
        assert!(client
            .tenant_token(&secret, &mut tenant, LifecycleEvent::Disabled)
            .is_err());
    }
}
