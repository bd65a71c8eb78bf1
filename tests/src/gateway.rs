//! The `citywatch` gateway as a real process: a config file with port-0 listeners (the gateway
//! binds them and prints the addresses it got), a private data directory that outlives
//! restarts, readiness by its printed addresses and health endpoint, and a small JSON client.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{citywatch_bin, unique_client_id, wait_for, ChildGuard, READY_TIMEOUT};

/// What `citywatch run` prints once its listeners are bound (see gateway/src/main.rs).
const API_ON: &str = "citywatch: API on http://";
const BROKER_ON: &str = "citywatch: MQTT broker on ";
/// Starts of a gateway whose embedded broker lost its port to another process (see start_inner).
const BIND_ATTEMPTS: u32 = 3;
const BIND_RACE: &[&str] = &["broker not listening on", "Address already in use", "cannot bind"];
/// A listener the gateway binds on a port of its own choosing.
const ANY_PORT: &str = "127.0.0.1:0";

/// The (API, embedded broker) addresses `citywatch run` printed on `stdout` so far, for tests
/// that start the binary themselves with port-0 listeners.
pub fn printed_addresses(stdout: &str) -> (Option<String>, Option<String>) {
    let http = stdout.lines().find_map(|l| l.strip_prefix(API_ON)).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned);
    let mqtt = stdout.lines().find_map(|l| l.strip_prefix(BROKER_ON)).map(|rest| rest.trim().to_owned());
    (http, mqtt)
}

/// A running gateway and everything needed to restart it with the same data.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Option<ChildGuard>,
    /// Empty until the first start has printed the address.
    http: String,
    /// `Some` in embedded mode; empty until the first start has printed the address.
    mqtt: Option<String>,
    mqtt_section: String,
    store: PathBuf,
    config_path: PathBuf,
    data: tempfile::TempDir,
    /// Runs the gateway through this command prefix (e.g. `nsenter … --`), if not empty.
    wrapper: Vec<std::ffi::OsString>,
}

impl GatewayProcess {
    /// Embedded broker on a port of its choosing; `extra` is appended to the generated TOML.
    pub async fn start_embedded(extra: &str) -> anyhow::Result<GatewayProcess> {
        let toml = format!("[mqtt]\nmode = \"embedded\"\nlisten = \"{ANY_PORT}\"\n{extra}");
        GatewayProcess::start_inner(&toml, true, None, Vec::new()).await
    }

    /// Subscribed to the external broker at `broker` ("host:port").
    pub async fn start_external(broker: &str, extra: &str) -> anyhow::Result<GatewayProcess> {
        let client_id = unique_client_id("citywatch-e2e");
        let toml = format!("[mqtt]\nmode = \"external\"\nurl = \"mqtt://{broker}\"\nclient_id = \"{client_id}\"\n{extra}");
        GatewayProcess::start_inner(&toml, false, None, Vec::new()).await
    }

    /// External mode with its store in `volume` (run inside the volume's mount namespace),
    /// so a test can fill the disk under it or make it read-only.
    pub async fn start_external_on(broker: &str, extra: &str, volume: &crate::DataVolume) -> anyhow::Result<GatewayProcess> {
        let client_id = unique_client_id("citywatch-e2e");
        let toml = format!("[mqtt]\nmode = \"external\"\nurl = \"mqtt://{broker}\"\nclient_id = \"{client_id}\"\n{extra}");
        GatewayProcess::start_inner(&toml, false, Some(volume.inside().join("store")), volume.wrapper()).await
    }

    /// Cluster mode: `cluster_section` holds the `[cluster]` table (see `NatsCluster::gateway_section`).
    pub async fn start_cluster(cluster_section: &str) -> anyhow::Result<GatewayProcess> {
        GatewayProcess::start_inner(cluster_section, false, None, Vec::new()).await
    }

    /// The process id (for SIGSTOP / SIGCONT), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    async fn start_inner(
        mqtt_section: &str,
        embedded: bool,
        store: Option<PathBuf>,
        wrapper: Vec<std::ffi::OsString>,
    ) -> anyhow::Result<GatewayProcess> {
        let data = tempfile::Builder::new().prefix("citywatch-gw-").tempdir().context("data dir")?;
        let store = store.unwrap_or_else(|| data.path().join("store"));
        let config_path = data.path().join("citywatch.toml");
        let mut gateway = GatewayProcess {
            child: None,
            http: String::new(),
            mqtt: embedded.then(String::new),
            mqtt_section: mqtt_section.to_owned(),
            store,
            config_path,
            data,
            wrapper,
        };
        gateway.write_config()?;
        // The embedded broker (rumqttd) cannot bind port 0 itself: the gateway picks a free port
        // for it just before (gateway/src/sources/broker.rs `resolve_port`), which another
        // process can take in between. Then the gateway exits at start; try again on a fresh pick.
        for attempt in 1.. {
            match gateway.launch().await {
                Ok(()) => break,
                Err(e) if attempt < BIND_ATTEMPTS && BIND_RACE.iter().any(|m| e.to_string().contains(m)) => continue,
                Err(e) => return Err(e),
            }
        }
        // Restarts keep the addresses the first start got: tests reconnect to them.
        gateway.write_config()?;
        Ok(gateway)
    }

    /// The config with the known addresses, port 0 where none is known yet.
    fn write_config(&self) -> anyhow::Result<()> {
        let http = if self.http.is_empty() { ANY_PORT } else { &self.http };
        let mqtt_section = match self.mqtt.as_deref() {
            Some(addr) if !addr.is_empty() => self.mqtt_section.replacen(&format!("listen = \"{ANY_PORT}\""), &format!("listen = \"{addr}\""), 1),
            _ => self.mqtt_section.clone(),
        };
        let text = format!("{mqtt_section}\n[http]\nlisten = \"{http}\"\n[storage]\npath = \"{}\"\n", self.store.display());
        std::fs::write(&self.config_path, text).context("writing the config")
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
        let mut child = ChildGuard::spawn("citywatch", cmd)?;
        let embedded = self.mqtt.is_some();
        // The addresses are printed once every listener is bound; the broker line follows the API's.
        let printed = wait_for("citywatch to print its addresses", READY_TIMEOUT * 2, || {
            match printed_addresses(&child.stdout()) {
                (Some(http), mqtt) if mqtt.is_some() || !embedded => Some(Ok((http, mqtt))),
                _ => child.try_wait().ok().flatten().map(Err),
            }
        })
        .await;
        let (http, mqtt) = match printed {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(status)) => bail!("citywatch exited with {status} before it was ready:\n{}", child.logs()),
            Err(e) => bail!("{e}:\n{}", child.logs()),
        };
        self.http = http;
        if embedded {
            self.mqtt = mqtt;
        }
        self.child = Some(child);
        // With [[http.tokens]] configured the health endpoint answers 401: ready as well.
        let healthy = wait_for("citywatch health", READY_TIMEOUT, || {
            (self.get("/api/v1/health").is_ok() || self.status_of("/api/v1/health").ok() == Some(401)).then_some(())
        })
        .await;
        if let Err(e) = healthy {
            bail!("{e}:\n{}", self.logs());
        }
        Ok(())
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

    /// Starts again on the same ports (those the first start got), config and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch().await
    }

    pub fn logs(&self) -> String {
        self.child.as_ref().map(ChildGuard::logs).unwrap_or_default()
    }

    /// Polls `probe` until it returns Some, or fails after `within` with the gateway's logs.
    pub async fn wait_for<T>(&self, within: Duration, what: &str, mut probe: impl FnMut(&GatewayProcess) -> Option<T>) -> T {
        match wait_for(what, within, || probe(self)).await {
            Ok(v) => v,
            Err(e) => panic!("{e}\n{}", crate::tail(&self.logs(), 40)),
        }
    }
}
