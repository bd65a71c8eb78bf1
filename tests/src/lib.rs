//! End-to-end test harness for Citywatch: starts real servers (a `mosquitto` broker, a
//! Prometheus Alertmanager, an HTTP webhook receiver, each on its own loopback port), real MQTT
//! subscribers and the workspace's own binaries, with every wait bounded and every log kept for
//! the failure report. It is not a mock, not an in-process broker, and not
//! meant for anything but tests.

mod alertmanager;
mod bins;
mod browser;
pub mod event_fleet;
pub mod figures;
mod gateway;
mod modbus_server;
mod mosquitto;
mod nats;
mod paho;
mod process;
mod publisher;
mod receiver;
mod subscriber;
mod volume;
mod victoria;

use std::time::Duration;

pub use alertmanager::{Alertmanager, ALERTMANAGER_BIN};
pub use browser::{artifacts_dir, chromedriver_path, chromium_path, Browser, Element};
pub use bins::{citywatch_bin, edge_sim_bin, workspace_root};
pub use gateway::{printed_addresses, GatewayProcess};
pub use modbus_server::{ModbusServer, RegisterTable, MODBUS_PYTHON};
pub use mosquitto::{Mosquitto, MosquittoBuilder};
pub use nats::{nats_server_bin, NatsCluster, NatsNode, NatsUsers, NATS_SERVER_VERSION};
pub use process::{listening_ports, spawn_citywatch, spawn_edge_sim, ChildGuard};
pub use paho::{PahoDevice, PahoOptions, PAHO_PYTHON};
pub use publisher::{birth, device_topic, Publisher};
pub use receiver::{revisions_of, signature, Delivery, WebhookReceiver, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};
pub use rumqttc::QoS;
pub use subscriber::{Received, Subscriber};
pub use volume::DataVolume;
pub use victoria::VictoriaMetrics;

/// The bound used for every "until it is ready" wait of the harness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `condition` until it yields `Some`, at most `timeout`; the error names `what`.
///
/// The one bounded wait of the harness: every "until it is ready / until it arrived" goes
/// through here (or [`wait_for_async`]) instead of an ad-hoc loop or a bare sleep. The poll
/// interval starts at 10 ms and doubles up to 200 ms, so fast events are seen fast.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    wait_for_async(what, timeout, || std::future::ready(condition())).await
}

/// [`wait_for`] with an asynchronous condition; a probe that hangs is cut at the deadline too.
pub async fn wait_for_async<T, F>(what: &str, timeout: Duration, mut condition: impl FnMut() -> F) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        match tokio::time::timeout_at(deadline, condition()).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(_) => anyhow::bail!("timed out after {timeout:?} waiting for {what}"),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read the port, drop).
///
/// Racy by nature: only for a server that cannot bind port 0 (mosquitto 2.0.11), and only with
/// a retry on a fresh port when its bind fails. Everything else binds port 0 itself and tells
/// the port: the gateway and chromedriver print it, Alertmanager logs it, the Modbus server
/// prints it, VictoriaMetrics' is read from /proc ([`ChildGuard::listening_ports`]), the
/// in-process receivers read it from their listener.
///
/// Never hands out the same port twice in one process: tests run in parallel threads, and the
/// kernel may give port 0's pick again once the probe is dropped (a NATS node once got the same
/// port for its monitor and its routes, and failed with "address already in use").
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a free port");
        let port = listener.local_addr().expect("a bound listener has a local address").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// The last `lines` lines of `text`, for failure reports that stay readable.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines cut ...]\n"));
    }
    for line in &all[start..] {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A client id unique within this machine and test process.
pub fn unique_client_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Splits "host:port" (as returned by [`Mosquitto::addr`]) into its parts.
pub fn split_addr(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("address {addr:?} is not host:port"))?;
    let port = port
        .parse()
        .map_err(|e| anyhow::anyhow!("address {addr:?} has a bad port: {e}"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// Finds an executable by name on PATH, then in the given fallback directories.
pub(crate) fn find_executable(name: &str, fallback_dirs: &[&str]) -> Option<std::path::PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(fallback_dirs.iter().map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
