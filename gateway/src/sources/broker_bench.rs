//! `scripts/bench-broker`: the embedded broker alone, rmqtt (kept) against rumqttd 0.20 (replaced),
//! each in its own process (this test binary re-run as a server) so its RSS is its own.
//!
//! - **in / out msg/s**: `PUBLISHERS` connections each send `PER_PUBLISHER` QoS 1 PUBLISHes
//!   (64-byte JSON, at most `WINDOW` unacknowledged each) while one subscriber takes them at
//!   QoS 0. in = PUBACKs per second at the publishers; out = messages per second at the
//!   subscriber (first to last); lost = sent − received.
//! - **memory per idle device**: RSS of the broker process before and after N connections with
//!   keep-alive 60 (CONNECT, CONNACK, then idle), divided by N.
//!
//! Hand-written MQTT 3.1.1 frames on raw sockets: the load generator must not be the bottleneck
//! nor hold 100k client objects.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::EmbeddedBroker;
use crate::sources::config::{MqttConfig, MqttMode};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 50_000;
const WINDOW: usize = 1000;
const PAYLOAD: &[u8] = br#"{"seq":42,"ts":1763800000123,"values":{"gas_lel":3.2},"pad":"x"}"#;

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn connect_packet(client_id: &str, keepalive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[4, 0x02]);
    body.extend_from_slice(&keepalive.to_be_bytes());
    string(client_id.as_bytes(), &mut body);
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

fn publish_packet(topic: &str, pkid: u16, out: &mut Vec<u8>) {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(PAYLOAD);
    out.push(0x32);
    remaining_length(body.len(), out);
    out.extend(body);
}

/// Reads whole packets; calls `f(first_byte)` for each. Ends at EOF.
async fn read_packets<R: AsyncReadExt + Unpin>(r: &mut R, mut f: impl FnMut(u8) -> bool) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        loop {
            let Some(&first) = buf.get(pos) else { break };
            let (mut len, mut i) = (0usize, 0);
            let header = loop {
                let Some(&b) = buf.get(pos + 1 + i) else { break None };
                len |= ((b & 0x7f) as usize) << (7 * i);
                i += 1;
                if b & 0x80 == 0 {
                    break Some(1 + i);
                }
            };
            let Some(header) = header else { break };
            if buf.len() < pos + header + len {
                break;
            }
            pos += header + len;
            if !f(first) {
                return Ok(());
            }
        }
        buf.drain(..pos);
    }
}

async fn mqtt_connect(addr: SocketAddr, local: Option<Ipv4Addr>, client_id: &str, keepalive: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = local {
        socket.bind(SocketAddr::from((ip, 0)))?;
    }
    let mut s = socket.connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(client_id, keepalive)).await?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!("CONNACK {connack:?}")));
    }
    Ok(s)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The broker process: `CW_BENCH_BROKER=rmqtt|rumqttd`; prints `READY <port>` and serves until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "server half of scripts/bench-broker"]
async fn bench_broker_server() {
    let which = std::env::var("CW_BENCH_BROKER").unwrap_or_default();
    let port = match which.as_str() {
        "rmqtt" => {
            // The gateway's filter matches nothing of the load: the broker alone.
            let cfg = MqttConfig { mode: MqttMode::Embedded, listen: "127.0.0.1:0".parse().expect("addr"), topic_filter: "citywatch/v1/#".into(), ..MqttConfig::default() };
            let (tx, mut rx) = mpsc::channel(1024);
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
            let broker = EmbeddedBroker::start(&cfg, tx).await.expect("rmqtt starts");
            let port = broker.local_addr().port();
            std::mem::forget(broker);
            port
        }
        "rumqttd" => {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
            let addr = probe.local_addr().expect("addr");
            drop(probe);
            let server = rumqttd::ServerSettings {
                name: "bench".into(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: rumqttd::ConnectionSettings {
                    connection_timeout_ms: 10_000,
                    max_payload_size: 64 * 1024,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            let config = rumqttd::Config {
                id: 0,
                router: rumqttd::RouterConfig {
                    max_connections: 200_000,
                    max_outgoing_packet_count: 20_000,
                    max_segment_size: 8 * 1024 * 1024,
                    max_segment_count: 4,
                    custom_segment: None,
                    initialized_filters: None,
                    shared_subscriptions_strategy: Default::default(),
                },
                v4: Some(std::collections::HashMap::from([("1".to_owned(), server)])),
                ..rumqttd::Config::default()
            };
            std::thread::spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                let _ = broker.start();
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "rumqttd did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
            addr.port()
        }
        other => panic!("CW_BENCH_BROKER={other:?}: rmqtt or rumqttd"),
    };
    println!("READY {port}");
    let _ = std::io::stdout().flush();
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

struct Server {
    child: tokio::process::Child,
    addr: SocketAddr,
}

async fn spawn_server(which: &str) -> Server {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe)
        .args(["--ignored", "--exact", "--nocapture", "sources::broker::bench::bench_broker_server"])
        .env("CW_BENCH_BROKER", which)
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("server process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if let Some(p) = l.strip_prefix("READY ") {
                return p.trim().parse::<u16>().expect("port");
            }
        }
        panic!("server ended before READY");
    })
    .await
    .expect("server ready in time");
    Server { child, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)) }
}

/// (in msg/s, out msg/s, lost)
async fn throughput(addr: SocketAddr) -> (f64, f64, u64) {
    let total = (PUBLISHERS * PER_PUBLISHER) as u64;
    let mut sub = mqtt_connect(addr, None, "bench-sub", 60).await.expect("subscriber");
    let mut subscribe = Vec::new();
    string(b"bench/#", &mut subscribe);
    subscribe.push(0);
    let mut packet = vec![0x82];
    remaining_length(subscribe.len() + 2, &mut packet);
    packet.extend_from_slice(&[0, 1]);
    packet.extend(subscribe);
    sub.write_all(&packet).await.expect("subscribe");
    let mut suback = [0u8; 5];
    sub.read_exact(&mut suback).await.expect("suback");
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let subscriber = tokio::spawn(async move {
        let mut first = None;
        let mut last = Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(120), read_packets(&mut sub, |b| {
            if b >> 4 == 3 {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                counter.fetch_add(1, Relaxed) + 1 < total
            } else {
                true
            }
        }))
        .await;
        first.map(|f| last - f)
    });

    let started = Instant::now();
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        pubs.push(tokio::spawn(async move {
            let s = mqtt_connect(addr, None, &format!("bench-pub-{p}"), 60).await.expect("publisher");
            let (mut r, mut w) = s.into_split();
            let window = Arc::new(Semaphore::new(WINDOW));
            let permits = Arc::clone(&window);
            let acks = tokio::spawn(async move {
                let mut n = 0usize;
                let _ = read_packets(&mut r, |b| {
                    if b >> 4 == 4 {
                        n += 1;
                        permits.add_permits(1);
                    }
                    n < PER_PUBLISHER
                })
                .await;
                n
            });
            let topic = format!("bench/p{p}/telemetry");
            let mut sent = 0usize;
            while sent < PER_PUBLISHER {
                let batch = window.acquire_many(100).await.expect("window");
                batch.forget();
                let mut buf = Vec::with_capacity(100 * 96);
                for _ in 0..100 {
                    publish_packet(&topic, (sent % 65_535 + 1) as u16, &mut buf);
                    sent += 1;
                }
                w.write_all(&buf).await.expect("publish");
            }
            let acked = tokio::time::timeout(Duration::from_secs(120), acks).await.expect("acks in time").expect("join");
            drop(w);
            acked
        }));
    }
    let mut acked = 0;
    for p in pubs {
        acked += p.await.expect("publisher");
    }
    let in_time = started.elapsed();
    let span = subscriber.await.expect("subscriber").unwrap_or_default();
    let got = received.load(Relaxed);
    assert_eq!(acked as u64, total, "every QoS 1 publish acknowledged");
    (total as f64 / in_time.as_secs_f64(), got as f64 / span.as_secs_f64().max(1e-9), total - got.min(total))
}

/// RSS growth per idle connection (KiB before, KiB after, connections made).
async fn idle_memory(server: &Server, n: usize) -> (u64, u64, usize) {
    let pid = server.child.id().expect("pid");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(pid);
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = Arc::clone(&gate).acquire_owned().await.expect("gate");
        let addr = server.addr;
        // Spread over source addresses: one address has ≈ 28k ephemeral ports.
        let local = Ipv4Addr::new(127, 0, 1 + (i / 20_000) as u8, 1);
        tasks.push(tokio::spawn(async move {
            let s = mqtt_connect(addr, Some(local), &format!("idle-{i:06}"), 60).await;
            drop(permit);
            s.ok()
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            conns.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let made = conns.len();
    drop(conns);
    (before, after, made)
}

/// `scripts/bench-broker` (raise `ulimit -n` first). `CW_BENCH_IDLE="10000 100000"` picks the
/// idle connection counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run scripts/bench-broker"]
async fn bench_broker() {
    let counts: Vec<usize> = std::env::var("CW_BENCH_IDLE").unwrap_or_else(|_| "10000".into()).split_whitespace().filter_map(|c| c.parse().ok()).collect();
    for which in ["rmqtt", "rumqttd"] {
        let server = spawn_server(which).await;
        let (inr, outr, lost) = throughput(server.addr).await;
        println!("{which:8} throughput: {PUBLISHERS}×{PER_PUBLISHER} QoS1 in {inr:>9.0} msg/s (PUBACKed), out {outr:>9.0} msg/s to 1 QoS0 subscriber, lost {lost}");
        drop(server);
        for &n in &counts {
            let server = spawn_server(which).await;
            let (before, after, made) = idle_memory(&server, n).await;
            let per = (after.saturating_sub(before) * 1024) as f64 / made.max(1) as f64;
            println!("{which:8} idle: {made}/{n} connected (keep-alive 60), RSS {before} KiB → {after} KiB = {per:.0} bytes per device");
            drop(server);
        }
    }
}
