//! `kind = "trend"`: the least-squares slope of bucket means over a long span, on device time.
//! This kind's state (the open bucket and the closed means) and evaluation only.

use std::collections::VecDeque;

use super::compiled::CompiledRule;
use super::emit::Emit;
use super::state::{Slot, State, NONE};
use crate::rules::config::Trend;

#[derive(Debug)]
pub(super) struct TrendState {
    /// Index of the open bucket (`ts / bucket`).
    pub(super) bucket: i64,
    pub(super) sum: f64,
    pub(super) count: u32,
    /// Closed buckets: (index, mean), oldest first.
    pub(super) closed: VecDeque<(i64, f64)>,
}

fn new_state() -> TrendState {
    TrendState { bucket: NONE, sum: 0.0, count: 0, closed: VecDeque::new() }
}

/// A reading of the rule's metric (device time `ts`): evaluated when it closes a bucket. False
/// when the slot holds another kind's state (never, for a slot of this rule).
pub(super) fn on_reading(rule: &CompiledRule, t: &Trend, slot: &mut Slot, value: f64, ts: i64, emit: &mut Emit) -> bool {
    let State::Trend(st) = slot.state.get_or_insert_with(|| Box::new(State::Trend(new_state()))).as_mut() else {
        return false;
    };
    if add(t, st, ts, value) {
        eval(rule, t, st, &mut slot.active, ts, emit);
    }
    true
}

/// Adds a reading to its bucket; true when that closed the previous bucket. Readings older than
/// the open bucket are ignored (late).
fn add(t: &Trend, st: &mut TrendState, ts: i64, value: f64) -> bool {
    let bucket_ms = t.bucket.as_ms().max(1);
    let index = ts.div_euclid(bucket_ms);
    if st.count == 0 || st.bucket == NONE {
        (st.bucket, st.sum, st.count) = (index, value, 1);
        return false;
    }
    if index < st.bucket {
        return false;
    }
    if index == st.bucket {
        st.sum += value;
        st.count += 1;
        return false;
    }
    st.closed.push_back((st.bucket, st.sum / f64::from(st.count)));
    let keep = t.over.as_ms() / bucket_ms;
    while st.closed.front().is_some_and(|(b, _)| st.bucket.saturating_sub(*b) >= keep) {
        st.closed.pop_front();
    }
    (st.bucket, st.sum, st.count) = (index, value, 1);
    true
}

/// Least-squares slope of the closed buckets' means, in the rule's unit, once they span
/// `min_span`.
fn slope(t: &Trend, closed: &VecDeque<(i64, f64)>) -> Option<f64> {
    let (first, last) = (closed.front()?, closed.back()?);
    let bucket_ms = t.bucket.as_ms();
    if closed.len() < 2 || last.0.saturating_sub(first.0).saturating_mul(bucket_ms) < t.min_span.as_ms() {
        return None;
    }
    let n = closed.len() as f64;
    let x = |b: i64| b.saturating_sub(first.0) as f64 * bucket_ms as f64;
    let mean_x = closed.iter().map(|(b, _)| x(*b)).sum::<f64>() / n;
    let mean_y = closed.iter().map(|(_, y)| *y).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (b, y) in closed {
        let dx = x(*b) - mean_x;
        sxy += dx * (y - mean_y);
        sxx += dx * dx;
    }
    (sxx > 0.0).then(|| sxy / sxx * t.per.ms())
}

fn eval(rule: &CompiledRule, t: &Trend, st: &TrendState, active: &mut bool, ts: i64, emit: &mut Emit) {
    let Some(slope) = slope(t, &st.closed) else { return };
    let (metric, value, threshold) = (Some(t.metric), Some(slope), Some(t.rate_above));
    match (*active, slope > t.rate_above) {
        (false, true) => {
            *active = true;
            emit.open(rule, ts, rule.def.severity, metric, value, threshold);
        }
        (true, true) => emit.repeat(rule, ts, rule.def.severity, metric, value, threshold),
        (true, false) => {
            *active = false;
            emit.clear(rule, ts, metric, value);
        }
        (false, false) => {}
    }
}
