//! How long `warden tenants list` and `warden tenants stats` take on a large store:
//! `cargo bench --bench tenants` fills a private redis-server (on a free loopback port) and an
//! embedded store (in a temporary directory) with `BENCH_TENANTS` installations (default
//! 100000; secrets sealed under one key, as in production), then runs the release `warden`
//! binary on each and prints the wall-clock time of every command. Figures: docs/PERFORMANCE.md.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_warden::store::embedded::EmbeddedStore;
use connect_warden::store::redis::RedisStore;
use connect_warden::store::sealing::{KeyRing, Sealer};
use connect_warden::store::{Commit, CommitOutcome, InstallState, Installation, InstallationStore};
use futures_util::StreamExt as _;

const KEY_ID: &str = "bench";

fn key_ring() -> String {
    format!(
        "{KEY_ID}:{}",
        base64::engine::general_purpose::STANDARD.encode([42u8; 32])
    )
}

/// Installation `i`: two per site, a third of them Confluence, one in twenty uninstalled and
/// one in twenty disabled.
fn installation(i: usize) -> Installation {
    let mut record = Installation::new(
        ClientKey::parse(&format!("bench-client-key-{i:07}")).unwrap(),
        BaseUrl::parse(&format!("https://bench-site-{:07}.atlassian.net", i / 2)).unwrap(),
        if i % 3 == 0 { "confluence" } else { "jira" },
        SharedSecret::parse(&format!("bench-secret-{i}-{}", uuid::Uuid::new_v4())).unwrap(),
        true,
        1_700_000_000 + i as i64,
    );
    record.cloud_id = Some(uuid::Uuid::new_v4().to_string());
    match i % 20 {
        0 => record.state = InstallState::Uninstalled,
        1 => record.enabled = false,
        _ => {}
    }
    record
}

async fn fill(store: Arc<dyn InstallationStore>, count: usize, concurrency: usize) {
    futures_util::stream::iter(0..count)
        .for_each_concurrent(concurrency, |i| {
            let store = store.clone();
            async move {
                let record = installation(i);
                let outcome = store
                    .commit(Commit {
                        record: &record,
                        expected_version: 0,
                        token: None,
                    })
                    .await
                    .expect("commit");
                assert_eq!(outcome, CommitOutcome::Committed);
            }
        })
        .await;
}

/// A private redis-server, killed on drop.
struct OwnRedis {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let url = format!("redis://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `warden tenants <args>` with `env`; returns its wall-clock time and the number of
/// lines it printed.
fn time_warden(env: &[(&str, String)], args: &[&str]) -> (Duration, usize) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("tenants")
        .args(args)
        .output()
        .expect("warden runs");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "warden tenants {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (elapsed, out.stdout.iter().filter(|b| **b == b'\n').count())
}

fn run_commands(store: &str, env: &[(&str, String)], count: usize) {
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["list", "--state", "disabled"],
        &["list", "--site", "https://bench-site-00000*"],
        &["stats"],
    ] {
        let (elapsed, lines) = time_warden(env, args);
        if args == ["list"] {
            assert_eq!(lines, count + 1, "one line per installation and the header");
        }
        println!(
            "{store:<9} {count} installations  warden tenants {:<40} {:>8.2} s  ({lines} lines)",
            args.join(" "),
            elapsed.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too: only fill when benched.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let count: usize = std::env::var("BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let keys = key_ring();
    let sealer = Sealer::new(KeyRing::parse(&[keys.as_str()]).unwrap());

    let redis = OwnRedis::start();
    let store = RedisStore::connect(&redis.url, "bench")
        .await
        .unwrap()
        .with_sealer(sealer.clone());
    let start = Instant::now();
    fill(Arc::new(store), count, 64).await;
    println!(
        "redis     filled {count} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let env = [
        ("WARDEN_REDIS_URL", redis.url.clone()),
        ("WARDEN_REDIS_PREFIX", "bench".to_owned()),
        ("WARDEN_SECRET_KEYS", keys.clone()),
    ];
    run_commands("redis", &env, count);
    drop(redis);

    let dir = tempfile::tempdir().unwrap();
    {
        let store = EmbeddedStore::open(dir.path())
            .unwrap()
            .with_sealer(sealer.clone());
        let start = Instant::now();
        fill(Arc::new(store), count, 8).await;
        println!(
            "embedded  filled {count} in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    let env = [
        ("WARDEN_DATA_DIR", dir.path().display().to_string()),
        ("WARDEN_SECRET_KEYS", keys),
    ];
    run_commands("embedded", &env, count);
}
