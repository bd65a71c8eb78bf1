//! A device's last value per metric, kept compact: a device reports only its kind's few
//! metrics (at most six of the eleven), so a bitmask of the metrics present and their values in
//! metric order take ~160 bytes where a map took ~330. Serialises as the map it replaces
//! (`{"gas_lel":{…},…}`), so persisted records read either way. Not for history: one value each.

use std::fmt;

use citywatch_edge::wire::Metric;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::LastValue;

/// The last value of each metric a device reported, in metric order.
#[derive(Clone, Default, PartialEq)]
pub struct LastValues {
    /// Bit `m as usize` is set when metric `m` has a value.
    present: u16,
    /// The values of the metrics present, in metric order (the rank of a metric's bit).
    values: Box<[LastValue]>,
}

// The bitmask has room for every metric (a test pins it).
const _: () = assert!(Metric::ALL.len() <= 16);

impl LastValues {
    fn bit(metric: Metric) -> u16 {
        1 << (metric as u16)
    }

    /// Where metric's value sits (or would sit) in `values`.
    fn rank(&self, metric: Metric) -> usize {
        (self.present & (Self::bit(metric) - 1)).count_ones() as usize
    }

    pub fn get(&self, metric: Metric) -> Option<&LastValue> {
        (self.present & Self::bit(metric) != 0).then(|| &self.values[self.rank(metric)])
    }

    /// The value of `metric`, created with `make` when absent (the only time the slice grows,
    /// once per metric of the device's life).
    pub fn entry(&mut self, metric: Metric, make: impl FnOnce() -> LastValue) -> &mut LastValue {
        let at = self.rank(metric);
        if self.present & Self::bit(metric) == 0 {
            let mut grown = Vec::with_capacity(self.values.len() + 1);
            grown.extend_from_slice(&self.values[..at]);
            grown.push(make());
            grown.extend_from_slice(&self.values[at..]);
            self.values = grown.into_boxed_slice();
            self.present |= Self::bit(metric);
        }
        &mut self.values[at]
    }

    /// Metrics with their values, in metric order.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, &LastValue)> + '_ {
        Metric::ALL.iter().filter(|m| self.present & Self::bit(**m) != 0).copied().zip(self.values.iter())
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl std::ops::Index<&Metric> for LastValues {
    type Output = LastValue;

    /// Panics when the metric has no value, as a map's index does.
    fn index(&self, metric: &Metric) -> &LastValue {
        // Invariant documented above: indexing an absent metric is the caller's bug.
        #[allow(clippy::expect_used)]
        self.get(*metric).expect("no value for this metric")
    }
}

impl fmt::Debug for LastValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(Metric, LastValue)> for LastValues {
    fn from_iter<I: IntoIterator<Item = (Metric, LastValue)>>(iter: I) -> Self {
        let mut values = LastValues::default();
        for (metric, value) in iter {
            *values.entry(metric, || value) = value;
        }
        values
    }
}

impl Serialize for LastValues {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (metric, value) in self.iter() {
            map.serialize_entry(&metric, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for LastValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Values;
        impl<'de> Visitor<'de> for Values {
            type Value = LastValues;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of metric to last value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LastValues, A::Error> {
                let mut values = LastValues::default();
                while let Some((metric, value)) = map.next_entry::<Metric, LastValue>()? {
                    *values.entry(metric, || value) = value;
                }
                Ok(values)
            }
        }
        d.deserialize_map(Values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(value: f64) -> LastValue {
        LastValue { value, ts_ms: 1, unchanged_since_ms: 1 }
    }

    #[test]
    fn keeps_metric_order_and_round_trips_as_a_map() {
        let mut values = LastValues::default();
        *values.entry(Metric::RssiDbm, || v(-70.0)) = v(-71.0);
        values.entry(Metric::GasLel, || v(3.0));
        values.entry(Metric::BatteryV, || v(3.0));
        values.entry(Metric::GasLel, || v(99.0)); // present: not replaced
        let order: Vec<Metric> = values.iter().map(|(m, _)| m).collect();
        assert_eq!(order, [Metric::GasLel, Metric::BatteryV, Metric::RssiDbm]);
        assert_eq!(values[&Metric::GasLel].value, 3.0);
        assert_eq!(values.get(Metric::RssiDbm).map(|l| l.value), Some(-71.0));
        assert!(values.get(Metric::TempC).is_none());
        let json = serde_json::to_string(&values).expect("serialise");
        let map: std::collections::BTreeMap<Metric, LastValue> = serde_json::from_str(&json).expect("a map");
        assert_eq!(map.len(), 3);
        let back: LastValues = serde_json::from_str(&json).expect("back");
        assert_eq!(back, values);
        assert_eq!(Metric::ALL.iter().enumerate().filter(|(i, m)| **m as usize != *i).count(), 0);
    }
}
