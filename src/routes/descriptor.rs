//! The app descriptor: rendered once at start-up from the template (`WARDEN_DESCRIPTOR`),
//! checked against the Connect rules warden depends on, and served at
//! `GET /atlassian-connect.json`.
//!
//! Rendering substitutes `{{baseUrl}}`, `{{appKey}}` and `{{env.NAME}}` inside the *parsed*
//! template's string values, so a substituted value is JSON-escaped when the descriptor is
//! written out and can never break or add structure. Any problem stops start-up naming the
//! placeholder or field and its JSON path (README "Descriptor").

use std::collections::HashMap;

use actix_web::{web, HttpResponse};
use serde_json::{Map, Value};

use crate::startup::AppState;

/// Longest app key Connect accepts.
pub const MAX_APP_KEY_CHARS: usize = 64;

/// The paths of warden's own routes (relative to the base URL). The lifecycle paths a
/// descriptor declares must be these; no webhook may take one of them.
pub const LIFECYCLE_PATHS: [(&str, &str); 4] = [
    ("installed", "/installed"),
    ("uninstalled", "/uninstalled"),
    ("enabled", "/enabled"),
    ("disabled", "/disabled"),
];
/// The rest of the routes `startup::configure` registers under the base URL (a new route goes
/// here too: webhook routes are registered first and would take it).
const SERVICE_PATHS: [&str; 7] = [
    "/atlassian-connect.json",
    "/api/tenant",
    "/api/context",
    "/healthz",
    "/readyz",
    "/metrics",
    "/forge/events",
];

/// Connect scope names (the product's docs, "Scopes for Connect apps"), in upper case.
const SCOPES: [&str; 9] = [
    "NONE",
    "READ",
    "WRITE",
    "DELETE",
    "PROJECT_ADMIN",
    "SPACE_ADMIN",
    "ADMIN",
    "ACT_AS_USER",
    "ACCESS_EMAIL_ADDRESSES",
];
/// The scopes that imply `READ`, which an app receiving webhooks must have.
const READING_SCOPES: [&str; 6] = [
    "READ",
    "WRITE",
    "DELETE",
    "PROJECT_ADMIN",
    "SPACE_ADMIN",
    "ADMIN",
];

/// Why the descriptor template cannot be served. Each names the JSON path it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("unknown placeholder {{{{{placeholder}}}}} at {path} (known: {{{{baseUrl}}}}, {{{{appKey}}}}, {{{{env.NAME}}}})")]
    UnknownPlaceholder { placeholder: String, path: String },
    #[error(
        "placeholder {{{{env.{name}}}}} at {path}: the environment variable {name} is not set"
    )]
    MissingEnv { name: String, path: String },
    #[error("unclosed placeholder at {path}: \"{{{{\" without \"}}}}\"")]
    Unclosed { path: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> DescriptorError {
    DescriptorError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// What placeholders stand for. `app_key` is `None` while the app key itself is being worked
/// out (the template's own `key` cannot refer to it).
pub struct Placeholders<'a> {
    pub base_url: &'a str,
    pub app_key: Option<&'a str>,
    /// The process environment (all variables, not only `WARDEN_*`).
    pub env: &'a HashMap<String, String>,
}

impl Placeholders<'_> {
    /// `text` with every `{{...}}` replaced; `path` names where it is, for errors.
    pub fn substitute(&self, text: &str, path: &str) -> Result<String, DescriptorError> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| DescriptorError::Unclosed {
                path: path.to_owned(),
            })?;
            out.push_str(&self.value_of(after[..end].trim(), path)?);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn value_of(&self, name: &str, path: &str) -> Result<String, DescriptorError> {
        let unknown = || DescriptorError::UnknownPlaceholder {
            placeholder: name.to_owned(),
            path: path.to_owned(),
        };
        match name {
            "baseUrl" => Ok(self.base_url.to_owned()),
            "appKey" => self.app_key.map(str::to_owned).ok_or_else(|| {
                invalid(
                    path,
                    "{{appKey}} cannot be used in the key itself (set WARDEN_APP_KEY or write the key)",
                )
            }),
            _ => match name.strip_prefix("env.") {
                Some(var) if !var.is_empty() => {
                    self.env
                        .get(var)
                        .cloned()
                        .ok_or_else(|| DescriptorError::MissingEnv {
                            name: var.to_owned(),
                            path: path.to_owned(),
                        })
                }
                _ => Err(unknown()),
            },
        }
    }

    /// Every string value of `value` (not the object keys) with its placeholders replaced.
    pub fn render(&self, value: &mut Value, path: &str) -> Result<(), DescriptorError> {
        match value {
            Value::String(text) if text.contains("{{") => {
                *text = self.substitute(text, path)?;
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.render(item, &format!("{path}[{i}]"))?;
                }
            }
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    self.render(item, &join(path, key))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `modules.webhooks` + `url`: the JSON path of a member.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// One `modules.webhooks` entry: the event and the path warden serves it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredWebhook {
    pub event: String,
    /// Relative to the base URL, without the query (which may hold Jira's `{issue.id}`
    /// variables); what the route matches.
    pub path: String,
}

/// The rendered and checked descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    json: Value,
    webhooks: Vec<DeclaredWebhook>,
}

impl Descriptor {
    /// Renders `template` (already parsed): placeholders substituted, `baseUrl` and `key` set
    /// from the settings, `signed-install` and `context-qsh` switched on; then checks it.
    pub fn render(
        template: &Value,
        placeholders: &Placeholders<'_>,
        app_key: &str,
    ) -> Result<Self, DescriptorError> {
        let mut json = template.clone();
        placeholders.render(&mut json, "")?;
        let Some(object) = json.as_object_mut() else {
            return Err(invalid("(the whole descriptor)", "must be a JSON object"));
        };
        object.insert("baseUrl".into(), placeholders.base_url.into());
        object.insert("key".into(), app_key.into());
        force_migrations(object)?;
        let webhooks = check(object)?;
        Ok(Self { json, webhooks })
    }

    pub fn json(&self) -> &Value {
        &self.json
    }

    pub fn webhooks(&self) -> &[DeclaredWebhook] {
        &self.webhooks
    }

    /// The descriptor as served.
    pub fn to_pretty_string(&self) -> String {
        serde_json::to_string_pretty(&self.json).expect("JSON values serialize")
    }
}

/// `signed-install` and `context-qsh` are what warden's checks rely on: absent, they are
/// switched on; a template that switches one off contradicts warden and is refused rather than
/// silently overridden (its author expects unsigned installs or plain `qsh` tokens).
fn force_migrations(object: &mut Map<String, Value>) -> Result<(), DescriptorError> {
    let migrations = object
        .entry("apiMigrations")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(migrations) = migrations.as_object_mut() else {
        return Err(invalid("apiMigrations", "must be an object"));
    };
    for name in ["signed-install", "context-qsh"] {
        let field = format!("apiMigrations.{name}");
        match migrations.get(name) {
            None | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(invalid(
                    field,
                    "must be true: warden verifies installs and context tokens this way (remove it or set it to true)",
                ))
            }
            Some(_) => return Err(invalid(field, "must be true or absent")),
        }
        migrations.insert(name.into(), true.into());
    }
    Ok(())
}

/// The Connect rules warden depends on; returns the declared webhooks.
fn check(object: &Map<String, Value>) -> Result<Vec<DeclaredWebhook>, DescriptorError> {
    check_key(object.get("key"))?;
    check_base_url(object.get("baseUrl"))?;
    match object.pointer_str("authentication.type") {
        Some(t) if t.eq_ignore_ascii_case("jwt") => {}
        Some(other) => {
            return Err(invalid(
                "authentication.type",
                format!("is {other:?}; warden authenticates with \"jwt\""),
            ))
        }
        None => {
            return Err(invalid(
                "authentication.type",
                "is missing; must be \"jwt\"",
            ))
        }
    }
    check_lifecycle(object.get("lifecycle"))?;
    let scopes = check_scopes(object.get("scopes"))?;
    let webhooks = check_webhooks(object.get("modules"))?;
    if !webhooks.is_empty() && !scopes.iter().any(|s| READING_SCOPES.contains(&s.as_str())) {
        return Err(invalid(
            "scopes",
            "an app with webhooks must declare READ (or a scope that implies it)",
        ));
    }
    Ok(webhooks)
}

trait PointerStr {
    fn pointer_str(&self, dotted: &str) -> Option<&str>;
}

impl PointerStr for Map<String, Value> {
    fn pointer_str(&self, dotted: &str) -> Option<&str> {
        let (first, rest) = dotted.split_once('.').unwrap_or((dotted, ""));
        let mut value = self.get(first)?;
        for part in rest.split('.').filter(|p| !p.is_empty()) {
            value = value.get(part)?;
        }
        value.as_str()
    }
}

/// `key`: 1 to 64 letters, digits, `-`, `_`, `.`.
fn check_key(key: Option<&Value>) -> Result<(), DescriptorError> {
    let key = key.and_then(Value::as_str).unwrap_or_default();
    let problem = if key.is_empty() {
        Some("is empty".to_owned())
    } else if key.chars().count() > MAX_APP_KEY_CHARS {
        Some(format!("is longer than {MAX_APP_KEY_CHARS} characters"))
    } else {
        key.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .map(|c| format!("{key:?} contains {c:?}; only letters, digits, '-', '_' and '.'"))
    };
    match problem {
        Some(message) => Err(invalid(
            "key",
            format!("{message} (WARDEN_APP_KEY or the template's key)"),
        )),
        None => Ok(()),
    }
}

/// `baseUrl`: https, except a loopback host (development: nothing outside this machine can
/// reach it, and Atlassian would refuse it anyway).
fn check_base_url(base_url: Option<&Value>) -> Result<(), DescriptorError> {
    let text = base_url.and_then(Value::as_str).unwrap_or_default();
    let url = url::Url::parse(text)
        .map_err(|e| invalid("baseUrl", format!("{text:?} is not a URL: {e}")))?;
    let loopback = matches!(
        url.host(),
        Some(url::Host::Domain("localhost"))
            | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
            | Some(url::Host::Ipv6(std::net::Ipv6Addr::LOCALHOST))
    );
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(invalid(
            "baseUrl",
            format!("{text:?} must be https (http only for localhost or 127.0.0.1 in development) (WARDEN_BASE_URL)"),
        )),
    }
}

/// `lifecycle`: `installed` and `uninstalled` are warden's routes; `enabled` and `disabled`, if
/// declared, too (without them the host sends none).
fn check_lifecycle(lifecycle: Option<&Value>) -> Result<(), DescriptorError> {
    let Some(lifecycle) = lifecycle.and_then(Value::as_object) else {
        return Err(invalid(
            "lifecycle",
            "is missing; must declare \"installed\": \"/installed\" and \"uninstalled\": \"/uninstalled\"",
        ));
    };
    for (event, served) in LIFECYCLE_PATHS {
        let field = format!("lifecycle.{event}");
        let required = matches!(event, "installed" | "uninstalled");
        match lifecycle.get(event) {
            None if required => {
                return Err(invalid(field, format!("is missing; must be {served:?}")))
            }
            None => {}
            Some(Value::String(path)) if path == served => {}
            Some(other) => {
                return Err(invalid(
                    field,
                    format!("is {other}; warden serves this callback at {served:?}"),
                ))
            }
        }
    }
    Ok(())
}

/// `scopes`: Connect names, each all upper or all lower case. Returns them in upper case.
fn check_scopes(scopes: Option<&Value>) -> Result<Vec<String>, DescriptorError> {
    let Some(scopes) = scopes else {
        return Ok(Vec::new());
    };
    let Some(items) = scopes.as_array() else {
        return Err(invalid("scopes", "must be an array of scope names"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, scope)| {
            let field = format!("scopes[{i}]");
            let name = scope
                .as_str()
                .ok_or_else(|| invalid(&field, "must be a string"))?;
            let upper = name.to_ascii_uppercase();
            let one_case = name == upper || name == name.to_ascii_lowercase();
            if !one_case || !SCOPES.contains(&upper.as_str()) {
                return Err(invalid(
                    field,
                    format!(
                        "{name:?} is not a Connect scope (one of {}, all upper or all lower case)",
                        SCOPES.join(", ")
                    ),
                ));
            }
            Ok(upper)
        })
        .collect()
}

/// `modules.webhooks[]`: each has an `event` and a `url` relative to the base URL, whose path
/// (without the query) is one no other webhook and none of warden's routes uses.
fn check_webhooks(modules: Option<&Value>) -> Result<Vec<DeclaredWebhook>, DescriptorError> {
    let Some(modules) = modules else {
        return Ok(Vec::new());
    };
    let Some(modules) = modules.as_object() else {
        return Err(invalid("modules", "must be an object"));
    };
    let Some(webhooks) = modules.get("webhooks") else {
        return Ok(Vec::new());
    };
    let Some(entries) = webhooks.as_array() else {
        return Err(invalid("modules.webhooks", "must be an array"));
    };
    let mut declared: Vec<DeclaredWebhook> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("modules.webhooks[{i}]");
        let text = |name: &str| {
            entry
                .get(name)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| invalid(format!("{at}.{name}"), "is missing or empty"))
        };
        let event = text("event")?;
        let url = text("url")?;
        let field = format!("{at}.url");
        let path = url.split(['?', '#']).next().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(invalid(
                field,
                format!("{url:?} must be a path relative to the base URL, starting with '/'"),
            ));
        }
        if path.contains(['{', '}']) {
            return Err(invalid(
                field,
                format!("{url:?}: variables such as {{issue.id}} may only be in the query"),
            ));
        }
        let taken_by_warden = SERVICE_PATHS.contains(&path)
            || LIFECYCLE_PATHS.iter().any(|(_, served)| *served == path);
        if taken_by_warden {
            return Err(invalid(
                field,
                format!("{path:?} is one of warden's own routes"),
            ));
        }
        if let Some(other) = declared.iter().find(|d| d.path == path) {
            return Err(invalid(
                field,
                format!(
                    "{path:?} is also the url of the {:?} webhook; give each event its own path (the path tells warden which event arrived)",
                    other.event
                ),
            ));
        }
        declared.push(DeclaredWebhook {
            event: event.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(declared)
}

pub async fn descriptor(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.descriptor.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn render_with(
        template: Value,
        base_url: &str,
        env: &HashMap<String, String>,
    ) -> Result<Descriptor, DescriptorError> {
        let placeholders = Placeholders {
            base_url,
            app_key: Some("my-app"),
            env,
        };
        Descriptor::render(&template, &placeholders, "my-app")
    }

    fn render(template: Value) -> Result<Descriptor, DescriptorError> {
        render_with(template, "https://app.example.com", &env(&[]))
    }

    /// A valid template with one field changed by `edit`.
    fn template(edit: impl FnOnce(&mut Value)) -> Value {
        let mut t = json!({
            "key": "my-app",
            "name": "My app",
            "baseUrl": "{{baseUrl}}",
            "authentication": { "type": "jwt" },
            "lifecycle": { "installed": "/installed", "uninstalled": "/uninstalled" },
            "scopes": ["READ"],
            "modules": {}
        });
        edit(&mut t);
        t
    }

    /// The field an error names, for assertions.
    fn field_of(error: DescriptorError) -> String {
        match error {
            DescriptorError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn placeholders_are_substituted_in_string_values_with_json_escaping() {
        let vars = env(&[("VENDOR", "Acme \"Tools\", {\"evil\": 1}")]);
        let d = render_with(
            template(|t| {
                t["vendor"] = json!({ "name": "{{env.VENDOR}}", "url": "{{ baseUrl }}/about" });
                t["description"] = json!("{{appKey}} at {{baseUrl}}");
                t["links"] = json!(["{{baseUrl}}/docs"]);
            }),
            "https://app.example.com",
            &vars,
        )
        .unwrap();
        let json = d.json();
        assert_eq!(json["vendor"]["name"], "Acme \"Tools\", {\"evil\": 1}");
        assert_eq!(json["vendor"]["url"], "https://app.example.com/about");
        assert_eq!(json["description"], "my-app at https://app.example.com");
        assert_eq!(json["links"][0], "https://app.example.com/docs");
        // The quote is escaped in what is served: it parses back to the same structure.
        let served: Value = serde_json::from_str(&d.to_pretty_string()).unwrap();
        assert_eq!(served["vendor"].as_object().unwrap().len(), 2);
        assert!(served.get("evil").is_none());
    }

    #[test]
    fn an_unknown_placeholder_is_named_with_its_path() {
        let err = render(template(|t| {
            t["modules"] = json!({"webhooks": [
                {"event": "jira:issue_created", "url": "/hook?x={{issueId}}"}
            ]})
        }))
        .unwrap_err();
        assert_eq!(
            err,
            DescriptorError::UnknownPlaceholder {
                placeholder: "issueId".into(),
                path: "modules.webhooks[0].url".into()
            }
        );
        assert!(err.to_string().contains("{{issueId}}"), "{err}");
    }

    #[test]
    fn a_missing_environment_variable_is_named_with_its_path() {
        let err = render(template(|t| {
            t["vendor"] = json!({"name": "{{env.NOT_SET_X}}"})
        }))
        .unwrap_err();
        assert_eq!(
            err,
            DescriptorError::MissingEnv {
                name: "NOT_SET_X".into(),
                path: "vendor.name".into()
            }
        );
        let err = render(template(|t| t["name"] = json!("{{baseUrl"))).unwrap_err();
        assert_eq!(
            err,
            DescriptorError::Unclosed {
                path: "name".into()
            }
        );
    }

    #[test]
    fn the_app_key_cannot_refer_to_itself() {
        let placeholders = Placeholders {
            base_url: "https://a.example.com",
            app_key: None,
            env: &env(&[]),
        };
        assert!(placeholders.substitute("{{appKey}}", "key").is_err());
        assert_eq!(
            placeholders.substitute("{{env.NONE}}", "key").unwrap_err(),
            DescriptorError::MissingEnv {
                name: "NONE".into(),
                path: "key".into()
            }
        );
    }

    #[test]
    fn key_rules() {
        for (key, ok) in [
            ("my-app_1.x", true),
            (&"k".repeat(64), true),
            (&"k".repeat(65), false),
            ("my app", false),
            ("my/app", false),
            ("", false),
        ] {
            let placeholders = Placeholders {
                base_url: "https://app.example.com",
                app_key: Some(key),
                env: &env(&[]),
            };
            let result = Descriptor::render(&template(|_| {}), &placeholders, key);
            match ok {
                true => assert!(result.is_ok(), "{key}: {result:?}"),
                false => assert_eq!(field_of(result.unwrap_err()), "key", "{key}"),
            }
        }
    }

    #[test]
    fn base_url_must_be_https_except_on_loopback() {
        for (url, ok) in [
            ("https://app.example.com/x", true),
            ("http://localhost:8080", true),
            ("http://127.0.0.1:9000", true),
            ("http://[::1]:9000", true),
            ("http://app.example.com", false),
            ("http://127.0.0.2", false),
            ("ftp://localhost", false),
        ] {
            let result = render_with(template(|_| {}), url, &env(&[]));
            match ok {
                true => assert!(result.is_ok(), "{url}: {result:?}"),
                false => assert_eq!(field_of(result.unwrap_err()), "baseUrl", "{url}"),
            }
        }
    }

    #[test]
    fn authentication_must_be_jwt() {
        let err = render(template(|t| t["authentication"] = json!({"type": "none"}))).unwrap_err();
        assert_eq!(field_of(err), "authentication.type");
        let err = render(template(|t| {
            t.as_object_mut().unwrap().remove("authentication");
        }))
        .unwrap_err();
        assert_eq!(field_of(err), "authentication.type");
        assert!(render(template(|t| t["authentication"] = json!({"type": "JWT"}))).is_ok());
    }

    #[test]
    fn lifecycle_paths_must_be_the_served_routes() {
        let cases: [(Value, &str); 5] = [
            (
                json!({"uninstalled": "/uninstalled"}),
                "lifecycle.installed",
            ),
            (json!({"installed": "/installed"}), "lifecycle.uninstalled"),
            (
                json!({"installed": "/install", "uninstalled": "/uninstalled"}),
                "lifecycle.installed",
            ),
            (
                json!({"installed": "/installed", "uninstalled": "/uninstalled", "enabled": "/on"}),
                "lifecycle.enabled",
            ),
            (
                json!({"installed": "/installed", "uninstalled": "/uninstalled", "disabled": 1}),
                "lifecycle.disabled",
            ),
        ];
        for (lifecycle, field) in cases {
            let err = render(template(|t| t["lifecycle"] = lifecycle.clone())).unwrap_err();
            assert_eq!(field_of(err), field, "{lifecycle}");
        }
        let all = json!({"installed": "/installed", "uninstalled": "/uninstalled",
                         "enabled": "/enabled", "disabled": "/disabled"});
        assert!(render(template(|t| t["lifecycle"] = all)).is_ok());
        let err = render(template(|t| {
            t.as_object_mut().unwrap().remove("lifecycle");
        }))
        .unwrap_err();
        assert_eq!(field_of(err), "lifecycle");
    }

    #[test]
    fn migrations_are_forced_on_and_a_template_switching_one_off_is_refused() {
        let d = render(template(|_| {})).unwrap();
        assert_eq!(d.json()["apiMigrations"]["signed-install"], true);
        assert_eq!(d.json()["apiMigrations"]["context-qsh"], true);
        let d = render(template(|t| t["apiMigrations"] = json!({"gdpr": true}))).unwrap();
        assert_eq!(d.json()["apiMigrations"]["gdpr"], true);
        assert_eq!(d.json()["apiMigrations"]["signed-install"], true);
        for name in ["signed-install", "context-qsh"] {
            let err =
                render(template(|t| t["apiMigrations"] = json!({ name: false }))).unwrap_err();
            assert_eq!(field_of(err), format!("apiMigrations.{name}"));
            let err =
                render(template(|t| t["apiMigrations"] = json!({ name: "yes" }))).unwrap_err();
            assert_eq!(field_of(err), format!("apiMigrations.{name}"));
        }
    }

    #[test]
    fn scopes_must_be_connect_names_in_one_case() {
        assert!(render(template(
            |t| t["scopes"] = json!(["read", "WRITE", "act_as_user"])
        ))
        .is_ok());
        for bad in [
            json!(["READ", "Write"]),
            json!(["READ", "SUPERUSER"]),
            json!(["READ", 1]),
        ] {
            let err = render(template(|t| t["scopes"] = bad.clone())).unwrap_err();
            assert_eq!(field_of(err), "scopes[1]", "{bad}");
        }
        let err = render(template(|t| t["scopes"] = json!("READ"))).unwrap_err();
        assert_eq!(field_of(err), "scopes");
    }

    fn with_webhooks(webhooks: Value) -> Result<Descriptor, DescriptorError> {
        render(template(|t| t["modules"] = json!({ "webhooks": webhooks })))
    }

    #[test]
    fn webhooks_need_an_event_and_a_relative_url() {
        let d = with_webhooks(json!([
            {"event": "jira:issue_created", "url": "/hooks/created?issue={issue.id}"},
            {"event": "jira:issue_updated", "url": "/hooks/updated"},
        ]))
        .unwrap();
        assert_eq!(
            d.webhooks(),
            [
                DeclaredWebhook {
                    event: "jira:issue_created".into(),
                    path: "/hooks/created".into()
                },
                DeclaredWebhook {
                    event: "jira:issue_updated".into(),
                    path: "/hooks/updated".into()
                }
            ]
        );
        for (entry, field) in [
            (json!({"url": "/a"}), "modules.webhooks[1].event"),
            (
                json!({"event": "", "url": "/a"}),
                "modules.webhooks[1].event",
            ),
            (json!({"event": "e"}), "modules.webhooks[1].url"),
            (
                json!({"event": "e", "url": "https://x.example.com/a"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/issue/{issue.key}"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/installed"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/api/tenant?x=1"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/forge/events"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/metrics"}),
                "modules.webhooks[1].url",
            ),
            (
                json!({"event": "e", "url": "/ok?second=1"}),
                "modules.webhooks[1].url",
            ),
        ] {
            let err = with_webhooks(json!([{"event": "first", "url": "/ok"}, entry])).unwrap_err();
            assert_eq!(field_of(err), field, "{entry}");
        }
        let err = render(template(|t| t["modules"] = json!({"webhooks": {}}))).unwrap_err();
        assert_eq!(field_of(err), "modules.webhooks");
    }

    #[test]
    fn webhooks_need_a_scope_that_reads() {
        let hooks = json!({"webhooks": [{"event": "jira:issue_created", "url": "/h"}]});
        let err = render(template(|t| {
            t["scopes"] = json!(["act_as_user"]);
            t["modules"] = hooks.clone();
        }))
        .unwrap_err();
        assert_eq!(field_of(err), "scopes");
        assert!(render(template(|t| {
            t["scopes"] = json!(["write"]);
            t["modules"] = hooks.clone();
        }))
        .is_ok());
    }

    #[test]
    fn the_webhooks_example_descriptor_is_valid() {
        let template: Value =
            serde_json::from_str(include_str!("../../examples/webhooks.json")).unwrap();
        let vars = env(&[("APP_KEY", "issue-watcher")]);
        let placeholders = Placeholders {
            base_url: "https://app.example.com",
            app_key: None,
            env: &vars,
        };
        let key = placeholders.substitute("{{env.APP_KEY}}", "key").unwrap();
        let placeholders = Placeholders {
            app_key: Some(&key),
            ..placeholders
        };
        let d = Descriptor::render(&template, &placeholders, &key).unwrap();
        assert_eq!(d.webhooks().len(), 2);
        assert_eq!(d.webhooks()[0].path, "/webhooks/issue-created");
    }

    #[test]
    fn the_bundled_descriptor_is_valid() {
        let template: Value =
            serde_json::from_str(crate::configuration::BUNDLED_DESCRIPTOR).unwrap();
        let placeholders = Placeholders {
            base_url: "http://localhost:8080",
            app_key: Some("connect-warden"),
            env: &env(&[]),
        };
        let d = Descriptor::render(&template, &placeholders, "connect-warden").unwrap();
        assert_eq!(d.json()["key"], "connect-warden");
    }
}
