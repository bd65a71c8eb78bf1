//! A real MQTT subscriber (rumqttc) that forwards every received publish into a channel.

use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use crate::{split_addr, unique_client_id, READY_TIMEOUT};

/// One publish as the subscriber received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: QoS,
}

impl Received {
    /// The payload as text (lossy for non-UTF-8 bytes).
    pub fn payload_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.payload)
    }

    /// The payload parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.payload).with_context(|| {
            format!(
                "payload on {} is not JSON: {:?}",
                self.topic,
                self.payload_str()
            )
        })
    }
}

#[derive(Debug, Clone, Default)]
struct LinkState {
    /// SubAcks granted so far (one per (re)connection).
    subacks: u64,
    /// The broker refused the connection (CONNACK code) or the subscription.
    refused: Option<String>,
    /// The last connection error, for reports.
    last_error: Option<String>,
}

/// A subscriber on one topic filter, connected to a broker by a background task that polls the
/// rumqttc event loop. It subscribes again on every CONNACK (a clean session loses its
/// subscriptions on reconnect) and never publishes from the polling task. Dropping it stops the
/// task.
#[derive(Debug)]
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Received>,
    state: watch::Receiver<LinkState>,
    client: AsyncClient,
    task: JoinHandle<()>,
    filter: String,
}

impl Subscriber {
    /// Connects anonymously to `addr` ("host:port") and subscribes to `filter`; returns once
    /// the broker acknowledged the subscription (bounded by [`READY_TIMEOUT`]).
    pub async fn connect(addr: &str, filter: &str, qos: QoS) -> anyhow::Result<Subscriber> {
        let (host, port) = split_addr(addr)?;
        let options = MqttOptions::new(unique_client_id("cw-sub"), host, port);
        Self::connect_with(options, filter, qos).await
    }

    /// Like [`Subscriber::connect`] with a username and password.
    pub async fn connect_with_credentials(
        addr: &str,
        user: &str,
        password: &str,
        filter: &str,
        qos: QoS,
    ) -> anyhow::Result<Subscriber> {
        let (host, port) = split_addr(addr)?;
        let mut options = MqttOptions::new(unique_client_id("cw-sub"), host, port);
        options.set_credentials(user, password);
        Self::connect_with(options, filter, qos).await
    }

    /// Like [`Subscriber::connect`] with caller-made options (credentials, keep-alive...).
    /// Packet size limits are raised to 1 MiB (rumqttc's default is 10 KiB).
    pub async fn connect_with(
        mut options: MqttOptions,
        filter: &str,
        qos: QoS,
    ) -> anyhow::Result<Subscriber> {
        options.set_max_packet_size(1 << 20, 1 << 20);
        let broker = options.broker_address();
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, mut state) = watch::channel(LinkState::default());
        let task = tokio::spawn(poll_loop(
            eventloop,
            client.clone(),
            filter.to_string(),
            qos,
            tx,
            state_tx,
        ));
        let subscriber = Subscriber {
            rx,
            state: state.clone(),
            client,
            task,
            filter: filter.to_string(),
        };
        let ready = timeout(
            READY_TIMEOUT,
            state.wait_for(|s| s.subacks > 0 || s.refused.is_some()),
        )
        .await
        .map(|r| r.map(|_| ()));
        let snapshot = state.borrow().clone();
        match ready {
            Ok(Ok(_)) if snapshot.subacks > 0 => Ok(subscriber),
            Ok(Ok(_)) => anyhow::bail!(
                "subscriber to {broker:?} on {filter:?} refused: {}",
                snapshot.refused.unwrap_or_default()
            ),
            Ok(Err(_)) => anyhow::bail!("subscriber task to {broker:?} ended before SUBACK"),
            Err(_) => anyhow::bail!(
                "no SUBACK from {broker:?} for {filter:?} within {READY_TIMEOUT:?}; last error: {}",
                snapshot.last_error.unwrap_or_else(|| "none".into())
            ),
        }
    }

    /// The topic filter this subscriber is on.
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// A handle of the subscriber's own connection (e.g. to subscribe to more filters; the
    /// re-subscribe on reconnect covers only the first filter).
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// How many SUBACKs were granted so far: 1 after connect, one more per reconnection.
    pub fn subacks(&self) -> u64 {
        self.state.borrow().subacks
    }

    /// Waits (bounded) until at least `count` SUBACKs were granted, e.g. after a broker restart
    /// `wait_subacks(before + 1, ..)` means the subscription is back.
    pub async fn wait_subacks(&mut self, count: u64, within: Duration) -> anyhow::Result<()> {
        let waited = timeout(within, self.state.wait_for(|s| s.subacks >= count))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let s = self.state.borrow().clone();
                anyhow::bail!(
                    "subscriber on {:?} has {} SUBACKs, wanted {count} within {within:?}; last error: {}",
                    self.filter,
                    s.subacks,
                    s.last_error.unwrap_or_else(|| "none".into())
                )
            }
        }
    }

    /// The next publish, or `None` if none arrives within `within`.
    pub async fn recv_timeout(&mut self, within: Duration) -> Option<Received> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// Everything that arrives during `period` (always waits the whole period).
    pub async fn collect_for(&mut self, period: Duration) -> Vec<Received> {
        let deadline = Instant::now() + period;
        let mut out = Vec::new();
        while let Ok(Some(msg)) = timeout_at(deadline, self.rx.recv()).await {
            out.push(msg);
        }
        out
    }

    /// Collects publishes until `done(&collected)` is true or `deadline` passes; returns what
    /// was collected either way (check `done` again, or the length, to tell which).
    pub async fn collect_until(
        &mut self,
        deadline: impl Into<Instant>,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = deadline.into();
        let mut out = Vec::new();
        if done(&out) {
            return out;
        }
        while let Ok(Some(msg)) = timeout_at(deadline, self.rx.recv()).await {
            out.push(msg);
            if done(&out) {
                break;
            }
        }
        out
    }

    /// The first publish within `within` for which `matches` is true; others are dropped.
    pub async fn recv_matching(
        &mut self,
        within: Duration,
        mut matches: impl FnMut(&Received) -> bool,
    ) -> Option<Received> {
        let deadline = Instant::now() + within;
        while let Ok(Some(msg)) = timeout_at(deadline, self.rx.recv()).await {
            if matches(&msg) {
                return Some(msg);
            }
        }
        None
    }

    /// Whatever has already arrived, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            out.push(msg);
        }
        out
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    qos: QoS,
    tx: mpsc::UnboundedSender<Received>,
    state: watch::Sender<LinkState>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // try_: never block the polling task on its own request channel.
                if let Err(e) = client.try_subscribe(filter.clone(), qos) {
                    state.send_modify(|s| s.last_error = Some(format!("subscribe request: {e}")));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure));
                state.send_modify(|s| {
                    if refused {
                        s.refused = Some(format!("SUBACK refused the filter {filter:?}"));
                    } else {
                        s.subacks += 1;
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let msg = Received {
                    topic: publish.topic,
                    payload: publish.payload.to_vec(),
                    retain: publish.retain,
                    qos: publish.qos,
                };
                if tx.send(msg).is_err() {
                    return; // the Subscriber is gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let ConnectionError::ConnectionRefused(code) = &e {
                    let code = *code;
                    state.send_modify(|s| s.refused = Some(format!("CONNACK {code:?}")));
                }
                state.send_modify(|s| s.last_error = Some(e.to_string()));
                if tx.is_closed() {
                    return;
                }
                // The next poll reconnects; pace the attempts while the broker is down.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
