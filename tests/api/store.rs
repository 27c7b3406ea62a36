//! One behavioural suite for every installation store: every test in `both!` runs against a
//! `RedisStore` (a private redis-server, a unique key prefix per test), a cluster `RedisStore`
//! (a private three-primary Redis Cluster, a unique prefix per test) and an `EmbeddedStore` (a
//! fresh temporary directory per test). Store-specific tests follow.

use crate::helpers::store::commit;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_protocol::forge::InstallationId;
use connect_warden::secrets::SecretVersion;
use connect_warden::store::embedded::EmbeddedStore;
use connect_warden::store::redis::RedisStore;
use connect_warden::store::{
    Commit, CommitOutcome, ForgeIdentity, InstallState, Installation, InstallationStore,
    ScanCursor, SeenToken, SharedStore, SiteCommitOutcome, SiteEntry, SiteProof, StoreError,
};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A store plus whatever must outlive it (the temporary directory).
struct Harness {
    store: SharedStore,
    _guard: Box<dyn Any + Send>,
}

async fn redis_harness() -> Harness {
    let store = RedisStore::connect(
        crate::helpers::redis_server::redis_url(),
        &crate::helpers::redis_server::unique_prefix(),
    )
    .await
    .expect("connect");
    Harness {
        store: Arc::new(store),
        _guard: Box::new(()),
    }
}

async fn cluster_harness() -> Harness {
    let cluster = crate::helpers::redis_server::cluster();
    let seeds: Vec<&str> = cluster.urls.iter().map(String::as_str).collect();
    let store = RedisStore::connect_cluster(&seeds, &crate::helpers::redis_server::unique_prefix())
        .await
        .expect("connect");
    Harness {
        store: Arc::new(store),
        _guard: Box::new(()),
    }
}

async fn embedded_harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).expect("open");
    Harness {
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ck(s: &str) -> ClientKey {
    ClientKey::parse(s).unwrap()
}

fn url(s: &str) -> BaseUrl {
    BaseUrl::parse(s).unwrap()
}

fn secret(s: &str, since: i64) -> SecretVersion {
    SecretVersion {
        secret: SharedSecret::parse(s).unwrap(),
        since,
        signed: false,
    }
}

/// An installation with every field set (and a `version` the store must ignore).
fn installation(client_key: &str) -> Installation {
    Installation {
        client_key: ck(client_key),
        base_url: url("https://acme.atlassian.net/wiki"),
        display_url: Some("https://wiki.acme.example".into()),
        product_type: "confluence".into(),
        description: Some("Atlassian Confluence \"quoted\" ünïcode\nline".into()),
        oauth_client_id: Some("oauth-123".into()),
        installation_id: Some("ari:cloud:ecosystem::installation/abc".into()),
        cloud_id: Some("cloud-1".into()),
        service_entitlement_number: Some("SEN-1".into()),
        entitlement_id: Some("ent-1".into()),
        entitlement_number: Some("E-1".into()),
        server_version: Some("6452".into()),
        plugins_version: Some("1000.0.0".into()),
        state: InstallState::Installed,
        enabled: true,
        superseded_by: Some(ck("jira:newer")),
        supersedes: vec![ck("jira:old-1"), ck("jira:old-2")],
        site_proof: Some(SiteProof::Refused),
        signed_install: true,
        atlassian_installed: true,
        last_event_iat: 1_700_000_003,
        last_tenant_event_iat: 0,
        installed_at: 1_700_000_000,
        updated_at: 1_700_000_004,
        secrets: vec![
            secret("first-secret", 1_700_000_000),
            secret("second \"secret\" with quotes", 1_700_000_001),
            SecretVersion {
                signed: true,
                ..secret("third-secret-ü", 1_700_000_002)
            },
        ],
        forge: Some(connect_warden::store::ForgeBinding {
            installation_id: "ari:cloud:ecosystem::installation/abc".into(),
            app_version: Some("2.1.0".into()),
            uninstalling_since: Some(1_700_000_005),
            retired: vec!["ari:cloud:ecosystem::installation/old".into()],
        }),
        version: 42,
        at_rest: Default::default(),
    }
}

/// An installation with every optional field absent.
fn minimal(client_key: &str) -> Installation {
    let mut installation = Installation::new(
        ck(client_key),
        url("https://minimal.atlassian.net"),
        "jira",
        SharedSecret::parse("only").unwrap(),
        false,
        0,
    );
    installation.secrets[0].since = 5;
    installation.state = InstallState::Uninstalled;
    installation.enabled = false;
    installation
}

/// Everything of an installation, secrets included, for exact comparisons.
fn snapshot(i: &Installation) -> serde_json::Value {
    serde_json::to_value(i).unwrap()
}

fn with_version(i: &Installation, version: u64) -> serde_json::Value {
    let mut i = i.clone();
    i.version = version;
    snapshot(&i)
}

// ---------------------------------------------------------------------------------------------
// Behaviour shared by both stores

async fn load_of_unknown_is_none(store: SharedStore) {
    assert!(store.load(&ck("jira:unknown")).await.unwrap().is_none());
}

async fn commit_then_load_round_trips(store: SharedStore) {
    let full = installation("jira:full");
    assert_eq!(
        commit(&*store, &full, 0, None).await,
        CommitOutcome::Committed
    );
    let loaded = store.load(&full.client_key).await.unwrap().expect("stored");
    assert_eq!(loaded.version, 1, "the store writes expected_version + 1");
    assert_eq!(snapshot(&loaded), with_version(&full, 1));
    assert_eq!(loaded.secrets.len(), 3);
    assert_eq!(loaded.current_secret().secret.expose(), "third-secret-ü");
    assert_eq!(
        loaded.previous_secret().unwrap().secret.expose(),
        "second \"secret\" with quotes"
    );

    let small = minimal("jira:minimal");
    assert_eq!(
        commit(&*store, &small, 0, None).await,
        CommitOutcome::Committed
    );
    let loaded = store
        .load(&small.client_key)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(snapshot(&loaded), with_version(&small, 1));
    assert!(loaded.description.is_none() && loaded.superseded_by.is_none());

    // A follow-up write replaces every field, including the whole secret history.
    let mut next = loaded.clone();
    next.description = Some("now described".into());
    next.secrets = vec![secret("rolled", 9)];
    next.state = InstallState::Installed;
    assert_eq!(
        commit(&*store, &next, 1, None).await,
        CommitOutcome::Committed
    );
    let reloaded = store.load(&small.client_key).await.unwrap().unwrap();
    assert_eq!(snapshot(&reloaded), with_version(&next, 2));
}

async fn stale_commit_conflicts_and_changes_nothing(store: SharedStore) {
    let first = installation("jira:stale");
    assert_eq!(
        commit(&*store, &first, 0, None).await,
        CommitOutcome::Committed
    );

    let mut other = first.clone();
    other.product_type = "jira".into();
    other.secrets = vec![secret("intruder", 1)];
    let token = SeenToken {
        token_digest: [7; 32],
        body_digest: [8; 32],
        expires_at: now_unix() + 600,
    };
    for stale in [0, 2, 17] {
        assert_eq!(
            commit(&*store, &other, stale, Some(token)).await,
            CommitOutcome::Conflict
        );
    }
    let loaded = store.load(&first.client_key).await.unwrap().unwrap();
    assert_eq!(snapshot(&loaded), with_version(&first, 1));
    assert_eq!(
        store.seen_token(&first.client_key, &[7; 32]).await.unwrap(),
        None,
        "a conflicting commit must not remember its token"
    );

    // A commit expecting a record that does not exist writes nothing either.
    let ghost = minimal("jira:ghost");
    assert_eq!(
        commit(&*store, &ghost, 3, None).await,
        CommitOutcome::Conflict
    );
    assert!(store.load(&ghost.client_key).await.unwrap().is_none());

    // The current version still wins.
    assert_eq!(
        commit(&*store, &other, 1, None).await,
        CommitOutcome::Committed
    );
    let loaded = store.load(&first.client_key).await.unwrap().unwrap();
    assert_eq!(snapshot(&loaded), with_version(&other, 2));
}

async fn concurrent_commits_exactly_one_wins(store: SharedStore) {
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut record = installation("jira:race");
                record.product_type = format!("writer-{n}");
                let outcome = commit(&*store, &record, 0, None).await;
                (n, outcome)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (n, outcome) = task.await.unwrap();
        if outcome == CommitOutcome::Committed {
            winners.push(n);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let loaded = store.load(&ck("jira:race")).await.unwrap().unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.product_type, format!("writer-{}", winners[0]));
}

async fn seen_token_until_expiry(store: SharedStore) {
    let record = installation("jira:tokens");
    let expires_at = now_unix() + 2;
    let token = SeenToken {
        token_digest: [1; 32],
        body_digest: [0xab; 32],
        expires_at,
    };
    assert_eq!(
        commit(&*store, &record, 0, Some(token)).await,
        CommitOutcome::Committed
    );
    // An already expired token is not remembered.
    let expired = SeenToken {
        token_digest: [2; 32],
        body_digest: [0xcd; 32],
        expires_at: now_unix() - 1,
    };
    assert_eq!(
        commit(&*store, &record, 1, Some(expired)).await,
        CommitOutcome::Committed
    );

    assert_eq!(
        store
            .seen_token(&record.client_key, &[1; 32])
            .await
            .unwrap(),
        Some([0xab; 32])
    );
    assert_eq!(
        store
            .seen_token(&record.client_key, &[2; 32])
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .seen_token(&record.client_key, &[3; 32])
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.seen_token(&ck("jira:other"), &[1; 32]).await.unwrap(),
        None
    );

    // Past `expires_at` the token is forgotten.
    let deadline = UNIX_EPOCH + Duration::from_secs(expires_at as u64) + Duration::from_millis(150);
    if let Ok(wait) = deadline.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert_eq!(
        store
            .seen_token(&record.client_key, &[1; 32])
            .await
            .unwrap(),
        None
    );
}

async fn site_index(store: SharedStore) {
    let site = url("https://acme.atlassian.net/wiki");
    assert!(store.client_keys_for_site(&site).await.unwrap().is_empty());
    store.index_site(&site, &ck("jira:b")).await.unwrap();
    // Redis orders by millisecond of first indexing.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.index_site(&site, &ck("jira:a")).await.unwrap();
    // Idempotent (the position stays), and the trailing `/` is insignificant.
    store
        .index_site(&url("https://acme.atlassian.net/wiki/"), &ck("jira:b"))
        .await
        .unwrap();
    store
        .index_site(&url("https://other.atlassian.net"), &ck("jira:c"))
        .await
        .unwrap();

    let keys = store.client_keys_for_site(&site).await.unwrap();
    assert_eq!(
        keys,
        vec![ck("jira:b"), ck("jira:a")],
        "order of first indexing"
    );
    assert_eq!(
        store
            .client_keys_for_site(&url("https://other.atlassian.net"))
            .await
            .unwrap(),
        vec![ck("jira:c")]
    );
    assert!(store
        .client_keys_for_site(&url("https://acme.atlassian.net"))
        .await
        .unwrap()
        .is_empty());
}

async fn list_client_keys_lists_committed_ones(store: SharedStore) {
    assert!(store.list_client_keys().await.unwrap().is_empty());
    for key in ["jira:one", "confluence:two", "x"] {
        assert_eq!(
            commit(&*store, &minimal(key), 0, None).await,
            CommitOutcome::Committed
        );
    }
    // Neither a conflicting commit nor a site entry nor a token makes an installation.
    assert_eq!(
        commit(&*store, &minimal("jira:never"), 1, None).await,
        CommitOutcome::Conflict
    );
    store
        .index_site(&url("https://acme.atlassian.net"), &ck("jira:indexed-only"))
        .await
        .unwrap();
    let token = SeenToken {
        token_digest: [9; 32],
        body_digest: [9; 32],
        expires_at: now_unix() + 600,
    };
    assert_eq!(
        commit(&*store, &minimal("x"), 1, Some(token)).await,
        CommitOutcome::Committed
    );

    let mut keys = store.list_client_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec![ck("confluence:two"), ck("jira:one"), ck("x")]);
}

/// A listing reads every installation once, in pages: more records than one page holds
/// (Redis: `SCAN` steps of about 1000 keys, on every primary of a cluster; embedded: 1000 per
/// page).
async fn scan_installations_pages_through_every_record(store: SharedStore) {
    use futures_util::StreamExt as _;
    const COUNT: usize = 2500;
    let keys: Vec<String> = (0..COUNT).map(|i| format!("jira:paged-{i}")).collect();
    futures_util::stream::iter(&keys)
        .for_each_concurrent(32, |key| {
            let store = store.clone();
            async move {
                assert_eq!(
                    commit(&*store, &minimal(key), 0, None).await,
                    CommitOutcome::Committed
                );
            }
        })
        .await;

    let mut listed = std::collections::BTreeSet::new();
    let mut pages = 0;
    let mut cursor = ScanCursor::default();
    loop {
        let page = store.scan_installations(cursor).await.unwrap();
        pages += 1;
        assert!(
            page.installations.len() <= 2 * 1000,
            "a page of {}",
            page.installations.len()
        );
        for entry in page.installations {
            let record = entry.record.expect("a readable record");
            assert_eq!(record.client_key, entry.client_key);
            assert_eq!(
                record.current_secret().secret.expose(),
                minimal(entry.client_key.as_str())
                    .current_secret()
                    .secret
                    .expose()
            );
            listed.insert(entry.client_key.as_str().to_owned());
        }
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(listed, keys.into_iter().collect());
    assert!(pages >= 3, "{pages} page(s)");
}

/// The write of an install (docs/PROTOCOL.md §7): the site is indexed whatever happens to the
/// record, and the record is written only if the site's other clientKeys are what it assumed.
async fn commit_on_site_indexes_and_checks_the_site(store: SharedStore) {
    let site = url("https://shared.atlassian.net");
    let entry = |assumed_others| SiteEntry {
        base_url: &site,
        assumed_others,
    };
    let first = minimal("jira:site-first");
    let outcome = store
        .commit_on_site(
            Commit {
                record: &first,
                expected_version: 0,
                token: None,
            },
            entry(Some(false)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::Committed);

    // A second clientKey assuming it is alone: indexed, not written.
    let second = minimal("jira:site-second");
    let token = SeenToken {
        token_digest: [0x33; 32],
        body_digest: [0x44; 32],
        expires_at: now_unix() + 600,
    };
    let outcome = store
        .commit_on_site(
            Commit {
                record: &second,
                expected_version: 0,
                token: Some(token),
            },
            entry(Some(false)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::SiteDiffers { others: true });
    assert!(store.load(&second.client_key).await.unwrap().is_none());
    assert_eq!(
        store
            .seen_token(&second.client_key, &[0x33; 32])
            .await
            .unwrap(),
        None,
        "no token memory without the record"
    );
    assert_eq!(
        store.client_keys_for_site(&site).await.unwrap(),
        vec![first.client_key.clone(), second.client_key.clone()]
    );

    // A stale version: a conflict, nothing written.
    let outcome = store
        .commit_on_site(
            Commit {
                record: &second,
                expected_version: 7,
                token: Some(token),
            },
            entry(Some(true)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::Conflict);
    assert!(store.load(&second.client_key).await.unwrap().is_none());

    // Planned again with the others: written, token remembered, read back together.
    let outcome = store
        .commit_on_site(
            Commit {
                record: &second,
                expected_version: 0,
                token: Some(token),
            },
            entry(Some(true)),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::Committed);
    let (record, seen) = store
        .load_with_token(&second.client_key, Some(&[0x33; 32]))
        .await
        .unwrap();
    assert_eq!(record.unwrap().version, 1);
    assert_eq!(seen, Some([0x44; 32]));
    let (_, unseen) = store
        .load_with_token(&second.client_key, Some(&[0x55; 32]))
        .await
        .unwrap();
    assert_eq!(unseen, None);

    // A reinstall indexes whatever the site holds.
    let outcome = store
        .commit_on_site(
            Commit {
                record: &first,
                expected_version: 1,
                token: None,
            },
            entry(None),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::Committed);
    assert_eq!(
        store
            .load(&first.client_key)
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

/// A Connect installation of a site that adopted Forge: active, with an `installationId`
/// (its ARI) and a `cloudId`.
fn on_forge(client_key: &str, product: &str, installation: &str, cloud: &str) -> Installation {
    let mut record = minimal(client_key);
    record.state = InstallState::Installed;
    record.enabled = true;
    record.product_type = product.into();
    record.installation_id = Some(format!("ari:cloud:ecosystem::installation/{installation}"));
    record.cloud_id = Some(cloud.into());
    record
}

fn by_installation(uuid: &str) -> ForgeIdentity {
    ForgeIdentity::Installation(InstallationId::parse(uuid).unwrap())
}

async fn sorted_forge_keys(store: &SharedStore, identity: &ForgeIdentity) -> Vec<String> {
    let mut keys: Vec<String> = store
        .client_keys_for_forge(identity)
        .await
        .unwrap()
        .iter()
        .map(|k| k.as_str().to_owned())
        .collect();
    keys.sort();
    keys
}

/// Issue 9: a commit (plain or on its site) indexes the record under its `installationId`
/// and `cloudId`; a reinstall with a new `installationId` adds it (the old entry stays: a
/// reader re-checks the record); `index_forge` indexes without writing (the backfill).
async fn forge_identity_index(store: SharedStore) {
    let (i1, i2, i3, i4) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let cloud = uuid::Uuid::new_v4().to_string();
    let jira = on_forge("jira:forge-a", "jira", &i1, &cloud);
    let confluence = on_forge("confluence:forge-b", "confluence", &i2, &cloud);
    assert_eq!(
        commit(store.as_ref(), &jira, 0, None).await,
        CommitOutcome::Committed
    );
    let site = SiteEntry {
        base_url: &confluence.base_url,
        assumed_others: None,
    };
    let outcome = store
        .commit_on_site(
            Commit {
                record: &confluence,
                expected_version: 0,
                token: None,
            },
            site,
        )
        .await
        .unwrap();
    assert_eq!(outcome, SiteCommitOutcome::Committed);

    assert_eq!(
        sorted_forge_keys(&store, &by_installation(&i1)).await,
        ["jira:forge-a"]
    );
    // The bare UUID and the ARI name the same installation.
    let ari = format!("ari:cloud:ecosystem::installation/{i2}");
    assert_eq!(
        sorted_forge_keys(&store, &by_installation(&ari)).await,
        ["confluence:forge-b"]
    );
    assert_eq!(
        sorted_forge_keys(&store, &ForgeIdentity::Cloud(cloud.clone())).await,
        ["confluence:forge-b", "jira:forge-a"]
    );
    assert!(sorted_forge_keys(&store, &by_installation(&i4))
        .await
        .is_empty());

    let reinstalled = on_forge("jira:forge-a", "jira", &i3, &cloud);
    assert_eq!(
        commit(store.as_ref(), &reinstalled, 1, None).await,
        CommitOutcome::Committed
    );
    assert_eq!(
        sorted_forge_keys(&store, &by_installation(&i3)).await,
        ["jira:forge-a"]
    );
    let loaded = store.load(&ck("jira:forge-a")).await.unwrap().unwrap();
    assert!(by_installation(&i3).names(&loaded));
    assert!(
        !by_installation(&i1).names(&loaded),
        "the old installationId no longer names the reinstalled record"
    );

    let never_committed = on_forge("jira:forge-c", "jira", &i4, &cloud);
    store.index_forge(&never_committed).await.unwrap();
    assert_eq!(
        sorted_forge_keys(&store, &by_installation(&i4)).await,
        ["jira:forge-c"]
    );
    assert!(store.load(&ck("jira:forge-c")).await.unwrap().is_none());
}

async fn ping_answers(store: SharedStore) {
    store.ping().await.unwrap();
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::redis_harness().await;
                    super::$name(h.store.clone()).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::cluster_harness().await;
                    super::$name(h.store.clone()).await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let h = super::embedded_harness().await;
                    super::$name(h.store.clone()).await;
                }
            )*
        }
    };
}

both!(
    load_of_unknown_is_none,
    commit_then_load_round_trips,
    stale_commit_conflicts_and_changes_nothing,
    concurrent_commits_exactly_one_wins,
    seen_token_until_expiry,
    site_index,
    commit_on_site_indexes_and_checks_the_site,
    list_client_keys_lists_committed_ones,
    scan_installations_pages_through_every_record,
    forge_identity_index,
    ping_answers,
);

// ---------------------------------------------------------------------------------------------
// Redis only

async fn plain_redis() -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(crate::helpers::redis_server::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_list_client_keys_is_isolated_by_prefix() {
    let url_ = crate::helpers::redis_server::redis_url();
    let a = RedisStore::connect(url_, &crate::helpers::redis_server::unique_prefix())
        .await
        .unwrap();
    let b = RedisStore::connect(url_, &crate::helpers::redis_server::unique_prefix())
        .await
        .unwrap();
    assert_eq!(
        commit(&a, &minimal("jira:in-a"), 0, None).await,
        CommitOutcome::Committed
    );
    assert_eq!(
        commit(&b, &minimal("jira:in-b"), 0, None).await,
        CommitOutcome::Committed
    );
    assert_eq!(a.list_client_keys().await.unwrap(), vec![ck("jira:in-a")]);
    assert_eq!(b.list_client_keys().await.unwrap(), vec![ck("jira:in-b")]);
    assert!(a.load(&ck("jira:in-b")).await.unwrap().is_none());
}

#[tokio::test]
async fn redis_commit_publishes_the_client_key() {
    use futures_util::StreamExt;

    let prefix = crate::helpers::redis_server::unique_prefix();
    let store = RedisStore::connect(crate::helpers::redis_server::redis_url(), &prefix)
        .await
        .unwrap();
    assert_eq!(store.channel(), format!("{prefix}:invalidate"));

    let client = ::redis::Client::open(crate::helpers::redis_server::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(store.channel()).await.unwrap();
    let mut messages = pubsub.on_message();

    let first = minimal("jira:published");
    assert_eq!(
        commit(&store, &first, 0, None).await,
        CommitOutcome::Committed
    );
    // A conflict publishes nothing: the next message is the following successful commit.
    assert_eq!(
        commit(&store, &first, 0, None).await,
        CommitOutcome::Conflict
    );
    assert_eq!(
        commit(&store, &minimal("jira:second"), 0, None).await,
        CommitOutcome::Committed
    );

    for expected in ["jira:published", "jira:second"] {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("a message within 5 s")
            .expect("the subscription is open");
        assert_eq!(msg.get_channel_name(), store.channel());
        assert_eq!(msg.get_payload::<String>().unwrap(), expected);
    }
}

#[tokio::test]
async fn redis_key_layout_is_hash_tagged_per_tenant() {
    use ::redis::AsyncCommands;

    let prefix = crate::helpers::redis_server::unique_prefix();
    let store = RedisStore::connect(crate::helpers::redis_server::redis_url(), &prefix)
        .await
        .unwrap();
    let record = installation("jira:layout");
    let token = SeenToken {
        token_digest: [0x11; 32],
        body_digest: [0x22; 32],
        expires_at: now_unix() + 600,
    };
    assert_eq!(
        commit(&store, &record, 0, Some(token)).await,
        CommitOutcome::Committed
    );
    store
        .index_site(&record.base_url, &record.client_key)
        .await
        .unwrap();

    let mut conn = plain_redis().await;
    let hash = format!("{prefix}:{{jira:layout}}:installation");
    // One hash of two fields: the compare-and-set version and the compact record.
    let fields: std::collections::HashMap<String, String> = conn.hgetall(&hash).await.unwrap();
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["record", "version"]);
    assert_eq!(fields["version"], "1");
    let stored: serde_json::Value = serde_json::from_str(&fields["record"]).unwrap();
    assert_eq!(stored["pt"], "confluence");
    assert_eq!(stored["ck"], "jira:layout");
    assert!(stored.get("version").is_none(), "{stored}");
    let secrets = stored["s"].as_array().unwrap();
    assert_eq!(secrets.len(), 3);
    assert_eq!(secrets[0]["t"], 1_700_000_000);
    let list: bool = conn
        .exists(format!("{prefix}:{{jira:layout}}:secrets"))
        .await
        .unwrap();
    assert!(!list, "the secrets live in the record");

    let token_key = format!("{prefix}:{{jira:layout}}:token:{}", hex::encode([0x11; 32]));
    let body: Option<String> = conn.get(&token_key).await.unwrap();
    assert_eq!(body, Some(hex::encode([0x22; 32])));
    let ttl: i64 = conn.ttl(&token_key).await.unwrap();
    assert!(ttl > 500 && ttl <= 600, "ttl {ttl}");

    let site_key = format!("{prefix}:site:{{https://acme.atlassian.net/wiki}}");
    let member: Option<f64> = conn.zscore(&site_key, "jira:layout").await.unwrap();
    let member = member.is_some();
    assert!(member);
}

#[tokio::test]
async fn redis_damaged_record_is_corrupt() {
    use ::redis::AsyncCommands;

    let prefix = crate::helpers::redis_server::unique_prefix();
    let store = RedisStore::connect(crate::helpers::redis_server::redis_url(), &prefix)
        .await
        .unwrap();
    let mut conn = plain_redis().await;

    let missing = minimal("jira:missing-field");
    assert_eq!(
        commit(&store, &missing, 0, None).await,
        CommitOutcome::Committed
    );
    let hash = |ck: &str| format!("{prefix}:{{{ck}}}:installation");
    rewrite_record(&mut conn, &hash("jira:missing-field"), |record| {
        record.as_object_mut().unwrap().remove("pt");
    })
    .await;
    assert!(matches!(
        store.load(&missing.client_key).await,
        Err(StoreError::Corrupt(_))
    ));

    let garbled = minimal("jira:garbled");
    assert_eq!(
        commit(&store, &garbled, 0, None).await,
        CommitOutcome::Committed
    );
    let _: i64 = conn
        .hset(hash("jira:garbled"), "record", "not json")
        .await
        .unwrap();
    assert!(matches!(
        store.load(&garbled.client_key).await,
        Err(StoreError::Corrupt(_))
    ));

    let no_version = minimal("jira:no-version");
    assert_eq!(
        commit(&store, &no_version, 0, None).await,
        CommitOutcome::Committed
    );
    let _: i64 = conn.hdel(hash("jira:no-version"), "version").await.unwrap();
    assert!(matches!(
        store.load(&no_version.client_key).await,
        Err(StoreError::Corrupt(_))
    ));
    // A record without a version is never overwritten blindly.
    assert_eq!(
        commit(&store, &no_version, 0, None).await,
        CommitOutcome::Conflict
    );

    let bad_secret = minimal("jira:bad-secret");
    assert_eq!(
        commit(&store, &bad_secret, 0, None).await,
        CommitOutcome::Committed
    );
    rewrite_record(&mut conn, &hash("jira:bad-secret"), |record| {
        record["s"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"p": "leak-me"}));
    })
    .await;
    match store.load(&bad_secret.client_key).await {
        Err(StoreError::Corrupt(msg)) => assert!(!msg.contains("leak-me"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Changes the compact record stored in the installation hash `hash` with `change`.
async fn rewrite_record(
    conn: &mut ::redis::aio::MultiplexedConnection,
    hash: &str,
    change: impl FnOnce(&mut serde_json::Value),
) {
    use ::redis::AsyncCommands;

    let raw: String = conn.hget(hash, "record").await.unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&raw).unwrap();
    change(&mut record);
    let _: i64 = conn.hset(hash, "record", record.to_string()).await.unwrap();
}

/// Records written before the compact layout (one JSON field per attribute, the secrets in a
/// list of their own) are still read, and rewritten in the compact layout by their next write.
#[tokio::test]
async fn redis_reads_the_old_layout_and_rewrites_it_on_its_next_write() {
    use ::redis::AsyncCommands;

    let prefix = crate::helpers::redis_server::unique_prefix();
    let store = RedisStore::connect(crate::helpers::redis_server::redis_url(), &prefix)
        .await
        .unwrap();
    let mut conn = plain_redis().await;
    let hash = format!("{prefix}:{{jira:old-layout}}:installation");
    let list = format!("{prefix}:{{jira:old-layout}}:secrets");
    let old_fields = serde_json::json!({
        "client_key": "jira:old-layout",
        "base_url": "https://old.atlassian.net",
        "display_url": null,
        "product_type": "jira",
        "description": "Atlassian JIRA at https://old.atlassian.net",
        "oauth_client_id": "oauth-old",
        "installation_id": null,
        "cloud_id": null,
        "service_entitlement_number": null,
        "entitlement_id": null,
        "entitlement_number": null,
        "server_version": "100237",
        "plugins_version": null,
        "state": "installed",
        "enabled": true,
        "superseded_by": null,
        "supersedes": ["jira:older"],
        "site_proof": "skipped",
        "signed_install": true,
        "atlassian_installed": true,
        "last_event_iat": 1_700_000_100,
        "last_tenant_event_iat": 0,
        "installed_at": 1_700_000_000,
        "updated_at": 1_700_000_100,
        "version": 3,
    });
    let pairs: Vec<(String, String)> = old_fields
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| (name.clone(), value.to_string()))
        .collect();
    let _: () = conn.hset_multiple(&hash, &pairs).await.unwrap();
    let _: () = conn
        .rpush(
            &list,
            &[
                r#"{"secret":"old-first","since":1700000000,"signed":true}"#,
                r#"{"secret":"old-second","since":1700000100,"signed":true}"#,
            ],
        )
        .await
        .unwrap();

    let loaded = store.load(&ck("jira:old-layout")).await.unwrap().unwrap();
    assert_eq!(loaded.version, 3);
    assert_eq!(loaded.base_url, url("https://old.atlassian.net"));
    assert_eq!(loaded.oauth_client_id.as_deref(), Some("oauth-old"));
    assert_eq!(loaded.supersedes, vec![ck("jira:older")]);
    assert_eq!(loaded.site_proof, Some(SiteProof::Skipped));
    assert_eq!(loaded.last_event_iat, 1_700_000_100);
    let secrets: Vec<&str> = loaded.secrets.iter().map(|s| s.secret.expose()).collect();
    assert_eq!(secrets, ["old-first", "old-second"]);

    let mut next = loaded.clone();
    next.enabled = false;
    assert_eq!(
        commit(&store, &next, 3, None).await,
        CommitOutcome::Committed
    );
    let fields: std::collections::HashMap<String, String> = conn.hgetall(&hash).await.unwrap();
    let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        ["record", "version"],
        "rewritten in the compact layout"
    );
    assert_eq!(fields["version"], "4");
    let list_left: bool = conn.exists(&list).await.unwrap();
    assert!(!list_left, "the old secret list is gone");

    let reread = store.load(&ck("jira:old-layout")).await.unwrap().unwrap();
    assert_eq!(reread.version, 4);
    assert!(!reread.enabled);
    assert_eq!(reread.supersedes, vec![ck("jira:older")]);
    assert_eq!(reread.oauth_client_id.as_deref(), Some("oauth-old"));
    let secrets: Vec<&str> = reread.secrets.iter().map(|s| s.secret.expose()).collect();
    assert_eq!(secrets, ["old-first", "old-second"]);
}

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn assert_unavailable_quickly(store: &RedisStore) {
    let record = minimal("jira:outage");
    let limit = Duration::from_secs(10);
    let load = tokio::time::timeout(limit, store.load(&record.client_key))
        .await
        .expect("load must not hang");
    assert!(matches!(load, Err(StoreError::Unavailable(_))), "{load:?}");
    let committed = tokio::time::timeout(
        limit,
        store.commit(Commit {
            record: &record,
            expected_version: 0,
            token: None,
        }),
    )
    .await
    .expect("commit must not hang");
    assert!(
        matches!(committed, Err(StoreError::Unavailable(_))),
        "{committed:?}"
    );
    let ping = tokio::time::timeout(limit, store.ping())
        .await
        .expect("ping must not hang");
    assert!(matches!(ping, Err(StoreError::Unavailable(_))), "{ping:?}");
}

#[tokio::test]
async fn redis_down_is_unavailable_not_a_failed_start() {
    let port = closed_port();
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "warden")
        .await
        .expect("construction must not need Redis");
    assert_unavailable_quickly(&store).await;
}

#[tokio::test]
async fn redis_that_never_answers_is_unavailable_within_the_timeout() {
    // Accepts connections (the kernel completes the handshake) but never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "warden")
        .await
        .unwrap();
    assert_unavailable_quickly(&store).await;
    drop(listener);
}

#[tokio::test]
async fn redis_connect_rejects_a_bad_prefix_or_url() {
    assert!(RedisStore::connect("redis://127.0.0.1:1", "a{b}")
        .await
        .is_err());
    assert!(RedisStore::connect("redis://127.0.0.1:1", "")
        .await
        .is_err());
    assert!(RedisStore::connect("not a url", "warden").await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Embedded only

#[tokio::test]
async fn embedded_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let record = installation("jira:durable");
    let token = SeenToken {
        token_digest: [4; 32],
        body_digest: [5; 32],
        expires_at: now_unix() + 600,
    };
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            commit(&store, &record, 0, Some(token)).await,
            CommitOutcome::Committed
        );
        store
            .index_site(&record.base_url, &record.client_key)
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let loaded = store.load(&record.client_key).await.unwrap().unwrap();
    assert_eq!(snapshot(&loaded), with_version(&record, 1));
    assert_eq!(
        store
            .seen_token(&record.client_key, &[4; 32])
            .await
            .unwrap(),
        Some([5; 32])
    );
    assert_eq!(
        store.client_keys_for_site(&record.base_url).await.unwrap(),
        vec![record.client_key.clone()]
    );
    assert_eq!(
        store.list_client_keys().await.unwrap(),
        vec![record.client_key.clone()]
    );
    // Its Forge identity index too (issue 9).
    assert_eq!(
        store
            .client_keys_for_forge(&ForgeIdentity::Cloud("cloud-1".into()))
            .await
            .unwrap(),
        vec![record.client_key.clone()]
    );
    // The version carried over: the compare-and-set continues from it.
    assert_eq!(
        commit(&store, &record, 0, None).await,
        CommitOutcome::Conflict
    );
    assert_eq!(
        commit(&store, &record, 1, None).await,
        CommitOutcome::Committed
    );
}

#[tokio::test]
async fn embedded_creates_its_directory_and_names_the_path_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a").join("b");
    let store = EmbeddedStore::open(&nested).expect("creates missing directories");
    assert!(nested.join("warden.redb").is_file());
    drop(store);

    // A data directory that is a file cannot be used; the error says where.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = EmbeddedStore::open(&file).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)));
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("not-a-dir"), "{cause}");
}
