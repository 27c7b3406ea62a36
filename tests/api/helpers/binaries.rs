//! Binaries of other workspace packages. Cargo only tells a test binary where the binaries of
//! its own package are (`CARGO_BIN_EXE_warden`); `devtenant` is another workspace crate, so it
//! is built here once per test run, into the target directory this test binary was built in.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `devtenant` binary, built (once per test process) with the profile of this test binary.
pub fn devtenant() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build("devtenant", "devtenant"))
}

/// `cargo build -p <package> --bin <bin>` into this test binary's target directory; returns
/// the path of the binary.
fn build(package: &str, bin: &str) -> PathBuf {
    // The test binary is `<target>/<profile dir>/deps/api-<hash>`.
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory lives in a target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        // `cargo test` builds with the `test` profile, which inherits from `dev` and shares
        // its `debug` directory.
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            bin,
            "--profile",
            profile,
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}
