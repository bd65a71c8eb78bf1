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

pub(super) fn state(state: &mut Option<Box<State>>) -> &mut ThresholdState {
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

/// A reading of the rule's metric: the holds move, then [`eval`]. False when the rule is idle
/// and stays idle (the common case: no state touched, nothing to arm).
#[allow(clippy::too_many_arguments)]
pub(super) fn on_reading(
    rule: &CompiledRule,
    t: &Threshold,
    slot: &mut Slot,
    value: f64,
    now: i64,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    let active = slot.active;
    if !active && slot.state.is_none() && !t.levels.iter().any(|l| l.when.holds(value)) {
        // Idle and staying idle: the common case, no state to touch.
        return false;
    }
    let st = state(&mut slot.state);
    st.last = value;
    for (h, level) in st.holds.iter_mut().zip(&t.levels) {
        *h = if !level.when.holds(value) {
            NONE
        } else if *h == NONE {
            now
        } else {
            *h
        };
    }
    st.clear_since = match &t.clear {
        Some(c) if active && c.holds(value) && st.clear_since == NONE => now,
        Some(c) if active && c.holds(value) => st.clear_since,
        _ => NONE,
    };
    eval(rule, t, slot, now, ts, true, emit);
    true
}

/// One of `open_on_events`: opens at the first level, or repeats while active. False when the
/// rule has no levels.
pub(super) fn on_event(
    rule: &CompiledRule,
    t: &Threshold,
    slot: &mut Slot,
    value: Option<f64>,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    let Some(first) = t.levels.first() else { return false };
    let st = state(&mut slot.state);
    if slot.active {
        let severity = t.levels.get(st.level).map_or(first.severity, |l| l.severity);
        emit.repeat(rule, ts, severity, Some(t.metric), value, None);
    } else {
        slot.active = true;
        st.level = 0;
        st.clear_since = NONE;
        emit.open(rule, ts, first.severity, Some(t.metric), value, Some(first.when.value));
    }
    true
}

/// An incident open at start: taken to be at the first level (a higher one held repeats at once).
pub(super) fn restore(slot: &mut Slot) {
    slot.active = true;
    state(&mut slot.state).level = 0;
}

/// Levels qualify when held for their `for`; the highest one counts. While active: upgrades
/// repeat at the new severity, a reading still matching repeats, and it clears when no level
/// holds and the clear condition (if any) has held for its `for`.
pub(super) fn eval(
    rule: &CompiledRule,
    t: &Threshold,
    slot: &mut Slot,
    now: i64,
    ts: i64,
    from_reading: bool,
    emit: &mut Emit,
) {
    let active = slot.active;
    let st = state(&mut slot.state);
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
