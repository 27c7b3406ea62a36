//! `GET /atlassian-connect.json`: the app descriptor, rendered once at start-up.

use actix_web::{web, HttpResponse};

use crate::configuration::Settings;
use crate::startup::AppState;

/// The template with `baseUrl` and `key` set from the settings, and the two API migrations
/// this service relies on switched on whatever the template says.
pub fn render(settings: &Settings) -> Result<String, serde_json::Error> {
    let mut descriptor: serde_json::Value = serde_json::from_str(&settings.descriptor_template)?;
    if let Some(object) = descriptor.as_object_mut() {
        object.insert("baseUrl".into(), settings.base_url.as_str().into());
        object.insert("key".into(), settings.app_key.as_str().into());
        let migrations = object
            .entry("apiMigrations")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(m) = migrations.as_object_mut() {
            m.insert("signed-install".into(), true.into());
            m.insert("context-qsh".into(), true.into());
        }
    }
    serde_json::to_string_pretty(&descriptor)
}

pub async fn descriptor(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.descriptor.clone())
}
