//! A real third-party MQTT device: the Eclipse Paho Python client (`paho-mqtt` 2.x from PyPI,
//! installed by `scripts/test`), speaking MQTT 3.1.1 or 5.0, driven line by line over its
//! stdin/stdout. It is what a device vendor's firmware team would test against, not our own
//! client library, so it checks the embedded broker's conformance from the outside.
//!
//! Every device connects with its device id as client id, a retained `offline` Last Will on its
//! `status` topic, publishes its retained `online` birth, subscribes to its `cmd` topic at QoS 1
//! and reports what it receives. [`PahoDevice::kill`] drops the link without DISCONNECT.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// The Python interpreter that has `paho-mqtt` (the one `scripts/test` pip-installs into).
pub const PAHO_PYTHON: &str = "python3";

/// The device program: JSON commands on stdin, JSON events on stdout.
const DEVICE_PY: &str = r#"
import json, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

a = json.loads(sys.argv[1])
v5 = a["version"] == 5
lock = threading.Lock()
def emit(**ev):
    with lock:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a["client_id"],
                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                clean_session=None if v5 else a["clean"])
if a.get("username"):
    c.username_pw_set(a["username"], a.get("password"))
prefix = "citywatch/v1/%s/%s/" % (a["site"], a["device"])
wprops = None
if v5 and a.get("will_delay"):
    wprops = Properties(PacketTypes.WILLMESSAGE)
    wprops.WillDelayInterval = a["will_delay"]
c.will_set(prefix + "status", json.dumps({"state": "offline"}), qos=1, retain=True, properties=wprops)

def on_connect(client, userdata, flags, rc, props):
    emit(ev="connack", rc=int(rc.value) if hasattr(rc, "value") else int(rc),
         session_present=bool(flags.session_present))
def on_publish(client, userdata, mid, rc, props):
    emit(ev="puback", mid=mid)
def on_subscribe(client, userdata, mid, rcs, props):
    emit(ev="suback", mid=mid, codes=[int(r.value) for r in rcs])
def on_unsubscribe(client, userdata, mid, rcs, props):
    emit(ev="unsuback", mid=mid)
def on_message(client, userdata, m):
    try:
        body = json.loads(m.payload)
    except Exception:
        body = m.payload.decode("utf-8", "replace")
    emit(ev="message", topic=m.topic, qos=m.qos, retain=bool(m.retain), dup=bool(m.dup), body=body)
def on_disconnect(client, userdata, flags, rc, props):
    emit(ev="disconnect", rc=int(rc.value) if hasattr(rc, "value") else int(rc))
c.on_connect, c.on_publish, c.on_subscribe = on_connect, on_publish, on_subscribe
c.on_unsubscribe, c.on_message, c.on_disconnect = on_unsubscribe, on_message, on_disconnect

cprops = None
if v5:
    cprops = Properties(PacketTypes.CONNECT)
    cprops.SessionExpiryInterval = a.get("session_expiry", 0)
    if a.get("receive_maximum"):
        cprops.ReceiveMaximum = a["receive_maximum"]
c.connect(a["host"], a["port"], keepalive=a["keepalive"],
          clean_start=a["clean"] if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=cprops)
c.loop_start()

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "publish":
        props = None
        topic = cmd["topic"]
        if v5 and cmd.get("alias"):
            props = Properties(PacketTypes.PUBLISH)
            props.TopicAlias = cmd["alias"]
        info = c.publish(topic, json.dumps(cmd["body"]), qos=cmd.get("qos", 1),
                         retain=cmd.get("retain", False), properties=props)
        emit(ev="queued", mid=info.mid, tag=cmd.get("tag"))
    elif op == "subscribe":
        rc, mid = c.subscribe(cmd["filter"], qos=cmd.get("qos", 1))
        emit(ev="subscribing", mid=mid, tag=cmd.get("tag"))
    elif op == "unsubscribe":
        rc, mid = c.unsubscribe(cmd["filter"])
        emit(ev="unsubscribing", mid=mid, tag=cmd.get("tag"))
    elif op == "disconnect":
        c.disconnect()
        c.loop_stop()
        emit(ev="bye")
        break
"#;

/// How a [`PahoDevice`] connects.
#[derive(Debug, Clone)]
pub struct PahoOptions {
    /// 5 or 4 (MQTT 3.1.1).
    pub version: u8,
    /// Seconds; 0 switches keep-alive off (legal in both versions).
    pub keepalive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval, seconds.
    pub session_expiry: u32,
    /// MQTT 5 Will Delay Interval, seconds.
    pub will_delay: u32,
    /// MQTT 5 Receive Maximum (0: not sent).
    pub receive_maximum: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl PahoOptions {
    pub fn v5() -> PahoOptions {
        PahoOptions { version: 5, keepalive: 60, clean: true, session_expiry: 0, will_delay: 0, receive_maximum: 0, username: None, password: None }
    }

    pub fn v311() -> PahoOptions {
        PahoOptions { version: 4, ..PahoOptions::v5() }
    }
}

/// One Paho device process.
#[derive(Debug)]
pub struct PahoDevice {
    child: Child,
    stdin: ChildStdin,
    events: Arc<Mutex<Vec<Value>>>,
    pub site: String,
    pub device: String,
}

impl PahoDevice {
    /// Starts the device and waits for its CONNACK (any return code; see [`PahoDevice::connack`]).
    pub async fn connect(broker: &str, site: &str, device: &str, opts: &PahoOptions) -> anyhow::Result<PahoDevice> {
        let (host, port) = broker.rsplit_once(':').context("broker is host:port")?;
        let args = json!({
            "host": host, "port": port.parse::<u16>()?, "client_id": device, "site": site, "device": device,
            "version": opts.version, "keepalive": opts.keepalive, "clean": opts.clean,
            "session_expiry": opts.session_expiry, "will_delay": opts.will_delay,
            "receive_maximum": opts.receive_maximum, "username": opts.username, "password": opts.password,
        });
        let mut child = Command::new(PAHO_PYTHON)
            .args(["-u", "-c", DEVICE_PY, &args.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("python3 with paho-mqtt (scripts/test pip-installs paho-mqtt==2.*)")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("events lock").push(v);
                }
            }
        });
        let dev = PahoDevice { child, stdin, events, site: site.into(), device: device.into() };
        dev.wait_event(crate::READY_TIMEOUT, "CONNACK", |e| e["ev"] == "connack").await?;
        Ok(dev)
    }

    /// The CONNACK's return / reason code (0: accepted) and session-present flag.
    pub fn connack(&self) -> Option<(u64, bool)> {
        self.events().iter().find(|e| e["ev"] == "connack").map(|e| (e["rc"].as_u64().unwrap_or(255), e["session_present"] == true))
    }

    /// Everything the device reported so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events lock").clone()
    }

    /// Messages the device received.
    pub fn messages(&self) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["ev"] == "message").collect()
    }

    /// Waits (bounded) for an event matching `pred`; returns it.
    pub async fn wait_event(&self, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return Ok(e);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("paho device {}: no {what} within {within:?}; events: {:?}", self.device, self.events());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send(&mut self, cmd: Value) -> anyhow::Result<()> {
        let mut line = cmd.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.context("paho device stdin")?;
        self.stdin.flush().await.context("paho device stdin")?;
        Ok(())
    }

    /// `citywatch/v1/{site}/{device}/{channel}`.
    pub fn topic(&self, channel: &str) -> String {
        format!("citywatch/v1/{}/{}/{}", self.site, self.device, channel)
    }

    /// Publishes `body` on one of its channels (`alias`: MQTT 5 topic alias; with `topic_empty`
    /// the topic is left out and the alias stands for it). At QoS 1 it waits for the PUBACK.
    pub async fn publish(&mut self, channel: &str, body: &Value, qos: u8, retain: bool, alias: Option<(u16, bool)>) -> anyhow::Result<()> {
        let tag = format!("{channel}-{}", self.events().len());
        let topic = match alias {
            Some((_, true)) => String::new(),
            _ => self.topic(channel),
        };
        self.send(json!({"op": "publish", "topic": topic, "body": body, "qos": qos, "retain": retain, "alias": alias.map(|a| a.0), "tag": tag}))
            .await?;
        let queued = self.wait_event(crate::READY_TIMEOUT, "publish queued", |e| e["ev"] == "queued" && e["tag"] == tag.as_str()).await?;
        if qos > 0 {
            let mid = queued["mid"].clone();
            self.wait_event(crate::READY_TIMEOUT, "PUBACK", |e| e["ev"] == "puback" && e["mid"] == mid).await?;
        }
        Ok(())
    }

    /// The retained `online` birth of the contract (SPEC §3), QoS 1, PUBACK awaited.
    pub async fn birth(&mut self, kind: &str) -> anyhow::Result<()> {
        self.publish("status", &json!({"state": "online", "kind": kind, "fw": "0.1.0", "interval_s": 60}), 1, true, None).await
    }

    /// Subscribes and waits for the SUBACK; returns its reason codes.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<Vec<u64>> {
        let tag = format!("sub-{}", self.events().len());
        self.send(json!({"op": "subscribe", "filter": filter, "qos": qos, "tag": tag})).await?;
        let mid = self.wait_event(crate::READY_TIMEOUT, "subscribe sent", |e| e["ev"] == "subscribing" && e["tag"] == tag.as_str()).await?["mid"].clone();
        let ack = self.wait_event(crate::READY_TIMEOUT, "SUBACK", |e| e["ev"] == "suback" && e["mid"] == mid).await?;
        Ok(ack["codes"].as_array().map(|c| c.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        let tag = format!("unsub-{}", self.events().len());
        self.send(json!({"op": "unsubscribe", "filter": filter, "tag": tag})).await?;
        let mid = self.wait_event(crate::READY_TIMEOUT, "unsubscribe sent", |e| e["ev"] == "unsubscribing" && e["tag"] == tag.as_str()).await?["mid"].clone();
        self.wait_event(crate::READY_TIMEOUT, "UNSUBACK", |e| e["ev"] == "unsuback" && e["mid"] == mid).await?;
        Ok(())
    }

    /// A clean DISCONNECT (no Last Will).
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.send(json!({"op": "disconnect"})).await?;
        self.wait_event(crate::READY_TIMEOUT, "disconnect", |e| e["ev"] == "bye").await?;
        let _ = tokio::time::timeout(crate::READY_TIMEOUT, self.child.wait()).await;
        Ok(())
    }

    /// Drops the link without DISCONNECT (SIGKILL): the broker must send the Last Will.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
