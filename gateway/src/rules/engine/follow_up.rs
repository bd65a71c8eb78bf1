//! `kind = "follow_up"`: after another rule opens, an expected reading or event must come
//! within a deadline. This kind's state and evaluation only; the engine starts and cancels the
//! deadline when the leading rule opens or clears.

use citywatch_edge::wire::Metric;

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

pub(super) fn follow_up_state(state: &mut Option<Box<State>>) -> &mut FollowUpState {
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

pub(super) fn event_metric(f: &FollowUp) -> Metric {
    f.expect.map_or(Metric::ValveClosed, |e| e.metric)
}

/// The expected reading or event came (`ok`), or a reading says it is not (any more) met.
pub(super) fn follow_up_expectation(
    rule: &CompiledRule,
    slot: &mut Slot,
    ok: bool,
    metric: Metric,
    value: f64,
    ts: i64,
    emit: &mut Emit,
) {
    if ok {
        follow_up_state(&mut slot.state).deadline = NONE;
        if slot.active {
            slot.active = false;
            emit.clear(rule, ts, Some(metric), nan_to_none(value));
        }
    } else if slot.active {
        emit.repeat(rule, ts, rule.def.severity, Some(metric), nan_to_none(value), None);
    }
}
