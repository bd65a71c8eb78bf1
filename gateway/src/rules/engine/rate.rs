//! `kind = "rate"`: the change of a metric across a sliding window, from a small ring of
//! samples per device. This kind's evaluation only; the engine routes readings here.

use std::collections::VecDeque;

use super::compiled::CompiledRule;
use super::emit::Emit;
use super::state::{Slot, State};
use crate::rules::Rate;

/// Samples a rate rule keeps per device; a device sending faster shortens the window.
const RATE_SAMPLES: usize = 32;

/// A reading of the rule's metric joins the ring, then [`eval`]. False when the slot holds
/// another kind's state (never, for a slot of this rule).
#[allow(clippy::too_many_arguments)]
pub(super) fn on_reading(
    rule: &CompiledRule,
    r: &Rate,
    slot: &mut Slot,
    value: f64,
    now: i64,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    let samples = match slot.state.get_or_insert_with(|| Box::new(State::Rate(VecDeque::new()))).as_mut() {
        State::Rate(s) => s,
        _ => return false,
    };
    if samples.len() == RATE_SAMPLES {
        samples.pop_front();
    }
    samples.push_back((now, value));
    eval(rule, r, slot, now, ts, true, emit);
    true
}

/// The change from the value at the window's start (the last sample at or before it: devices
/// send on change, so it persisted) to the latest.
pub(super) fn eval(
    rule: &CompiledRule,
    r: &Rate,
    slot: &mut Slot,
    now: i64,
    ts: i64,
    from_reading: bool,
    emit: &mut Emit,
) {
    let Some(State::Rate(samples)) = slot.state.as_deref_mut() else { return };
    let start = now - r.window.as_ms();
    while samples.len() >= 2 && samples[1].0 <= start {
        samples.pop_front();
    }
    let (Some(first), Some(last)) = (samples.front(), samples.back()) else { return };
    let (limit, fall) = r.limit();
    let change = last.1 - first.1;
    let holds = if fall { -change >= limit } else { change >= limit };
    let (metric, value, threshold) = (Some(r.metric), Some(change), Some(limit));
    match (slot.active, holds) {
        (false, true) => {
            slot.active = true;
            emit.open(rule, ts, rule.def.severity, metric, value, threshold);
        }
        (true, true) if from_reading => emit.repeat(rule, ts, rule.def.severity, metric, value, threshold),
        (true, false) => {
            slot.active = false;
            emit.clear(rule, ts, metric, value);
        }
        _ => {}
    }
}
