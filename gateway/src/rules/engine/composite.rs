//! `kind = "composite"`: several devices of one site matching other rules within a window;
//! site scope, one incident per site. Its state lives per site, not per device, and it is fed
//! by other rules' Opens and Repeats (the engine passes them on), never by a device directly.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use citywatch_edge::wire::DeviceKind;

use super::compiled::CompiledRule;
use super::emit::summary;
use super::state::{Target, Timer, Timers, NONE, NO_TIMER};
use crate::model::{Change, DeviceCtx, Scope, Signal};
use crate::rules::config::Composite;

/// Recent contributions a composite rule keeps per site (distinct devices).
const COMPOSITE_RECENT: usize = 64;

/// A composite rule's state at one site.
#[derive(Debug)]
pub(super) struct SiteComposite {
    rule: Arc<str>,
    active: bool,
    /// (gateway time, device) of recent contributions, one per device, oldest first.
    recent: VecDeque<(i64, Arc<str>)>,
    /// Devices counted in the current incident.
    members: Vec<Arc<str>>,
    last_device: Arc<str>,
    last_kind: DeviceKind,
    /// Gateway time of the last contribution, or NONE (restored, not yet ticked).
    last_ms: i64,
    within_ms: i64,
    clear_after_ms: Option<i64>,
    queued: i64,
}

/// Per site, its composite rules' state.
pub(super) type Sites = HashMap<Arc<str>, Vec<SiteComposite>>;

fn site_state<'s>(
    sites: &'s mut Sites,
    site: &Arc<str>,
    rule: &Arc<str>,
    dev: &DeviceCtx,
    c: &Composite,
) -> &'s mut SiteComposite {
    let list = sites.entry(site.clone()).or_default();
    let pos = match list.iter().position(|s| s.rule == *rule) {
        Some(pos) => pos,
        None => {
            list.push(SiteComposite {
                rule: rule.clone(),
                active: false,
                recent: VecDeque::new(),
                members: Vec::new(),
                last_device: dev.id.clone(),
                last_kind: dev.kind,
                last_ms: NONE,
                within_ms: c.within.as_ms(),
                clear_after_ms: None,
                queued: NO_TIMER,
            });
            list.len() - 1
        }
    };
    let st = &mut list[pos];
    st.within_ms = c.within.as_ms();
    st.clear_after_ms = c.clear_after.map(|d| d.as_ms());
    st
}

fn deadline(st: &SiteComposite) -> Option<i64> {
    match (st.active, st.clear_after_ms) {
        (true, Some(after)) if st.last_ms != NONE => Some(st.last_ms + after),
        (true, Some(_)) => Some(NONE + 1),
        _ => st.recent.front().map(|(t, _)| t + st.within_ms + 1),
    }
}

fn arm(timers: &mut Timers, site: &Arc<str>, st: &mut SiteComposite, at: Option<i64>) {
    let Some(at) = at else { return };
    if at < st.queued {
        st.queued = at;
        timers.push(Reverse(Timer { at, target: Target::Site { site: site.clone(), rule: st.rule.clone() } }));
    }
}

/// An Open or Repeat of one of a composite's rules, from `dev`.
#[allow(clippy::too_many_arguments)]
pub(super) fn contribute(
    sites: &mut Sites,
    timers: &mut Timers,
    rule: &CompiledRule,
    c: &Composite,
    dev: &DeviceCtx,
    ts: i64,
    now: i64,
    out: &mut Vec<Signal>,
) {
    let st = site_state(sites, dev.site, &rule.name, dev, c);
    while st.recent.front().is_some_and(|(t, _)| *t < now - st.within_ms) {
        st.recent.pop_front();
    }
    if let Some(pos) = st.recent.iter().position(|(_, d)| d == dev.id) {
        st.recent.remove(pos);
    }
    if st.recent.len() == COMPOSITE_RECENT {
        st.recent.pop_front();
    }
    st.recent.push_back((now, dev.id.clone()));
    (st.last_device, st.last_kind, st.last_ms) = (dev.id.clone(), dev.kind, now);
    let signal = |change, members: &Vec<Arc<str>>| Signal {
        rule: rule.name.clone(),
        scope: Scope::Site,
        site: dev.site.clone(),
        device: dev.id.clone(),
        kind: dev.kind,
        ts_ms: ts,
        change,
        members: members.clone(),
    };
    let threshold = Some(f64::from(c.min_devices));
    if !st.active {
        if st.recent.len() >= c.min_devices as usize {
            st.active = true;
            st.members = st.recent.iter().map(|(_, d)| d.clone()).collect();
            let value = Some(st.members.len() as f64);
            let summary = summary(rule, dev.id, dev.site, None, value, threshold);
            out.push(signal(
                Change::Open { severity: rule.def.severity, metric: None, value, threshold, summary, action: rule.def.action },
                &st.members,
            ));
        }
    } else if !st.members.contains(dev.id) {
        st.members.push(dev.id.clone());
        let value = Some(st.members.len() as f64);
        let summary = summary(rule, dev.id, dev.site, None, value, threshold);
        out.push(signal(Change::Repeat { severity: rule.def.severity, value, summary }, &st.members));
    }
    let next = deadline(st);
    arm(timers, dev.site, st, next);
}

/// An incident open at start for the device's site: active, with the device a member; counts
/// from the first tick (restore has no clock).
pub(super) fn restore(sites: &mut Sites, timers: &mut Timers, rule: &CompiledRule, c: &Composite, dev: &DeviceCtx) {
    let st = site_state(sites, dev.site, &rule.name, dev, c);
    st.active = true;
    st.last_ms = NONE;
    if !st.members.contains(dev.id) {
        st.members.push(dev.id.clone());
    }
    arm(timers, dev.site, st, Some(NONE + 1));
}

/// Closed outside the engine: not active, and the next contributions start a new incident.
pub(super) fn release(sites: &mut Sites, site: &str, rule: &str) {
    if let Some(st) = sites.get_mut(site).and_then(|l| l.iter_mut().find(|s| &*s.rule == rule)) {
        st.active = false;
        st.members.clear();
        st.recent.clear();
    }
}

/// A site's deadline: old contributions leave the window, and an incident with `clear_after`
/// clears when nothing contributed for that long. A site with nothing left is forgotten.
pub(super) fn due(
    sites: &mut Sites,
    timers: &mut Timers,
    site: &Arc<str>,
    rule: &Arc<str>,
    at: i64,
    now: i64,
    out: &mut Vec<Signal>,
) {
    let Some(list) = sites.get_mut(site) else { return };
    let Some(pos) = list.iter().position(|s| s.rule == *rule) else { return };
    let st = &mut list[pos];
    if st.queued != at {
        return;
    }
    st.queued = NO_TIMER;
    if st.last_ms == NONE {
        st.last_ms = now;
    }
    while st.recent.front().is_some_and(|(t, _)| *t < now - st.within_ms) {
        st.recent.pop_front();
    }
    if let (true, Some(after)) = (st.active, st.clear_after_ms) {
        if now - st.last_ms >= after {
            st.active = false;
            st.members.clear();
            out.push(Signal {
                rule: st.rule.clone(),
                scope: Scope::Site,
                site: site.clone(),
                device: st.last_device.clone(),
                kind: st.last_kind,
                ts_ms: now,
                members: Vec::new(),
                change: Change::Clear {
                    value: None,
                    summary: format!("{} at {site} cleared: nothing contributing for {} s", st.rule, after / 1000),
                },
            });
        }
    }
    let next = deadline(st).map(|t| t.max(now + 1));
    if next.is_none() && !st.active {
        list.swap_remove(pos);
        if list.is_empty() {
            sites.remove(site);
        }
        return;
    }
    arm(timers, site, st, next);
}
