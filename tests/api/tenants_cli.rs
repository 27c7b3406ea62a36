//! `warden tenants`: the operator's listing, lookup and counts, run as the built binary on the
//! store a `warden` process served (a prefix on the private Redis, a data directory, or the
//! private Redis Cluster). The tenants are installed through the real routes: active,
//! disabled, uninstalled, a Confluence one with a cloudId and installationId, and a site import
//! that superseded an older installation. No output may ever hold a shared secret.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::helpers::app::{both_stores, Backend, Options, Site, TestApp};
use crate::helpers::redis_server;

/// One store location that outlives the `warden` processes serving it.
struct Place {
    backend: Backend,
    /// Seed URLs of a Redis Cluster instead of the private Redis.
    cluster: Option<Vec<String>>,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Place {
    fn new(backend: Backend) -> Self {
        Self {
            backend,
            cluster: None,
            prefix: redis_server::unique_prefix(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn on_cluster() -> Self {
        Self {
            cluster: Some(redis_server::cluster().urls.clone()),
            ..Self::new(Backend::Redis)
        }
    }

    /// The `WARDEN_*` settings naming this location, with `keys` as `WARDEN_SECRET_KEYS`.
    fn env(&self, keys: Option<&str>) -> Vec<(&'static str, String)> {
        let mut env = match (&self.cluster, self.backend) {
            (Some(seeds), _) => vec![
                ("WARDEN_REDIS_URL", seeds.join(",")),
                ("WARDEN_REDIS_CLUSTER", "true".to_owned()),
                ("WARDEN_REDIS_PREFIX", self.prefix.clone()),
            ],
            (None, Backend::Redis) => vec![
                ("WARDEN_REDIS_URL", redis_server::redis_url().to_owned()),
                ("WARDEN_REDIS_PREFIX", self.prefix.clone()),
            ],
            (None, Backend::Embedded) => {
                vec![("WARDEN_DATA_DIR", self.dir.path().display().to_string())]
            }
        };
        if let Some(keys) = keys {
            env.push(("WARDEN_SECRET_KEYS", keys.to_owned()));
        }
        env
    }

    /// A `warden` process serving this location; site imports supersede at once (no site
    /// proof: the sites live on no host).
    async fn serve(&self, keys: Option<&str>) -> TestApp {
        let options = self.env(keys).into_iter().fold(
            Options::new(self.backend).set("WARDEN_SITE_PROOF", "off"),
            |o, (var, value)| o.set(var, value),
        );
        TestApp::spawn_process("tenants", options).await
    }

    /// `warden tenants <args>` on this location with `keys`.
    fn tenants(&self, keys: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        command
            .arg("tenants")
            .args(args)
            .envs(self.env(keys))
            .output()
            .expect("warden runs")
    }
}

fn ring(id: &str, byte: u8) -> String {
    format!(
        "{id}:{}",
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The tenants every test installs.
struct Tenants {
    active: Site,
    disabled: Site,
    uninstalled: Site,
    /// Confluence, with a cloudId and an installationId.
    confluence: Site,
    cloud_id: String,
    installation_id: String,
    /// Replaced by `importer` through a site import.
    superseded: Site,
    importer: Site,
}

impl Tenants {
    fn all(&self) -> [&Site; 6] {
        [
            &self.active,
            &self.disabled,
            &self.uninstalled,
            &self.confluence,
            &self.superseded,
            &self.importer,
        ]
    }

    /// `out`'s stdout and stderr hold no secret of any tenant.
    fn assert_no_secret(&self, out: &Output) {
        for site in self.all() {
            for stream in [&out.stdout, &out.stderr] {
                assert!(
                    !text(stream).contains(&site.secret),
                    "the secret of {} was printed",
                    site.client_key
                );
            }
        }
    }
}

async fn install_tenants(app: &TestApp) -> Tenants {
    let active = Site::new();
    app.installed(&active).await;
    let disabled = Site::new();
    app.installed(&disabled).await;
    app.disabled(&disabled).await;
    let uninstalled = Site::new();
    app.installed(&uninstalled).await;
    app.uninstalled(&uninstalled).await;

    let confluence = Site::new();
    let cloud_id = uuid::Uuid::new_v4().to_string();
    let installation_id = format!("ari:cloud:ecosystem::installation/{}", uuid::Uuid::new_v4());
    let mut body = confluence.body("installed");
    body["productType"] = json!("confluence");
    body["cloudId"] = json!(cloud_id);
    body["installationId"] = json!(installation_id);
    let token = app.install_token(&confluence.client_key, "/installed");
    let response = app.post_lifecycle("/installed", Some(&token), &body).await;
    assert_eq!(response.status(), 204);

    let superseded = Site::new();
    app.installed(&superseded).await;
    let mut importer = Site::new();
    importer.base_url = superseded.base_url.clone();
    app.installed(&importer).await;
    Tenants {
        active,
        disabled,
        uninstalled,
        confluence,
        cloud_id,
        installation_id,
        superseded,
        importer,
    }
}

/// The state of each clientKey in a text listing; asserts the header and one line each.
fn listed_states(stdout: &str) -> BTreeMap<String, String> {
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("clientKey\tbaseUrl\tstate\tproduct\tinstalled\tupdated")
    );
    let mut states = BTreeMap::new();
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 6, "{line}");
        assert!(
            states
                .insert(fields[0].to_owned(), fields[2].to_owned())
                .is_none(),
            "{} listed twice",
            fields[0]
        );
    }
    states
}

fn states_of(pairs: &[(&Site, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(site, state)| (site.client_key.clone(), (*state).to_owned()))
        .collect()
}

fn fingerprint(secret: &str) -> String {
    hex::encode(&sha2::Sha256::digest(secret.as_bytes())[..6])
}

/// Everything the listing says: every installation once with its state; `--state` and
/// `--site` select; `--json` gives the same as JSON lines.
async fn list_shows_every_installation_and_filters(backend: Backend) {
    let place = Place::new(backend);
    let app = place.serve(None).await;
    let t = install_tenants(&app).await;
    drop(app);

    let out = place.tenants(None, &["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    t.assert_no_secret(&out);
    let expected = states_of(&[
        (&t.active, "active"),
        (&t.disabled, "disabled"),
        (&t.uninstalled, "uninstalled"),
        (&t.confluence, "active"),
        (&t.superseded, "superseded"),
        (&t.importer, "active"),
    ]);
    assert_eq!(listed_states(&text(&out.stdout)), expected);
    let line = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&t.confluence.client_key))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(&format!("\t{}\t", t.confluence.base_url)),
        "{line}"
    );
    assert!(line.contains("\tconfluence\t"), "{line}");

    let out = place.tenants(None, &["list", "--state", "superseded"]);
    assert_eq!(
        listed_states(&text(&out.stdout)),
        states_of(&[(&t.superseded, "superseded")])
    );
    let out = place.tenants(None, &["list", "--state", "active"]);
    assert_eq!(
        listed_states(&text(&out.stdout)),
        states_of(&[
            (&t.active, "active"),
            (&t.confluence, "active"),
            (&t.importer, "active")
        ])
    );

    // The imported site's two installations, by a glob on their baseUrl.
    let host = t.importer.base_url.trim_start_matches("https://");
    let glob = format!("https://{}*", &host[..host.len() - 3]);
    let out = place.tenants(None, &["list", "--site", &glob]);
    assert_eq!(
        listed_states(&text(&out.stdout)),
        states_of(&[(&t.superseded, "superseded"), (&t.importer, "active")])
    );

    let out = place.tenants(None, &["list", "--json", "--state", "disabled"]);
    assert!(out.status.success());
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["clientKey"], t.disabled.client_key);
    assert_eq!(lines[0]["baseUrl"], t.disabled.base_url);
    assert_eq!(lines[0]["state"], "disabled");
    assert_eq!(lines[0]["productType"], "jira");
    assert!(lines[0]["installedAt"].as_i64().unwrap() > 1_700_000_000);

    let out = place.tenants(None, &["list", "--state", "gone"]);
    assert!(!out.status.success());
}

/// `show` finds an installation by each of its ids, shows its secret history as fingerprints
/// (never a secret) and its supersede links, shows every installation of a site, and exits
/// with 1 when nothing matches.
async fn show_finds_by_every_id_and_never_prints_a_secret(backend: Backend) {
    let place = Place::new(backend);
    let keys = ring("k1", 7);
    let app = place.serve(Some(&keys)).await;
    let t = install_tenants(&app).await;
    drop(app);

    for id in [
        t.confluence.client_key.as_str(),
        &t.cloud_id,
        &t.installation_id,
    ] {
        let out = place.tenants(Some(&keys), &["show", id]);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        t.assert_no_secret(&out);
        let shown = text(&out.stdout);
        assert!(
            shown.contains(&format!("clientKey:        {}", t.confluence.client_key)),
            "{shown}"
        );
        assert!(
            shown.contains(&fingerprint(&t.confluence.secret)),
            "{shown}"
        );
        assert!(shown.contains("sealed under key k1"), "{shown}");
        assert!(shown.contains(&t.cloud_id) && shown.contains(&t.installation_id));
    }
    let out = place.tenants(Some(&keys), &["show", "--json", &t.cloud_id]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown[0]["matchedBy"], "cloudId");
    let out = place.tenants(Some(&keys), &["show", "--json", &t.installation_id]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown[0]["matchedBy"], "installationId");
    let secrets = shown[0]["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    assert_eq!(secrets[0]["fingerprint"], fingerprint(&t.confluence.secret));
    assert_eq!(
        (&secrets[0]["signed"], &secrets[0]["current"]),
        (&json!(true), &json!(true))
    );

    // The site of the import: both installations, linked both ways, oldest first.
    let out = place.tenants(Some(&keys), &["show", "--json", &t.importer.base_url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    t.assert_no_secret(&out);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = shown.as_array().unwrap();
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(shown[0]["clientKey"], t.superseded.client_key);
    assert_eq!(shown[0]["matchedBy"], "baseUrl");
    assert_eq!(shown[0]["state"], "superseded");
    assert_eq!(shown[0]["supersededBy"], t.importer.client_key);
    assert_eq!(shown[1]["clientKey"], t.importer.client_key);
    assert_eq!(shown[1]["supersedes"], json!([t.superseded.client_key]));
    let out = place.tenants(Some(&keys), &["show", &t.importer.base_url]);
    let shown = text(&out.stdout);
    assert!(shown.starts_with("2 installations match"), "{shown}");
    assert!(
        shown.contains(&format!("superseded (by {})", t.importer.client_key)),
        "{shown}"
    );

    let out = place.tenants(Some(&keys), &["show", "ck-nobody-has-this"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no installation has the clientKey, baseUrl, cloudId or installationId \"ck-nobody-has-this\""),
        "{}",
        text(&out.stderr)
    );

    // Without the key the sealed secrets stay closed: an error naming the record, not a
    // secret.
    let out = place.tenants(None, &["show", &t.active.client_key]);
    assert_eq!(out.status.code(), Some(1));
    t.assert_no_secret(&out);
    assert!(text(&out.stderr).contains(&t.active.client_key));
}

/// `stats` counts by state and product, sites, sealed and plaintext records; without the
/// key the sealed records count as unreadable and the listing names them on stderr.
async fn stats_count_the_whole_store(backend: Backend) {
    let place = Place::new(backend);
    let app = place.serve(None).await;
    let t = install_tenants(&app).await;
    drop(app);
    // One more tenant, sealed: the others stay in plaintext.
    let keys = ring("k1", 9);
    let app = place.serve(Some(&keys)).await;
    let sealed = Site::new();
    app.installed(&sealed).await;
    drop(app);

    let out = place.tenants(Some(&keys), &["stats", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    t.assert_no_secret(&out);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["installations"], 7);
    assert_eq!(
        stats["byState"],
        json!({"active": 4, "disabled": 1, "uninstalled": 1, "superseded": 1})
    );
    assert_eq!(stats["byProduct"], json!({"jira": 6, "confluence": 1}));
    assert_eq!(stats["sites"], 6);
    assert_eq!(
        (&stats["sealed"], &stats["plaintext"]),
        (&json!(1), &json!(6))
    );
    assert_eq!(stats["unreadable"], 0);
    assert_eq!(stats["historyLengths"], json!({"1": 7}));

    let out = place.tenants(Some(&keys), &["stats"]);
    let shown = text(&out.stdout);
    assert!(shown.contains("installations: 7"), "{shown}");
    assert!(shown.contains("  superseded: 1"), "{shown}");

    let out = place.tenants(None, &["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&stats["installations"], &stats["unreadable"]),
        (&json!(6), &json!(1))
    );
    let out = place.tenants(None, &["list"]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("{}: cannot read", sealed.client_key)),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(listed_states(&text(&out.stdout)).len(), 6);
}

both_stores!(
    list_shows_every_installation_and_filters,
    show_finds_by_every_id_and_never_prints_a_secret,
    stats_count_the_whole_store,
);

/// On a Redis Cluster every primary is scanned: each installation is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_listed_across_every_primary() {
    let place = Place::on_cluster();
    let app = place.serve(None).await;
    let t = install_tenants(&app).await;
    let mut more = Vec::new();
    for _ in 0..20 {
        let site = Site::new();
        app.installed(&site).await;
        more.push(site);
    }
    drop(app);

    let out = place.tenants(None, &["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let states = listed_states(&text(&out.stdout));
    assert_eq!(states.len(), 26);
    for site in more.iter().chain(t.all()) {
        assert!(
            states.contains_key(&site.client_key),
            "{} missing",
            site.client_key
        );
    }
    let out = place.tenants(None, &["show", &t.cloud_id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    t.assert_no_secret(&out);
    let out = place.tenants(None, &["stats", "--json"]);
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["installations"], 26);
}

/// The embedded store admits one process: `tenants` says so while the service runs, and
/// never creates a database where there was none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_is_read_only_when_the_service_is_stopped() {
    let place = Place::new(Backend::Embedded);
    let app = place.serve(None).await;
    let out = place.tenants(None, &["list"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("one process at a time"),
        "{}",
        text(&out.stderr)
    );
    drop(app);

    let empty = Place::new(Backend::Embedded);
    let out = empty.tenants(None, &["stats"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no embedded store"),
        "{}",
        text(&out.stderr)
    );
    assert!(std::fs::read_dir(empty.dir.path())
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn help_explains_the_tenants_commands() {
    let help = |args: &[&str]| {
        text(
            &Command::new(env!("CARGO_BIN_EXE_warden"))
                .args(args)
                .output()
                .unwrap()
                .stdout,
        )
    };
    let tenants = help(&["tenants", "--help"]);
    for word in [
        "list",
        "show",
        "stats",
        "one process at a time",
        "fingerprint",
    ] {
        assert!(
            tenants.contains(word),
            "tenants --help lacks {word}: {tenants}"
        );
    }
    let list = help(&["tenants", "list", "--help"]);
    for word in ["--state", "--site", "--json", "superseded"] {
        assert!(
            list.contains(word),
            "tenants list --help lacks {word}: {list}"
        );
    }
    let show = help(&["tenants", "show", "--help"]);
    for word in ["clientKey", "baseUrl", "cloudId", "installationId"] {
        assert!(
            show.contains(word),
            "tenants show --help lacks {word}: {show}"
        );
    }
}
