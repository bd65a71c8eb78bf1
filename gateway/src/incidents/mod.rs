//! Incidents: one per device × rule while active, driven through the closed loop
//! `open → acknowledged → dispatched → resolved → closed` (or `cleared`), every change audited
//! and queued in the durable outbox for the push channels.

pub mod book;
pub mod config;
pub mod manager;
pub mod silence;
pub mod store;
pub mod summary;

pub use config::IncidentsConfig;
// The incident vocabulary lives in the leaf module `model` so that every stage can name it.
pub use crate::model::{Change, HistoryEntry, Incident, IncidentState, OutboxItem, Scope, Severity, Signal};
