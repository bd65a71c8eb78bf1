//! `kind = "threshold"`: a metric against rising levels, each held for its `for`, with an
//! optional separate clear condition (hysteresis). This kind's slot state and evaluation only;
//! the engine routes readings and events here and owns the timers.

use super::compiled::CompiledRule;
use super::emit::{nan_to_none, Emit};
use super::state::{Slot, State, NONE};
use crate::rules::config::{Threshold, MAX_LEVELS};

#[derive(Debug)]
pub(super) struct ThresholdState {
    /// The active level (while active).
    pub(super) level: usize,
    /// Since when each level's condition has held, or NONE.
    pub(super) holds: [i64; MAX_LEVELS],
    /// Since when the clear condition has held while active, or NONE.
    pub(super) clear_since: i64,
    /// The latest value (NaN before the first reading).
    pub(super) last: f64,
}

pub(super) fn threshold_state(state: &mut Option<Box<State>>) -> &mut ThresholdState {
    let state = state.get_or_insert_with(|| {
        Box::new(State::Threshold(ThresholdState {
            level: 0,
            holds: [NONE; MAX_LEVELS],
            clear_since: NONE,
            last: f64::NAN,
        }))
    });
    if !matches!(state.as_ref(), State::Threshold(_)) {
        **state =
            State::Threshold(ThresholdState { level: 0, holds: [NONE; MAX_LEVELS], clear_since: NONE, last: f64::NAN });
    }
    match state.as_mut() {
        State::Threshold(st) => st,
        // Invariant: set to a Threshold just above.
        _ => unreachable!("threshold state"),
    }
}

/// Levels qualify when held for their `for`; the highest one counts. While active: upgrades
/// repeat at the new severity, a reading still matching repeats, and it clears when no level
/// holds and the clear condition (if any) has held for its `for`.
pub(super) fn threshold_eval(
    rule: &CompiledRule,
    t: &Threshold,
    slot: &mut Slot,
    now: i64,
    ts: i64,
    from_reading: bool,
    emit: &mut Emit,
) {
    let active = slot.active;
    let st = threshold_state(&mut slot.state);
    let n = t.levels.len();
    let qualified = (0..n).rev().find(|&k| st.holds[k] != NONE && now - st.holds[k] >= t.levels[k].when.held_ms());
    let any_holds = st.holds.iter().take(n).any(|h| *h != NONE);
    let metric = Some(t.metric);
    let value = nan_to_none(st.last);
    if !active {
        if let Some(k) = qualified {
            st.level = k;
            st.clear_since = NONE;
            let level = t.levels[k];
            slot.active = true;
            emit.open(rule, ts, level.severity, metric, value, Some(level.when.value));
        }
        return;
    }
    if let Some(k) = qualified.filter(|k| *k > st.level) {
        st.level = k;
        let level = t.levels[k];
        emit.repeat(rule, ts, level.severity, metric, value, Some(level.when.value));
        return;
    }
    let level = t.levels.get(st.level).or(t.levels.first());
    if any_holds {
        if let (true, Some(level)) = (from_reading, level) {
            emit.repeat(rule, ts, level.severity, metric, value, Some(level.when.value));
        }
        return;
    }
    let clears = match &t.clear {
        None => from_reading,
        Some(c) => st.clear_since != NONE && now - st.clear_since >= c.held_ms(),
    };
    if clears {
        st.level = 0;
        st.clear_since = NONE;
        slot.active = false;
        emit.clear(rule, ts, metric, value);
    }
}
