//! MQTT channel: the incident JSON on the ops topic (`citywatch/v1/ops/incidents`, QoS 1).
//!
//! It owns no connection: the gateway injects a [`PublishFn`] over the broker connection it
//! already has (embedded or external), so this module stays free of any MQTT client.


use futures_util::future::BoxFuture;

use super::sink::{DeliveryError, Sink};
use super::MqttNotifyConfig;
use crate::model::OutboxItem;

pub use crate::model::PublishFn;

/// Longest one publish may take before it counts as failed and is tried again (receivers
/// de-duplicate by `id` + `revision`, so a publish that did get through is harmless).
pub const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Delivers to `[notify.mqtt]`.
pub struct MqttSink {
    topic: String,
    retain: bool,
    publish: PublishFn,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink").field("topic", &self.topic).field("retain", &self.retain).finish_non_exhaustive()
    }
}

impl MqttSink {
    pub fn new(config: &MqttNotifyConfig, publish: PublishFn) -> MqttSink {
        MqttSink { topic: config.topic.clone(), retain: config.retain, publish }
    }
}

impl Sink for MqttSink {
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let publish = (self.publish)(self.topic.clone(), item.body.as_bytes().to_vec(), self.retain);
            match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(DeliveryError::Transient(format!("MQTT publish to {}: {e}", self.topic))),
                Err(_) => Err(DeliveryError::Transient(format!("MQTT publish to {} timed out", self.topic))),
            }
        })
    }
}
