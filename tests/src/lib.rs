//! End-to-end test harness for Citywatch: starts real servers (a `mosquitto` broker, a
//! Prometheus Alertmanager, an HTTP webhook receiver, each on a free loopback port), real MQTT
//! subscribers and the workspace's own binaries, with every wait bounded and every log kept for
//! the failure report. It is not a mock, not an in-process broker, and not
//! meant for anything but tests.

mod alertmanager;
mod bins;
mod browser;
mod gateway;
mod modbus_server;
mod mosquitto;
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
pub use gateway::GatewayProcess;
pub use modbus_server::{ModbusServer, RegisterTable, MODBUS_PYTHON};
pub use mosquitto::{Mosquitto, MosquittoBuilder};
pub use process::{spawn_citywatch, spawn_edge_sim, ChildGuard};
pub use publisher::{birth, device_topic, Publisher};
pub use receiver::{signature, Delivery, WebhookReceiver, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};
pub use rumqttc::QoS;
pub use subscriber::{Received, Subscriber};
pub use volume::DataVolume;
pub use victoria::VictoriaMetrics;

/// The bound used for every "until it is ready" wait of the harness.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read the port, drop).
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a free port");
    listener
        .local_addr()
        .expect("a bound listener has a local address")
        .port()
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
