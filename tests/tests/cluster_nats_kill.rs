//! Cluster mode when a NATS node dies (issue 17, SPEC §9, §7): three nats-server nodes, two
//! gateways, devices publishing QoS 1 events at a few thousand a second spread over all three
//! nodes' MQTT listeners; SIGKILL of the node that leads the ingest stream (the worst case: the
//! stream has no leader until the two nodes left elect one). Ingestion and pushes must go on
//! through the other two, and no acknowledged event may be lost: every event a device got a
//! PUBACK for is looked up in the replicated ingest stream afterwards, and what is missing is
//! counted per node that sent the PUBACK — the measurement behind the README's "What a PUBACK
//! means in cluster mode".
//!
//! nats-server's MQTT listener sends a QoS 1 PUBACK once the message is stored in its own
//! `$MQTT_msgs` stream; the ingest stream's own capture of the plain publish on the mapped
//! subject misses whatever comes while it has no leader. The gateways' relay
//! (`citywatch_gateway::cluster::relay`) moves every partition's messages from `$MQTT_msgs` into
//! the ingest stream, acknowledging each there only once the ingest stream has it, so the loss
//! must be zero.
//!
//! Each device keeps one QoS 1 publish in flight, so a PUBACK names exactly one `seq`; when its
//! link breaks it connects to the next node and sends the unacknowledged event again (what the
//! firmware's store-and-forward ring does): [`citywatch_tests::event_fleet`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use citywatch_gateway::cluster::{relay, INGEST_STREAM};
use citywatch_tests::event_fleet::{publish_events, wall_ms};
use citywatch_tests::figures::{cluster_status, metric_series, partition_owners};
use citywatch_tests::{birth, device_topic, wait_for, wait_for_async, NatsCluster, Publisher, WebhookReceiver};
use futures_util::StreamExt as _;
use serde_json::json;
use tokio::sync::watch;

const SECRET: &str = "e2e-nats-kill-secret";
const PARTITIONS: u16 = 8;
const DEVICES: usize = 24;
const SITES: usize = 6;
const BEFORE_KILL: Duration = Duration::from_secs(4);
/// How long devices go on publishing once the ingest stream has a leader again.
const AFTER_LEADER: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(90);
const EVENTS: &str = "citywatch_messages_received_total{channel=\"event\"}";

/// The server name of the ingest stream's leader as the cluster answers now; `None` while it
/// has none (the stream info request then goes unanswered).
async fn ingest_leader(js: &jetstream::Context) -> Option<String> {
    stream_leader(js, INGEST_STREAM).await
}

/// The server name of a stream's leader as the cluster answers now.
async fn stream_leader(js: &jetstream::Context, name: &str) -> Option<String> {
    let stream = tokio::time::timeout(Duration::from_secs(2), js.get_stream(name)).await.ok()?.ok()?;
    stream.cached_info().cluster.as_ref()?.leader.clone()
}

/// Every RAFT group `node` leads among the streams and their consumers (`stream` or
/// `stream/consumer`): what has to elect a new leader when it dies.
async fn groups_led_by(js: &jetstream::Context, node: &str) -> Vec<String> {
    let mut led = Vec::new();
    let names: Vec<String> = js.stream_names().filter_map(|n| async move { n.ok() }).collect().await;
    for name in names {
        let Ok(stream) = js.get_stream(&name).await else { continue };
        if stream.cached_info().cluster.as_ref().and_then(|c| c.leader.as_deref()) == Some(node) {
            led.push(name.clone());
        }
        let consumers: Vec<_> = stream.consumers().filter_map(|c| async move { c.ok() }).collect().await;
        for c in consumers {
            if c.cluster.as_ref().and_then(|c| c.leader.as_deref()) == Some(node) {
                led.push(format!("{name}/{}", c.name));
            }
        }
    }
    led
}

/// A publisher on one of `addrs`, tried in turn until `within`: right after a node died, a
/// surviving node's MQTT listener can take longer than the client's connect timeout to answer
/// (its MQTT sessions live in JetStream, whose leaders are being elected again).
async fn connect_retrying(addrs: &[String], capacity: usize, within: Duration) -> Publisher {
    let deadline = Instant::now() + within;
    let mut errors = Vec::new();
    for addr in addrs.iter().cycle() {
        match Publisher::connect(addr, capacity).await {
            Ok(p) => return p,
            Err(e) if Instant::now() < deadline => {
                errors.push(format!("{addr}: {e:#}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("no MQTT connection to any of {addrs:?} within {within:?}: {e:#} (earlier: {errors:?})"),
        }
    }
    unreachable!("cycle() over a non-empty list does not end")
}

/// Publishes `body` at QoS 1 until a node acknowledges it, on a new connection for every try
/// (the same `seq` each time: the gateway keeps one).
async fn publish_until_acked(addrs: &[String], topic: &str, body: &serde_json::Value, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut publisher = connect_retrying(addrs, 8, deadline.saturating_duration_since(Instant::now())).await;
        if publisher.publish_json(topic, false, body).await.is_ok() && publisher.wait_acked(1, Duration::from_secs(10)).await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "no PUBACK for {topic} from any of {addrs:?} within {within:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nats_node_stops_neither_ingestion_nor_pushes_and_loses_no_acknowledged_event() {
    let mut nats = NatsCluster::start(3, PARTITIONS).await.expect("3-node NATS cluster");
    let receiver = WebhookReceiver::start(SECRET).await.expect("receiver");
    let (gateways, _) = nats.start_gateways(&["gw-a", "gw-b"], &receiver, SECRET, PARTITIONS, "3s", SETTLE, "").await.expect("both gateways owning partitions");
    let config = gateways[0].config_path().to_owned();

    // The victim: the node leading the ingest stream. The watcher stays on a node that survives.
    let probe_client = async_nats::connect(nats.nodes[0].url()).await.expect("NATS client");
    let probe = jetstream::new(probe_client.clone());
    let probe = &probe;
    let leader = wait_for_async("the ingest stream's leader", SETTLE, move || ingest_leader(probe)).await.expect("ingest leader");
    let victim = nats.nodes.iter().position(|n| n.name == leader).expect("the leader is one of the nodes");
    let survivor = (victim + 1) % nats.nodes.len();
    // The worst case for the ingest stream's own capture: the MQTT listeners' stream lives on
    // (its leader on another node), so devices get PUBACKs all through the ingest stream's
    // election. Its leader is asked to step down until another node leads it.
    for attempt in 0.. {
        let mqtt_leader = wait_for_async("the leader of $MQTT_msgs", SETTLE, move || stream_leader(probe, relay::MQTT_MSGS_STREAM)).await.expect("$MQTT_msgs leader");
        if mqtt_leader != leader {
            eprintln!("$MQTT_msgs is led by {mqtt_leader}, which stays up");
            break;
        }
        assert!(attempt < 10, "$MQTT_msgs stays on {leader} after {attempt} step-downs");
        let _ = probe_client.request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{}", relay::MQTT_MSGS_STREAM), "".into()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let led = groups_led_by(probe, &leader).await;
    eprintln!("node {victim} ({leader}) leads the ingest stream and is killed; RAFT groups it leads: {led:?}");
    let watcher = jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(async_nats::connect(nats.nodes[survivor].url()).await.expect("NATS client"));

    // Devices, born first on a node that stays up, then publishing through every node.
    let nodes: Vec<String> = nats.nodes.iter().map(|n| n.mqtt_addr()).collect();
    let mut births = Publisher::connect(&nodes[survivor], DEVICES + 8).await.expect("publisher");
    let ids: Vec<(String, String)> = (0..DEVICES).map(|i| (format!("nk{}", i % SITES), format!("nk-smoke-{i}"))).collect();
    for (site, id) in &ids {
        births.publish_json(&device_topic(site, id, "status"), true, &birth("smoke_detector", 3600)).await.expect("birth");
    }
    births.wait_acked(DEVICES as u64, Duration::from_secs(30)).await.expect("births acknowledged");

    let started = Instant::now();
    let (until_tx, until) = watch::channel(started + BEFORE_KILL + SETTLE);
    let tasks: Vec<_> = ids.iter().enumerate().map(|(i, (site, id))| tokio::spawn(publish_events(site.clone(), id.clone(), nodes.clone(), i % nodes.len(), until.clone()))).collect();
    let events_taken = || gateways.iter().filter_map(|g| g.get_text("/metrics").ok()).map(|t| metric_series(&t, EVENTS)).sum::<f64>();

    tokio::time::sleep(BEFORE_KILL).await;
    let before_kill = events_taken();
    assert!(before_kill > 0.0, "no event reached the gateways before the kill");
    nats.kill(victim);
    let killed = Instant::now();
    eprintln!("node {victim} killed at {} ms since the epoch (to read the gateways' logs by)", wall_ms());

    // The two nodes left elect a new ingest leader (nats-server: after a 4–9 s election timeout).
    let watcher = &watcher;
    let victim_name = leader.clone();
    let new_leader = wait_for_async("a new leader of the ingest stream", SETTLE, move || {
        let victim_name = victim_name.clone();
        async move { ingest_leader(watcher).await.filter(|l| *l != victim_name) }
    })
    .await
    .expect("a new ingest leader");
    let leader_back = Instant::now();
    until_tx.send_replace(leader_back + AFTER_LEADER);
    eprintln!("ingest stream leader again ({new_leader}) {:.2} s after the kill", leader_back.duration_since(killed).as_secs_f64());

    // Pushes go on: a smoke alarm published on a surviving node once the ingest stream has a
    // leader again is pushed.
    let (site, alarmed) = &ids[survivor];
    let survivors: Vec<String> = nodes.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, a)| a.clone()).collect();
    let body = json!({"seq": 1_000_000, "ts": wall_ms(), "event": "alarm", "metric": "smoke_db_m", "value": 0.4});
    publish_until_acked(&survivors, &device_topic(site, alarmed, "event"), &body, SETTLE).await;
    let alarm_acked = Instant::now();
    let pushed = receiver
        .wait_for(SETTLE, "an incident pushed after the NATS node was killed", |ds| ds.iter().find(|d| d.device() == alarmed.as_str() && d.state() == "open").map(|d| d.received))
        .await;
    eprintln!(
        "first push after the kill: {:.2} s after it; the alarm was PUBACKed {:.2} s after the kill, pushed {:.2} s after its PUBACK",
        pushed.saturating_duration_since(killed).as_secs_f64(),
        alarm_acked.duration_since(killed).as_secs_f64(),
        pushed.saturating_duration_since(alarm_acked).as_secs_f64()
    );
    // What the kill cost each gateway, from its per-partition metrics.
    for (name, g) in ["gw-a", "gw-b"].iter().zip(&gateways) {
        let text = g.get_text("/metrics").unwrap_or_default();
        let sum = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).collect::<Vec<_>>();
        let expired: f64 = text.lines().filter(|l| l.starts_with("citywatch_cluster_lease_losses_total{") && l.contains("reason=\"expired\"")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        let takeovers = sum("citywatch_cluster_partition_takeover_seconds{");
        eprintln!(
            "{name}: {} partitions owned, {expired} leases expired, longest last takeover {:.2} s",
            metric_series(&text, "citywatch_cluster_partitions_owned"),
            takeovers.iter().copied().fold(0.0, f64::max)
        );
    }

    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.expect("device task"));
    }
    let published_for = until.borrow().duration_since(started);
    let acked_total: usize = logs.iter().map(|l| l.acked.len()).sum();
    // Ingestion goes on: every partition's relay and consumer reach the end of their streams
    // (through the two nodes left).
    wait_for("every partition consumed to the end after the kill", SETTLE, || {
        let status = cluster_status(&config).ok()?;
        (status["lag_total"] == 0 && partition_owners(&status).iter().all(|o| !o.is_empty())).then_some(())
    })
    .await
    .expect("the partitions are consumed to the end");
    eprintln!("every partition relayed and consumed to the end {:.1} s after the kill", killed.elapsed().as_secs_f64());
    let acked_after: f64 = events_taken() - before_kill;
    assert!(acked_after > 0.0, "ingestion stopped with the node: no event taken in after the kill");

    // Every acknowledged event, looked up in the replicated ingest stream: every stored message
    // by a direct get (any replica answers), not through a consumer — creating one goes through
    // the JetStream meta leader, which can leave it unanswered for a minute after a node died.
    // A direct get that finds nothing is asked again of the stream's leader (a replica that
    // lags behind answers "not found" for what the leader has).
    let js = jetstream::new(async_nats::connect(nats.nodes[survivor].url()).await.expect("NATS client"));
    let js = &js;
    let stream = wait_for_async("the ingest stream's info", SETTLE, move || async move { js.get_stream(INGEST_STREAM).await.ok() }).await.expect("ingest stream");
    let state = stream.cached_info().state.clone();
    let (first, last) = (state.first_sequence, state.last_sequence);
    let gets = futures_util::stream::iter(first..=last)
        .map(|seq| {
            let stream = &stream;
            async move {
                let fetched = wait_for_async(&format!("ingest stream message {seq}"), SETTLE, move || async move {
                    match tokio::time::timeout(Duration::from_secs(5), stream.direct_get(seq)).await {
                        Ok(Ok(m)) => Some((Some(m), false)),
                        Ok(Err(e)) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                            match tokio::time::timeout(Duration::from_secs(5), stream.get_raw_message(seq)).await {
                                Ok(Ok(m)) => Some((Some(m), true)),
                                Ok(Err(e)) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Some((None, false)),
                                _ => None,
                            }
                        }
                        _ => None,
                    }
                })
                .await;
                fetched.expect("a get of the ingest stream")
            }
        })
        .buffer_unordered(64);
    let mut stored: BTreeSet<(String, u32)> = BTreeSet::new();
    // Which events the ingest stream took in itself (the plain publish) and which the relay
    // brought: an event with only the relayed copy is one a PUBACK without the relay lost.
    let mut plain: BTreeSet<(String, u32)> = BTreeSet::new();
    let (mut read, mut direct_short) = (0usize, 0usize);
    for (m, short) in gets.collect::<Vec<_>>().await {
        direct_short += usize::from(short);
        let Some(m) = m else { continue };
        read += 1;
        if m.subject.ends_with(".event") {
            let device = m.subject.split('.').nth(4).unwrap_or("").to_owned();
            if let Some(seq) = serde_json::from_slice::<serde_json::Value>(&m.payload).ok().and_then(|v| v["seq"].as_u64()) {
                let relayed = m.headers.get(async_nats::header::NATS_MESSAGE_ID).is_some_and(|id| id.as_str().starts_with(relay::MSG_ID_PREFIX));
                if !relayed {
                    plain.insert((device.clone(), seq as u32));
                }
                stored.insert((device, seq as u32));
            }
        }
    }
    eprintln!("ingest stream read back {:.1} s after the kill", killed.elapsed().as_secs_f64());
    assert_eq!(read as u64, state.messages, "the read-back ({read} messages) is not the ingest stream's {} messages", state.messages);

    let mut lost_by_node: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut lost_first, mut lost_last, mut lost_after_leader) = (None::<Instant>, None::<Instant>, 0usize);
    for ((_, id), log) in ids.iter().zip(&logs) {
        // Per device: which acknowledged events are stored, in the order they were acknowledged.
        let kept: Vec<bool> = log.acked.iter().map(|a| stored.contains(&(id.clone(), a.seq))).collect();
        for (a, _) in log.acked.iter().zip(&kept).filter(|(_, kept)| !**kept) {
            *lost_by_node.entry(a.node).or_default() += 1;
            lost_first = Some(lost_first.map_or(a.at, |f| f.min(a.at)));
            lost_last = Some(lost_last.map_or(a.at, |l| l.max(a.at)));
            lost_after_leader += usize::from(a.at > leader_back);
        }
    }
    let reconnects: usize = logs.iter().map(|l| l.reconnects).sum();
    let only_relayed = ids.iter().zip(&logs).flat_map(|((_, id), log)| log.acked.iter().map(move |a| (id.clone(), a.seq))).filter(|k| stored.contains(k) && !plain.contains(k)).count();
    let leaderless: usize = logs.iter().flat_map(|l| &l.acked).filter(|a| a.at > killed && a.at < leader_back).count();
    let before: usize = logs.iter().flat_map(|l| &l.acked).filter(|a| a.at <= killed).count();
    let before_s = killed.duration_since(started).as_secs_f64();
    let lost: usize = lost_by_node.values().sum();
    let since_kill = |t: Option<Instant>| t.map_or(f64::NAN, |t| if t >= killed { t.duration_since(killed).as_secs_f64() } else { -killed.duration_since(t).as_secs_f64() });
    eprintln!(
        "NATS node kill: {acked_total} events PUBACKed over {:.1} s ({:.0}/s; before the kill {before} in {before_s:.1} s, {:.0}/s), {reconnects} reconnects; taken in by the gateways after the kill: {acked_after:.0}; \
         ingest stream: {} messages, {} read back ({direct_short} found only by the leader); \
         {leaderless} PUBACKed between the kill and the new leader; \
         PUBACKed and in the ingest stream only by the relay (no plain copy): {only_relayed}; \
         PUBACKed but not in the ingest stream: {lost} ({:?} by the node that acknowledged them; node {victim} was killed), \
         PUBACKed from {:.2} s to {:.2} s after the kill, {lost_after_leader} after the new leader was seen",
        published_for.as_secs_f64(),
        acked_total as f64 / published_for.as_secs_f64(),
        before as f64 / before_s,
        state.messages,
        read,
        lost_by_node.iter().collect::<Vec<_>>(),
        since_kill(lost_first),
        since_kill(lost_last),
    );
    // SPEC §7: a NATS node kill under load loses no acknowledged event.
    assert_eq!(lost, 0, "PUBACKed events missing from the ingest stream, by the node that acknowledged them: {lost_by_node:?}");
}
