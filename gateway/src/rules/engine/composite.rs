//! `kind = "composite"`: several devices of one site matching other rules within a window;
//! site scope, one incident per site. Its state lives per site, not per device, and it is fed
//! by other rules' signals, never by a device directly.

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
pub(super) const COMPOSITE_RECENT: usize = 64;

/// A composite rule's state at one site.
#[derive(Debug)]
pub(super) struct SiteComposite {
    pub(super) rule: Arc<str>,
    pub(super) active: bool,
    /// (gateway time, device) of recent contributions, one per device, oldest first.
    pub(super) recent: VecDeque<(i64, Arc<str>)>,
    /// Devices counted in the current incident.
    pub(super) members: Vec<Arc<str>>,
    pub(super) last_device: Arc<str>,
    pub(super) last_kind: DeviceKind,
    /// Gateway time of the last contribution, or NONE (restored, not yet ticked).
    pub(super) last_ms: i64,
    pub(super) within_ms: i64,
    pub(super) clear_after_ms: Option<i64>,
    pub(super) queued: i64,
}

pub(super) fn site_composite<'s>(
    sites: &'s mut HashMap<Arc<str>, Vec<SiteComposite>>,
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

pub(super) fn site_deadline(st: &SiteComposite) -> Option<i64> {
    match (st.active, st.clear_after_ms) {
        (true, Some(after)) if st.last_ms != NONE => Some(st.last_ms + after),
        (true, Some(_)) => Some(NONE + 1),
        _ => st.recent.front().map(|(t, _)| t + st.within_ms + 1),
    }
}

pub(super) fn arm_site(timers: &mut Timers, site: &Arc<str>, st: &mut SiteComposite, at: Option<i64>) {
    let Some(at) = at else { return };
    if at < st.queued {
        st.queued = at;
        timers.push(Reverse(Timer { at, target: Target::Site { site: site.clone(), rule: st.rule.clone() } }));
    }
}

/// An Open or Repeat of one of a composite's rules, from `dev`.
#[allow(clippy::too_many_arguments)]
pub(super) fn composite_contribute(
    sites: &mut HashMap<Arc<str>, Vec<SiteComposite>>,
    timers: &mut Timers,
    rule: &CompiledRule,
    c: &Composite,
    dev: &DeviceCtx,
    ts: i64,
    now: i64,
    out: &mut Vec<Signal>,
) {
    let st = site_composite(sites, dev.site, &rule.name, dev, c);
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
    let next = site_deadline(st);
    arm_site(timers, dev.site, st, next);
}
