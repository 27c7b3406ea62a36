//! Where installations live. [`InstallationStore`] is the one interface; [`redis::RedisStore`]
//! (shared by many `warden` instances) and [`embedded::EmbeddedStore`] (the default, one
//! process, persisted on disk) implement it with the same behaviour.
//!
//! The store knows nothing of the protocol: the lifecycle policy decides what a record becomes
//! and hands it over with the version it read, and the store writes it atomically only if
//! nobody else wrote in between (compare-and-set on `version`). Both stores keep a record in
//! the one stored form of [`record`], whose secrets [`sealing`] seals.

pub mod embedded;
pub mod forge_token;
mod record;
pub mod redis;
pub mod sealing;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use connect_protocol::domain::{BaseUrl, ClientKey, SharedSecret};
use connect_protocol::forge::InstallationId;

use forge_token::ForgeAppToken;

use crate::secrets::SecretVersion;
use sealing::AtRest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the installation store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the installation store holds a record it cannot read: {0}")]
    Corrupt(String),
    /// The primary wrote it, but fewer replicas than required confirmed it in time
    /// (docs/PROTOCOL.md §10): not acknowledged, though it may still exist and replicate.
    #[error("the write reached {confirmed} of the {required} Redis replicas required (WARDEN_REDIS_MIN_REPLICAS) in time; it may still exist on the primary: retry")]
    NotReplicated { confirmed: u64, required: u32 },
    /// A sealed shared secret does not open with `WARDEN_SECRET_KEYS` (docs/PROTOCOL.md §10):
    /// the installation is unusable until the right key is configured.
    #[error("cannot open the shared secrets of {0}")]
    Unsealable(String),
}

impl StoreError {
    pub fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallState {
    Installed,
    Uninstalled,
}

/// What an installation can be used for, from [`Installation::usability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usability {
    /// Installed and enabled: product requests are served, the app may call the site.
    Active,
    /// Disabled by the site's admin: product requests are refused; the app may still call the
    /// site (as the app or a user).
    Disabled,
    /// Uninstalled: product requests and impersonation are refused.
    Uninstalled,
    /// A site import replaced it with `successor`: its credentials are never used again.
    Superseded { successor: ClientKey },
}

/// Whether the site named by an install's `baseUrl` confirmed that install (docs/PROTOCOL.md
/// §7): the body's `baseUrl` is covered by no token, so an install for a new clientKey on a
/// site where other installations live retires nobody until the site answers a call signed
/// with the new installation's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteProof {
    /// The call to the site has not succeeded yet (still being tried).
    Pending,
    /// The site answered 2xx to a call signed with this installation's secret.
    Proven,
    /// The site answered 401, 403 or 404: it does not know this installation.
    Refused,
    /// Every attempt failed without such an answer.
    Unreachable,
    /// No other installation was on the site: nothing to prove.
    Skipped,
}

impl SiteProof {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteProof::Pending => "pending",
            SiteProof::Proven => "proven",
            SiteProof::Refused => "refused",
            SiteProof::Unreachable => "unreachable",
            SiteProof::Skipped => "skipped",
        }
    }

    /// Whether the site has not confirmed the install although others live there.
    pub fn is_unproven(self) -> bool {
        matches!(
            self,
            SiteProof::Pending | SiteProof::Refused | SiteProof::Unreachable
        )
    }
}

/// Everything `warden` knows of one installation (one host site and this app).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Installation {
    pub client_key: ClientKey,
    pub base_url: BaseUrl,
    #[serde(default)]
    pub display_url: Option<String>,
    pub product_type: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub oauth_client_id: Option<String>,
    #[serde(default)]
    pub installation_id: Option<String>,
    #[serde(default)]
    pub cloud_id: Option<String>,
    #[serde(default)]
    pub service_entitlement_number: Option<String>,
    #[serde(default)]
    pub entitlement_id: Option<String>,
    #[serde(default)]
    pub entitlement_number: Option<String>,
    #[serde(default)]
    pub server_version: Option<String>,
    #[serde(default)]
    pub plugins_version: Option<String>,
    pub state: InstallState,
    pub enabled: bool,
    /// Set when a site import replaced this installation with a new clientKey.
    #[serde(default)]
    pub superseded_by: Option<ClientKey>,
    /// The clientKeys this installation replaced through site imports.
    #[serde(default)]
    pub supersedes: Vec<ClientKey>,
    /// Whether the site confirmed the install (docs/PROTOCOL.md §7); `None`: recorded before
    /// site proofs existed, or with `WARDEN_SITE_PROOF=off`.
    #[serde(default)]
    pub site_proof: Option<SiteProof>,
    /// Whether the latest install was proven by Atlassian's RS256 signature.
    #[serde(default)]
    pub signed_install: bool,
    /// Sticky: Atlassian's signature proved an install of this clientKey at least once, even
    /// after the secret that came with it left the bounded history (see
    /// [`Installation::ever_signed`]).
    #[serde(default)]
    pub atlassian_installed: bool,
    /// `iat` of the newest lifecycle event signed by Atlassian (RS256), never ahead of the
    /// server clock when it was stored; older signed events are refused.
    pub last_event_iat: i64,
    /// The same for events signed with the tenant's shared secret (HS256), ordered among
    /// themselves only.
    #[serde(default)]
    pub last_tenant_event_iat: i64,
    pub installed_at: i64,
    pub updated_at: i64,
    /// Secrets, oldest first; the last one is current. Never empty. Not serialized with the
    /// record: only [`record`] writes them, sealed.
    #[serde(skip)]
    pub secrets: Vec<SecretVersion>,
    /// What Forge's lifecycle events said of this installation (docs/PROTOCOL.md §12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<ForgeBinding>,
    /// Bumped by every write; the compare-and-set token.
    pub version: u64,
    /// How the secrets were found in the store (set by a load).
    #[serde(skip)]
    pub at_rest: AtRest,
}

impl Installation {
    /// A freshly installed, enabled installation with one secret (current since `now`) and
    /// every optional attribute absent; version 0 (not stored yet).
    pub fn new(
        client_key: ClientKey,
        base_url: BaseUrl,
        product_type: impl Into<String>,
        secret: SharedSecret,
        signed: bool,
        now: i64,
    ) -> Self {
        Self {
            client_key,
            base_url,
            display_url: None,
            product_type: product_type.into(),
            description: None,
            oauth_client_id: None,
            installation_id: None,
            cloud_id: None,
            service_entitlement_number: None,
            entitlement_id: None,
            entitlement_number: None,
            server_version: None,
            plugins_version: None,
            state: InstallState::Installed,
            enabled: true,
            superseded_by: None,
            supersedes: Vec::new(),
            site_proof: None,
            signed_install: signed,
            atlassian_installed: signed,
            last_event_iat: 0,
            last_tenant_event_iat: 0,
            installed_at: now,
            updated_at: now,
            secrets: vec![SecretVersion {
                secret,
                since: now,
                signed,
            }],
            forge: None,
            version: 0,
            at_rest: AtRest::Unread,
        }
    }

    /// What the installation can be used for now: the one place that reads `state`, `enabled`
    /// and `superseded_by` together.
    pub fn usability(&self) -> Usability {
        match (&self.superseded_by, self.state, self.enabled) {
            (Some(successor), _, _) => Usability::Superseded {
                successor: successor.clone(),
            },
            (None, InstallState::Uninstalled, _) => Usability::Uninstalled,
            (None, InstallState::Installed, false) => Usability::Disabled,
            (None, InstallState::Installed, true) => Usability::Active,
        }
    }

    /// Whether product requests for this installation may be served.
    pub fn is_active(&self) -> bool {
        self.usability() == Usability::Active
    }
}

/// The Forge installation bound to a Connect installation by Forge's lifecycle events
/// (`POST /forge/events`, docs/PROTOCOL.md §12).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeBinding {
    /// The bound installation (ARI form); the record's `installation_id` follows it.
    pub installation_id: String,
    /// The app version of the latest `installed`/`upgraded` event's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    /// When Forge's `preUninstall` trigger arrived for the bound installation (Unix seconds);
    /// recorded only: requests are still served (see docs/PROTOCOL.md §12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninstalling_since: Option<i64>,
    /// installationIds this record was bound to before (newest last, at most 10): an event
    /// naming one never binds it again, so a late retry cannot undo a reinstall.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
}

/// A Forge identity a Connect installation carries (from its `installed` body), under which
/// the identity index finds its clientKey in O(1) (docs/PROTOCOL.md §12). The index only
/// names candidates: a reader re-checks the record it loads, so an entry left behind by a
/// reinstall or a site import never links the wrong installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgeIdentity {
    /// `installationId` (stored in its ARI form, however the body spelled it).
    Installation(InstallationId),
    /// `cloudId`: shared by every product (Jira, Confluence) on one site.
    Cloud(String),
}

impl ForgeIdentity {
    /// The identities `record` is indexed under: its `installationId` (when it parses) and
    /// its `cloudId`.
    pub fn of(record: &Installation) -> Vec<ForgeIdentity> {
        let installation = record
            .installation_id
            .as_deref()
            .and_then(|id| InstallationId::parse(id).ok())
            .map(ForgeIdentity::Installation);
        let cloud = record
            .cloud_id
            .as_deref()
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(|id| ForgeIdentity::Cloud(id.to_owned()));
        installation.into_iter().chain(cloud).collect()
    }

    /// Whether `record` still carries this identity (what a reader re-checks).
    pub fn names(&self, record: &Installation) -> bool {
        ForgeIdentity::of(record).contains(self)
    }

    /// The identity as the stores key it: `installation:<ari>` or `cloud:<cloudId>`.
    pub fn index_name(&self) -> String {
        match self {
            ForgeIdentity::Installation(id) => format!("installation:{id}"),
            ForgeIdentity::Cloud(id) => format!("cloud:{id}"),
        }
    }
}

/// A lifecycle token already accepted: its digest, the digest of the body it came with, and
/// when it expires (after that it is refused anyway, so it need not be remembered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenToken {
    pub token_digest: [u8; 32],
    pub body_digest: [u8; 32],
    pub expires_at: i64,
}

/// One atomic write: store `record` (with `version = expected_version + 1`) and remember
/// `token`, only if the stored version is still `expected_version` (0: no record yet).
#[derive(Debug)]
pub struct Commit<'a> {
    pub record: &'a Installation,
    pub expected_version: u64,
    pub token: Option<SeenToken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Someone wrote first; re-read and decide again.
    Conflict,
}

/// Where a listing of every installation ([`InstallationStore::scan_installations`]) goes on
/// from; [`ScanCursor::default`] starts one. Opaque: only the store that handed it out reads
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanCursor(pub(crate) ScanPosition);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum ScanPosition {
    #[default]
    Start,
    /// A Redis `SCAN` cursor.
    Redis(u64),
    /// A Redis Cluster: one slot served by each primary (fixed when the listing starts), the
    /// primary being scanned and its `SCAN` cursor.
    Cluster {
        primaries: Vec<u16>,
        index: usize,
        cursor: u64,
    },
    /// The embedded store: the last clientKey listed.
    After(String),
}

/// One installation of a listing: its record, or why it cannot be read (a corrupt or
/// unsealable record does not stop the listing).
#[derive(Debug)]
pub struct Listed {
    pub client_key: ClientKey,
    pub record: Result<Installation, StoreError>,
}

/// One page of a listing; `next` is `None` once every installation was listed.
#[derive(Debug, Default)]
pub struct InstallationPage {
    pub installations: Vec<Listed>,
    pub next: Option<ScanCursor>,
}

/// The site index entry written together with a commit
/// ([`InstallationStore::commit_on_site`]): the committed clientKey on the site at `base_url`.
#[derive(Debug, Clone, Copy)]
pub struct SiteEntry<'a> {
    pub base_url: &'a BaseUrl,
    /// What the record assumes about other clientKeys on the site (its site proof,
    /// docs/PROTOCOL.md §7): `Some(others)` writes the record only if the site, once indexed,
    /// agrees; `None` writes it whatever the site holds.
    pub assumed_others: Option<bool>,
}

/// What [`InstallationStore::commit_on_site`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteCommitOutcome {
    /// Indexed and written.
    Committed,
    /// Indexed; someone wrote the record first: re-read and decide again.
    Conflict,
    /// Indexed, nothing else written: other clientKeys are (`others`) or are not on the site,
    /// unlike the assumption. Plan again with `others` and commit again.
    SiteDiffers { others: bool },
}

#[async_trait]
pub trait InstallationStore: Send + Sync + 'static {
    async fn load(&self, client_key: &ClientKey) -> Result<Option<Installation>, StoreError>;

    /// The body digest a still-valid lifecycle token was accepted with, if it was.
    async fn seen_token(
        &self,
        client_key: &ClientKey,
        token_digest: &[u8; 32],
    ) -> Result<Option<[u8; 32]>, StoreError>;

    /// Commits and site indexing are acknowledged only once durable as configured (Redis:
    /// replicated to `WARDEN_REDIS_MIN_REPLICAS` replicas, else
    /// [`StoreError::NotReplicated`]).
    async fn commit(&self, commit: Commit<'_>) -> Result<CommitOutcome, StoreError>;

    /// A callback retried with a token already accepted (`token`): makes sure what the first
    /// attempt wrote for `client_key` is as durable as a commit before the retry is
    /// acknowledged (docs/PROTOCOL.md §10). A store that acknowledges every write durably has
    /// nothing to do.
    async fn reconfirm(&self, client_key: &ClientKey, token: &SeenToken) -> Result<(), StoreError> {
        let _ = (client_key, token);
        Ok(())
    }

    /// Records that `client_key` was installed on the site at `base_url`. Idempotent: the
    /// first call fixes its position in the site's order.
    async fn index_site(
        &self,
        base_url: &BaseUrl,
        client_key: &ClientKey,
    ) -> Result<(), StoreError>;

    /// Every clientKey ever installed on the site at `base_url`, in the order they were first
    /// indexed (oldest first); every reader sees the same order.
    async fn client_keys_for_site(&self, base_url: &BaseUrl) -> Result<Vec<ClientKey>, StoreError>;

    /// The record of `client_key` and, if `token_digest` is given, the body digest that token
    /// was accepted with ([`seen_token`](Self::seen_token)), read together: what a lifecycle
    /// callback reads (Redis: one round trip).
    async fn load_with_token(
        &self,
        client_key: &ClientKey,
        token_digest: Option<&[u8; 32]>,
    ) -> Result<(Option<Installation>, Option<[u8; 32]>), StoreError> {
        let record = self.load(client_key).await?;
        let seen = match token_digest {
            Some(digest) => self.seen_token(client_key, digest).await?,
            None => None,
        };
        Ok((record, seen))
    }

    /// [`index_site`](Self::index_site) of the committed clientKey on `site`, then, unless the
    /// site's clientKeys disagree with `site.assumed_others`, [`commit`](Self::commit): the
    /// write of an `installed` (Redis: one script, one round trip). The index is written even
    /// when the record is not, so that of two installs racing on one site at least the later
    /// one sees the other (docs/PROTOCOL.md §7).
    async fn commit_on_site(
        &self,
        commit: Commit<'_>,
        site: SiteEntry<'_>,
    ) -> Result<SiteCommitOutcome, StoreError> {
        commit_on_site_in_steps(self, commit, site).await
    }

    /// Every clientKey ever committed with `identity` ([`ForgeIdentity::of`]), in no
    /// particular order: candidates only, a record may have moved on since (a reinstall with
    /// a new `installationId`, a site import). Every commit of a record indexes its
    /// identities in the same atomic write (a Redis Cluster: just before it).
    async fn client_keys_for_forge(
        &self,
        identity: &ForgeIdentity,
    ) -> Result<Vec<ClientKey>, StoreError>;

    /// Indexes `record` under its identities without writing it (idempotent): the backfill
    /// of records committed before the index existed.
    async fn index_forge(&self, record: &Installation) -> Result<(), StoreError>;

    /// Every installation's clientKey (Redis: `SCAN`, never `KEYS`).
    async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError>;

    /// One page of every installation, from `cursor` on (a few hundred to a thousand records;
    /// Redis: one `SCAN` step per page, each primary of a Cluster in turn; embedded: the next
    /// records in clientKey order), so a listing of any size is read in bounded memory. Every
    /// installation present during the whole listing is listed; on Redis one may be listed
    /// twice (`SCAN` may return a key twice). The default lists everything in one page.
    async fn scan_installations(&self, cursor: ScanCursor) -> Result<InstallationPage, StoreError> {
        if cursor != ScanCursor::default() {
            return Ok(InstallationPage::default());
        }
        let mut installations = Vec::new();
        for client_key in self.list_client_keys().await? {
            let record = match self.load(&client_key).await {
                Ok(Some(record)) => Ok(record),
                Ok(None) => continue,
                Err(StoreError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                Err(e) => Err(e),
            };
            installations.push(Listed { client_key, record });
        }
        Ok(InstallationPage {
            installations,
            next: None,
        })
    }

    /// Answers when the store is reachable; `/readyz` uses it.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Remembers an install-signing public key fetched from `url`; `entry` is opaque to the
    /// store (`install_keys` encodes the key and when it was fetched).
    async fn remember_install_key(&self, url: &str, entry: &str) -> Result<(), StoreError>;

    /// Forgets the key remembered for `url` (the key server no longer knows it).
    async fn forget_install_key(&self, url: &str) -> Result<(), StoreError>;

    /// Every remembered install key as `(url, entry)`.
    async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Keeps `token` as the Forge app (system) token of `installation`, unless the token kept
    /// is the same one or expires as late or later: compare-and-set on the expiry, so an older
    /// token never replaces a newer one (docs/PROTOCOL.md §12). Returns whether it was written.
    async fn keep_forge_token(
        &self,
        installation: &InstallationId,
        token: &ForgeAppToken,
    ) -> Result<bool, StoreError>;

    /// The Forge app token kept for `installation`, expired or not (Redis drops it at its
    /// expiry by itself).
    async fn forge_token(
        &self,
        installation: &InstallationId,
    ) -> Result<Option<ForgeAppToken>, StoreError>;
}

pub type SharedStore = Arc<dyn InstallationStore>;

/// [`InstallationStore::commit_on_site`] as separate operations (index, read the site, commit):
/// for a store that cannot do them in one step (a Redis Cluster, where the site index lives in
/// another slot than the tenant's keys).
pub(crate) async fn commit_on_site_in_steps<S: InstallationStore + ?Sized>(
    store: &S,
    commit: Commit<'_>,
    site: SiteEntry<'_>,
) -> Result<SiteCommitOutcome, StoreError> {
    let client_key = &commit.record.client_key;
    store.index_site(site.base_url, client_key).await?;
    if let Some(assumed) = site.assumed_others {
        let on_site = store.client_keys_for_site(site.base_url).await?;
        let others = on_site.iter().any(|k| k != client_key);
        if others != assumed {
            return Ok(SiteCommitOutcome::SiteDiffers { others });
        }
    }
    Ok(match store.commit(commit).await? {
        CommitOutcome::Committed => SiteCommitOutcome::Committed,
        CommitOutcome::Conflict => SiteCommitOutcome::Conflict,
    })
}

/// Test doubles shared by the unit tests of the modules above the store.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;

    /// Delegates to `inner`, counting `load`s, and can answer one `load` with "no record"
    /// (the view of a reader that read just before a concurrent write committed).
    pub(crate) struct LoadSpy {
        inner: SharedStore,
        loads: AtomicU64,
        commits: AtomicU64,
        stale_once: AtomicBool,
    }

    impl LoadSpy {
        pub(crate) fn new(inner: SharedStore) -> Arc<Self> {
            Arc::new(Self {
                inner,
                loads: AtomicU64::new(0),
                commits: AtomicU64::new(0),
                stale_once: AtomicBool::new(false),
            })
        }

        pub(crate) fn loads(&self) -> u64 {
            self.loads.load(Ordering::SeqCst)
        }

        /// Commits attempted so far.
        pub(crate) fn commits(&self) -> u64 {
            self.commits.load(Ordering::SeqCst)
        }

        /// The next `load` answers "no record" whatever is stored.
        pub(crate) fn answer_none_once(&self) {
            self.stale_once.store(true, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl InstallationStore for LoadSpy {
        async fn load(&self, client_key: &ClientKey) -> Result<Option<Installation>, StoreError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if self.stale_once.swap(false, Ordering::SeqCst) {
                return Ok(None);
            }
            self.inner.load(client_key).await
        }
        async fn seen_token(
            &self,
            c: &ClientKey,
            d: &[u8; 32],
        ) -> Result<Option<[u8; 32]>, StoreError> {
            self.inner.seen_token(c, d).await
        }
        async fn commit(&self, commit: Commit<'_>) -> Result<CommitOutcome, StoreError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.inner.commit(commit).await
        }
        async fn load_with_token(
            &self,
            c: &ClientKey,
            d: Option<&[u8; 32]>,
        ) -> Result<(Option<Installation>, Option<[u8; 32]>), StoreError> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if self.stale_once.swap(false, Ordering::SeqCst) {
                let seen = match d {
                    Some(d) => self.inner.seen_token(c, d).await?,
                    None => None,
                };
                return Ok((None, seen));
            }
            self.inner.load_with_token(c, d).await
        }
        async fn commit_on_site(
            &self,
            commit: Commit<'_>,
            site: SiteEntry<'_>,
        ) -> Result<SiteCommitOutcome, StoreError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.inner.commit_on_site(commit, site).await
        }
        async fn reconfirm(&self, c: &ClientKey, t: &SeenToken) -> Result<(), StoreError> {
            self.inner.reconfirm(c, t).await
        }
        async fn index_site(&self, b: &BaseUrl, c: &ClientKey) -> Result<(), StoreError> {
            self.inner.index_site(b, c).await
        }
        async fn client_keys_for_site(&self, b: &BaseUrl) -> Result<Vec<ClientKey>, StoreError> {
            self.inner.client_keys_for_site(b).await
        }
        async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
            self.inner.list_client_keys().await
        }
        async fn client_keys_for_forge(
            &self,
            identity: &ForgeIdentity,
        ) -> Result<Vec<ClientKey>, StoreError> {
            self.inner.client_keys_for_forge(identity).await
        }
        async fn index_forge(&self, record: &Installation) -> Result<(), StoreError> {
            self.inner.index_forge(record).await
        }
        async fn remember_install_key(&self, url: &str, pem: &str) -> Result<(), StoreError> {
            self.inner.remember_install_key(url, pem).await
        }
        async fn forget_install_key(&self, url: &str) -> Result<(), StoreError> {
            self.inner.forget_install_key(url).await
        }
        async fn install_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
            self.inner.install_keys().await
        }
        async fn keep_forge_token(
            &self,
            i: &InstallationId,
            t: &ForgeAppToken,
        ) -> Result<bool, StoreError> {
            self.inner.keep_forge_token(i, t).await
        }
        async fn forge_token(
            &self,
            i: &InstallationId,
        ) -> Result<Option<ForgeAppToken>, StoreError> {
            self.inner.forge_token(i).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }
}
