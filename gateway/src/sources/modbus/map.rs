//! Register maps: how one device model lays out its values and status bits in Modbus
//! registers, loaded from TOML (examples in `gateway/modbus/`), and how raw registers become
//! contract values. Pure and synchronous; the poller does the I/O.

use std::collections::BTreeMap;
use std::path::Path;

use citywatch_edge::wire::{DeviceKind, EventKind, Metric};
use serde::Deserialize;

/// Most registers one read request may ask for (Modbus limit for function codes 3 and 4).
pub const MAX_READ: u16 = 125;
/// Unused registers a single read may span to save a round trip.
const MERGE_GAP: u16 = 8;

/// A map error, naming the entry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read register map {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("register map {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Which register table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// Function code 4, read-only measurements.
    Input,
    /// Function code 3, read/write.
    Holding,
}

/// How a value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// One bit of a register (`bit`), 0 or 1.
    Bit,
}

impl ValueType {
    fn registers(self) -> u16 {
        match self {
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            _ => 1,
        }
    }
}

/// Order of the two registers of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The register at `address` holds the high word ("ABCD", Modbus convention).
    #[default]
    HighFirst,
    /// The register at `address` holds the low word ("CDAB", common in PLCs).
    LowFirst,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    model: String,
    kind: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    channel_stride: u16,
    #[serde(default)]
    value: Vec<RawValue>,
    #[serde(default)]
    flag: Vec<RawFlag>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValue {
    metric: String,
    table: Table,
    address: u16,
    #[serde(rename = "type", default = "default_type")]
    value_type: ValueType,
    #[serde(default)]
    word_order: WordOrder,
    #[serde(default)]
    bit: u8,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    offset: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlag {
    table: Table,
    address: u16,
    bit: u8,
    on_set: String,
    on_clear: Option<String>,
    metric: Option<String>,
}

fn default_type() -> ValueType {
    ValueType::U16
}

fn one() -> f64 {
    1.0
}

/// One value: `raw × scale + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueSpec {
    pub metric: Metric,
    pub table: Table,
    pub address: u16,
    pub value_type: ValueType,
    pub word_order: WordOrder,
    pub bit: u8,
    pub scale: f64,
    pub offset: f64,
}

/// A status bit that raises an event when it sets (and another when it clears).
#[derive(Debug, Clone, PartialEq)]
pub struct FlagSpec {
    pub table: Table,
    pub address: u16,
    pub bit: u8,
    pub on_set: EventKind,
    pub on_clear: Option<EventKind>,
    /// The metric the event is about; its current value rides along.
    pub metric: Option<Metric>,
}

/// A device model's register map.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterMap {
    pub model: String,
    pub kind: DeviceKind,
    pub description: String,
    /// Registers of channel `n` are at `address + n × channel_stride` (multi-detector controllers).
    pub channel_stride: u16,
    pub values: Vec<ValueSpec>,
    pub flags: Vec<FlagSpec>,
}

/// One read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSpan {
    pub table: Table,
    pub start: u16,
    pub count: u16,
}

/// Register contents read in one poll, by (table, address).
pub type Registers = BTreeMap<(Table, u16), u16>;

impl RegisterMap {
    pub fn load(path: &Path) -> Result<RegisterMap, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.display().to_string(), source })?;
        RegisterMap::parse(&text).map_err(|reason| Error::Invalid { path: path.display().to_string(), reason })
    }

    /// Parses and checks a map; the error names the entry.
    pub fn parse(text: &str) -> Result<RegisterMap, String> {
        let raw: RawMap = toml::from_str(text).map_err(|e| e.to_string())?;
        let kind = DeviceKind::parse(&raw.kind).ok_or_else(|| format!("kind: {:?} is not a device kind", raw.kind))?;
        let metric = |key: String, name: &str| -> Result<Metric, String> {
            let m = Metric::parse(name).ok_or_else(|| format!("{key}: {name:?} is not a metric"))?;
            if !(kind.has_metric(m) || matches!(m, Metric::BatteryV | Metric::RssiDbm)) {
                return Err(format!("{key}: {name:?} is not a metric of {}", kind.as_str()));
            }
            Ok(m)
        };
        let mut values = Vec::new();
        for (i, v) in raw.value.into_iter().enumerate() {
            let key = format!("value[{i}]");
            if !(v.scale.is_finite() && v.offset.is_finite()) {
                return Err(format!("{key}: scale and offset must be finite"));
            }
            if v.bit > 15 {
                return Err(format!("{key}.bit: must be 0..=15"));
            }
            if values.iter().any(|s: &ValueSpec| s.metric.as_str() == v.metric) {
                return Err(format!("{key}.metric: {:?} appears twice", v.metric));
            }
            values.push(ValueSpec {
                metric: metric(format!("{key}.metric"), &v.metric)?,
                table: v.table,
                address: v.address,
                value_type: v.value_type,
                word_order: v.word_order,
                bit: v.bit,
                scale: v.scale,
                offset: v.offset,
            });
        }
        if values.iter().filter(|v| !matches!(v.metric, Metric::BatteryV | Metric::RssiDbm)).count() > citywatch_edge::wire::MAX_VALUES {
            return Err(format!("value: at most {} metrics per device", citywatch_edge::wire::MAX_VALUES));
        }
        let event = |key: String, name: &str| EventKind::parse(name).ok_or_else(|| format!("{key}: {name:?} is not an event"));
        let mut flags = Vec::new();
        for (i, f) in raw.flag.into_iter().enumerate() {
            let key = format!("flag[{i}]");
            if f.bit > 15 {
                return Err(format!("{key}.bit: must be 0..=15"));
            }
            flags.push(FlagSpec {
                table: f.table,
                address: f.address,
                bit: f.bit,
                on_set: event(format!("{key}.on_set"), &f.on_set)?,
                on_clear: f.on_clear.as_deref().map(|e| event(format!("{key}.on_clear"), e)).transpose()?,
                metric: f.metric.as_deref().map(|m| metric(format!("{key}.metric"), m)).transpose()?,
            });
        }
        if values.is_empty() && flags.is_empty() {
            return Err("the map has no value and no flag".into());
        }
        Ok(RegisterMap { model: raw.model, kind, description: raw.description, channel_stride: raw.channel_stride, values, flags })
    }

    /// The read requests covering every register of `channel`, merged into as few as the
    /// Modbus limits allow.
    pub fn plan(&self, channel: u16) -> Result<Vec<ReadSpan>, String> {
        let base = channel.checked_mul(self.channel_stride).ok_or("channel × channel_stride overflows the address space")?;
        let mut wanted: BTreeMap<Table, Vec<(u16, u16)>> = BTreeMap::new();
        let mut add = |table, address: u16, count: u16| -> Result<(), String> {
            let start = address.checked_add(base).ok_or("address overflows the register space")?;
            start.checked_add(count - 1).ok_or("address overflows the register space")?;
            wanted.entry(table).or_default().push((start, count));
            Ok(())
        };
        for v in &self.values {
            add(v.table, v.address, v.value_type.registers())?;
        }
        for f in &self.flags {
            add(f.table, f.address, 1)?;
        }
        let mut spans = Vec::new();
        for (table, mut regs) in wanted {
            regs.sort_unstable();
            let mut current: Option<ReadSpan> = None;
            for (start, count) in regs {
                let end = start + count; // exclusive; checked above
                match current.as_mut() {
                    Some(s) if start <= s.start + s.count + MERGE_GAP && end - s.start <= MAX_READ => {
                        s.count = s.count.max(end - s.start);
                    }
                    _ => {
                        spans.extend(current.take());
                        current = Some(ReadSpan { table, start, count });
                    }
                }
            }
            spans.extend(current);
        }
        Ok(spans)
    }

    /// The values of `channel` from the registers read (scaled; non-finite ones left out).
    pub fn values(&self, channel: u16, regs: &Registers) -> Vec<(Metric, f64)> {
        let base = channel.wrapping_mul(self.channel_stride);
        self.values
            .iter()
            .filter_map(|v| {
                let at = |i: u16| regs.get(&(v.table, v.address.wrapping_add(base).wrapping_add(i))).copied();
                let raw = decode(v.value_type, v.word_order, v.bit, at(0)?, if v.value_type.registers() == 2 { at(1)? } else { 0 })?;
                let value = scaled(raw, v.scale) + v.offset;
                value.is_finite().then_some((v.metric, value))
            })
            .collect()
    }

    /// The state of every flag of `channel` (set or not), in map order; None when unread.
    pub fn flags(&self, channel: u16, regs: &Registers) -> Vec<Option<bool>> {
        let base = channel.wrapping_mul(self.channel_stride);
        self.flags.iter().map(|f| regs.get(&(f.table, f.address.wrapping_add(base))).map(|r| r & (1 << f.bit) != 0)).collect()
    }
}

/// `raw × scale`, dividing by 1/scale when that is an integer (0.1, 0.01, 0.001…): 554 × 0.1 is
/// 55.400000000000006 in binary floating point, 554 / 10 is the 55.4 the panel meant.
pub fn scaled(raw: f64, scale: f64) -> f64 {
    let inverse = 1.0 / scale;
    if scale.abs() < 1.0 && inverse.is_finite() && (inverse - inverse.round()).abs() < 1e-9 {
        raw / inverse.round()
    } else {
        raw * scale
    }
}

/// A raw register value as a number (before scale and offset). `first` is the register at the
/// value's address, `second` the one after it (32-bit types only).
pub fn decode(t: ValueType, order: WordOrder, bit: u8, first: u16, second: u16) -> Option<f64> {
    let (high, low) = match order {
        WordOrder::HighFirst => (first, second),
        WordOrder::LowFirst => (second, first),
    };
    let word32 = (u32::from(high) << 16) | u32::from(low);
    Some(match t {
        ValueType::U16 => f64::from(first),
        ValueType::I16 => f64::from(first as i16),
        ValueType::U32 => f64::from(word32),
        ValueType::I32 => f64::from(word32 as i32),
        ValueType::F32 => {
            let f = f32::from_bits(word32);
            if !f.is_finite() {
                return None;
            }
            f64::from(f)
        }
        ValueType::Bit => f64::from((first >> bit) & 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_order_and_types_decode_as_documented() {
        // 123456 = 0x0001_E240
        assert_eq!(decode(ValueType::U32, WordOrder::HighFirst, 0, 0x0001, 0xE240), Some(123_456.0));
        assert_eq!(decode(ValueType::U32, WordOrder::LowFirst, 0, 0xE240, 0x0001), Some(123_456.0));
        assert_eq!(decode(ValueType::I32, WordOrder::HighFirst, 0, 0xFFFF, 0xFFFE), Some(-2.0));
        assert_eq!(decode(ValueType::I16, WordOrder::HighFirst, 0, 0xFF38, 0), Some(-200.0));
        // 0.15f32 = 0x3E19_999A
        let f = decode(ValueType::F32, WordOrder::LowFirst, 0, 0x999A, 0x3E19).expect("finite");
        assert!((f - 0.15).abs() < 1e-6, "{f}");
        assert_eq!(decode(ValueType::F32, WordOrder::HighFirst, 0, 0x7FC0, 0), None, "NaN is left out");
        assert_eq!(decode(ValueType::Bit, WordOrder::HighFirst, 3, 0b1000, 0), Some(1.0));
        assert_eq!(scaled(554.0, 0.1), 55.4);
        assert_eq!(scaled(1234.0, 0.01), 12.34);
        assert_eq!(scaled(7.0, 2.5), 17.5);
    }

    #[test]
    fn the_shipped_maps_parse_and_read_in_few_requests() {
        for (file, max_spans) in [("gas-controller-8ch.toml", 1), ("smoke-heat-detector.toml", 1)] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("modbus").join(file);
            let map = RegisterMap::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let plan = map.plan(3).expect("plan");
            assert!(plan.len() <= max_spans, "{file}: {plan:?}");
            assert!(plan.iter().all(|s| s.count <= MAX_READ));
        }
    }

    #[test]
    fn channels_are_offset_and_values_scaled() {
        let map = RegisterMap::parse(
            "model = \"m\"\nkind = \"gas_detector\"\nchannel_stride = 10\n\
             [[value]]\nmetric = \"gas_lel\"\ntable = \"input\"\naddress = 0\nscale = 0.1\n\
             [[value]]\nmetric = \"temp_c\"\ntable = \"input\"\naddress = 1\ntype = \"i16\"\nscale = 0.1\noffset = 0.5\n\
             [[value]]\nmetric = \"valve_closed\"\ntable = \"input\"\naddress = 2\ntype = \"bit\"\nbit = 3\n\
             [[flag]]\ntable = \"input\"\naddress = 2\nbit = 1\non_set = \"alarm\"\non_clear = \"alarm_cleared\"\nmetric = \"gas_lel\"\n",
        )
        .expect("valid");
        assert_eq!(map.plan(2).expect("plan"), vec![ReadSpan { table: Table::Input, start: 20, count: 3 }]);
        let regs: Registers = [((Table::Input, 20), 545), ((Table::Input, 21), (-35i16) as u16), ((Table::Input, 22), 0b1010)].into();
        let values = map.values(2, &regs);
        assert_eq!(values[0], (Metric::GasLel, 54.5));
        assert!((values[1].1 - (-3.0)).abs() < 1e-9, "{values:?}");
        assert_eq!(values[2], (Metric::ValveClosed, 1.0));
        assert_eq!(map.flags(2, &regs), vec![Some(true)]);
        assert_eq!(map.flags(0, &regs), vec![None], "channel 0 was not read");
    }

    #[test]
    fn far_apart_registers_take_separate_requests() {
        let map = RegisterMap::parse(
            "model = \"m\"\nkind = \"smoke_detector\"\n\
             [[value]]\nmetric = \"smoke_db_m\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\n\
             [[value]]\nmetric = \"co_ppm\"\ntable = \"holding\"\naddress = 400\n\
             [[value]]\nmetric = \"temp_c\"\ntable = \"input\"\naddress = 7\n",
        )
        .expect("valid");
        assert_eq!(
            map.plan(0).expect("plan"),
            vec![
                ReadSpan { table: Table::Input, start: 7, count: 1 },
                ReadSpan { table: Table::Holding, start: 0, count: 2 },
                ReadSpan { table: Table::Holding, start: 400, count: 1 },
            ]
        );
    }

    #[test]
    fn map_errors_name_the_entry() {
        let err = RegisterMap::parse("model = \"m\"\nkind = \"gas_detector\"\n[[value]]\nmetric = \"tilt_deg\"\ntable = \"input\"\naddress = 0\n").expect_err("wrong kind");
        assert!(err.starts_with("value[0].metric"), "{err}");
        let err = RegisterMap::parse("model = \"m\"\nkind = \"gas_detector\"\n[[flag]]\ntable = \"input\"\naddress = 0\nbit = 1\non_set = \"alarmed\"\n").expect_err("bad event");
        assert!(err.starts_with("flag[0].on_set"), "{err}");
        let err = RegisterMap::parse("model = \"m\"\nkind = \"gas_detector\"\n[[value]]\nmetric = \"gas_lel\"\ntable = \"coil\"\naddress = 0\n").expect_err("bad table");
        assert!(err.contains("coil"), "{err}");
    }
}
