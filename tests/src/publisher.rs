//! A real MQTT publisher (rumqttc) standing in for a hand-driven device or a benchmark client:
//! publishes what the test says, when it says, and counts the broker's acknowledgements.
//! Not a simulator (that is `edge-sim`): it sends nothing on its own.

use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::{split_addr, unique_client_id, READY_TIMEOUT};

/// A connected client whose event loop is polled by a background task; dropping it stops the
/// task (without DISCONNECT).
#[derive(Debug)]
pub struct Publisher {
    client: AsyncClient,
    /// PUBACKs received so far (QoS 1 publishes the broker acknowledged).
    acks: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connects anonymously to `addr` ("host:port"); returns after CONNACK (bounded by
    /// [`READY_TIMEOUT`]). The request queue holds `capacity` publishes.
    pub async fn connect(addr: &str, capacity: usize) -> anyhow::Result<Publisher> {
        Self::connect_as(addr, None, capacity).await
    }

    /// Like [`Publisher::connect`], logged in as `(user, password)` when given; a broker that
    /// refuses them is an error (the CONNACK's code in it).
    pub async fn connect_as(addr: &str, credentials: Option<(&str, &str)>, capacity: usize) -> anyhow::Result<Publisher> {
        let (host, port) = split_addr(addr)?;
        let mut options = MqttOptions::new(unique_client_id("cw-pub"), host, port);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        options.set_max_packet_size(1 << 20, 1 << 20);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, capacity.max(1));
        let first = timeout(READY_TIMEOUT, eventloop.poll())
            .await
            .with_context(|| format!("no CONNACK from {addr} within {READY_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {addr}"))?;
        anyhow::ensure!(
            matches!(first, Event::Incoming(Packet::ConnAck(_))),
            "first event from {addr} is not CONNACK: {first:?}"
        );
        let (acks_tx, acks) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acks_tx.send_modify(|n| *n += 1),
                    Ok(_) => {}
                    // The next poll reconnects; pace the attempts while the broker is down.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Publisher { client, acks, task })
    }

    /// The underlying client.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Hands one publish to the client (bounded by [`READY_TIMEOUT`] if its queue is full).
    pub async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        timeout(
            READY_TIMEOUT,
            self.client.publish(topic, qos, retain, payload),
        )
        .await
        .with_context(|| format!("publish to {topic}: the client queue stayed full"))?
        .with_context(|| format!("publish to {topic}"))
    }

    /// Publishes `body` as JSON at QoS 1.
    pub async fn publish_json(
        &self,
        topic: &str,
        retain: bool,
        body: &Value,
    ) -> anyhow::Result<()> {
        self.publish(
            topic,
            QoS::AtLeastOnce,
            retain,
            body.to_string().into_bytes(),
        )
        .await
    }

    /// PUBACKs received so far.
    pub fn acked(&self) -> u64 {
        *self.acks.borrow()
    }

    /// Waits until at least `count` QoS 1 publishes were acknowledged by the broker.
    pub async fn wait_acked(&mut self, count: u64, within: Duration) -> anyhow::Result<()> {
        let waited = timeout(within, self.acks.wait_for(|n| *n >= count))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            _ => anyhow::bail!(
                "{} of {count} publishes acknowledged within {within:?}",
                self.acked()
            ),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a device says on connect: the retained `status` body of SPEC §3.
pub fn birth(kind: &str, interval_s: u32) -> Value {
    serde_json::json!({"state": "online", "kind": kind, "fw": "0.1.0", "interval_s": interval_s})
}

/// `citywatch/v1/{site}/{device}/{channel}`.
pub fn device_topic(site: &str, device: &str, channel: &str) -> String {
    format!("citywatch/v1/{site}/{device}/{channel}")
}
