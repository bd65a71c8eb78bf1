//! The workspace's binaries, built once per test process with the same cargo that runs the tests.
//!
//! `env!("CARGO_BIN_EXE_...")` exists only for a package's own binaries, so binaries of the other
//! packages are built here with `cargo build --release` and found through cargo's JSON messages.

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
pub fn citywatch_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_bin("citywatch-gateway", "citywatch"))
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
    let describe = format!("cargo build -p {package} --bin {bin} --release");
    let mut child = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "-p", package, "--bin", bin, "--release"])
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
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == bin)
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
