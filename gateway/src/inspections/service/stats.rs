//! The maintenance side's counters, added to the gateway's one Prometheus registry by
//! [`Stats::register`] when the gateway is wired. Counting only: the service decides what
//! counts.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// A `reason` label: the inventory column at fault (or "header", "csv", "duplicate").
type ReasonLabel = Vec<(&'static str, &'static str)>;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub rows_imported: Counter,
    pub reminders_sent: Counter,
    pub overdue_opened: Counter,
    pub completions: Counter,
    pub silent_sirens: Counter,
    /// Rejected inventory lines by the column (or "header", "csv", "duplicate") at fault.
    rows_rejected: Family<ReasonLabel, Counter>,
}

impl Stats {
    /// Counts one rejected inventory line.
    pub fn reject(&self, reason: &'static str) {
        self.rows_rejected.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Adds the maintenance series to `registry` (names without `_total`: the crate adds it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "citywatch_inventory_rows_imported",
            "Inventory lines imported (created, updated or unchanged)",
            self.rows_imported.clone(),
        );
        registry.register("citywatch_inspection_reminders", "Inspection reminders committed to the outbox", self.reminders_sent.clone());
        registry.register(
            "citywatch_inspection_overdue",
            "Overdue maintenance tasks that opened or raised an incident",
            self.overdue_opened.clone(),
        );
        registry.register("citywatch_inspection_completions", "Completions recorded by crews", self.completions.clone());
        registry.register("citywatch_siren_test_silent", "Siren mounts silent through a siren test window", self.silent_sirens.clone());
        registry.register(
            "citywatch_inventory_rows_rejected",
            "Inventory lines rejected, by the column at fault",
            self.rows_rejected.clone(),
        );
    }
}
