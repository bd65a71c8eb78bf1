//! The embedded broker's front door: TLS and per-device topic ACLs in front of the broker.
//!
//! Written for rumqttd 0.20 (no ACL hook, an older rustls) and kept with rmqtt: it is proven by
//! its tests, it keeps one TLS stack (the gateway's rustls/ring) and one place for the rules.
//! When `[mqtt.tls]` is set or an account is restricted to a site or device, the broker listens
//! on a private loopback port and this door listens on `mqtt.listen`: it terminates TLS, reads
//! every packet a device sends (MQTT 3.1, 3.1.1 and 5.0), checks the CONNECT's will topic, each
//! PUBLISH topic (for MQTT 5, the topic a Topic Alias stands for) and each SUBSCRIBE filter
//! against the account, forwards what is allowed unchanged and closes the connection at the
//! first denial (MQTT 3.1.1 §3.3.5 and §3.8.4, MQTT 5 §4.13 allow that). Broker → device
//! traffic is copied unchanged. Passwords stay the broker's job: the door trusts the username
//! only because the broker refuses the connection when the password does not match it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::sources::config::{MqttConfig, MqttUser};
use crate::ingest::now_ms;

/// The channels a device publishes on (SPEC §3); it reads only `cmd`.
pub const DEVICE_CHANNELS: [&str; 3] = ["status", "telemetry", "event"];
const TOPIC_ROOT: &str = "citywatch/v1/";

/// True when the door must stand in front of the broker.
pub fn needed(cfg: &MqttConfig) -> bool {
    cfg.tls.is_some() || cfg.users.iter().any(|u| u.site.is_some())
}

/// A site or device id of the contract: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `[[mqtt.users]]`; the error names the key.
pub fn validate_users(users: &[MqttUser]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, u) in users.iter().enumerate() {
        let key = |k: &str| format!("mqtt.users[{i}].{k}");
        if u.username.is_empty() {
            return Err((key("username"), "must not be empty".into()));
        }
        if !names.insert(u.username.as_str()) {
            return Err((key("username"), format!("{:?} is used by another account", u.username)));
        }
        if u.password.is_empty() {
            return Err((key("password"), "must not be empty".into()));
        }
        if let Some(site) = &u.site {
            if !valid_id(site) {
                return Err((key("site"), "must match [A-Za-z0-9_-]{1,64}".into()));
            }
        }
        match (&u.site, &u.device) {
            (None, Some(_)) => return Err((key("device"), "needs site (the device's site)".into())),
            (Some(_), Some(d)) if !valid_id(d) => return Err((key("device"), "must match [A-Za-z0-9_-]{1,64}".into())),
            _ => {}
        }
    }
    Ok(())
}

/// What an account may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    /// Unrestricted (no `site`).
    Any,
    /// One device of one site.
    Device { site: String, device: String },
    /// Any device of one site, the device being the connection's client id.
    Site { site: String },
}

/// Who a connection is, once its CONNECT is read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Any,
    /// May publish `{prefix}{status,telemetry,event}` and subscribe `{prefix}cmd`, where prefix
    /// is `citywatch/v1/{site}/{device}/`.
    Device { prefix: String },
    /// An unknown account (the broker refuses it): nothing is allowed.
    Nobody,
}

impl Identity {
    fn may_publish(&self, topic: &[u8]) -> bool {
        match self {
            Identity::Any => true,
            Identity::Nobody => false,
            Identity::Device { prefix } => topic
                .strip_prefix(prefix.as_bytes())
                .is_some_and(|ch| DEVICE_CHANNELS.iter().any(|c| c.as_bytes() == ch)),
        }
    }

    fn may_subscribe(&self, filter: &[u8]) -> bool {
        match self {
            Identity::Any => true,
            Identity::Nobody => false,
            Identity::Device { prefix } => filter.strip_prefix(prefix.as_bytes()) == Some(b"cmd"),
        }
    }
}

/// The accounts' grants.
#[derive(Debug)]
pub struct Acl {
    grants: HashMap<String, Grant>,
}

impl Acl {
    pub fn new(users: &[MqttUser]) -> Acl {
        let grants = users
            .iter()
            .map(|u| {
                let grant = match (&u.site, &u.device) {
                    (Some(site), Some(device)) => Grant::Device { site: site.clone(), device: device.clone() },
                    (Some(site), None) => Grant::Site { site: site.clone() },
                    _ => Grant::Any,
                };
                (u.username.clone(), grant)
            })
            .collect();
        Acl { grants }
    }

    /// The identity of a CONNECT, or why it is refused.
    fn identify(&self, username: Option<&str>, client_id: &str) -> Result<Identity, &'static str> {
        if self.grants.is_empty() {
            // TLS only, anonymous devices: no accounts, no ACL.
            return Ok(Identity::Any);
        }
        let Some(grant) = username.and_then(|u| self.grants.get(u)) else {
            return Ok(Identity::Nobody);
        };
        Ok(match grant {
            Grant::Any => Identity::Any,
            Grant::Device { site, device } => {
                // Client ids are global: a device using another's id would take over
                // its connection and its persistent session (subscriptions included).
                if client_id != device {
                    return Err("a per-device account's MQTT client id must be its device id");
                }
                Identity::Device { prefix: format!("{TOPIC_ROOT}{site}/{device}/") }
            }
            Grant::Site { site } => {
                if !valid_id(client_id) {
                    return Err("a per-site account needs the device id as MQTT client id");
                }
                Identity::Device { prefix: format!("{TOPIC_ROOT}{site}/{client_id}/") }
            }
        })
    }
}

/// The door's counters, shown in /metrics.
#[derive(Debug, Default)]
pub struct DoorStats {
    pub connections: AtomicU64,
    pub denied_connect: AtomicU64,
    pub denied_publish: AtomicU64,
    pub denied_subscribe: AtomicU64,
    pub malformed: AtomicU64,
    pub tls_failed: AtomicU64,
    last_log_ms: AtomicI64,
}

impl DoorStats {
    /// One warning per 10 s at most: a rogue device must not flood the log.
    fn warn(&self, what: &str, peer: SocketAddr, detail: &str) {
        let now = now_ms();
        let last = self.last_log_ms.load(Relaxed);
        if now - last >= 10_000 && self.last_log_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            tracing::warn!(%peer, detail, "MQTT door: {what}; connection closed (further denials within 10 s are only counted)");
        }
    }
}

/// The door's series of `/metrics` (names without `_total`: the encoder adds it).
impl prometheus_client::collector::Collector for DoorStats {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let connections = self.connections.load(Relaxed);
        crate::metrics::counter(&mut encoder, "citywatch_mqtt_connections", "Device connections through the embedded broker's TLS/ACL door.", connections)?;
        let rejected = [
            ("acl_denied_connect", &self.denied_connect),
            ("acl_denied_publish", &self.denied_publish),
            ("acl_denied_subscribe", &self.denied_subscribe),
            ("malformed", &self.malformed),
            ("tls_handshake", &self.tls_failed),
        ]
        .map(|(reason, n)| ([("reason", reason)], n.load(Relaxed)));
        crate::metrics::counter_family(&mut encoder, "citywatch_mqtt_rejected", "Device connections closed by the door, by reason.", rejected)
    }
}

/// Everything a connection needs.
pub struct Door {
    pub acl: Acl,
    pub tls: Option<TlsAcceptor>,
    /// The broker's private loopback listener.
    pub upstream: SocketAddr,
    /// Largest packet let through (the broker's limit too).
    pub max_packet: usize,
    pub stats: Arc<DoorStats>,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door").field("acl", &self.acl).field("tls", &self.tls.is_some()).field("upstream", &self.upstream).finish()
    }
}

/// Accepts devices until the task is aborted.
pub async fn run(listener: TcpListener, door: Arc<Door>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT door: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        door.stats.connections.fetch_add(1, Relaxed);
        let door = Arc::clone(&door);
        tokio::spawn(async move {
            match &door.tls {
                None => serve(tcp, peer, &door).await,
                Some(acceptor) => match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => serve(tls, peer, &door).await,
                    Ok(Err(e)) => {
                        door.stats.tls_failed.fetch_add(1, Relaxed);
                        tracing::debug!(%peer, error = %e, "MQTT door: TLS handshake failed");
                    }
                    Err(_) => {
                        door.stats.tls_failed.fetch_add(1, Relaxed);
                    }
                },
            }
        });
    }
}

/// Why the device → broker direction ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The device closed the connection (or the read failed).
    Closed,
    Denied(&'static str, String),
    Malformed(&'static str),
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(device: S, peer: SocketAddr, door: &Door) {
    let upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(door.upstream)).await {
        Ok(Ok(s)) => s,
        _ => {
            tracing::error!(upstream = %door.upstream, "MQTT door: the embedded broker does not answer");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let (mut dr, mut dw) = tokio::io::split(device);
    let (mut ur, mut uw) = upstream.into_split();
    let end = {
        let down = tokio::io::copy(&mut ur, &mut dw);
        let up = inspect(&mut dr, &mut uw, door);
        tokio::select! {
            _ = down => End::Closed,
            end = up => end,
        }
    };
    match end {
        End::Closed => {}
        End::Denied(what, detail) => {
            let counter = match what {
                "connect" => &door.stats.denied_connect,
                "subscribe" => &door.stats.denied_subscribe,
                _ => &door.stats.denied_publish,
            };
            counter.fetch_add(1, Relaxed);
            door.stats.warn(&format!("{what} denied"), peer, &detail);
        }
        End::Malformed(why) => {
            door.stats.malformed.fetch_add(1, Relaxed);
            door.stats.warn("malformed packet", peer, why);
        }
    }
    // Dropping the upstream half makes the broker see a dropped connection (and send the Will).
    drop((ur, uw));
    let _ = tokio::time::timeout(Duration::from_secs(1), dw.shutdown()).await;
}

/// Device → broker: forwards whole packets that pass the ACL, in batches as they arrive.
async fn inspect<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(dr: &mut R, uw: &mut W, door: &Door) -> End {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut session: Option<Session> = None;
    loop {
        match dr.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return End::Closed,
            Ok(_) => {}
        }
        let mut allowed = 0;
        let verdict = loop {
            match frame(&buf[allowed..], door.max_packet) {
                Ok(None) => break None,
                Ok(Some((header, total))) => {
                    let packet = &buf[allowed..allowed + total];
                    match check(packet[0], &packet[header..], &mut session, &door.acl) {
                        Ok(()) => allowed += total,
                        Err(end) => break Some(end),
                    }
                }
                Err(why) => break Some(End::Malformed(why)),
            }
        };
        if allowed > 0 {
            if uw.write_all(&buf[..allowed]).await.is_err() {
                return End::Closed;
            }
            buf.advance(allowed);
        }
        if let Some(end) = verdict {
            return end;
        }
    }
}

/// What the door knows about a connection after its CONNECT.
#[derive(Debug)]
struct Session {
    identity: Identity,
    v5: bool,
    /// MQTT 5 topic aliases the device set up (alias → topic): a PUBLISH that uses one carries
    /// an empty topic, and the ACL must judge the topic it stands for.
    aliases: HashMap<u16, Vec<u8>>,
}

/// The first complete packet of `buf`: (fixed header length, total length); None if incomplete.
fn frame(buf: &[u8], max_packet: usize) -> Result<Option<(usize, usize)>, &'static str> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else { return Ok(None) };
        remaining |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            let header = 2 + i;
            if remaining > max_packet {
                return Err("packet larger than mqtt.max_payload_bytes allows");
            }
            return Ok((buf.len() >= header + remaining).then_some((header, header + remaining)));
        }
    }
    Err("remaining length longer than 4 bytes")
}

/// An MQTT UTF-8 string or binary field at `*pos`.
fn field<'a>(body: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = u16::from_be_bytes([*body.get(*pos)?, *body.get(*pos + 1)?]) as usize;
    let start = *pos + 2;
    let bytes = body.get(start..start + len)?;
    *pos = start + len;
    Some(bytes)
}

/// Skips MQTT 5 properties (a variable-length integer, then that many bytes).
fn skip_properties(body: &[u8], pos: &mut usize) -> Option<()> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *body.get(*pos)?;
        *pos += 1;
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            *pos = pos.checked_add(len)?;
            return (*pos <= body.len()).then_some(());
        }
    }
    None
}

/// The Topic Alias property (0x23) of an MQTT 5 PUBLISH whose properties start at `pos`.
fn publish_topic_alias(body: &[u8], mut pos: usize) -> Option<Option<u16>> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *body.get(pos)?;
        pos += 1;
        len |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return None;
        }
    }
    let end = pos.checked_add(len)?;
    let props = body.get(pos..end)?;
    let mut p = 0;
    let mut alias = None;
    while p < props.len() {
        let id = props[p];
        p += 1;
        let width = match id {
            0x01 => 1,                 // payload format indicator
            0x02 => 4,                 // message expiry interval
            0x23 => {
                alias = Some(u16::from_be_bytes([*props.get(p)?, *props.get(p + 1)?]));
                2
            }
            0x03 | 0x08 | 0x09 => 2 + u16::from_be_bytes([*props.get(p)?, *props.get(p + 1)?]) as usize, // content type, response topic, correlation data
            0x26 => {
                // user property: two strings
                let k = 2 + u16::from_be_bytes([*props.get(p)?, *props.get(p + 1)?]) as usize;
                k + 2 + u16::from_be_bytes([*props.get(p + k)?, *props.get(p + k + 1)?]) as usize
            }
            0x0B => {
                // subscription identifier: a variable byte integer
                let mut w = 0;
                loop {
                    let b = *props.get(p + w)?;
                    w += 1;
                    if b & 0x80 == 0 || w == 4 {
                        break w;
                    }
                }
            }
            _ => return None,
        };
        p += width;
    }
    (p == props.len()).then_some(alias)
}

struct Connect<'a> {
    level: u8,
    client_id: &'a [u8],
    will_topic: Option<&'a [u8]>,
    username: Option<&'a [u8]>,
}

fn parse_connect(body: &[u8]) -> Option<Connect<'_>> {
    let mut pos = 0;
    let _protocol = field(body, &mut pos)?;
    let level = *body.get(pos)?;
    let flags = *body.get(pos + 1)?;
    pos += 4; // level, flags, keep alive
    if level == 5 {
        skip_properties(body, &mut pos)?;
    }
    let client_id = field(body, &mut pos)?;
    let mut will_topic = None;
    if flags & 0x04 != 0 {
        if level == 5 {
            skip_properties(body, &mut pos)?;
        }
        will_topic = Some(field(body, &mut pos)?);
        field(body, &mut pos)?; // will payload
    }
    let username = if flags & 0x80 != 0 { Some(field(body, &mut pos)?) } else { None };
    Some(Connect { level, client_id, will_topic, username })
}

/// The ACL verdict on one packet (first byte, body after the fixed header).
fn check(first: u8, body: &[u8], session: &mut Option<Session>, acl: &Acl) -> Result<(), End> {
    let kind = first >> 4;
    let Some(s) = session else {
        if kind != 1 {
            return Err(End::Malformed("first packet is not CONNECT"));
        }
        let c = parse_connect(body).ok_or(End::Malformed("unreadable CONNECT"))?;
        let client_id = std::str::from_utf8(c.client_id).map_err(|_| End::Malformed("client id is not UTF-8"))?;
        let username = c.username.map(|u| std::str::from_utf8(u).map_err(|_| End::Malformed("username is not UTF-8"))).transpose()?;
        let identity = acl
            .identify(username, client_id)
            .map_err(|why| End::Denied("connect", format!("user {username:?}, client id {client_id:?}: {why}")))?;
        if let Some(topic) = c.will_topic {
            if !identity.may_publish(topic) {
                return Err(End::Denied("connect", format!("user {username:?}: Last Will on {:?}", String::from_utf8_lossy(topic))));
            }
        }
        *session = Some(Session { identity, v5: c.level == 5, aliases: HashMap::new() });
        return Ok(());
    };
    match kind {
        1 => Err(End::Malformed("second CONNECT")),
        3 => {
            let mut pos = 0;
            let mut topic = field(body, &mut pos).ok_or(End::Malformed("unreadable PUBLISH"))?;
            if s.v5 {
                if first & 0x06 != 0 {
                    pos += 2; // packet id (QoS 1 and 2)
                }
                match publish_topic_alias(body, pos).ok_or(End::Malformed("unreadable PUBLISH properties"))? {
                    None if topic.is_empty() => return Err(End::Malformed("PUBLISH without topic or topic alias")),
                    None => {}
                    Some(alias) if alias == 0 || alias > crate::sources::broker::MAX_TOPIC_ALIASES => {
                        return Err(End::Malformed("topic alias out of range"));
                    }
                    Some(alias) if topic.is_empty() => {
                        topic = s.aliases.get(&alias).map(Vec::as_slice).ok_or(End::Malformed("unknown topic alias"))?;
                    }
                    Some(alias) => {
                        s.aliases.insert(alias, topic.to_vec());
                    }
                }
            }
            if s.identity.may_publish(topic) {
                Ok(())
            } else {
                Err(End::Denied("publish", format!("topic {:?}", String::from_utf8_lossy(topic))))
            }
        }
        8 => {
            let mut pos = 2; // packet id
            if s.v5 {
                skip_properties(body, &mut pos).ok_or(End::Malformed("unreadable SUBSCRIBE"))?;
            }
            let mut any = false;
            while pos < body.len() {
                let filter = field(body, &mut pos).ok_or(End::Malformed("unreadable SUBSCRIBE"))?;
                pos += 1; // options
                if !s.identity.may_subscribe(filter) {
                    return Err(End::Denied("subscribe", format!("filter {:?}", String::from_utf8_lossy(filter))));
                }
                any = true;
            }
            if any {
                Ok(())
            } else {
                Err(End::Malformed("SUBSCRIBE without a filter"))
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "door_tests.rs"]
mod tests;
