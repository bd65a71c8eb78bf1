use std::sync::atomic::AtomicUsize;

use super::*;
use crate::rules::Engine;

fn stage() -> DecodeStage {
    DecodeStage::new(Arc::new(Registry::new()), Arc::new(Metrics::new()), IngestConfig::default())
}

fn msg(topic: &str, payload: &str, received_ms: i64) -> Inbound {
    Inbound { topic: topic.into(), payload: bytes::Bytes::copy_from_slice(payload.as_bytes()), received_ms, ack: None, origin: Origin::Live }
}

const NOW: i64 = 1_800_000_000_000;
const BIRTH: &str = r#"{"state":"online","kind":"gas_detector","fw":"0.1.0","interval_s":10}"#;

fn quarantined(batch: &Batch) -> Vec<String> {
    batch
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Quarantine(q) => Some(q.reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn birth_registers_and_telemetry_becomes_readings() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    s.handle(
        msg("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":1,"ts":1799999999000,"values":{"gas_lel":3.5,"valve_closed":0},"battery_v":3.0}"#, NOW),
        NOW,
        &mut b,
    );
    let d = s.registry.get("gas-1").expect("registered");
    assert_eq!((&*d.site, d.kind, d.interval_s), ("xh", DeviceKind::GasDetector, 10));
    assert_eq!(b.readings.len(), 3);
    assert!(b.readings.iter().all(|r| &*r.device == "gas-1" && r.ts_ms == 1_799_999_999_000 && !r.historical));
    assert_eq!(b.readings.iter().find(|r| r.metric == Metric::GasLel).map(|r| r.value), Some(3.5));
    assert!(matches!(b.writes[0], Write::Device(ref r) if r.id == "gas-1"));
    assert_eq!(s.metrics.readings.load(Ordering::Relaxed), 3);
}

#[test]
fn duplicates_are_dropped_and_gaps_counted() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    for seq in [1, 2, 2, 5] {
        let body = format!(r#"{{"seq":{seq},"values":{{"gas_lel":1.0}}}}"#);
        s.handle(msg("citywatch/v1/xh/gas-1/telemetry", &body, NOW), NOW, &mut b);
    }
    assert_eq!(b.readings.len(), 3, "seq 2 twice: stored once");
    assert_eq!(s.metrics.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(s.metrics.seq_gaps.load(Ordering::Relaxed), 2);
    assert!(b.readings.iter().all(|r| r.ts_ms == NOW), "no ts: receive time");
}

#[test]
fn bad_input_is_quarantined_with_its_reason_and_ingestion_goes_on() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    let cases = [
        ("citywatch/v1/xh/gas-1/telemetry", "not json", "not_json"),
        ("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":1,"values":{"gas_lel":NaN}}"#, "non_finite"),
        ("citywatch/v1/x h/gas-1/telemetry", r#"{"seq":1,"values":{}}"#, "bad_topic"),
        ("citywatch/v1/other-site/gas-1/telemetry", r#"{"seq":9,"values":{"gas_lel":1}}"#, "site_mismatch"),
        ("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":10,"values":{"tilt_deg":1}}"#, "metric_not_for_kind"),
        ("citywatch/v1/xh/mystery/telemetry", r#"{"seq":1,"values":{}}"#, "unknown_device"),
    ];
    for (topic, payload, _) in cases {
        s.handle(msg(topic, payload, NOW), NOW, &mut b);
    }
    s.handle(msg("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":11,"values":{"gas_lel":2}}"#, NOW), NOW, &mut b);
    let reasons = quarantined(&b);
    let expected: Vec<String> = cases.iter().map(|c| c.2.to_owned()).collect();
    assert_eq!(reasons, expected);
    assert_eq!(b.readings.len(), 1, "the good message after them still lands");
    assert_eq!(s.metrics.rejected_total(), cases.len() as u64);
    let raw = b.writes.iter().find_map(|w| match w {
        Write::Quarantine(q) if q.reason == "not_json" => Some(q.payload.clone()),
        _ => None,
    });
    assert_eq!(raw.as_deref(), Some(&b"not json"[..]), "raw bytes kept");
}

#[test]
fn telemetry_before_birth_registers_by_inferred_kind_and_late_readings_are_historical() {
    let mut s = stage();
    let mut b = Batch::default();
    let old = NOW - 3_600_000;
    s.handle(msg("citywatch/v1/xh/smk-1/telemetry", &format!(r#"{{"seq":1,"ts":{old},"values":{{"smoke_db_m":0.01}}}}"#), NOW), NOW, &mut b);
    assert_eq!(s.registry.get("smk-1").map(|d| d.kind), Some(DeviceKind::SmokeDetector));
    assert!(b.readings[0].historical);
    assert_eq!(s.metrics.historical.load(Ordering::Relaxed), 1);
}

#[test]
fn will_marks_offline_and_events_update_health() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    s.handle(msg("citywatch/v1/xh/gas-1/event", r#"{"seq":1,"event":"fault","metric":"gas_lel"}"#, NOW), NOW, &mut b);
    assert!(s.registry.get("gas-1").expect("known").faulted);
    s.handle(msg("citywatch/v1/xh/gas-1/status", r#"{"state":"offline","kind":"gas_detector"}"#, NOW), NOW, &mut b);
    assert_eq!(s.registry.get("gas-1").expect("known").link, LinkState::Offline);
    assert!(b.writes.iter().any(|w| matches!(w, Write::Event(e) if e.event == citywatch_edge::wire::EventKind::Fault)));
}

#[test]
fn acks_are_collected_even_for_rejected_and_own_messages() {
    let fired = Arc::new(AtomicUsize::new(0));
    let mut s = stage();
    let mut b = Batch::default();
    for (topic, payload) in [("citywatch/v1/xh/gas-1/status", BIRTH), ("citywatch/v1/xh/gas-1/telemetry", "junk"), ("citywatch/v1/ops/incidents", "{}")] {
        let f = Arc::clone(&fired);
        let mut m = msg(topic, payload, NOW);
        m.ack = Some(Ack::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
        }));
        s.handle(m, NOW, &mut b);
    }
    assert_eq!(b.acks.len(), 3);
    assert_eq!(fired.load(Ordering::SeqCst), 0, "nothing acknowledged before the store commits");
    assert_eq!(quarantined(&b), ["not_json"], "the ops topic is ours, not device input");
}

#[test]
fn a_jumping_device_clock_is_accepted_at_receive_time_flagged_and_evaluated_live() {
    let incidents = crate::decode::Unwired;
    let (_releases_tx, releases) = mpsc::channel(16);
    let engine = Engine::new(Arc::new(crate::rules::RuleSet::default_pack()));
    let mut s = stage().with_rules(engine, incidents, releases, &[]);
    let cfg = IngestConfig::default();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    let year = 365 * 86_400_000;
    // A reset clock (1970), a clock a year ahead, the largest ts the wire allows, and one
    // inside the limits (a replay a day old, and one a minute ahead).
    let cases: [(u64, Option<i64>); 5] = [
        (0, Some(-NOW)),
        ((NOW + year) as u64, Some(year)),
        (u64::MAX, Some(i64::MAX - NOW)),
        ((NOW - 86_400_000) as u64, None),
        ((NOW + 60_000) as u64, None),
    ];
    for (i, (ts, offset)) in cases.into_iter().enumerate() {
        let mut b = Batch::default();
        let body = format!(r#"{{"seq":{},"ts":{ts},"values":{{"gas_lel":1.0}}}}"#, i + 1);
        s.handle(msg("citywatch/v1/xh/gas-1/telemetry", &body, NOW), NOW, &mut b);
        assert_eq!(b.readings.len(), 1, "accepted: {body}");
        let d = s.registry.get("gas-1").expect("known");
        assert_eq!(d.clock_offset_ms, offset, "{body}");
        let flagged = d.health_flags(NOW, &cfg).contains(&crate::registry::Health::ClockSkew);
        assert_eq!(flagged, offset.is_some(), "{body}");
        // Skewed: stored at receive time, one millisecond apart when they arrive together.
        let want_ts = if offset.is_some() { NOW + i as i64 } else { ts as i64 };
        assert_eq!(b.readings[0].ts_ms, want_ts, "{body}");
    }
    assert_eq!(s.metrics.clock_skew.load(Ordering::Relaxed), 3);
    assert_eq!(s.registry.get("gas-1").expect("known").clock_skewed, 3);
    assert!(crate::metrics::encode_collector(Arc::clone(&s.metrics)).contains("citywatch_clock_skew_total 3\n"));

    // A gas alarm from a device whose clock reset is live, not a replay: it opens gas_high.
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":9,"ts":5,"values":{"gas_lel":60.0}}"#, NOW), NOW, &mut b);
    assert!(!b.readings[0].historical);
    assert!(b.signals.iter().any(|sig| &*sig.rule == "gas_high"), "{:?}", b.signals);
    // So does an alarm event stamped in 1970.
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/event", r#"{"seq":10,"ts":7,"event":"alarm","metric":"gas_lel","value":61.0}"#, NOW), NOW, &mut b);
    assert!(b.signals.iter().any(|sig| &*sig.rule == "device_alarm"), "{:?}", b.signals);
    assert!(b.writes.iter().any(|w| matches!(w, Write::Event(e) if e.ts_ms > NOW && e.ts_ms < NOW + 10)));
}

/// Hands every batch's signals to a channel the test reads (and acknowledges them at once).
#[derive(Debug)]
struct Recorded(tokio::sync::mpsc::UnboundedSender<Vec<Signal>>);

impl SignalSink for Recorded {
    fn signals(&self, signals: Vec<Signal>, ack: Option<Ack>, _: i64) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        let _ = self.0.send(signals);
        if let Some(ack) = ack {
            ack.done();
        }
        Box::pin(std::future::ready(Ok(())))
    }
    fn command_ack(&self, _: String, _: String) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn replayed(&self, signals: Vec<Signal>) -> futures_util::future::BoxFuture<'_, Result<(), Stopped>> {
        let _ = self.0.send(signals);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_is_evaluated_while_bulk_telemetry_waits_for_a_full_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::store::StorageConfig { path: dir.path().to_path_buf(), queue_capacity: 1, ..Default::default() };
    let (store, writer) = crate::store::SqliteStore::open(&config).expect("store");
    // Hold the store's writer thread inside an ack (acks run there after the commit), then fill
    // its one-write queue: from here on every send to the store waits.
    let (unblock, blocked) = std::sync::mpsc::channel::<()>();
    writer.send(Write::Ack(Ack::new(move || { let _ = blocked.recv(); }))).await.expect("writer");
    while writer.try_send(Write::Ack(Ack::new(|| {}))).is_ok() {}

    let (signals_tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
    let (_releases_tx, releases) = mpsc::channel(16);
    let engine = Engine::new(Arc::new(crate::rules::RuleSet::default_pack()));
    let mut s = stage().with_rules(engine, Recorded(signals_tx), releases, &[]);
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut Batch::default());
    s.handle(msg("citywatch/v1/xh/gas-1/telemetry", r#"{"seq":0,"values":{"gas_lel":1.0}}"#, NOW), NOW, &mut Batch::default());
    let (lanes, input) = crate::ingest::Lanes::channel(64);
    let stage = tokio::spawn(s.run(input, writer));

    // Telemetry first: its batch cannot reach the store.
    for seq in 1..=20 {
        // Each its own time: the store keeps one reading per (device, metric, ts).
        let body = format!(r#"{{"seq":{seq},"ts":{},"values":{{"gas_lel":1.0}}}}"#, NOW - 1000 + seq);
        lanes.bulk.send(msg("citywatch/v1/xh/gas-1/telemetry", &body, NOW)).await.expect("bulk lane");
    }
    // Then the alarm, on its lane: its signal must come out although the store is still full.
    let alarm = r#"{"seq":21,"event":"alarm","metric":"gas_lel","value":54.0}"#;
    lanes.for_topic("citywatch/v1/xh/gas-1/event").send(msg("citywatch/v1/xh/gas-1/event", alarm, NOW)).await.expect("alert lane");
    let evaluated = signalled(&mut signals, "device_alarm").await;
    assert_eq!(evaluated, Ok(true), "the alarm was not evaluated while the store was full");

    // Let the store go: the telemetry is stored after all, and the stage stops with its sources.
    unblock.send(()).expect("writer thread waits");
    drop(lanes);
    tokio::time::timeout(std::time::Duration::from_secs(60), stage).await.expect("the stage stops").expect("no panic");
    // Dropping the writer (with the stage) lets the store drain: the 20 telemetry readings
    // (those the alarm overtook are late, not duplicates) and the alarm event.
    tokio::task::block_in_place(|| store.join()).expect("the writer stops");
    let stats = store.stats();
    assert_eq!((stats.readings_written, stats.events_written), (20, 1), "{stats:?}");
}

/// Cluster mode: a partition's new owner restores the devices the old owner registered from
/// their last status in the ingest stream; their next event is accepted, not quarantined.
#[test]
fn a_restored_status_registers_the_device_without_counting_it_as_received() {
    let mut s = stage();
    let mut b = Batch::default();
    let stored = NOW - 60_000;
    let restored = Inbound { origin: Origin::Restored, ..msg("citywatch/v1/xh/gas-1/status", BIRTH, stored) };
    s.handle(restored, NOW, &mut b);
    let d = s.registry.get("gas-1").expect("registered from the restored status");
    assert_eq!((&*d.site, d.kind, d.interval_s, d.last_seen_ms), ("xh", DeviceKind::GasDetector, 10, stored));
    assert_eq!(s.metrics.statuses.load(Ordering::Relaxed), 0, "not a status that arrived");
    assert!(quarantined(&b).is_empty());
    assert!(b.received_ms.is_none(), "a restored status does not date the batch");
    s.handle(msg("citywatch/v1/xh/gas-1/event", r#"{"seq":7,"event":"self_test_ok"}"#, NOW), NOW, &mut b);
    assert!(quarantined(&b).is_empty(), "the device's event after the restore: {:?}", quarantined(&b));
    assert_eq!(s.metrics.events.load(Ordering::Relaxed), 1);
}

#[test]
fn a_restored_status_older_than_what_was_heard_changes_nothing_but_never_a_known_site() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/status", BIRTH, NOW), NOW, &mut b);
    let offline = r#"{"state":"offline","kind":"smoke_detector"}"#;
    s.handle(Inbound { origin: Origin::Restored, ..msg("citywatch/v1/xh/gas-1/status", offline, NOW - 1) }, NOW, &mut b);
    let d = s.registry.get("gas-1").expect("registered");
    assert_eq!((d.kind, d.link), (DeviceKind::GasDetector, LinkState::Online), "the newer birth stands");
    s.handle(Inbound { origin: Origin::Restored, ..msg("citywatch/v1/other/gas-1/status", BIRTH, NOW + 1) }, NOW, &mut b);
    assert_eq!(&*s.registry.get("gas-1").expect("registered").site, "xh");
    s.handle(Inbound { origin: Origin::Restored, ..msg("citywatch/v1/xh/nameless/status", r#"{"state":"online"}"#, NOW) }, NOW, &mut b);
    assert!(s.registry.get("nameless").is_none(), "no kind, unknown device: not registered");
    assert!(quarantined(&b).is_empty(), "restored statuses are never quarantined");
}

/// A new device's first alarm overtakes its birth (events take the alert lane, births the
/// bulk lane): it is held, not quarantined, and decoded once the birth has been seen.
#[test]
fn an_event_that_overtook_its_devices_birth_waits_for_it() {
    let mut s = stage();
    let mut b = Batch::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&acked);
    let alarm = Inbound {
        ack: Some(Ack::new(move || { a.fetch_add(1, Ordering::SeqCst); })),
        // An alarm without `metric` says nothing of the device's kind: it cannot register it.
        ..msg("citywatch/v1/xh/gas-9/event", r#"{"seq":1,"event":"alarm"}"#, NOW)
    };
    s.handle(alarm, NOW, &mut b);
    assert!(quarantined(&b).is_empty() && b.writes.is_empty() && b.acks.is_empty(), "held with its ack");
    assert_eq!(s.metrics.events.load(Ordering::Relaxed), 0);
    // The bulk lane is not empty yet (its birth is in it): held even when old.
    s.release_parked(NOW + 10_000, false, false, &mut b);
    assert!(quarantined(&b).is_empty() && s.parked.len() == 1);
    // The birth arrives; the next time the bulk lane is empty, the alarm is decoded.
    s.handle(msg("citywatch/v1/xh/gas-9/status", BIRTH, NOW), NOW, &mut b);
    s.release_parked(NOW + 10_000, true, false, &mut b);
    assert!(s.parked.is_empty());
    assert!(quarantined(&b).is_empty(), "{:?}", quarantined(&b));
    assert_eq!(s.metrics.events.load(Ordering::Relaxed), 1);
    assert!(b.writes.iter().any(|w| matches!(w, Write::Event(e) if &*e.device == "gas-9")));
    b.into_writes().into_iter().for_each(|w| if let Write::Ack(ack) = w { ack.done() });
    assert_eq!(acked.load(Ordering::SeqCst), 1, "its ack went with it");
}

#[test]
fn an_event_of_a_device_that_never_is_born_is_quarantined_after_the_wait() {
    let mut s = stage();
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/mystery/event", r#"{"seq":1,"event":"tamper"}"#, NOW), NOW, &mut b);
    s.release_parked(NOW + 1, true, false, &mut b); // decoded again: still unknown, held again
    assert!(quarantined(&b).is_empty() && s.parked.len() == 1, "too young to give up on");
    s.release_parked(NOW + PARK_FOR_BIRTH_MS, false, false, &mut b);
    assert!(quarantined(&b).is_empty(), "the bulk lane was not seen empty");
    s.release_parked(NOW + PARK_FOR_BIRTH_MS, true, false, &mut b);
    assert_eq!(quarantined(&b), vec!["unknown_device".to_owned()]);
    assert!(s.parked.is_empty());
    assert_eq!(s.metrics.rejected_total(), 1);
    assert_eq!(s.metrics.received[2].load(Ordering::Relaxed), 1, "counted as received once, not per try");
}

/// The same through the running stage: the birth waits in the bulk lane, the alarm is first on
/// the alert lane, and the alarm still opens its incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_stage_evaluates_an_alarm_that_overtook_its_birth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::store::StorageConfig { path: dir.path().to_path_buf(), ..Default::default() };
    let (store, writer) = crate::store::SqliteStore::open(&config).expect("store");
    let (signals_tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
    let (_releases_tx, releases) = mpsc::channel(16);
    let engine = Engine::new(Arc::new(crate::rules::RuleSet::default_pack()));
    let s = stage().with_rules(engine, Recorded(signals_tx), releases, &[]);
    let (lanes, input) = crate::ingest::Lanes::channel(64);
    lanes.bulk.send(msg("citywatch/v1/xh/gas-9/status", BIRTH, NOW)).await.expect("bulk lane");
    lanes.alerts.send(msg("citywatch/v1/xh/gas-9/event", r#"{"seq":1,"event":"alarm"}"#, NOW)).await.expect("alert lane");
    let stage = tokio::spawn(s.run(input, writer));
    let evaluated = signalled(&mut signals, "device_alarm").await;
    assert_eq!(evaluated, Ok(true), "the alarm that overtook its birth was not evaluated");
    drop(lanes);
    tokio::time::timeout(std::time::Duration::from_secs(60), stage).await.expect("the stage stops").expect("no panic");
    tokio::task::block_in_place(|| store.join()).expect("the writer stops");
    assert_eq!(store.stats().events_written, 1);
}

/// Whether a signal of `rule` comes out of the running stage within a minute (`Err` on timeout,
/// `Ok(false)` when the stage stopped without one).
async fn signalled(
    signals: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<Signal>>,
    rule: &str,
) -> Result<bool, tokio::time::error::Elapsed> {
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(batch) = signals.recv().await {
            if batch.iter().any(|sig| &*sig.rule == rule) {
                return true;
            }
        }
        false
    })
    .await
}

/// Cluster mode: a partition's new owner replays what the old owner took in. The rule engine
/// sees it at its own time, so a hold begun on the old owner goes on here; nothing else
/// happens (not stored, counted nor quarantined), and its signals are kept apart as replayed,
/// only within the live horizon.
#[test]
fn a_replayed_message_builds_rule_state_and_is_neither_stored_counted_nor_quarantined() {
    let (_releases_tx, releases) = mpsc::channel(16);
    let engine = Engine::new(Arc::new(crate::rules::RuleSet::default_pack()));
    let mut s = stage().with_rules(engine, crate::decode::Unwired, releases, &[]);
    let replayed = |topic: &str, payload: &str, stored: i64| Inbound { origin: Origin::Replayed, ..msg(topic, payload, stored) };
    let gas = |seq: u32| format!(r#"{{"seq":{seq},"values":{{"gas_lel":25.0}}}}"#);
    let is_open = |sig: &Signal, device: &str| &*sig.rule == "gas_low" && &*sig.device == device && matches!(sig.change, crate::model::Change::Open { .. });
    let mut b = Batch::default();
    for device in ["gas-1", "gas-2", "gas-3"] {
        s.handle(Inbound { origin: Origin::Restored, ..msg(&format!("citywatch/v1/xh/{device}/status"), BIRTH, NOW - 500_000) }, NOW, &mut b);
    }
    // gas_low: at least 20 %LEL held 10 s. The old owner saw 6 s of it on gas-1.
    for (seq, at) in [(1, NOW - 9_000), (2, NOW - 6_000), (3, NOW - 3_000)] {
        s.handle(replayed("citywatch/v1/xh/gas-1/telemetry", &gas(seq), at), NOW, &mut b);
    }
    s.handle(replayed("citywatch/v1/xh/gas-1/telemetry", "not json", NOW - 2_000), NOW, &mut b);
    s.handle(replayed("citywatch/v1/xh/stranger/event", r#"{"seq":1,"event":"alarm"}"#, NOW - 2_000), NOW, &mut b);
    assert!(b.readings.is_empty(), "not stored again: {:?}", b.readings);
    assert!(!b.writes.iter().any(|w| matches!(w, Write::Event(_) | Write::Readings(_) | Write::Quarantine(_))), "{:?}", b.writes);
    assert!(b.signals.is_empty() && b.replayed_signals.is_empty(), "6 s held of 10: nothing yet");
    assert!(b.received_ms.is_none(), "a replayed message does not date the batch");
    assert_eq!(s.metrics.readings.load(Ordering::Relaxed), 0);
    assert_eq!(s.metrics.rejected_total(), 0, "a bad replayed message is not quarantined again");
    assert!(s.registry.get("stranger").is_none());
    // The next live reading comes 10 s after the first replayed one: the hold is complete.
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-1/telemetry", &gas(4), NOW + 1_000), NOW + 1_000, &mut b);
    assert!(b.signals.iter().any(|sig| is_open(sig, "gas-1")), "{:?}", b.signals);
    assert_eq!(s.metrics.readings.load(Ordering::Relaxed), 1);
    // A hold completed within the replay opens as replayed; one older than the live horizon
    // builds the rule's state and opens nothing.
    let mut b = Batch::default();
    for (seq, at) in [(1, NOW - 30_000), (2, NOW - 15_000)] {
        s.handle(replayed("citywatch/v1/xh/gas-2/telemetry", &gas(seq), at), NOW, &mut b);
    }
    for (seq, at) in [(1, NOW - 400_000), (2, NOW - 385_000)] {
        s.handle(replayed("citywatch/v1/xh/gas-3/telemetry", &gas(seq), at), NOW, &mut b);
    }
    assert!(b.signals.is_empty(), "{:?}", b.signals);
    assert!(b.replayed_signals.iter().any(|sig| is_open(sig, "gas-2")), "{:?}", b.replayed_signals);
    assert!(!b.replayed_signals.iter().any(|sig| &*sig.device == "gas-3"), "{:?}", b.replayed_signals);
    let mut b = Batch::default();
    s.handle(msg("citywatch/v1/xh/gas-3/telemetry", &gas(3), NOW), NOW, &mut b);
    assert!(!b.signals.iter().any(|sig| is_open(sig, "gas-3")), "active from the replay, not opened again: {:?}", b.signals);
}
