//! `kind = "event"`: opened and cleared by device events. No state beyond the slot's `active`
//! and no timers; the engine routes the events in `open_on` and `clear_on` here.

use citywatch_edge::wire::{EventKind, Metric};

use super::compiled::CompiledRule;
use super::emit::Emit;
use super::state::Slot;
use crate::rules::config::EventRule;

/// An event in `open_on` opens (or repeats while open); one in `clear_on` clears. Without
/// `clear_on` only an operator ends the incident ([`Engine::release`](super::Engine::release)).
/// Always true: the engine re-arms after every event rule (it needs no timer).
#[allow(clippy::too_many_arguments)]
pub(super) fn on_event(
    rule: &CompiledRule,
    e: &EventRule,
    slot: &mut Slot,
    event: EventKind,
    metric: Option<Metric>,
    value: Option<f64>,
    ts: i64,
    emit: &mut Emit,
) -> bool {
    if e.open_on.contains(&event) {
        if slot.active {
            emit.repeat(rule, ts, rule.def.severity, metric, value, None);
        } else {
            slot.active = true;
            emit.open(rule, ts, rule.def.severity, metric, value, None);
        }
    } else if e.clear_on.contains(&event) && slot.active {
        slot.active = false;
        emit.clear(rule, ts, metric, value);
    }
    true
}
