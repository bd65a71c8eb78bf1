//! `bench-alert-latency`: publish → incident at the webhook receiver (SPEC §7), under edge-sim
//! background load on the release gateway's embedded broker. One incident at a time: a fresh
//! gas detector reports 55 %LEL once, and the time until its `gas_high` (revision 1) reaches a
//! real webhook receiver is one sample. Prints percentiles; passes or fails nothing on time.
//!
//! Usage: bench-alert-latency [N=1000] [--rate MSGS_PER_S=1900] [--devices 1000]
//!        [--connections 2] [--warmup SECS=5]
//! (scripts/bench-alert-latency builds the release binaries first and runs this.)
//!
//! The default rate aims at ~10k readings/s: an edge-sim telemetry message of a mixed fleet
//! carries ~5.3 readings as the gateway counts them (values plus battery_v and rssi_dbm). The
//! achieved figure, from the gateway's `citywatch_readings_total`, is printed with the result.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use citywatch_tests::{
    birth, device_topic, spawn_edge_sim, GatewayProcess, Publisher, QoS, WebhookReceiver,
};
use serde_json::json;

const SECRET: &str = "bench-secret";
const SITE: &str = "bench";
/// Unmeasured incidents first: the receiver's connection, the gateway's caches, the page cache.
const WARM_INCIDENTS: usize = 10;
/// Bound of the wait for one incident; a miss is counted and reported, not fatal.
const PER_INCIDENT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Args {
    n: usize,
    rate: f64,
    devices: usize,
    connections: usize,
    warmup: Duration,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            n: 1000,
            rate: 1900.0,
            devices: 1000,
            connections: 2,
            warmup: Duration::from_secs(5),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--rate" => args.rate = value("--rate")?.parse().context("--rate")?,
                "--devices" => args.devices = value("--devices")?.parse().context("--devices")?,
                "--connections" => {
                    args.connections = value("--connections")?.parse().context("--connections")?
                }
                "--warmup" => {
                    args.warmup =
                        Duration::from_secs_f64(value("--warmup")?.parse().context("--warmup")?)
                }
                "-h" | "--help" => {
                    println!("usage: bench-alert-latency [N=1000] [--rate MSGS_PER_S=1900] [--devices 1000] [--connections 2] [--warmup SECS=5]");
                    std::process::exit(0);
                }
                n if !n.starts_with('-') => {
                    args.n = n.parse().with_context(|| format!("N {n:?}"))?
                }
                other => bail!("unknown option {other}"),
            }
        }
        anyhow::ensure!(
            args.n > 0 && args.rate > 0.0 && args.devices > 0 && args.connections > 0,
            "N, --rate, --devices and --connections must be positive"
        );
        Ok(args)
    }
}

/// The sum over all label sets of the counter `name` in Prometheus text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// (readings, telemetry messages) taken in so far.
fn ingest_counters(gw: &GatewayProcess) -> anyhow::Result<(f64, f64)> {
    let text = gw.get_text("/metrics")?;
    let telemetry = text
        .lines()
        .find_map(|l| l.strip_prefix("citywatch_messages_received_total{channel=\"telemetry\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok((counter(&text, "citywatch_readings_total"), telemetry))
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn now_ms() -> i64 {
    citywatch_edge::sim::fleet::wall_ms() as i64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let receiver = WebhookReceiver::start(SECRET).await?;
    let webhook = format!(
        "[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n[notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n",
        receiver.url()
    );
    eprintln!("starting the release gateway (embedded broker) ...");
    let gw = GatewayProcess::start_embedded(&webhook).await?;
    let broker = gw.mqtt_addr().context("embedded broker")?.to_owned();

    let rate = args.rate.to_string();
    let devices = args.devices.to_string();
    let connections = args.connections.to_string();
    eprintln!(
        "background load: edge-sim --rate {rate} --devices {devices} --connections {connections}"
    );
    let load = tokio::task::spawn_blocking(move || {
        spawn_edge_sim(&[
            "--broker",
            &broker,
            "--devices",
            &devices,
            "--site",
            "load",
            "--rate",
            &rate,
            "--connections",
            &connections,
        ])
    })
    .await?;
    let broker = gw.mqtt_addr().context("embedded broker")?.to_owned();

    // Warm-up: the load flowing into the gateway, then a little longer to settle.
    let (start_readings, _) = ingest_counters(&gw)?;
    gw.wait_for(
        Duration::from_secs(30),
        "background readings flowing",
        |gw| {
            let (readings, _) = ingest_counters(gw).ok()?;
            (readings > start_readings + 1000.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(args.warmup).await;

    // Every bench device is born once, up front (retained status), and registered.
    let ids: Vec<String> = (0..WARM_INCIDENTS)
        .map(|j| format!("bench-warm-{j}"))
        .chain((0..args.n).map(|i| format!("bench-gas-{i}")))
        .collect();
    let mut publisher = Publisher::connect(&broker, ids.len() + 16).await?;
    for id in &ids {
        publisher
            .publish_json(
                &device_topic(SITE, id, "status"),
                true,
                &birth("gas_detector", 3600),
            )
            .await?;
    }
    publisher
        .wait_acked(ids.len() as u64, Duration::from_secs(120))
        .await?;
    let want = ids.len() as u64;
    gw.wait_for(
        Duration::from_secs(120),
        "every bench device registered",
        |gw| {
            let body = gw
                .get(&format!("/api/v1/devices?site={SITE}&limit={want}"))
                .ok()?;
            (body["count"].as_u64()? >= want).then_some(())
        },
    )
    .await;

    let mut feed = receiver.subscribe();
    let mut latencies_ms = Vec::with_capacity(args.n);
    let mut missed = Vec::new();
    let (readings_0, telemetry_0) = ingest_counters(&gw)?;
    let t0 = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        let warm = k < WARM_INCIDENTS;
        let topic = device_topic(SITE, id, "telemetry");
        let payload =
            json!({"seq": 1, "ts": now_ms(), "values": {"gas_lel": 55.0, "valve_closed": 0}})
                .to_string()
                .into_bytes();
        let published = Instant::now();
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await?;
        let deadline = tokio::time::Instant::from_std(published + PER_INCIDENT);
        let arrived = loop {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(d))
                    if d.rule() == "gas_high" && d.device() == id.as_str() && d.revision() == 1 =>
                {
                    break Some(d)
                }
                Ok(Some(_)) => continue, // gas_low, gas_valve_failed, later revisions: not this sample
                Ok(None) | Err(_) => break None,
            }
        };
        match arrived {
            Some(d) if !warm => latencies_ms.push(
                d.received
                    .saturating_duration_since(published)
                    .as_secs_f64()
                    * 1000.0,
            ),
            Some(_) => {}
            None if k == 0 => bail!(
                "the first gas_high never reached the receiver within {PER_INCIDENT:?}\n{}\n{}",
                receiver.report(),
                citywatch_tests::tail(&gw.logs(), 40)
            ),
            None if warm => {}
            None => missed.push(id.clone()),
        }
        if !warm && (k - WARM_INCIDENTS + 1).is_multiple_of(100) {
            eprintln!("{} / {} incidents", k - WARM_INCIDENTS + 1, args.n);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (readings_1, telemetry_1) = ingest_counters(&gw)?;
    // What the steps inside the gateway cost (its own histograms, whole run).
    let text = gw.get_text("/metrics")?;
    let mean_of = |name: &str| {
        let count = counter(&text, &format!("{name}_count"));
        if count > 0.0 { counter(&text, &format!("{name}_sum")) / count * 1000.0 } else { 0.0 }
    };
    let commit_ms = mean_of("citywatch_incident_commit_seconds");
    let path_ms = mean_of("citywatch_incident_path_seconds");
    drop(load);

    let readings_per_s = (readings_1 - readings_0) / elapsed;
    let telemetry_per_s = (telemetry_1 - telemetry_0) / elapsed;
    let per_message = if telemetry_1 > telemetry_0 {
        (readings_1 - readings_0) / (telemetry_1 - telemetry_0)
    } else {
        0.0
    };
    let mut sorted = latencies_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    let (p50, p90, p99, max, mean) = if sorted.is_empty() {
        (0.0, 0.0, 0.0, 0.0, 0.0)
    } else {
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        (
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.90),
            percentile(&sorted, 0.99),
            sorted[sorted.len() - 1],
            mean,
        )
    };
    println!("alert latency: publish → gas_high (revision 1) at the webhook receiver");
    println!(
        "  incidents   {:>10}  (missed {})",
        latencies_ms.len(),
        missed.len()
    );
    println!("  p50         {:>10.3} ms", p50);
    println!("  p90         {:>10.3} ms", p90);
    println!("  p99         {:>10.3} ms", p99);
    println!("  max         {:>10.3} ms", max);
    println!("  mean        {:>10.3} ms", mean);
    println!("  background  {:>10.0} readings/s  ({:.0} telemetry msgs/s, {:.2} readings/msg, asked {} msgs/s, {} devices, {} connections)", readings_per_s, telemetry_per_s, per_message, args.rate, args.devices, args.connections);
    println!("  inside      {:>10.3} ms mean incident-store commit (fsync), {:.3} ms mean message arrival → change committed", commit_ms, path_ms);
    let line = json!({
        "bench": "alert_latency",
        "gateway_commit_mean_ms": round(commit_ms),
        "gateway_arrival_to_commit_mean_ms": round(path_ms),
        "n": args.n,
        "measured": latencies_ms.len(),
        "missed": missed.len(),
        "p50_ms": round(p50),
        "p90_ms": round(p90),
        "p99_ms": round(p99),
        "max_ms": round(max),
        "mean_ms": round(mean),
        "elapsed_s": round(elapsed),
        "background": {
            "rate_msgs_per_s": args.rate,
            "devices": args.devices,
            "connections": args.connections,
            "telemetry_msgs_per_s": telemetry_per_s.round(),
            "readings_per_s": readings_per_s.round(),
            "readings_per_msg": round(per_message),
        },
    });
    println!("{line}");
    if !missed.is_empty() {
        eprintln!(
            "missed (no gas_high within {PER_INCIDENT:?}): {:?}",
            &missed[..missed.len().min(20)]
        );
    }
    Ok(())
}
