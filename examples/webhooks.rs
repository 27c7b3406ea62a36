//! How a vendor handles the webhooks its descriptor declares:
//! `WARDEN_DESCRIPTOR=examples/webhooks.json APP_KEY=issue-watcher cargo run --example webhooks`
//! (same `WARDEN_*` settings as `warden`).

use connect_warden::{configuration::Settings, startup::Application, webhooks::Webhook};
use serde_json::Value;

/// Runs on a worker after the delivery was authenticated and answered `204`.
async fn issue_created(webhook: Webhook) -> anyhow::Result<()> {
    let key = webhook.body["issue"]["key"].as_str().unwrap_or("?");
    tracing::info!(site = %webhook.tenant.base_url, issue = key, "issue created");
    // Call the site back as the app: its JWT is signed with this tenant's secret.
    let issue: Value = webhook
        .state
        .host
        .as_app(&webhook.tenant.installation)
        .get(&format!("/rest/api/3/issue/{key}"))
        .send_json()
        .await?;
    tracing::info!(summary = %issue["fields"]["summary"], "fetched");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    connect_warden::telemetry::init("info");
    // The descriptor declares both events; `jira:issue_updated` has no handler here, so its
    // deliveries are acknowledged and dropped.
    let app = Application::builder(Settings::load()?)
        .on_webhook("jira:issue_created", issue_created)
        .build()
        .await?;
    app.run_until_stopped().await?;
    Ok(())
}
