//! What a push channel is to the dispatcher: the [`Sink`] contract and why an attempt failed.
//! The sinks (webhook, mqtt, alertmanager, influx) implement it; the dispatcher calls it. Neither
//! side imports the other.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::model::{Incident, OutboxItem};

pub use crate::model::DeliveryError;

/// One push channel's way of sending. Called by one dispatcher only, never concurrently.
pub trait Sink: Send + Sync + 'static {
    /// One attempt to deliver one item. Must end on its own (a timeout), because the
    /// dispatcher lets the current attempt finish before it stops.
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>>;

    /// Called about once a second between attempts (Alertmanager re-posts its active alerts).
    /// May be cancelled at any await when the gateway stops.
    fn tick<'a>(&'a self, _now_ms: i64) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Told at start which incidents are active, newest revision each, before any item is
    /// delivered: state a sink keeps in memory across deliveries (Alertmanager's re-post set)
    /// would otherwise be empty after a restart.
    fn resume(&self, _active: &[Arc<Incident>]) {}
}

/// A channel's name and its sink, as `notify::build_sinks` returns them.
pub type NamedSink = (Arc<str>, Arc<dyn Sink>);
