//! The schema of the embedded store and its migrations: what the tables are, and how an older
//! database is brought up to [`SCHEMA_VERSION`](super::SCHEMA_VERSION). Nothing here runs after
//! startup. A new database is made as v1 and migrated like an old one, so there is one path.

use std::collections::HashMap;
use std::sync::Arc;

use citywatch_edge::wire::Metric;
use rusqlite::Connection;

use super::{Error, Result, SCHEMA_VERSION};
use crate::ingest::now_ms;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE device_keys(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE readings(
    device INTEGER NOT NULL, metric INTEGER NOT NULL, ts INTEGER NOT NULL,
    value REAL NOT NULL, historical INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(device, metric, ts)) WITHOUT ROWID;
CREATE TABLE rollup_1m(
    device INTEGER NOT NULL, metric INTEGER NOT NULL, minute INTEGER NOT NULL,
    min REAL NOT NULL, max REAL NOT NULL, sum REAL NOT NULL, count INTEGER NOT NULL,
    last REAL NOT NULL, last_ts INTEGER NOT NULL,
    PRIMARY KEY(device, metric, minute)) WITHOUT ROWID;
CREATE TABLE events(
    device INTEGER NOT NULL, ts INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
    metric INTEGER, value REAL, cmd_id TEXT,
    PRIMARY KEY(device, ts, seq)) WITHOUT ROWID;
CREATE TABLE quarantine(
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_ms INTEGER NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, payload BLOB NOT NULL);
CREATE INDEX quarantine_reason ON quarantine(reason);
CREATE TABLE devices(
    id TEXT PRIMARY KEY, site TEXT NOT NULL, kind TEXT NOT NULL, fw TEXT, interval_s INTEGER NOT NULL,
    location TEXT, install_date TEXT, first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
    state_json TEXT NOT NULL);
";

/// Creates the schema of a new database, or checks (and one day migrates) an existing one.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version(version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL);",
    )?;
    let version: i64 = conn.query_row("SELECT coalesce(max(version), 0) FROM schema_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::Invalid(format!(
            "the database has schema version {version}, newer than this gateway's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        step_to(conn, 1, SCHEMA_V1)?;
    }
    if version < 2 {
        readings_by_message(conn)?;
    }
    // Future migrations: `if version < 3 { ... }`, each in its own transaction.
    add_metric_columns(conn)?;
    Ok(())
}

/// One migration: `sql` and the new `version` recorded, in one transaction; nothing of it stays
/// when any part fails.
fn step_to(conn: &Connection, version: i64, sql: &str) -> Result<()> {
    let done = conn
        .execute_batch(&format!("BEGIN IMMEDIATE; {sql}"))
        .and_then(|_| conn.execute("INSERT INTO schema_version(version, applied_ms) VALUES (?1, ?2)", [version, now_ms()]))
        .and_then(|_| conn.execute_batch("COMMIT"));
    if let Err(e) = done {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(e.into());
    }
    Ok(())
}

/// The column of a metric in `readings` (v2): its wire name, quoted. Wire names are
/// `[a-z0-9_]` (a test pins them), so the text is a safe identifier.
pub(super) fn metric_column(m: Metric) -> String {
    format!("\"{}\"", m.as_str())
}

/// Every metric's column in `readings`, in [`Metric::ALL`]'s order: the order of the writer's
/// parameters and of the values it reads back.
pub(super) static METRIC_COLUMNS: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| Metric::ALL.iter().map(|m| metric_column(*m)).collect());

/// The `readings` table of schema v2: one row per (device, ts) — one telemetry message — with a
/// nullable column per metric, so a message of five readings is one row, one index entry and
/// one insert (v1 had a row per reading, keyed (device, metric, ts)).
fn readings_v2_ddl(table: &str) -> String {
    let columns: String = METRIC_COLUMNS.iter().map(|c| format!(", {c} REAL")).collect();
    format!(
        "CREATE TABLE {table}(
            device INTEGER NOT NULL, ts INTEGER NOT NULL, historical INTEGER NOT NULL DEFAULT 0{columns},
            PRIMARY KEY(device, ts)) WITHOUT ROWID;"
    )
}

/// v1 → v2: the readings regrouped by (device, ts), in one transaction (a large store takes a
/// while: logged before and after). A v1 key (device, metric, ts) is unique, so each cell of
/// the new table has at most one value.
fn readings_by_message(conn: &Connection) -> Result<()> {
    let started = std::time::Instant::now();
    let rows: i64 = conn.query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
    if rows > 0 {
        tracing::info!(rows, "store: migrating readings to schema 2 (one row per device and time)");
    }
    let names = METRIC_COLUMNS.join(", ");
    let pivot: String = (0..Metric::ALL.len()).map(|i| format!(", max(CASE metric WHEN {i} THEN value END)")).collect();
    let sql = format!(
        "{create}
         INSERT INTO readings_v2(device, ts, historical, {names})
           SELECT device, ts, max(historical){pivot} FROM readings GROUP BY device, ts;
         DROP TABLE readings;
         ALTER TABLE readings_v2 RENAME TO readings;",
        create = readings_v2_ddl("readings_v2"),
    );
    step_to(conn, 2, &sql)?;
    if rows > 0 {
        tracing::info!(rows, took_ms = started.elapsed().as_millis() as u64, "store: readings migrated to schema 2");
    }
    Ok(())
}

/// A metric added to [`Metric::ALL`] since the table was made gets its column (nullable, so
/// adding it rewrites nothing).
fn add_metric_columns(conn: &Connection) -> Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('readings')")?;
    let have: std::collections::HashSet<String> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    for (m, column) in Metric::ALL.iter().zip(METRIC_COLUMNS.iter()) {
        if !have.contains(m.as_str()) {
            conn.execute_batch(&format!("ALTER TABLE readings ADD COLUMN {column} REAL"))?;
        }
    }
    Ok(())
}

pub(super) fn load_keys(conn: &Connection) -> rusqlite::Result<HashMap<Arc<str>, i64>> {
    let mut stmt = conn.prepare("SELECT id, name FROM device_keys")?;
    let rows = stmt.query_map([], |r| Ok((Arc::<str>::from(r.get::<_, String>(1)?), r.get::<_, i64>(0)?)))?;
    rows.collect()
}
