//! `bench-influx`: the InfluxDB sink's sustained lines/s into a real VictoriaMetrics (its v2
//! write API), and the same server's intake from its fastest own-style client in the same run
//! (tight loops POSTing large pre-built line-protocol bodies), so the ratio says how much of the
//! server's capacity the sink uses. Measures only; passes or fails nothing on time.
//!
//! Usage: bench-influx [LINES=1000000] [--devices 1000] [--clients 1] [--no-gzip]
//! (scripts/bench-influx builds the release binary first and runs this.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use citywatch_edge::wire::{DeviceKind, Metric};
use citywatch_gateway::registry::Registry;
use citywatch_gateway::store::influx::{encode_readings, DeviceTags, InfluxConfig, InfluxSink};
use citywatch_gateway::store::{DeviceRecord, Reading};
use citywatch_tests::VictoriaMetrics;

/// Lines per request body, for the sink (batch_max_lines) and the raw client alike.
const BATCH: usize = 5000;
/// Bound of the whole run of one phase.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

fn device(i: usize) -> String {
    format!("bench-gas-{i}")
}

/// `lines` readings (one line each: every reading has its own timestamp) over `devices`.
fn readings(lines: usize, devices: usize, base_ms: i64, devs: &[Arc<str>]) -> impl Iterator<Item = Reading> + '_ {
    (0..lines).map(move |i| Reading { device: Arc::clone(&devs[i % devices]), metric: Metric::GasLel, ts_ms: base_ms + (i / devices) as i64, value: (i % 1000) as f64 / 10.0, historical: false })
}

fn count_points(vm: &VictoriaMetrics, name: &str) -> anyhow::Result<usize> {
    ureq::get(&format!("{}/internal/force_flush", vm.url())).call()?;
    let mut r = ureq::get(&format!("{}/api/v1/query", vm.url()))
        .query("query", format!("sum(count_over_time({name}[1d]))"))
        .query("time", format!("{}", now_ms() / 1000 + 1))
        .call()?;
    let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    Ok(v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) as usize)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut lines = 1_000_000usize;
    let mut devices = 1000usize;
    let mut clients = 1usize;
    let mut gzip = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--devices" => devices = args.next().context("--devices N")?.parse()?,
            "--clients" => clients = args.next().context("--clients N")?.parse()?,
            "--no-gzip" => gzip = false,
            n => lines = n.parse().with_context(|| format!("LINES, not {n:?}"))?,
        }
    }
    if lines == 0 || devices == 0 || clients == 0 {
        bail!("LINES, --devices and --clients must be positive");
    }
    let vm = VictoriaMetrics::start().await?;
    let dir = tempfile::tempdir()?;
    let base_ms = now_ms() - 6 * 3_600_000;

    // A registry as the gateway's: the sink tags lines with each device's site and kind.
    let registry = Arc::new(Registry::new());
    registry.load((0..devices).map(|i| DeviceRecord {
        id: device(i),
        site: "bench".into(),
        kind: DeviceKind::GasDetector,
        fw: None,
        interval_s: 60,
        location: None,
        install_date: None,
        first_seen_ms: base_ms,
        last_seen_ms: base_ms,
        state_json: "{}".into(),
    }));
    let devs: Vec<Arc<str>> = (0..devices).map(|i| Arc::from(device(i))).collect();

    // A: the sink, fed decode-sized batches of readings as fast as it takes them.
    let config = InfluxConfig { url: vm.url(), gzip, batch_max_lines: BATCH, buffer_max_lines: 4 * BATCH, queue_capacity: 64, ..InfluxConfig::default() };
    let (sink, tap, rx) = InfluxSink::open(config, dir.path(), Some(registry.clone()))?;
    let stats = sink.stats();
    let started = Instant::now();
    let task = tokio::spawn(sink.run(rx));
    let mut batch = Vec::with_capacity(2048);
    for r in readings(lines, devices, base_ms, &devs) {
        batch.push(r);
        if batch.len() == 2048 {
            tap.readings_wait(std::mem::replace(&mut batch, Vec::with_capacity(2048))).await;
        }
    }
    tap.readings_wait(batch).await;
    while stats.lines_written.get() < lines as u64 {
        if started.elapsed() > PHASE_LIMIT {
            bail!("the sink wrote {} of {lines} lines within {PHASE_LIMIT:?}", stats.lines_written.get());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sink_secs = started.elapsed().as_secs_f64();
    drop(tap);
    task.await?;
    let failed = stats.failed_requests.get();
    let sink_stored = count_points(&vm, "reading_gas_lel")?;

    // B: the server's own fastest style: pre-built bodies, `clients` tight POST loops, no gzip.
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let mut tags = |d: &str| Some(DeviceTags { site: format!("raw-{d}"), kind: "gas_detector" });
    let all: Vec<Reading> = readings(lines, devices, base_ms, &devs).map(|mut r| {
        r.metric = Metric::TempC;
        r
    }).collect();
    for chunk in all.chunks(BATCH) {
        let mut buf = Vec::with_capacity(chunk.len() * 90);
        encode_readings(chunk, &mut tags, &mut buf);
        bodies.push(buf);
    }
    drop(all);
    let bodies = Arc::new(bodies);
    let url = format!("{}/api/v2/write?org=city&bucket=citywatch&precision=ms", vm.url());
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (bodies, url) = (Arc::clone(&bodies), url.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let agent = ureq::Agent::new_with_defaults();
                for body in bodies.iter().skip(c).step_by(clients) {
                    agent.post(&url).header("Content-Type", "text/plain").send(&body[..])?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    let raw_secs = started.elapsed().as_secs_f64();
    let raw_stored = count_points(&vm, "reading_temp_c")?;

    let sink_rate = lines as f64 / sink_secs;
    let raw_rate = lines as f64 / raw_secs;
    println!("bench-influx: {lines} lines, {devices} devices, into victoria-metrics {}", vm.url());
    let body = if gzip { "gzip" } else { "plain" };
    println!("  sink ({body}, batches of {BATCH}, one request in flight): {sink_rate:>10.0} lines/s  ({sink_secs:.2} s, {failed} failed requests, {sink_stored} points stored)");
    println!("  raw  ({clients} clients, pre-built bodies of {BATCH}, plain):   {raw_rate:>10.0} lines/s  ({raw_secs:.2} s, {raw_stored} points stored)");
    println!("  ratio sink/raw: {:.2}", sink_rate / raw_rate);
    println!(
        "{}",
        serde_json::json!({"gzip": gzip, "lines": lines, "devices": devices, "clients": clients, "sink_lines_per_s": sink_rate.round(), "raw_lines_per_s": raw_rate.round(), "ratio": (sink_rate / raw_rate * 100.0).round() / 100.0, "sink_points_stored": sink_stored, "raw_points_stored": raw_stored})
    );
    if sink_stored != lines || raw_stored != lines {
        bail!("points stored differ from lines sent: sink {sink_stored}, raw {raw_stored}, sent {lines}");
    }
    Ok(())
}
