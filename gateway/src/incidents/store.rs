//! The durable side of incidents: their current state, the audit trail of every transition,
//! the outbox of changes waiting for each push channel, silences and sent commands.
//!
//! It lives in its own SQLite file (`incidents.sqlite` beside the readings) with its own
//! connection, so an incident change commits in about one fsync and never queues behind a bulk
//! batch of readings. Only the incident manager writes; the API reads through a second
//! connection (WAL lets both run at once).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{HistoryEntry, Incident, IncidentState, OutboxItem};

/// Incident store errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("incident store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("incident store: bad stored incident {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("incident store: {0}")]
    Io(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    rule TEXT NOT NULL,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    severity TEXT NOT NULL,
    opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    body TEXT NOT NULL,
    parent TEXT
);
CREATE INDEX IF NOT EXISTS incidents_by_state ON incidents(state, updated_ms);
CREATE INDEX IF NOT EXISTS incidents_by_updated ON incidents(updated_ms);
CREATE INDEX IF NOT EXISTS incidents_by_device ON incidents(device, updated_ms);
CREATE TABLE IF NOT EXISTS audit (
    incident TEXT NOT NULL,
    revision INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    state TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_incident ON audit(incident, at_ms);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at_ms);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    incident TEXT NOT NULL,
    revision INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    done_ms INTEGER,
    reason TEXT,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(state, channel, seq);
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
";

/// The schema's version (`PRAGMA user_version`): 0 before migrations, 1 with `incidents.parent`.
const SCHEMA_VERSION: i64 = 1;

/// Brings a store written by an older gateway up to [`SCHEMA_VERSION`], in one transaction.
/// Every migration only adds: rows an older gateway wrote stay readable (their bodies lack the
/// newer fields, which deserialise to their defaults) and keep their ids.
fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction()?;
    // 0 → 1: the parent of an incident (rule pack `[[parent]]` and `[[group]]`), a column so
    // that `?parent=` lists children without reading every body.
    let has_parent = tx.prepare("SELECT 1 FROM pragma_table_info('incidents') WHERE name = 'parent'")?.exists([])?;
    if !has_parent {
        tx.execute_batch("ALTER TABLE incidents ADD COLUMN parent TEXT")?;
    }
    tx.execute_batch(
        "UPDATE incidents SET parent = json_extract(body, '$.parent') WHERE parent IS NULL;
         CREATE INDEX IF NOT EXISTS incidents_by_parent ON incidents(parent) WHERE parent IS NOT NULL;",
    )?;
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    tx.commit()?;
    Ok(())
}

/// Everything one manager step changes, committed in one transaction.
#[derive(Debug, Default)]
pub struct Commit {
    /// Incidents to upsert (their whole current state).
    pub incidents: Vec<Arc<Incident>>,
    /// Audit rows: (incident id, entry).
    pub audit: Vec<(String, HistoryEntry)>,
    /// Changes to push: (incident snapshot, body). The store assigns the seq.
    pub outbox: Vec<Arc<Incident>>,
    /// Delivery outcomes reported by dispatchers: (channel, seq, delivered?, reason).
    pub deliveries: Vec<(Arc<str>, i64, bool, Option<&'static str>)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.incidents.is_empty() && self.audit.is_empty() && self.outbox.is_empty() && self.deliveries.is_empty()
    }
}

/// An incident change in the outbox, as committed.
#[derive(Debug, Clone)]
pub struct Committed {
    pub seq: i64,
    pub incident: Arc<Incident>,
    /// The serialised incident, exactly what every channel sends.
    pub body: Arc<str>,
}

/// A filter for listing incidents.
#[derive(Debug, Clone, Default)]
pub struct IncidentFilter {
    pub states: Vec<IncidentState>,
    pub rule: Option<String>,
    pub site: Option<String>,
    pub device: Option<String>,
    /// Only the children of this incident.
    pub parent: Option<String>,
    pub limit: usize,
}

/// Delivery counts by channel and state, for the API.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DeliveryCounts {
    pub pending: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// The incident database.
#[derive(Debug)]
pub struct IncidentStore {
    write: Mutex<Connection>,
    read: Mutex<Connection>,
}

fn configure(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=OFF;")?;
    Ok(())
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back),
    // so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl IncidentStore {
    /// Opens (creating) `dir/incidents.sqlite`.
    pub fn open(dir: &Path) -> Result<IncidentStore> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("incidents.sqlite");
        let mut write = Connection::open(&path)?;
        configure(&write)?;
        write.execute_batch(SCHEMA)?;
        migrate(&mut write)?;
        let read = Connection::open(&path)?;
        configure(&read)?;
        Ok(IncidentStore { write: Mutex::new(write), read: Mutex::new(read) })
    }

    /// Commits one step. Returns the outbox items created, with their seq assigned, one per
    /// incident change (the caller fans them out to channels).
    pub fn commit(&self, commit: &Commit, channels: &[Arc<str>], now_ms: i64) -> Result<Vec<Committed>> {
        let mut conn = lock(&self.write);
        let tx = conn.transaction()?;
        let mut created = Vec::with_capacity(commit.outbox.len());
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO incidents (id, key, rule, site, device, state, severity, opened_ms, updated_ms, revision, body, parent)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(id) DO UPDATE SET state = excluded.state, severity = excluded.severity,
                   updated_ms = excluded.updated_ms, revision = excluded.revision, body = excluded.body,
                   parent = excluded.parent",
            )?;
            for inc in &commit.incidents {
                let body = serde_json::to_string(&**inc).map_err(|e| Error::Corrupt { id: inc.id.clone(), reason: e.to_string() })?;
                upsert.execute(params![
                    inc.id,
                    inc.key,
                    inc.rule,
                    inc.site,
                    inc.device,
                    inc.state.as_str(),
                    inc.severity.as_str(),
                    inc.opened_ms,
                    inc.updated_ms,
                    inc.revision,
                    body,
                    inc.parent
                ])?;
            }
            let mut audit = tx.prepare_cached("INSERT INTO audit (incident, revision, at_ms, actor, action, state, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?;
            for (id, h) in &commit.audit {
                audit.execute(params![id, h.revision, h.at_ms, h.actor, h.action, h.state.as_str(), h.note])?;
            }
            let mut outbox = tx.prepare_cached("INSERT INTO outbox (incident, revision, body, created_ms) VALUES (?1, ?2, ?3, ?4)")?;
            let mut delivery = tx.prepare_cached("INSERT INTO deliveries (channel, seq) VALUES (?1, ?2)")?;
            for inc in &commit.outbox {
                let body: Arc<str> = serde_json::to_string(&**inc).map_err(|e| Error::Corrupt { id: inc.id.clone(), reason: e.to_string() })?.into();
                outbox.execute(params![inc.id, inc.revision, &*body, now_ms])?;
                let seq = tx.last_insert_rowid();
                for ch in channels {
                    delivery.execute(params![&**ch, seq])?;
                }
                created.push(Committed { seq, incident: Arc::clone(inc), body });
            }
            let mut done = tx.prepare_cached("UPDATE deliveries SET state = ?3, done_ms = ?4, reason = ?5 WHERE channel = ?1 AND seq = ?2")?;
            for (ch, seq, ok, reason) in &commit.deliveries {
                done.execute(params![&**ch, seq, if *ok { "delivered" } else { "dropped" }, now_ms, reason])?;
            }
        }
        tx.commit()?;
        Ok(created)
    }

    /// Incidents that are not closed (the manager's working set at start).
    pub fn load_unclosed(&self) -> Result<Vec<Incident>> {
        let conn = lock(&self.write);
        let mut stmt = conn.prepare("SELECT id, body FROM incidents WHERE state != 'closed' ORDER BY opened_ms")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(serde_json::from_str(&body).map_err(|e| Error::Corrupt { id, reason: e.to_string() })?);
        }
        Ok(out)
    }

    /// Undelivered outbox items of `channel`, oldest first. A channel configured for the first
    /// time gets nothing from before it existed.
    pub fn pending(&self, channel: &Arc<str>) -> Result<Vec<OutboxItem>> {
        let conn = lock(&self.write);
        let mut stmt = conn.prepare(
            "SELECT o.seq, o.incident, o.body FROM deliveries d JOIN outbox o ON o.seq = d.seq
             WHERE d.channel = ?1 AND d.state = 'pending' ORDER BY o.seq",
        )?;
        let rows = stmt.query_map([&**channel], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, body) = row?;
            let incident: Incident = serde_json::from_str(&body).map_err(|e| Error::Corrupt { id, reason: e.to_string() })?;
            out.push(OutboxItem { seq, channel: Arc::clone(channel), incident: Arc::new(incident), body: body.into() });
        }
        Ok(out)
    }

    /// Outbox entries after `seq`, oldest first (the live stream's catch-up).
    pub fn outbox_since(&self, seq: i64, limit: usize) -> Result<Vec<(i64, String)>> {
        let conn = lock(&self.read);
        let mut stmt = conn.prepare("SELECT seq, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = stmt.query_map(params![seq, limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Delivery counts per channel.
    pub fn delivery_counts(&self) -> Result<Vec<(String, DeliveryCounts)>> {
        let conn = lock(&self.read);
        let mut stmt = conn.prepare("SELECT channel, state, COUNT(*) FROM deliveries GROUP BY channel, state ORDER BY channel")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        let mut out: Vec<(String, DeliveryCounts)> = Vec::new();
        for row in rows {
            let (channel, state, n) = row?;
            if out.last().is_none_or(|(c, _)| *c != channel) {
                out.push((channel.clone(), DeliveryCounts::default()));
            }
            if let Some((_, counts)) = out.last_mut() {
                let n = n.max(0) as u64;
                match state.as_str() {
                    "pending" => counts.pending = n,
                    "delivered" => counts.delivered = n,
                    _ => counts.dropped += n,
                }
            }
        }
        Ok(out)
    }

    /// One incident by id.
    pub fn get(&self, id: &str) -> Result<Option<Incident>> {
        let conn = lock(&self.read);
        let body: Option<String> = conn.query_row("SELECT body FROM incidents WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| Error::Corrupt { id: id.to_owned(), reason: e.to_string() })).transpose()
    }

    /// Incidents matching `filter`, most recently updated first.
    pub fn list(&self, filter: &IncidentFilter) -> Result<Vec<Incident>> {
        Ok(self.page(filter, None)?.0.into_iter().map(|(_, incident)| incident).collect())
    }

    /// One page of [`list`](Self::list): up to `filter.limit` incidents after `after` (the
    /// `(updated_ms, id)` of the previous page's last one), each with its `updated_ms`, and how
    /// many incidents match the filter in all.
    pub fn page(&self, filter: &IncidentFilter, after: Option<(i64, &str)>) -> Result<(Vec<(i64, Incident)>, u64)> {
        let mut clause = String::from(" WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if !filter.states.is_empty() {
            let marks: Vec<String> = filter
                .states
                .iter()
                .map(|s| {
                    args.push(s.as_str().to_owned().into());
                    format!("?{}", args.len())
                })
                .collect();
            clause.push_str(&format!(" AND state IN ({})", marks.join(",")));
        }
        if let Some(rule) = &filter.rule {
            // A situation's incident answers for its lead rule and for every member active now.
            args.push(rule.clone().into());
            let n = args.len();
            clause.push_str(&format!(
                " AND (rule = ?{n} OR EXISTS (SELECT 1 FROM json_each(incidents.body, '$.rules_active') WHERE json_each.value = ?{n}))"
            ));
        }
        for (column, value) in [("site", &filter.site), ("device", &filter.device), ("parent", &filter.parent)] {
            if let Some(v) = value {
                args.push(v.clone().into());
                clause.push_str(&format!(" AND {column} = ?{}", args.len()));
            }
        }
        let conn = lock(&self.read);
        let total: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM incidents{clause}"), rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
        if let Some((updated_ms, id)) = after {
            args.push(updated_ms.into());
            args.push(id.to_owned().into());
            let (t, i) = (args.len() - 1, args.len());
            clause.push_str(&format!(" AND (updated_ms < ?{t} OR (updated_ms = ?{t} AND id < ?{i}))"));
        }
        let sql = format!("SELECT id, body, updated_ms FROM incidents{clause} ORDER BY updated_ms DESC, id DESC LIMIT {}", filter.limit.max(1));
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body, updated_ms) = row?;
            out.push((updated_ms, serde_json::from_str(&body).map_err(|e| Error::Corrupt { id, reason: e.to_string() })?));
        }
        Ok((out, total.max(0) as u64))
    }

    /// Counts of incidents by state.
    pub fn counts_by_state(&self) -> Result<Vec<(String, u64)>> {
        let conn = lock(&self.read);
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM incidents GROUP BY state")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Silences stored through the API, as JSON bodies.
    pub fn silences(&self) -> Result<Vec<String>> {
        let conn = lock(&self.write);
        let mut stmt = conn.prepare("SELECT body FROM silences ORDER BY created_ms")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn put_silence(&self, id: &str, body: &str, now_ms: i64) -> Result<()> {
        lock(&self.write).execute(
            "INSERT INTO silences (id, body, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            params![id, body, now_ms],
        )?;
        Ok(())
    }

    pub fn delete_silence(&self, id: &str) -> Result<bool> {
        Ok(lock(&self.write).execute("DELETE FROM silences WHERE id = ?1", [id])? > 0)
    }

    /// Removes closed incidents (and their audit rows) older than `before_ms`, and outbox rows
    /// every channel has finished with. Returns the incidents removed.
    pub fn prune(&self, before_ms: i64) -> Result<usize> {
        let conn = lock(&self.write);
        let n = conn.execute("DELETE FROM incidents WHERE state = 'closed' AND updated_ms < ?1", [before_ms])?;
        conn.execute("DELETE FROM audit WHERE at_ms < ?1 AND incident NOT IN (SELECT id FROM incidents)", [before_ms])?;
        conn.execute(
            "DELETE FROM deliveries WHERE state != 'pending' AND seq IN (SELECT seq FROM outbox WHERE created_ms < ?1)",
            [before_ms],
        )?;
        conn.execute("DELETE FROM outbox WHERE created_ms < ?1 AND seq NOT IN (SELECT seq FROM deliveries)", [before_ms])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `incidents` table as gateways before `parent` created it.
    const SCHEMA_V0: &str = "CREATE TABLE incidents (id TEXT PRIMARY KEY, key TEXT NOT NULL, rule TEXT NOT NULL,
        site TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, severity TEXT NOT NULL,
        opened_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, revision INTEGER NOT NULL, body TEXT NOT NULL);";

    #[test]
    fn a_store_from_before_parents_is_migrated_and_its_incidents_stay_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An incident body as an older gateway wrote it: no parent, no children.
        let old = r#"{"id":"inc-old-1","key":"xh/s1/smoke","revision":2,"rule":"smoke","severity":"critical","state":"open",
            "scope":"device","site":"xh","device":"s1","kind":"smoke_detector","opened_at":"2027-01-15T08:00:00.000Z",
            "updated_at":"2027-01-15T08:00:00.000Z","opened_ms":1800000000000,"updated_ms":1800000000000,"summary":"smoke",
            "count":1,"escalation":0,"flapping":false,"history":[]}"#;
        {
            let conn = Connection::open(dir.path().join("incidents.sqlite")).expect("open");
            conn.execute_batch(SCHEMA_V0).expect("old schema");
            conn.execute(
                "INSERT INTO incidents VALUES ('inc-old-1', 'xh/s1/smoke', 'smoke', 'xh', 's1', 'open', 'critical', 1800000000000, 1800000000000, 2, ?1)",
                [old],
            )
            .expect("old row");
        }
        let store = IncidentStore::open(dir.path()).expect("migrated");
        let inc = store.get("inc-old-1").expect("read").expect("kept");
        assert_eq!((inc.id.as_str(), inc.revision, inc.parent.as_deref(), inc.children.len()), ("inc-old-1", 2, None, 0));
        assert_eq!(store.load_unclosed().expect("unclosed").len(), 1);
        // A child written now is found by its parent; opening again is a no-op.
        let mut child = inc.clone();
        child.id = "inc-new-2".into();
        child.parent = Some("inc-fire-1".into());
        let commit = Commit { incidents: vec![Arc::new(child)], ..Commit::default() };
        store.commit(&commit, &[], 1_800_000_001_000).expect("commit");
        drop(store);
        let store = IncidentStore::open(dir.path()).expect("reopened");
        let filter = IncidentFilter { parent: Some("inc-fire-1".into()), limit: 10, ..Default::default() };
        let children: Vec<String> = store.list(&filter).expect("list").into_iter().map(|i| i.id).collect();
        assert_eq!(children, ["inc-new-2"]);
        let version: i64 = lock(&store.read).query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }
}
