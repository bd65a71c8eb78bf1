//! The schema of the embedded store and its migrations: what the tables are, and how an older
//! database is brought up to [`SCHEMA_VERSION`](super::SCHEMA_VERSION). Nothing here runs after
//! startup.

use std::collections::HashMap;
use std::sync::Arc;

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
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V1}"))?;
        let done = conn
            .execute("INSERT INTO schema_version(version, applied_ms) VALUES (1, ?1)", [now_ms()])
            .and_then(|_| conn.execute_batch("COMMIT"));
        if let Err(e) = done {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    // Future migrations: `if version < 2 { ... }`, each in its own transaction.
    Ok(())
}

pub(super) fn load_keys(conn: &Connection) -> rusqlite::Result<HashMap<Arc<str>, i64>> {
    let mut stmt = conn.prepare("SELECT id, name FROM device_keys")?;
    let rows = stmt.query_map([], |r| Ok((Arc::<str>::from(r.get::<_, String>(1)?), r.get::<_, i64>(0)?)))?;
    rows.collect()
}
