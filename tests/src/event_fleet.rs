//! A fleet of devices that each keep one QoS 1 event in flight, for the cluster tests that kill
//! something under load and then look up every event a device got a PUBACK for.
//!
//! Each device publishes `self_test_ok` events with rising `seq`, one at a time, so a PUBACK
//! names exactly one `seq`; when its link breaks (or stalls for 3 s) it connects to the next NATS
//! node and sends the unacknowledged event again, as the firmware's store-and-forward ring does.
//! Not a load generator for rates (edge-sim is): a few thousand events a second at most.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::watch;

use crate::{device_topic, split_addr, unique_client_id};

/// One PUBACK: the event's seq, the node whose listener sent it, when it came.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    pub seq: u32,
    pub node: usize,
    pub at: Instant,
}

/// What one device saw: each acknowledged event, in order.
#[derive(Debug, Default)]
pub struct DeviceLog {
    pub acked: Vec<Acked>,
    pub reconnects: usize,
}

/// One device `id` of `site`: events until the instant `until` holds (a test may move it),
/// starting on `nodes[first]` (MQTT addresses).
pub async fn publish_events(site: String, id: String, nodes: Vec<String>, first: usize, until: watch::Receiver<Instant>) -> DeviceLog {
    let mut log = DeviceLog::default();
    let mut node = first;
    let mut seq: u32 = 1;
    let running = || Instant::now() < *until.borrow();
    'links: while running() {
        let Ok((host, port)) = split_addr(&nodes[node]) else { break };
        let mut options = MqttOptions::new(unique_client_id(&id), host, port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut events) = AsyncClient::new(options, 8);
        let topic = device_topic(&site, &id, "event");
        while running() {
            let body = json!({"seq": seq, "ts": wall_ms(), "event": "self_test_ok"}).to_string();
            if client.try_publish(&topic, QoS::AtLeastOnce, false, body).is_err() {
                break;
            }
            let acked = loop {
                match tokio::time::timeout(Duration::from_secs(3), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break true,
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) | Err(_) => break false,
                }
            };
            if !acked {
                // The link broke (or stalled): the same seq again on the next node.
                node = (node + 1) % nodes.len();
                log.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue 'links;
            }
            log.acked.push(Acked { seq, node, at: Instant::now() });
            seq += 1;
        }
        break;
    }
    log
}

/// Milliseconds since the epoch, as devices stamp `ts`.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
