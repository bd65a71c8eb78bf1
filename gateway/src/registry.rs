//! The device registry: every device the gateway has heard of, what it last said, and its
//! derived sensor health.
//!
//! Devices register themselves with their `status` birth (kind, firmware, interval); a device
//! that sends telemetry first is registered with the kind its metrics imply. The decode stage
//! updates it per message; the API reads snapshots. Health is derived on read from times and
//! flags, so nothing has to tick for a device to turn `stale` or `offline`.
//!
//! A city has 10⁵–10⁶ devices, so a [`Device`] is kept compact (shared strings, last values
//! sized to what it reports, inventory fields behind one pointer); its persisted JSON is
//! independent of that layout. Not here: rule state (the engine's) and inspections (the
//! maintenance service's).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use citywatch_edge::wire::{DeviceKind, EventKind, LinkState, Metric};
use serde::{Deserialize, Serialize};

use crate::ingest::IngestConfig;

mod values;
mod view;

pub use values::LastValues;
pub use view::DeviceView;

/// A device's health, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// In the inventory, never heard (its only condition until it first reports).
    NeverReported,
    Offline,
    Faulted,
    Stale,
    LowBattery,
    Stuck,
    /// The device's last message carried a `ts` far off the gateway's clock.
    ClockSkew,
    /// Heard, but not in the inventory (only once an inventory exists).
    NotInInventory,
    Online,
}

impl Health {
    pub const ALL: [Health; 9] = [
        Health::NeverReported,
        Health::Offline,
        Health::Faulted,
        Health::Stale,
        Health::LowBattery,
        Health::Stuck,
        Health::ClockSkew,
        Health::NotInInventory,
        Health::Online,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::NeverReported => "never_reported",
            Health::Offline => "offline",
            Health::Faulted => "faulted",
            Health::Stale => "stale",
            Health::LowBattery => "low_battery",
            Health::Stuck => "stuck",
            Health::ClockSkew => "clock_skew",
            Health::NotInInventory => "not_in_inventory",
            Health::Online => "online",
        }
    }

    pub fn parse(text: &str) -> Option<Health> {
        Health::ALL.into_iter().find(|h| h.as_str() == text)
    }
}

/// The last value of one metric and since when it has not changed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LastValue {
    pub value: f64,
    pub ts_ms: i64,
    /// Time of the first reading with exactly this value (for `stuck`).
    pub unchanged_since_ms: i64,
}

/// Everything the registry knows about one device.
///
/// Kept compact, since a city has 10⁵–10⁶ of them: ids, sites and firmware versions are shared
/// [`Arc<str>`]s (the registry interns sites and firmware, [`Registry::intern`]), the last values
/// are a [`LastValues`] sized to what the device reports, and what only the inventory knows sits
/// behind one pointer ([`Placement`]). Persisted as the same JSON as before (see `DeviceRepr`).
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: Arc<str>,
    pub site: Arc<str>,
    pub kind: DeviceKind,
    /// What the device last announced on `status` (the will says offline).
    pub link: LinkState,
    pub faulted: bool,
    pub low_battery_event: bool,
    /// Registered from the inventory and not heard yet (cleared by its first message).
    pub never_reported: bool,
    /// Whether the inventory lists it (set by the maintenance service).
    pub inventory: InventoryMark,
    pub interval_s: u32,
    pub fw: Option<Arc<str>>,
    /// Where it is and who maintains it, from the inventory (None: nothing known).
    pub placement: Option<Box<Placement>>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub last_seq: Option<u32>,
    /// Which of the [`SEQ_WINDOW`] `seq`s below `last_seq` arrived (bit k: `last_seq − 1 − k`),
    /// so that a message overtaken by a later one (an alarm on the alert lane, or another
    /// topic's order at the broker) is late, not a duplicate. Not persisted: after a restart
    /// every earlier `seq` counts as seen, as before.
    pub seq_window: u64,
    pub seq_gaps: u64,
    pub duplicates: u64,
    pub battery_v: Option<f64>,
    pub rssi_dbm: Option<f64>,
    pub values: LastValues,
    /// Messages whose `ts` was off the receive time by more than the configured skew.
    pub clock_skewed: u64,
    /// The last such offset (device `ts` − receive time, ms); None once a message is on time.
    pub clock_offset_ms: Option<i64>,
    /// The last receive time given to a skewed message, so that several arriving in one
    /// millisecond get distinct times instead of colliding on the store's (device, metric, ts) key.
    pub clock_assigned_ms: i64,
    /// When its record was last handed out to be stored ([`Registry::take_if_due`]);
    /// `i64::MIN` until then. Not itself persisted.
    pub persisted_ms: i64,
}

/// What the inventory (or a persisted record) says about where a device is and who maintains
/// it; most devices heard without an inventory have none of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    pub location: Option<String>,
    pub install_date: Option<String>,
    /// Position from the inventory: WGS-84 decimal degrees.
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    /// The crew that maintains it (from the inventory).
    pub crew: Option<String>,
    /// The crew's phone, masked (`138****5678`); the full number stays in the inventory.
    pub phone: Option<String>,
}

impl Placement {
    fn is_empty(&self) -> bool {
        *self == Placement::default()
    }
}

/// The persisted (and API-independent) JSON form of a [`Device`], field for field as it was
/// before the device went compact, so records written by either version load in the other.
#[derive(Serialize, Deserialize)]
struct DeviceRepr<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    site: std::borrow::Cow<'a, str>,
    kind: DeviceKind,
    #[serde(borrow)]
    fw: Option<std::borrow::Cow<'a, str>>,
    interval_s: u32,
    #[serde(borrow)]
    location: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    install_date: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    lat: Option<f64>,
    #[serde(default)]
    lon: Option<f64>,
    #[serde(default, borrow)]
    crew: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    phone: Option<std::borrow::Cow<'a, str>>,
    link: LinkState,
    first_seen_ms: i64,
    last_seen_ms: i64,
    last_seq: Option<u32>,
    seq_gaps: u64,
    duplicates: u64,
    battery_v: Option<f64>,
    rssi_dbm: Option<f64>,
    faulted: bool,
    low_battery_event: bool,
    values: std::borrow::Cow<'a, LastValues>,
    #[serde(default)]
    clock_skewed: u64,
    #[serde(default)]
    clock_offset_ms: Option<i64>,
    #[serde(default)]
    clock_assigned_ms: i64,
    #[serde(default)]
    never_reported: bool,
    #[serde(default)]
    inventory: InventoryMark,
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use std::borrow::Cow::Borrowed;
        let p = self.placement.as_deref();
        let text = |f: fn(&Placement) -> &Option<String>| p.and_then(|p| f(p).as_deref()).map(Borrowed);
        DeviceRepr {
            id: Borrowed(&self.id),
            site: Borrowed(&self.site),
            kind: self.kind,
            fw: self.fw.as_deref().map(Borrowed),
            interval_s: self.interval_s,
            location: text(|p| &p.location),
            install_date: text(|p| &p.install_date),
            lat: p.and_then(|p| p.lat),
            lon: p.and_then(|p| p.lon),
            crew: text(|p| &p.crew),
            phone: text(|p| &p.phone),
            link: self.link,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            last_seq: self.last_seq,
            seq_gaps: self.seq_gaps,
            duplicates: self.duplicates,
            battery_v: self.battery_v,
            rssi_dbm: self.rssi_dbm,
            faulted: self.faulted,
            low_battery_event: self.low_battery_event,
            values: std::borrow::Cow::Borrowed(&self.values),
            clock_skewed: self.clock_skewed,
            clock_offset_ms: self.clock_offset_ms,
            clock_assigned_ms: self.clock_assigned_ms,
            never_reported: self.never_reported,
            inventory: self.inventory,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = DeviceRepr::deserialize(d)?;
        let owned = |t: Option<std::borrow::Cow<'_, str>>| t.map(|t| t.into_owned());
        let placement = Placement {
            location: owned(r.location),
            install_date: owned(r.install_date),
            lat: r.lat,
            lon: r.lon,
            crew: owned(r.crew),
            phone: owned(r.phone),
        };
        Ok(Device {
            id: Arc::from(&*r.id),
            site: Arc::from(&*r.site),
            kind: r.kind,
            link: r.link,
            faulted: r.faulted,
            low_battery_event: r.low_battery_event,
            never_reported: r.never_reported,
            inventory: r.inventory,
            interval_s: r.interval_s,
            fw: r.fw.map(|f| Arc::from(&*f)),
            placement: (!placement.is_empty()).then(|| Box::new(placement)),
            first_seen_ms: r.first_seen_ms,
            last_seen_ms: r.last_seen_ms,
            last_seq: r.last_seq,
            seq_window: u64::MAX,
            seq_gaps: r.seq_gaps,
            duplicates: r.duplicates,
            battery_v: r.battery_v,
            rssi_dbm: r.rssi_dbm,
            values: r.values.into_owned(),
            clock_skewed: r.clock_skewed,
            clock_offset_ms: r.clock_offset_ms,
            clock_assigned_ms: r.clock_assigned_ms,
            persisted_ms: i64::MIN,
        })
    }
}

/// A device's place in the inventory, as the maintenance service last marked it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventoryMark {
    /// No inventory yet (or not checked yet).
    #[default]
    Unknown,
    Listed,
    /// An inventory exists and does not list it.
    Missing,
}

/// What the registry keeps about a device, persisted so it survives restarts: the columns the
/// store indexes, and the whole [`Device`] as JSON. A view of [`Device`] ([`Device::to_record`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub site: String,
    pub kind: DeviceKind,
    pub fw: Option<String>,
    pub interval_s: u32,
    pub location: Option<String>,
    pub install_date: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Whatever else the registry wants to survive a restart (last values, health inputs).
    pub state_json: String,
}

/// What the decode stage learnt from a `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// New: process it. `gap` messages were skipped before it.
    Fresh { gap: u32 },
    /// Already seen: drop it.
    Duplicate,
}

/// How far behind the last `seq` a message still counts as a duplicate; further back means
/// the device restarted its counter (a reboot), and the message is fresh.
pub const DUPLICATE_WINDOW: u32 = 1024;

/// How far behind the last `seq` a message may arrive late and still be taken (and not dropped
/// as a duplicate): one bit per `seq` in [`Device::seq_window`].
pub const SEQ_WINDOW: u32 = 64;

impl Device {
    pub fn new(id: &str, site: &str, kind: DeviceKind, now_ms: i64) -> Self {
        Device {
            id: Arc::from(id),
            site: Arc::from(site),
            kind,
            link: LinkState::Online,
            faulted: false,
            low_battery_event: false,
            never_reported: false,
            inventory: InventoryMark::Unknown,
            interval_s: 60,
            fw: None,
            placement: None,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_seq: None,
            seq_window: 0,
            seq_gaps: 0,
            duplicates: 0,
            battery_v: None,
            rssi_dbm: None,
            values: LastValues::default(),
            clock_skewed: 0,
            clock_offset_ms: None,
            clock_assigned_ms: 0,
            persisted_ms: i64::MIN,
        }
    }

    /// A device known only from the inventory: listed, never heard.
    pub fn from_inventory(id: &str, site: &str, kind: DeviceKind, now_ms: i64) -> Self {
        let mut d = Device::new(id, site, kind, now_ms);
        d.never_reported = true;
        d.inventory = InventoryMark::Listed;
        d
    }

    /// Where it is and who maintains it (empty when nothing is known).
    pub fn placement(&self) -> &Placement {
        static NONE: Placement =
            Placement { location: None, install_date: None, lat: None, lon: None, crew: None, phone: None };
        self.placement.as_deref().unwrap_or(&NONE)
    }

    /// The placement to change (created empty when there is none).
    pub fn placement_mut(&mut self) -> &mut Placement {
        self.placement.get_or_insert_with(Default::default)
    }

    /// Classifies `seq` and advances the device's counter. A `seq` up to [`SEQ_WINDOW`] behind
    /// the last one that has not arrived yet is late, not a duplicate: it is fresh and fills
    /// the gap counted when it was overtaken.
    pub fn check_seq(&mut self, seq: u32) -> SeqCheck {
        let Some(last) = self.last_seq else {
            // What came before the first message heard is not waited for.
            self.last_seq = Some(seq);
            self.seq_window = u64::MAX;
            return SeqCheck::Fresh { gap: 0 };
        };
        let behind = last.wrapping_sub(seq);
        if behind < DUPLICATE_WINDOW {
            let bit = (1..=SEQ_WINDOW).contains(&behind).then(|| 1u64 << (behind - 1));
            if let Some(bit) = bit.filter(|bit| self.seq_window & bit == 0) {
                self.seq_window |= bit;
                self.seq_gaps = self.seq_gaps.saturating_sub(1);
                return SeqCheck::Fresh { gap: 0 };
            }
            self.duplicates += 1;
            return SeqCheck::Duplicate;
        }
        let ahead = seq.wrapping_sub(last);
        self.last_seq = Some(seq);
        if ahead < u32::MAX / 2 {
            // The old last moves to bit `ahead − 1`; the ones between have not arrived.
            self.seq_window = if ahead > SEQ_WINDOW { 0 } else { self.seq_window.checked_shl(ahead).unwrap_or(0) | 1 << (ahead - 1) };
            let gap = ahead - 1;
            self.seq_gaps += u64::from(gap);
            SeqCheck::Fresh { gap }
        } else {
            // Far behind: the device rebooted and counts from zero again.
            self.seq_window = u64::MAX;
            SeqCheck::Fresh { gap: 0 }
        }
    }

    /// Records a reading of `metric`.
    pub fn observe(&mut self, metric: Metric, value: f64, ts_ms: i64) {
        match metric {
            Metric::BatteryV => self.battery_v = Some(value),
            Metric::RssiDbm => self.rssi_dbm = Some(value),
            _ => {}
        }
        let entry = self.values.entry(metric, || LastValue { value, ts_ms, unchanged_since_ms: ts_ms });
        if ts_ms < entry.ts_ms {
            return; // a replayed reading does not overwrite a newer one
        }
        if entry.value != value {
            entry.unchanged_since_ms = ts_ms;
        }
        entry.value = value;
        entry.ts_ms = ts_ms;
    }

    /// Records an event's effect on health.
    pub fn on_event(&mut self, event: EventKind) {
        match event {
            EventKind::Fault | EventKind::SelfTestFailed => self.faulted = true,
            EventKind::FaultCleared | EventKind::SelfTestOk => self.faulted = false,
            EventKind::LowBattery => self.low_battery_event = true,
            _ => {}
        }
    }

    /// Milliseconds of silence after which the device is offline: max(n × interval, minimum).
    pub fn offline_after_ms(&self, cfg: &IngestConfig) -> i64 {
        (i64::from(self.interval_s) * 1000 * i64::from(cfg.offline_after_intervals)).max(cfg.offline_min.as_ms())
    }

    /// Every health condition that holds at `now_ms`, worst first; `[Online]` when none.
    pub fn health_flags(&self, now_ms: i64, cfg: &IngestConfig) -> Vec<Health> {
        if self.never_reported {
            return vec![Health::NeverReported];
        }
        let silent = now_ms - self.last_seen_ms;
        let mut flags = Vec::new();
        if self.link == LinkState::Offline || silent > self.offline_after_ms(cfg) {
            flags.push(Health::Offline);
        }
        if self.faulted {
            flags.push(Health::Faulted);
        }
        if silent > i64::from(self.interval_s) * 1000 * i64::from(cfg.stale_after_intervals) && !flags.contains(&Health::Offline) {
            flags.push(Health::Stale);
        }
        if self.low_battery_event || self.battery_v.is_some_and(|v| v < cfg.battery_floor_v) {
            flags.push(Health::LowBattery);
        }
        let stuck_ms = cfg.stuck_after.as_ms();
        let stuck = self.values.iter().any(|(m, v)| {
            m.is_analog() && !matches!(m, Metric::BatteryV | Metric::RssiDbm) && v.ts_ms - v.unchanged_since_ms >= stuck_ms
        });
        if stuck {
            flags.push(Health::Stuck);
        }
        if self.clock_offset_ms.is_some() {
            flags.push(Health::ClockSkew);
        }
        if self.inventory == InventoryMark::Missing {
            flags.push(Health::NotInInventory);
        }
        if flags.is_empty() {
            flags.push(Health::Online);
        }
        flags
    }

    /// The worst health condition.
    pub fn health(&self, now_ms: i64, cfg: &IngestConfig) -> Health {
        self.health_flags(now_ms, cfg)[0]
    }

    /// The persistent form.
    pub fn to_record(&self) -> DeviceRecord {
        DeviceRecord {
            id: self.id.to_string(),
            site: self.site.to_string(),
            kind: self.kind,
            fw: self.fw.as_deref().map(str::to_owned),
            interval_s: self.interval_s,
            location: self.placement().location.clone(),
            install_date: self.placement().install_date.clone(),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            state_json: serde_json::to_string(self).unwrap_or_default(),
        }
    }

    /// Back from the persistent form (falls back to the columns when the state blob is unreadable).
    pub fn from_record(record: &DeviceRecord) -> Device {
        serde_json::from_str(&record.state_json).unwrap_or_else(|_| {
            let mut d = Device::new(&record.id, &record.site, record.kind, record.first_seen_ms);
            d.fw = record.fw.as_deref().map(Arc::from);
            d.interval_s = record.interval_s;
            if record.location.is_some() || record.install_date.is_some() {
                let p = d.placement_mut();
                p.location = record.location.clone();
                p.install_date = record.install_date.clone();
            }
            d.last_seen_ms = record.last_seen_ms;
            d
        })
    }
}

/// The kind a device's metrics imply, for devices heard before their birth.
pub fn infer_kind(metrics: impl IntoIterator<Item = Metric>) -> Option<DeviceKind> {
    metrics.into_iter().find_map(|m| match m {
        Metric::GasLel | Metric::ValveClosed => Some(DeviceKind::GasDetector),
        Metric::SmokeDbM | Metric::CoPpm => Some(DeviceKind::SmokeDetector),
        Metric::TiltDeg | Metric::VibrationMg | Metric::CorrosionUm | Metric::SectionLossPct => Some(DeviceKind::SirenMount),
        _ => None,
    })
}

/// All devices, shared between the decode stage (writer) and the API (readers).
///
/// Each device is boxed: the map's table then holds a key and a pointer per slot (24 bytes)
/// instead of a whole device, which matters because a hash table keeps up to twice the slots
/// it uses. The key is the device's own `id` (one allocation per id).
#[derive(Debug, Default)]
pub struct Registry {
    devices: RwLock<HashMap<Arc<str>, Box<Device>>>,
    /// Every id in order, for the API's pages (a page is a range here, not a sort of all
    /// devices). Changed only when a device is added; lock order: `devices`, then `order`.
    order: RwLock<BTreeSet<Arc<str>>>,
    /// Sites and firmware versions, one copy each however many devices share them. Grows with
    /// distinct values only (sites, firmware releases); lock order: after `devices`.
    strings: Mutex<HashSet<Arc<str>>>,
}

/// One page of devices in id order: the ones matching after a cursor, and the id to continue after.
#[derive(Debug, Default)]
pub struct DevicePage {
    pub devices: Vec<Device>,
    /// The last id of this page when more matching devices follow.
    pub next_after: Option<String>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Loads persisted devices (at startup).
    pub fn load(&self, records: impl IntoIterator<Item = DeviceRecord>) {
        if let (Ok(mut map), Ok(mut order)) = (self.devices.write(), self.order.write()) {
            for r in records {
                let device = self.shared(Device::from_record(&r));
                order.insert(Arc::clone(&device.id));
                map.insert(Arc::clone(&device.id), device);
            }
        }
    }

    /// The one shared copy of `text` (a site or a firmware version).
    pub fn intern(&self, text: &str) -> Arc<str> {
        let mut strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = strings.get(text) {
            return Arc::clone(s);
        }
        let s: Arc<str> = Arc::from(text);
        strings.insert(Arc::clone(&s));
        s
    }

    fn intern_arc(&self, text: &Arc<str>) -> Arc<str> {
        let mut strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
        match strings.get(text) {
            Some(s) => Arc::clone(s),
            None => {
                strings.insert(Arc::clone(text));
                Arc::clone(text)
            }
        }
    }

    /// A device about to be stored, with its site and firmware the shared copies.
    fn shared(&self, mut device: Device) -> Box<Device> {
        device.site = self.intern_arc(&device.site);
        if let Some(fw) = &device.fw {
            device.fw = Some(self.intern_arc(fw));
        }
        Box::new(device)
    }

    /// Whether the device is known.
    pub fn contains(&self, id: &str) -> bool {
        self.devices.read().is_ok_and(|m| m.contains_key(id))
    }

    /// Whether a known device belongs to `site`; `None` when the device is unknown.
    pub fn site_matches(&self, id: &str, site: &str) -> Option<bool> {
        self.devices.read().ok()?.get(id).map(|d| &*d.site == site)
    }

    /// Runs `f` on the device and its shared id, creating the device with `make` when unknown.
    /// Returns the shared id too.
    pub fn upsert<T>(&self, id: &str, make: impl FnOnce() -> Device, f: impl FnOnce(&Arc<str>, &mut Device) -> T) -> Option<(Arc<str>, T)> {
        let mut map = self.devices.write().ok()?;
        let key = match map.get_key_value(id) {
            Some((key, _)) => Arc::clone(key),
            None => {
                let mut device = make();
                if &*device.id != id {
                    device.id = Arc::from(id);
                }
                let device = self.shared(device);
                let key = Arc::clone(&device.id);
                map.insert(Arc::clone(&key), device);
                if let Ok(mut order) = self.order.write() {
                    order.insert(Arc::clone(&key));
                }
                key
            }
        };
        let device = map.get_mut(&key)?;
        let out = f(&key, device);
        Some((key, out))
    }

    /// A copy of the device when its record is due to be stored: always with `force`, else when
    /// its record was last taken `every_ms` or longer before `now_ms` (or never). Taking it
    /// restarts the count.
    pub fn take_if_due(&self, id: &str, now_ms: i64, every_ms: i64, force: bool) -> Option<Device> {
        let mut map = self.devices.write().ok()?;
        let d = map.get_mut(id)?;
        if !force && now_ms.saturating_sub(d.persisted_ms) < every_ms {
            return None;
        }
        d.persisted_ms = now_ms;
        Some(Device::clone(d))
    }

    /// Visits every device under the read lock, without copying.
    pub fn for_each(&self, f: impl FnMut(&Device)) {
        if let Ok(map) = self.devices.read() {
            map.values().map(|d| &**d).for_each(f);
        }
    }

    /// Visits every device under the write lock (the maintenance service's inventory marks).
    pub fn for_each_mut(&self, f: impl FnMut(&mut Device)) {
        if let Ok(mut map) = self.devices.write() {
            map.values_mut().map(|d| &mut **d).for_each(f);
        }
    }

    /// Whether a known device has reported; `None` when the device is unknown.
    pub fn has_reported(&self, id: &str) -> Option<bool> {
        self.devices.read().ok()?.get(id).map(|d| !d.never_reported)
    }

    /// A copy of one device.
    pub fn get(&self, id: &str) -> Option<Device> {
        self.devices.read().ok()?.get(id).map(|d| Device::clone(d))
    }

    /// Copies of all devices matching `keep`, sorted by id.
    pub fn list(&self, mut keep: impl FnMut(&Device) -> bool) -> Vec<Device> {
        let Ok(map) = self.devices.read() else { return Vec::new() };
        let mut out: Vec<Device> = map.values().filter(|d| keep(d)).map(|d| Device::clone(d)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Up to `limit` devices matching `keep` with ids after `after`, in id order: a range of
    /// the id index, so an unfiltered page costs O(log n + limit) whatever the fleet's size.
    pub fn page(&self, after: Option<&str>, limit: usize, mut keep: impl FnMut(&Device) -> bool) -> DevicePage {
        let (Ok(map), Ok(order)) = (self.devices.read(), self.order.read()) else { return DevicePage::default() };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = DevicePage::default();
        for id in order.range::<str, _>((start, Bound::Unbounded)) {
            let Some(d) = map.get(id) else { continue };
            if !keep(d) {
                continue;
            }
            if page.devices.len() == limit {
                page.next_after = page.devices.last().map(|d| d.id.to_string());
                break;
            }
            page.devices.push(Device::clone(d));
        }
        page
    }

    pub fn len(&self) -> usize {
        self.devices.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The registry's gauges for `/metrics` (devices, and devices by their worst health), derived
/// at every scrape as the API derives health on read.
#[derive(Debug)]
pub struct HealthMetrics {
    pub registry: Arc<Registry>,
    pub ingest: IngestConfig,
}

impl prometheus_client::collector::Collector for HealthMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let now = crate::ingest::now_ms();
        let mut by_health: BTreeMap<Health, u64> = BTreeMap::new();
        self.registry.for_each(|d| *by_health.entry(d.health(now, &self.ingest)).or_default() += 1);
        crate::metrics::gauge(&mut encoder, "citywatch_devices", "Devices in the registry.", self.registry.len() as u64)?;
        let series = Health::ALL.iter().map(|h| ([("health", h.as_str())], by_health.get(h).copied().unwrap_or(0)));
        crate::metrics::gauge_family(&mut encoder, "citywatch_devices_by_health", "Devices by their worst health condition.", series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> IngestConfig {
        IngestConfig::default()
    }

    #[test]
    fn seq_detects_duplicates_gaps_and_reboots() {
        let mut d = Device::new("d", "s", DeviceKind::GasDetector, 0);
        assert_eq!(d.check_seq(10), SeqCheck::Fresh { gap: 0 });
        assert_eq!(d.check_seq(11), SeqCheck::Fresh { gap: 0 });
        assert_eq!(d.check_seq(11), SeqCheck::Duplicate);
        assert_eq!(d.check_seq(5), SeqCheck::Duplicate);
        assert_eq!(d.check_seq(15), SeqCheck::Fresh { gap: 3 });
        assert_eq!(d.seq_gaps, 3);
        assert_eq!(d.duplicates, 2);
        // wraps
        d.last_seq = Some(u32::MAX);
        assert_eq!(d.check_seq(0), SeqCheck::Fresh { gap: 0 });
        // reboot: far behind
        d.last_seq = Some(50_000);
        d.seq_window = u64::MAX;
        assert_eq!(d.check_seq(0), SeqCheck::Fresh { gap: 0 });
        assert_eq!(d.last_seq, Some(0));
    }

    #[test]
    fn a_message_overtaken_by_a_later_one_is_late_not_a_duplicate() {
        let mut d = Device::new("d", "s", DeviceKind::GasDetector, 0);
        assert_eq!(d.check_seq(40), SeqCheck::Fresh { gap: 0 });
        // The alarm (43) overtakes telemetry 41 and 42 on the alert lane.
        assert_eq!(d.check_seq(43), SeqCheck::Fresh { gap: 2 });
        assert_eq!(d.seq_gaps, 2);
        assert_eq!(d.check_seq(41), SeqCheck::Fresh { gap: 0 });
        assert_eq!(d.check_seq(42), SeqCheck::Fresh { gap: 0 });
        assert_eq!(d.seq_gaps, 0, "the late ones filled the gap");
        // Seen once each: now duplicates.
        for seq in [40, 41, 42, 43] {
            assert_eq!(d.check_seq(seq), SeqCheck::Duplicate, "seq {seq}");
        }
        assert_eq!(d.duplicates, 4);
        // A jump past the window forgets what came before it.
        assert_eq!(d.check_seq(43 + 100), SeqCheck::Fresh { gap: 99 });
        assert_eq!(d.check_seq(43 + 100 - 64), SeqCheck::Fresh { gap: 0 }, "64 behind: still in the window");
        assert_eq!(d.check_seq(43 + 100 - 65), SeqCheck::Duplicate, "65 behind: too old to tell");
        // A record loaded after a restart knows no window: everything behind is a duplicate.
        let mut loaded = Device::from_record(&d.to_record());
        assert_eq!(loaded.check_seq(43 + 100 - 2), SeqCheck::Duplicate);
    }

    #[test]
    fn health_follows_time_and_flags() {
        let c = cfg();
        let mut d = Device::new("d", "s", DeviceKind::SmokeDetector, 0);
        d.interval_s = 10;
        d.last_seen_ms = 1_000_000;
        assert_eq!(d.health(1_000_000 + 5_000, &c), Health::Online);
        assert_eq!(d.health(1_000_000 + 31_000, &c), Health::Stale);
        assert_eq!(d.health(1_000_000 + 91_000, &c), Health::Offline, "max(3 × 10 s, 90 s)");
        d.battery_v = Some(2.5);
        assert_eq!(d.health_flags(1_000_000, &c), vec![Health::LowBattery]);
        d.on_event(EventKind::Fault);
        assert_eq!(d.health(1_000_000, &c), Health::Faulted);
        d.on_event(EventKind::FaultCleared);
        d.link = LinkState::Offline;
        assert_eq!(d.health(1_000_000, &c), Health::Offline);
    }

    #[test]
    fn stuck_needs_a_day_without_change_on_an_analog_metric() {
        let c = cfg();
        let mut d = Device::new("d", "s", DeviceKind::SmokeDetector, 0);
        d.interval_s = 60;
        let day = 86_400_000;
        d.observe(Metric::SmokeDbM, 0.01, 0);
        d.observe(Metric::SmokeDbM, 0.01, day);
        d.last_seen_ms = day;
        assert!(d.health_flags(day, &c).contains(&Health::Stuck));
        d.observe(Metric::SmokeDbM, 0.02, day + 1);
        assert!(!d.health_flags(day + 1, &c).contains(&Health::Stuck));
        // valve position never "sticks"
        let mut g = Device::new("g", "s", DeviceKind::GasDetector, 0);
        g.observe(Metric::ValveClosed, 0.0, 0);
        g.observe(Metric::ValveClosed, 0.0, 2 * day);
        g.last_seen_ms = 2 * day;
        assert!(!g.health_flags(2 * day, &c).contains(&Health::Stuck));
    }

    #[test]
    fn a_replayed_reading_does_not_overwrite_a_newer_one() {
        let mut d = Device::new("d", "s", DeviceKind::GasDetector, 0);
        d.observe(Metric::GasLel, 5.0, 2_000);
        d.observe(Metric::GasLel, 1.0, 1_000);
        assert_eq!(d.values[&Metric::GasLel].value, 5.0);
    }

    #[test]
    fn inventory_devices_are_never_reported_until_heard_and_strangers_not_in_inventory() {
        let c = cfg();
        let mut d = Device::from_inventory("d", "s", DeviceKind::GasDetector, 0);
        assert_eq!(d.health_flags(10 * 86_400_000, &c), vec![Health::NeverReported], "not offline: never heard");
        d.never_reported = false;
        d.last_seen_ms = 1_000;
        assert_eq!(d.health(2_000, &c), Health::Online);
        d.inventory = InventoryMark::Missing;
        assert_eq!(d.health_flags(2_000, &c), vec![Health::NotInInventory]);
        assert_eq!(Health::parse("never_reported"), Some(Health::NeverReported));
        assert_eq!(Health::parse("not_in_inventory"), Some(Health::NotInInventory));
        // Records persisted before these fields load as heard and unmarked.
        let old = r#"{"id":"o","site":"s","kind":"gas_detector","fw":null,"interval_s":60,"location":null,"install_date":null,"link":"online","first_seen_ms":0,"last_seen_ms":0,"last_seq":null,"seq_gaps":0,"duplicates":0,"battery_v":null,"rssi_dbm":null,"faulted":false,"low_battery_event":false,"values":{}}"#;
        let o: Device = serde_json::from_str(old).expect("old record");
        assert!(!o.never_reported);
        assert_eq!(o.inventory, InventoryMark::Unknown);
    }

    #[test]
    fn records_round_trip_and_registry_loads_them() {
        let mut d = Device::new("d-1", "s", DeviceKind::SirenMount, 5);
        d.observe(Metric::TiltDeg, 0.1, 10);
        d.last_seq = Some(9);
        // Not persisted: a loaded device counts every earlier seq as seen.
        d.seq_window = u64::MAX;
        let reg = Registry::new();
        reg.load([d.to_record()]);
        assert_eq!(reg.get("d-1"), Some(d));
        assert_eq!(infer_kind([Metric::BatteryV, Metric::CoPpm]), Some(DeviceKind::SmokeDetector));
    }
}
