//! Child processes that are killed when the test lets go of them, with their output kept.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use crate::bins::{citywatch_bin, edge_sim_bin};
use crate::tail;

/// A spawned process whose stdout and stderr go to files in its own temp dir. Drop kills it
/// (SIGKILL) and reaps it; if the test is panicking, drop also prints the tail of both outputs.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    // Last: removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `cmd` (its stdin is null, stdout/stderr are captured to files); `name` labels
    /// the reports.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<ChildGuard> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("citywatch-{name}-"))
            .tempdir()
            .context("creating the child's temp dir")?;
        let stdout_path = dir.path().join("stdout.log");
        let stderr_path = dir.path().join("stderr.log");
        let stdout = File::create(&stdout_path).context("creating stdout.log")?;
        let stderr = File::create(&stderr_path).context("creating stderr.log")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            stdout_path,
            stderr_path,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The underlying process.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("polling {}", self.name))
    }

    /// Waits (polling, bounded by `within`) for it to exit; `None` if it still runs.
    pub async fn wait_timeout(&mut self, within: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM (graceful shutdown) by pid through `kill -TERM`.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.id().to_string())
            .status()
            .context("running kill -TERM")?;
        anyhow::ensure!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.id()
        );
        Ok(())
    }

    /// Kills it (SIGKILL) and reaps it; harmless if it already exited.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The TCP ports it listens on, read from Linux's /proc (its socket inodes, matched against
    /// the LISTEN entries of its network namespace): for a server told to bind port 0 that does
    /// not say which port it got (VictoriaMetrics).
    pub fn listening_ports(&self) -> Vec<u16> {
        listening_ports(self.id())
    }

    /// Path of the captured stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Path of the captured stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Both outputs, labelled, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {name} stdout ---\n{}--- {name} stderr ---\n{}",
            tail(&self.stdout(), 200),
            tail(&self.stderr(), 200),
            name = self.name
        )
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "=== {} output ===\n{}=== end of {} output ===",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

/// Spawns the release `edge-sim` (built on first use, see [`edge_sim_bin`]) with `args`.
pub fn spawn_edge_sim(args: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(edge_sim_bin());
    cmd.args(args);
    ChildGuard::spawn("edge-sim", cmd).expect("spawning edge-sim")
}

/// Spawns the release `citywatch` gateway (built on first use, see [`citywatch_bin`]).
pub fn spawn_citywatch(args: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(citywatch_bin());
    cmd.args(args);
    ChildGuard::spawn("citywatch", cmd).expect("spawning citywatch")
}

/// The TCP ports process `pid` listens on (Linux /proc; empty elsewhere or if it is gone).
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let inodes: std::collections::HashSet<String> = fds
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9)) else { continue };
            if *state != "0A" || !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}
