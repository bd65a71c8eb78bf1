//! InfluxDB line protocol: readings (one line per device and time, one field per metric) and
//! incident changes. Pure functions over plain data; escaping is the line-protocol crate's.

use std::collections::HashMap;
use std::sync::Arc;

use citywatch_edge::wire::Metric;
use influxdb_line_protocol::builder::LineProtocolBuilder;

use crate::store::Reading;

/// Measurement of readings: tags `site`, `device`, `kind`; one float field per metric.
pub const READING_MEASUREMENT: &str = "reading";
/// Measurement of incident changes: tags `site`, `device`, `rule`, `severity`, `state`.
pub const INCIDENT_MEASUREMENT: &str = "incident";

/// Tags of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTags {
    pub site: String,
    pub kind: &'static str,
}

/// Appends readings as lines to `buf`; consecutive readings of one device at one time share a
/// line (one field per metric). Returns the number of lines written.
pub fn encode_readings(readings: &[Reading], tags: &mut impl FnMut(&str) -> Option<DeviceTags>, buf: &mut Vec<u8>) -> usize {
    encode_readings_cached(readings, tags, &mut PrefixCache::default(), buf)
}

/// Each device's line prefix (measurement and escaped tags), built once by the line-protocol
/// builder and reused: escaping character by character is most of the cost of a line.
#[derive(Debug, Default)]
pub struct PrefixCache(HashMap<Arc<str>, Vec<u8>>);

/// The line prefix of a device, `reading,site=…,device=…,kind=…`, escaped by the builder.
pub fn reading_prefix(device: &str, tags: Option<&DeviceTags>) -> Vec<u8> {
    let mut b = LineProtocolBuilder::new().measurement(READING_MEASUREMENT);
    if let Some(t) = tags {
        b = b.tag("site", &t.site);
    }
    b = b.tag("device", device);
    if let Some(t) = tags {
        b = b.tag("kind", t.kind);
    }
    // The builder only hands back whole lines: end one with a known field and cut it off.
    const PROBE: &str = " _=0i\n";
    let mut line = b.field("_", 0i64).close_line().build();
    line.truncate(line.len() - PROBE.len());
    line
}

/// [`encode_readings`] with prefixes cached across calls (devices with known tags only: an
/// unknown device may be registered any moment).
pub fn encode_readings_cached(readings: &[Reading], tags: &mut impl FnMut(&str) -> Option<DeviceTags>, cache: &mut PrefixCache, buf: &mut Vec<u8>) -> usize {
    use std::io::Write as _;
    let mut lines = 0;
    let mut i = 0;
    while i < readings.len() {
        let first = &readings[i];
        let mut end = i + 1;
        while end < readings.len() && readings[end].device == first.device && readings[end].ts_ms == first.ts_ms {
            end += 1;
        }
        match cache.0.get(&first.device) {
            Some(prefix) => buf.extend_from_slice(prefix),
            None => {
                let t = tags(&first.device);
                let prefix = reading_prefix(&first.device, t.as_ref());
                buf.extend_from_slice(&prefix);
                if t.is_some() {
                    cache.0.insert(Arc::clone(&first.device), prefix);
                }
            }
        }
        for (k, r) in readings[i..end].iter().enumerate() {
            buf.push(if k == 0 { b' ' } else { b',' });
            // Metric names are [a-z_]: nothing to escape in a field key. Values are finite
            // (the decode stage rejects others) and print as the builder prints an f64.
            let _ = write!(buf, "{}={}", metric_field(r.metric), r.value);
        }
        let _ = writeln!(buf, " {}", first.ts_ms);
        lines += 1;
        i = end;
    }
    lines
}

fn metric_field(m: Metric) -> &'static str {
    m.as_str()
}

/// Appends one incident change as a line: tags site/device/rule/severity/state, fields
/// `revision` (integer), `value` and `threshold` (floats, when known), `summary` (string).
/// One incident change as the `incident` measurement needs it: plain data, so the sink does not
/// depend on the incident types (the `influx` push channel fills it in).
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentLine {
    pub site: String,
    pub device: String,
    pub rule: String,
    pub severity: &'static str,
    pub state: &'static str,
    pub revision: u32,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub summary: String,
    /// The revision's time, ms since the epoch.
    pub ts_ms: i64,
}

pub fn encode_incident(i: &IncidentLine, buf: &mut Vec<u8>) {
    let b = LineProtocolBuilder::new_with(std::mem::take(buf))
        .measurement(INCIDENT_MEASUREMENT)
        .tag("site", &i.site)
        .tag("device", &i.device)
        .tag("rule", &i.rule)
        .tag("severity", i.severity)
        .tag("state", i.state);
    let mut f = b.field("revision", i.revision as i64);
    if let Some(v) = i.value.filter(|v| v.is_finite()) {
        f = f.field("value", v);
    }
    if let Some(t) = i.threshold.filter(|v| v.is_finite()) {
        f = f.field("threshold", t);
    }
    // The builder escapes quotes and backslashes; line protocol has no escape for a newline.
    let summary = i.summary.replace(['\n', '\r'], " ");
    *buf = f.field("summary", summary.as_str()).timestamp(i.ts_ms).close_line().build();
}
