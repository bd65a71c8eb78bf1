//! The API's view of a device, derived from the one device model ([`Device`]): health worked
//! out at the time of the request, times as RFC 3339. The persistent form is the other view
//! ([`super::DeviceRecord`]).

use std::collections::BTreeMap;

use citywatch_edge::wire::{DeviceKind, LinkState, Metric};
use serde::Serialize;
use serde_json::{json, Value};

use super::{Device, Health};
use crate::ingest::IngestConfig;

/// A device as the API shows it.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub site: String,
    pub kind: DeviceKind,
    pub fw: Option<String>,
    pub interval_s: u32,
    pub location: Option<String>,
    pub install_date: Option<String>,
    /// From the inventory's `lat`/`lon`: WGS-84 decimal degrees (absent when not given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crew: Option<String>,
    /// Always masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    pub health: Health,
    pub health_flags: Vec<Health>,
    pub link: LinkState,
    pub first_seen: String,
    pub last_seen: String,
    pub battery_v: Option<f64>,
    pub rssi_dbm: Option<f64>,
    pub last_seq: Option<u32>,
    pub seq_gaps: u64,
    pub duplicates: u64,
    pub values: BTreeMap<Metric, Value>,
    /// Messages whose `ts` was far off the gateway's clock, and the last such offset (ms,
    /// device − gateway; null once the device's clock is right again).
    pub clock_skewed: u64,
    pub clock_offset_ms: Option<i64>,
}

impl Device {
    /// The device as the API shows it at `now`: health derived, times in RFC 3339.
    pub fn view(&self, now: i64, cfg: &IngestConfig) -> DeviceView {
        let d = self;
        let p = d.placement();
        let flags = d.health_flags(now, cfg);
        DeviceView {
            id: d.id.to_string(),
            site: d.site.to_string(),
            kind: d.kind,
            fw: d.fw.as_deref().map(str::to_owned),
            interval_s: d.interval_s,
            location: p.location.clone(),
            install_date: p.install_date.clone(),
            lat: p.lat,
            lon: p.lon,
            crew: p.crew.clone(),
            phone: p.phone.clone(),
            health: flags[0],
            health_flags: flags,
            link: d.link,
            first_seen: rfc3339(d.first_seen_ms),
            last_seen: rfc3339(d.last_seen_ms),
            battery_v: d.battery_v,
            rssi_dbm: d.rssi_dbm,
            last_seq: d.last_seq,
            seq_gaps: d.seq_gaps,
            duplicates: d.duplicates,
            values: d
                .values
                .iter()
                .map(|(m, v)| (m, json!({ "value": v.value, "ts": rfc3339(v.ts_ms), "unchanged_since": rfc3339(v.unchanged_since_ms) })))
                .collect(),
            clock_skewed: d.clock_skewed,
            clock_offset_ms: d.clock_offset_ms,
        }
    }
}


/// RFC 3339 in UTC with milliseconds, the API's one time format (as `incidents::model::rfc3339`;
/// kept local so the registry depends on no stage).
fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| format!("{t:.3}")).unwrap_or_else(|_| ms.to_string())
}
