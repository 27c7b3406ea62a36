//! Shared secrets at rest (docs/PROTOCOL.md §10): what an attacker who reads the store sees,
//! and what the service does with records under other key rings. Every app here is a `warden`
//! process on a store location the test keeps (a Redis prefix or a data directory), so the
//! same data can be served again under another `WARDEN_SECRET_KEYS`, read raw (the Redis
//! values through a plain client; the redb table and file bytes once the process is gone), or
//! tampered with.

use std::process::{Command, Output};

use base64::Engine as _;
use connect_protocol::jwt;
use redis::AsyncCommands as _;

use crate::helpers::app::{both_stores, error_of, Backend, Options, Site, TestApp};
use crate::helpers::redis_server;

const INSTALLATIONS: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("installations");

/// `id:<base64 of 32 bytes of byte>`, comma-separated.
fn ring(keys: &[(&str, u8)]) -> String {
    keys.iter()
        .map(|(id, byte)| {
            format!(
                "{id}:{}",
                base64::engine::general_purpose::STANDARD.encode([*byte; 32])
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One store location that outlives the processes serving it.
struct Place {
    backend: Backend,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Place {
    fn new(backend: Backend) -> Self {
        Self {
            backend,
            prefix: redis_server::unique_prefix(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The `WARDEN_*` settings naming this location, with `keys` as `WARDEN_SECRET_KEYS`.
    fn env(&self, keys: Option<&str>) -> Vec<(&'static str, String)> {
        let mut env = match self.backend {
            Backend::Redis => vec![
                ("WARDEN_REDIS_URL", redis_server::redis_url().to_owned()),
                ("WARDEN_REDIS_PREFIX", self.prefix.clone()),
            ],
            Backend::Embedded => vec![("WARDEN_DATA_DIR", self.dir.path().display().to_string())],
        };
        if let Some(keys) = keys {
            env.push(("WARDEN_SECRET_KEYS", keys.to_owned()));
        }
        env
    }

    /// A `warden` process serving this location with `keys`, ready.
    async fn serve(&self, name: &str, keys: Option<&str>) -> TestApp {
        let options = self
            .env(keys)
            .into_iter()
            .fold(Options::new(self.backend), |o, (var, value)| {
                o.set(var, value)
            });
        TestApp::spawn_process(name, options).await
    }

    /// `warden secrets rekey` on this location with `keys`.
    fn rekey(&self, keys: &str) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        command
            .args(["secrets", "rekey"])
            .envs(self.env(Some(keys)))
            .output()
            .expect("warden runs")
    }

    /// Everything stored for `client_key`, as raw text: the Redis hash (secrets included), or the
    /// redb record (the process serving the embedded store must be gone: one at a time).
    async fn raw(&self, client_key: &str) -> String {
        match self.backend {
            Backend::Redis => {
                let mut conn = plain_redis().await;
                let fields: Vec<String> = conn
                    .hgetall(format!("{}:{{{client_key}}}:installation", self.prefix))
                    .await
                    .unwrap();
                assert!(!fields.is_empty(), "no record for {client_key}");
                fields.join("\n")
            }
            Backend::Embedded => {
                let db = redb::Database::create(self.file()).unwrap();
                let txn = db.begin_read().unwrap();
                let table = txn.open_table(INSTALLATIONS).unwrap();
                let raw = table.get(client_key).unwrap().expect("a stored record");
                String::from_utf8(raw.value().to_vec()).unwrap()
            }
        }
    }

    /// The redb file.
    fn file(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join(connect_warden::store::embedded::FILE_NAME)
    }

    /// Copies the stored (sealed) secret history of `from` into the record of `to`, as someone
    /// with write access to the store would.
    async fn copy_secrets(&self, from: &str, to: &str) {
        match self.backend {
            Backend::Redis => {
                // The secret history is `s` of the compact record.
                let mut conn = plain_redis().await;
                let key = |ck: &str| format!("{}:{{{ck}}}:installation", self.prefix);
                let record =
                    |raw: String| -> serde_json::Value { serde_json::from_str(&raw).unwrap() };
                let from_record = record(conn.hget(key(from), "record").await.unwrap());
                let mut to_record = record(conn.hget(key(to), "record").await.unwrap());
                to_record["s"] = from_record["s"].clone();
                let _: () = conn
                    .hset(key(to), "record", to_record.to_string())
                    .await
                    .unwrap();
            }
            Backend::Embedded => {
                let from_record: serde_json::Value =
                    serde_json::from_str(&self.raw(from).await).unwrap();
                let mut to_record: serde_json::Value =
                    serde_json::from_str(&self.raw(to).await).unwrap();
                to_record["secrets"] = from_record["secrets"].clone();
                let db = redb::Database::create(self.file()).unwrap();
                let txn = db.begin_write().unwrap();
                txn.open_table(INSTALLATIONS)
                    .unwrap()
                    .insert(to, serde_json::to_vec(&to_record).unwrap().as_slice())
                    .unwrap();
                txn.commit().unwrap();
            }
        }
    }
}

async fn plain_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_server::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Installs and rolls with a key: neither secret is in the raw record (nor, embedded, anywhere
/// in the database file), the record names the key, and product requests verify.
async fn secrets_are_sealed_at_rest(backend: Backend) {
    let place = Place::new(backend);
    let keys = ring(&[("a", 1)]);
    let app = place.serve("sealed", Some(&keys)).await;
    let mut site = Site::new();
    app.installed(&site).await;
    let first_secret = site.secret.clone();
    site.secret = format!("{first_secret}-rolled");
    app.installed(&site).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    drop(app);

    let raw = place.raw(&site.client_key).await;
    assert_eq!(raw.matches("v1:a:").count(), 2, "{raw}");
    for secret in [&first_secret, &site.secret] {
        assert!(
            !raw.contains(secret.as_str()),
            "a secret is stored in clear: {raw}"
        );
    }
    if backend == Backend::Embedded {
        let file = std::fs::read(place.file()).unwrap();
        let file = text(&file);
        assert!(file.contains(&site.client_key), "the record is in the file");
        assert!(
            !file.contains(&first_secret),
            "the redb file holds a secret in clear"
        );
    }

    // Served again: still verifies.
    let app = place.serve("sealed-again", Some(&keys)).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    assert_eq!(app.tenant_status(&site, "wrong").await, 401);
}

/// A record an older version (or a service without a key) wrote in plaintext is read once keys
/// are configured, and sealed by its next write.
async fn plaintext_records_are_read_and_sealed_on_their_next_write(backend: Backend) {
    let place = Place::new(backend);
    let app = place.serve("plaintext", None).await;
    let site = Site::new();
    app.installed(&site).await;
    let log = app.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("plaintext") && warnings[0].contains("WARDEN_SECRET_KEYS"),
        "{log}"
    );
    drop(app);
    assert!(
        place.raw(&site.client_key).await.contains(&site.secret),
        "without a key the secret is stored as before"
    );

    let keys = ring(&[("a", 1)]);
    let app = place.serve("keyed", Some(&keys)).await;
    assert!(!app.log().contains(" WARN "), "{}", app.log());
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
    // Reading does not write.
    drop(app);
    assert!(place.raw(&site.client_key).await.contains(&site.secret));

    let app = place.serve("keyed-write", Some(&keys)).await;
    app.disabled(&site).await;
    app.enabled(&site).await;
    drop(app);
    let raw = place.raw(&site.client_key).await;
    assert!(
        !raw.contains(&site.secret),
        "still in clear after a write: {raw}"
    );
    assert!(raw.contains("v1:a:"), "{raw}");

    let app = place.serve("keyed-after", Some(&keys)).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

/// Rotation as documented: key "a"; then "b,a" (new key first: b seals, a still opens); then
/// `warden secrets rekey`; then "b" alone. Every installation, including one written in
/// plaintext before any key, verifies throughout.
async fn rotation_adds_a_key_rekeys_and_removes_the_old_one(backend: Backend) {
    let place = Place::new(backend);
    let app = place.serve("no-key", None).await;
    let plain = Site::new();
    app.installed(&plain).await;
    drop(app);

    let a = ring(&[("a", 1)]);
    let app = place.serve("a", Some(&a)).await;
    let under_a = Site::new();
    app.installed(&under_a).await;
    drop(app);

    let b_a = ring(&[("b", 2), ("a", 1)]);
    let app = place.serve("b-a", Some(&b_a)).await;
    let under_b = Site::new();
    app.installed(&under_b).await;
    for site in [&plain, &under_a, &under_b] {
        assert_eq!(app.tenant_status(site, &site.secret).await, 200);
    }
    if backend == Backend::Embedded {
        // The running service holds the database file: rekey says so and changes nothing.
        let out = place.rekey(&b_a);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(stderr.contains("one process at a time"), "{stderr}");
    }
    drop(app);

    let out = place.rekey(&b_a);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for expected in [
        "plaintext records sealed: 1",
        "records sealed again from older keys: 1",
        "records already under \"b\": 1",
        "records that failed: 0",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }
    // Idempotent.
    let again = text(&place.rekey(&b_a).stdout);
    assert!(again.contains("records already under \"b\": 3"), "{again}");
    for site in [&plain, &under_a, &under_b] {
        let raw = place.raw(&site.client_key).await;
        assert!(raw.contains("v1:b:") && !raw.contains("v1:a:"), "{raw}");
        assert!(!raw.contains(&site.secret), "{raw}");
    }

    let b = ring(&[("b", 2)]);
    let app = place.serve("b", Some(&b)).await;
    for site in [&plain, &under_a, &under_b] {
        assert_eq!(app.tenant_status(site, &site.secret).await, 200);
    }
}

/// Without the key a record was sealed with (another id, the same id with other bytes, no key
/// at all), the installation is an error naming the problem: never a success, never a guess,
/// never the secret in the log.
async fn a_wrong_key_ring_is_an_error_not_a_success(backend: Backend) {
    let place = Place::new(backend);
    let app = place.serve("a", Some(&ring(&[("a", 1)]))).await;
    let site = Site::new();
    app.installed(&site).await;
    drop(app);

    for (name, keys, expected) in [
        (
            "other-id",
            Some(ring(&[("c", 1)])),
            "which WARDEN_SECRET_KEYS does not hold",
        ),
        (
            "other-bytes",
            Some(ring(&[("a", 9)])),
            "fails authentication",
        ),
        ("no-key", None, "WARDEN_SECRET_KEYS does not hold"),
    ] {
        let app = place.serve(name, keys.as_deref()).await;
        let token = app.product_token(
            &site.client_key,
            &site.secret,
            "GET",
            "/api/tenant",
            jwt::now(),
        );
        let response = app.tenant(&token).await;
        assert_eq!(response.status(), 500, "{name}");
        let error = error_of(response).await;
        assert!(
            error.contains(expected) && error.contains("\"a\""),
            "{name}: {error}"
        );
        // A lifecycle callback for it fails too rather than overwriting what it cannot read.
        let token = app.tenant_lifecycle_token(&site.client_key, &site.secret, "/disabled");
        let response = app
            .post_lifecycle("/disabled", Some(&token), &site.body("disabled"))
            .await;
        assert_eq!(response.status(), 500, "{name}");
        let log = app.log();
        assert!(
            log.contains("fails authentication") || log.contains("does not hold"),
            "{log}"
        );
        assert!(!log.contains(&site.secret), "{log}");
    }

    // The right key again: nothing was lost.
    let app = place.serve("a-again", Some(&ring(&[("a", 1)]))).await;
    assert_eq!(app.tenant_status(&site, &site.secret).await, 200);
}

/// Someone who can write the store copies tenant X's sealed secret into tenant Y's record (to
/// sign Y's requests with X's secret): it does not open there, so Y is unusable, not forged.
async fn a_sealed_secret_copied_to_another_tenant_does_not_open(backend: Backend) {
    let place = Place::new(backend);
    let keys = ring(&[("a", 1)]);
    let app = place.serve("two-tenants", Some(&keys)).await;
    let (x, y) = (Site::new(), Site::new());
    app.installed(&x).await;
    app.installed(&y).await;
    drop(app);

    place.copy_secrets(&x.client_key, &y.client_key).await;

    let app = place.serve("tampered", Some(&keys)).await;
    let token = app.product_token(&y.client_key, &x.secret, "GET", "/api/tenant", jwt::now());
    let response = app.tenant(&token).await;
    assert_eq!(response.status(), 500);
    let error = error_of(response).await;
    assert!(error.contains("fails authentication"), "{error}");
    assert!(error.contains(&y.client_key), "{error}");
    // X is untouched.
    assert_eq!(app.tenant_status(&x, &x.secret).await, 200);
}

both_stores!(
    secrets_are_sealed_at_rest,
    plaintext_records_are_read_and_sealed_on_their_next_write,
    rotation_adds_a_key_rekeys_and_removes_the_old_one,
    a_wrong_key_ring_is_an_error_not_a_success,
    a_sealed_secret_copied_to_another_tenant_does_not_open,
);

/// `--require-encryption` (or `WARDEN_REQUIRE_ENCRYPTION=true`) without a key: `warden serve`
/// refuses to start, saying which setting is missing.
#[test]
fn required_encryption_without_a_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
        for (var, _) in std::env::vars() {
            if var.starts_with("WARDEN_") {
                command.env_remove(var);
            }
        }
        let mut child = command
            .arg("serve")
            .args(args)
            .env("WARDEN_BIND", "127.0.0.1:0")
            .env("WARDEN_DATA_DIR", dir.path())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A service that starts anyway would never exit: stop it and fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("warden serve {args:?} {env:?} started without a key");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    for out in [
        serve(&["--require-encryption"], &[]),
        serve(&[], &[("WARDEN_REQUIRE_ENCRYPTION", "true")]),
    ] {
        assert!(!out.status.success());
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("encryption of shared secrets at rest is required")
                && stderr.contains("WARDEN_SECRET_KEYS"),
            "{stderr}"
        );
    }
}

/// `warden secrets rekey` without a key has nothing to seal with and says so.
#[test]
fn rekey_without_a_key_refuses() {
    let place = Place::new(Backend::Embedded);
    let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
    for (var, _) in std::env::vars() {
        if var.starts_with("WARDEN_") {
            command.env_remove(var);
        }
    }
    let out = command
        .args(["secrets", "rekey"])
        .envs(place.env(None))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("WARDEN_SECRET_KEYS is not set"));
}
