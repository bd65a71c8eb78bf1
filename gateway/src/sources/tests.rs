//! Tests of both sources against real brokers and clients: the embedded broker (rmqtt) driven by the
//! `mosquitto_pub`/`mosquitto_sub` binaries and rumqttc, and the external source against a real
//! Mosquitto started per test. Every wait is bounded.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use crate::sources::broker::EmbeddedBroker;
use crate::sources::mqtt;
use crate::sources::config::{MqttConfig, MqttMode, MqttUser};
use crate::ingest::Inbound;

const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("probe addr").port()
}

fn embedded_cfg(users: Vec<MqttUser>) -> MqttConfig {
    MqttConfig {
        mode: MqttMode::Embedded,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        users,
        topic_filter: "citywatch/v1/#".into(),
        queue_capacity: 1024,
        ..MqttConfig::default()
    }
}

async fn recv(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    timeout(WAIT, rx.recv()).await.expect("no message in time").expect("channel open")
}

/// Nothing arrives within `d`.
async fn assert_quiet(rx: &mut mpsc::Receiver<Inbound>, d: Duration) {
    if let Ok(Some(m)) = timeout(d, rx.recv()).await {
        panic!("unexpected message on {}: {:?}", m.topic, m.payload);
    }
}

/// Runs a mosquitto client binary to completion; returns (success, stdout).
async fn run_cli(bin: &str, args: &[&str]) -> (bool, String) {
    let out = timeout(WAIT, Command::new(bin).args(args).kill_on_drop(true).output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} hung"))
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn mosquitto_pub(port: u16, extra: &[&str]) -> bool {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", port.as_str()];
    args.extend_from_slice(extra);
    run_cli("mosquitto_pub", &args).await.0
}

// ---------------------------------------------------------------------------------------------
// Embedded broker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_delivers_mosquitto_and_rumqttc_publishes_exactly() {
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&embedded_cfg(vec![]), tx).await.expect("broker starts");
    let port = broker.local_addr().port();
    assert_ne!(port, 0);

    let payload = r#"{"ts":1700000000000,"seq":1,"gas_ppm":12.5}"#;
    assert!(mosquitto_pub(port, &["-q", "1", "-t", "citywatch/v1/gas-0001/telemetry", "-m", payload]).await);
    let m = recv(&mut rx).await;
    assert_eq!(m.topic, "citywatch/v1/gas-0001/telemetry");
    assert_eq!(&m.payload[..], payload.as_bytes());
    assert!(m.ack.is_none());
    assert!(m.received_ms > 0);

    // Outside the filter: not forwarded.
    assert!(mosquitto_pub(port, &["-t", "other/thing", "-m", "x"]).await);

    // rumqttc, QoS 0 and 1, binary payload.
    let mut opts = MqttOptions::new("rumqttc-dev", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let binary = vec![0u8, 159, 146, 150, 255];
    timeout(WAIT, client.publish("citywatch/v1/smoke-7/status", QoS::AtLeastOnce, false, binary.clone()))
        .await
        .expect("publish queued in time")
        .expect("publish queued");
    let m = recv(&mut rx).await;
    assert_eq!(m.topic, "citywatch/v1/smoke-7/status");
    assert_eq!(&m.payload[..], &binary[..]);
    assert_quiet(&mut rx, Duration::from_millis(300)).await;
    poller.abort();
    assert_eq!(broker.stats().forwarded.load(Ordering::Relaxed), 2);
    assert_eq!(broker.stats().dropped.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_checks_username_and_password() {
    let users = vec![MqttUser { username: "dev".into(), password: "s3cret".into(), site: None, device: None }];
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&embedded_cfg(users), tx).await.expect("broker starts");
    let port = broker.local_addr().port();

    assert!(mosquitto_pub(port, &["-u", "dev", "-P", "s3cret", "-t", "citywatch/v1/a/telemetry", "-m", "ok"]).await);
    assert_eq!(&recv(&mut rx).await.payload[..], b"ok");

    let wrong = mosquitto_pub(port, &["-u", "dev", "-P", "wrong", "-t", "citywatch/v1/a/telemetry", "-m", "bad"]).await;
    assert!(!wrong, "a wrong password must be refused");
    let anonymous = mosquitto_pub(port, &["-t", "citywatch/v1/a/telemetry", "-m", "anon"]).await;
    assert!(!anonymous, "no credentials must be refused when users are configured");
    let unknown = mosquitto_pub(port, &["-u", "nobody", "-P", "s3cret", "-t", "citywatch/v1/a/telemetry", "-m", "x"]).await;
    assert!(!unknown, "an unknown user must be refused");
    assert_quiet(&mut rx, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_keeps_retained_status_for_later_subscribers() {
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&embedded_cfg(vec![]), tx).await.expect("broker starts");
    let port = broker.local_addr().port();

    assert!(mosquitto_pub(port, &["-q", "1", "-r", "-t", "citywatch/v1/xh/siren-3/status", "-m", "online"]).await);
    assert!(mosquitto_pub(port, &["-q", "1", "-t", "citywatch/v1/xh/siren-3/telemetry", "-m", "not-retained"]).await);
    // The gateway sees both live.
    assert_eq!(&recv(&mut rx).await.payload[..], b"online");
    assert_eq!(&recv(&mut rx).await.payload[..], b"not-retained");
    // A later subscriber gets the retained status only (and no `$`-topic through `#`).
    let port_s = port.to_string();
    let (_, stdout) = run_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port_s, "-t", "#", "-v", "-W", "1"]).await;
    assert_eq!(stdout.trim_end(), "citywatch/v1/xh/siren-3/status online");
    // An empty retained publish clears it.
    assert!(mosquitto_pub(port, &["-q", "1", "-r", "-n", "-t", "citywatch/v1/xh/siren-3/status"]).await);
    let (_, stdout) = run_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port_s, "-t", "#", "-v", "-W", "1"]).await;
    assert_eq!(stdout.trim_end(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_delivers_last_will_when_a_client_dies() {
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&embedded_cfg(vec![]), tx).await.expect("broker starts");
    let port = broker.local_addr().port();

    // rumqttc: connect with a will, then drop the socket without DISCONNECT.
    let mut opts = MqttOptions::new("gas-0042", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_last_will(LastWill::new("citywatch/v1/gas-0042/status", "offline", QoS::AtLeastOnce, true));
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::ConnAck(_))) = eventloop.poll().await {
                return;
            }
        }
    })
    .await
    .expect("rumqttc connects");
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    drop(eventloop); // closes the TCP connection, no DISCONNECT
    let m = recv(&mut rx).await;
    assert_eq!(m.topic, "citywatch/v1/gas-0042/status");
    assert_eq!(&m.payload[..], b"offline");

    // mosquitto_sub killed with SIGKILL. It is known to be connected once it printed the
    // retained command waiting for it.
    broker.publish("citywatch/v1/smoke-0009/cmd", b"hello".to_vec(), true).expect("publish");
    let port_s = port.to_string();
    let mut sub: Child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port_s, "-i", "smoke-0009", "-t", "citywatch/v1/smoke-0009/cmd"])
        .args(["--will-topic", "citywatch/v1/smoke-0009/status", "--will-payload", "gone", "--will-qos", "1"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub starts");
    let mut stdout = tokio::io::BufReader::new(sub.stdout.take().expect("piped"));
    let mut line = String::new();
    timeout(WAIT, tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line)).await.expect("subscribed in time").expect("read");
    assert_eq!(line.trim_end(), "hello");
    // The gateway's own commands are not fed back into its pipeline.
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
    assert!(timeout(WAIT, sub.kill()).await.expect("kill in time").is_ok());
    let m = recv(&mut rx).await;
    assert_eq!(m.topic, "citywatch/v1/smoke-0009/status");
    assert_eq!(&m.payload[..], b"gone");

    // A clean DISCONNECT sends no will.
    assert!(mosquitto_pub(port, &["-t", "citywatch/v1/x/telemetry", "-m", "t", "--will-topic", "citywatch/v1/x/status", "--will-payload", "w"]).await);
    assert_eq!(&recv(&mut rx).await.payload[..], b"t");
    assert_quiet(&mut rx, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_publishes_commands_to_devices() {
    let (tx, mut rx) = mpsc::channel(64);
    let broker = EmbeddedBroker::start(&embedded_cfg(vec![]), tx).await.expect("broker starts");
    let port = broker.local_addr().port();

    // Retained command, picked up by a device that subscribes later.
    broker.publish("devices/siren-3/cmd", b"{\"sound\":true}".to_vec(), true).expect("publish");
    let port_s = port.to_string();
    let (ok, stdout) = run_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port_s, "-t", "devices/siren-3/cmd", "-C", "1", "-W", "5"]).await;
    assert!(ok, "mosquitto_sub got the retained command");
    assert_eq!(stdout.trim_end(), "{\"sound\":true}");

    // Live command to a subscribed rumqttc device (QoS 1 subscription).
    let mut opts = MqttOptions::new("siren-4", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    timeout(WAIT, client.subscribe("devices/siren-4/cmd", QoS::AtLeastOnce)).await.expect("in time").expect("queued");
    timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    })
    .await
    .expect("subscribed");
    broker.publish("devices/siren-4/cmd", b"off".to_vec(), false).expect("publish");
    let got = timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                return p;
            }
        }
    })
    .await
    .expect("command arrives");
    assert_eq!(got.topic, "devices/siren-4/cmd");
    assert_eq!(&got.payload[..], b"off");
    assert!(broker.publish("devices/+/cmd", vec![], false).is_err());
    // Commands are not echoed into the pipeline (outside the filter).
    assert_quiet(&mut rx, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reports_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let cfg = MqttConfig { listen: taken.local_addr().expect("addr"), ..embedded_cfg(vec![]) };
    let (tx, _rx) = mpsc::channel(1);
    let err = timeout(WAIT, EmbeddedBroker::start(&cfg, tx)).await.expect("start does not hang").expect_err("port taken");
    assert!(err.to_string().contains("cannot bind"), "{err}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_slows_publishers_down_instead_of_losing_messages() {
    // A pipeline that reads nothing for a second while a device floods.
    let (tx, mut rx) = mpsc::channel(16);
    let broker = EmbeddedBroker::start(&embedded_cfg(vec![]), tx).await.expect("broker starts");
    let port = broker.local_addr().port();
    const SENT: usize = 3000;
    let lines: String = (0..SENT).map(|i| format!("{{\"seq\":{i},\"pad\":\"0123456789012345678901234567890123456789\"}}\n")).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lines");
    std::fs::write(&path, lines).expect("write");
    let port_s = port.to_string();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port_s, "-q", "1", "-t", "citywatch/v1/xh/d/telemetry", "-l"])
        .stdin(Stdio::from(std::fs::File::open(&path).expect("open")))
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_pub");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut received = 0;
    let mut last_seq = None;
    while let Ok(Some(m)) = timeout(Duration::from_secs(2), rx.recv()).await {
        received += 1;
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        let seq = v["seq"].as_u64().expect("seq");
        assert!(last_seq < Some(seq), "order kept");
        last_seq = Some(seq);
    }
    let status = timeout(WAIT, publisher.wait()).await.expect("publisher done").expect("run");
    assert!(status.success());
    assert_eq!(received, SENT, "every message delivered");
    assert_eq!(broker.stats().dropped.load(Ordering::Relaxed), 0);
}

/// Flood: `cargo test -p citywatch-gateway --release sources::broker::tests::embedded_throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release --ignored --nocapture"]
async fn embedded_throughput() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 100_000;
    let total = CLIENTS * PER_CLIENT;
    let cfg = MqttConfig { queue_capacity: 16_384, max_payload_bytes: 64 * 1024, ..embedded_cfg(vec![]) };
    let (tx, mut rx) = mpsc::channel(cfg.queue_capacity);
    let broker = EmbeddedBroker::start(&cfg, tx).await.expect("broker starts");
    let port = broker.local_addr().port();

    // Publishers: mosquitto_pub -l, one line per message, QoS 0.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut children = Vec::new();
    for c in 0..CLIENTS {
        let path = dir.path().join(format!("msgs-{c}.txt"));
        let mut text = String::with_capacity(PER_CLIENT * 64);
        for i in 0..PER_CLIENT {
            text.push_str(&format!("{{\"ts\":1700000000000,\"seq\":{i},\"gas_ppm\":12.5}}\n"));
        }
        std::fs::write(&path, text).expect("write messages");
        children.push((c, path));
    }
    let counter = tokio::spawn(async move {
        let mut n = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        while let Ok(Some(_m)) = timeout(Duration::from_secs(3), rx.recv()).await {
            if first.is_none() {
                first = Some(Instant::now());
            }
            n += 1;
            last = Instant::now();
        }
        (n, first.map(|f| last - f))
    });
    let port_s = port.to_string();
    let mut procs = Vec::new();
    let started = Instant::now();
    for (c, path) in &children {
        let file = std::fs::File::open(path).expect("open");
        let id = format!("flood-{c}");
        procs.push(
            Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port_s, "-i", &id, "-q", "0", "-t", &format!("citywatch/v1/flood-{c}/telemetry"), "-l"])
                .stdin(Stdio::from(file))
                .kill_on_drop(true)
                .spawn()
                .expect("mosquitto_pub"),
        );
    }
    for mut p in procs {
        let status = timeout(Duration::from_secs(60), p.wait()).await.expect("publisher finished").expect("wait");
        assert!(status.success());
    }
    let publish_time = started.elapsed();
    let (n, span) = timeout(Duration::from_secs(120), counter).await.expect("counter done").expect("join");
    let span = span.unwrap_or_default();
    let rate = n as f64 / span.as_secs_f64().max(1e-9);
    let rss = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss = rss.lines().find(|l| l.starts_with("VmRSS")).unwrap_or("VmRSS: ?").to_owned();
    println!("after the flood: {rss}");
    println!(
        "embedded flood: sent {total} QoS0 via {CLIENTS}× mosquitto_pub -l in {publish_time:?}; received {n} in {span:?} = {rate:.0} msgs/s; lost {}; broker evicted {}",
        total - n,
        broker.stats().dropped.load(Ordering::Relaxed)
    );
    assert_eq!(n, total, "messages lost");
}

// ---------------------------------------------------------------------------------------------
// External broker (real Mosquitto)
// ---------------------------------------------------------------------------------------------

/// A Mosquitto process on a free port, killed on drop.
struct Mosquitto {
    port: u16,
    conf: std::path::PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\npersistence_location {}/\nmax_inflight_messages 20\n",
            dir.path().display()
        );
        std::fs::write(&conf, text).expect("write conf");
        let mut m = Mosquitto { port, conf, child: None, _dir: dir };
        m.launch().await;
        m
    }

    async fn launch(&mut self) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// SIGKILL: the broker loses its in-memory sessions (nothing was saved).
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            timeout(WAIT, c.kill()).await.expect("kill in time").expect("kill");
        }
    }

    fn cfg(&self, client_id: &str) -> MqttConfig {
        MqttConfig {
            mode: MqttMode::External,
            url: format!("mqtt://127.0.0.1:{}", self.port),
            client_id: client_id.into(),
            topic_filter: "citywatch/v1/#".into(),
            keep_alive: crate::units::Duration::secs(5),
            queue_capacity: 64,
            ..MqttConfig::default()
        }
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "broker on {port} never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running external source.
struct Running {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<crate::sources::Result<()>>,
}

fn start_external(cfg: MqttConfig, tx: mpsc::Sender<Inbound>) -> Running {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(mqtt::run(cfg, tx, shutdown_rx));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) {
        self.shutdown.send(true).expect("source alive");
        let r = timeout(WAIT, self.task).await.expect("source stops in time").expect("join");
        assert!(r.is_ok(), "{r:?}");
    }
}

/// Publishes probes until one arrives: the source is connected and subscribed. Acks the probe.
async fn wait_flowing(port: u16, rx: &mut mpsc::Receiver<Inbound>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "source never started receiving");
        assert!(mosquitto_pub(port, &["-q", "1", "-t", "citywatch/v1/probe", "-m", "probe"]).await);
        if let Ok(Some(m)) = timeout(Duration::from_millis(300), rx.recv()).await {
            assert_eq!(m.topic, "citywatch/v1/probe", "unexpected {:?}", m.payload);
            if let Some(a) = m.ack {
                a.done();
            }
            // Late copies of earlier probes.
            while let Ok(Some(m)) = timeout(Duration::from_millis(300), rx.recv()).await {
                assert_eq!(m.topic, "citywatch/v1/probe");
                if let Some(a) = m.ack {
                    a.done();
                }
            }
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_receives_qos1_with_ack_and_qos0_without() {
    let broker = Mosquitto::start().await;
    let (tx, mut rx) = mpsc::channel(64);
    let running = start_external(broker.cfg("gw-basic"), tx);
    wait_flowing(broker.port, &mut rx).await;

    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-1/telemetry", "-m", "q1"]).await);
    let m = recv(&mut rx).await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("citywatch/v1/gas-1/telemetry", &b"q1"[..]));
    m.ack.expect("QoS 1 carries an ack").done();

    assert!(mosquitto_pub(broker.port, &["-q", "0", "-t", "citywatch/v1/gas-1/telemetry", "-m", "q0"]).await);
    let m = recv(&mut rx).await;
    assert_eq!(&m.payload[..], b"q0");
    assert!(m.ack.is_none(), "QoS 0 has nothing to ack");

    // Payloads above rumqttc's 10 KiB default arrive (to be quarantined downstream).
    let big = "x".repeat(40 * 1024);
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-1/telemetry", "-m", &big]).await);
    let m = recv(&mut rx).await;
    assert_eq!(m.payload.len(), big.len());
    m.ack.expect("ack").done();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_redelivers_unacked_after_gateway_reconnect() {
    let broker = Mosquitto::start().await;
    let (tx, mut rx) = mpsc::channel(64);
    let running = start_external(broker.cfg("gw-durable"), tx);
    wait_flowing(broker.port, &mut rx).await;

    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-2/telemetry", "-m", "not-stored"]).await);
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-2/telemetry", "-m", "stored"]).await);
    let first = recv(&mut rx).await;
    assert_eq!(&first.payload[..], b"not-stored");
    let second = recv(&mut rx).await;
    assert_eq!(&second.payload[..], b"stored");
    second.ack.expect("ack").done();
    drop(first); // never acknowledged: "the gateway crashed before the commit"
    running.stop().await;

    // While the gateway is away, the session queues new messages.
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-2/telemetry", "-m", "while-away"]).await);

    let (tx, mut rx) = mpsc::channel(64);
    let running = start_external(broker.cfg("gw-durable"), tx);
    let again = recv(&mut rx).await;
    assert_eq!(&again.payload[..], b"not-stored", "the unacked message is redelivered first");
    again.ack.expect("ack").done();
    let queued = recv(&mut rx).await;
    assert_eq!(&queued.payload[..], b"while-away");
    queued.ack.expect("ack").done();
    // The acked one is not redelivered: the next thing to arrive is a fresh marker.
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-2/telemetry", "-m", "marker"]).await);
    let next = recv(&mut rx).await;
    assert_eq!(&next.payload[..], b"marker", "acked message must not come back");
    next.ack.expect("ack").done();
    running.stop().await;

    // Acked messages stay acked across one more reconnect.
    let (tx, mut rx) = mpsc::channel(64);
    let running = start_external(broker.cfg("gw-durable"), tx);
    assert_quiet(&mut rx, Duration::from_secs(1)).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_reconnects_and_resubscribes_after_broker_restart() {
    let mut broker = Mosquitto::start().await;
    let (tx, mut rx) = mpsc::channel(64);
    let running = start_external(broker.cfg("gw-restart"), tx);
    wait_flowing(broker.port, &mut rx).await;

    broker.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the client notice the outage
    broker.launch().await; // a fresh broker: the session and its subscription are gone
    wait_flowing(broker.port, &mut rx).await;

    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/gas-3/telemetry", "-m", "after-restart"]).await);
    let m = recv(&mut rx).await;
    assert_eq!(&m.payload[..], b"after-restart");
    m.ack.expect("ack").done();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_publisher_reaches_devices_and_shutdown_while_down_is_prompt() {
    let broker = Mosquitto::start().await;
    let cfg = broker.cfg("gw-pub");
    let (publisher, source) = mqtt::connect(&cfg).expect("valid settings");
    let (tx, mut rx) = mpsc::channel(64);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(source.run(tx, shutdown_rx));
    wait_flowing(broker.port, &mut rx).await;

    timeout(WAIT, publisher.publish("devices/siren-1/cmd", b"on".to_vec(), true)).await.expect("in time").expect("queued");
    let port_s = broker.port.to_string();
    let (ok, stdout) = run_cli("mosquitto_sub", &["-h", "127.0.0.1", "-p", &port_s, "-t", "devices/siren-1/cmd", "-C", "1", "-W", "5"]).await;
    assert!(ok);
    assert_eq!(stdout.trim_end(), "on");
    shutdown.send(true).expect("alive");
    assert!(timeout(WAIT, task).await.expect("stops").expect("join").is_ok());

    // Nothing listening: run keeps retrying, yet stops promptly on shutdown.
    let dead = MqttConfig { url: format!("mqtt://127.0.0.1:{}", free_port()), ..cfg };
    let (tx, _rx) = mpsc::channel(1);
    let running = start_external(dead, tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;
}

#[test]
fn external_rejects_bad_settings() {
    let bad_url = MqttConfig { url: "http://x".into(), ..MqttConfig::default() };
    assert!(mqtt::connect(&bad_url).is_err());
    let no_id = MqttConfig { client_id: String::new(), ..MqttConfig::default() };
    assert!(mqtt::connect(&no_id).is_err());
    let short = MqttConfig { keep_alive: crate::units::Duration(Duration::from_millis(500)), ..MqttConfig::default() };
    assert!(mqtt::connect(&short).is_err());
}

/// Publishes an event until it arrives on `alerts`: the alert connection is subscribed. Drops
/// every copy (acked), including the main connection's late ones.
async fn wait_alerts_flowing(port: u16, alerts: &mut mpsc::Receiver<Inbound>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the alert connection never started receiving");
        assert!(mosquitto_pub(port, &["-q", "1", "-t", "citywatch/v1/s/probe/event", "-m", "probe"]).await);
        if let Ok(Some(m)) = timeout(Duration::from_millis(300), alerts.recv()).await {
            m.ack.into_iter().for_each(crate::ingest::Ack::done);
            drain(alerts, Duration::from_millis(500)).await;
            return;
        }
    }
}

fn two_lanes(bulk: usize) -> (crate::ingest::Lanes, mpsc::Receiver<Inbound>, mpsc::Receiver<Inbound>) {
    let (bulk_tx, bulk_rx) = mpsc::channel(bulk);
    let (alerts_tx, alerts_rx) = mpsc::channel(64);
    (crate::ingest::Lanes { alerts: alerts_tx, bulk: bulk_tx }, alerts_rx, bulk_rx)
}

/// Acks and drops whatever arrives on `rx` until it is quiet for `d`; returns the payloads.
async fn drain(rx: &mut mpsc::Receiver<Inbound>, d: Duration) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    while let Ok(Some(m)) = timeout(d, rx.recv()).await {
        seen.push(m.payload.to_vec());
        m.ack.into_iter().for_each(crate::ingest::Ack::done);
    }
    seen
}

/// An alarm behind bulk telemetry on the broker reaches the alert lane over its own connection
/// while the main connection is held back by a full bulk lane. In the first run both sessions
/// are new, so the main connection passes its copy on too; from the next run on (the alert
/// session was there before) it skips it, and the skipped copy is acknowledged. Redeliveries
/// (a slow machine can make the broker drop the held-back connection) are tolerated: at least
/// once is the contract, not exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_alerts_take_their_own_connection_past_a_full_bulk_lane() {
    let broker = Mosquitto::start().await;
    let cfg = MqttConfig { keep_alive: crate::units::Duration::secs(60), ..broker.cfg("gw-lanes") };
    assert_eq!(cfg.alert_topic_filter, "citywatch/v1/+/+/event", "on by default");
    let (lanes, mut alerts, mut bulk) = two_lanes(1);
    let start = |lanes: crate::ingest::Lanes| {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(mqtt::run(cfg.clone(), lanes, shutdown_rx));
        Running { shutdown, task }
    };
    let running = start(lanes);
    wait_flowing(broker.port, &mut bulk).await;
    wait_alerts_flowing(broker.port, &mut alerts).await;

    // Fill the bulk lane (one message) and the main connection's path behind it.
    for i in 0..50 {
        assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/s/gas-1/telemetry", "-m", &format!("t{i}")]).await);
    }
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/s/gas-1/event", "-m", "alarm"]).await);
    let m = recv(&mut alerts).await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("citywatch/v1/s/gas-1/event", &b"alarm"[..]));
    m.ack.expect("QoS 1").done();
    assert_eq!(bulk.len(), 1, "the bulk lane was full all along");

    // Now read the bulk lane: all 50 readings arrive, and (first run) the main connection's
    // copy of the alarm reaches the alert lane after them.
    let mut readings = std::collections::BTreeSet::new();
    while readings.len() < 50 {
        let m = recv(&mut bulk).await;
        readings.insert(String::from_utf8_lossy(&m.payload).into_owned());
        m.ack.expect("QoS 1").done();
    }
    let copy = recv(&mut alerts).await;
    assert_eq!(&copy.payload[..], b"alarm", "first run: the main session's copy is passed on");
    copy.ack.expect("QoS 1").done();
    drain(&mut bulk, Duration::from_millis(500)).await;
    drain(&mut alerts, Duration::from_millis(200)).await;
    running.stop().await;

    // Second run: both sessions were there before. An alarm arrives once.
    let (lanes, mut alerts, mut bulk) = two_lanes(64);
    let running = start(lanes);
    wait_alerts_flowing(broker.port, &mut alerts).await;
    drain(&mut bulk, Duration::from_millis(500)).await;
    assert!(mosquitto_pub(broker.port, &["-q", "1", "-t", "citywatch/v1/s/gas-1/event", "-m", "alarm-2"]).await);
    loop {
        let m = recv(&mut alerts).await;
        let found = &m.payload[..] == b"alarm-2";
        m.ack.into_iter().for_each(crate::ingest::Ack::done);
        if found {
            break;
        }
    }
    let later = drain(&mut alerts, Duration::from_secs(1)).await;
    assert!(!later.iter().any(|p| p == b"alarm-2"), "second run: the main connection skipped its copy");
    running.stop().await;

    // Third run: the alarm does not come back, so the main connection acknowledged the copy
    // it skipped.
    let (lanes, mut alerts, mut bulk) = two_lanes(64);
    let running = start(lanes);
    let back: Vec<Vec<u8>> = [drain(&mut alerts, Duration::from_secs(1)).await, drain(&mut bulk, Duration::from_millis(200)).await].concat();
    assert!(!back.iter().any(|p| p == b"alarm-2"), "the skipped copy was not acknowledged");
    running.stop().await;
}

#[test]
fn external_rejects_a_bad_alert_filter_and_allows_none() {
    let bad = MqttConfig { alert_topic_filter: "citywatch/#/event".into(), ..MqttConfig::default() };
    let err = mqtt::connect(&bad).expect_err("invalid filter").to_string();
    assert!(err.contains("alert_topic_filter"), "{err}");
    let off = MqttConfig { alert_topic_filter: String::new(), ..MqttConfig::default() };
    let (_, source) = mqtt::connect(&off).expect("one connection is fine");
    assert!(format!("{source:?}").contains("alert_connection: false"));
}
