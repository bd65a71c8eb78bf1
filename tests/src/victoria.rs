//! A real VictoriaMetrics (Debian `victoria-metrics`) per test, on a loopback port it binds
//! itself, with its own data directory: it accepts the InfluxDB v2 write API (`/api/v2/write`), and its export
//! API reads back what was stored. It can be killed and restarted on the same port and data.

use std::process::Command;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{find_executable, wait_for, ChildGuard, READY_TIMEOUT};

/// A running victoria-metrics.
#[derive(Debug)]
pub struct VictoriaMetrics {
    child: Option<ChildGuard>,
    port: u16,
    data: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl VictoriaMetrics {
    /// Starts it and returns once `/health` answers.
    pub async fn start() -> anyhow::Result<VictoriaMetrics> {
        let bin = find_executable("victoria-metrics", &["/usr/bin", "/usr/local/bin"]).ok_or_else(|| {
            anyhow::anyhow!("victoria-metrics is not installed: run `scripts/test`, which installs the Debian package victoria-metrics")
        })?;
        let data = tempfile::Builder::new().prefix("citywatch-vm-").tempdir().context("data dir")?;
        // Port 0 first: it binds one of its own choosing, read from /proc (it logs ":0"); restarts
        // reuse that port.
        let mut vm = VictoriaMetrics { child: None, port: 0, data, bin };
        vm.launch().await?;
        Ok(vm)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!("-storageDataPath={}", self.data.path().display()))
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=WARN");
        let mut child = ChildGuard::spawn("victoria-metrics", cmd)?;
        let bound = wait_for("victoria-metrics to listen", READY_TIMEOUT, || match child.listening_ports().first() {
            Some(&port) => Some(Ok(port)),
            None => child.try_wait().ok().flatten().map(Err),
        })
        .await;
        match bound {
            Ok(Ok(port)) => self.port = port,
            Ok(Err(status)) => bail!("victoria-metrics exited with {status}:\n{}", child.logs()),
            Err(e) => bail!("{e}:\n{}", child.logs()),
        }
        let url = format!("{}/health", self.url());
        let healthy = wait_for("victoria-metrics /health", READY_TIMEOUT, || {
            ureq::get(&url).call().ok()?.body_mut().read_to_string().ok().filter(|b| b.trim() == "OK").map(drop)
        })
        .await;
        if let Err(e) = healthy {
            bail!("{e}:\n{}", child.logs());
        }
        self.child = Some(child);
        Ok(())
    }

    /// "http://127.0.0.1:PORT", the base URL of every API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server is gone at once, mid-request if need be. VictoriaMetrics keeps the
    /// last seconds of writes in memory, so this may lose data it already acknowledged (its own
    /// documented behaviour); tests of the sink use [`VictoriaMetrics::stop`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// SIGTERM, then waits (bounded) for it to exit: the server refuses connections from then
    /// on, and what it acknowledged is on disk.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.terminate()?;
            if c.wait_timeout(READY_TIMEOUT).await?.is_none() {
                c.kill();
            }
        }
        Ok(())
    }

    /// Starts again on the same port and data directory (stopping it first if it runs).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// Every sample of the series whose name matches `name_regex`, as
    /// (metric name, labels, timestamp ms, value), after making recent writes searchable.
    pub fn export(&self, name_regex: &str) -> anyhow::Result<Vec<(String, Value, i64, f64)>> {
        ureq::get(&format!("{}/internal/force_flush", self.url())).call().context("force_flush")?;
        let mut r = ureq::get(&format!("{}/api/v1/export", self.url()))
            .query("match[]", format!("{{__name__=~\"{name_regex}\"}}"))
            .call()
            .context("export")?;
        let text = r.body_mut().read_to_string()?;
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).with_context(|| format!("export line {line:?}"))?;
            let name = v["metric"]["__name__"].as_str().unwrap_or_default().to_owned();
            let values = v["values"].as_array().cloned().unwrap_or_default();
            let stamps = v["timestamps"].as_array().cloned().unwrap_or_default();
            for (value, ts) in values.iter().zip(&stamps) {
                out.push((name.clone(), v["metric"].clone(), ts.as_i64().unwrap_or_default(), value.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Ok(out)
    }

    /// The server's own log.
    pub fn logs(&self) -> String {
        self.child.as_ref().map(ChildGuard::logs).unwrap_or_default()
    }
}
