//! A real `mosquitto` broker per test, on a free loopback port, with its own config and log.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{timeout, Instant};

use crate::{find_executable, free_port, tail, wait_for_async, READY_TIMEOUT};

/// Attempts at a fresh port when the broker could not bind the one picked (another process took
/// it between [`free_port`] and the broker's bind). Mosquitto 2.0.11 cannot bind port 0 and
/// report it (`listener 0 HOST` opens a unix socket named HOST), so it is started that way.
const PORT_ATTEMPTS: usize = 5;

/// Options of a [`Mosquitto`] broker; build with [`Mosquitto::builder`].
#[derive(Debug, Clone, Default)]
pub struct MosquittoBuilder {
    credentials: Option<(String, String)>,
    extra_config: Vec<String>,
}

impl MosquittoBuilder {
    /// Refuse anonymous clients; accept only `user` with `password`.
    pub fn with_password(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// Appends one raw line to the generated `mosquitto.conf`.
    pub fn with_config_line(mut self, line: &str) -> Self {
        self.extra_config.push(line.to_string());
        self
    }

    /// Starts the broker and returns once it answers an MQTT CONNECT with a CONNACK.
    pub async fn start(self) -> anyhow::Result<Mosquitto> {
        let bin =
            find_executable("mosquitto", &["/usr/sbin", "/usr/local/sbin"]).ok_or_else(|| {
                anyhow::anyhow!(
                    "the `mosquitto` broker is not installed (looked on PATH and in /usr/sbin): \
                 run `scripts/test`, which installs the Debian packages mosquitto and \
                 mosquitto-clients before running the tests"
                )
            })?;
        let dir = tempfile::Builder::new()
            .prefix("citywatch-mosquitto-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let password_file = match &self.credentials {
            Some((user, password)) => Some(write_password_file(dir.path(), user, password).await?),
            None => None,
        };
        let mut broker = Mosquitto {
            bin,
            port: 0,
            conf_path: dir.path().join("mosquitto.conf"),
            log_path: dir.path().join("mosquitto.log"),
            stderr_path: dir.path().join("mosquitto.stderr"),
            password_file,
            extra_config: self.extra_config,
            child: None,
            _dir: dir,
        };
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            broker.port = free_port();
            broker.write_config()?;
            match broker.spawn_and_wait_ready().await {
                Ok(()) => return Ok(broker),
                // Exited at once: most likely the port was taken meanwhile; try another one.
                Err(StartError::Exited(e)) => last_error = Some(e),
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("mosquitto did not start")))
    }
}

/// A running `mosquitto` broker owned by a test; killed (and reaped) on drop.
///
/// Listens on `127.0.0.1:port()` only, persistence off, large queues so QoS 1 floods are not
/// dropped, logging to [`Mosquitto::log_path`]. When a test panics while it is alive, drop prints
/// the tail of the broker's log to stderr (which the test runner shows with the failure).
#[derive(Debug)]
pub struct Mosquitto {
    bin: PathBuf,
    port: u16,
    conf_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    password_file: Option<PathBuf>,
    extra_config: Vec<String>,
    child: Option<Child>,
    // Last: removed after the process is gone.
    _dir: tempfile::TempDir,
}

enum StartError {
    /// The process exited before it was ready.
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

impl Mosquitto {
    /// Starts an anonymous broker (see [`MosquittoBuilder::start`]).
    pub async fn start() -> anyhow::Result<Mosquitto> {
        MosquittoBuilder::default().start().await
    }

    /// Options: `Mosquitto::builder().with_password("user", "pass").start().await`.
    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::default()
    }

    /// The TCP port the broker listens on (the same across [`Mosquitto::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host the broker listens on.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log file (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The broker's log, plus anything it wrote to stdout/stderr (startup errors land there).
    pub fn log(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        if stderr.trim().is_empty() {
            log
        } else {
            format!("{log}--- mosquitto stdout/stderr ---\n{stderr}")
        }
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the broker (SIGKILL, as a crash would) and waits for it; the port stays reserved
    /// for [`Mosquitto::restart`] only by convention.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker if it runs and starts it again on the same port, with the same config;
    /// returns once it answers CONNECT again. Sessions and queued messages are lost
    /// (persistence is off), as after a crash.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait_ready().await {
                Ok(()) => return Ok(()),
                // The old socket may linger a moment; retry on the same port until the deadline.
                Err(StartError::Exited(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(StartError::Exited(e)) | Err(StartError::Other(e)) => {
                    return Err(e.context(format!("restarting mosquitto on port {}", self.port)))
                }
            }
        }
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let mut conf = String::new();
        // Run as root, mosquitto 2 drops privileges to user `mosquitto`, which then cannot write
        // the log or read the password file in our 0700 temp dir. `user root` keeps it as is;
        // as a non-root user this line is ignored.
        conf.push_str("user root\n");
        conf.push_str(&format!("listener {} 127.0.0.1\n", self.port));
        match &self.password_file {
            Some(file) => {
                conf.push_str("allow_anonymous false\n");
                conf.push_str(&format!("password_file {}\n", file.display()));
            }
            None => conf.push_str("allow_anonymous true\n"),
        }
        conf.push_str(
            "persistence false\n\
             max_queued_messages 100000\n\
             max_inflight_messages 0\n\
             max_keepalive 65535\n\
             set_tcp_nodelay true\n",
        );
        conf.push_str(&format!("log_dest file {}\n", self.log_path.display()));
        conf.push_str(
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\nlog_timestamp true\n",
        );
        for line in &self.extra_config {
            conf.push_str(line);
            conf.push('\n');
        }
        fs::write(&self.conf_path, conf)
            .with_context(|| format!("writing {}", self.conf_path.display()))
    }

    async fn spawn_and_wait_ready(&mut self) -> Result<(), StartError> {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .with_context(|| format!("opening {}", self.stderr_path.display()))
            .map_err(StartError::Other)?;
        let stdout = stderr
            .try_clone()
            .context("cloning the broker's output file")
            .map_err(StartError::Other)?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))
            .map_err(StartError::Other)?;
        self.child = Some(child);

        let port = self.port;
        let ready = wait_for_async("mosquitto to answer CONNECT with CONNACK", READY_TIMEOUT, || {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                matches!(timeout(Duration::from_secs(1), probe_connack(port)).await, Ok(Ok(true))).then_some(Ok(()))
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => {
                self.child = None;
                Err(StartError::Exited(anyhow::anyhow!(
                    "mosquitto exited before it was ready ({status}) on port {port}; log:\n{}",
                    tail(&self.log(), 60)
                )))
            }
            Err(e) => {
                self.stop();
                Err(StartError::Other(anyhow::anyhow!("mosquitto on port {port}: {e}; log:\n{}", tail(&self.log(), 60))))
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "=== mosquitto log ({}) ===\n{}=== end of mosquitto log ===",
                self.log_path.display(),
                tail(&self.log(), 200)
            );
        }
    }
}

/// MQTT 3.1.1 CONNECT, clean session, keep-alive 10 s, client id "cw-ready-probe".
const PROBE_CONNECT: [u8; 28] = [
    0x10, 26, // CONNECT, remaining length
    0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, // protocol name and level 4 (3.1.1)
    0x02, // flags: clean session
    0x00, 0x0A, // keep-alive
    0x00, 14, b'c', b'w', b'-', b'r', b'e', b'a', b'd', b'y', b'-', b'p', b'r', b'o', b'b', b'e',
];

/// Sends a raw CONNECT and reports whether a CONNACK (0x20) came back. A refusing CONNACK
/// (e.g. not authorised on a password broker) still proves the broker is serving MQTT.
async fn probe_connack(port: u16) -> std::io::Result<bool> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(&PROBE_CONNECT).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[0] != 0x20 {
        return Ok(false);
    }
    if connack[3] == 0 {
        // Accepted: leave politely (DISCONNECT) so the log shows no error.
        let _ = stream.write_all(&[0xE0, 0x00]).await;
    }
    Ok(true)
}

async fn write_password_file(dir: &Path, user: &str, password: &str) -> anyhow::Result<PathBuf> {
    let tool =
        find_executable("mosquitto_passwd", &["/usr/bin", "/usr/sbin"]).ok_or_else(|| {
            anyhow::anyhow!(
            "`mosquitto_passwd` is not installed: run `scripts/test`, which installs the Debian \
             packages mosquitto and mosquitto-clients"
        )
        })?;
    let file = dir.join("passwd");
    let output = timeout(
        READY_TIMEOUT,
        tokio::process::Command::new(&tool)
            .arg("-b")
            .arg("-c")
            .arg(&file)
            .arg(user)
            .arg(password)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("mosquitto_passwd did not finish in time")?
    .with_context(|| format!("running {}", tool.display()))?;
    if !output.status.success() {
        bail!(
            "mosquitto_passwd failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(file)
}
