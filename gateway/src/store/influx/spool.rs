//! The spool: batches waiting on disk in `influx-spool.sqlite` while the server is down, oldest
//! first. Only the sink task touches it.

use std::path::Path;

use bytes::Bytes;

use super::{Error, Result};


/// Batches waiting on disk, oldest first (by id). Every spooled batch is newer than every batch
/// in memory, except at shutdown, when memory is saved *before* the spool's head.
#[derive(Debug)]
pub(super) struct Spool {
    pub(super) db: rusqlite::Connection,
    pub(super) lines: u64,
}

impl Spool {
    pub(super) fn open(dir: &Path) -> Result<Spool> {
        std::fs::create_dir_all(dir).map_err(|source| Error::SpoolDir { path: dir.display().to_string(), source })?;
        let db = rusqlite::Connection::open(dir.join("influx-spool.sqlite"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch("CREATE TABLE IF NOT EXISTS influx_spool (id INTEGER PRIMARY KEY, lines INTEGER NOT NULL, gzip INTEGER NOT NULL, body BLOB NOT NULL)")?;
        let lines: i64 = db.query_row("SELECT COALESCE(SUM(lines), 0) FROM influx_spool", [], |r| r.get(0))?;
        Ok(Spool { db, lines: lines as u64 })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lines == 0
    }

    pub(super) fn append(&mut self, b: &Batch) -> rusqlite::Result<()> {
        self.db.execute("INSERT INTO influx_spool (lines, gzip, body) VALUES (?1, ?2, ?3)", rusqlite::params![b.lines as i64, b.gzip, &b.body[..]])?;
        self.lines += b.lines as u64;
        Ok(())
    }

    /// Saves batches ahead of everything spooled (they are older), keeping their order.
    pub(super) fn prepend(&mut self, batches: impl DoubleEndedIterator<Item = Batch>) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        let mut id: i64 = tx.query_row("SELECT COALESCE(MIN(id), 1) FROM influx_spool", [], |r| r.get(0))?;
        let mut lines = 0;
        for b in batches.rev() {
            id -= 1;
            tx.execute("INSERT INTO influx_spool (id, lines, gzip, body) VALUES (?1, ?2, ?3, ?4)", rusqlite::params![id, b.lines as i64, b.gzip, &b.body[..]])?;
            lines += b.lines as u64;
        }
        tx.commit()?;
        self.lines += lines;
        Ok(())
    }

    pub(super) fn head(&self) -> rusqlite::Result<Option<Batch>> {
        use rusqlite::OptionalExtension;
        self.db
            .query_row("SELECT id, lines, gzip, body FROM influx_spool ORDER BY id LIMIT 1", [], |r| {
                Ok(Batch { spool_id: Some(r.get(0)?), lines: r.get::<_, i64>(1)? as usize, gzip: r.get(2)?, body: Bytes::from(r.get::<_, Vec<u8>>(3)?) })
            })
            .optional()
    }

    pub(super) fn remove(&mut self, id: i64, lines: usize) -> rusqlite::Result<()> {
        // A row trimmed while it was in flight is already gone and already subtracted.
        if self.db.execute("DELETE FROM influx_spool WHERE id = ?1", [id])? > 0 {
            self.lines = self.lines.saturating_sub(lines as u64);
        }
        Ok(())
    }

    /// Drops the oldest batches until at most `max` lines remain; returns the lines dropped.
    pub(super) fn trim(&mut self, max: u64) -> rusqlite::Result<u64> {
        let mut dropped = 0;
        while self.lines > max {
            let Some(head) = self.head()? else { break };
            // Invariant: head() returned a spooled batch, so it has an id.
            let id = head.spool_id.unwrap_or_default();
            self.remove(id, head.lines)?;
            dropped += head.lines as u64;
        }
        Ok(dropped)
    }
}

/// One request body: `lines` lines, gzipped or not.
#[derive(Debug, Clone)]
pub(super) struct Batch {
    pub(super) body: Bytes,
    pub(super) lines: usize,
    pub(super) gzip: bool,
    /// Where it lives while waiting: the spool row, or memory.
    pub(super) spool_id: Option<i64>,
}

