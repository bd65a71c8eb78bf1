//! `bench-cluster`: cluster mode on this machine (issue 17, SPEC §7/§9), in one run:
//!
//! 1. **ingest**: a fresh three-node nats-server cluster with 1, 2, … `--gateways` gateways;
//!    edge-sim flat out for `--ingest-secs`, one process per site over `--sites` sites (so the
//!    load spreads over partitions), each on a NATS node's MQTT port in turn. Prints what
//!    edge-sim published, what the gateways took in and committed, messages/s, and the loss on
//!    the way (QoS 0 telemetry the brokers dropped).
//! 2. **failover**: three gateways; `--kills` times SIGKILL the owner of a site, then publish a
//!    fresh gas detector's birth and a 55 %LEL reading there at once: the time from the kill
//!    until its `gas_high` reaches the webhook receiver (sent by the new owner) is one sample.
//!    The killed gateway is restarted and the partitions settle before the next kill.
//! 3. **latency**: three gateways under `--rate` msg/s of background telemetry (edge-sim over
//!    the sites), `--n` sequential incidents from fresh devices on eight sites: publish →
//!    `gas_high` (revision 1) at the receiver.
//!
//! Everything shares two cores here: three NATS nodes, the gateways, edge-sim and this process.
//! The scaling figures say what this machine does, not what three machines would. Measures
//! only: nothing passes or fails on time.
//!
//! Usage: bench-cluster [--phases ingest,failover,latency] [--gateways 3] [--ingest-secs 10]
//!        [--sites 8] [--devices 1000] [--kills 10] [--n 300] [--rate 1900] [--partitions 16]
//!        [--lease-ttl 3s]
//! (scripts/bench-cluster builds the release binaries first and runs this.)

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use citywatch_gateway::cluster::nats_config::partition_of;
use citywatch_tests::figures::{cluster_status, metric_series, metric_sum, partition_owners, Percentiles};
use citywatch_tests::{birth, device_topic, spawn_edge_sim, wait_for, ChildGuard, GatewayProcess, NatsCluster, Publisher, QoS, WebhookReceiver};
use serde_json::{json, Value};

const SECRET: &str = "bench-cluster-secret";
/// Bound of every "until the cluster has settled" wait.
const SETTLE: Duration = Duration::from_secs(90);
/// Bound of the wait for one incident; a miss is counted and reported.
const PER_INCIDENT: Duration = Duration::from_secs(60);
const TELEMETRY: &str = "citywatch_messages_received_total{channel=\"telemetry\"}";
const WRITTEN: &str = "citywatch_store_readings_written";

#[derive(Debug, Clone)]
struct Args {
    phases: Vec<String>,
    gateways: usize,
    ingest_secs: u64,
    sites: usize,
    devices: usize,
    kills: usize,
    n: usize,
    rate: f64,
    partitions: u16,
    lease_ttl: String,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut a = Args {
            phases: vec!["ingest".into(), "failover".into(), "latency".into()],
            gateways: 3,
            ingest_secs: 10,
            sites: 8,
            devices: 1000,
            kills: 10,
            n: 300,
            rate: 1900.0,
            partitions: 16,
            lease_ttl: "3s".into(),
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--phases" => a.phases = value("--phases")?.split(',').map(str::to_owned).collect(),
                "--gateways" => a.gateways = value("--gateways")?.parse().context("--gateways")?,
                "--ingest-secs" => a.ingest_secs = value("--ingest-secs")?.parse().context("--ingest-secs")?,
                "--sites" => a.sites = value("--sites")?.parse().context("--sites")?,
                "--devices" => a.devices = value("--devices")?.parse().context("--devices")?,
                "--kills" => a.kills = value("--kills")?.parse().context("--kills")?,
                "--n" => a.n = value("--n")?.parse().context("--n")?,
                "--rate" => a.rate = value("--rate")?.parse().context("--rate")?,
                "--partitions" => a.partitions = value("--partitions")?.parse().context("--partitions")?,
                "--lease-ttl" => a.lease_ttl = value("--lease-ttl")?,
                "-h" | "--help" => {
                    println!("usage: bench-cluster [--phases ingest,failover,latency] [--gateways 3] [--ingest-secs 10] [--sites 8] [--devices 1000] [--kills 10] [--n 300] [--rate 1900] [--partitions 16] [--lease-ttl 3s]");
                    std::process::exit(0);
                }
                other => bail!("unknown option {other} (see --help)"),
            }
        }
        for p in &a.phases {
            anyhow::ensure!(["ingest", "failover", "latency"].contains(&p.as_str()), "--phases: unknown phase {p:?} (ingest, failover, latency)");
        }
        anyhow::ensure!(a.gateways >= 1 && a.sites >= 1 && a.devices >= a.sites && a.partitions >= 1 && a.rate > 0.0, "--gateways, --sites, --partitions and --rate must be positive, --devices at least --sites");
        Ok(a)
    }
}

/// A NATS cluster, gateways `gw-1…` on it, and one webhook receiver they all push to.
struct Bench {
    nats: NatsCluster,
    gateways: Vec<GatewayProcess>,
    receiver: WebhookReceiver,
    partitions: u16,
}

impl Bench {
    async fn start(args: &Args, gateways: usize) -> anyhow::Result<Bench> {
        let nats = NatsCluster::start(3, args.partitions).await.context("3-node NATS cluster")?;
        let receiver = WebhookReceiver::start(SECRET).await?;
        let mut bench = Bench { nats, gateways: Vec::new(), receiver, partitions: args.partitions };
        for i in 1..=gateways {
            let section = format!(
                "{}[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n[notify.retry]\ninitial = \"100ms\"\nmax = \"1s\"\n",
                bench.nats.gateway_section(&format!("gw-{i}"), args.partitions, &args.lease_ttl),
                bench.receiver.url()
            );
            bench.gateways.push(GatewayProcess::start_cluster(&section).await.with_context(|| format!("gateway gw-{i}"))?);
        }
        bench.settle().await?;
        Ok(bench)
    }

    fn names(&self) -> Vec<String> {
        (1..=self.gateways.len()).map(|i| format!("gw-{i}")).collect()
    }

    /// Waits until every partition has an owner and every gateway owns some; returns the owners.
    async fn settle(&self) -> anyhow::Result<Vec<String>> {
        let names = self.names();
        let config = self.gateways[0].config_path().to_owned();
        let partitions = self.partitions as usize;
        wait_for("every partition owned, every gateway owning some", SETTLE, || {
            let owners = partition_owners(&cluster_status(&config).ok()?);
            let complete = owners.len() == partitions && owners.iter().all(|o| names.contains(o));
            (complete && names.iter().all(|n| owners.contains(n))).then_some(owners)
        })
        .await
    }

    /// A site name with `prefix` whose partition `owners` gives to `who`.
    fn site_owned_by(&self, owners: &[String], who: &str, prefix: &str) -> String {
        (0..100_000).map(|i| format!("{prefix}{i}")).find(|s| owners[partition_of(s, self.partitions) as usize] == who).unwrap_or_else(|| format!("{prefix}0"))
    }

    /// (telemetry messages taken in, readings committed) summed over the live gateways.
    fn ingest_counters(&self) -> (f64, f64) {
        self.gateways
            .iter()
            .filter_map(|g| g.get_text("/metrics").ok())
            .map(|t| (metric_series(&t, TELEMETRY), metric_sum(&t, WRITTEN)))
            .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// One edge-sim per site `{prefix}{j}`, devices and rate split evenly, nodes in turn.
    fn load(&self, args: &Args, prefix: &str, rate: f64, duration: Option<u64>) -> Vec<ChildGuard> {
        (0..args.sites)
            .map(|j| {
                let broker = self.nats.nodes[j % self.nats.nodes.len()].mqtt_addr();
                let site = format!("{prefix}{j}");
                let devices = (args.devices / args.sites).to_string();
                let rate = (rate / args.sites as f64).to_string();
                let duration = duration.map(|d| d.to_string());
                let mut a = vec!["--broker", &broker, "--devices", &devices, "--site", &site, "--rate", &rate, "--connections", "1"];
                if let Some(d) = duration.as_deref() {
                    a.extend(["--duration", d]);
                }
                spawn_edge_sim(&a)
            })
            .collect()
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let mut out = json!({"bench": "cluster", "nats_nodes": 3, "partitions": args.partitions, "lease_ttl": args.lease_ttl, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)});
    if args.phases.iter().any(|p| p == "ingest") {
        out["ingest"] = ingest(&args).await?;
    }
    let wants = |p: &str| args.phases.iter().any(|q| q == p);
    if wants("failover") || wants("latency") {
        eprintln!("starting 3 NATS nodes and 3 gateways ...");
        let mut bench = Bench::start(&args, 3).await?;
        if wants("failover") {
            out["failover"] = failover(&args, &mut bench).await?;
        }
        if wants("latency") {
            out["latency"] = latency(&args, &bench).await?;
        }
    }
    println!("{out}");
    Ok(())
}

/// Phase 1: messages/s with 1…G gateways, each on a fresh cluster.
async fn ingest(args: &Args) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    let mut single = 0.0;
    for g in 1..=args.gateways {
        eprintln!("ingest: starting 3 NATS nodes and {g} gateway(s) ...");
        let bench = Bench::start(args, g).await?;
        let (m0, r0) = bench.ingest_counters();
        let t0 = Instant::now();
        // "Flat out": a rate no machine reaches; edge-sim publishes as fast as its links take.
        let sims = bench.load(args, "ing", 10_000_000.0, Some(args.ingest_secs));
        let mut published = 0.0;
        for mut sim in sims {
            sim.wait_timeout(Duration::from_secs(args.ingest_secs + 60)).await?;
            let summary: Value = sim.stdout().lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap_or(Value::Null);
            published += summary["telemetry"].as_f64().unwrap_or(0.0);
        }
        // Drained: neither counter moved for a second.
        let mut last = bench.ingest_counters();
        let drain_deadline = Instant::now() + SETTLE;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = bench.ingest_counters();
            if now == last || Instant::now() > drain_deadline {
                break;
            }
            last = now;
        }
        let span = (t0.elapsed().as_secs_f64() - 1.0).max(args.ingest_secs as f64);
        let (m1, r1) = last;
        let taken = m1 - m0;
        let rate = taken / span;
        if g == 1 {
            single = rate;
        }
        let lost = (published - taken).max(0.0);
        println!(
            "ingest, {g} gateway(s): edge-sim published {published:.0} ({:.0} msg/s); gateways took in {taken:.0} ({rate:.0} msg/s, {:.2}× one gateway), committed {:.0} readings ({:.0}/s) over {span:.1} s; not received {lost:.0} = {:.1} %",
            published / args.ingest_secs as f64,
            if single > 0.0 { rate / single } else { 0.0 },
            r1 - r0,
            (r1 - r0) / span,
            100.0 * lost / published.max(1.0)
        );
        rows.push(json!({"gateways": g, "published": published, "taken_in": taken, "msgs_per_s": rate.round(), "readings_per_s": ((r1 - r0) / span).round(), "lost_pct": (1000.0 * lost / published.max(1.0)).round() / 10.0, "span_s": span}));
    }
    Ok(Value::Array(rows))
}

/// Phase 2: kill → the new owner's first push for the dead gateway's site.
async fn failover(args: &Args, bench: &mut Bench) -> anyhow::Result<Value> {
    let mut samples = Vec::new();
    let mut missed = 0;
    let publisher = Publisher::connect(&bench.nats.nodes[0].mqtt_addr(), 64).await?;
    for k in 0..args.kills {
        let owners = bench.settle().await?;
        let victim = k % bench.gateways.len();
        let site = bench.site_owned_by(&owners, &format!("gw-{}", victim + 1), &format!("fo{k}x"));
        let device = format!("fo-gas-{k}");
        let mut feed = bench.receiver.subscribe();
        bench.gateways[victim].kill();
        let killed = Instant::now();
        publisher.publish_json(&device_topic(&site, &device, "status"), true, &birth("gas_detector", 3600)).await?;
        let body = json!({"seq": 1, "ts": wall_ms(), "values": {"gas_lel": 55.0, "valve_closed": 0}});
        publisher.publish_json(&device_topic(&site, &device, "telemetry"), false, &body).await?;
        let deadline = tokio::time::Instant::from_std(killed + PER_INCIDENT);
        let arrived = loop {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(d)) if d.rule() == "gas_high" && d.device() == device => break Some(d.received),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break None,
            }
        };
        match arrived {
            Some(at) => {
                let s = at.saturating_duration_since(killed).as_secs_f64();
                eprintln!("failover {}/{}: gw-{} killed, site {site}: first push after {s:.2} s", k + 1, args.kills, victim + 1);
                samples.push(s);
            }
            None => {
                eprintln!("failover {}/{}: no gas_high within {PER_INCIDENT:?}", k + 1, args.kills);
                missed += 1;
            }
        }
        bench.gateways[victim].restart().await.with_context(|| format!("restarting gw-{}", victim + 1))?;
    }
    let p = Percentiles::of(&samples);
    println!("failover (SIGKILL of the site's owner → the new owner's first push), lease TTL {}:\n{}\n  missed      {missed:>10}", args.lease_ttl, p.rows("s"));
    let mut v = p.json();
    v["missed"] = missed.into();
    Ok(v)
}

/// Phase 3: publish → webhook under background telemetry, three gateways.
async fn latency(args: &Args, bench: &Bench) -> anyhow::Result<Value> {
    let load = bench.load(args, "load", args.rate, None);
    let (messages_before, _) = bench.ingest_counters();
    wait_for("background telemetry flowing", SETTLE, || (bench.ingest_counters().0 > messages_before + 1000.0).then_some(())).await?;
    const WARM: usize = 10;
    const SITES: usize = 8;
    let ids: Vec<(String, String)> = (0..WARM + args.n).map(|i| (format!("lat{}", i % SITES), format!("lat-gas-{i}"))).collect();
    let mut publisher = Publisher::connect(&bench.nats.nodes[1].mqtt_addr(), ids.len() + 16).await?;
    for (site, id) in &ids {
        publisher.publish_json(&device_topic(site, id, "status"), true, &birth("gas_detector", 3600)).await?;
    }
    publisher.wait_acked(ids.len() as u64, Duration::from_secs(120)).await?;
    let want = ids.len() as u64;
    wait_for("every latency device registered by its owner", SETTLE, || {
        let known: u64 = (0..SITES)
            .flat_map(|s| bench.gateways.iter().map(move |g| g.get(&format!("/api/v1/devices?site=lat{s}&limit=1")).ok().and_then(|b| b["total"].as_u64()).unwrap_or(0)))
            .sum();
        (known >= want).then_some(())
    })
    .await?;
    let mut feed = bench.receiver.subscribe();
    let mut samples = Vec::new();
    let mut missed = 0;
    let (m0, _) = bench.ingest_counters();
    let t0 = Instant::now();
    for (k, (site, id)) in ids.iter().enumerate() {
        let body = json!({"seq": 1, "ts": wall_ms(), "values": {"gas_lel": 55.0, "valve_closed": 0}}).to_string().into_bytes();
        let published = Instant::now();
        publisher.publish(&device_topic(site, id, "telemetry"), QoS::AtLeastOnce, false, body).await?;
        let deadline = tokio::time::Instant::from_std(published + PER_INCIDENT);
        let arrived = loop {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(d)) if d.rule() == "gas_high" && d.device() == id.as_str() && d.revision() == 1 => break Some(d.received),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break None,
            }
        };
        match arrived {
            Some(at) if k >= WARM => samples.push(at.saturating_duration_since(published).as_secs_f64() * 1000.0),
            Some(_) => {}
            None => missed += 1,
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let background = (bench.ingest_counters().0 - m0) / elapsed;
    drop(load);
    let p = Percentiles::of(&samples);
    println!("alert latency (cluster mode, 3 gateways): publish → gas_high (revision 1) at the receiver\n{}\n  missed      {missed:>10}\n  background  {background:>10.0} telemetry msgs/s (asked {} msgs/s over {} sites)", p.rows("ms"), args.rate, args.sites);
    let mut v = p.json();
    v["missed"] = missed.into();
    v["background_msgs_per_s"] = background.round().into();
    Ok(v)
}

fn wall_ms() -> i64 {
    citywatch_edge::sim::fleet::wall_ms() as i64
}
