//! `bench-alert-latency`: publish → incident at the webhook receiver (SPEC §7), under edge-sim
//! background load, with the gateway's embedded broker (`--mode embedded`) or subscribed to a
//! Mosquitto in front (`--mode external`). One incident at a time: a fresh gas detector reports
//! 55 %LEL once, and the time until its `gas_high` (revision 1) reaches a real webhook receiver
//! is one sample. Prints percentiles; passes or fails nothing on time.
//!
//! With `--node-red DIR` (a directory where `npm install node-red@4` was run), Node-RED runs
//! beside the gateway on the same broker and the same background load, with the flow of SPEC §7:
//! MQTT in (every telemetry topic, JSON) → one threshold (`values.gas_lel` ≥ 50) → HTTP POST to
//! a receiver in this process. Each publish is one sample for both; both tables are printed.
//!
//! `--trigger event` sends the device's own alarm instead (`event: alarm`, `gas_lel` 55 on the
//! `event` topic, which takes the gateway's alert lane and, in external mode, its alert
//! connection); the sample ends at the incident's revision 1 at the receiver, whatever rule the
//! situation carries (`device_alarm` or `gas_high`). Node-RED's flow then listens on the event
//! topics and passes `event == "alarm"`.
//!
//! Usage: bench-alert-latency [N=1000] [--mode embedded|external] [--trigger telemetry|event]
//!        [--node-red DIR] [--rate MSGS_PER_S=1900] [--devices 1000] [--connections 2]
//!        [--warmup SECS=5]
//! (scripts/bench-alert-latency builds the release binaries first and runs this.)
//!
//! The default rate aims at ~10k readings/s: an edge-sim telemetry message of a mixed fleet
//! carries ~5.3 readings as the gateway counts them (values plus battery_v and rssi_dbm). The
//! achieved figure, from the gateway's `citywatch_readings_total`, is printed with the result.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use citywatch_tests::figures::{metric_sum, Percentiles};
use citywatch_tests::{
    birth, device_topic, spawn_edge_sim, GatewayProcess, Mosquitto, Publisher, QoS, WebhookReceiver,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
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
    external: bool,
    /// The device's own `alarm` event instead of a telemetry reading over the threshold.
    event: bool,
    node_red: Option<std::path::PathBuf>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            n: 1000,
            rate: 1900.0,
            devices: 1000,
            connections: 2,
            warmup: Duration::from_secs(5),
            external: false,
            event: false,
            node_red: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--mode" => {
                    args.external = match value("--mode")?.as_str() {
                        "external" => true,
                        "embedded" => false,
                        other => bail!("--mode {other:?}: embedded or external"),
                    }
                }
                "--trigger" => {
                    args.event = match value("--trigger")?.as_str() {
                        "event" => true,
                        "telemetry" => false,
                        other => bail!("--trigger {other:?}: telemetry or event"),
                    }
                }
                "--node-red" => args.node_red = Some(value("--node-red")?.into()),
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
                    println!("usage: bench-alert-latency [N=1000] [--mode embedded|external] [--trigger telemetry|event] [--node-red DIR] [--rate MSGS_PER_S=1900] [--devices 1000] [--connections 2] [--warmup SECS=5]");
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

/// (readings, telemetry messages) taken in so far.
fn ingest_counters(gw: &GatewayProcess) -> anyhow::Result<(f64, f64)> {
    let text = gw.get_text("/metrics")?;
    let telemetry = text
        .lines()
        .find_map(|l| l.strip_prefix("citywatch_messages_received_total{channel=\"telemetry\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok((metric_sum(&text, "citywatch_readings_total"), telemetry))
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
    let mosquitto = if args.external { Some(Mosquitto::start().await?) } else { None };
    let gw = match &mosquitto {
        Some(m) => {
            eprintln!("starting the release gateway (external mode, Mosquitto at {}) ...", m.addr());
            GatewayProcess::start_external(&m.addr(), &webhook).await?
        }
        None => {
            eprintln!("starting the release gateway (embedded broker) ...");
            GatewayProcess::start_embedded(&webhook).await?
        }
    };
    let broker = match &mosquitto {
        Some(m) => m.addr(),
        None => gw.mqtt_addr().context("embedded broker")?.to_owned(),
    };
    let node_red = match &args.node_red {
        Some(dir) => Some(NodeRed::start(dir, &broker, args.event).await?),
        None => None,
    };

    let rate = args.rate.to_string();
    let devices = args.devices.to_string();
    let connections = args.connections.to_string();
    eprintln!(
        "background load: edge-sim --rate {rate} --devices {devices} --connections {connections}"
    );
    let load_broker = broker.clone();
    let load = tokio::task::spawn_blocking(move || {
        spawn_edge_sim(&[
            "--broker",
            &load_broker,
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
                .get(&format!("/api/v1/devices?site={SITE}&limit=1"))
                .ok()?;
            (body["total"].as_u64()? >= want).then_some(())
        },
    )
    .await;

    let mut feed = receiver.subscribe();
    let mut latencies_ms = Vec::with_capacity(args.n);
    let mut red_latencies_ms = Vec::with_capacity(args.n);
    let mut red_missed = 0usize;
    let mut red_feed = node_red.as_ref().map(|r| r.subscribe());
    let mut missed = Vec::new();
    let (readings_0, telemetry_0) = ingest_counters(&gw)?;
    let t0 = Instant::now();
    for (k, id) in ids.iter().enumerate() {
        let warm = k < WARM_INCIDENTS;
        let (topic, payload) = if args.event {
            (
                device_topic(SITE, id, "event"),
                json!({"seq": k + 1, "ts": now_ms(), "event": "alarm", "metric": "gas_lel", "value": 55.0}),
            )
        } else {
            (
                device_topic(SITE, id, "telemetry"),
                json!({"seq": k + 1, "ts": now_ms(), "values": {"gas_lel": 55.0, "valve_closed": 0}}),
            )
        };
        let payload = payload.to_string().into_bytes();
        let published = Instant::now();
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await?;
        let deadline = tokio::time::Instant::from_std(published + PER_INCIDENT);
        let arrived = loop {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(d))
                    if (args.event || d.rule() == "gas_high")
                        && d.device() == id.as_str()
                        && d.revision() == 1 =>
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
                "the first incident never reached the receiver within {PER_INCIDENT:?}\n{}\n{}",
                receiver.report(),
                citywatch_tests::tail(&gw.logs(), 40)
            ),
            None if warm => {}
            None => missed.push(id.clone()),
        }
        if let Some(red) = red_feed.as_mut() {
            // Node-RED's POST of the same reading (usually in already).
            let seq = (k + 1) as u64;
            let got = loop {
                match tokio::time::timeout_at(deadline, red.recv()).await {
                    Ok(Some((s, at))) if s == seq => break Some(at),
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break None,
                }
            };
            match got {
                Some(at) if !warm => red_latencies_ms.push(at.saturating_duration_since(published).as_secs_f64() * 1000.0),
                Some(_) => {}
                None if warm => {}
                None => red_missed += 1,
            }
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
        let count = metric_sum(&text, &format!("{name}_count"));
        if count > 0.0 { metric_sum(&text, &format!("{name}_sum")) / count * 1000.0 } else { 0.0 }
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
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    let ours = Percentiles::of(&latencies_ms);
    let mode = if args.external { "external" } else { "embedded" };
    let trigger = if args.event { "event" } else { "telemetry" };
    let what = if args.event { "alarm event → incident" } else { "telemetry → gas_high" };
    println!("alert latency ({mode} mode, {what}): publish → revision 1 at the webhook receiver");
    println!("  missed      {:>10}", missed.len());
    println!("{}", ours.rows("ms"));
    println!("  background  {:>10.0} readings/s  ({:.0} telemetry msgs/s, {:.2} readings/msg, asked {} msgs/s, {} devices, {} connections)", readings_per_s, telemetry_per_s, per_message, args.rate, args.devices, args.connections);
    println!("  inside      {:>10.3} ms mean incident-store commit (fsync), {:.3} ms mean message arrival → change committed", commit_ms, path_ms);
    let red = node_red.as_ref().map(|_| {
        let theirs = Percentiles::of(&red_latencies_ms);
        println!("Node-RED 4, same broker and load: publish → HTTP POST at the receiver");
        println!("  missed      {:>10}", red_missed);
        println!("{}", theirs.rows("ms"));
        json!({"measured": theirs.count, "missed": red_missed, "p50_ms": round(theirs.p50),
               "p90_ms": round(theirs.p90), "p99_ms": round(theirs.p99), "max_ms": round(theirs.max), "mean_ms": round(theirs.mean)})
    });
    if let Some(red) = &red {
        let theirs = red["p99_ms"].as_f64().unwrap_or(0.0);
        if theirs > 0.0 {
            println!("  ratio       {:>10.2}  (Citywatch p99 / Node-RED p99; target ≤ 0.5)", ours.p99 / theirs);
        }
    }
    let line = json!({
        "bench": "alert_latency",
        "mode": mode,
        "trigger": trigger,
        "node_red": red,
        "gateway_commit_mean_ms": round(commit_ms),
        "gateway_arrival_to_commit_mean_ms": round(path_ms),
        "n": args.n,
        "measured": latencies_ms.len(),
        "missed": missed.len(),
        "p50_ms": round(ours.p50),
        "p90_ms": round(ours.p90),
        "p99_ms": round(ours.p99),
        "max_ms": round(ours.max),
        "mean_ms": round(ours.mean),
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
    drop(node_red);
    drop(mosquitto);
    if !missed.is_empty() {
        eprintln!(
            "missed (no incident within {PER_INCIDENT:?}): {:?}",
            &missed[..missed.len().min(20)]
        );
    }
    Ok(())
}


/// Node-RED 4 with the flow MQTT in → threshold → HTTP POST, and the receiver of its POSTs.
struct NodeRed {
    child: std::process::Child,
    posts: std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<(u64, Instant)>>>>,
    _dir: tempfile::TempDir,
}

impl NodeRed {
    /// `event`: the flow listens on the event topics and passes `event == "alarm"` (the
    /// device's own alarm) instead of the telemetry threshold.
    async fn start(install: &std::path::Path, broker: &str, event: bool) -> anyhow::Result<NodeRed> {
        let bin = install.join("node_modules/.bin/node-red");
        anyhow::ensure!(bin.exists(), "{} missing: npm install node-red@4 there first", bin.display());
        let (host, port) = broker.rsplit_once(':').context("broker host:port")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let post_port = listener.local_addr()?.port();
        let posts: std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<(u64, Instant)>>>> = Default::default();
        let sink = posts.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve_posts(socket, sink.clone()));
            }
        });
        let dir = tempfile::Builder::new().prefix("citywatch-node-red-").tempdir()?;
        let (topic, property, rule) = if event {
            ("citywatch/v1/+/+/event", "payload.event", json!({"t": "eq", "v": "alarm", "vt": "str"}))
        } else {
            ("citywatch/v1/+/+/telemetry", "payload.values.gas_lel", json!({"t": "gte", "v": "50", "vt": "num"}))
        };
        let flow = json!([
            {"id": "tab1", "type": "tab", "label": "bench"},
            {"id": "broker1", "type": "mqtt-broker", "name": "bench", "broker": host, "port": port,
             "clientid": format!("node-red-bench-{}", std::process::id()), "autoConnect": true, "usetls": false,
             "protocolVersion": "4", "keepalive": "60", "cleansession": true},
            {"id": "in1", "type": "mqtt in", "z": "tab1", "topic": topic, "qos": "1",
             "datatype": "json", "broker": "broker1", "nl": false, "rap": false, "inputs": 0, "wires": [["sw1"]]},
            {"id": "sw1", "type": "switch", "z": "tab1", "property": property, "propertyType": "msg",
             "rules": [rule], "checkall": "true", "outputs": 1, "wires": [["post1"]]},
            {"id": "post1", "type": "http request", "z": "tab1", "method": "POST", "ret": "txt", "paytoqs": "ignore",
             "url": format!("http://127.0.0.1:{post_port}/alert"), "wires": [[]]}
        ]);
        let flow_path = dir.path().join("flows.json");
        std::fs::write(&flow_path, flow.to_string())?;
        let log = std::fs::File::create(dir.path().join("node-red.log"))?;
        let ui_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new(&bin)
            .arg("--userDir").arg(dir.path())
            .arg("--port").arg(ui_port.to_string())
            .arg(&flow_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // Ready once it says it connected to the broker.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = std::fs::read_to_string(dir.path().join("node-red.log")).unwrap_or_default();
            if text.contains("Connected to broker") {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "Node-RED did not connect to {broker} within 90 s:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("Node-RED {} running beside the gateway on {broker}", node_red_version(install));
        Ok(NodeRed { child, posts, _dir: dir })
    }

    /// POSTs from now on: (the reading's `seq`, when the body was in).
    fn subscribe(&self) -> mpsc::UnboundedReceiver<(u64, Instant)> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut slot) = self.posts.lock() {
            *slot = Some(tx);
        }
        rx
    }
}

impl Drop for NodeRed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_red_version(install: &std::path::Path) -> String {
    std::fs::read_to_string(install.join("node_modules/node-red/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A minimal HTTP/1.1 server for Node-RED's POSTs (keep-alive; Content-Length bodies).
async fn serve_posts(
    mut socket: tokio::net::TcpStream,
    sink: std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<(u64, Instant)>>>>,
) {
    let _ = socket.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + 4 + length {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let at = Instant::now();
        let body: Vec<u8> = buf.drain(..head_end + 4 + length).skip(head_end + 4).collect();
        if let Some(seq) = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["seq"].as_u64()) {
            if let Some(tx) = sink.lock().ok().and_then(|s| s.clone()) {
                let _ = tx.send((seq, at));
            }
        }
        if socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.is_err() {
            return;
        }
    }
}
