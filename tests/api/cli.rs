//! The `warden` command line: the JWT debugging aids and start-up errors.

use std::process::Command;

fn warden(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(args)
        .env_remove("WARDEN_CONFIG")
        .output()
        .expect("warden runs")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn canonical_prints_the_canonical_request_and_qsh() {
    let out = warden(&[
        "jwt",
        "canonical",
        "get",
        "https://app.example.com/test?param=some%20spaces%20in%20this%20parameter",
    ]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("GET&/test&param=some%20spaces%20in%20this%20parameter"),
        "{text}"
    );
    assert!(
        text.contains("ef4097d05395eaf1a133956f140116a9c411afad768d4f06daac9e305764265d"),
        "{text}"
    );
}

#[test]
fn canonical_strips_the_base_url_path() {
    let out = warden(&[
        "jwt",
        "canonical",
        "GET",
        "https://acme.atlassian.net/wiki/rest/api/space?limit=10&jwt=ignored",
        "--base-url",
        "https://acme.atlassian.net/wiki",
    ]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("canonical request: GET&/rest/api/space&limit=10"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn decode_shows_claims_marked_unverified() {
    let secret = connect_protocol::domain::SharedSecret::parse("s").unwrap();
    let token = connect_protocol::jwt::sign_hs256(
        &connect_protocol::jwt::Claims {
            iss: Some("ck-1".into()),
            qsh: Some("abc".into()),
            ..Default::default()
        },
        &secret,
    );
    let out = warden(&["jwt", "decode", &format!("JWT {token}")]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("UNVERIFIED"));
    assert!(text.contains("\"iss\": \"ck-1\""));
    assert!(text.contains("\"alg\": \"HS256\""));

    let out = warden(&["jwt", "decode", "not-a-token"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("three dot-separated parts"));
}

#[test]
fn help_explains_the_commands_and_settings() {
    let text = stdout(&warden(&["--help"]));
    for word in ["serve", "jwt", "WARDEN_CONFIG", "WARDEN_REDIS_URL"] {
        assert!(text.contains(word), "--help lacks {word}");
    }
}

#[test]
fn a_bad_setting_stops_start_up_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .arg("serve")
        .env("WARDEN_INSTALL_AUTH", "maybe")
        .env("WARDEN_BIND", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARDEN_INSTALL_AUTH"), "{stderr}");
}

/// `warden forge manifest` prints the manifest fragment from the service's settings: the
/// remote at WARDEN_BASE_URL with the app system token, the Connect key, and the lifecycle
/// trigger to `/forge/events`.
#[test]
fn forge_manifest_points_forge_at_this_service() {
    let out = Command::new(env!("CARGO_BIN_EXE_warden"))
        .args(["forge", "manifest"])
        .env_remove("WARDEN_CONFIG")
        .env("WARDEN_BASE_URL", "https://warden.acme.example/app")
        .env("WARDEN_APP_KEY", "com.acme.warden")
        .env(
            "WARDEN_FORGE_APP_ID",
            "7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let after = |line: &str, next: &[&str]| {
        let at = lines
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("no line {line:?} in\n{text}"));
        assert_eq!(
            &lines[at + 1..at + 1 + next.len()],
            next,
            "after {line:?} in\n{text}"
        );
    };
    after(
        "app:",
        &[
            "  id: \"ari:cloud:ecosystem::app/7d3c2b1a-0f9e-4d8c-9b7a-6f5e4d3c2b1a\"",
            "  connect:",
            "    key: \"com.acme.warden\"",
            "    remote: warden",
        ],
    );
    after(
        "remotes:",
        &[
            "  - key: warden",
            "    baseUrl: \"https://warden.acme.example/app\"",
            "    operations:",
            "      - compute",
            "    auth:",
            "      appSystemToken:",
            "        enabled: true",
        ],
    );
    after(
        "endpoint:",
        &[
            "  - key: warden-forge-events",
            "    remote: warden",
            "    route:",
            "      path: /forge/events",
        ],
    );
    after(
        "modules:",
        &[
            "  trigger:",
            "    - key: warden-forge-events",
            "      endpoint: warden-forge-events",
            "      events:",
            "        - avi:forge:installed:app",
            "        - avi:forge:upgraded:app",
        ],
    );
    // Indentation is spaces only, in steps of two: YAML.
    for line in &lines {
        let indent = line.len() - line.trim_start_matches(' ').len();
        assert!(!line.contains('\t') && indent % 2 == 0, "{line:?}");
    }

    let help = stdout(&warden(&["forge", "manifest", "--help"]));
    for word in [
        "WARDEN_BASE_URL",
        "WARDEN_APP_KEY",
        "/forge/events",
        "app system token",
    ] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
}
