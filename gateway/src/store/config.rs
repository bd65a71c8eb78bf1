//! `[storage]`: where and how long the embedded time series keeps readings. Parsing only.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub path: PathBuf,
    /// Raw readings are kept this long.
    pub raw_retention: Duration,
    /// One-minute rollups are kept this long.
    pub rollup_retention: Duration,
    /// Most rows the writer takes off its queue at once (sorted and inserted in one go).
    /// Readings queued ahead of the writer are bounded to 4 × this (40k readings of ~40 bytes
    /// ≈ 1.6 MB by default): a store that falls behind makes ingestion wait (and the broker
    /// keep its messages) rather than grow the heap.
    pub batch_max_rows: usize,
    /// Most rows in one transaction (default 100 000; at least `batch_max_rows`). When the
    /// writer falls behind it keeps its transaction open for the takes already waiting, up to
    /// this many rows, so each series' newest page is written once per commit rather than once
    /// per take. Larger: faster ingest under load, acks held longer, up to ~40 bytes per row
    /// held until the commit (4 MB at the default).
    pub commit_max_rows: usize,
    /// Writes buffered ahead of the writer thread (a decode batch of readings, an event, a
    /// device record, an ack: one write each).
    pub queue_capacity: usize,
    /// Rejected messages kept in the quarantine table (oldest removed first).
    pub quarantine_max_rows: usize,
    /// Page cache of the store's write connection, MiB (default 32): a fixed part of the
    /// gateway's memory whatever the fleet's size (the read connection keeps 8 MiB more).
    /// Larger keeps more series' newest pages hot (fewer reads per batch); smaller trades
    /// write speed for memory. 32 holds the hot pages of ~1000 devices' series; at 100k
    /// devices no cache holds them all, and 64 measured no faster than 32 there.
    pub cache_mib: u32,
    /// `[storage.influx]`: the long-term store; absent means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub influx: Option<crate::store::influx::InfluxConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./citywatch-data"),
            raw_retention: Duration::secs(30 * 86_400),
            // humantime's year is 365.25 days, so "2years" in example.toml is exactly this.
            rollup_retention: Duration::secs(2 * 31_557_600),
            batch_max_rows: 10_000,
            commit_max_rows: 100_000,
            queue_capacity: 128,
            quarantine_max_rows: 100_000,
            cache_mib: 32,
            influx: None,
        }
    }
}

