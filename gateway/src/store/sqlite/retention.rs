//! Retention of the embedded store: expiring raw readings, rollups and events in small steps
//! that run on the writer thread only while its queue is idle, and trimming the quarantine.

use std::time::{Duration, Instant};

use citywatch_edge::wire::Metric;
use rusqlite::{params, Connection};

use super::writer::Writer;
use super::{duration_ms, sql_limit};
use crate::ingest::now_ms;

/// Rows one retention statement deletes at most.
const RETENTION_CHUNK: usize = 2_000;
/// A retention step stops after this many rows or this long, whichever comes first.
const RETENTION_STEP_ROWS: usize = 20_000;
const RETENTION_STEP_TIME: Duration = Duration::from_millis(10);

impl Writer {
    /// A pass to run while the queue is idle; its devices and cutoffs are taken at its first
    /// step, so it covers the devices of every batch written before that step.
    pub(super) fn start_retention(&mut self) -> Option<RetentionPass> {
        Some(RetentionPass {
            devices: Vec::new(),
            device: 0,
            stage: 0,
            raw_cutoff: 0,
            rollup_cutoff: 0,
            deleted: 0,
            started: None,
        })
    }

    /// Runs one bounded step of the current retention pass in its own transaction.
    pub(super) fn retention_step(&mut self) {
        let Some(mut pass) = self.retention.take() else { return };
        if pass.started.is_none() {
            let now = now_ms();
            pass.devices = self.keys.values().copied().collect();
            pass.devices.sort_unstable();
            pass.raw_cutoff = now.saturating_sub(duration_ms(self.opts.raw_retention));
            pass.rollup_cutoff = now.saturating_sub(duration_ms(self.opts.rollup_retention));
            pass.started = Some(Instant::now());
        }
        match retention_step(&mut self.conn, &mut pass, self.opts.quarantine_max_rows) {
            Ok(true) => {
                let elapsed = pass.started.map(|t| t.elapsed()).unwrap_or_default();
                tracing::debug!(deleted = pass.deleted, ?elapsed, "retention pass done");
                self.next_retention = Instant::now() + self.opts.retention_every;
            }
            Ok(false) => self.retention = Some(pass),
            Err(e) => {
                self.error("retention", &e);
                self.next_retention = Instant::now() + self.opts.retention_every;
            }
        }
    }
}

pub(super) fn trim_quarantine(conn: &Connection, max_rows: usize) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?1")?
        .execute([sql_limit(max_rows)])
}

/// Where a retention pass is: device `devices[device]`, stage `0` = raw readings (a row holds a
/// message's metrics), `1..=M` = rollups of metric `stage - 1`, `M + 1` = events
/// (M = `Metric::ALL.len()`).
pub(super) struct RetentionPass {
    pub(super) devices: Vec<i64>,
    pub(super) device: usize,
    pub(super) stage: usize,
    pub(super) raw_cutoff: i64,
    pub(super) rollup_cutoff: i64,
    pub(super) deleted: u64,
    /// `None` until the first step.
    pub(super) started: Option<Instant>,
}

/// One bounded step; `Ok(true)` when the pass is complete.
fn retention_step(conn: &mut Connection, pass: &mut RetentionPass, quarantine_max_rows: usize) -> rusqlite::Result<bool> {
    let m = Metric::ALL.len();
    let started = Instant::now();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut step_rows = 0usize;
    let done = loop {
        let Some(&device) = pass.devices.get(pass.device) else {
            step_rows += trim_quarantine(&tx, quarantine_max_rows)?;
            break true;
        };
        let chunk = sql_limit(RETENTION_CHUNK);
        let n = if pass.stage == 0 {
            tx.prepare_cached(
                "DELETE FROM readings WHERE device = ?1 AND ts < coalesce(
                   (SELECT ts FROM readings WHERE device = ?1 AND ts < ?2
                    ORDER BY ts LIMIT 1 OFFSET ?3), ?2)",
            )?
            .execute(params![device, pass.raw_cutoff, chunk])?
        } else if pass.stage <= m {
            tx.prepare_cached(
                "DELETE FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute < coalesce(
                   (SELECT minute FROM rollup_1m WHERE device = ?1 AND metric = ?2 AND minute < ?3
                    ORDER BY minute LIMIT 1 OFFSET ?4), ?3)",
            )?
            .execute(params![device, (pass.stage - 1) as i64, pass.rollup_cutoff, chunk])?
        } else {
            tx.prepare_cached(
                "DELETE FROM events WHERE device = ?1 AND ts < coalesce(
                   (SELECT ts FROM events WHERE device = ?1 AND ts < ?2 ORDER BY ts LIMIT 1 OFFSET ?3), ?2)",
            )?
            .execute(params![device, pass.rollup_cutoff, chunk])?
        };
        step_rows += n;
        // A full chunk may have left more behind: stay on this stage. (Events sharing one ts
        // could delete fewer than a chunk; moving on then only postpones them to the next pass.)
        if n < RETENTION_CHUNK {
            pass.stage += 1;
            if pass.stage > m + 1 {
                pass.stage = 0;
                pass.device += 1;
            }
        }
        if step_rows >= RETENTION_STEP_ROWS || started.elapsed() >= RETENTION_STEP_TIME {
            break false;
        }
    };
    tx.commit()?;
    pass.deleted += step_rows as u64;
    Ok(done)
}
