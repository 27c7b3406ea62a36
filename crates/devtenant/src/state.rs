//! What `devtenant` keeps between invocations, in its state directory:
//!
//! - the install-signing keys (`keys.json` + PEM files, see [`KeyRing`]);
//! - `tenants.json`: the fake sites made so far ([`Tenant`]: clientKey, baseUrl, shared secret
//!   and its predecessors, oauthClientId, ...), so that `devtenant install --tenant acme` and a
//!   later `devtenant request GET /api/tenant --tenant acme` speak for the same site;
//! - `server.json`: where `devtenant serve` listens ([`ServerInfo`]), so that the other
//!   subcommands give their sites base URLs on the fake host the server runs.
//!
//! Files are written through a temporary file and a rename; `tenants.json` holds secrets and is
//! created readable by its owner only. Two subcommands running at the same moment may lose one
//! update (last writer wins): it is a developer tool, not a database.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rand::distributions::{Alphanumeric, DistString as _};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use super::keys::{write_via_tmp, KeyRing, WriteFailure};

/// Default state directory, relative to the working directory.
pub const DEFAULT_STATE_DIR: &str = ".devtenant";
/// The tenants file inside the state directory.
pub const TENANTS_FILE: &str = "tenants.json";
/// Written by `devtenant serve`: where it listens.
pub const SERVER_FILE: &str = "server.json";

/// Lifetime of the tokens devtenant makes (Atlassian uses 180 s for lifecycle callbacks).
pub const TOKEN_LIFETIME_SECS: i64 = 180;

/// One fake site (host) and what it knows of its installation of the app.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// Local name (`--tenant acme`); never sent.
    pub name: String,
    pub client_key: String,
    /// `<fake host>/t/<site key>`: the site's address on the fake host.
    pub base_url: String,
    /// The key the fake host knows the site by (the path segment after `/t/`): the first
    /// clientKey of the site; a site import keeps it while the clientKey changes.
    #[serde(default)]
    pub site_key: String,
    /// The app key the site installed (from the descriptor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_key: Option<String>,
    /// The current shared secret.
    pub shared_secret: String,
    /// Secrets this site held before, oldest first.
    #[serde(default)]
    pub previous_secrets: Vec<String>,
    pub oauth_client_id: String,
    #[serde(default)]
    pub installation_id: String,
    #[serde(default = "default_product_type")]
    pub product_type: String,
    /// Whether the app accepted the last `installed` (and no `uninstalled` since).
    #[serde(default)]
    pub installed: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The descriptor URL the site was installed from; later subcommands default to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_url: Option<String>,
    /// Set on the old site of a site import: the name of the tenant that replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_as: Option<String>,
    /// `exp` of the last callback token made for this site; the next one gets a later `exp`,
    /// so two callbacks within one second never carry byte-identical tokens.
    #[serde(default)]
    pub last_exp: i64,
}

fn default_product_type() -> String {
    "jira".into()
}

fn yes() -> bool {
    true
}

impl Tenant {
    /// A new site named `name` (random when `None`) on the fake host at `host_url`
    /// (`http://127.0.0.1:PORT`), with a random clientKey, shared secret and oauthClientId.
    /// Its `baseUrl` is `<host_url>/t/<clientKey>`, as [`super::host`] serves sites.
    pub fn generate(name: Option<&str>, host_url: &str) -> Self {
        let id = uuid::Uuid::new_v4();
        let name = name.map_or_else(
            || format!("site-{}", &id.simple().to_string()[..8]),
            str::to_owned,
        );
        Self {
            name,
            client_key: id.to_string(),
            base_url: format!("{}/t/{id}", host_url.trim_end_matches('/')),
            site_key: id.to_string(),
            app_key: None,
            shared_secret: new_secret(),
            previous_secrets: Vec::new(),
            oauth_client_id: new_oauth_client_id(),
            installation_id: format!("ari:cloud:ecosystem::installation/{}", uuid::Uuid::new_v4()),
            product_type: default_product_type(),
            installed: false,
            enabled: true,
            descriptor_url: None,
            imported_as: None,
            last_exp: 0,
        }
    }

    /// The same site after a site import (docs/PROTOCOL.md §7): new clientKey, oauthClientId, secret and
    /// installation id, the same baseUrl.
    pub fn imported(&self, name: Option<&str>) -> Self {
        let mut new = Self::generate(name, "http://unused");
        new.base_url = self.base_url.clone();
        new.site_key = self.site_key().to_owned();
        new.app_key = self.app_key.clone();
        new.product_type = self.product_type.clone();
        new.descriptor_url = self.descriptor_url.clone();
        new
    }

    /// The key the fake host knows the site by.
    pub fn site_key(&self) -> &str {
        if self.site_key.is_empty() {
            &self.client_key
        } else {
            &self.site_key
        }
    }

    /// What the fake host must know of the site to check the app's calls to it; `None`
    /// before the app key is known.
    pub fn host_record(&self) -> Option<super::host::TenantRecord> {
        Some(super::host::TenantRecord {
            client_key: self.site_key().to_owned(),
            base_path: String::new(),
            shared_secret: connect_protocol::domain::SharedSecret::parse(&self.shared_secret)
                .ok()?,
            oauth_client_id: self.oauth_client_id.clone(),
            app_key: self.app_key.clone()?,
        })
    }

    /// The secret before the current one.
    pub fn previous_secret(&self) -> Option<&str> {
        self.previous_secrets.last().map(String::as_str)
    }

    /// Makes `secret` current, keeping the old one in the history.
    pub fn roll_to(&mut self, secret: String) {
        let old = std::mem::replace(&mut self.shared_secret, secret);
        self.previous_secrets.push(old);
    }

    /// The `exp` for a callback token issued at `now`: `now` + [`TOKEN_LIFETIME_SECS`], or
    /// one second after the previous token's if that is later.
    pub fn next_exp(&mut self, now: i64) -> i64 {
        let exp = (now + TOKEN_LIFETIME_SECS).max(self.last_exp + 1);
        self.last_exp = exp;
        exp
    }

    /// The lifecycle body the host sends with `event_type` for the app `app_key`;
    /// `sharedSecret` only for `installed`.
    pub fn body(&self, app_key: &str, event_type: &str) -> serde_json::Value {
        let mut body = serde_json::json!({
            "key": app_key,
            "clientKey": self.client_key,
            "baseUrl": self.base_url,
            "displayUrl": self.base_url,
            "displayUrlServicedeskHelpCenter": self.base_url,
            "productType": self.product_type,
            "description": format!("devtenant fake site {}", self.name),
            "serviceEntitlementNumber": "SEN-devtenant",
            "entitlementId": "",
            "entitlementNumber": "",
            "oauthClientId": self.oauth_client_id,
            "installationId": self.installation_id,
            "serverVersion": "100300",
            "pluginsVersion": "1001.0.0.devtenant",
            "eventType": event_type,
        });
        if event_type == "installed" {
            body["sharedSecret"] = self.shared_secret.clone().into();
        }
        body
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenant")
            .field("name", &self.name)
            .field("client_key", &self.client_key)
            .field("base_url", &self.base_url)
            .field("shared_secret", &fingerprint(&self.shared_secret))
            .field("previous_secrets", &self.previous_secrets.len())
            .field("oauth_client_id", &self.oauth_client_id)
            .field("installed", &self.installed)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// A new random shared secret: 32 random bytes, base64url (43 characters).
pub fn new_secret() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A new random oauthClientId: 32 letters and digits, like Atlassian's.
pub fn new_oauth_client_id() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// What may be printed of a secret: its first 4 characters and its length.
pub fn fingerprint(secret: &str) -> String {
    let head: String = secret.chars().take(4).collect();
    format!("{head}…({} chars)", secret.chars().count())
}

/// What is printed of a token: its start and end.
pub fn abbreviate_token(token: &str) -> String {
    if token.len() <= 40 || !token.is_ascii() {
        return token.to_owned();
    }
    format!(
        "{}…{} ({} chars)",
        &token[..24],
        &token[token.len() - 8..],
        token.len()
    )
}

/// Where `devtenant serve` listens, as written to `server.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// `http://127.0.0.1:PORT`: the fake host; sites get base URLs below it.
    pub url: String,
    /// The value for the app's `WARDEN_KEYS_URL`.
    pub keys_url: String,
    /// Process id of the server (informational).
    #[serde(default)]
    pub pid: u32,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// Every tenant by name.
pub type Tenants = BTreeMap<String, Tenant>;

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create the state directory {}", self.path.display()))
    }

    /// The key ring kept here (created with one new key on first use).
    pub fn keyring(&self) -> anyhow::Result<KeyRing> {
        self.create()?;
        KeyRing::load_or_create(&self.path).map_err(Into::into)
    }

    pub fn tenants_path(&self) -> PathBuf {
        self.path.join(TENANTS_FILE)
    }

    /// The tenants kept here (none yet: empty).
    pub fn load_tenants(&self) -> anyhow::Result<Tenants> {
        let path = self.tenants_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a devtenant tenants file", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Tenants::new()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn save_tenants(&self, tenants: &Tenants) -> anyhow::Result<()> {
        self.create()?;
        let json = serde_json::to_vec_pretty(tenants).expect("tenants serialize");
        write_atomic(&self.tenants_path(), &json, true)
    }

    /// The tenant named `name`, or an error listing the known names.
    pub fn tenant(&self, name: &str) -> anyhow::Result<Tenant> {
        let tenants = self.load_tenants()?;
        tenants.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = tenants.keys().map(String::as_str).collect();
            anyhow::anyhow!(
                "no tenant named {name:?} in {} (known: {}); create it with `devtenant install --tenant {name}`",
                self.tenants_path().display(),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )
        })
    }

    /// Stores `tenant` under its name (replacing an older version).
    pub fn put_tenant(&self, tenant: &Tenant) -> anyhow::Result<()> {
        let mut tenants = self.load_tenants()?;
        tenants.insert(tenant.name.clone(), tenant.clone());
        self.save_tenants(&tenants)
    }

    pub fn server_path(&self) -> PathBuf {
        self.path.join(SERVER_FILE)
    }

    /// Where `devtenant serve` said it listens, if it ever ran with this directory.
    pub fn server_info(&self) -> anyhow::Result<Option<ServerInfo>> {
        let path = self.server_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not a devtenant server file", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    pub fn write_server_info(&self, info: &ServerInfo) -> anyhow::Result<()> {
        self.create()?;
        let json = serde_json::to_vec_pretty(info).expect("server info serializes");
        write_atomic(&self.server_path(), &json, false)
    }
}

/// Writes through a temporary file and a rename; `private` files are readable by the owner only.
fn write_atomic(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    match write_via_tmp(path, &tmp, contents, private) {
        Ok(()) => Ok(()),
        Err(WriteFailure::Write(e)) => {
            Err(e).with_context(|| format!("cannot write {}", tmp.display()))
        }
        Err(WriteFailure::Rename(e)) => {
            Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_shows_four_chars_and_length_only() {
        assert_eq!(fingerprint("abcdefgh"), "abcd…(8 chars)");
        assert_eq!(fingerprint("ab"), "ab…(2 chars)");
        let secret = new_secret();
        assert_eq!(secret.len(), 43);
        assert!(!fingerprint(&secret).contains(&secret[4..]));
    }

    #[test]
    fn next_exp_is_strictly_increasing_within_one_second() {
        let mut t = Tenant::generate(Some("a"), "http://127.0.0.1:1");
        let a = t.next_exp(1000);
        let b = t.next_exp(1000);
        let c = t.next_exp(2000);
        assert_eq!(a, 1000 + TOKEN_LIFETIME_SECS);
        assert_eq!(b, a + 1);
        assert_eq!(c, 2000 + TOKEN_LIFETIME_SECS);
    }

    #[test]
    fn import_keeps_base_url_and_changes_identity() {
        let old = Tenant::generate(None, "http://127.0.0.1:1/");
        assert_eq!(
            old.base_url,
            format!("http://127.0.0.1:1/t/{}", old.client_key)
        );
        let new = old.imported(Some("x2"));
        assert_eq!(new.base_url, old.base_url);
        assert_eq!(new.site_key(), old.client_key);
        assert_ne!(new.client_key, old.client_key);
        assert_ne!(new.oauth_client_id, old.oauth_client_id);
        assert_ne!(new.shared_secret, old.shared_secret);
        assert!(!format!("{new:?}").contains(&new.shared_secret));
    }

    #[test]
    fn tenants_and_server_info_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert!(state.load_tenants().unwrap().is_empty());
        assert!(state.server_info().unwrap().is_none());
        let mut t = Tenant::generate(Some("acme"), "http://127.0.0.1:9");
        t.roll_to("second".into());
        state.put_tenant(&t).unwrap();
        let back = state.tenant("acme").unwrap();
        assert_eq!(back.shared_secret, "second");
        assert_eq!(back.previous_secrets, t.previous_secrets);
        assert!(state
            .tenant("other")
            .unwrap_err()
            .to_string()
            .contains("acme"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(state.tenants_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        let info = ServerInfo {
            url: "http://127.0.0.1:1".into(),
            keys_url: "http://127.0.0.1:1".into(),
            pid: 7,
        };
        state.write_server_info(&info).unwrap();
        assert_eq!(state.server_info().unwrap(), Some(info));
    }
}
