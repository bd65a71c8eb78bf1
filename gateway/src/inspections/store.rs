//! The maintenance store: its own SQLite file (`maintenance.db` beside the time series) with
//! the inventory, the completions crews recorded, and which reminders were already sent (so a
//! restart does not send one twice). Synchronous; the service calls it off the async threads.

use std::path::Path;

use citywatch_edge::wire::DeviceKind;
use jiff::civil::Date;
use rusqlite::{params, Connection, OptionalExtension};

use super::inventory::{LatLon, Premises, Row};
use super::schedule::{Maintained, Task};
use super::Result;

/// One device's inventory entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub device: String,
    pub site: String,
    pub location: String,
    /// WGS-84, from the file's optional `lat`/`lon`.
    pub position: Option<LatLon>,
    pub crew: String,
    /// Full number; shown only through [`super::mask_phone`].
    pub phone: String,
    pub m: Maintained,
    /// A reminder or overdue incident was sent and not yet cleared by a completion.
    pub incident_open: bool,
}

/// Where an inventory device stands between import and its first report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commissioning {
    /// Not heard yet; within its grace period or not yet checked.
    Waiting = 0,
    /// `commissioning_overdue` opened.
    Overdue = 1,
    /// Heard (and any incident cleared): nothing more to do.
    Reported = 2,
}

impl Commissioning {
    fn from_code(code: i64) -> Commissioning {
        match code {
            1 => Commissioning::Overdue,
            2 => Commissioning::Reported,
            _ => Commissioning::Waiting,
        }
    }
}

/// A recorded completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub device: String,
    pub task: Task,
    pub result: String,
    pub notes: String,
    pub by: String,
    pub at_ms: i64,
}

/// What an import changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImportCounts {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

#[derive(Debug)]
pub struct MaintenanceStore {
    conn: Connection,
}

fn date_text(d: Option<Date>) -> Option<String> {
    d.map(|d| d.to_string())
}

fn parse_date(s: Option<String>) -> Option<Date> {
    s.and_then(|s| s.parse().ok())
}

impl MaintenanceStore {
    /// Opens (creating) `dir/maintenance.db`.
    pub fn open(dir: &Path) -> Result<MaintenanceStore> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("maintenance.db"))?;
        MaintenanceStore::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<MaintenanceStore> {
        MaintenanceStore::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<MaintenanceStore> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS inventory (
                 device TEXT PRIMARY KEY,
                 site TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 location TEXT NOT NULL,
                 install_date TEXT NOT NULL,
                 replaced_on TEXT,
                 interval_months INTEGER,
                 last_inspection TEXT,
                 last_calibration TEXT,
                 last_cleaning TEXT,
                 crew TEXT NOT NULL,
                 phone TEXT NOT NULL,
                 premises TEXT NOT NULL,
                 incident_open INTEGER NOT NULL DEFAULT 0,
                 lat REAL,
                 lon REAL
             );
             CREATE TABLE IF NOT EXISTS completions (
                 id INTEGER PRIMARY KEY,
                 device TEXT NOT NULL,
                 task TEXT NOT NULL,
                 result TEXT NOT NULL,
                 notes TEXT NOT NULL,
                 by TEXT NOT NULL,
                 at_ms INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS completions_device ON completions (device, at_ms);
             CREATE TABLE IF NOT EXISTS notified (
                 device TEXT NOT NULL,
                 task TEXT NOT NULL,
                 due TEXT NOT NULL,
                 days_before INTEGER NOT NULL,
                 at_ms INTEGER NOT NULL,
                 PRIMARY KEY (device, task, due, days_before)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS commissioning (
                 device TEXT PRIMARY KEY,
                 since_ms INTEGER NOT NULL,
                 state INTEGER NOT NULL DEFAULT 0
             ) WITHOUT ROWID;",
        )?;
        // Files from before positions were imported: add the two columns.
        let has_lat: bool = conn.prepare("SELECT 1 FROM pragma_table_info('inventory') WHERE name = 'lat'")?.exists([])?;
        if !has_lat {
            conn.execute_batch("ALTER TABLE inventory ADD COLUMN lat REAL; ALTER TABLE inventory ADD COLUMN lon REAL;")?;
        }
        Ok(MaintenanceStore { conn })
    }

    /// Every inventory entry.
    pub fn load(&self) -> Result<Vec<Item>> {
        let mut stmt = self.conn.prepare(
            "SELECT device, site, kind, location, install_date, replaced_on, interval_months, last_inspection,
                    last_calibration, last_cleaning, crew, phone, premises, incident_open, lat, lon FROM inventory",
        )?;
        let rows = stmt.query_map([], |r| {
            let kind: String = r.get(2)?;
            let install: String = r.get(4)?;
            let premises: String = r.get(12)?;
            Ok((
                kind,
                install,
                premises,
                Item {
                    device: r.get(0)?,
                    site: r.get(1)?,
                    location: r.get(3)?,
                    position: match (r.get::<_, Option<f64>>(14)?, r.get::<_, Option<f64>>(15)?) {
                        (Some(lat), Some(lon)) if lat.is_finite() && lon.is_finite() => Some(LatLon { lat, lon }),
                        _ => None,
                    },
                    crew: r.get(10)?,
                    phone: r.get(11)?,
                    incident_open: r.get::<_, i64>(13)? != 0,
                    m: Maintained {
                        kind: DeviceKind::GasDetector,
                        premises: Premises::default(),
                        install_date: Date::MIN,
                        replaced_on: parse_date(r.get(5)?),
                        interval_months: r.get(6)?,
                        last_inspection: parse_date(r.get(7)?),
                        last_calibration: parse_date(r.get(8)?),
                        last_cleaning: parse_date(r.get(9)?),
                    },
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, install, premises, mut item) = row?;
            let (Some(kind), Ok(install)) = (DeviceKind::parse(&kind), install.parse::<Date>()) else {
                tracing::warn!(device = %item.device, "inventory entry unreadable; skipped");
                continue;
            };
            item.m.kind = kind;
            item.m.install_date = install;
            item.m.premises = Premises::parse(&premises).unwrap_or_default();
            out.push(item);
        }
        Ok(out)
    }

    /// Every inventory device's commissioning: (device, grace counted from, state).
    pub fn commissioning(&self) -> Result<Vec<(String, i64, Commissioning)>> {
        let mut stmt = self.conn.prepare("SELECT device, since_ms, state FROM commissioning")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, Commissioning::from_code(r.get(2)?))))?;
        Ok(rows.collect::<Result<Vec<_>, rusqlite::Error>>()?)
    }

    /// Starts commissioning for devices new to the inventory (an existing row is kept).
    pub fn start_commissioning(&mut self, devices: &[(String, i64)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("INSERT OR IGNORE INTO commissioning (device, since_ms, state) VALUES (?1, ?2, 0)")?;
            for (device, since) in devices {
                stmt.execute(params![device, since])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records how far devices' commissioning went.
    pub fn set_commissioning(&mut self, devices: &[(String, Commissioning)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("UPDATE commissioning SET state = ?2 WHERE device = ?1")?;
            for (device, state) in devices {
                stmt.execute(params![device, *state as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes every item in one transaction (an import, or one completion).
    pub fn upsert(&mut self, items: &[&Item]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO inventory (device, site, kind, location, install_date, replaced_on, interval_months,
                     last_inspection, last_calibration, last_cleaning, crew, phone, premises, incident_open, lat, lon)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (device) DO UPDATE SET site = ?2, kind = ?3, location = ?4, install_date = ?5,
                     replaced_on = ?6, interval_months = ?7, last_inspection = ?8, last_calibration = ?9,
                     last_cleaning = ?10, crew = ?11, phone = ?12, premises = ?13, incident_open = ?14,
                     lat = ?15, lon = ?16",
            )?;
            for it in items {
                stmt.execute(params![
                    it.device,
                    it.site,
                    it.m.kind.as_str(),
                    it.location,
                    it.m.install_date.to_string(),
                    date_text(it.m.replaced_on),
                    it.m.interval_months,
                    date_text(it.m.last_inspection),
                    date_text(it.m.last_calibration),
                    date_text(it.m.last_cleaning),
                    it.crew,
                    it.phone,
                    it.m.premises.as_str(),
                    it.incident_open as i64,
                    it.position.map(|p| p.lat),
                    it.position.map(|p| p.lon),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a completion.
    pub fn add_completion(&self, c: &Completion) -> Result<()> {
        self.conn.execute(
            "INSERT INTO completions (device, task, result, notes, by, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![c.device, c.task.as_str(), c.result, c.notes, c.by, c.at_ms],
        )?;
        Ok(())
    }

    /// The latest completion of a device.
    pub fn last_completion(&self, device: &str) -> Result<Option<Completion>> {
        Ok(self
            .conn
            .query_row(
                "SELECT task, result, notes, by, at_ms FROM completions WHERE device = ?1 ORDER BY at_ms DESC, id DESC LIMIT 1",
                params![device],
                |r| {
                    let task: String = r.get(0)?;
                    Ok(Completion {
                        device: device.to_owned(),
                        task: Task::parse(&task).unwrap_or(Task::Inspection),
                        result: r.get(1)?,
                        notes: r.get(2)?,
                        by: r.get(3)?,
                        at_ms: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every (device, task, due, days_before) already sent; days_before 0 is the overdue incident.
    pub fn notified(&self) -> Result<Vec<(String, Task, Date, u32)>> {
        let mut stmt = self.conn.prepare("SELECT device, task, due, days_before FROM notified")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, u32>(3)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (device, task, due, days) = row?;
            if let (Some(task), Ok(due)) = (Task::parse(&task), due.parse::<Date>()) {
                out.push((device, task, due, days));
            }
        }
        Ok(out)
    }

    /// Marks reminders sent and sets `incident_open` on their devices, in one transaction.
    pub fn mark_notified(&mut self, sent: &[(String, Task, Date, u32)], now_ms: i64) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut mark = tx.prepare_cached(
                "INSERT OR IGNORE INTO notified (device, task, due, days_before, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut open = tx.prepare_cached("UPDATE inventory SET incident_open = 1 WHERE device = ?1")?;
            for (device, task, due, days) in sent {
                mark.execute(params![device, task.as_str(), due.to_string(), days, now_ms])?;
                open.execute(params![device])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets a device's sent reminders (its schedule was reset by a completion).
    pub fn clear_notified(&self, device: &str) -> Result<()> {
        self.conn.execute("DELETE FROM notified WHERE device = ?1", params![device])?;
        Ok(())
    }
}

/// The stored entry for an imported row: a new one, or `old` updated with the row's facts.
/// Dates crews recorded later than the file's stay (an older file does not undo a completion).
pub fn merge(row: &Row, old: Option<&Item>) -> Item {
    let m = Maintained {
        kind: row.kind,
        premises: row.premises,
        install_date: row.install_date,
        replaced_on: old.and_then(|o| o.m.replaced_on).filter(|_| old.is_some_and(|o| o.m.install_date == row.install_date)),
        interval_months: row.interval_months,
        last_inspection: row.last_inspection.max(old.and_then(|o| o.m.last_inspection)),
        last_calibration: old.and_then(|o| o.m.last_calibration),
        last_cleaning: old.and_then(|o| o.m.last_cleaning),
    };
    Item {
        device: row.device.clone(),
        site: row.site.clone(),
        location: row.location.clone(),
        position: row.position,
        crew: row.crew.clone(),
        phone: row.phone.clone(),
        m,
        incident_open: old.is_some_and(|o| o.incident_open),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn row(device: &str, last: Option<Date>) -> Row {
        Row {
            line: 2,
            site: "xuhui".into(),
            device: device.into(),
            kind: DeviceKind::GasDetector,
            location: "kitchen".into(),
            install_date: date(2024, 3, 1),
            last_inspection: last,
            interval_months: None,
            crew: "crew-7".into(),
            phone: "13812345678".into(),
            premises: Premises::Commercial,
            position: Some(LatLon { lat: 31.1883, lon: 121.4365 }),
        }
    }

    #[test]
    fn items_round_trip_and_notified_marks_persist() {
        let mut s = MaintenanceStore::in_memory().expect("store");
        let a = merge(&row("g-1", Some(date(2025, 12, 20))), None);
        s.upsert(&[&a]).expect("upsert");
        assert_eq!(s.load().expect("load"), vec![a.clone()]);
        s.mark_notified(&[("g-1".into(), Task::Calibration, date(2026, 12, 20), 30)], 5).expect("mark");
        assert_eq!(s.notified().expect("notified"), vec![("g-1".into(), Task::Calibration, date(2026, 12, 20), 30)]);
        assert!(s.load().expect("load")[0].incident_open);
        s.clear_notified("g-1").expect("clear");
        assert!(s.notified().expect("notified").is_empty());
    }

    #[test]
    fn an_older_file_does_not_undo_a_later_inspection() {
        let mut old = merge(&row("g-1", Some(date(2025, 12, 20))), None);
        old.m.last_inspection = Some(date(2026, 11, 1));
        let merged = merge(&row("g-1", Some(date(2025, 12, 20))), Some(&old));
        assert_eq!(merged.m.last_inspection, Some(date(2026, 11, 1)));
    }
}
