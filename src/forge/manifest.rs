//! The Forge manifest fragment that points Forge at this service (`warden forge manifest`):
//! the remote (this service's base URL, with the app system token), the Connect key it
//! adopts, and the lifecycle trigger delivering to `POST /forge/events` (docs/PROTOCOL.md §12).

use crate::configuration::Settings;

/// The remote's key in the manifest (at most 23 characters of `[a-zA-Z0-9_-]`).
pub const REMOTE_KEY: &str = "warden";
/// The endpoint (and trigger) of the lifecycle events.
pub const EVENTS_ENDPOINT_KEY: &str = "warden-forge-events";
/// The events route, relative to the base URL.
pub const EVENTS_PATH: &str = "/forge/events";

/// A YAML double-quoted scalar: a JSON string is one.
fn quoted(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// The fragment, in YAML, from the settings the descriptor is rendered from.
pub fn render(settings: &Settings) -> String {
    let app_id = match &settings.forge {
        Some(forge) => format!("  id: {}\n", quoted(forge.app.as_str())),
        None => "  # id: your app's ARI (forge register); set WARDEN_FORGE_APP_ID to the same\n"
            .to_owned(),
    };
    let base_url = settings.base_url.as_str().trim_end_matches('/');
    let key = quoted(&settings.app_key);
    let base_url = quoted(base_url);
    let lines = [
        "# Forge manifest fragment for this warden (warden forge manifest): merge into manifest.yml.",
        "app:",
        app_id.trim_end_matches('\n'),
        "  connect:",
        &format!("    key: {key}"),
        &format!("    remote: {REMOTE_KEY}"),
        "remotes:",
        &format!("  - key: {REMOTE_KEY}"),
        &format!("    baseUrl: {base_url}"),
        "    operations:",
        "      - compute",
        "    auth:",
        "      appSystemToken:",
        "        enabled: true",
        "endpoint:",
        &format!("  - key: {EVENTS_ENDPOINT_KEY}"),
        &format!("    remote: {REMOTE_KEY}"),
        "    route:",
        &format!("      path: {EVENTS_PATH}"),
        "    auth:",
        "      appSystemToken:",
        "        enabled: true",
        "modules:",
        "  trigger:",
        &format!("    - key: {EVENTS_ENDPOINT_KEY}"),
        &format!("      endpoint: {EVENTS_ENDPOINT_KEY}"),
        "      events:",
        "        - avi:forge:installed:app",
        "        - avi:forge:upgraded:app",
    ];
    let mut text = lines.join("\n");
    text.push('\n');
    text
}
