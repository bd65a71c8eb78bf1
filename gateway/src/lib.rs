//! Citywatch gateway: watches a city's gas alarms, smoke detectors and siren mounts.
//!
//! The pipeline, one stage per module, data flowing left to right:
//!
//! ```text
//! sources ──Inbound──▶ decode ──Signal──▶ incidents ──OutboxItem──▶ notify
//! (broker, mqtt,       (contract, dedup,   (manager task:          (dispatch per channel:
//!  modbus, door)        quarantine; rules   book, silences,          webhook, mqtt,
//!                       engine inline)      outbox, audit)           alertmanager, influx)
//!                         │   ▲ Evaluator                 ▲ Outcome
//!                         ▼   └── rules (pure)            └──────── delivery results
//!                       store (SQLite writer, InfluxDB sink)   registry (devices, health)
//! ```
//!
//! - [`sources`] hand [`ingest::Inbound`] messages (with their QoS 1 [`ingest::Ack`]) to
//!   [`decode`] over one bounded channel. [`decode`] validates, keeps the [`registry`] current,
//!   writes to the [`store`] (acks fire after commit; copies go to the InfluxDB sink) and runs
//!   the [`rules`] engine inline through its [`decode::Evaluator`] trait; signals go to the
//!   incident manager through [`decode::SignalSink`], before the batch goes to the store.
//! - [`incidents`]: one manager task ([`incidents::manager::IncidentsHandle`] offers methods,
//!   never its request enum) commits each change and its outbox rows, then hands them to
//!   [`notify`], whose dispatchers report [`model::Outcome`]s back.
//! - Beside the pipeline: [`inspections`] (inventory, schedules, reminders, the siren test day;
//!   raises incidents through the handle), [`api`] (HTTP on top of everything; nothing imports
//!   it), [`metrics`] (the gateway's counters and the helpers with which each component
//!   adds its series to the one Prometheus registry `/metrics` encodes), [`config`] (gathers
//!   each component's own config and validates across them) and [`gateway`], which builds each stage from its config and
//!   shuts them down in order. `main.rs` is a thin CLI over [`gateway`].
//! - Leaf modules every layer may use, importing nothing from the crate but other leaves:
//!   [`model`] (Signal, Severity, Scope, Incident, OutboxItem, Outcome, rfc3339), [`units`]
//!   (config newtypes such as Duration), [`http_client`] (the one outgoing HTTP setup),
//!   [`metrics`], [`tls`] (rustls/ring for HTTPS and MQTT).
//!
//! Imports point against the flow only: a module never imports a later stage or [`api`].
//! `scripts/check-layers` (run by `scripts/test`) holds the layer order and fails otherwise.
//! Security: [`api::auth`] (bearer tokens and roles), [`tls`], [`sources::door`] (TLS and
//! per-device topic ACLs in front of the embedded broker).
//! Cluster mode: [`cluster`] (NATS JetStream partitions by site, leases, the replicated incident
//! log) replaces the MQTT source when `[cluster]` is set.

pub mod api;
pub mod cluster;
pub mod config;
pub mod decode;
pub mod gateway;
pub mod http_client;
pub mod incidents;
pub mod ingest;
pub mod inspections;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod registry;
pub mod rules;
pub mod sources;
pub mod store;
pub mod tls;
pub mod units;
