//! The one stored form of an [`Installation`], shared by both stores: every attribute but the
//! secrets as JSON values by field name (`version` included), and the secret history as JSON
//! entries, oldest first, sealed by the [`Sealer`] (docs/PROTOCOL.md §10). The embedded store
//! keeps one JSON object with the entries under `secrets`; Redis keeps the compact form of
//! [`to_compact`] (short names, one value), and reads the attributes as hash fields and the
//! entries as a list in records written before it.

use serde_json::{Map, Value};

use connect_protocol::domain::ClientKey;

use super::sealing::Sealer;
use super::{Installation, StoreError};

pub(crate) struct StoredRecord {
    pub fields: Map<String, Value>,
    pub secrets: Vec<Value>,
}

/// `record` as it is written with `version`: its secrets sealed under the newest key (so a
/// record read in plaintext or under an older key is upgraded by any write).
pub(crate) fn encode(
    record: &Installation,
    version: u64,
    sealer: &Sealer,
) -> Result<StoredRecord, StoreError> {
    let client_key = &record.client_key;
    if record.secrets.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "refusing to store installation {client_key} without a shared secret"
        )));
    }
    let Ok(Value::Object(mut fields)) = serde_json::to_value(record) else {
        return Err(StoreError::Corrupt(format!(
            "cannot serialize installation {client_key}"
        )));
    };
    fields.insert("version".into(), Value::from(version));
    Ok(StoredRecord {
        fields,
        secrets: sealer.seal_history(client_key, &record.secrets),
    })
}

/// Rebuilds the installation stored under `client_key`; a secret that does not open makes the
/// record unreadable ([`StoreError::Unsealable`]).
pub(crate) fn decode(
    client_key: &ClientKey,
    fields: Map<String, Value>,
    secrets: Vec<Value>,
    sealer: &Sealer,
) -> Result<Installation, StoreError> {
    if secrets.is_empty() {
        return Err(StoreError::Corrupt(format!(
            "installation {client_key} has no shared secret"
        )));
    }
    // The secrets are not among `fields`, so the message quotes none.
    let mut installation: Installation = serde_json::from_value(Value::Object(fields))
        .map_err(|e| StoreError::Corrupt(format!("installation {client_key} is not valid: {e}")))?;
    if &installation.client_key != client_key {
        return Err(StoreError::Corrupt(format!(
            "the record stored for {client_key} names the clientKey {}",
            installation.client_key
        )));
    }
    let (history, at_rest) = sealer.open_history(client_key, secrets)?;
    installation.secrets = history;
    installation.at_rest = at_rest;
    Ok(installation)
}

/// The compact form Redis keeps a record in (docs/PROTOCOL.md §10, "Storage"): one JSON
/// object holding every attribute but `version` under a short name, absent options and empty
/// lists left out, and the sealed secret history (with short names too) under `s`. A name
/// missing from these tables is kept as it is, so an attribute added later is never lost.
const SHORT_NAMES: &[(&str, &str)] = &[
    ("client_key", "ck"),
    ("base_url", "bu"),
    ("display_url", "du"),
    ("product_type", "pt"),
    ("description", "de"),
    ("oauth_client_id", "oc"),
    ("installation_id", "ii"),
    ("cloud_id", "ci"),
    ("service_entitlement_number", "sn"),
    ("entitlement_id", "ei"),
    ("entitlement_number", "en"),
    ("server_version", "sv"),
    ("plugins_version", "pv"),
    ("state", "st"),
    ("enabled", "on"),
    ("superseded_by", "sb"),
    ("supersedes", "ss"),
    ("site_proof", "sp"),
    ("signed_install", "si"),
    ("atlassian_installed", "ai"),
    ("last_event_iat", "le"),
    ("last_tenant_event_iat", "lt"),
    ("installed_at", "ia"),
    ("updated_at", "ua"),
];
const SHORT_SECRET_NAMES: &[(&str, &str)] = &[
    ("secret", "p"),
    ("sealed", "x"),
    ("since", "t"),
    ("signed", "g"),
];
/// The secret history in the compact form.
const SECRETS: &str = "s";

fn renamed(
    object: Map<String, Value>,
    table: &[(&str, &str)],
    to_short: bool,
) -> Map<String, Value> {
    object
        .into_iter()
        .filter(|(_, value)| !value.is_null() && value.as_array().is_none_or(|a| !a.is_empty()))
        .map(|(name, value)| {
            let new = table.iter().find_map(|(long, short)| {
                let (from, to) = if to_short {
                    (long, short)
                } else {
                    (short, long)
                };
                (*from == name).then(|| (*to).to_owned())
            });
            (new.unwrap_or(name), value)
        })
        .collect()
}

/// `stored` in the compact form, without its `version` (Redis keeps that beside it, for the
/// compare-and-set).
pub(crate) fn to_compact(stored: StoredRecord) -> String {
    let mut fields = stored.fields;
    fields.remove("version");
    let mut object = renamed(fields, SHORT_NAMES, true);
    let secrets = stored
        .secrets
        .into_iter()
        .map(|entry| match entry {
            Value::Object(entry) => Value::Object(renamed(entry, SHORT_SECRET_NAMES, true)),
            other => other,
        })
        .collect();
    object.insert(SECRETS.into(), Value::Array(secrets));
    Value::Object(object).to_string()
}

/// The fields (with `version`) and secret entries of a record in the compact form, as
/// [`decode`] takes them; `None` if `raw` is not a JSON object.
pub(crate) fn from_compact(raw: &[u8], version: Value) -> Option<StoredRecord> {
    let Ok(Value::Object(object)) = serde_json::from_slice(raw) else {
        return None;
    };
    let mut fields = renamed(object, SHORT_NAMES, false);
    let secrets = match fields.remove(SECRETS) {
        Some(Value::Array(entries)) => entries
            .into_iter()
            .map(|entry| match entry {
                Value::Object(entry) => Value::Object(renamed(entry, SHORT_SECRET_NAMES, false)),
                other => other,
            })
            .collect(),
        _ => Vec::new(),
    };
    fields.insert("version".into(), version);
    Some(StoredRecord { fields, secrets })
}
