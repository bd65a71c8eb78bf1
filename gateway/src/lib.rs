//! Citywatch gateway: watches a city's gas alarms, smoke detectors and siren mounts.
//!
//! The flow, one stage per module:
//! [`sources`] (embedded broker, external MQTT, or Modbus polling) → [`ingest::Inbound`] → [`decode`] (wire
//! contract, duplicates, quarantine, [`registry`] of devices and their health) → [`store`]
//! (SQLite time series; QoS 1 acks fire after commit; copies to the InfluxDB sink). From the decode stage, live readings,
//! events and statuses also go through [`rules`] (the pure rule engine) → [`incidents`] (one
//! manager task: the closed loop, silences, flapping, escalation, device commands; its own
//! SQLite file with the audit trail and the durable outbox) → [`notify`] (webhook, MQTT ops
//! topic, Alertmanager; SSE is served by [`api`]). Beside them: [`inspections`] (inventory, schedules,
//! reminders, the siren test day), [`api`] (HTTP), [`metrics`]
//! (Prometheus counters), [`config`] (TOML), and [`gateway`], which wires the stages together
//! and shuts them down in order. `main.rs` is a thin CLI over [`gateway`].
//! Security: [`api::auth`] (bearer tokens and roles), [`tls`] (rustls/ring for HTTPS and MQTT),
//! [`sources::door`] (TLS and per-device topic ACLs in front of the embedded broker).

pub mod api;
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
