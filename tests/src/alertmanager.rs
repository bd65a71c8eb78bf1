//! A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) per test, on a free
//! loopback port, with a generated minimal config (one route to a receiver without
//! integrations), private storage and no cluster gossip. It only collects alerts for the test
//! to read back through its v2 API; it notifies nobody.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use tokio::time::Instant;

use crate::{free_port, ChildGuard, READY_TIMEOUT};

/// Where Debian's package installs the binary.
pub const ALERTMANAGER_BIN: &str = "/usr/bin/prometheus-alertmanager";

/// Attempts at a fresh port when the one picked was taken before Alertmanager bound it.
const PORT_ATTEMPTS: usize = 5;

/// One route, to a receiver with no integrations: alerts are kept and listed, never sent on.
const CONFIG: &str = "\
route:
  receiver: collect
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: collect
";

/// A running Alertmanager; dropping it kills the process and removes its storage.
#[derive(Debug)]
pub struct Alertmanager {
    port: u16,
    child: ChildGuard,
    // Last: removed after the process is gone.
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts Alertmanager and returns once `GET /-/ready` answers 200.
    pub async fn start() -> anyhow::Result<Alertmanager> {
        anyhow::ensure!(
            std::path::Path::new(ALERTMANAGER_BIN).is_file(),
            "{ALERTMANAGER_BIN} is not installed: run `scripts/test`, which installs the Debian \
             package prometheus-alertmanager before running the tests"
        );
        let dir = tempfile::Builder::new()
            .prefix("citywatch-alertmanager-")
            .tempdir()
            .context("creating Alertmanager's temp dir")?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, CONFIG).context("writing alertmanager.yml")?;
        let storage = dir.path().join("data");
        std::fs::create_dir(&storage).context("creating Alertmanager's storage dir")?;

        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut cmd = Command::new(ALERTMANAGER_BIN);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .arg("--log.level=info");
            let mut child = ChildGuard::spawn("alertmanager", cmd)?;
            match wait_ready(port, &mut child).await {
                Ok(()) => {
                    return Ok(Alertmanager {
                        port,
                        child,
                        _dir: dir,
                    })
                }
                // Exited at once: most likely the port was taken meanwhile; try another one.
                Err(Ready::Exited(e)) => last_error = Some(e),
                Err(Ready::TimedOut(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("Alertmanager did not start")))
    }

    /// `http://127.0.0.1:PORT`, the base URL (the gateway appends `/api/v2/alerts`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every alert Alertmanager holds now (`GET /api/v2/alerts`).
    pub fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let url = format!("{}/api/v2/alerts", self.url());
        let body: Value = agent()
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?
            .body_mut()
            .read_json()
            .with_context(|| format!("GET {url}: body"))?;
        match body {
            Value::Array(alerts) => Ok(alerts),
            other => anyhow::bail!("GET {url} did not return a list: {other}"),
        }
    }

    /// POSTs `alerts` (a JSON list, v2 format) straight to Alertmanager, as a client would.
    pub fn post_alerts(&self, alerts: &Value) -> anyhow::Result<()> {
        let url = format!("{}/api/v2/alerts", self.url());
        agent()
            .post(&url)
            .send_json(alerts)
            .with_context(|| format!("POST {url}"))?;
        Ok(())
    }

    /// Its stdout and stderr so far, for failure messages.
    pub fn logs(&self) -> String {
        self.child.logs()
    }
}

/// A client that never waits long on a local server.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

enum Ready {
    Exited(anyhow::Error),
    TimedOut(anyhow::Error),
}

async fn wait_ready(port: u16, child: &mut ChildGuard) -> Result<(), Ready> {
    let url = format!("http://127.0.0.1:{port}/-/ready");
    let probe: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(1)))
        .http_status_as_error(false)
        .build()
        .into();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Ready::Exited(anyhow::anyhow!(
                "Alertmanager exited before it was ready ({status}) on port {port}:\n{}",
                child.logs()
            )));
        }
        if let Ok(response) = probe.get(&url).call() {
            if response.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Ready::TimedOut(anyhow::anyhow!(
                "Alertmanager on port {port} did not answer GET /-/ready with 200 within \
                 {READY_TIMEOUT:?}:\n{}",
                child.logs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
