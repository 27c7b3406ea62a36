//! [`EmbeddedStore`]: installations in one `redb` file (`<data_dir>/warden.redb`), for a single
//! `warden` process. Same behaviour as the Redis store, without the invalidation channel (there
//! is nobody to notify).
//!
//! Tables:
//! - `installations`: clientKey -> JSON of the whole [`Installation`] in its stored form
//!   (`super::record`), the secret history under `secrets`, sealed.
//! - `tokens`: (clientKey, token digest) -> (body digest, expires_at); expired entries of a
//!   clientKey are pruned by its commits, and never reported by [`InstallationStore::seen_token`].
//! - `site_installs`: (baseUrl, clientKey) -> the order in which the clientKey was first
//!   indexed on that site (from the `meta` counter `site_seq`).
//! - `forge_tokens`: installationId -> the Forge app token's stored form
//!   (`super::forge_token`); an expired one stays until a newer one replaces it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

use super::forge_token::{self, ForgeAppToken};
use super::record;
use super::sealing::Sealer;
use super::{
    Commit, CommitOutcome, ForgeIdentity, Installation, InstallationPage, InstallationStore,
    Listed, ScanCursor, ScanPosition, SeenToken, SiteCommitOutcome, SiteEntry, StoreError,
};
use connect_protocol::domain::{BaseUrl, ClientKey};
use connect_protocol::forge::InstallationId;

pub const FILE_NAME: &str = "warden.redb";

const INSTALLATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("installations");
/// (clientKey, token digest)
type TokenKey = (&'static str, &'static [u8; 32]);
/// (body digest, expires_at)
type TokenValue = (&'static [u8; 32], i64);
const TOKENS: TableDefinition<TokenKey, TokenValue> = TableDefinition::new("tokens");
/// (baseUrl, clientKey) -> order of first indexing
const SITE_INSTALLS: TableDefinition<(&str, &str), u64> = TableDefinition::new("site_installs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// key URL -> install key PEM
const INSTALL_KEYS: TableDefinition<&str, &str> = TableDefinition::new("install_keys");
/// (Forge identity's index name, clientKey): docs/PROTOCOL.md §12
const FORGE_IDS: TableDefinition<(&str, &str), ()> = TableDefinition::new("forge_ids");
/// Forge app tokens: installationId -> stored form (`super::forge_token`). Created by its first
/// write.
const FORGE_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("forge_tokens");
const SITE_SEQ: &str = "site_seq";
/// Records per page of [`InstallationStore::scan_installations`].
const PAGE_SIZE: usize = 1000;

#[derive(Debug, thiserror::Error)]
#[error("cannot open the embedded installation store at {path}: {source}")]
struct OpenError {
    path: PathBuf,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
#[error("an embedded store task failed: {0}")]
struct TaskError(String);

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    sealer: Sealer,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io(e: impl Into<redb::Error>) -> StoreError {
    StoreError::unavailable(e.into())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn decode(client_key: &ClientKey, raw: &[u8], sealer: &Sealer) -> Result<Installation, StoreError> {
    // A serde message could quote a secret: only say which record is broken.
    let invalid = || StoreError::Corrupt(format!("installation {client_key} is not valid"));
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice(raw) else {
        return Err(invalid());
    };
    let secrets = match fields.remove("secrets") {
        Some(serde_json::Value::Array(entries)) => entries,
        _ => return Err(invalid()),
    };
    record::decode(client_key, fields, secrets, sealer)
}

impl EmbeddedStore {
    /// Opens (or creates) `<data_dir>/warden.redb`, creating `data_dir` if missing.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let path = data_dir.join(FILE_NAME);
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| {
            StoreError::unavailable(OpenError {
                path: path.clone(),
                source,
            })
        };
        std::fs::create_dir_all(data_dir).map_err(|e| fail(Box::new(e)))?;
        let db = Database::create(&path).map_err(|e| fail(Box::new(e)))?;
        let txn = db.begin_write().map_err(|e| fail(Box::new(e)))?;
        {
            txn.open_table(INSTALLATIONS)
                .map_err(|e| fail(Box::new(e)))?;
            txn.open_table(TOKENS).map_err(|e| fail(Box::new(e)))?;
            txn.open_table(SITE_INSTALLS)
                .map_err(|e| fail(Box::new(e)))?;
            txn.open_table(META).map_err(|e| fail(Box::new(e)))?;
            txn.open_table(INSTALL_KEYS)
                .map_err(|e| fail(Box::new(e)))?;
            txn.open_table(FORGE_IDS).map_err(|e| fail(Box::new(e)))?;
        }
        txn.commit().map_err(|e| fail(Box::new(e)))?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path,
            sealer: Sealer::plaintext(),
        })
    }

    /// Seals secrets with `sealer` from now on (without it they are written in plaintext).
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = sealer;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs blocking redb work off the async runtime.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::unavailable(TaskError(e.to_string())))?
    }
}

/// A commit ready to run in a write transaction: the record in its stored form.
struct PreparedWrite {
    client_key: String,
    /// The index names of the record's Forge identities.
    forge_ids: Vec<String>,
    expected: u64,
    json: Vec<u8>,
    token: Option<SeenToken>,
}

impl EmbeddedStore {
    fn prepare(&self, commit: &Commit<'_>) -> Result<PreparedWrite, StoreError> {
        let client_key = commit.record.client_key.as_str().to_owned();
        let expected = commit.expected_version;
        let version = expected.checked_add(1).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the version of installation {client_key} overflows"
            ))
        })?;
        let record::StoredRecord {
            mut fields,
            secrets,
        } = record::encode(commit.record, version, &self.sealer)?;
        fields.insert("secrets".into(), serde_json::Value::Array(secrets));
        let json = serde_json::to_vec(&fields).map_err(|_| {
            StoreError::Corrupt(format!("cannot serialize installation {client_key}"))
        })?;
        Ok(PreparedWrite {
            forge_ids: forge_index_names(commit.record),
            client_key,
            expected,
            json,
            token: commit.token,
        })
    }
}

impl PreparedWrite {
    /// The compare-and-set write in `txn`; on a conflict `txn` must not be committed.
    fn apply(&self, txn: &WriteTransaction) -> Result<CommitOutcome, StoreError> {
        let client_key = self.client_key.as_str();
        let now = now_unix();
        let mut installations = txn.open_table(INSTALLATIONS).map_err(io)?;
        let current = match installations.get(client_key).map_err(io)? {
            // A record without a readable version is never overwritten blindly: that is a
            // conflict (the caller's re-read reports the record as corrupt).
            Some(raw) => serde_json::from_slice::<serde_json::Value>(raw.value())
                .ok()
                .and_then(|v| v.get("version")?.as_u64()),
            None => Some(0),
        };
        if current != Some(self.expected) {
            return Ok(CommitOutcome::Conflict);
        }
        installations
            .insert(client_key, self.json.as_slice())
            .map_err(io)?;
        forge_index_in(txn, &self.forge_ids, client_key)?;

        let mut tokens = txn.open_table(TOKENS).map_err(io)?;
        let low = [0u8; 32];
        let high = [0xffu8; 32];
        tokens
            .retain_in(
                (client_key, &low)..=(client_key, &high),
                |_, (_, expires_at)| expires_at > now,
            )
            .map_err(io)?;
        if let Some(t) = self.token.filter(|t| t.expires_at > now) {
            tokens
                .insert(
                    (client_key, &t.token_digest),
                    (&t.body_digest, t.expires_at),
                )
                .map_err(io)?;
        }
        Ok(CommitOutcome::Committed)
    }
}

/// Indexes `client_key` on the site at `base_url` in `txn`; the first indexing fixes the
/// position, a retry keeps it.
fn index_in(txn: &WriteTransaction, base_url: &str, client_key: &str) -> Result<(), StoreError> {
    let mut sites = txn.open_table(SITE_INSTALLS).map_err(io)?;
    let key = (base_url, client_key);
    if sites.get(key).map_err(io)?.is_none() {
        let mut meta = txn.open_table(META).map_err(io)?;
        let seq = meta.get(SITE_SEQ).map_err(io)?.map_or(0, |v| v.value()) + 1;
        meta.insert(SITE_SEQ, seq).map_err(io)?;
        sites.insert(key, seq).map_err(io)?;
    }
    Ok(())
}

fn forge_index_names(record: &Installation) -> Vec<String> {
    ForgeIdentity::of(record)
        .iter()
        .map(ForgeIdentity::index_name)
        .collect()
}

/// Indexes `client_key` under each of `names` (Forge identities) in `txn`.
fn forge_index_in(
    txn: &WriteTransaction,
    names: &[String],
    client_key: &str,
) -> Result<(), StoreError> {
    let mut ids = txn.open_table(FORGE_IDS).map_err(io)?;
    for name in names {
        ids.insert((name.as_str(), client_key), ()).map_err(io)?;
    }
    Ok(())
}

/// Whether clientKeys other than `client_key` are indexed on the site at `base_url`.
fn others_in(txn: &WriteTransaction, base_url: &str, client_key: &str) -> Result<bool, StoreError> {
    let sites = txn.open_table(SITE_INSTALLS).map_err(io)?;
    for entry in sites.range((base_url, "")..).map_err(io)? {
        let (key, _) = entry.map_err(io)?;
        let (site, other) = key.value();
        if site != base_url {
            return Ok(false);
        }
        if other != client_key {
            return Ok(true);
        }
    }
    Ok(false)
}

#[async_trait]
impl InstallationStore for EmbeddedStore {
    async fn load(&self, client_key: &ClientKey) -> Result<Option<Installation>, StoreError> {
        let client_key = client_key.clone();
        let sealer = self.sealer.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(INSTALLATIONS).map_err(io)?;
            match table.get(client_key.as_str()).map_err(io)? {
                Some(raw) => decode(&client_key, raw.value(), &sealer).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn seen_token(
        &self,
        client_key: &ClientKey,
        token_digest: &[u8; 32],
    ) -> Result<Option<[u8; 32]>, StoreError> {
        let client_key = client_key.as_str().to_owned();
        let token_digest = *token_digest;
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(TOKENS).map_err(io)?;
            let Some(entry) = table
                .get((client_key.as_str(), &token_digest))
                .map_err(io)?
            else {
                return Ok(None);
            };
            let (body_digest, expires_at) = entry.value();
            Ok((expires_at > now_unix()).then_some(*body_digest))
        })
        .await
    }

    async fn commit(&self, commit: Commit<'_>) -> Result<CommitOutcome, StoreError> {
        let write = self.prepare(&commit)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            let outcome = write.apply(&txn)?;
            if outcome == CommitOutcome::Committed {
                txn.commit().map_err(io)?;
            }
            // Otherwise dropping the transaction aborts it: nothing is written.
            Ok(outcome)
        })
        .await
    }

    /// One transaction: the site index entry, the site check, the compare-and-set write.
    async fn commit_on_site(
        &self,
        commit: Commit<'_>,
        site: SiteEntry<'_>,
    ) -> Result<SiteCommitOutcome, StoreError> {
        let write = self.prepare(&commit)?;
        let base_url = site.base_url.as_str().to_owned();
        let assumed_others = site.assumed_others;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            index_in(&txn, &base_url, &write.client_key)?;
            let others = others_in(&txn, &base_url, &write.client_key)?;
            let outcome = match assumed_others {
                Some(assumed) if assumed != others => SiteCommitOutcome::SiteDiffers { others },
                _ => match write.apply(&txn)? {
                    CommitOutcome::Committed => SiteCommitOutcome::Committed,
                    CommitOutcome::Conflict => SiteCommitOutcome::Conflict,
                },
            };
            // The index entry stays whatever happened to the record (as on Redis).
            txn.commit().map_err(io)?;
            Ok(outcome)
        })
        .await
    }

    async fn index_site(
        &self,
        base_url: &BaseUrl,
        client_key: &ClientKey,
    ) -> Result<(), StoreError> {
        let base_url = base_url.as_str().to_owned();
        let client_key = client_key.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            index_in(&txn, &base_url, &client_key)?;
            txn.commit().map_err(io)?;
            Ok(())
        })
        .await
    }

    async fn client_keys_for_forge(
        &self,
        identity: &ForgeIdentity,
    ) -> Result<Vec<ClientKey>, StoreError> {
        let name = identity.index_name();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let ids = txn.open_table(FORGE_IDS).map_err(io)?;
            let mut keys = Vec::new();
            for entry in ids.range((name.as_str(), "")..).map_err(io)? {
                let (key, _) = entry.map_err(io)?;
                let (indexed, client_key) = key.value();
                if indexed != name {
                    break;
                }
                keys.push(ClientKey::parse(client_key).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "the Forge identity index of {name} holds an invalid clientKey"
                    ))
                })?);
            }
            Ok(keys)
        })
        .await
    }

    async fn index_forge(&self, record: &Installation) -> Result<(), StoreError> {
        let names = forge_index_names(record);
        if names.is_empty() {
            return Ok(());
        }
        let client_key = record.client_key.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            forge_index_in(&txn, &names, &client_key)?;
            txn.commit().map_err(io)?;
            Ok(())
        })
        .await
    }

    async fn client_keys_for_site(&self, base_url: &BaseUrl) -> Result<Vec<ClientKey>, StoreError> {
        let base_url = base_url.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let sites = txn.open_table(SITE_INSTALLS).map_err(io)?;
            let mut entries = Vec::new();
            for entry in sites.range((base_url.as_str(), "")..).map_err(io)? {
                let (key, seq) = entry.map_err(io)?;
                let (site, client_key) = key.value();
                if site != base_url {
                    break;
                }
                let client_key = ClientKey::parse(client_key).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "the site index of {base_url} holds an invalid clientKey"
                    ))
                })?;
                entries.push((seq.value(), client_key));
            }
            entries.sort();
            Ok(entries.into_iter().map(|(_, key)| key).collect())
        })
        .await
    }

    async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(INSTALLATIONS).map_err(io)?;
            let mut keys = Vec::new();
            for entry in table.iter().map_err(io)? {
                let (key, _) = entry.map_err(io)?;
                keys.push(ClientKey::parse(key.value()).map_err(|_| {
                    StoreError::Corrupt("the installations table holds an invalid clientKey".into())
                })?);
            }
            Ok(keys)
        })
        .await
    }

    async fn scan_installations(&self, cursor: ScanCursor) -> Result<InstallationPage, StoreError> {
        let after = match cursor.0 {
            ScanPosition::Start => None,
            ScanPosition::After(key) => Some(key),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "a listing cursor of another store: {other:?}"
                )))
            }
        };
        let sealer = self.sealer.clone();
        self.blocking(move |db| {
            use std::ops::Bound;
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(INSTALLATIONS).map_err(io)?;
            let from = match &after {
                Some(key) => Bound::Excluded(key.as_str()),
                None => Bound::Unbounded,
            };
            let mut installations = Vec::with_capacity(PAGE_SIZE);
            let mut last = None;
            for entry in table
                .range::<&str>((from, Bound::Unbounded))
                .map_err(io)?
                .take(PAGE_SIZE)
            {
                let (key, raw) = entry.map_err(io)?;
                let key = key.value();
                last = Some(key.to_owned());
                let client_key = ClientKey::parse(key).map_err(|_| {
                    StoreError::Corrupt("the installations table holds an invalid clientKey".into())
                })?;
                let record = decode(&client_key, raw.value(), &sealer);
                installations.push(Listed { client_key, record });
            }
            let next = (installations.len() == PAGE_SIZE)
                .then(|| last.map(|key| ScanCursor(ScanPosition::After(key))))
                .flatten();
            Ok(InstallationPage {
                installations,
                next,
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            db.begin_read().map_err(io)?;
            Ok(())
        })
        .await
    }

    async fn remember_install_key(&self, url: &str, entry: &str) -> Result<(), StoreError> {
        let (url, entry) = (url.to_owned(), entry.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            txn.open_table(INSTALL_KEYS)
                .map_err(io)?
                .insert(url.as_str(), entry.as_str())
                .map_err(io)?;
            txn.commit().map_err(io)
        })
        .await
    }

    async fn forget_install_key(&self, url: &str) -> Result<(), StoreError> {
        let url = url.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            txn.open_table(INSTALL_KEYS)
                .map_err(io)?
                .remove(url.as_str())
                .map_err(io)?;
            txn.commit().map_err(io)
        })
        .await
    }

    async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(INSTALL_KEYS).map_err(io)?;
            let mut keys = Vec::new();
            for entry in table.iter().map_err(io)? {
                let (url, pem) = entry.map_err(io)?;
                keys.push((url.value().to_owned(), pem.value().to_owned()));
            }
            Ok(keys)
        })
        .await
    }

    async fn keep_forge_token(
        &self,
        installation: &InstallationId,
        token: &ForgeAppToken,
    ) -> Result<bool, StoreError> {
        let key = installation.to_string();
        let stored = forge_token::encode(installation, token, &self.sealer);
        let (expires_at, digest) = (token.expires_at, hex::encode(token.digest()));
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(io)?;
            {
                let mut table = txn.open_table(FORGE_TOKENS).map_err(io)?;
                let kept = table.get(key.as_str()).map_err(io)?.map(|v| {
                    serde_json::from_str::<serde_json::Value>(v.value()).unwrap_or_default()
                });
                let newer_or_same = kept.is_some_and(|kept| {
                    kept["exp"].as_i64().is_some_and(|exp| exp >= expires_at)
                        || kept["digest"].as_str() == Some(digest.as_str())
                });
                if newer_or_same {
                    return Ok(false);
                }
                table.insert(key.as_str(), stored.as_str()).map_err(io)?;
            }
            txn.commit().map_err(io)?;
            Ok(true)
        })
        .await
    }

    async fn forge_token(
        &self,
        installation: &InstallationId,
    ) -> Result<Option<ForgeAppToken>, StoreError> {
        let installation = *installation;
        let sealer = self.sealer.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(io)?;
            let table = match txn.open_table(FORGE_TOKENS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(io(e)),
            };
            let key = installation.to_string();
            match table.get(key.as_str()).map_err(io)? {
                Some(raw) => forge_token::decode(&installation, raw.value(), &sealer).map(Some),
                None => Ok(None),
            }
        })
        .await
    }
}
