//! `kind = "absence"`: a silent device. Proof of life from any message moves its deadline and
//! clears it (unless the last link state was `offline`); an `offline` status may open it at
//! once. This kind's deadlines and evaluation only; the engine routes messages here.

use std::sync::Arc;

use super::compiled::CompiledRule;
use super::emit::Emit;
use super::state::{arm, DeviceState, Slot, State, Timers, NONE};
use crate::model::{DeviceCtx, Signal};
use crate::rules::config::{Absence, RuleSpec};

/// A message from the device: absence rules clear (unless after an `offline` status) and their
/// deadlines move.
pub(super) fn seen(d: &mut DeviceState, id: &Arc<str>, timers: &mut Timers, now: i64, out: &mut Vec<Signal>) {
    d.last_seen_ms = d.last_seen_ms.max(now);
    if d.rules.absence.is_empty() {
        return;
    }
    if !d.offline {
        let DeviceState { rules: eff, slots, site, kind, .. } = &mut *d;
        let mut emit = Emit { out, device: id, site, kind: *kind };
        for &i in &eff.absence {
            let (rule, slot) = (&eff.rules[usize::from(i)], &mut slots[usize::from(i)]);
            if slot.active {
                slot.active = false;
                emit.clear(rule, now, None, None);
            }
        }
    }
    arm_deadlines(d, id, timers);
}

/// Each absence rule's deadline from the last time heard, queued while the rule is idle.
pub(super) fn arm_deadlines(d: &mut DeviceState, id: &Arc<str>, timers: &mut Timers) {
    if d.last_seen_ms == NONE {
        return;
    }
    let DeviceState { rules: eff, slots, epoch, interval_s, last_seen_ms, .. } = d;
    for &i in &eff.absence {
        let i = usize::from(i);
        let (rule, slot) = (&eff.rules[i], &mut slots[i]);
        let RuleSpec::Absence(a) = &rule.def.spec else { continue };
        let deadline = last_seen_ms.saturating_add(a.silence_ms(*interval_s));
        // Every message moves it: update in place rather than allocate a new state.
        match slot.state.as_deref_mut() {
            Some(State::Absence { deadline: d }) => *d = deadline,
            _ => slot.state = Some(Box::new(State::Absence { deadline })),
        }
        let next = (!slot.active).then_some(deadline);
        arm(timers, id, *epoch, i, &mut slot.queued, next, NONE);
    }
}

/// An `offline` status (or Last Will): the absence rules that say so open at once, and only
/// data or an `online` status proves the device back.
pub(super) fn offline(d: &mut DeviceState, dev: &DeviceCtx, now: i64, out: &mut Vec<Signal>) {
    d.offline = true;
    let DeviceState { rules: eff, slots, kind, .. } = d;
    let mut emit = Emit { out, device: dev.id, site: dev.site, kind: *kind };
    for &i in &eff.absence {
        let (rule, slot) = (&eff.rules[usize::from(i)], &mut slots[usize::from(i)]);
        if let RuleSpec::Absence(a) = &rule.def.spec {
            if a.open_on_offline && !slot.active {
                slot.active = true;
                emit.open(rule, now, rule.def.severity, None, None, None);
            }
        }
    }
}

/// The deadline: silent too long, it opens, with how long silent and the limit (in seconds).
pub(super) fn due(
    rule: &CompiledRule,
    a: &Absence,
    slot: &mut Slot,
    interval_s: u32,
    last_seen_ms: i64,
    now: i64,
    emit: &mut Emit,
) {
    if let Some(State::Absence { deadline }) = slot.state.as_deref() {
        if !slot.active && now >= *deadline {
            slot.active = true;
            let silent_s = ((now - last_seen_ms) / 1000) as f64;
            let limit_s = (a.silence_ms(interval_s) / 1000) as f64;
            emit.open(rule, now, rule.def.severity, None, Some(silent_s), Some(limit_s));
        }
    }
}
