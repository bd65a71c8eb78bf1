//! What sources hand to the pipeline: one MQTT message as it arrived, with the means to
//! acknowledge it once it is durable.
//!
//! Sources know MQTT, not the contract; the pipeline decodes. An [`Ack`] travels with the
//! message into the store writer and fires only after the transaction holding it commits, so
//! a QoS 1 message is never acknowledged to the broker before it is on disk.

use bytes::Bytes;

/// One received publish.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Receive time, ms since the Unix epoch (used when the payload has no `ts`).
    pub received_ms: i64,
    /// Present when the broker waits for our acknowledgement (external mode, QoS ≥ 1).
    pub ack: Option<Ack>,
}

/// Acknowledges one message to its broker. Dropping it without [`Ack::done`] leaves the
/// message unacknowledged, so the broker redelivers it after a reconnect.
pub struct Ack(Box<dyn FnOnce() + Send + 'static>);

impl Ack {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Ack(Box::new(f))
    }

    /// The message is durable: tell the broker.
    pub fn done(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
