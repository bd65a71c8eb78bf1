//! Per-device state and the timers: a device's compiled rules with one [`Slot`] per rule, the
//! min-heap of deadlines with lazy invalidation (holds, silence deadlines, follow-up deadlines,
//! stuck sensors, composite clear-afters), and which deadline a slot needs next. What each kind
//! keeps in its slot is defined by that kind's module; no evaluation here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use citywatch_edge::wire::DeviceKind;

use super::compiled::{CompiledRule, Effective};
use super::follow_up::FollowUpState;
use super::stuck::StuckMetric;
use super::threshold::ThresholdState;
use super::trend::TrendState;
use crate::model::DeviceCtx;
use crate::rules::config::RuleSpec;
use crate::rules::RuleSet;

/// "Not set" for times.
pub(super) const NONE: i64 = i64::MIN;

/// "No timer queued".
pub(super) const NO_TIMER: i64 = i64::MAX;

#[derive(Debug)]
pub(super) struct DeviceState {
    pub(super) site: Arc<str>,
    pub(super) kind: DeviceKind,
    pub(super) interval_s: u32,
    /// Distinguishes this state from an earlier one of the same id (forgotten, or rebuilt after
    /// a kind or site change), so their queued timers are skipped.
    pub(super) epoch: u32,
    pub(super) last_seen_ms: i64,
    /// The last link state was `offline` (or an absence incident was restored): only data or
    /// an `online` status prove the device back, not its offline status message itself.
    pub(super) offline: bool,
    pub(super) rules: Arc<Effective>,
    pub(super) slots: Box<[Slot]>,
}

/// One rule's state for one device.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) active: bool,
    /// Earliest deadline queued for this slot, or NO_TIMER.
    pub(super) queued: i64,
    /// None while there is nothing to remember (most rules, most of the time).
    pub(super) state: Option<Box<State>>,
}

#[derive(Debug)]
pub(super) enum State {
    Threshold(ThresholdState),
    /// (gateway time, value), oldest first.
    Rate(VecDeque<(i64, f64)>),
    Trend(TrendState),
    Absence {
        deadline: i64,
    },
    FollowUp(FollowUpState),
    Stuck(Vec<StuckMetric>),
}

/// The device's state, created (or rebuilt after a kind or site change) as needed.
pub(super) fn device_state<'e>(
    devices: &'e mut HashMap<Arc<str>, Box<DeviceState>>,
    rules: &RuleSet,
    next_epoch: &mut u32,
    dev: &DeviceCtx,
) -> &'e mut DeviceState {
    let fresh = |next_epoch: &mut u32, last_seen_ms: i64, offline: bool| {
        let effective = rules.effective_for(dev.kind, dev.site, dev.id);
        let slots = (0..effective.rules.len()).map(|_| Slot { active: false, queued: NO_TIMER, state: None }).collect();
        *next_epoch = next_epoch.wrapping_add(1);
        DeviceState {
            site: dev.site.clone(),
            kind: dev.kind,
            interval_s: dev.interval_s,
            epoch: *next_epoch,
            last_seen_ms,
            offline,
            rules: effective,
            slots,
        }
    };
    let d = devices.entry(dev.id.clone()).or_insert_with(|| Box::new(fresh(next_epoch, NONE, false)));
    if d.kind != dev.kind || (!Arc::ptr_eq(&d.site, dev.site) && d.site != *dev.site) {
        // Re-registered as another kind or at another site: its rules change, so its state
        // starts over (incidents of the old rules stay with the manager).
        **d = fresh(next_epoch, d.last_seen_ms, d.offline);
    }
    d.interval_s = dev.interval_s;
    d
}

/// What a deadline is for: one rule of one device (of one epoch), or a composite rule at a site.
#[derive(Debug)]
pub(super) enum Target {
    Slot { device: Arc<str>, epoch: u32, slot: u16 },
    Site { site: Arc<str>, rule: Arc<str> },
}

/// A deadline; ordered by time only.
#[derive(Debug)]
pub(super) struct Timer {
    pub(super) at: i64,
    pub(super) target: Target,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

pub(super) type Timers = BinaryHeap<Reverse<Timer>>;

/// Queues `at` for a slot unless an earlier deadline is already queued (that one re-arms).
pub(super) fn arm(timers: &mut Timers, device: &Arc<str>, epoch: u32, slot: usize, queued: &mut i64, at: Option<i64>, floor: i64) {
    let Some(at) = at.map(|at| at.max(floor)) else { return };
    if at < *queued {
        *queued = at;
        timers.push(Reverse(Timer { at, target: Target::Slot { device: device.clone(), epoch, slot: slot as u16 } }));
    }
}

fn earliest(a: Option<i64>, b: i64) -> Option<i64> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// The next time the slot's rule needs the clock, if any.
pub(super) fn next_deadline(rule: &CompiledRule, slot: &Slot, now: i64) -> Option<i64> {
    let state = slot.state.as_deref()?;
    let mut next = None;
    match (&rule.def.spec, state) {
        (RuleSpec::Threshold(t), State::Threshold(st)) => {
            for (k, level) in t.levels.iter().enumerate() {
                if st.holds[k] != NONE && (!slot.active || k > st.level) {
                    next = earliest(next, st.holds[k] + level.when.held_ms());
                }
            }
            let any_holds = st.holds.iter().take(t.levels.len()).any(|h| *h != NONE);
            if let (true, false, Some(c)) = (slot.active, any_holds, &t.clear) {
                if st.clear_since != NONE {
                    next = earliest(next, st.clear_since + c.held_ms());
                }
            }
        }
        (RuleSpec::Rate(r), State::Rate(samples)) if slot.active && samples.len() >= 2 => {
            next = Some(samples[1].0 + r.window.as_ms());
        }
        (RuleSpec::Absence(_), State::Absence { deadline }) if !slot.active => next = Some(*deadline),
        (RuleSpec::FollowUp(_), State::FollowUp(st)) if st.deadline != NONE => next = Some(st.deadline),
        (RuleSpec::Stuck(s), State::Stuck(list)) => {
            for m in list.iter().filter(|m| !m.stuck && m.since != NONE) {
                next = earliest(next, m.since + s.held_for.as_ms());
            }
        }
        _ => {}
    }
    // Deadlines already passed were acted upon by the evaluation that just ran.
    next.filter(|at| *at > now)
}

/// Frees state that holds nothing worth keeping.
pub(super) fn drop_idle(slot: &mut Slot) {
    let idle = match slot.state.as_deref() {
        Some(State::Threshold(st)) => !slot.active && st.holds.iter().all(|h| *h == NONE),
        Some(State::FollowUp(st)) => !slot.active && st.deadline == NONE && !st.expect_ok && st.event_ms == NONE,
        _ => false,
    };
    if idle {
        slot.state = None;
    }
}
