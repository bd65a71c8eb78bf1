//! The MQTT wire contract between devices and the gateway (SPEC §3), as Rust types.
//!
//! One decoder serves both ends: the firmware (no_std, no heap) and the gateway (std) both
//! decode with `serde-json-core`, so a payload the device accepts is one the gateway accepts.
//! Decoding is two-staged: JSON into borrowed "raw" shapes, then validation into typed
//! messages, so every rejection carries a [`DecodeError`] reason instead of a panic.
//! This module knows nothing of MQTT clients or brokers.

use core::fmt::{self, Write as _};

use heapless::String;
use serde::{Deserialize, Serialize};

/// Every topic starts with this prefix.
pub const TOPIC_ROOT: &str = "citywatch/v1";
/// Longest site or device id.
pub const MAX_ID_LEN: usize = 64;
/// Capacity of a topic string: root + two ids + channel + separators.
pub const MAX_TOPIC_LEN: usize = 160;
/// Largest payload either end accepts; anything bigger is `oversize`.
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// Most metrics one telemetry message may carry.
pub const MAX_VALUES: usize = 8;
/// Longest firmware version string.
pub const MAX_FW_LEN: usize = 24;
/// Longest command id.
pub const MAX_CMD_ID_LEN: usize = 40;

/// Topic string with its fixed capacity.
pub type TopicString = String<MAX_TOPIC_LEN>;

/// Why a topic or payload was rejected. `reason()` is the stable label used for counters,
/// logs and the quarantine table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeError {
    /// Topic not of the form `citywatch/v1/{site}/{device}/{channel}` or ids outside `[A-Za-z0-9_-]{1,64}`.
    BadTopic,
    /// Payload over [`MAX_PAYLOAD_LEN`] bytes.
    Oversize,
    /// Payload is not UTF-8.
    NotUtf8,
    /// Payload is not well-formed JSON.
    NotJson,
    /// Well-formed JSON of the wrong shape: wrong types, missing fields.
    WrongType,
    /// A number is NaN, infinite or `null` where a value is required.
    NonFinite,
    /// `kind` names no device kind of the contract.
    UnknownKind,
    /// A metric name outside the contract.
    UnknownMetric,
    /// The same metric twice in one message.
    DuplicateMetric,
    /// More than [`MAX_VALUES`] metrics in one message.
    TooManyValues,
    /// `event` names no event of the contract.
    UnknownEvent,
    /// `cmd` names no command of the contract.
    UnknownCommand,
    /// `state` is neither `online` nor `offline`.
    UnknownState,
    /// A string field longer than the contract allows.
    FieldTooLong,
}

impl DecodeError {
    /// Stable snake_case label for metrics and the quarantine table.
    pub const fn reason(self) -> &'static str {
        match self {
            DecodeError::BadTopic => "bad_topic",
            DecodeError::Oversize => "oversize",
            DecodeError::NotUtf8 => "not_utf8",
            DecodeError::NotJson => "not_json",
            DecodeError::WrongType => "wrong_type",
            DecodeError::NonFinite => "non_finite",
            DecodeError::UnknownKind => "unknown_kind",
            DecodeError::UnknownMetric => "unknown_metric",
            DecodeError::DuplicateMetric => "duplicate_metric",
            DecodeError::TooManyValues => "too_many_values",
            DecodeError::UnknownEvent => "unknown_event",
            DecodeError::UnknownCommand => "unknown_command",
            DecodeError::UnknownState => "unknown_state",
            DecodeError::FieldTooLong => "field_too_long",
        }
    }

    /// Every reason, for pre-registering counters.
    pub const ALL: [DecodeError; 14] = [
        DecodeError::BadTopic,
        DecodeError::Oversize,
        DecodeError::NotUtf8,
        DecodeError::NotJson,
        DecodeError::WrongType,
        DecodeError::NonFinite,
        DecodeError::UnknownKind,
        DecodeError::UnknownMetric,
        DecodeError::DuplicateMetric,
        DecodeError::TooManyValues,
        DecodeError::UnknownEvent,
        DecodeError::UnknownCommand,
        DecodeError::UnknownState,
        DecodeError::FieldTooLong,
    ];
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// A message did not fit the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeError;

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message does not fit the buffer")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}

// ---------------------------------------------------------------------------------------------
// Names: channels, kinds, metrics, events, commands.

/// Declares a closed set of wire names with `as_str` / `parse` that agree by construction.
macro_rules! wire_names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name on the wire.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The value for a wire name, if it is one.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Name;
                impl<'de> serde::de::Visitor<'de> for Name {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", stringify!($name), " name"))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).ok_or_else(|| E::unknown_variant(v, &[$($text),+]))
                    }
                }
                d.deserialize_str(Name)
            }
        }
    };
}

wire_names! {
    /// The last topic level.
    Channel {
        Status = "status",
        Telemetry = "telemetry",
        Event = "event",
        Cmd = "cmd",
    }
}

wire_names! {
    /// What a device is.
    DeviceKind {
        /// Combustible-gas alarm with an automatic shut-off valve.
        GasDetector = "gas_detector",
        /// Smoke / heat / CO detector.
        SmokeDetector = "smoke_detector",
        /// Air-raid siren mount: tilt, vibration, corrosion.
        SirenMount = "siren_mount",
    }
}

wire_names! {
    /// A measured quantity; the unit is in the name.
    Metric {
        /// Combustible gas, % of the lower explosive limit.
        GasLel = "gas_lel",
        /// Shut-off valve position, 1 = closed.
        ValveClosed = "valve_closed",
        /// Temperature, °C.
        TempC = "temp_c",
        /// Smoke obscuration, dB/m.
        SmokeDbM = "smoke_db_m",
        /// Carbon monoxide, ppm.
        CoPpm = "co_ppm",
        /// Tilt from the installed baseline, degrees.
        TiltDeg = "tilt_deg",
        /// Vibration, milli-g.
        VibrationMg = "vibration_mg",
        /// Metal loss measured by the ER probe, µm.
        CorrosionUm = "corrosion_um",
        /// Bracket section loss, %.
        SectionLossPct = "section_loss_pct",
        /// Battery voltage, V (top-level field of telemetry).
        BatteryV = "battery_v",
        /// Received signal strength, dBm (top-level field of telemetry).
        RssiDbm = "rssi_dbm",
    }
}

wire_names! {
    /// A device event.
    EventKind {
        Alarm = "alarm",
        AlarmCleared = "alarm_cleared",
        Fault = "fault",
        FaultCleared = "fault_cleared",
        Tamper = "tamper",
        LowBattery = "low_battery",
        SelfTestOk = "self_test_ok",
        SelfTestFailed = "self_test_failed",
        ValveClosed = "valve_closed",
        ValveOpened = "valve_opened",
        Silenced = "silenced",
        SirenActivated = "siren_activated",
        CmdAck = "cmd_ack",
    }
}

wire_names! {
    /// A command from the gateway.
    CommandKind {
        CloseValve = "close_valve",
        SelfTest = "self_test",
        Silence = "silence",
        SetInterval = "set_interval",
    }
}

wire_names! {
    /// The link state a device announces on `status`.
    LinkState {
        Online = "online",
        Offline = "offline",
    }
}

impl DeviceKind {
    /// The metrics this kind reports in `values` (battery and rssi are top-level for all kinds).
    pub const fn metrics(self) -> &'static [Metric] {
        match self {
            DeviceKind::GasDetector => &[Metric::GasLel, Metric::ValveClosed, Metric::TempC],
            DeviceKind::SmokeDetector => &[Metric::SmokeDbM, Metric::TempC, Metric::CoPpm],
            DeviceKind::SirenMount => &[
                Metric::TiltDeg,
                Metric::VibrationMg,
                Metric::CorrosionUm,
                Metric::SectionLossPct,
            ],
        }
    }

    /// Whether `metric` belongs to this kind (battery and rssi belong to all).
    pub fn has_metric(self, metric: Metric) -> bool {
        matches!(metric, Metric::BatteryV | Metric::RssiDbm) || self.metrics().contains(&metric)
    }
}

impl Metric {
    /// Analog metrics can be "stuck"; digital ones (valve position) legitimately never change.
    pub const fn is_analog(self) -> bool {
        !matches!(self, Metric::ValveClosed)
    }
}

// ---------------------------------------------------------------------------------------------
// Topics.

/// Whether `id` is a valid site or device id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A parsed `citywatch/v1/{site}/{device}/{channel}` topic, borrowing from the topic string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic<'a> {
    pub site: &'a str,
    pub device: &'a str,
    pub channel: Channel,
}

impl<'a> Topic<'a> {
    /// A topic, checking both ids.
    pub fn new(site: &'a str, device: &'a str, channel: Channel) -> Result<Self, DecodeError> {
        if is_valid_id(site) && is_valid_id(device) {
            Ok(Topic { site, device, channel })
        } else {
            Err(DecodeError::BadTopic)
        }
    }

    /// Parses a topic; anything off-contract is [`DecodeError::BadTopic`].
    pub fn parse(topic: &'a str) -> Result<Self, DecodeError> {
        let rest = topic
            .strip_prefix(TOPIC_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(DecodeError::BadTopic)?;
        let mut parts = rest.split('/');
        let (Some(site), Some(device), Some(channel), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DecodeError::BadTopic);
        };
        let channel = Channel::parse(channel).ok_or(DecodeError::BadTopic)?;
        Topic::new(site, device, channel)
    }

    /// The topic as a string.
    pub fn to_topic_string(&self) -> TopicString {
        let mut out = TopicString::new();
        // Invariant: ids are at most 64 bytes each (checked in `new`/`parse`), so root (12) +
        // 2 × 64 + the longest channel (9) + 3 separators = 152 ≤ MAX_TOPIC_LEN.
        let _ = write!(out, "{}/{}/{}/{}", TOPIC_ROOT, self.site, self.device, self.channel);
        out
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", TOPIC_ROOT, self.site, self.device, self.channel)
    }
}

// ---------------------------------------------------------------------------------------------
// Messages.

/// The retained `status` message, also the Last Will (`state: offline`).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub state: LinkState,
    /// Required when `online`; may be left out of an `offline` will.
    pub kind: Option<DeviceKind>,
    pub fw: Option<String<MAX_FW_LEN>>,
    /// Telemetry interval in seconds; the gateway derives staleness from it.
    pub interval_s: Option<u32>,
}

/// Metric → value pairs of one telemetry message, at most [`MAX_VALUES`], each metric once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values(heapless::Vec<(Metric, f64), MAX_VALUES>);

impl Values {
    /// No values.
    pub const fn new() -> Self {
        Values(heapless::Vec::new())
    }

    /// Sets `metric`, replacing an earlier value; fails when full or the value is not finite.
    pub fn set(&mut self, metric: Metric, value: f64) -> Result<(), DecodeError> {
        if !value.is_finite() {
            return Err(DecodeError::NonFinite);
        }
        if let Some(slot) = self.0.iter_mut().find(|(m, _)| *m == metric) {
            slot.1 = value;
            return Ok(());
        }
        self.0.push((metric, value)).map_err(|_| DecodeError::TooManyValues)
    }

    /// The value of `metric`, if present.
    pub fn get(&self, metric: Metric) -> Option<f64> {
        self.0.iter().find(|(m, _)| *m == metric).map(|(_, v)| *v)
    }

    /// All pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, f64)> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Values {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (metric, value) in &self.0 {
            map.serialize_entry(metric.as_str(), value)?;
        }
        map.end()
    }
}

/// A periodic `telemetry` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// Per-device sequence number shared with events; wraps.
    pub seq: u32,
    /// Device clock, ms since the Unix epoch; `None` → the gateway uses receive time.
    pub ts: Option<u64>,
    pub values: Values,
    pub battery_v: Option<f64>,
    pub rssi_dbm: Option<f64>,
}

/// An `event` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u32,
    pub ts: Option<u64>,
    pub event: EventKind,
    pub metric: Option<Metric>,
    pub value: Option<f64>,
    /// The acknowledged command's id, on `cmd_ack`.
    pub id: Option<String<MAX_CMD_ID_LEN>>,
}

/// A `cmd` message from the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: String<MAX_CMD_ID_LEN>,
    pub cmd: CommandKind,
    /// `set_interval`: seconds; `silence`: seconds to stay silent; otherwise absent.
    pub arg: Option<u32>,
}

// Wire shapes. Serialisation goes through these too, so both directions share field names.

#[derive(Serialize, Deserialize)]
struct RawStatus<'a> {
    state: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fw: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interval_s: Option<u32>,
}

#[derive(Deserialize)]
struct RawTelemetry<'a> {
    seq: u32,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(borrow)]
    values: RawValues<'a>,
    #[serde(default)]
    battery_v: Option<f64>,
    #[serde(default)]
    rssi_dbm: Option<f64>,
}

/// The `values` object as read: pairs in order, with overflow noted rather than raised, so
/// "too many values" keeps its own reason (a serde error would lose it).
struct RawValues<'a> {
    pairs: heapless::Vec<(&'a str, f64), MAX_VALUES>,
    overflow: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawValues<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(core::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = RawValues<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of metric names to numbers")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = RawValues { pairs: heapless::Vec::new(), overflow: false };
                while let Some((name, value)) = map.next_entry::<&'de str, f64>()? {
                    if out.pairs.push((name, value)).is_err() {
                        out.overflow = true;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Visit(core::marker::PhantomData))
    }
}

#[derive(Serialize)]
struct TelemetryOut<'a> {
    seq: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    values: &'a Values,
    #[serde(skip_serializing_if = "Option::is_none")]
    battery_v: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rssi_dbm: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct RawEvent<'a> {
    seq: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    event: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metric: Option<&'a str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

#[derive(Serialize, Deserialize)]
struct RawCommand<'a> {
    id: &'a str,
    cmd: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arg: Option<u32>,
}

/// Parses JSON into a raw shape, classifying failures.
fn parse_json<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(DecodeError::Oversize);
    }
    if core::str::from_utf8(payload).is_err() {
        return Err(DecodeError::NotUtf8);
    }
    match serde_json_core::from_slice::<T>(payload) {
        Ok((value, _)) => Ok(value),
        Err(err) => Err(classify(err, payload)),
    }
}

fn classify(err: serde_json_core::de::Error, payload: &[u8]) -> DecodeError {
    use serde_json_core::de::Error as E;
    // JSON has no NaN or Infinity; firmware that prints them anyway gets its own reason.
    let non_finite_literal = contains(payload, b"NaN") || contains(payload, b"Infinity");
    // serde-json-core reports a non-object top level as a type error even when it is not
    // JSON at all ("hello"); a value must start with one of these bytes to be JSON.
    let start = payload.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(payload.len());
    let rest = &payload[start..];
    let starts_like_json = match rest.first() {
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9') => true,
        Some(_) => [&b"true"[..], b"false", b"null"].iter().any(|lit| rest.starts_with(lit)),
        None => false,
    };
    match err {
        _ if non_finite_literal => DecodeError::NonFinite,
        _ if !starts_like_json => DecodeError::NotJson,
        // InvalidNumber is mostly a number out of the field's range (a negative `seq`).
        E::InvalidType | E::InvalidNumber | E::CustomError => DecodeError::WrongType,
        E::EscapedStringIsTooLong => DecodeError::FieldTooLong,
        _ => DecodeError::NotJson,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn finite(value: Option<f64>) -> Result<Option<f64>, DecodeError> {
    match value {
        Some(v) if !v.is_finite() => Err(DecodeError::NonFinite),
        other => Ok(other),
    }
}

/// A free-text field (`fw`, a command `id`). JSON forbids raw control characters in strings;
/// the parser lets them by, and echoing one back would write invalid JSON (found by fuzzing).
/// The heap-free parser also hands over escape sequences (`\n`, `\u0041`, even invalid ones
/// like `\k`) undecoded, so the text would be misread and re-escaped on the way back (found by
/// fuzzing too): text with a backslash is refused as well. Contract ids and versions need none.
fn bounded<const N: usize>(text: &str) -> Result<String<N>, DecodeError> {
    if text.bytes().any(|b| b < 0x20 || b == b'\\') {
        return Err(DecodeError::NotJson);
    }
    String::try_from(text).map_err(|_| DecodeError::FieldTooLong)
}

fn encode<T: Serialize>(value: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
    serde_json_core::to_slice(value, buf).map_err(|_| EncodeError)
}

impl Status {
    /// An `online` birth message.
    pub fn online(kind: DeviceKind, fw: &str, interval_s: u32) -> Self {
        Status {
            state: LinkState::Online,
            kind: Some(kind),
            fw: String::try_from(fw).ok(),
            interval_s: Some(interval_s),
        }
    }

    /// The same device announcing `offline` (the Last Will).
    pub fn offline_of(&self) -> Self {
        Status { state: LinkState::Offline, ..self.clone() }
    }

    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let raw: RawStatus<'_> = parse_json(payload)?;
        let state = LinkState::parse(raw.state).ok_or(DecodeError::UnknownState)?;
        let kind = match raw.kind {
            Some(k) => Some(DeviceKind::parse(k).ok_or(DecodeError::UnknownKind)?),
            None if state == LinkState::Online => return Err(DecodeError::WrongType),
            None => None,
        };
        let fw = raw.fw.map(bounded).transpose()?;
        Ok(Status { state, kind, fw, interval_s: raw.interval_s })
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        encode(
            &RawStatus {
                state: self.state.as_str(),
                kind: self.kind.map(DeviceKind::as_str),
                fw: self.fw.as_deref(),
                interval_s: self.interval_s,
            },
            buf,
        )
    }
}

impl Telemetry {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let raw: RawTelemetry<'_> = parse_json(payload)?;
        if raw.values.overflow {
            return Err(DecodeError::TooManyValues);
        }
        let mut values = Values::new();
        for (name, value) in raw.values.pairs.iter() {
            let metric = Metric::parse(name).ok_or(DecodeError::UnknownMetric)?;
            if matches!(metric, Metric::BatteryV | Metric::RssiDbm) {
                // Top-level fields; inside `values` they are off-contract.
                return Err(DecodeError::UnknownMetric);
            }
            if values.get(metric).is_some() {
                return Err(DecodeError::DuplicateMetric);
            }
            values.set(metric, *value)?;
        }
        Ok(Telemetry {
            seq: raw.seq,
            ts: raw.ts,
            values,
            battery_v: finite(raw.battery_v)?,
            rssi_dbm: finite(raw.rssi_dbm)?,
        })
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        encode(
            &TelemetryOut {
                seq: self.seq,
                ts: self.ts,
                values: &self.values,
                battery_v: self.battery_v,
                rssi_dbm: self.rssi_dbm,
            },
            buf,
        )
    }
}

impl Event {
    /// An event with no metric, value or id.
    pub fn new(seq: u32, ts: Option<u64>, event: EventKind) -> Self {
        Event { seq, ts, event, metric: None, value: None, id: None }
    }

    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let raw: RawEvent<'_> = parse_json(payload)?;
        Ok(Event {
            seq: raw.seq,
            ts: raw.ts,
            event: EventKind::parse(raw.event).ok_or(DecodeError::UnknownEvent)?,
            metric: raw
                .metric
                .map(|m| Metric::parse(m).ok_or(DecodeError::UnknownMetric))
                .transpose()?,
            value: finite(raw.value)?,
            id: raw.id.map(bounded).transpose()?,
        })
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        encode(
            &RawEvent {
                seq: self.seq,
                ts: self.ts,
                event: self.event.as_str(),
                metric: self.metric.map(Metric::as_str),
                value: self.value,
                id: self.id.as_deref(),
            },
            buf,
        )
    }
}

impl Command {
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let raw: RawCommand<'_> = parse_json(payload)?;
        Ok(Command {
            id: bounded(raw.id)?,
            cmd: CommandKind::parse(raw.cmd).ok_or(DecodeError::UnknownCommand)?,
            arg: raw.arg,
        })
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        encode(&RawCommand { id: &self.id, cmd: self.cmd.as_str(), arg: self.arg }, buf)
    }
}

/// A decoded message of any device → gateway channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Uplink {
    Status(Status),
    Telemetry(Telemetry),
    Event(Event),
}

impl Uplink {
    /// Decodes a payload received on `channel`; `cmd` is not an uplink channel.
    pub fn decode(channel: Channel, payload: &[u8]) -> Result<Self, DecodeError> {
        match channel {
            Channel::Status => Status::decode(payload).map(Uplink::Status),
            Channel::Telemetry => Telemetry::decode(payload).map(Uplink::Telemetry),
            Channel::Event => Event::decode(payload).map(Uplink::Event),
            Channel::Cmd => Err(DecodeError::BadTopic),
        }
    }

    /// The channel this message travels on.
    pub fn channel(&self) -> Channel {
        match self {
            Uplink::Status(_) => Channel::Status,
            Uplink::Telemetry(_) => Channel::Telemetry,
            Uplink::Event(_) => Channel::Event,
        }
    }

    /// The message's `seq`, if its channel carries one.
    pub fn seq(&self) -> Option<u32> {
        match self {
            Uplink::Status(_) => None,
            Uplink::Telemetry(t) => Some(t.seq),
            Uplink::Event(e) => Some(e.seq),
        }
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        match self {
            Uplink::Status(m) => m.encode(buf),
            Uplink::Telemetry(m) => m.encode(buf),
            Uplink::Event(m) => m.encode(buf),
        }
    }
}

#[cfg(test)]
mod tests;
