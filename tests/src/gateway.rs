//! The `citywatch` gateway as a real process: a config file with free ports, a private data
//! directory that outlives restarts, readiness by its health endpoint, and a small JSON client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{citywatch_bin, free_port, ChildGuard, READY_TIMEOUT};

/// A running gateway and everything needed to restart it with the same data.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Option<ChildGuard>,
    http: String,
    mqtt: Option<String>,
    config_path: PathBuf,
    data: tempfile::TempDir,
    /// Runs the gateway through this command prefix (e.g. `nsenter … --`), if not empty.
    wrapper: Vec<std::ffi::OsString>,
}

impl GatewayProcess {
    /// Embedded broker on a free port; `extra` is appended to the generated TOML.
    pub async fn start_embedded(extra: &str) -> anyhow::Result<GatewayProcess> {
        let mqtt = format!("127.0.0.1:{}", free_port());
        let toml = format!("[mqtt]\nmode = \"embedded\"\nlisten = \"{mqtt}\"\n{extra}");
        GatewayProcess::start_with(&toml, Some(mqtt)).await
    }

    /// Subscribed to the external broker at `broker` ("host:port").
    pub async fn start_external(broker: &str, extra: &str) -> anyhow::Result<GatewayProcess> {
        let client_id = format!("citywatch-e2e-{}", free_port());
        let toml = format!("[mqtt]\nmode = \"external\"\nurl = \"mqtt://{broker}\"\nclient_id = \"{client_id}\"\n{extra}");
        GatewayProcess::start_with(&toml, None).await
    }

    /// External mode with its store in `volume` (run inside the volume's mount namespace),
    /// so a test can fill the disk under it or make it read-only.
    pub async fn start_external_on(broker: &str, extra: &str, volume: &crate::DataVolume) -> anyhow::Result<GatewayProcess> {
        let client_id = format!("citywatch-e2e-{}", free_port());
        let toml = format!("[mqtt]\nmode = \"external\"\nurl = \"mqtt://{broker}\"\nclient_id = \"{client_id}\"\n{extra}");
        GatewayProcess::start_inner(&toml, None, Some(volume.inside().join("store")), volume.wrapper()).await
    }

    async fn start_with(mqtt_section: &str, mqtt: Option<String>) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start_inner(mqtt_section, mqtt, None, Vec::new()).await
    }

    async fn start_inner(
        mqtt_section: &str,
        mqtt: Option<String>,
        store: Option<PathBuf>,
        wrapper: Vec<std::ffi::OsString>,
    ) -> anyhow::Result<GatewayProcess> {
        let data = tempfile::Builder::new().prefix("citywatch-gw-").tempdir().context("data dir")?;
        let http = format!("127.0.0.1:{}", free_port());
        let store = store.unwrap_or_else(|| data.path().join("store"));
        let text = format!(
            "{mqtt_section}\n[http]\nlisten = \"{http}\"\n[storage]\npath = \"{}\"\n",
            store.display()
        );
        let config_path = data.path().join("citywatch.toml");
        std::fs::write(&config_path, text).context("writing the config")?;
        let mut gateway = GatewayProcess { child: None, http, mqtt, config_path, data, wrapper };
        gateway.launch().await?;
        Ok(gateway)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(citywatch_bin());
                cmd
            }
            None => Command::new(citywatch_bin()),
        };
        cmd.arg("run").arg("--config").arg(&self.config_path).env("RUST_LOG", "info,rumqttd=warn");
        self.child = Some(ChildGuard::spawn("citywatch", cmd)?);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT * 2;
        loop {
            // With [[http.tokens]] configured the health endpoint answers 401: ready as well.
            if self.get("/api/v1/health").is_ok() || self.status_of("/api/v1/health").ok() == Some(401) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("citywatch exited with {status} before it was ready:\n{}", child.logs());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("citywatch not ready within {:?}:\n{}", READY_TIMEOUT * 2, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// "127.0.0.1:PORT" of the API.
    pub fn http_addr(&self) -> &str {
        &self.http
    }

    /// "127.0.0.1:PORT" of the embedded broker, if embedded.
    pub fn mqtt_addr(&self) -> Option<&str> {
        self.mqtt.as_deref()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// GET a JSON document from the API (errors on a non-2xx status).
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.http);
        let body: Value = ureq::get(&url).call().with_context(|| format!("GET {url}"))?.body_mut().read_json()?;
        Ok(body)
    }

    /// GET a text document (e.g. /metrics).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("http://{}{path}", self.http);
        Ok(ureq::get(&url).call().with_context(|| format!("GET {url}"))?.body_mut().read_to_string()?)
    }

    /// POSTs `body` as JSON; returns the status and the answer's JSON whatever the status (an
    /// empty answer is `Value::Null`, a non-JSON one a `Value::String`). Errors only when no
    /// answer came.
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://{}{path}", self.http);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(READY_TIMEOUT))
            .build()
            .into();
        let mut response = agent.post(&url).send_json(body).with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().with_context(|| format!("POST {url}: body"))?;
        let answer = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, answer))
    }

    /// POSTs raw `body` with `content_type` (e.g. an inventory as text/csv); returns the status
    /// and the answer's JSON (a non-JSON answer as `Value::String`).
    pub fn post_raw(&self, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://{}{path}", self.http);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(READY_TIMEOUT * 6))
            .build()
            .into();
        let mut response = agent
            .post(&url)
            .header("content-type", content_type)
            .send(body)
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(256 << 20).read_to_string().with_context(|| format!("POST {url}: body"))?;
        let answer = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, answer))
    }

    /// The status code of a GET (for error cases).
    pub fn status_of(&self, path: &str) -> anyhow::Result<u16> {
        let url = format!("http://{}{path}", self.http);
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Ok(agent.get(&url).call()?.status().as_u16())
    }

    /// Kills the process with SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Stops with SIGTERM and waits for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.terminate()?;
            match child.wait_timeout(Duration::from_secs(30)).await? {
                Some(status) if status.success() => {}
                Some(status) => bail!("citywatch exited with {status}:\n{}", child.logs()),
                None => bail!("citywatch did not stop within 30 s:\n{}", child.logs()),
            }
        }
        Ok(())
    }

    /// Starts again on the same ports, config and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    pub fn logs(&self) -> String {
        self.child.as_ref().map(ChildGuard::logs).unwrap_or_default()
    }

    /// Polls `probe` until it returns Some, or fails after `within` with the gateway's logs.
    pub async fn wait_for<T>(&self, within: Duration, what: &str, mut probe: impl FnMut(&GatewayProcess) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("timed out after {within:?} waiting for {what}\n{}", crate::tail(&self.logs(), 40));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
