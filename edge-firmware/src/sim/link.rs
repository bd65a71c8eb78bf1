//! One simulated MQTT connection: a rumqttc client and the task that polls its event loop.
//!
//! The poll task never publishes (rumqttc deadlocks when the poller waits on its own request
//! queue); it reports link changes and incoming commands to the owning device task, which
//! subscribes and publishes. rumqttc reconnects on the next poll after an error, so the poll
//! task adds its own capped exponential backoff. A link can be dropped without DISCONNECT,
//! so the broker publishes the Last Will, as when a device loses power or coverage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    /// Registered with the broker on every CONNECT.
    pub will: Option<LastWill>,
    pub keep_alive: Duration,
    /// Requests rumqttc may hold before `publish().await` waits.
    pub request_capacity: usize,
    /// QoS 1 publishes in flight before rumqttc waits for PUBACKs (rumqttc's default: 100).
    pub inflight: u16,
}

/// What the poll task tells the device task.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK accepted: subscribe again and announce `online`.
    Up,
    /// The connection failed; rumqttc retries after a backoff.
    Down(String),
    /// A message on a subscribed topic (a `cmd`).
    Message { topic: String, payload: Vec<u8> },
}

/// Shortest and longest wait between reconnect attempts.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// A running connection.
#[derive(Debug)]
pub struct Link {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
    poller: JoinHandle<()>,
}

impl Link {
    /// Connects in the background; events arrive on `events`. The channel is unbounded because
    /// a bounded one could deadlock: the device task may be waiting in `publish().await` for
    /// this very poller. Its traffic is a few link changes and commands, never telemetry.
    pub fn start(config: &LinkConfig, events: mpsc::UnboundedSender<LinkEvent>) -> Link {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options.set_keep_alive(config.keep_alive);
        options.set_clean_session(true);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        options.set_inflight(config.inflight.max(1));
        if let Some((user, password)) = &config.credentials {
            options.set_credentials(user, password);
        }
        if let Some(will) = &config.will {
            options.set_last_will(will.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(options, config.request_capacity);
        let connected = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&connected);
        let poller = tokio::spawn(async move {
            let mut backoff = BACKOFF.0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = BACKOFF.0;
                        flag.store(true, Ordering::SeqCst);
                        if events.send(LinkEvent::Up).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let message = LinkEvent::Message { topic: p.topic, payload: p.payload.to_vec() };
                        if events.send(message).is_err() {
                            return;
                        }
                    }
                    // Our own DISCONNECT went out: the link is closed on purpose, stop polling
                    // (polling again would reconnect).
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        flag.store(false, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        flag.store(false, Ordering::SeqCst);
                        if events.send(LinkEvent::Down(err.to_string())).is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF.1);
                    }
                }
            }
        });
        Link { client, connected, poller }
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Shared flag: true between CONNACK and the next error.
    pub fn connected(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.connected)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Loses the link the hard way: no DISCONNECT, so the broker publishes the will.
    /// Marks the link down first so the device buffers, and lets requests already handed to
    /// rumqttc reach the socket before it closes.
    pub async fn drop_ungracefully(self, settle: Duration) {
        self.connected.store(false, Ordering::SeqCst);
        tokio::time::sleep(settle).await;
        self.poller.abort();
        let _ = self.poller.await;
    }

    /// Closes the link with DISCONNECT (no will), after what is queued has been written.
    pub async fn close(self, settle: Duration) {
        let _ = self.client.disconnect().await;
        let mut poller = self.poller;
        if tokio::time::timeout(settle, &mut poller).await.is_err() {
            // The poller ends on its own once DISCONNECT is written; a broker that does not
            // take it in time gets the socket closed instead.
            poller.abort();
        }
    }

    /// Subscribes to `filter` (call after every [`LinkEvent::Up`]: sessions are clean).
    pub async fn subscribe(&self, filter: &str) {
        let _ = self.client.subscribe(filter, QoS::AtLeastOnce).await;
    }
}
