//! The workspace's binaries, built once per test process with the same cargo that runs the tests.
//!
//! `env!("CARGO_BIN_EXE_...")` exists only for a package's own binaries, so binaries of the other
//! packages are built here with `cargo build --release` and found through cargo's JSON messages.
//!
//! Which features the dependencies get depends on the packages and targets cargo is asked for.
//! `cargo build -p citywatch-gateway` alone resolves them differently from the workspace test run,
//! so it rebuilds rustls, rmqtt, async-nats and the gateway a second time. With
//! `CITYWATCH_TEST_BUILD=workspace` (set by `scripts/test`) the binaries are built as
//! `cargo build --release --workspace --bins --tests` instead: the same selection as
//! `cargo test --workspace --release`, so everything but the binaries themselves is already fresh.
//! Without it (one test file run by hand) the smaller `-p` build is the cheaper one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A cold release build on a 2-core machine takes minutes; a hung one must still end.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The workspace root (the parent of this package's directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("the tests package sits inside the workspace")
        .to_path_buf()
}

/// Path of the release `edge-sim` binary (package citywatch-edge), built on first use.
/// Panics with cargo's output if it does not build.
pub fn edge_sim_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_bin("citywatch-edge", "edge-sim"))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Path of the release `citywatch` binary (package citywatch-gateway), built on first use.
/// Panics with cargo's output if it does not build.
///
/// `CITYWATCH_BIN=path` runs that build instead, without building (the benchmarks' before/after
/// comparisons of a saved binary).
pub fn citywatch_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("CITYWATCH_BIN") {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => build_bin("citywatch-gateway", "citywatch"),
    })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir), // join keeps an absolute dir as is
        None => root.join("target"),
    }
}

fn build_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let logs = tempfile::Builder::new()
        .prefix("citywatch-build-")
        .tempdir()
        .map_err(|e| format!("temp dir for the build of {bin}: {e}"))?;
    let out_path = logs.path().join("stdout.jsonl");
    let err_path = logs.path().join("stderr.txt");
    let stdout = File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let stderr = File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let as_workspace_tests = std::env::var("CITYWATCH_TEST_BUILD").is_ok_and(|v| v == "workspace");
    let args: Vec<&str> = if as_workspace_tests {
        vec!["build", "--release", "--workspace", "--bins", "--tests"]
    } else {
        vec!["build", "-p", package, "--bin", bin, "--release"]
    };
    let describe = format!("cargo {}", args.join(" "));
    let mut command = Command::new(&cargo);
    // Cargo sets these for the running test binary (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, …).
    // Build scripts such as ring's declare `rerun-if-env-changed` on the same names, and cargo
    // compares them against its own environment: inherited, they would make the nested build
    // rerun ring's build script and rebuild everything above it (rustls, quinn, the gateway).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_per_crate_cargo_var(&name) {
            command.env_remove(&*name);
        }
    }
    let mut child = command
        .current_dir(&root)
        .args(&args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("could not run `{describe}` with {cargo:?}: {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > BUILD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{describe}` did not finish within {BUILD_TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for `{describe}`: {e}")),
        }
    };
    let messages = std::fs::read_to_string(&out_path).unwrap_or_default();
    let diagnostics = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "`{describe}` failed ({status}) in {}:\n{diagnostics}",
            root.display()
        ));
    }
    // Cargo names the executable in its compiler-artifact message (fresh or rebuilt).
    let from_messages = messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        // Not the binary's own unit-test harness, which has the same target name.
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin && msg["profile"]["test"] == false)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from));
    let path = from_messages.unwrap_or_else(|| target_dir(&root).join("release").join(bin));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "`{describe}` succeeded but {} does not exist:\n{diagnostics}",
            path.display()
        ))
    }
}

/// Variables cargo sets per compiled or executed crate, as opposed to configuration a user
/// exports (CARGO_HOME, CARGO_TARGET_DIR, CARGO_PROFILE_*, CARGO_BUILD_*, …), which must reach
/// the nested build.
fn is_per_crate_cargo_var(name: &str) -> bool {
    name == "OUT_DIR"
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR" | "CARGO_MANIFEST_PATH" | "CARGO_MANIFEST_LINKS" | "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "CARGO_RUSTC_CURRENT_DIR"
        )
}

#[cfg(test)]
mod tests {
    use super::is_per_crate_cargo_var;

    #[test]
    fn only_per_crate_variables_are_dropped_from_the_nested_build() {
        for dropped in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION_MAJOR", "OUT_DIR", "CARGO_BIN_EXE_bench-cluster"] {
            assert!(is_per_crate_cargo_var(dropped), "{dropped}");
        }
        for kept in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_PROFILE_RELEASE_LTO", "CARGO_BUILD_JOBS", "CITYWATCH_TEST_BUILD"] {
            assert!(!is_per_crate_cargo_var(kept), "{kept}");
        }
    }
}
