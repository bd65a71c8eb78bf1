//! `kind = "follow_up"`: after another rule opens, an expected reading or event must come
//! within a deadline. This kind's state and evaluation only; the engine tells it when the
//! leading rule opens or clears, routes readings and events here, and owns the timers.

use citywatch_edge::wire::{EventKind, Metric};

use super::compiled::CompiledRule;
use super::emit::{nan_to_none, Emit};
use super::state::{Slot, State, NONE};
use crate::rules::config::FollowUp;

#[derive(Debug)]
pub(super) struct FollowUpState {
    pub(super) deadline: i64,
    /// The latest reading of the expected metric meets the expectation.
    pub(super) expect_ok: bool,
    /// When the expected event last came, or NONE.
    pub(super) event_ms: i64,
}

fn state(state: &mut Option<Box<State>>) -> &mut FollowUpState {
    let fresh = || State::FollowUp(FollowUpState { deadline: NONE, expect_ok: false, event_ms: NONE });
    let state = state.get_or_insert_with(|| Box::new(fresh()));
    if !matches!(state.as_ref(), State::FollowUp(_)) {
        **state = fresh();
    }
    match state.as_mut() {
        State::FollowUp(st) => st,
        // Invariant: set to a FollowUp just above.
        _ => unreachable!("follow-up state"),
    }
}

fn event_metric(f: &FollowUp) -> Metric {
    f.expect.map_or(Metric::ValveClosed, |e| e.metric)
}

/// The leading rule (`after`) opened or cleared: the deadline starts (unless the expectation
/// is already met) or is cancelled.
pub(super) fn on_leader(f: &FollowUp, slot: &mut Slot, cleared: bool, now: i64) {
    let st = state(&mut slot.state);
    if cleared {
        st.deadline = NONE;
    } else if !slot.active && st.deadline == NONE {
        let met = st.expect_ok || (st.event_ms != NONE && now - st.event_ms <= f.within.as_ms());
        if !met {
            st.deadline = now + f.within.as_ms();
        }
    }
}

/// A reading: the expectation met (or no longer met) if it is of the expected metric. False
/// when there is nothing to do (another metric, or not met while idle).
pub(super) fn on_reading(
    rule: &CompiledRule,
    f: &FollowUp,
    slot: &mut Slot,
    metric: Metric,
    value: f64,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    let Some(expect) = f.expect.filter(|e| e.metric == metric) else { return false };
    let ok = expect.when.holds(value);
    if !ok && !slot.active && slot.state.is_none() {
        return false;
    }
    let st = state(&mut slot.state);
    st.expect_ok = ok;
    expectation(rule, slot, ok, metric, value, ts, emit);
    true
}

/// An event: the expectation met if it is the expected one. Always true: the engine re-arms
/// after any event routed here, as before the split.
#[allow(clippy::too_many_arguments)]
pub(super) fn on_event(
    rule: &CompiledRule,
    f: &FollowUp,
    slot: &mut Slot,
    event: EventKind,
    metric: Option<Metric>,
    value: Option<f64>,
    now: i64,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    if f.expect_event == Some(event) {
        state(&mut slot.state).event_ms = now;
        expectation(rule, slot, true, metric.unwrap_or(event_metric(f)), value.unwrap_or(f64::NAN), ts, emit);
    }
    true
}

/// The deadline: not met by then, it opens.
pub(super) fn due(rule: &CompiledRule, f: &FollowUp, slot: &mut Slot, now: i64, emit: &mut Emit) {
    let st = state(&mut slot.state);
    if st.deadline != NONE && now >= st.deadline {
        st.deadline = NONE;
        if !slot.active {
            slot.active = true;
            let (metric, threshold) = f.expect.map_or((None, None), |e| (Some(e.metric), Some(e.when.value)));
            emit.open(rule, now, rule.def.severity, metric, None, threshold);
        }
    }
}

/// The expected reading or event came (`ok`), or a reading says it is not (any more) met.
fn expectation(rule: &CompiledRule, slot: &mut Slot, ok: bool, metric: Metric, value: f64, ts: i64, emit: &mut Emit) {
    if ok {
        state(&mut slot.state).deadline = NONE;
        if slot.active {
            slot.active = false;
            emit.clear(rule, ts, Some(metric), nan_to_none(value));
        }
    } else if slot.active {
        emit.repeat(rule, ts, rule.def.severity, Some(metric), nan_to_none(value), None);
    }
}
