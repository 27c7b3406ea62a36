//! The one stored form of an [`Installation`], shared by both stores: every attribute but the
//! secrets as JSON values by field name (`version` included), and the secret history as JSON
//! entries, oldest first, sealed by the [`Sealer`] (docs/PROTOCOL.md §10). Redis keeps the
//! attributes as hash fields and the entries as a list; the embedded store one JSON object
//! with the entries under `secrets`.

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
