//! The operators' view of the installation store (`warden tenants`): every installation
//! listed page by page, one found by any of its ids, counts. It only reads, and never prints a
//! shared secret: a secret is shown as its [fingerprint](crate::secrets::SecretVersion::fingerprint).

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};

use serde_json::json;

use crate::store::{
    Installation, InstallationStore, Listed, ScanCursor, SiteProof, StoreError, Usability,
};
use connect_protocol::domain::{BaseUrl, ClientKey};

/// The states `--state` selects, as [`Installation::usability`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Active,
    Uninstalled,
    Disabled,
    Superseded,
}

impl StateFilter {
    fn admits(self, usability: &Usability) -> bool {
        matches!(
            (self, usability),
            (StateFilter::Active, Usability::Active)
                | (StateFilter::Uninstalled, Usability::Uninstalled)
                | (StateFilter::Disabled, Usability::Disabled)
                | (StateFilter::Superseded, Usability::Superseded { .. })
        )
    }
}

/// The name of a state in every output.
pub fn state_name(usability: &Usability) -> &'static str {
    match usability {
        Usability::Active => "active",
        Usability::Disabled => "disabled",
        Usability::Uninstalled => "uninstalled",
        Usability::Superseded { .. } => "superseded",
    }
}

/// Which installations `warden tenants list` prints.
#[derive(Debug, Default)]
pub struct ListFilter {
    pub state: Option<StateFilter>,
    /// Matched against the whole `baseUrl`; `*` also matches `/`.
    pub site: Option<glob::Pattern>,
}

impl ListFilter {
    pub fn admits(&self, installation: &Installation) -> bool {
        self.state
            .is_none_or(|state| state.admits(&installation.usability()))
            && self
                .site
                .as_ref()
                .is_none_or(|site| site.matches(installation.base_url.as_str()))
    }
}

/// Why a command could not finish.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Unix seconds as RFC 3339 in UTC (the number itself if out of range).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Calls `each` with every installation of the store, one page in memory at a time.
pub async fn for_each<F>(store: &dyn InstallationStore, mut each: F) -> Result<(), InventoryError>
where
    F: FnMut(Listed) -> Result<(), InventoryError>,
{
    let mut cursor = ScanCursor::default();
    loop {
        let page = store.scan_installations(cursor).await?;
        for listed in page.installations {
            each(listed)?;
        }
        match page.next {
            Some(next) => cursor = next,
            None => return Ok(()),
        }
    }
}

/// The header line of the text listing.
pub const LIST_HEADER: &str = "clientKey\tbaseUrl\tstate\tproduct\tinstalled\tupdated";

/// `warden tenants list`: one line per installation `filter` admits, written as it is read
/// (tab-separated text after [`LIST_HEADER`], or one JSON object per line). Records that
/// cannot be read are reported on `errors`; returns how many there were.
pub async fn list(
    store: &dyn InstallationStore,
    filter: &ListFilter,
    as_json: bool,
    out: &mut dyn Write,
    errors: &mut dyn Write,
) -> Result<u64, InventoryError> {
    if !as_json {
        writeln!(out, "{LIST_HEADER}")?;
    }
    let mut unreadable = 0;
    for_each(store, |listed| {
        let installation = match listed.record {
            Ok(installation) => installation,
            Err(e) => {
                unreadable += 1;
                writeln!(errors, "{}: cannot read: {e}", listed.client_key)?;
                return Ok(());
            }
        };
        if !filter.admits(&installation) {
            return Ok(());
        }
        let state = state_name(&installation.usability());
        if as_json {
            let line = json!({
                "clientKey": installation.client_key.as_str(),
                "baseUrl": installation.base_url.as_str(),
                "state": state,
                "productType": installation.product_type,
                "installedAt": installation.installed_at,
                "updatedAt": installation.updated_at,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "{}\t{}\t{state}\t{}\t{}\t{}",
                installation.client_key,
                installation.base_url,
                printable(&installation.product_type),
                rfc3339(installation.installed_at),
                rfc3339(installation.updated_at),
            )?;
        }
        Ok(())
    })
    .await?;
    Ok(unreadable)
}

/// Which id of an installation a `warden tenants show` argument matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    ClientKey,
    BaseUrl,
    CloudId,
    InstallationId,
}

impl MatchedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            MatchedBy::ClientKey => "clientKey",
            MatchedBy::BaseUrl => "baseUrl",
            MatchedBy::CloudId => "cloudId",
            MatchedBy::InstallationId => "installationId",
        }
    }
}

/// The installations `id` names and by which of their ids, tried in this order: a clientKey
/// (one read), a `baseUrl` (the site index: every installation ever on that site, oldest
/// first), else a `cloudId` or `installationId` (a scan of the whole store: it keeps no index
/// of those).
pub async fn find(
    store: &dyn InstallationStore,
    id: &str,
) -> Result<Vec<(MatchedBy, Installation)>, InventoryError> {
    if let Ok(client_key) = ClientKey::parse(id) {
        if let Some(installation) = store.load(&client_key).await? {
            return Ok(vec![(MatchedBy::ClientKey, installation)]);
        }
    }
    let mut found = Vec::new();
    if let Ok(base_url) = BaseUrl::parse(id) {
        for client_key in store.client_keys_for_site(&base_url).await? {
            if let Some(installation) = store.load(&client_key).await? {
                found.push((MatchedBy::BaseUrl, installation));
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
    }
    for_each(store, |listed| {
        // `SCAN` may list a record twice.
        let listed_before = found
            .iter()
            .any(|(_, i): &(MatchedBy, Installation)| i.client_key == listed.client_key);
        if let (Ok(installation), false) = (listed.record, listed_before) {
            if installation.installation_id.as_deref() == Some(id) {
                found.push((MatchedBy::InstallationId, installation));
            } else if installation.cloud_id.as_deref() == Some(id) {
                found.push((MatchedBy::CloudId, installation));
            }
        }
        Ok(())
    })
    .await?;
    Ok(found)
}

fn site_proof_name(proof: Option<SiteProof>) -> &'static str {
    proof.map_or("none recorded", SiteProof::as_str)
}

fn at_rest_name(installation: &Installation) -> String {
    use crate::store::sealing::AtRest;
    match &installation.at_rest {
        AtRest::Plaintext => "plaintext".to_owned(),
        AtRest::Sealed(ids) => format!(
            "sealed under key {}",
            ids.iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AtRest::Unread => "unknown".to_owned(),
    }
}

/// One installation as `warden tenants show --json` prints it.
pub fn show_json(installation: &Installation) -> serde_json::Value {
    let current = installation.secrets.len().saturating_sub(1);
    let secrets: Vec<_> = installation
        .secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "fingerprint": s.fingerprint(),
                "since": s.since,
                "signed": s.signed,
                "current": i == current,
            })
        })
        .collect();
    json!({
        "clientKey": installation.client_key.as_str(),
        "baseUrl": installation.base_url.as_str(),
        "displayUrl": installation.display_url,
        "state": state_name(&installation.usability()),
        "productType": installation.product_type,
        "description": installation.description,
        "installationId": installation.installation_id,
        "cloudId": installation.cloud_id,
        "oauthClientId": installation.oauth_client_id,
        "serverVersion": installation.server_version,
        "pluginsVersion": installation.plugins_version,
        "enabled": installation.enabled,
        "supersededBy": installation.superseded_by.as_ref().map(ClientKey::as_str),
        "supersedes": installation.supersedes.iter().map(ClientKey::as_str).collect::<Vec<_>>(),
        "siteProof": installation.site_proof.map(SiteProof::as_str),
        "signedInstall": installation.signed_install,
        "everSignedByAtlassian": installation.ever_signed(),
        "installedAt": installation.installed_at,
        "updatedAt": installation.updated_at,
        "lastEventIat": installation.last_event_iat,
        "lastTenantEventIat": installation.last_tenant_event_iat,
        "version": installation.version,
        "secretsAtRest": at_rest_name(installation),
        "secrets": secrets,
    })
}

/// A value a site sent, for an operator's terminal: control characters (a tab or newline that
/// would forge a row or a field, a terminal escape) are shown escaped, the rest as it is.
fn printable(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return value.into();
    }
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// One installation as `warden tenants show` prints it.
pub fn show_text(installation: &Installation, out: &mut dyn Write) -> io::Result<()> {
    let opt = |v: &Option<String>| {
        v.as_deref()
            .map_or_else(|| "-".to_owned(), |v| printable(v).into_owned())
    };
    let state = match installation.usability() {
        Usability::Superseded { successor } => format!("superseded (by {successor})"),
        other => state_name(&other).to_owned(),
    };
    let supersedes = if installation.supersedes.is_empty() {
        "-".to_owned()
    } else {
        installation
            .supersedes
            .iter()
            .map(ClientKey::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let time = |t: i64| format!("{} ({t})", rfc3339(t));
    writeln!(out, "clientKey:        {}", installation.client_key)?;
    writeln!(out, "baseUrl:          {}", installation.base_url)?;
    writeln!(out, "displayUrl:       {}", opt(&installation.display_url))?;
    writeln!(out, "state:            {state}")?;
    writeln!(
        out,
        "productType:      {}",
        printable(&installation.product_type)
    )?;
    writeln!(out, "description:      {}", opt(&installation.description))?;
    writeln!(
        out,
        "installationId:   {}",
        opt(&installation.installation_id)
    )?;
    writeln!(out, "cloudId:          {}", opt(&installation.cloud_id))?;
    writeln!(
        out,
        "oauthClientId:    {}",
        opt(&installation.oauth_client_id)
    )?;
    writeln!(
        out,
        "serverVersion:    {}",
        opt(&installation.server_version)
    )?;
    writeln!(
        out,
        "pluginsVersion:   {}",
        opt(&installation.plugins_version)
    )?;
    writeln!(
        out,
        "supersededBy:     {}",
        installation
            .superseded_by
            .as_ref()
            .map_or("-", ClientKey::as_str)
    )?;
    writeln!(out, "supersedes:       {supersedes}")?;
    writeln!(
        out,
        "siteProof:        {}",
        site_proof_name(installation.site_proof)
    )?;
    writeln!(
        out,
        "signed install:   latest {}, ever {}",
        yes_no(installation.signed_install),
        yes_no(installation.ever_signed())
    )?;
    writeln!(out, "installed:        {}", time(installation.installed_at))?;
    writeln!(out, "updated:          {}", time(installation.updated_at))?;
    writeln!(
        out,
        "last event iat:   signed {}, tenant {}",
        installation.last_event_iat, installation.last_tenant_event_iat
    )?;
    writeln!(out, "version:          {}", installation.version)?;
    writeln!(out, "secrets at rest:  {}", at_rest_name(installation))?;
    writeln!(
        out,
        "secret history, oldest first (fingerprint: first 12 hex digits of the secret's SHA-256):"
    )?;
    let current = installation.secrets.len().saturating_sub(1);
    for (i, secret) in installation.secrets.iter().enumerate() {
        writeln!(
            out,
            "  {}  since {}  {}{}",
            secret.fingerprint(),
            rfc3339(secret.since),
            if secret.signed { "signed" } else { "unsigned" },
            if i == current { "  current" } else { "" }
        )?;
    }
    Ok(())
}

/// What `warden tenants stats` counts.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub installations: u64,
    pub by_state: BTreeMap<&'static str, u64>,
    pub by_product: BTreeMap<String, u64>,
    /// Distinct `baseUrl`s.
    pub sites: u64,
    /// Records whose every secret is sealed / with at least one in plaintext.
    pub sealed: u64,
    pub plaintext: u64,
    /// Records that could not be read (corrupt, or sealed under a key not configured).
    pub unreadable: u64,
    /// Number of records by the length of their secret history.
    pub history_lengths: BTreeMap<usize, u64>,
    pub by_site_proof: BTreeMap<&'static str, u64>,
}

/// `warden tenants stats`: one pass over the store. A record `SCAN` returns twice is counted
/// once (the clientKeys and `baseUrl`s seen are kept, not the records).
pub async fn stats(store: &dyn InstallationStore) -> Result<Stats, InventoryError> {
    use crate::store::sealing::AtRest;
    let mut stats = Stats::default();
    let mut seen: HashSet<ClientKey> = HashSet::new();
    let mut sites: HashSet<BaseUrl> = HashSet::new();
    for_each(store, |listed| {
        if !seen.insert(listed.client_key) {
            return Ok(());
        }
        let Ok(installation) = listed.record else {
            stats.unreadable += 1;
            return Ok(());
        };
        stats.installations += 1;
        *stats
            .by_state
            .entry(state_name(&installation.usability()))
            .or_default() += 1;
        *stats
            .by_product
            .entry(installation.product_type.clone())
            .or_default() += 1;
        match installation.at_rest {
            AtRest::Plaintext => stats.plaintext += 1,
            AtRest::Sealed(_) | AtRest::Unread => stats.sealed += 1,
        }
        *stats
            .history_lengths
            .entry(installation.secrets.len())
            .or_default() += 1;
        *stats
            .by_site_proof
            .entry(site_proof_name(installation.site_proof))
            .or_default() += 1;
        sites.insert(installation.base_url);
        Ok(())
    })
    .await?;
    stats.sites = sites.len() as u64;
    Ok(stats)
}

/// [`Stats`] as `warden tenants stats` prints them.
pub fn stats_text(stats: &Stats, out: &mut dyn Write) -> io::Result<()> {
    fn counts<K: std::fmt::Display>(
        out: &mut dyn Write,
        title: &str,
        counts: &BTreeMap<K, u64>,
    ) -> io::Result<()> {
        writeln!(out, "{title}:")?;
        for (name, count) in counts {
            writeln!(out, "  {}: {count}", printable(&name.to_string()))?;
        }
        Ok(())
    }
    writeln!(out, "installations: {}", stats.installations)?;
    writeln!(out, "unreadable: {}", stats.unreadable)?;
    writeln!(out, "sites: {}", stats.sites)?;
    counts(out, "by state", &stats.by_state)?;
    counts(out, "by product", &stats.by_product)?;
    writeln!(out, "secrets at rest:")?;
    writeln!(out, "  sealed: {}", stats.sealed)?;
    writeln!(out, "  plaintext: {}", stats.plaintext)?;
    counts(out, "secret history length", &stats.history_lengths)?;
    counts(out, "site proof", &stats.by_site_proof)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use connect_protocol::domain::SharedSecret;

    fn installation(base_url: &str) -> Installation {
        Installation::new(
            ClientKey::parse("ck-1").unwrap(),
            BaseUrl::parse(base_url).unwrap(),
            "jira",
            SharedSecret::parse("s").unwrap(),
            true,
            0,
        )
    }

    #[test]
    fn filters_select_by_state_and_site_glob() {
        let mut i = installation("https://acme.atlassian.net/wiki");
        let site = |p: &str| ListFilter {
            state: None,
            site: Some(glob::Pattern::new(p).unwrap()),
        };
        assert!(site("https://acme.*").admits(&i));
        assert!(site("*acme.atlassian.net*").admits(&i));
        assert!(!site("https://other.*").admits(&i));
        let state = |s| ListFilter {
            state: Some(s),
            site: None,
        };
        assert!(state(StateFilter::Active).admits(&i));
        i.enabled = false;
        assert!(state(StateFilter::Disabled).admits(&i));
        assert!(!state(StateFilter::Active).admits(&i));
        i.superseded_by = Some(ClientKey::parse("ck-2").unwrap());
        assert!(state(StateFilter::Superseded).admits(&i));
        assert!(!state(StateFilter::Disabled).admits(&i));
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn values_a_site_sent_cannot_forge_rows_or_drive_the_terminal() {
        assert_eq!(printable("jira"), "jira");
        assert_eq!(
            printable("jira\tx\nfake-row\u{1b}[31m"),
            "jira\\tx\\nfake-row\\u{1b}[31m"
        );
    }
}
