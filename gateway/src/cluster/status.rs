//! `citywatch cluster status`: members, partitions with their owners and fencing tokens, and the
//! lag of every partition's consumer and relay ([`super::relay`]) — read from the cluster, as JSON.

use async_nats::jetstream::{self, consumer::pull};
use serde_json::{json, Value};

use super::ownership::{lease_key, Member};
use super::{Cluster, Result, INGEST_STREAM};

/// The status document.
pub async fn status(cluster: &Cluster) -> Result<Value> {
    let err = |what: &'static str| move |e: &dyn std::fmt::Display| super::Error::JetStream { what: what.into(), reason: e.to_string() };
    let members_kv = cluster.js.get_key_value(super::MEMBERS_BUCKET).await.map_err(|e| err("members bucket")(&e))?;
    let leases_kv = cluster.js.get_key_value(super::LEASES_BUCKET).await.map_err(|e| err("leases bucket")(&e))?;
    let mut members = Vec::new();
    let live = super::ownership::live_members(&members_kv, std::time::Duration::from_secs(10)).await.map_err(|e| err("members")(&e))?;
    for k in live {
        if let Ok(Some(v)) = members_kv.get(&k).await {
            match serde_json::from_slice::<Member>(&v) {
                Ok(m) => members.push(json!({"node": m.node, "seen_ms": m.at_ms, "partitions": m.partitions.len()})),
                Err(_) => members.push(json!({"node": k})),
            }
        }
    }
    let ingest = cluster.js.get_stream(INGEST_STREAM).await.map_err(|e| err("ingest stream")(&e))?;
    // Missing before the first gateway of this version started: no relay lag then.
    let mqtt_msgs = cluster.js.get_stream(super::relay::MQTT_MSGS_STREAM).await.ok();
    let mut partitions = Vec::new();
    let mut total_lag = 0u64;
    for p in 0..cluster.config.partitions {
        let (owner, token) = match leases_kv.entry(lease_key(p)).await {
            Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => (Some(String::from_utf8_lossy(&e.value).into_owned()), Some(e.revision)),
            _ => (None, None),
        };
        let (lag, pending_acks) = match ingest.get_consumer::<pull::Config>(&format!("part-{p}")).await {
            Ok(mut c) => match c.info().await {
                Ok(i) => (Some(i.num_pending), Some(i.num_ack_pending)),
                Err(_) => (None, None),
            },
            Err(_) => (None, None),
        };
        // QoS 1 messages the MQTT listener acknowledged and the relay has not yet moved.
        let relay_lag = match &mqtt_msgs {
            Some(s) => match s.get_consumer::<pull::Config>(&super::relay::consumer_name(p)).await {
                Ok(mut c) => c.info().await.ok().map(|i| i.num_pending + i.num_ack_pending as u64),
                Err(_) => None,
            },
            None => None,
        };
        total_lag += lag.unwrap_or(0) + pending_acks.unwrap_or(0) as u64 + relay_lag.unwrap_or(0);
        partitions.push(json!({"partition": p, "owner": owner, "token": token, "lag": lag, "unacked": pending_acks, "relay_lag": relay_lag}));
    }
    Ok(json!({
        "members": members,
        "partitions": partitions,
        "partition_count": cluster.config.partitions,
        "lag_total": total_lag,
    }))
}
