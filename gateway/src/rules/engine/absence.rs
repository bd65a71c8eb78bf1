//! `kind = "absence"`: a silent device. Proof of life from any message moves its deadline and
//! clears it (unless the last link state was `offline`). Deadlines only; the `offline` status
//! and the deadline firing are routed here by the engine.

use std::sync::Arc;

use super::emit::Emit;
use super::state::{arm, DeviceState, State, Timers, NONE};
use crate::model::Signal;
use crate::rules::config::RuleSpec;

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
    arm_absence(d, id, timers);
}

pub(super) fn arm_absence(d: &mut DeviceState, id: &Arc<str>, timers: &mut Timers) {
    if d.last_seen_ms == NONE {
        return;
    }
    let DeviceState { rules: eff, slots, epoch, interval_s, last_seen_ms, .. } = d;
    for &i in &eff.absence {
        let i = usize::from(i);
        let (rule, slot) = (&eff.rules[i], &mut slots[i]);
        let RuleSpec::Absence(a) = &rule.def.spec else { continue };
        let deadline = last_seen_ms.saturating_add(a.silence_ms(*interval_s));
        slot.state = Some(Box::new(State::Absence { deadline }));
        let next = (!slot.active).then_some(deadline);
        arm(timers, id, *epoch, i, &mut slot.queued, next, NONE);
    }
}
