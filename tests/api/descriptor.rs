//! The descriptor template: placeholders rendered at start-up, and a template that breaks a
//! Connect rule warden depends on stops `warden` naming the field.

use std::process::Command;

use crate::helpers::app::{spawn_app_with, Backend, Options};

/// The bundled template with `edit` applied, written to a file in `dir`; returns its path.
pub fn write_template(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut template: serde_json::Value =
        serde_json::from_str(connect_warden::configuration::BUNDLED_DESCRIPTOR).unwrap();
    edit(&mut template);
    let path = dir.join("atlassian-connect.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&template).unwrap()).unwrap();
    path.display().to_string()
}

/// `warden serve` with `template` and `env`: its exit status and stderr, once it stopped
/// (it must, within a few seconds).
fn start_warden(template: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_warden"));
    for (var, _) in std::env::vars() {
        if var.starts_with("WARDEN_") {
            command.env_remove(var);
        }
    }
    let mut child = command
        .arg("serve")
        .env("WARDEN_BIND", "127.0.0.1:0")
        .env("WARDEN_DATA_DIR", data.path())
        .env("WARDEN_DESCRIPTOR", template)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("warden starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("warden kept running with a bad descriptor template");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn a_template_breaking_a_connect_rule_stops_warden_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 4] = [
        ("lifecycle.installed", |t| {
            t["lifecycle"]["installed"] = "/install".into()
        }),
        ("apiMigrations.signed-install", |t| {
            t["apiMigrations"]["signed-install"] = false.into()
        }),
        (
            "modules.webhooks[0].url",
            |t| t["modules"] = serde_json::json!({"webhooks": [{"event": "jira:issue_created"}]}),
        ),
        ("scopes[0]", |t| {
            t["scopes"] = serde_json::json!(["READ_ALL"])
        }),
    ];
    for (field, edit) in cases {
        let template = write_template(dir.path(), edit);
        let (status, stderr) = start_warden(&template, &[]);
        assert!(!status.success(), "{field}: warden started");
        assert!(
            stderr.contains("WARDEN_DESCRIPTOR") && stderr.contains(&format!("{field}: ")),
            "{field} not named: {stderr}"
        );
    }
}

#[test]
fn a_missing_environment_variable_stops_warden_naming_placeholder_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_template(dir.path(), |t| {
        t["vendor"]["name"] = "{{env.WARDEN_TEST_VENDOR_NAME}}".into()
    });
    let (status, stderr) = start_warden(&template, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("{{env.WARDEN_TEST_VENDOR_NAME}}") && stderr.contains("vendor.name"),
        "{stderr}"
    );
    let template = write_template(dir.path(), |t| t["name"] = "{{appName}}".into());
    let (status, stderr) = start_warden(&template, &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("{{appName}}") && stderr.contains(" at name"),
        "{stderr}"
    );
}

/// A value with a quote cannot break out of its string: the served descriptor has it verbatim.
#[tokio::test]
async fn placeholders_are_served_rendered_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let template = write_template(dir.path(), |t| {
        t["vendor"]["name"] = "{{env.WARDEN_VENDOR_NAME}}".into();
        t["links"] =
            serde_json::json!({"self": "{{baseUrl}}/atlassian-connect.json", "key": "{{appKey}}"});
    });
    let evil = "Acme\", \"baseUrl\": \"https://evil.example.com";
    let app = spawn_app_with(
        Options::new(Backend::Embedded)
            .set("WARDEN_DESCRIPTOR", template)
            .set("WARDEN_VENDOR_NAME", evil),
    )
    .await;
    let d: serde_json::Value = app.descriptor().await.json().await.unwrap();
    assert_eq!(d["vendor"]["name"], evil);
    assert_eq!(d["baseUrl"], crate::helpers::app::APP_BASE_URL);
    assert_eq!(
        d["links"]["self"],
        format!(
            "{}/atlassian-connect.json",
            crate::helpers::app::APP_BASE_URL
        )
    );
    assert_eq!(d["links"]["key"], crate::helpers::app::APP_KEY);
}
