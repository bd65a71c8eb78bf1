//! The `influx` push channel: every incident change becomes a line of the `incident`
//! measurement in the InfluxDB long-term store, so Grafana can chart incident rates.
//! It only hands the change to the InfluxDB sink ([`crate::store::influx`]), which batches,
//! spools while the server is down and drains in order; a full sink queue is a transient
//! failure that the dispatcher retries from the outbox. On only with `[storage.influx]`.


use futures_util::future::BoxFuture;

use super::sink::{DeliveryError, Sink};
use crate::incidents::{Incident, OutboxItem};
use crate::store::influx::{IncidentLine, InfluxTap};

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
        let handed = self.tap.try_incident(line(&item.incident));
        Box::pin(async move {
            if handed {
                Ok(())
            } else {
                Err(DeliveryError::Transient("the InfluxDB sink is behind or stopped".into()))
            }
        })
    }
}

/// The change as the sink's plain `incident` line (the sink knows no incident types).
fn line(i: &Incident) -> IncidentLine {
    IncidentLine {
        site: i.site.clone(),
        device: i.device.clone(),
        rule: i.rule.clone(),
        severity: i.severity.as_str(),
        state: i.state.as_str(),
        revision: i.revision,
        value: i.value,
        threshold: i.threshold,
        summary: i.summary.clone(),
        ts_ms: i.updated_ms,
    }
}
