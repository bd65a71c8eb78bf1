//! `edge-sim`: a simulated fleet of gas alarms, smoke detectors and siren mounts on any MQTT
//! broker, running the real firmware core. Also the load generator of every benchmark
//! (`--rate`). Prints progress to stderr and one JSON summary line to stdout at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use citywatch_edge::sim::{self, FleetConfig, FleetStats, Scenario};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "edge-sim", version, about = "Citywatch fleet simulator and load generator")]
struct Cli {
    /// Broker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Number of devices; kinds are dealt round-robin: gas, smoke, siren.
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// Site id of every device ([A-Za-z0-9_-]{1,64}); device ids are `{site}-{kind}-{index}`.
    #[arg(long, default_value = "demo")]
    site: String,
    /// normal, gas-leak, fire, bracket-corrosion, offline, flapping, bad-payloads.
    #[arg(long, default_value = "normal")]
    scenario: Scenario,
    /// Telemetry messages per second for the whole fleet (load generator). Without it each
    /// device reports on its own interval over its own connection.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections the load generator spreads the devices over (with --rate).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Telemetry interval each device announces and keeps, seconds.
    #[arg(long = "interval", default_value_t = 10)]
    interval_s: u32,
    /// Send telemetry at QoS 1 (events and status always are).
    #[arg(long)]
    telemetry_qos1: bool,
    /// MQTT username (password from --password or CITYWATCH_MQTT_PASSWORD).
    #[arg(long)]
    username: Option<String>,
    #[arg(long, env = "CITYWATCH_MQTT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Offline scenario: seconds before the links drop.
    #[arg(long, default_value_t = 5.0)]
    offline_after: f64,
    /// Offline scenario: seconds the links stay down.
    #[arg(long, default_value_t = 15.0)]
    offline_for: f64,
    /// Seed for sensor noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{flag} must be a non-negative number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

fn parse_broker(broker: &str) -> Result<(String, u16)> {
    let (host, port) = broker.rsplit_once(':').context("--broker must be HOST:PORT")?;
    let port = port.parse().with_context(|| format!("--broker port {port:?} is not a number"))?;
    if host.is_empty() {
        bail!("--broker host is empty");
    }
    Ok((host.trim_matches(|c| c == '[' || c == ']').to_owned(), port))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (host, port) = parse_broker(&cli.broker)?;
    let credentials = match (cli.username, cli.password) {
        (Some(user), Some(password)) => Some((user, password)),
        (Some(user), None) => Some((user, String::new())),
        (None, Some(_)) => bail!("--password needs --username"),
        (None, None) => None,
    };
    let config = FleetConfig {
        host,
        port,
        credentials,
        site: cli.site,
        devices: cli.devices,
        scenario: cli.scenario,
        rate: cli.rate,
        connections: cli.connections,
        interval_s: cli.interval_s,
        telemetry_qos1: cli.telemetry_qos1,
        offline_after: seconds(cli.offline_after, "--offline-after")?,
        offline_for: seconds(cli.offline_for, "--offline-for")?,
        seed: cli.seed,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let duration = cli.duration.map(|d| seconds(d, "--duration")).transpose()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stats = Arc::new(FleetStats::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let fleet = tokio::spawn(sim::run(config.clone(), Arc::clone(&stats), stop_rx));
        let progress = tokio::spawn(report_progress(Arc::clone(&stats)));
        let deadline = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = deadline => {}
            _ = tokio::signal::ctrl_c() => {}
            result = terminate() => result?,
        }
        let elapsed = started.elapsed();
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(10), fleet).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(message))) => bail!(message),
            Ok(Err(join)) => bail!("fleet task failed: {join}"),
            Err(_) => eprintln!("edge-sim: devices did not stop within 10 s"),
        }
        progress.abort();
        let mut summary = stats.summary(&config, elapsed);
        summary["rss_peak_mib"] = peak_rss_mib().into();
        println!("{summary}");
        Ok(())
    })
}

/// Resolves on SIGTERM, so a harness can stop the simulator and still get its summary.
async fn terminate() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        Ok(())
    }
    #[cfg(not(unix))]
    std::future::pending().await
}

async fn report_progress(stats: Arc<FleetStats>) {
    let mut last = (Instant::now(), 0u64);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let now = (Instant::now(), stats.published());
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
        eprintln!("edge-sim: {:.0} msg/s, {} published, {} buffered", rate, now.1, stats.buffered.load(std::sync::atomic::Ordering::Relaxed));
        last = now;
    }
}

/// The process's peak resident set (VmHWM), MiB; 0 where /proc is missing.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    (kib / 1024.0 * 10.0).round() / 10.0
}
