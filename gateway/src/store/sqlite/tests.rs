//! Tests of the SQLite store, each in its own temporary directory.

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use citywatch_edge::wire::{DeviceKind, EventKind, Metric};
use rusqlite::Connection;

use super::*;
use crate::ingest::Ack;
use crate::ingest::now_ms;
use crate::store::{DeviceRecord, EventRecord, Point, QuarantineEntry, Reading, ReadingQuery};

const WAIT: Duration = Duration::from_secs(10);

fn options(dir: &Path) -> StoreOptions {
    StoreOptions {
        dir: dir.to_path_buf(),
        raw_retention: Duration::from_secs(30 * 86_400),
        rollup_retention: Duration::from_secs(365 * 86_400),
        batch_max_rows: 10_000,
        commit_max_rows: 100_000,
        queue_capacity: 1024,
        quarantine_max_rows: 1000,
        synchronous: Synchronous::Full,
        retention_every: Duration::from_secs(300),
        cache_mib: 16,
        wal_autocheckpoint_pages: 1000,
    }
}

fn open(dir: &Path) -> (SqliteStore, StoreWriter) {
    SqliteStore::open_with(options(dir)).expect("store opens")
}

fn reading(device: &str, metric: Metric, ts_ms: i64, value: f64) -> Reading {
    Reading { device: Arc::from(device), metric, ts_ms, value, historical: false }
}

/// Sends an ack and waits until it fires: everything sent before is then committed.
fn sync(w: &StoreWriter) {
    let (tx, rx) = std_mpsc::channel();
    w.blocking_send(Write::Ack(Ack::new(move || {
        let _ = tx.send(());
    })))
    .expect("writer alive");
    rx.recv_timeout(WAIT).expect("ack fires");
}

/// Holds the writer thread inside an ack until the answer is sent (or dropped): what is sent
/// meanwhile stays queued.
fn hold_writer(w: &StoreWriter) -> std_mpsc::Sender<()> {
    let (entered_tx, entered) = std_mpsc::channel();
    let (release, blocked) = std_mpsc::channel::<()>();
    w.blocking_send(Write::Ack(Ack::new(move || {
        let _ = entered_tx.send(());
        let _ = blocked.recv();
    })))
    .expect("writer");
    entered.recv_timeout(WAIT).expect("the writer runs the ack");
    release
}

fn write_sync(w: &StoreWriter, items: Vec<Write>) {
    for item in items {
        w.blocking_send(item).expect("writer alive");
    }
    sync(w);
}

fn query(device: &str, metric: Metric, from_ms: i64, to_ms: i64, step_ms: Option<i64>) -> ReadingQuery {
    ReadingQuery { device: device.into(), metric, from_ms, to_ms, step_ms, limit: 10_000 }
}

/// A recent minute boundary, so raw rows are inside the raw retention.
fn base_minute() -> i64 {
    (now_ms() - 3_600_000).div_euclid(MINUTE_MS) * MINUTE_MS
}

fn fresh_count(db: &Path, sql: &str) -> i64 {
    let c = Connection::open(db).expect("fresh connection");
    c.query_row(sql, [], |r| r.get(0)).expect("count")
}

#[test]
fn metric_indexes_are_pinned() {
    // Readings store a metric as its index in `Metric::ALL`: that order may only be appended to.
    let pinned = [
        "gas_lel",
        "valve_closed",
        "temp_c",
        "smoke_db_m",
        "co_ppm",
        "tilt_deg",
        "vibration_mg",
        "corrosion_um",
        "section_loss_pct",
        "battery_v",
        "rssi_dbm",
    ];
    for (i, name) in pinned.iter().enumerate() {
        assert_eq!(Metric::ALL[i].as_str(), *name, "Metric::ALL[{i}] moved");
    }
    for (i, m) in Metric::ALL.iter().enumerate() {
        assert_eq!(metric_index(*m), i as i64);
        assert_eq!(metric_at(i as i64), Some(*m));
    }
}

#[test]
fn write_and_read_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute();
    write_sync(
        &w,
        vec![Write::Readings(vec![
            reading("gas-1", Metric::GasLel, t0 + 2000, 3.0),
            reading("gas-1", Metric::GasLel, t0, 1.0),
            reading("gas-1", Metric::GasLel, t0 + 1000, 2.0),
            reading("gas-1", Metric::TempC, t0, 21.5),
            reading("gas-2", Metric::GasLel, t0, 9.0),
        ])],
    );
    let pts = store.readings(&query("gas-1", Metric::GasLel, t0, t0 + 10_000, None)).expect("read");
    let got: Vec<(i64, f64)> = pts.iter().map(|p| (p.ts_ms, p.last)).collect();
    assert_eq!(got, vec![(t0, 1.0), (t0 + 1000, 2.0), (t0 + 2000, 3.0)]);
    assert_eq!(pts[0], Point { ts_ms: t0, min: 1.0, max: 1.0, avg: 1.0, last: 1.0, count: 1 });
    // [from, to) and limit.
    let pts = store.readings(&query("gas-1", Metric::GasLel, t0 + 1000, t0 + 2000, None)).expect("read");
    assert_eq!(pts.len(), 1);
    let mut q = query("gas-1", Metric::GasLel, t0, t0 + 10_000, None);
    q.limit = 2;
    assert_eq!(store.readings(&q).expect("read").len(), 2);
    assert_eq!(store.reading_count("gas-1", Metric::GasLel).expect("count"), 3);
    assert_eq!(store.reading_count("gas-1", Metric::TempC).expect("count"), 1);
    assert_eq!(store.reading_count("nobody", Metric::TempC).expect("count"), 0);
    assert!(store.readings(&query("nobody", Metric::TempC, t0, t0 + 1, None)).expect("read").is_empty());
    let stats = store.stats();
    assert_eq!(stats.readings_written, 5);
    assert_eq!(stats.queue_capacity, 1024);
    assert_eq!(stats.write_errors, 0);
    assert!(stats.batches >= 1);
    drop(w);
    store.close().expect("close");
}

#[test]
fn downsampling_exact_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute();
    // Steps of 10 s from t0: [0,10) has 1, 5, 3 (last = 3, at 9 s); [10,20) is empty;
    // [20,30) has 8, -2 (last = -2).
    let data = [(0, 1.0), (4_000, 5.0), (9_000, 3.0), (21_000, 8.0), (29_999, -2.0), (30_000, 100.0)];
    let readings = data.iter().rev().map(|(dt, v)| reading("s", Metric::SmokeDbM, t0 + dt, *v)).collect();
    write_sync(&w, vec![Write::Readings(readings)]);
    let pts = store.readings(&query("s", Metric::SmokeDbM, t0, t0 + 30_000, Some(10_000))).expect("read");
    assert_eq!(
        pts,
        vec![
            Point { ts_ms: t0, min: 1.0, max: 5.0, avg: 3.0, last: 3.0, count: 3 },
            Point { ts_ms: t0 + 20_000, min: -2.0, max: 8.0, avg: 3.0, last: -2.0, count: 2 },
        ]
    );
    // Buckets count from `from`, not from the epoch.
    let pts = store.readings(&query("s", Metric::SmokeDbM, t0 + 4_000, t0 + 24_000, Some(10_000))).expect("read");
    assert_eq!(
        pts,
        vec![
            Point { ts_ms: t0 + 4_000, min: 3.0, max: 5.0, avg: 4.0, last: 3.0, count: 2 },
            Point { ts_ms: t0 + 14_000, min: 8.0, max: 8.0, avg: 8.0, last: 8.0, count: 1 },
        ]
    );
    assert!(matches!(
        store.readings(&query("s", Metric::SmokeDbM, t0, t0 + 1, Some(0))),
        Err(Error::Invalid(_))
    ));
    drop(w);
    store.close().expect("close");
}

/// Aggregates raw points into steps, the way the raw path defines them.
fn aggregate(points: &[Point], from: i64, step: i64) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    let mut sums: Vec<f64> = Vec::new();
    for p in points {
        let start = from + (p.ts_ms - from).div_euclid(step) * step;
        match out.last_mut() {
            Some(o) if o.ts_ms == start => {
                o.min = o.min.min(p.min);
                o.max = o.max.max(p.max);
                o.last = p.last;
                o.count += 1;
                if let Some(s) = sums.last_mut() {
                    *s += p.last;
                }
            }
            _ => {
                out.push(Point { ts_ms: start, min: p.min, max: p.max, avg: 0.0, last: p.last, count: 1 });
                sums.push(p.last);
            }
        }
    }
    for (o, s) in out.iter_mut().zip(sums) {
        o.avg = s / o.count as f64;
    }
    out
}

#[test]
fn rollups_equal_raw_aggregation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute() - 30 * MINUTE_MS;
    // 20 minutes, a reading every 7 s with a value that sums exactly, sent in four batches whose
    // timestamps interleave (so rollup cells are merged across transactions, out of order).
    let all: Vec<Reading> = (0..(20 * 60 / 7))
        .map(|i| reading("t", Metric::TempC, t0 + i * 7_000, ((i * 37) % 101) as f64 * 0.25 - 5.0))
        .collect();
    for part in 0..4 {
        let batch = all.iter().enumerate().filter(|(i, _)| i % 4 == 3 - part).map(|(_, r)| r.clone()).collect();
        write_sync(&w, vec![Write::Readings(batch)]);
    }
    let (from, to) = (t0, t0 + 20 * MINUTE_MS);
    let raw = store.readings(&query("t", Metric::TempC, from, to, None)).expect("raw");
    assert_eq!(raw.len(), all.len());
    for step in [MINUTE_MS, 5 * MINUTE_MS, 7 * MINUTE_MS] {
        let rolled = store.readings(&query("t", Metric::TempC, from, to, Some(step))).expect("rollups");
        assert_eq!(rolled, aggregate(&raw, from, step), "step {step}");
    }
    let c = fresh_count(store.db_path(), "SELECT count(*) FROM rollup_1m");
    assert_eq!(c, 20);
    drop(w);
    store.close().expect("close");
}

#[test]
fn duplicates_do_not_break_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute();
    let (acked_tx, acked_rx) = std_mpsc::channel();
    write_sync(&w, vec![Write::Readings(vec![reading("d", Metric::CoPpm, t0, 1.0)])]);
    // A replay of the stored reading, a duplicate inside the batch, and one new reading.
    w.blocking_send(Write::Readings(vec![
        reading("d", Metric::CoPpm, t0, 99.0),
        reading("d", Metric::CoPpm, t0 + 1000, 2.0),
        reading("d", Metric::CoPpm, t0 + 1000, 77.0),
        reading("d", Metric::CoPpm, t0 + 2000, 3.0),
    ]))
    .expect("send");
    w.blocking_send(Write::Ack(Ack::new(move || {
        let _ = acked_tx.send(());
    })))
    .expect("send");
    acked_rx.recv_timeout(WAIT).expect("the batch committed and acked");
    let pts = store.readings(&query("d", Metric::CoPpm, t0, t0 + MINUTE_MS, None)).expect("read");
    let got: Vec<f64> = pts.iter().map(|p| p.last).collect();
    assert_eq!(got, vec![1.0, 2.0, 3.0], "first write wins");
    let rolled = store.readings(&query("d", Metric::CoPpm, t0, t0 + MINUTE_MS, Some(MINUTE_MS))).expect("read");
    assert_eq!(rolled, vec![Point { ts_ms: t0, min: 1.0, max: 3.0, avg: 2.0, last: 3.0, count: 3 }]);
    let stats = store.stats();
    assert_eq!(stats.readings_written, 3);
    assert_eq!(stats.readings_time_taken, 2, "the replay and the second reading at t0 + 1 s are counted");
    assert_eq!(stats.write_errors, 0);
    drop(w);
    store.close().expect("close");
}

#[test]
fn a_message_is_one_row_and_a_later_message_of_the_same_time_fills_only_its_new_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let db = store.db_path().to_path_buf();
    let t0 = base_minute();
    // One message of three readings, then one of the same (device, ts) repeating one of them
    // with another value and adding a fourth metric, in a later transaction.
    write_sync(&w, vec![Write::Readings(vec![
        reading("g", Metric::GasLel, t0, 5.0),
        reading("g", Metric::TempC, t0, 21.0),
        reading("g", Metric::BatteryV, t0, 3.6),
    ])]);
    assert_eq!(fresh_count(&db, "SELECT count(*) FROM readings"), 1, "one row per message");
    write_sync(&w, vec![Write::Readings(vec![
        reading("g", Metric::GasLel, t0, 50.0),
        reading("g", Metric::RssiDbm, t0, -70.0),
        reading("g", Metric::GasLel, t0 + 1000, 6.0),
    ])]);
    assert_eq!(fresh_count(&db, "SELECT count(*) FROM readings"), 2);
    let gas = store.readings(&query("g", Metric::GasLel, t0, t0 + MINUTE_MS, None)).expect("read");
    assert_eq!(gas.iter().map(|p| (p.ts_ms, p.last)).collect::<Vec<_>>(), vec![(t0, 5.0), (t0 + 1000, 6.0)], "the stored reading wins");
    let rssi = store.readings(&query("g", Metric::RssiDbm, t0, t0 + MINUTE_MS, None)).expect("read");
    assert_eq!(rssi.iter().map(|p| p.last).collect::<Vec<_>>(), vec![-70.0], "the new metric filled in");
    assert!(store.readings(&query("g", Metric::CoPpm, t0, t0 + MINUTE_MS, None)).expect("read").is_empty(), "no column, no reading");
    assert_eq!(store.reading_count("g", Metric::GasLel).expect("count"), 2);
    assert_eq!(store.reading_count("g", Metric::TempC).expect("count"), 1);
    // Rollups count each stored reading once; raw and rollup aggregation agree.
    for step in [MINUTE_MS, 30_000] {
        let rolled = store.readings(&query("g", Metric::GasLel, t0, t0 + MINUTE_MS, Some(step))).expect("read");
        assert_eq!(rolled[0].count, 2, "step {step}");
        assert_eq!((rolled[0].min, rolled[0].max, rolled[0].last), (5.0, 6.0, 6.0), "step {step}");
    }
    assert_eq!(store.stats().readings_written, 3 + 2, "the repeated gas reading is not counted");
    assert_eq!(store.stats().readings_time_taken, 1, "but counted as not stored");
    drop(w);
    store.close().expect("close");
}

#[test]
fn a_schema_1_store_is_migrated_to_one_row_per_message_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = base_minute();
    {
        // A v1 database as the previous release left it.
        let c = Connection::open(dir.path().join(super::DB_FILE)).expect("db");
        c.execute_batch(&format!(
            "CREATE TABLE schema_version(version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1, 0);
             {}
             INSERT INTO device_keys(id, name) VALUES (1, 'a'), (2, 'b');
             INSERT INTO readings(device, metric, ts, value) VALUES
               (1, 0, {t0}, 5.0), (1, 2, {t0}, 20.5), (1, 0, {t1}, 6.0), (2, 9, {t0}, 3.3);
             INSERT INTO rollup_1m VALUES (1, 0, {t0}, 5.0, 6.0, 11.0, 2, 6.0, {t1});",
            super::schema::SCHEMA_V1,
            t1 = t0 + 1000,
        ))
        .expect("v1 schema");
    }
    let (store, w) = open(dir.path());
    let db = store.db_path().to_path_buf();
    assert_eq!(fresh_count(&db, "SELECT max(version) FROM schema_version"), 2);
    assert_eq!(fresh_count(&db, "SELECT count(*) FROM readings"), 3, "(a, t0), (a, t0 + 1 s), (b, t0)");
    let gas = store.readings(&query("a", Metric::GasLel, t0, t0 + MINUTE_MS, None)).expect("read");
    assert_eq!(gas.iter().map(|p| p.last).collect::<Vec<_>>(), vec![5.0, 6.0]);
    let temp = store.readings(&query("a", Metric::TempC, t0, t0 + MINUTE_MS, None)).expect("read");
    assert_eq!(temp.iter().map(|p| (p.ts_ms, p.last)).collect::<Vec<_>>(), vec![(t0, 20.5)]);
    assert_eq!(store.reading_count("b", Metric::BatteryV).expect("count"), 1);
    let rolled = store.readings(&query("a", Metric::GasLel, t0, t0 + MINUTE_MS, Some(MINUTE_MS))).expect("read");
    assert_eq!(rolled[0].count, 2, "rollups kept as they were");
    // And it takes new messages.
    write_sync(&w, vec![Write::Readings(vec![reading("a", Metric::GasLel, t0 + 2000, 7.0)])]);
    assert_eq!(store.reading_count("a", Metric::GasLel).expect("count"), 3);
    drop(w);
    store.close().expect("close");
    // Opening again leaves a v2 store as it is.
    let (store, w) = open(dir.path());
    assert_eq!(store.reading_count("a", Metric::GasLel).expect("count"), 3);
    drop(w);
    store.close().expect("close");
}

#[test]
fn acks_fire_only_after_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let db = store.db_path().to_path_buf();
    let t0 = base_minute();
    let (tx, rx) = std_mpsc::channel();
    for batch in 0..20i64 {
        let readings = (0..500).map(|i| reading("a", Metric::BatteryV, t0 + batch * 500 + i, 3.0)).collect();
        w.blocking_send(Write::Readings(readings)).expect("send");
        let (db, tx) = (db.clone(), tx.clone());
        w.blocking_send(Write::Ack(Ack::new(move || {
            // A fresh connection sees only committed data.
            let n = fresh_count(&db, "SELECT count(*) FROM readings");
            let _ = tx.send((batch, n));
        })))
        .expect("send");
    }
    for expect_batch in 0..20i64 {
        let (batch, n) = rx.recv_timeout(WAIT).expect("ack");
        assert_eq!(batch, expect_batch, "acks fire in order");
        assert!(n >= (batch + 1) * 500, "ack {batch} fired with only {n} rows committed");
    }
    drop(w);
    store.close().expect("close");
}

#[test]
fn acks_of_a_failed_batch_do_not_fire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute();
    let admin = Connection::open(store.db_path()).expect("admin connection");
    admin
        .execute_batch("CREATE TRIGGER boom BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'boom'); END;")
        .expect("trigger");
    let event = EventRecord {
        device: Arc::from("e"),
        ts_ms: t0,
        seq: 1,
        event: EventKind::Alarm,
        metric: Some(Metric::GasLel),
        value: Some(25.0),
        cmd_id: None,
    };
    let (tx, rx) = std_mpsc::channel();
    // Held while the three writes queue, so the writer takes them as one batch (otherwise it
    // may commit the readings alone before the event arrives).
    let release = hold_writer(&w);
    w.blocking_send(Write::Readings(vec![reading("e", Metric::GasLel, t0, 25.0)])).expect("send");
    w.blocking_send(Write::Event(event.clone())).expect("send");
    w.blocking_send(Write::Ack(Ack::new(move || {
        let _ = tx.send(());
    })))
    .expect("send");
    drop(release);
    // The ack is dropped unfired: its sender goes away without a message.
    assert_eq!(rx.recv_timeout(WAIT), Err(std_mpsc::RecvTimeoutError::Disconnected));
    assert_eq!(store.stats().write_errors, 1);
    assert_eq!(store.reading_count("e", Metric::GasLel).expect("count"), 0, "the whole batch rolled back");
    // The writer keeps going, and a device key handed out in the failed batch is not reused.
    admin.execute_batch("DROP TRIGGER boom;").expect("drop trigger");
    write_sync(&w, vec![Write::Readings(vec![reading("e", Metric::GasLel, t0, 25.0)]), Write::Event(event.clone())]);
    assert_eq!(store.reading_count("e", Metric::GasLel).expect("count"), 1);
    assert_eq!(store.events("e", t0, t0 + 1, 10).expect("events"), vec![event]);
    drop(w);
    store.close().expect("close");
}

#[test]
fn events_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let t0 = base_minute();
    let ev = |ts_ms, seq, event, cmd_id: Option<&str>| EventRecord {
        device: Arc::from("v"),
        ts_ms,
        seq,
        event,
        metric: None,
        value: None,
        cmd_id: cmd_id.map(str::to_owned),
    };
    let a = ev(t0 + 5, 2, EventKind::ValveClosed, None);
    let b = ev(t0, 1, EventKind::CmdAck, Some("c-17"));
    let c = ev(t0 + 9, 3, EventKind::ValveOpened, None);
    write_sync(&w, vec![Write::Event(a.clone()), Write::Event(b.clone()), Write::Event(c.clone()), Write::Event(a.clone())]);
    assert_eq!(store.events("v", t0, t0 + 100, 10).expect("events"), vec![b.clone(), a.clone(), c]);
    assert_eq!(store.events("v", t0, t0 + 100, 2).expect("events"), vec![b, a]);
    assert!(store.events("other", t0, t0 + 100, 10).expect("events").is_empty());
    assert_eq!(store.stats().events_written, 3, "the replayed event is not counted");
    drop(w);
    store.close().expect("close");
}

#[test]
fn data_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = base_minute();
    {
        let (store, w) = open(dir.path());
        // No sync: closing must still commit everything queued.
        for i in 0..50 {
            let readings = (0..100).map(|j| reading("r", Metric::TiltDeg, t0 + i * 100 + j, 0.5)).collect();
            w.blocking_send(Write::Readings(readings)).expect("send");
        }
        drop(w);
        store.close().expect("close");
    }
    let (store, w) = open(dir.path());
    assert_eq!(store.reading_count("r", Metric::TiltDeg).expect("count"), 5000);
    // The device key map is reloaded: new writes for the same device land on the same id.
    write_sync(&w, vec![Write::Readings(vec![reading("r", Metric::TiltDeg, t0 + 10_000, 1.0)])]);
    assert_eq!(store.reading_count("r", Metric::TiltDeg).expect("count"), 5001);
    assert_eq!(fresh_count(store.db_path(), "SELECT count(*) FROM device_keys"), 1);
    assert_eq!(fresh_count(store.db_path(), "SELECT max(version) FROM schema_version"), SCHEMA_VERSION);
    drop(w);
    store.close().expect("close");
}

#[test]
fn writer_stops_when_senders_are_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, w) = open(dir.path());
    let w2 = w.clone();
    assert_eq!(w.capacity(), 1024);
    drop(w);
    assert!(!w2.is_closed());
    drop(w2);
    store.join().expect("joined");
    store.join().expect("a second join returns at once");
    assert_eq!(store.stats().queue_depth, 0);
}

fn quarantine_entry(i: i64, reason: &str) -> QuarantineEntry {
    QuarantineEntry {
        id: 0,
        received_ms: 1_000 + i,
        topic: format!("citywatch/v1/s/d{i}/telemetry"),
        reason: reason.into(),
        payload: Bytes::from(vec![i as u8; 3]),
    }
}

#[test]
fn quarantine_order_limit_counts_and_trim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.quarantine_max_rows = 8;
    let (store, w) = SqliteStore::open_with(opts).expect("open");
    let reasons = ["bad_json", "unknown_device", "bad_json"];
    let items = (0..10).map(|i| Write::Quarantine(quarantine_entry(i, reasons[i as usize % 3]))).collect();
    write_sync(&w, items);
    // Trimmed to the newest 8: entries 2..10.
    let all = store.quarantine(100, None).expect("quarantine");
    assert_eq!(all.len(), 8);
    assert_eq!(all.iter().map(|e| e.received_ms).collect::<Vec<_>>(), (2..10).rev().map(|i| 1000 + i).collect::<Vec<_>>());
    assert_eq!(all[0].topic, "citywatch/v1/s/d9/telemetry");
    assert_eq!(all[0].payload, Bytes::from(vec![9u8; 3]));
    assert!(all.windows(2).all(|p| p[0].id > p[1].id), "newest first");
    // Pages.
    let page1 = store.quarantine(3, None).expect("page");
    let page2 = store.quarantine(3, Some(page1[2].id)).expect("page");
    assert_eq!(page1, all[..3].to_vec());
    assert_eq!(page2, all[3..6].to_vec());
    // Entries 2..10: reasons of i % 3 = 2,0,1,2,0,1,2,0 → bad_json 6, unknown_device 2.
    assert_eq!(
        store.quarantine_counts().expect("counts"),
        vec![("bad_json".to_owned(), 6), ("unknown_device".to_owned(), 2)]
    );
    assert_eq!(store.stats().quarantined, 10);
    drop(w);
    store.close().expect("close");
}

#[test]
fn retention_deletes_old_raw_rows_but_keeps_rollups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.raw_retention = Duration::from_secs(3600);
    opts.rollup_retention = Duration::from_secs(86_400);
    opts.retention_every = Duration::ZERO;
    let (store, w) = SqliteStore::open_with(opts).expect("open");
    let now = now_ms();
    let two_days = now - 2 * 86_400_000;
    let two_hours = (now - 2 * 3_600_000).div_euclid(MINUTE_MS) * MINUTE_MS;
    let recent = now - MINUTE_MS;
    // Enough old rows that the pass needs several chunks.
    let mut old: Vec<Reading> = (0..5000).map(|i| reading("x", Metric::VibrationMg, two_hours + i, 1.0)).collect();
    old.push(reading("x", Metric::VibrationMg, two_days, 2.0));
    old.push(reading("x", Metric::VibrationMg, recent, 3.0));
    write_sync(&w, vec![Write::Readings(old)]);
    // The pass started after that batch runs while the queue is idle.
    let deadline = std::time::Instant::now() + WAIT;
    while store.reading_count("x", Metric::VibrationMg).expect("count") != 1 {
        assert!(std::time::Instant::now() < deadline, "retention did not run");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pts = store.readings(&query("x", Metric::VibrationMg, now - 3 * 86_400_000, now + 1, None)).expect("raw");
    assert_eq!(pts.iter().map(|p| p.last).collect::<Vec<_>>(), vec![3.0]);
    // Rollups older than a day went; the two-hour-old one stays and answers stepped queries.
    let deadline = std::time::Instant::now() + WAIT;
    while fresh_count(store.db_path(), "SELECT count(*) FROM rollup_1m") != 2 {
        assert!(std::time::Instant::now() < deadline, "rollup retention did not run");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stepped = store
        .readings(&query("x", Metric::VibrationMg, two_hours, two_hours + 10 * MINUTE_MS, Some(MINUTE_MS)))
        .expect("rollups");
    assert_eq!(stepped, vec![Point { ts_ms: two_hours, min: 1.0, max: 1.0, avg: 1.0, last: 1.0, count: 5000 }]);
    // A step that is not whole minutes, reaching before the raw horizon: also from rollups.
    let stepped = store
        .readings(&query("x", Metric::VibrationMg, two_hours, two_hours + 10 * MINUTE_MS, Some(90_000)))
        .expect("rollups");
    assert_eq!(stepped.len(), 1);
    assert_eq!(stepped[0].count, 5000);
    assert_eq!(store.stats().write_errors, 0);
    drop(w);
    store.close().expect("close");
}

fn device(id: &str, last_seen_ms: i64) -> DeviceRecord {
    DeviceRecord {
        id: id.into(),
        site: "site-a".into(),
        kind: DeviceKind::GasDetector,
        fw: Some("1.2.3".into()),
        interval_s: 60,
        location: None,
        install_date: Some("2024-05-01".into()),
        first_seen_ms: 1_000,
        last_seen_ms,
        state_json: "{}".into(),
    }
}

#[test]
fn devices_upsert_and_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut updated = device("gas-1", 9_000);
    updated.kind = DeviceKind::SmokeDetector;
    updated.fw = None;
    updated.location = Some("boiler room".into());
    updated.state_json = r#"{"last":{"temp_c":21.5}}"#.into();
    {
        let (store, w) = open(dir.path());
        write_sync(&w, vec![Write::Device(device("gas-2", 5_000)), Write::Device(device("gas-1", 2_000))]);
        write_sync(&w, vec![Write::Device(updated.clone())]);
        assert_eq!(store.devices().expect("devices"), vec![updated.clone(), device("gas-2", 5_000)]);
        drop(w);
        store.close().expect("close");
    }
    let (store, w) = open(dir.path());
    assert_eq!(store.devices().expect("devices"), vec![updated, device("gas-2", 5_000)]);
    drop(w);
    store.close().expect("close");
}

#[test]
fn data_dir_error_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let err = SqliteStore::open_with(options(&file.join("sub"))).expect_err("cannot create under a file");
    assert!(matches!(err, Error::DataDir { .. }), "{err:?}");
    assert!(err.to_string().contains("a-file"), "{err}");
}

#[test]
fn open_from_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig { path: dir.path().join("data"), ..StorageConfig::default() };
    let (store, w) = SqliteStore::open(&config).expect("open");
    assert_eq!(store.db_path(), dir.path().join("data").join(DB_FILE));
    assert_eq!(store.stats().queue_capacity, config.queue_capacity as u64);
    let mode: String = Connection::open(store.db_path())
        .expect("conn")
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(mode, "wal");
    drop(w);
    store.close().expect("close");
}

/// Writes 1 000 000 readings in batches of 10 000 (each followed by an ack) with the default
/// storage options and prints rows/s for `synchronous=FULL` and `NORMAL`, for two patterns:
/// `live` (1000 devices × 3 metrics round-robin: every batch touches all 3000 series) and
/// `replay` (device buffers replayed: a batch holds ~3 devices' consecutive points).
///
/// `cargo test --release -p citywatch-gateway store::sqlite::tests::writer_throughput -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test; run with --release --ignored --nocapture"]
fn writer_throughput() {
    for pattern in ["live", "replay"] {
        for sync_mode in [Synchronous::Full, Synchronous::Normal, Synchronous::Full, Synchronous::Normal] {
            measure(pattern, sync_mode);
        }
    }
}

fn measure(pattern: &str, sync_mode: Synchronous) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig { path: dir.path().to_path_buf(), ..StorageConfig::default() };
    let mut opts = StoreOptions::from(&config);
    opts.synchronous = sync_mode;
    opts.queue_capacity = 64;
    let (store, w) = SqliteStore::open_with(opts).expect("open");
    let names: Vec<Arc<str>> = (0..1000).map(|i| Arc::from(format!("dev-{i:04}"))).collect();
    let metrics = [Metric::GasLel, Metric::TempC, Metric::BatteryV];
    let t0 = now_ms() - 3_600_000;
    let batches = 100usize;
    let per_batch = 10_000usize;
    let mut work = Vec::with_capacity(batches);
    for b in 0..batches {
        let readings = (0..per_batch)
            .map(|i| {
                let n = b * per_batch + i;
                let (series, step) = match pattern {
                    "live" => (n % 3000, n / 3000),
                    _ => ((n / 1000) % 3000, n % 1000),
                };
                Reading {
                    device: names[series / 3].clone(),
                    metric: metrics[series % 3],
                    ts_ms: t0 + step as i64 * 1000,
                    value: (n % 1000) as f64 * 0.1,
                    historical: false,
                }
            })
            .collect::<Vec<_>>();
        work.push(readings);
    }
    let (tx, rx) = std_mpsc::channel();
    let started = std::time::Instant::now();
    for (b, readings) in work.into_iter().enumerate() {
        w.blocking_send(Write::Readings(readings)).expect("send");
        let tx = tx.clone();
        w.blocking_send(Write::Ack(Ack::new(move || {
            let _ = tx.send(b);
        })))
        .expect("send");
    }
    let mut last = 0;
    while last + 1 < batches {
        last = rx.recv_timeout(Duration::from_secs(120)).expect("ack");
    }
    let elapsed = started.elapsed();
    let stats = store.stats();
    assert_eq!(stats.readings_written, (batches * per_batch) as u64);
    eprintln!(
        "{pattern:6} synchronous={sync_mode:?}: {} rows in {:.2?} = {:.0} rows/s; {} batches, max batch {} ms",
        batches * per_batch,
        elapsed,
        (batches * per_batch) as f64 / elapsed.as_secs_f64(),
        stats.batches,
        stats.max_batch_us / 1000,
    );
    drop(w);
    store.close().expect("close");
}

#[test]
fn the_queue_holds_a_bounded_number_of_readings_whatever_its_count_of_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.batch_max_rows = 10; // the bound is BACKLOG_BATCHES × 10 = 40 readings
    let (store, w) = SqliteStore::open_with(opts).expect("open");
    let bound = 10 * BACKLOG_BATCHES;
    assert_eq!(store.stats().queue_max_readings, bound as u64);
    // An hour ago: well inside the raw retention, which the writer applies between batches.
    let base = now_ms() - 3_600_000;
    let batch = move |n: usize, t0: i64| -> Write {
        Write::Readings((0..n).map(|i| reading("q", Metric::GasLel, base + t0 + i as i64, 1.0)).collect())
    };
    // Hold the writer thread inside an ack: what is sent next stays queued.
    let release = hold_writer(&w);

    assert!(w.try_send(batch(30, 1_000)).is_ok(), "30 of 40 fit");
    assert!(matches!(w.try_send(batch(20, 2_000)), Err(TrySendError::Full(_))), "30 + 20 > 40 waits");
    assert!(w.try_send(Write::Ack(Ack::new(|| {}))).is_ok(), "writes without readings are not held back");
    assert!(w.try_send(batch(10, 3_000)).is_ok(), "30 + 10 = 40 fits");
    assert_eq!(store.stats().queue_readings, 40);
    // An async sender waits for room, and goes once the writer has taken the queued readings.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let sender = w.clone();
    let waiting = std::thread::spawn(move || rt.block_on(sender.send(batch(25, 4_000))));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiting.is_finished(), "no room: the sender waits");
    release.send(()).expect("writer waits");
    waiting.join().expect("sender thread").expect("sent once there was room");
    sync(&w);
    assert_eq!(store.stats().queue_readings, 0);
    // A write bigger than the bound still goes when nothing is queued.
    write_sync(&w, vec![batch(100, 10_000)]);
    let all = store.readings(&query("q", Metric::GasLel, base, base + 20_000, None)).expect("read");
    assert_eq!(all.len(), 30 + 10 + 25 + 100);
}

#[test]
fn takes_already_waiting_join_the_open_transaction_up_to_commit_max_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.batch_max_rows = 10;
    opts.commit_max_rows = 20;
    let (store, w) = SqliteStore::open_with(opts).expect("open");
    // The minute before this one: inside the raw retention, which the writer applies between
    // batches.
    let base = (now_ms() / 60_000 - 1) * 60_000;
    let batch = |t0: i64| -> Write {
        Write::Readings((0..10).map(|i| reading("g", Metric::GasLel, base + t0 + i, 1.0)).collect())
    };
    // Hold the writer thread inside an ack: what is sent next waits in the queue.
    let release = hold_writer(&w);
    let before = store.stats().batches;
    let (done_tx, done) = std_mpsc::channel();
    for t0 in [1_000, 2_000, 3_000] {
        w.try_send(batch(t0)).map_err(|_| "queue full").expect("30 readings fit the bound of 40");
    }
    w.try_send(Write::Ack(Ack::new(move || {
        let _ = done_tx.send(());
    })))
    .map_err(|_| "queue full")
    .expect("an ack is never held back");
    release.send(()).expect("writer waits");
    done.recv_timeout(WAIT).expect("the last ack fires");
    // One take is 10 rows; the first transaction takes the second take too (20 rows, the
    // limit), the second holds the third take and the ack. One take per transaction: four.
    assert_eq!(store.stats().batches - before, 2);
    let all = store.readings(&query("g", Metric::GasLel, base, base + 10_000, None)).expect("read");
    assert_eq!(all.len(), 30);
    // The rollup of that minute gathers all three takes: 30 readings of 1.0.
    let minute = store.readings(&query("g", Metric::GasLel, base, base + 60_000, Some(60_000))).expect("read");
    assert_eq!(minute.len(), 1);
    assert_eq!(minute[0].count, 30);
    drop(w);
    store.close().expect("close");
}
