//! `kind = "stuck"`: an analog metric exactly unchanged for a long time. This kind's state per
//! watched metric and its evaluation; the engine routes readings and the deadline here and
//! owns the timers.

use citywatch_edge::wire::{DeviceKind, Metric};

use super::compiled::CompiledRule;
use super::emit::Emit;
use super::state::{Slot, State, NONE};
use crate::rules::config::Stuck;

#[derive(Debug)]
pub(super) struct StuckMetric {
    pub(super) metric: Metric,
    pub(super) last: f64,
    /// When `last` was first seen (gateway time), or NONE.
    pub(super) since: i64,
    pub(super) stuck: bool,
}

fn new_state(metrics: &[Metric], kind: DeviceKind) -> State {
    State::Stuck(
        metrics
            .iter()
            .filter(|m| kind.has_metric(**m))
            .map(|&metric| StuckMetric { metric, last: f64::NAN, since: NONE, stuck: false })
            .collect(),
    )
}

/// A reading of one of the watched metrics: the same value again opens (once held long
/// enough) or repeats, a different one clears when no other metric is stuck. False when the
/// metric is not watched for this kind.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_reading(
    rule: &CompiledRule,
    s: &Stuck,
    slot: &mut Slot,
    kind: DeviceKind,
    metric: Metric,
    value: f64,
    now: i64,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    let State::Stuck(list) = slot.state.get_or_insert_with(|| Box::new(new_state(&s.metrics, kind))).as_mut() else {
        return false;
    };
    let Some(m) = list.iter_mut().find(|m| m.metric == metric) else { return false };
    if m.since == NONE {
        (m.last, m.since) = (value, now);
    } else if value == m.last {
        let newly = !m.stuck && now - m.since >= s.held_for.as_ms();
        m.stuck |= newly;
        if newly && !slot.active {
            slot.active = true;
            emit.open(rule, ts, rule.def.severity, Some(metric), Some(value), None);
        } else if m.stuck && slot.active {
            emit.repeat(rule, ts, rule.def.severity, Some(metric), Some(value), None);
        }
    } else {
        (m.last, m.since, m.stuck) = (value, now, false);
        if slot.active && !list.iter().any(|m| m.stuck) {
            slot.active = false;
            emit.clear(rule, ts, Some(metric), Some(value));
        }
    }
    true
}

/// The deadline: a value unchanged for `for` is stuck, provided the device has been heard from
/// since it began (a silent device is the absence rule's business).
pub(super) fn due(rule: &CompiledRule, s: &Stuck, slot: &mut Slot, last_seen_ms: i64, now: i64, emit: &mut Emit) {
    let Some(State::Stuck(list)) = slot.state.as_deref_mut() else { return };
    let mut newly = None;
    for m in list.iter_mut() {
        if !m.stuck && m.since != NONE && now - m.since >= s.held_for.as_ms() && last_seen_ms > m.since {
            m.stuck = true;
            newly = newly.or(Some((m.metric, m.last)));
        }
    }
    if let Some((metric, value)) = newly {
        if slot.active {
            emit.repeat(rule, now, rule.def.severity, Some(metric), Some(value), None);
        } else {
            slot.active = true;
            emit.open(rule, now, rule.def.severity, Some(metric), Some(value), None);
        }
    }
}
