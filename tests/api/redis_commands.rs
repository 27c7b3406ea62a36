//! What an install costs Redis (docs/PERFORMANCE.md, "Redis round trips and memory"): the
//! commands and round trips of a signed `installed`, counted by the server itself
//! (`INFO commandstats`), and the memory one installation occupies (`MEMORY USAGE`). Each test
//! runs its own `redis-server`, so no other test's commands are counted.

use std::collections::BTreeMap;

use redis::AsyncCommands as _;

use crate::helpers::app::{Backend, Cluster, Options, Site, TestApp};
use crate::helpers::free_port;
use crate::helpers::redis_server::RedisNode;

/// A private `redis-server` and an in-process warden using it under `prefix`.
struct Bench {
    node: RedisNode,
    app: TestApp,
    prefix: String,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start(secret_keys: Option<&str>) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let node = RedisNode::start(free_port(), dir.path(), &[]);
        let cluster = Cluster::on(&node.url).await;
        let mut options = Options::new(Backend::Redis).shared(&cluster);
        if let Some(keys) = secret_keys {
            options = options.set("WARDEN_SECRET_KEYS", keys);
        }
        let app = TestApp::spawn(options).await;
        Bench {
            node,
            app,
            prefix: cluster.redis_prefix.clone(),
            _dir: dir,
        }
    }

    /// A signed `installed` of `site` with the attributes a Jira Cloud site sends; asserts 204.
    async fn install(&self, site: &Site) {
        let token = self.app.install_token(&site.client_key, "/installed");
        let response = self
            .app
            .post_lifecycle("/installed", Some(&token), &typical_body(site))
            .await;
        assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
    }

    /// Calls per command since the last `CONFIG RESETSTAT`, without the connection-level and
    /// background ones (the invalidation subscription's `PING` every second, a new pooled
    /// connection's handshake).
    fn commandstats(&self) -> BTreeMap<String, u64> {
        let info = self.node.cli(&["info", "commandstats"]);
        info.lines()
            .filter_map(|line| {
                let (name, stats) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.parse().ok()?))
            })
            .filter(|(name, _)| {
                !matches!(
                    name.as_str(),
                    "ping"
                        | "client|setinfo"
                        | "client|setname"
                        | "hello"
                        | "select"
                        | "info"
                        | "config|resetstat"
                        | "subscribe"
                )
            })
            .collect()
    }

    fn reset_stats(&self) {
        assert_eq!(self.node.cli(&["config", "resetstat"]).trim(), "OK");
    }

    /// `MEMORY USAGE` (all samples) of every key of `site`'s installation that outlives its
    /// lifecycle tokens: its own keys (hash tag `{clientKey}`, token keys left out) and the
    /// index of its site (one site, one installation).
    async fn memory_of(&self, site: &Site) -> BTreeMap<String, u64> {
        let mut conn = redis::Client::open(self.node.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut keys: Vec<String> = conn
            .keys(format!("{}:{{{}}}:*", self.prefix, site.client_key))
            .await
            .unwrap();
        keys.retain(|k| !k.contains(":token:"));
        keys.push(format!("{}:site:{{{}}}", self.prefix, site.base_url));

        let mut usage = BTreeMap::new();
        for key in keys {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await
                .unwrap();
            usage.insert(key, bytes.expect("the key exists"));
        }
        usage
    }
    /// `MEMORY USAGE` of every Forge identity index key (docs/PROTOCOL.md §12).
    async fn forge_index_memory(&self) -> BTreeMap<String, u64> {
        let mut conn = redis::Client::open(self.node.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = conn.keys(format!("{}:forge-*", self.prefix)).await.unwrap();
        let mut usage = BTreeMap::new();
        for key in keys {
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await
                .unwrap();
            usage.insert(key, bytes.expect("the key exists"));
        }
        usage
    }
}

/// The body of a Jira Cloud install: every attribute Atlassian sends, at its real length
/// (an 86-character shared secret, an ARI installation id, UUIDs).
fn typical_body(site: &Site) -> serde_json::Value {
    let mut body = site.body("installed");
    let uuid = || uuid::Uuid::new_v4().to_string();
    body["sharedSecret"] = serde_json::json!(site.secret);
    body["cloudId"] = serde_json::json!(uuid());
    body["installationId"] =
        serde_json::json!(format!("ari:cloud:ecosystem::installation/{}", uuid()));
    body["serviceEntitlementNumber"] = serde_json::json!("SEN-L18948372");
    body["entitlementId"] = serde_json::json!(uuid());
    body["entitlementNumber"] = serde_json::json!("E-3YS-J4T-L6Y-QK2");
    body.as_object_mut()
        .unwrap()
        .remove("someFieldFromTheFuture");
    body
}

/// A site as Jira Cloud names it: a `jira:<uuid>` clientKey, an 86-character secret.
fn typical_site() -> Site {
    let mut site = Site::new();
    let id = uuid::Uuid::new_v4();
    site.client_key = format!("jira:{id}");
    site.secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
    .chars()
    .chain("Zq-8xY_vR2kP4mN6tW9bC1dF3gH5jK7lQ0sU".chars())
    .take(86)
    .collect();
    site.oauth_client_id = uuid::Uuid::new_v4().simple().to_string();
    site
}

const INSTALLS: u64 = 10;

/// Calls per install of each command, failing on a command not issued a whole number of
/// times per install.
fn per_install(stats: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    stats
        .iter()
        .map(|(name, calls)| {
            assert_eq!(
                calls % INSTALLS,
                0,
                "{name} was called {calls} times for {INSTALLS} installs: {stats:?}"
            );
            (name.clone(), calls / INSTALLS)
        })
        .collect()
}

/// Round trips per install: every command an install sends either ends a `MULTI` transaction
/// (`exec`: the read of the record with its token memory) or is a script call (`evalsha`: the
/// write); the commands within them (queued in the transaction, or `redis.call` of the
/// script, which `commandstats` counts too) ride on that round trip. `expected` is the exact
/// composition, so a command sent on a round trip of its own shows up as a difference.
fn round_trips(per_install: &BTreeMap<String, u64>) -> u64 {
    ["exec", "evalsha", "eval"]
        .iter()
        .map(|c| per_install.get(*c).copied().unwrap_or(0))
        .sum()
}

fn composition(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect()
}

/// Issue 8: the first install of a new site and a reinstall (secret roll) each cost two round
/// trips: one transaction reading the record and the token memory, one script writing the
/// record, the token memory, the site index and the Forge identity index, and publishing the
/// invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_install_costs_two_round_trips() {
    let bench = Bench::start(None).await;
    // The first install fetches the install key and loads the scripts: not counted.
    bench.install(&typical_site()).await;

    let sites: Vec<Site> = (0..INSTALLS).map(|_| typical_site()).collect();
    bench.reset_stats();
    for site in &sites {
        bench.install(site).await;
    }
    let first = per_install(&bench.commandstats());

    let mut rolled = sites.clone();
    for site in &mut rolled {
        site.secret = typical_site().secret;
    }
    bench.reset_stats();
    for site in &rolled {
        bench.install(site).await;
    }
    let reinstall = per_install(&bench.commandstats());

    // The read: a transaction of the record (and the secret list of records written before
    // the compact layout) and the token memory.
    let read = [
        ("multi", 1),
        ("hgetall", 1),
        ("lrange", 1),
        ("get", 1),
        ("exec", 1),
    ];
    // The write: one script indexing the site, checking the version, writing record and
    // token memory, indexing its Forge identities (`installationId`, `cloudId`: one `sadd`
    // each, docs/PROTOCOL.md §12), publishing the invalidation.
    let write = [
        ("evalsha", 1),
        ("zadd", 1),
        ("hget", 1),
        ("hset", 1),
        ("set", 1),
        ("sadd", 2),
        ("publish", 1),
    ];
    // A new installation: no record yet (`exists`), alone on its site (`zcard`).
    let first_expected =
        composition(&[&read[..], &write[..], &[("exists", 1), ("zcard", 1)]].concat());
    assert_eq!(first, first_expected, "commands per first install");
    assert_eq!(round_trips(&first), 2, "{first:?}");
    // A reinstall replaces the record (`del`: also the secret list of the old layout).
    let reinstall_expected = composition(&[&read[..], &write[..], &[("del", 1)]].concat());
    assert_eq!(reinstall, reinstall_expected, "commands per reinstall");
    assert_eq!(round_trips(&reinstall), 2, "{reinstall:?}");
    // The records are all there, with the rolled secrets.
    for site in &rolled {
        assert_eq!(bench.app.tenant_status(site, &site.secret).await, 200);
    }
}

/// `WARDEN_SECRET_KEYS` of one key.
const KEY_RING: &str = "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Issue 8: one installation (a Jira Cloud site's signed install, its token memory expired)
/// takes at most 1.5 KiB of Redis memory, with its shared secret sealed at rest or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_takes_at_most_one_and_a_half_kib() {
    let mut totals = Vec::new();
    for keys in [None, Some(KEY_RING)] {
        let bench = Bench::start(keys).await;
        let site = typical_site();
        bench.install(&site).await;
        let usage = bench.memory_of(&site).await;
        let total: u64 = usage.values().sum();
        let sealed = if keys.is_some() {
            "sealed"
        } else {
            "plaintext"
        };
        eprintln!("MEMORY USAGE, secret {sealed}: {total} bytes: {usage:?}");
        totals.push((sealed, total, usage));
    }
    for (sealed, total, usage) in totals {
        assert!(total <= 1536, "secret {sealed}: {total} bytes: {usage:?}");
    }
}

/// Issue 9: the Forge identity index of a Jira Cloud install (its `installationId` and its
/// `cloudId`, one small set each) adds at most 600 bytes of Redis memory on top of the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forge_identity_index_takes_at_most_600_bytes_per_installation() {
    let bench = Bench::start(None).await;
    bench.install(&typical_site()).await;
    let usage = bench.forge_index_memory().await;
    let total: u64 = usage.values().sum();
    eprintln!("MEMORY USAGE, Forge identity index: {total} bytes: {usage:?}");
    assert_eq!(usage.len(), 2, "one set per identity: {usage:?}");
    assert!(total <= 600, "{total} bytes: {usage:?}");
}
