//! The `influx` push channel: every incident change becomes a line of the `incident`
//! measurement in the InfluxDB long-term store, so Grafana can chart incident rates.
//! It only hands the change to the InfluxDB sink ([`crate::store::influx`]), which batches,
//! spools while the server is down and drains in order; a full sink queue is a transient
//! failure that the dispatcher retries from the outbox. On only with `[storage.influx]`.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::sink::{DeliveryError, Sink};
use crate::model::OutboxItem;
use crate::store::influx::InfluxTap;

/// The channel's name in the outbox, `/api/v1/notify` and `/metrics`.
pub const CHANNEL: &str = "influx";

/// Incident changes into the InfluxDB sink.
#[derive(Debug)]
pub struct InfluxIncidentSink {
    tap: InfluxTap,
}

impl InfluxIncidentSink {
    pub fn new(tap: InfluxTap) -> Self {
        InfluxIncidentSink { tap }
    }
}

impl Sink for InfluxIncidentSink {
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>> {
        let handed = self.tap.try_incident(Arc::clone(&item.incident), item.incident.updated_ms);
        Box::pin(async move {
            if handed {
                Ok(())
            } else {
                Err(DeliveryError::Transient("the InfluxDB sink is behind or stopped".into()))
            }
        })
    }
}
