//! A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) per test, on a loopback
//! port it binds itself (port 0) and logs, with a generated minimal config (one route to a receiver without
//! integrations), private storage and no cluster gossip. It only collects alerts for the test
//! to read back through its v2 API; it notifies nobody.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::{wait_for, ChildGuard, READY_TIMEOUT};

/// Where Debian's package installs the binary.
pub const ALERTMANAGER_BIN: &str = "/usr/bin/prometheus-alertmanager";

/// How Alertmanager logs the address it bound (port 0 given: the port it got).
const LISTENING_ON: &str = "msg=\"Listening on\" address=";

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

        let mut cmd = Command::new(ALERTMANAGER_BIN);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--cluster.listen-address=")
            .arg("--log.level=info");
        let mut child = ChildGuard::spawn("alertmanager", cmd)?;
        // Port 0: it binds one of its own choosing and logs it.
        let bound = wait_for("Alertmanager to log its address", READY_TIMEOUT, || {
            let logs = child.stderr() + &child.stdout();
            let port = logs.lines().find_map(|l| l.split_once(LISTENING_ON)).and_then(|(_, addr)| addr.split_whitespace().next()?.rsplit_once(':')?.1.parse::<u16>().ok());
            match port {
                Some(port) => Some(Ok(port)),
                None => child.try_wait().ok().flatten().map(Err),
            }
        })
        .await;
        let port = match bound {
            Ok(Ok(port)) => port,
            Ok(Err(status)) => anyhow::bail!("Alertmanager exited with {status} before it was ready:\n{}", child.logs()),
            Err(e) => anyhow::bail!("{e}:\n{}", child.logs()),
        };
        match wait_ready(port, &mut child).await {
            Ok(()) => Ok(Alertmanager { port, child, _dir: dir }),
            Err(Ready::Exited(e) | Ready::TimedOut(e)) => Err(e),
        }
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
    let ready = wait_for("Alertmanager GET /-/ready 200", READY_TIMEOUT, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(status));
        }
        probe.get(&url).call().ok().filter(|r| r.status() == 200).map(|_| Ok(()))
    })
    .await;
    match ready {
        Ok(Ok(())) => Ok(()),
        Ok(Err(status)) => Err(Ready::Exited(anyhow::anyhow!("Alertmanager exited before it was ready ({status}) on port {port}:\n{}", child.logs()))),
        Err(e) => Err(Ready::TimedOut(anyhow::anyhow!("Alertmanager on port {port}: {e}:\n{}", child.logs()))),
    }
}
