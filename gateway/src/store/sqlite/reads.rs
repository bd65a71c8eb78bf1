//! The read side of the embedded store: queries on the reader connection (WAL lets them run
//! beside the writer thread). Each is one short statement; no writes happen here.

use std::sync::Arc;

use citywatch_edge::wire::{DeviceKind, EventKind, Metric};
use rusqlite::params;

use super::schema::metric_column;
use super::{device_id, lock, metric_at, metric_index, sql_limit, SqliteStore, MINUTE_MS};
use crate::ingest::now_ms;
use crate::store::{DeviceRecord, Error, EventRecord, Point, QuarantineEntry, ReadingQuery, Result};

impl SqliteStore {
    /// Readings of one device and metric in `[from_ms, to_ms)`, oldest first, at most `limit`.
    ///
    /// - `step_ms: None`: the raw readings.
    /// - `step_ms: Some(step)`: one point per non-empty step `floor((ts - from_ms) / step)`,
    ///   stamped with the step's start, with min/max/avg/last/count of its readings.
    /// - When `step` is a whole number of minutes, or is at least a minute and `from_ms` lies
    ///   before the raw retention horizon, the answer comes from the one-minute rollups instead:
    ///   `from_ms` is then floored and `to_ms` rounded up to whole minutes, and steps start at the
    ///   floored `from_ms`. For minute-aligned `from_ms`/`to_ms` and whole-minute steps this is
    ///   exactly the raw answer (up to float summation order in `avg`), only cheaper.
    pub fn readings(&self, q: &ReadingQuery) -> Result<Vec<Point>> {
        if let Some(step) = q.step_ms {
            if step <= 0 {
                return Err(Error::Invalid(format!("step_ms must be positive, not {step}")));
            }
        }
        if q.from_ms >= q.to_ms || q.limit == 0 {
            return Ok(Vec::new());
        }
        let conn = lock(&self.reader);
        let Some(device) = device_id(&conn, &q.device)? else { return Ok(Vec::new()) };
        let metric = metric_index(q.metric);
        // Raw readings: the metric's column of the device's rows (NULL where a message lacked it).
        let column = metric_column(q.metric);
        let limit = sql_limit(q.limit);
        let Some(step) = q.step_ms else {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT ts, {column} FROM readings WHERE device = ?1 AND ts >= ?2 AND ts < ?3 AND {column} IS NOT NULL
                 ORDER BY ts LIMIT ?4"
            ))?;
            let rows = stmt.query_map(params![device, q.from_ms, q.to_ms, limit], |r| {
                let v: f64 = r.get(1)?;
                Ok(Point { ts_ms: r.get(0)?, min: v, max: v, avg: v, last: v, count: 1 })
            })?;
            return Ok(rows.collect::<rusqlite::Result<_>>()?);
        };
        let horizon = now_ms().saturating_sub(self.raw_retention_ms);
        let use_rollups = step >= MINUTE_MS && (step % MINUTE_MS == 0 || q.from_ms < horizon);
        let (from, to, sql) = if use_rollups {
            (
                q.from_ms.div_euclid(MINUTE_MS) * MINUTE_MS,
                q.to_ms.saturating_add(MINUTE_MS - 1).div_euclid(MINUTE_MS) * MINUTE_MS,
                "SELECT b, mn, mx, sm / cnt, cnt,
                   (SELECT r.last FROM rollup_1m r WHERE r.device = ?1 AND r.metric = ?2
                      AND r.minute >= ?3 + b * ?5 AND r.minute < ?3 + (b + 1) * ?5 AND r.last_ts = lts LIMIT 1)
                 FROM (SELECT (minute - ?3) / ?5 AS b, min(min) AS mn, max(max) AS mx, sum(sum) AS sm,
                              sum(count) AS cnt, max(last_ts) AS lts
                       FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute >= ?3 AND minute < ?4
                       GROUP BY b)
                 ORDER BY b LIMIT ?6"
                    .to_owned(),
            )
        } else {
            // ?2 (the metric's index) is bound but not used here: the column names the metric.
            (
                q.from_ms,
                q.to_ms,
                format!(
                    "SELECT b, mn, mx, av, cnt,
                       (SELECT r.{column} FROM readings r WHERE r.device = ?1 AND r.ts = lts)
                     FROM (SELECT (ts - ?3) / ?5 AS b, min({column}) AS mn, max({column}) AS mx, avg({column}) AS av,
                                  count({column}) AS cnt, max(ts) AS lts
                           FROM readings WHERE device = ?1 AND ts >= ?3 AND ts < ?4 AND {column} IS NOT NULL
                           GROUP BY b)
                     ORDER BY b LIMIT ?6"
                ),
            )
        };
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![device, metric, from, to, step, limit], |r| {
            let b: i64 = r.get(0)?;
            let count: i64 = r.get(4)?;
            Ok(Point {
                ts_ms: from + b * step,
                min: r.get(1)?,
                max: r.get(2)?,
                avg: r.get(3)?,
                last: r.get(5)?,
                count: count.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Quarantined messages, newest first, at most `limit`, older than `before_id` if given.
    pub fn quarantine(&self, limit: usize, before_id: Option<i64>) -> Result<Vec<QuarantineEntry>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT id, received_ms, topic, reason, payload FROM quarantine WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![before_id.unwrap_or(i64::MAX), sql_limit(limit)], |r| {
            Ok(QuarantineEntry {
                id: r.get(0)?,
                received_ms: r.get(1)?,
                topic: r.get(2)?,
                reason: r.get(3)?,
                payload: bytes::Bytes::from(r.get::<_, Vec<u8>>(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many quarantined messages are kept, per reason, ordered by reason.
    pub fn quarantine_counts(&self) -> Result<Vec<(String, u64)>> {
        let conn = lock(&self.reader);
        let mut stmt =
            conn.prepare_cached("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every device record, ordered by id (to rebuild the registry at startup). A row whose kind
    /// this build does not know is skipped with a warning rather than failing the startup.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        let conn = lock(&self.reader);
        let mut stmt = conn.prepare_cached(
            "SELECT id, site, kind, fw, interval_s, location, install_date, first_seen_ms, last_seen_ms, state_json
             FROM devices ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let kind: String = r.get(2)?;
            let Some(kind) = DeviceKind::parse(&kind) else {
                tracing::warn!(device = %id, kind = %kind, "stored device has an unknown kind; skipped");
                continue;
            };
            out.push(DeviceRecord {
                id,
                site: r.get(1)?,
                kind,
                fw: r.get(3)?,
                interval_s: r.get::<_, i64>(4)?.clamp(0, u32::MAX as i64) as u32,
                location: r.get(5)?,
                install_date: r.get(6)?,
                first_seen_ms: r.get(7)?,
                last_seen_ms: r.get(8)?,
                state_json: r.get(9)?,
            });
        }
        Ok(out)
    }

    /// Events of one device in `[from_ms, to_ms)`, oldest first, at most `limit`. Rows of an
    /// event kind or metric this build does not know are skipped.
    pub fn events(&self, device: &str, from_ms: i64, to_ms: i64, limit: usize) -> Result<Vec<EventRecord>> {
        let conn = lock(&self.reader);
        let Some(id) = device_id(&conn, device)? else { return Ok(Vec::new()) };
        let mut stmt = conn.prepare_cached(
            "SELECT ts, seq, kind, metric, value, cmd_id FROM events
             WHERE device = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts, seq LIMIT ?4",
        )?;
        let mut rows = stmt.query(params![id, from_ms, to_ms, sql_limit(limit)])?;
        let name: Arc<str> = Arc::from(device);
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let kind: String = r.get(2)?;
            let Some(event) = EventKind::parse(&kind) else {
                tracing::warn!(device, kind = %kind, "stored event has an unknown kind; skipped");
                continue;
            };
            let metric = match r.get::<_, Option<i64>>(3)? {
                None => None,
                Some(i) => match metric_at(i) {
                    Some(m) => Some(m),
                    None => {
                        tracing::warn!(device, metric = i, "stored event has an unknown metric; skipped");
                        continue;
                    }
                },
            };
            out.push(EventRecord {
                device: name.clone(),
                ts_ms: r.get(0)?,
                seq: r.get::<_, i64>(1)?.clamp(0, u32::MAX as i64) as u32,
                event,
                metric,
                value: r.get(4)?,
                cmd_id: r.get(5)?,
            });
        }
        Ok(out)
    }

    /// Raw readings stored for one device and metric.
    pub fn reading_count(&self, device: &str, metric: Metric) -> Result<u64> {
        let conn = lock(&self.reader);
        let Some(id) = device_id(&conn, device)? else { return Ok(0) };
        let mut stmt = conn.prepare_cached(&format!("SELECT count({}) FROM readings WHERE device = ?1", metric_column(metric)))?;
        let n: i64 = stmt.query_row(params![id], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }
}
