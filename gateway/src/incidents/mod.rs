//! Incidents: one per device × rule while active, driven through the closed loop
//! `open → acknowledged → dispatched → resolved → closed` (or `cleared`), every change audited
//! and queued in the durable outbox for the push channels.

pub mod book;
pub mod config;
pub mod manager;
pub mod model;
pub mod silence;
pub mod store;
pub mod summary;

pub use config::IncidentsConfig;
pub use model::{Change, HistoryEntry, Incident, IncidentState, OutboxItem, Scope, Severity, Signal};
