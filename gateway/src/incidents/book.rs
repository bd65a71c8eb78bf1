//! The incident book: the policy that turns rule signals and operator actions into incident
//! changes. One incident per device × rule while active; repeats update it; a cleared incident
//! whose condition returns soon is re-opened; flapping is detected and its flips held back;
//! silences hold signals back; unacknowledged criticals escalate; commands are supervised.
//! The rule pack's policies across incidents live here too: situations merge a device's member
//! rules into one incident, parents link a site's device incidents under its composite one
//! (an ack cascades to open children), groups make an outage storm one site incident whose
//! membership changes are coalesced (at most one revision per `storm_update_every`).
//!
//! Pure and synchronous: every method takes `now_ms` and records what must be committed and
//! pushed in a [`Commit`] and a list of [`Command`]s, which the manager task carries out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use citywatch_edge::wire::CommandKind;

use citywatch_edge::wire::Metric;

use super::config::IncidentsConfig;
use crate::model::{rfc3339, Change, HistoryEntry, Incident, IncidentState, Release, Scope, Severity, Signal};
use crate::rules::{GroupDef, ParentDef, SituationDef};
use super::silence::Silence;
use super::store::Commit;

/// The actor of the gateway's own transitions.
pub const SYSTEM: &str = "system";

/// An operator's action on an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Ack,
    Dispatch,
    Resolve,
    Close,
}

impl Action {
    pub fn parse(text: &str) -> Option<Action> {
        Some(match text {
            "ack" | "acknowledge" => Action::Ack,
            "dispatch" => Action::Dispatch,
            "resolve" => Action::Resolve,
            "close" => Action::Close,
            _ => return None,
        })
    }

    fn target(self) -> IncidentState {
        match self {
            Action::Ack => IncidentState::Acknowledged,
            Action::Dispatch => IncidentState::Dispatched,
            Action::Resolve => IncidentState::Resolved,
            Action::Close => IncidentState::Closed,
        }
    }

    /// The states it may be taken from.
    fn allowed_from(self) -> &'static [IncidentState] {
        use IncidentState::*;
        match self {
            Action::Ack => &[Open],
            Action::Dispatch => &[Open, Acknowledged],
            Action::Resolve => &[Open, Acknowledged, Dispatched, Cleared],
            Action::Close => &[Resolved, Cleared],
        }
    }
}

/// Why an operator action was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("no incident {0}")]
    NotFound(String),
    #[error("cannot {action} an incident that is {state}; allowed from: {allowed}")]
    NotAllowed { action: &'static str, state: &'static str, allowed: String },
    #[error("{0}")]
    Invalid(String),
}

/// A command to publish to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub site: String,
    pub device: String,
    pub id: String,
    pub cmd: CommandKind,
}

#[derive(Debug, Default)]
struct Flaps {
    /// Times of recent open/clear flips.
    at: VecDeque<i64>,
    /// The last signal of any kind, for the quiet period.
    last_signal_ms: i64,
    /// While flapping: the condition's latest word was "clear".
    pending_clear: bool,
}

/// The book's state.
#[derive(Debug)]
pub struct Book {
    cfg: IncidentsConfig,
    /// Unclosed incidents by id.
    incidents: HashMap<String, Incident>,
    /// Key → id of the incident a new signal for that key goes to: active ones, and cleared ones
    /// within `reopen_within`.
    keys: HashMap<String, String>,
    cleared_at: HashMap<String, i64>,
    /// Keys of the incidents adopted from the cluster's incident log (cluster mode; unclosed, or
    /// closed within the replay window): replayed signals leave them alone
    /// ([`Book::apply_replayed`]).
    logged_keys: HashSet<String>,
    flaps: HashMap<String, Flaps>,
    /// Opens held back by a silence, by key.
    held: HashMap<String, Signal>,
    silences: Vec<Silence>,
    /// Commands awaiting their `cmd_ack`: id → (incident id, sent at).
    commands: HashMap<String, (String, i64)>,
    /// Incidents with coalesced updates not yet persisted.
    dirty: HashSet<String>,
    commit: Commit,
    sent: Vec<Command>,
    /// Incidents an operator ended (resolved or closed): the rule engine forgets them as active.
    released: Vec<Release>,
    counter: u64,
    /// The rule pack's situations (empty: one incident per device × rule).
    situations: Vec<SituationDef>,
    /// Situation incidents: their active member rules, in the order they joined.
    members: HashMap<String, Vec<Member>>,
    /// The rule pack's parents (empty: no incident is linked under another).
    parents: Vec<ParentDef>,
    /// The rule pack's groups (empty: one incident per device even in an outage storm).
    groups: Vec<GroupDef>,
    /// Per (site, group): the group rule's recent opens (time, device) not yet a storm, within
    /// the group's window. Not persisted: a restart forgets at most one window.
    storm_window: HashMap<(String, String), VecDeque<(i64, String)>>,
    /// Group incidents (site outages) in the book, by site.
    storms: HashMap<String, Vec<String>>,
    /// Each group incident's membership now and its changes not yet pushed, by incident id.
    rosters: HashMap<String, Roster>,
    pub stats: BookStats,
}

/// An outage storm's membership. The incident in the book lists the devices of its last
/// revision; the roster knows who is in the storm now and what changed since, so a device
/// joining or leaving costs O(1) and thousands of them make one revision per interval, not one
/// each (each revision carries the whole list: one per change was quadratic).
#[derive(Debug, Default)]
struct Roster {
    /// The devices for which the group's rule holds now.
    now: HashSet<String>,
    /// Devices that joined since the last pushed revision, in order (some may have left again).
    joined: Vec<String>,
    /// How many joins and leaves since the last pushed revision.
    joins: u64,
    leaves: u64,
    /// When the incident was last pushed with its membership.
    pushed_ms: i64,
}

impl Roster {
    fn of(inc: &Incident) -> Roster {
        Roster { now: inc.devices.iter().cloned().collect(), pushed_ms: inc.updated_ms, ..Roster::default() }
    }

    fn pending(&self) -> bool {
        self.joins + self.leaves > 0
    }
}

/// An active member rule of a situation incident: what it last said.
#[derive(Debug, Clone)]
struct Member {
    rule: String,
    severity: Severity,
    metric: Option<Metric>,
    value: Option<f64>,
    threshold: Option<f64>,
    summary: String,
}

/// The worst member: highest severity, the latest to join among equals.
fn lead(members: &[Member]) -> Option<&Member> {
    members.iter().max_by_key(|m| m.severity)
}

/// The incident takes its lead member's rule, severity and reading.
fn follow_lead(inc: &mut Incident, members: &[Member]) {
    if let Some(m) = lead(members) {
        inc.rule = m.rule.clone();
        inc.severity = m.severity;
        inc.metric = m.metric.or(inc.metric);
        inc.value = m.value.or(inc.value);
        inc.threshold = m.threshold;
        inc.summary = m.summary.clone();
    }
    inc.rules_active = members.iter().map(|m| m.rule.clone()).collect();
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BookStats {
    pub opened: u64,
    pub reopened: u64,
    pub repeats: u64,
    pub cleared: u64,
    pub silenced: u64,
    pub escalations: u64,
    pub flapping_started: u64,
    pub commands_sent: u64,
    pub commands_acked: u64,
    pub commands_unanswered: u64,
    /// Commands sent again because an incident taken over (a restart's load, a failover's
    /// adoption) still waited for their `cmd_ack`.
    pub commands_resent: u64,
    pub signals_without_incident: u64,
}

/// The incident key of a signal: "{site}/{device}/{rule}", or "{site}/*/{rule}" site-wide.
pub fn key_of(signal: &Signal) -> String {
    match signal.scope {
        Scope::Device => format!("{}/{}/{}", signal.site, signal.device, signal.rule),
        Scope::Site => format!("{}/*/{}", signal.site, signal.rule),
    }
}

impl Book {
    /// A book holding the unclosed incidents loaded from the store.
    pub fn new(cfg: IncidentsConfig, unclosed: Vec<Incident>, silences: Vec<Silence>, now_ms: i64) -> Book {
        let mut book = Book {
            cfg,
            incidents: HashMap::new(),
            keys: HashMap::new(),
            cleared_at: HashMap::new(),
            logged_keys: HashSet::new(),
            flaps: HashMap::new(),
            held: HashMap::new(),
            silences,
            commands: HashMap::new(),
            dirty: HashSet::new(),
            commit: Commit::default(),
            sent: Vec::new(),
            released: Vec::new(),
            counter: 0,
            situations: Vec::new(),
            members: HashMap::new(),
            parents: Vec::new(),
            groups: Vec::new(),
            storm_window: HashMap::new(),
            storms: HashMap::new(),
            rosters: HashMap::new(),
            stats: BookStats::default(),
        };
        let reopen = book.cfg.reopen_within.as_ms();
        for inc in unclosed {
            let keep_key = inc.state.is_active() || (inc.state == IncidentState::Cleared && now_ms - inc.updated_ms < reopen);
            if keep_key {
                book.keys.insert(inc.key.clone(), inc.id.clone());
                if inc.state == IncidentState::Cleared {
                    book.cleared_at.insert(inc.id.clone(), inc.updated_ms);
                }
            }
            if is_group_incident(&inc) {
                book.storms.entry(inc.site.clone()).or_default().push(inc.id.clone());
                book.rosters.insert(inc.id.clone(), Roster::of(&inc));
            }
            book.resume_commands(&inc, now_ms);
            book.incidents.insert(inc.id.clone(), inc);
        }
        book
    }

    /// Sends again, under their own ids, the commands an active incident's history shows sent
    /// and neither acknowledged nor given up on: whoever sent them (this gateway before a restart,
    /// or a dead owner) may have died before they left, and their wait for a `cmd_ack` was only
    /// in its memory. The wait starts again now. A device that got the first copy acts twice
    /// (every command is safe to repeat) and acknowledges by id.
    fn resume_commands(&mut self, inc: &Incident, now_ms: i64) {
        for (cmd_id, cmd) in pending_commands(inc) {
            // A later command id of this book must not repeat one of these.
            if let Some(n) = cmd_id.rsplit('-').next().and_then(|n| u64::from_str_radix(n, 16).ok()) {
                self.counter = self.counter.max(n.saturating_add(1));
            }
            if !inc.state.is_active() || self.commands.contains_key(&cmd_id) {
                continue;
            }
            tracing::info!(incident = %inc.id, device = %inc.device, cmd_id, cmd = cmd.as_str(), "a taken-over incident still waits for a cmd_ack: command sent again");
            self.sent.push(Command { site: inc.site.clone(), device: inc.device.clone(), id: cmd_id.clone(), cmd });
            self.commands.insert(cmd_id, (inc.id.clone(), now_ms));
            self.stats.commands_resent += 1;
        }
    }

    /// Links device incidents under their site's incident (the rule pack's `[[parent]]`).
    /// Incidents loaded from before keep the links they have; none are added until one of them
    /// opens or re-opens.
    pub fn with_parents(mut self, parents: Vec<ParentDef>) -> Book {
        self.parents = parents;
        self
    }

    /// Makes an outage storm one site incident (the rule pack's `[[group]]`).
    pub fn with_groups(mut self, groups: Vec<GroupDef>) -> Book {
        self.groups = groups;
        self
    }

    /// Merges member rules into situations (the rule pack's `[[situation]]`). Incidents loaded
    /// from before (keyed by rule) keep their ids and are keyed into their situation; where two
    /// of them would share one, the worst keeps the situation key and the other stays keyed by
    /// its rule until it ends.
    pub fn with_situations(mut self, situations: Vec<SituationDef>) -> Book {
        self.situations = situations;
        let mut ids: Vec<(bool, Severity, i64, String)> =
            self.incidents.values().map(|i| (i.state.is_active(), i.severity, -i.opened_ms, i.id.clone())).collect();
        ids.sort_by(|a, b| b.cmp(a));
        for (_, _, _, id) in ids {
            let Some(inc) = self.incidents.get(&id) else { continue };
            if inc.situation.is_none() && inc.scope == Scope::Device {
                let Some(name) = self.situation_of(&inc.rule, inc.metric) else { continue };
                let key = format!("{}/{}/{name}", inc.site, inc.device);
                if self.keys.contains_key(&key) {
                    continue;
                }
                let old_key = inc.key.clone();
                let Some(inc) = self.incidents.get_mut(&id) else { continue };
                if self.keys.get(&old_key) == Some(&id) {
                    self.keys.remove(&old_key);
                    self.keys.insert(key.clone(), id.clone());
                }
                inc.key = key;
                inc.situation = Some(name);
                if inc.state.is_active() && inc.rules_active.is_empty() {
                    inc.rules_active = vec![inc.rule.clone()];
                }
            }
            let Some(inc) = self.incidents.get(&id) else { continue };
            if let Some(members) = restored_members(inc) {
                self.members.insert(id, members);
            }
        }
        self
    }

    /// Takes an incident as another gateway left it (cluster mode: this gateway now owns its
    /// site's partition; the replicated log's newest entry is the truth, whatever this book had).
    /// Keyed as [`Book::new`] keys a loaded incident; stored, not pushed, no new revision: the
    /// next change is its next revision. A closed incident is taken only to end a local copy.
    /// Returns whether the book changed.
    pub fn adopt(&mut self, inc: Incident, now_ms: i64) -> bool {
        self.logged_keys.insert(inc.key.clone());
        match self.incidents.get(&inc.id) {
            Some(local) if *local == inc => return false,
            Some(local) => {
                if self.keys.get(&local.key) == Some(&local.id) {
                    self.keys.remove(&local.key);
                }
            }
            None if inc.state == IncidentState::Closed => return false,
            None => {}
        }
        let reopen = self.cfg.reopen_within.as_ms();
        self.cleared_at.remove(&inc.id);
        self.members.remove(&inc.id);
        if inc.state.is_active() || (inc.state == IncidentState::Cleared && now_ms - inc.updated_ms < reopen) {
            self.keys.insert(inc.key.clone(), inc.id.clone());
            if inc.state == IncidentState::Cleared {
                self.cleared_at.insert(inc.id.clone(), inc.updated_ms);
            }
        }
        self.rosters.remove(&inc.id);
        if is_group_incident(&inc) {
            let ids = self.storms.entry(inc.site.clone()).or_default();
            if !ids.contains(&inc.id) {
                ids.push(inc.id.clone());
            }
            self.rosters.insert(inc.id.clone(), Roster::of(&inc));
        }
        if let Some(members) = restored_members(&inc) {
            self.members.insert(inc.id.clone(), members);
        }
        self.dirty.remove(&inc.id);
        self.resume_commands(&inc, now_ms);
        self.commit.incidents.push(Arc::new(inc.clone()));
        self.incidents.insert(inc.id.clone(), inc);
        true
    }

    /// The situation a device-scoped signal of `rule` carrying `metric` belongs to.
    fn situation_of(&self, rule: &str, metric: Option<Metric>) -> Option<String> {
        self.situations.iter().find(|s| s.takes(rule, metric)).map(|s| s.name.clone())
    }

    /// Where a signal goes: its incident key, and its situation if it has one.
    fn route(&self, s: &Signal) -> (String, Option<String>) {
        let rule_key = key_of(s);
        if s.scope != Scope::Device || self.situations.is_empty() || self.keys.contains_key(&rule_key) {
            return (rule_key, None);
        }
        let situation_key = |name: &str| format!("{}/{}/{name}", s.site, s.device);
        let metric = match &s.change {
            Change::Open { metric, .. } => *metric,
            _ => None,
        };
        if let Some(name) = self.situation_of(&s.rule, metric) {
            return (situation_key(&name), Some(name));
        }
        // A device's alarm joined a situation by its metric; its repeat or clear may carry none.
        for sit in self.situations.iter().filter(|x| x.alarm_rules.iter().any(|r| **r == *s.rule)) {
            let key = situation_key(&sit.name);
            let member = self.keys.get(&key).and_then(|id| self.incidents.get(id)).is_some_and(|i| i.rules_active.iter().any(|r| **r == *s.rule));
            if member {
                return (key, Some(sit.name.clone()));
            }
        }
        (rule_key, None)
    }

    /// Active incidents as (device, rule) pairs, one per active member rule, so the rule engine
    /// can resume them.
    pub fn active_device_rules(&self) -> Vec<(String, String, Scope)> {
        let mut out = Vec::new();
        for i in self.incidents.values().filter(|i| i.state.is_active()) {
            if is_group_incident(i) {
                // The grouped rule is active on each device in the storm now.
                match self.rosters.get(&i.id) {
                    Some(r) => out.extend(r.now.iter().map(|d| (d.clone(), i.rule.clone(), Scope::Device))),
                    None => out.extend(i.devices.iter().map(|d| (d.clone(), i.rule.clone(), Scope::Device))),
                }
                continue;
            }
            if i.rules_active.is_empty() {
                out.push((i.device.clone(), i.rule.clone(), i.scope));
            }
            for r in &i.rules_active {
                out.push((i.device.clone(), r.clone(), i.scope));
            }
        }
        out
    }

    pub fn get(&self, id: &str) -> Option<&Incident> {
        self.incidents.get(id)
    }

    /// What to commit and the commands to send, since the last call.
    pub fn take(&mut self) -> (Commit, Vec<Command>) {
        (std::mem::take(&mut self.commit), std::mem::take(&mut self.sent))
    }

    /// Incidents ended by operators since the last call.
    pub fn take_released(&mut self) -> Vec<Release> {
        std::mem::take(&mut self.released)
    }

    pub fn silences(&self) -> &[Silence] {
        &self.silences
    }

    pub fn add_silence(&mut self, s: Silence) {
        self.silences.retain(|x| x.id() != s.id());
        self.silences.push(s);
    }

    pub fn remove_silence(&mut self, id: &str) -> bool {
        let before = self.silences.len();
        self.silences.retain(|x| x.id() != id);
        before != self.silences.len()
    }

    fn silenced(&self, s: &Signal, now_ms: i64) -> bool {
        // Held back, not dropped: a device's own alarm still present when the window ends opens
        // its incident then (and the event itself is stored either way).
        self.silences.iter().any(|x| x.active_at(now_ms) && x.matches(&s.site, &s.device, s.kind, &s.rule))
    }

    fn new_id(&mut self, now_ms: i64) -> String {
        self.counter += 1;
        let salt: u16 = rand::random();
        format!("inc-{now_ms:x}-{salt:04x}{:x}", self.counter)
    }

    /// Applies one signal of a message a partition's new owner replayed from the ingest stream
    /// (cluster mode): the previous owner evaluated that message already, and what it made of it
    /// is in the incident log, adopted before the replay. So a replayed signal changes nothing
    /// for a key whose incident came from the log (the log's revision stands, and an incident an
    /// operator closed in the window stays closed; the rule engine has rebuilt its state and
    /// goes on from the next live message), and is applied like any
    /// other where the log has nothing: an incident the old owner committed but did not append
    /// before it died is recomputed here, and the replay's own later signals follow it.
    pub fn apply_replayed(&mut self, s: Signal, now_ms: i64) {
        if self.logged_keys.contains(&key_of(&s)) || self.logged_keys.contains(&self.route(&s).0) {
            return;
        }
        self.apply(s, now_ms);
    }

    /// Applies one rule signal.
    pub fn apply(&mut self, s: Signal, now_ms: i64) {
        // Held signals are kept per rule; incidents are keyed by situation where there is one.
        let rule_key = key_of(&s);
        match &s.change {
            Change::Open { .. } | Change::Remind { .. } => {
                if self.silenced(&s, now_ms) {
                    self.stats.silenced += 1;
                    self.held.insert(rule_key, s);
                    return;
                }
                if self.storm_open(&s, now_ms) {
                    return;
                }
                let (key, situation) = self.route(&s);
                self.open(key, situation, s, now_ms);
            }
            Change::Repeat { severity, value, summary } => {
                if let Some(held) = self.held.get_mut(&rule_key) {
                    if let Change::Open { value: v, .. } = &mut held.change {
                        *v = *value;
                    }
                    return;
                }
                if let Some(id) = self.storm_of(&s) {
                    if let Some(inc) = self.incidents.get_mut(&id) {
                        inc.count += 1;
                        self.dirty.insert(id);
                    }
                    return;
                }
                let (key, _) = self.route(&s);
                let Some(id) = self.keys.get(&key).cloned() else {
                    self.stats.signals_without_incident += 1;
                    return;
                };
                if self.members.contains_key(&id) && self.incidents.get(&id).is_some_and(|i| i.state.is_active()) {
                    return self.member_repeat(&id, &s, *severity, *value, summary.clone(), now_ms);
                }
                self.repeat(&id, &s, *severity, *value, summary.clone(), now_ms);
            }
            Change::Clear { value, summary } => {
                if self.held.remove(&rule_key).is_some() {
                    return;
                }
                // A device back from a storm leaves its site incident; a device incident of
                // its own (one an operator had taken before the storm) clears too.
                let in_storm = self.storm_leave(&s, now_ms);
                let (key, _) = self.route(&s);
                let Some(id) = self.keys.get(&key).cloned() else {
                    if !in_storm {
                        self.stats.signals_without_incident += 1;
                    }
                    return;
                };
                if self.members.get(&id).is_some_and(|m| m.len() > 1 || !m.iter().any(|m| *m.rule == *s.rule)) {
                    return self.member_leaves(&id, &s, *value, summary.clone(), now_ms);
                }
                if let Some(inc) = self.incidents.get_mut(&id) {
                    inc.rules_active.clear();
                }
                if let Some(m) = self.members.get_mut(&id) {
                    m.clear();
                }
                self.clear(&id, *value, summary.clone(), now_ms);
            }
        }
    }

    fn open(&mut self, key: String, situation: Option<String>, s: Signal, now_ms: i64) {
        if let Some(id) = self.keys.get(&key).cloned() {
            let state = self.incidents.get(&id).map(|i| i.state);
            match state {
                Some(IncidentState::Cleared) => return self.reopen(&id, &s, now_ms),
                Some(state) if state.is_active() => {
                    if self.members.contains_key(&id) {
                        if let Change::Open { severity, value, summary, .. } = &s.change {
                            return self.member_repeat(&id, &s, *severity, *value, summary.clone(), now_ms);
                        }
                    }
                    let (severity, value, summary) = match &s.change {
                        Change::Open { severity, value, summary, .. } => (*severity, *value, summary.clone()),
                        // Every reminder reaches the channels once: a revision of its own.
                        Change::Remind { summary, .. } => return self.remind(&id, summary.clone(), now_ms),
                        _ => return,
                    };
                    return self.repeat(&id, &s, severity, value, summary, now_ms);
                }
                _ => {
                    self.keys.remove(&key);
                }
            }
        }
        let (severity, metric, value, threshold, summary, action) = match &s.change {
            Change::Open { severity, metric, value, threshold, summary, action } => (*severity, *metric, *value, *threshold, summary.clone(), *action),
            Change::Remind { summary, .. } => (Severity::Info, None, None, None, summary.clone(), None),
            _ => return,
        };
        let id = self.new_id(now_ms);
        let opened_at = rfc3339(now_ms);
        let mut inc = Incident {
            id: id.clone(),
            key: key.clone(),
            revision: 1,
            rule: s.rule.to_string(),
            severity,
            state: IncidentState::Open,
            scope: s.scope,
            site: s.site.to_string(),
            device: s.device.to_string(),
            kind: s.kind,
            metric,
            value,
            threshold,
            opened_at: opened_at.clone(),
            updated_at: opened_at,
            opened_ms: now_ms,
            updated_ms: now_ms,
            summary,
            summary_zh: String::new(),
            summary_en: String::new(),
            count: 1,
            escalation: 0,
            flapping: false,
            crew: None,
            devices: if s.scope == Scope::Site { site_members(&s) } else { Vec::new() },
            situation: situation.clone(),
            rules_active: vec![s.rule.to_string()],
            parent: None,
            children: Vec::new(),
            history: Vec::new(),
        };
        if situation.is_some() {
            let member = Member { rule: s.rule.to_string(), severity, metric, value, threshold, summary: inc.summary.clone() };
            self.members.insert(id.clone(), vec![member]);
        }
        let note = if s.ts_ms < now_ms - 1000 { Some(format!("condition since {}", rfc3339(s.ts_ms))) } else { None };
        record(&mut inc, &mut self.commit, SYSTEM, "open", note, now_ms);
        if let Some(cmd) = action {
            self.command(&mut inc, cmd, now_ms);
        }
        self.stats.opened += 1;
        self.keys.insert(key, id.clone());
        self.flaps.insert(id.clone(), Flaps { last_signal_ms: now_ms, ..Flaps::default() });
        let children = self.adopt_children(&mut inc, now_ms);
        let parent = self.join_parent(&mut inc, now_ms);
        self.push(inc);
        children.into_iter().chain(parent).for_each(|i| self.push(i));
    }

    /// Sends a command to the incident's device, recorded in its current revision.
    fn command(&mut self, inc: &mut Incident, cmd: CommandKind, now_ms: i64) {
        let cmd_id = format!("c-{}-{:x}", &inc.id[4..], self.counter);
        self.counter += 1;
        record(inc, &mut self.commit, SYSTEM, "command", Some(format!("{} {cmd_id}", cmd.as_str())), now_ms);
        self.sent.push(Command { site: inc.site.clone(), device: inc.device.clone(), id: cmd_id.clone(), cmd });
        self.commands.insert(cmd_id, (inc.id.clone(), now_ms));
        self.stats.commands_sent += 1;
    }

    /// Another member rule of an active situation opens: it joins, and leads if it is the worst.
    fn join(&mut self, id: &str, s: &Signal, now_ms: i64) {
        let (member, action) = match &s.change {
            Change::Open { severity, metric, value, threshold, summary, action } => (
                Member { rule: s.rule.to_string(), severity: *severity, metric: *metric, value: *value, threshold: *threshold, summary: summary.clone() },
                *action,
            ),
            Change::Repeat { severity, value, summary } => (
                Member { rule: s.rule.to_string(), severity: *severity, metric: None, value: *value, threshold: None, summary: summary.clone() },
                None,
            ),
            _ => return,
        };
        let note = format!("{} {}", member.rule, member.severity.as_str());
        let Some(members) = self.members.get_mut(id) else { return };
        members.push(member);
        let members = members.clone();
        let Some(inc) = self.incidents.get(id) else { return };
        let mut inc = inc.clone();
        let before = inc.rule.clone();
        follow_lead(&mut inc, &members);
        inc.count += 1;
        if inc.flapping && action.is_none() {
            // Flips are held back while flapping: recorded, not pushed.
            if let Some(f) = self.flaps.get_mut(id) {
                f.last_signal_ms = now_ms;
                f.pending_clear = false;
            }
            inc.updated_ms = now_ms;
            inc.updated_at = rfc3339(now_ms);
            self.dirty.insert(id.to_owned());
            self.incidents.insert(id.to_owned(), inc);
            return;
        }
        let what = if inc.rule != before { "raised" } else { "joined" };
        next_revision(&mut inc, &mut self.commit, SYSTEM, what, Some(note), now_ms);
        if let Some(cmd) = action {
            self.command(&mut inc, cmd, now_ms);
        }
        self.push(inc);
    }

    /// A repeat of a situation's member: its reading is kept; a member rising above the lead
    /// raises the incident.
    fn member_repeat(&mut self, id: &str, s: &Signal, severity: Severity, value: Option<f64>, summary: String, now_ms: i64) {
        let Some(members) = self.members.get_mut(id) else { return };
        let Some(m) = members.iter_mut().find(|m| *m.rule == *s.rule) else {
            return self.join(id, s, now_ms);
        };
        let rose = severity > m.severity;
        m.severity = m.severity.max(severity);
        m.value = value.or(m.value);
        if rose {
            m.summary = summary.clone();
        }
        let members = members.clone();
        let Some(inc) = self.incidents.get(id) else { return };
        let lead_rule = lead(&members).map(|m| m.rule.clone()).unwrap_or_default();
        if lead_rule == *s.rule && !(rose && inc.rule != lead_rule) {
            return self.repeat(id, s, severity, value, summary, now_ms);
        }
        if rose && inc.rule != lead_rule {
            let mut inc = inc.clone();
            follow_lead(&mut inc, &members);
            inc.count += 1;
            next_revision(&mut inc, &mut self.commit, SYSTEM, "raised", Some(format!("{} {}", s.rule, severity.as_str())), now_ms);
            return self.push(inc);
        }
        if let Some(inc) = self.incidents.get_mut(id) {
            inc.count += 1;
            inc.updated_ms = now_ms;
            inc.updated_at = rfc3339(now_ms);
            self.dirty.insert(id.to_owned());
        }
    }

    /// A member of a situation clears while others stay active: it leaves, and the incident
    /// falls back to the worst remaining member (its state is untouched).
    fn member_leaves(&mut self, id: &str, s: &Signal, value: Option<f64>, summary: String, now_ms: i64) {
        let Some(members) = self.members.get_mut(id) else { return };
        let before = members.len();
        members.retain(|m| *m.rule != *s.rule);
        if members.len() == before {
            self.stats.signals_without_incident += 1;
            return;
        }
        let members = members.clone();
        let Some(inc) = self.incidents.get(id) else { return };
        let mut inc = inc.clone();
        let was = inc.rule.clone();
        let lowered = was == *s.rule;
        if lowered {
            follow_lead(&mut inc, &members);
        } else {
            inc.rules_active = members.iter().map(|m| m.rule.clone()).collect();
        }
        let _ = value;
        let what = if lowered { "lowered" } else { "left" };
        next_revision(&mut inc, &mut self.commit, SYSTEM, what, Some(format!("{}: {summary}", s.rule)), now_ms);
        self.push(inc);
    }

    fn reopen(&mut self, id: &str, s: &Signal, now_ms: i64) {
        let flapping_now = self.flip(id, now_ms);
        let mut action = None;
        if let (Some(members), Change::Open { severity, metric, value, threshold, summary, action: a }) = (self.members.get_mut(id), &s.change) {
            *members = vec![Member { rule: s.rule.to_string(), severity: *severity, metric: *metric, value: *value, threshold: *threshold, summary: summary.clone() }];
            action = *a;
        }
        let members = self.members.get(id).cloned();
        let Some(inc) = self.incidents.get_mut(id) else { return };
        if let Change::Open { severity, value, summary, .. } = &s.change {
            inc.severity = inc.severity.max(*severity);
            inc.value = *value;
            inc.summary = summary.clone();
        }
        match &members {
            // A situation returns as whatever member brought it back.
            Some(members) => follow_lead(inc, members),
            None => inc.rules_active = vec![inc.rule.clone()],
        }
        inc.count += 1;
        inc.state = IncidentState::Open;
        self.cleared_at.remove(id);
        self.stats.reopened += 1;
        let mut inc = inc.clone();
        if flapping_now {
            inc.flapping = true;
            self.stats.flapping_started += 1;
            next_revision(&mut inc, &mut self.commit, SYSTEM, "flapping", Some("re-opened repeatedly; flips are held back until it is quiet".into()), now_ms);
        } else {
            next_revision(&mut inc, &mut self.commit, SYSTEM, "reopened", None, now_ms);
        }
        if let Some(cmd) = action {
            self.command(&mut inc, cmd, now_ms);
        }
        let children = self.adopt_children(&mut inc, now_ms);
        let parent = self.join_parent(&mut inc, now_ms);
        self.push(inc);
        children.into_iter().chain(parent).for_each(|i| self.push(i));
    }

    /// A further reminder on an incident still active: pushed as a "reminder" revision.
    fn remind(&mut self, id: &str, summary: String, now_ms: i64) {
        let Some(inc) = self.incidents.get_mut(id) else { return };
        inc.count += 1;
        let mut inc = inc.clone();
        if inc.severity == Severity::Info {
            inc.summary = summary.clone();
        }
        next_revision(&mut inc, &mut self.commit, SYSTEM, "reminder", Some(summary), now_ms);
        self.push(inc);
    }

    fn repeat(&mut self, id: &str, s: &Signal, severity: Severity, value: Option<f64>, summary: String, now_ms: i64) {
        let flapping = self.incidents.get(id).is_some_and(|i| i.flapping);
        if flapping {
            if let Some(f) = self.flaps.get_mut(id) {
                f.last_signal_ms = now_ms;
                f.pending_clear = false;
            }
        }
        let Some(inc) = self.incidents.get_mut(id) else { return };
        self.stats.repeats += 1;
        inc.count += 1;
        inc.value = value.or(inc.value);
        if s.scope == Scope::Site {
            for d in site_members(s) {
                if !inc.devices.contains(&d) {
                    inc.devices.push(d);
                }
            }
            inc.device = s.device.to_string();
        }
        if severity > inc.severity {
            inc.severity = severity;
            inc.summary = summary;
            let mut inc = inc.clone();
            next_revision(&mut inc, &mut self.commit, SYSTEM, "severity", Some(format!("now {}", severity.as_str())), now_ms);
            self.push(inc);
        } else {
            inc.updated_ms = now_ms;
            inc.updated_at = rfc3339(now_ms);
            self.dirty.insert(id.to_owned());
        }
    }

    fn clear(&mut self, id: &str, value: Option<f64>, summary: String, now_ms: i64) {
        let Some(state) = self.incidents.get(id).map(|i| (i.state, i.flapping)) else { return };
        match state {
            (_, true) => {
                if let Some(f) = self.flaps.get_mut(id) {
                    f.last_signal_ms = now_ms;
                    f.pending_clear = true;
                }
                self.flip(id, now_ms);
            }
            (IncidentState::Open, false) => {
                let flapping_now = self.flip(id, now_ms);
                let Some(inc) = self.incidents.get_mut(id) else { return };
                let mut inc = inc.clone();
                inc.value = value.or(inc.value);
                self.stats.cleared += 1;
                if flapping_now {
                    // Stay open while flapping; the clear is remembered.
                    inc.flapping = true;
                    self.stats.flapping_started += 1;
                    if let Some(f) = self.flaps.get_mut(id) {
                        f.pending_clear = true;
                    }
                    next_revision(&mut inc, &mut self.commit, SYSTEM, "flapping", Some("cleared and re-opened repeatedly; flips are held back until it is quiet".into()), now_ms);
                } else {
                    inc.state = IncidentState::Cleared;
                    inc.summary = summary;
                    self.cleared_at.insert(id.to_owned(), now_ms);
                    next_revision(&mut inc, &mut self.commit, SYSTEM, "cleared", None, now_ms);
                }
                self.push(inc);
            }
            (IncidentState::Acknowledged | IncidentState::Dispatched, false) => {
                let Some(inc) = self.incidents.get_mut(id) else { return };
                let mut inc = inc.clone();
                inc.value = value.or(inc.value);
                // The crew is on it: the state stays theirs to change; the key stays, so a
                // returning condition updates this incident rather than opening another.
                next_revision(&mut inc, &mut self.commit, SYSTEM, "condition_cleared", Some(summary), now_ms);
                self.push(inc);
            }
            _ => {}
        }
    }

    /// Records a flip; true when it makes the incident start flapping.
    fn flip(&mut self, id: &str, now_ms: i64) -> bool {
        let window = self.cfg.flap_window.as_ms();
        let threshold = self.cfg.flap_threshold as usize;
        let already = self.incidents.get(id).is_some_and(|i| i.flapping);
        let f = self.flaps.entry(id.to_owned()).or_default();
        f.last_signal_ms = now_ms;
        f.at.push_back(now_ms);
        while f.at.front().is_some_and(|t| now_ms - t > window) {
            f.at.pop_front();
        }
        // Bounded: more than the threshold is never needed.
        while f.at.len() > threshold {
            f.at.pop_front();
        }
        !already && f.at.len() >= threshold
    }

    /// A `cmd_ack` from a device.
    pub fn command_acked(&mut self, device: &str, cmd_id: &str, now_ms: i64) {
        // Only the device the command went to can acknowledge it.
        let Some((id, sent_ms)) = self.commands.get(cmd_id).cloned() else { return };
        let Some(inc) = self.incidents.get(&id) else { return };
        if inc.device != device {
            return;
        }
        self.commands.remove(cmd_id);
        let mut inc = inc.clone();
        self.stats.commands_acked += 1;
        next_revision(&mut inc, &mut self.commit, device, "command_acked", Some(format!("{cmd_id} after {} ms", now_ms - sent_ms)), now_ms);
        self.push(inc);
    }

    /// An operator's action.
    pub fn transition(&mut self, id: &str, action: Action, actor: &str, note: Option<String>, crew: Option<String>, now_ms: i64) -> Result<Incident, TransitionError> {
        if actor.trim().is_empty() {
            return Err(TransitionError::Invalid("actor: required (who is acting)".into()));
        }
        if action == Action::Dispatch && crew.as_deref().is_none_or(|c| c.trim().is_empty()) {
            return Err(TransitionError::Invalid("crew: required to dispatch".into()));
        }
        let state = self.incidents.get(id).map(|i| i.state).ok_or_else(|| TransitionError::NotFound(id.to_owned()))?;
        if action.allowed_from().contains(&state) && self.rosters.get(id).is_some_and(Roster::pending) {
            // The operator acts on the storm as it is now: its membership first, in a revision
            // of its own (and a resolve then ends the rule on exactly those devices).
            self.storm_flush(id, now_ms);
        }
        let inc = self.incidents.get(id).ok_or_else(|| TransitionError::NotFound(id.to_owned()))?;
        let ack_note = note.clone();
        if !action.allowed_from().contains(&inc.state) {
            return Err(TransitionError::NotAllowed {
                action: match action {
                    Action::Ack => "acknowledge",
                    Action::Dispatch => "dispatch",
                    Action::Resolve => "resolve",
                    Action::Close => "close",
                },
                state: inc.state.as_str(),
                allowed: action.allowed_from().iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
        let mut inc = inc.clone();
        let target = action.target();
        inc.state = target;
        if let Some(c) = crew {
            inc.crew = Some(c);
        }
        let note = match (&inc.crew, action) {
            (Some(c), Action::Dispatch) => Some(note.unwrap_or_else(|| format!("to {c}"))),
            _ => note,
        };
        next_revision(&mut inc, &mut self.commit, actor, target.as_str(), note, now_ms);
        if !target.is_active() {
            // The condition coming back after a resolve or close is a new incident.
            if self.keys.get(&inc.key).is_some_and(|k| *k == inc.id) {
                self.keys.remove(&inc.key);
                if is_group_incident(&inc) {
                    // The grouped rule ends on every device listed.
                    for d in &inc.devices {
                        self.released.push(Release { scope: Scope::Device, site: inc.site.clone(), device: d.clone(), rule: inc.rule.clone() });
                    }
                } else {
                    let mut rules = inc.rules_active.clone();
                    if !rules.contains(&inc.rule) {
                        rules.push(inc.rule.clone());
                    }
                    for rule in rules {
                        self.released.push(Release { scope: inc.scope, site: inc.site.clone(), device: inc.device.clone(), rule });
                    }
                }
                self.members.remove(&inc.id);
            }
        }
        self.push(inc.clone());
        if action == Action::Ack && self.acks_children(&inc) {
            // Each open child is acknowledged too, by the same actor: its own history entry and
            // pushed revision, committed with the parent's.
            let note = match ack_note {
                Some(n) => format!("with parent {}: {n}", inc.id),
                None => format!("with parent {}", inc.id),
            };
            for child_id in &inc.children {
                let Some(child) = self.incidents.get(child_id).filter(|c| c.state == IncidentState::Open) else { continue };
                let mut child = child.clone();
                child.state = IncidentState::Acknowledged;
                next_revision(&mut child, &mut self.commit, actor, IncidentState::Acknowledged.as_str(), Some(note.clone()), now_ms);
                self.push(child);
            }
        }
        Ok(inc)
    }

    /// Whether acknowledging `inc` acknowledges its children: a `[[parent]]` with
    /// `ack_children`, or a group incident (whose children an operator has already taken).
    fn acks_children(&self, inc: &Incident) -> bool {
        !inc.children.is_empty() && (is_group_incident(inc) || (inc.scope == Scope::Site && self.parents.iter().any(|p| p.rule == inc.rule && p.ack_children)))
    }

    /// The `[[parent]]` a device incident not yet under a parent would be a child of.
    fn parent_def_of(&self, inc: &Incident) -> Option<&ParentDef> {
        if inc.scope != Scope::Device || inc.parent.is_some() {
            return None;
        }
        self.parents.iter().find(|p| p.takes(inc.situation.as_deref(), &inc.rule, inc.kind))
    }

    /// A parent opening or re-opening (not yet pushed): the children of its site not yet under
    /// a parent join it, recorded in its current revision. Returns the children, each with a
    /// revision of its own, to push after the parent.
    fn adopt_children(&mut self, parent: &mut Incident, now_ms: i64) -> Vec<Incident> {
        if parent.scope != Scope::Site || is_group_incident(parent) || !self.parents.iter().any(|p| p.rule == parent.rule) {
            return Vec::new();
        }
        let mut found: Vec<(i64, String)> = self
            .incidents
            .values()
            .filter(|c| c.site == parent.site && takes_part(c.state) && self.parent_def_of(c).is_some_and(|d| d.rule == parent.rule))
            .map(|c| (c.opened_ms, c.id.clone()))
            .collect();
        found.sort();
        let mut children = Vec::with_capacity(found.len());
        for (_, child_id) in found {
            let Some(child) = self.incidents.get(&child_id) else { continue };
            let mut child = child.clone();
            child.parent = Some(parent.id.clone());
            parent.children.push(child_id);
            next_revision(&mut child, &mut self.commit, SYSTEM, "parent", Some(format!("part of {} ({})", parent.id, parent.rule)), now_ms);
            children.push(child);
        }
        if !children.is_empty() {
            record(parent, &mut self.commit, SYSTEM, "children", Some(parent.children.join(", ")), now_ms);
        }
        children
    }

    /// A device incident opening or re-opening (not yet pushed) joins its site's parent if
    /// one is unclosed and not resolved: recorded in its current revision. Returns the parent
    /// with a revision of its own, to push after the child.
    fn join_parent(&mut self, child: &mut Incident, now_ms: i64) -> Option<Incident> {
        let rule = self.parent_def_of(child)?.rule.clone();
        let parent = self
            .incidents
            .values()
            .filter(|p| p.scope == Scope::Site && p.site == child.site && p.rule == rule && !is_group_incident(p) && takes_part(p.state))
            .max_by_key(|p| p.opened_ms)?;
        let mut parent = parent.clone();
        child.parent = Some(parent.id.clone());
        record(child, &mut self.commit, SYSTEM, "parent", Some(format!("part of {} ({rule})", parent.id)), now_ms);
        parent.children.push(child.id.clone());
        next_revision(&mut parent, &mut self.commit, SYSTEM, "child_added", Some(format!("{} ({})", child.id, child.device)), now_ms);
        Some(parent)
    }

    /// The active group incident listing the signal's device for the signal's rule.
    fn storm_of(&self, s: &Signal) -> Option<String> {
        if s.scope != Scope::Device {
            return None;
        }
        self.storms.get(&*s.site)?.iter().find(|id| {
            let listed = |i: &Incident| match self.rosters.get(*id) {
                Some(r) => r.now.contains(&*s.device),
                None => i.devices.iter().any(|d| **d == *s.device),
            };
            self.incidents.get(*id).is_some_and(|i| i.state.is_active() && *i.rule == *s.rule && listed(i))
        }).cloned()
    }

    /// An open of a grouped rule: joins its site's storm, or starts one when it is the
    /// `min_devices`-th device within the window. False: it opens a device incident as usual.
    fn storm_open(&mut self, s: &Signal, now_ms: i64) -> bool {
        let Change::Open { severity, .. } = &s.change else { return false };
        if s.scope != Scope::Device {
            return false;
        }
        let Some(group) = self.groups.iter().find(|g| *g.rule == *s.rule).cloned() else { return false };
        if self.storm_of(s).is_some() || self.holds(&key_of(s)) {
            // Already counted: an open again is a repeat, which open() and the storm ignore.
            return self.storm_of(s).is_some();
        }
        let storm_key = format!("{}/*/{}", s.site, group.name);
        if let Some(id) = self.keys.get(&storm_key).cloned() {
            match self.incidents.get(&id).map(|i| i.state) {
                Some(state) if state.is_active() => {
                    self.storm_change(&id, s, true, now_ms);
                    return true;
                }
                Some(IncidentState::Cleared) => {
                    self.storm_reopen(&id, s, now_ms);
                    return true;
                }
                _ => {
                    self.keys.remove(&storm_key);
                }
            }
        }
        let window_key = (s.site.to_string(), group.name.clone());
        let window = self.storm_window.entry(window_key.clone()).or_default();
        let within = group.within.as_ms();
        while window.front().is_some_and(|(t, _)| *t < now_ms - within) {
            window.pop_front();
        }
        window.retain(|(_, d)| **d != *s.device);
        window.push_back((now_ms, s.device.to_string()));
        let recent: Vec<String> = window.iter().map(|(_, d)| d.clone()).collect();
        // Those that came back meanwhile do not count.
        let devices: Vec<String> =
            recent.into_iter().filter(|d| **d == *s.device || self.holds(&format!("{}/{d}/{}", s.site, s.rule))).collect();
        if devices.len() < group.min_devices as usize {
            return false;
        }
        self.storm_window.remove(&window_key);
        self.storm_start(&group, storm_key, devices, s, *severity, now_ms);
        true
    }

    /// Whether the incident under `key` is active with its condition holding.
    fn holds(&self, key: &str) -> bool {
        self.keys.get(key).and_then(|id| self.incidents.get(id)).is_some_and(|i| i.state.is_active() && !i.rules_active.is_empty())
    }

    /// Opens a group incident listing `devices`; the device incidents of the storm opened
    /// before it are folded into it (closed, nobody having taken them) or, if an operator has
    /// acknowledged or dispatched them, linked under it.
    fn storm_start(&mut self, group: &GroupDef, key: String, devices: Vec<String>, s: &Signal, severity: Severity, now_ms: i64) {
        let id = self.new_id(now_ms);
        let opened_at = rfc3339(now_ms);
        let site = s.site.to_string();
        let n = devices.len();
        let mut inc = Incident {
            id: id.clone(),
            key: key.clone(),
            revision: 1,
            rule: group.rule.clone(),
            severity: group.severity.unwrap_or(severity),
            state: IncidentState::Open,
            scope: Scope::Site,
            site: site.clone(),
            device: s.device.to_string(),
            kind: s.kind,
            metric: None,
            value: Some(n as f64),
            threshold: Some(f64::from(group.min_devices)),
            opened_at: opened_at.clone(),
            updated_at: opened_at,
            opened_ms: now_ms,
            updated_ms: now_ms,
            summary: storm_summary(&group.rule, &site, &devices),
            summary_zh: String::new(),
            summary_en: String::new(),
            count: n as u64,
            escalation: 0,
            flapping: false,
            crew: None,
            devices,
            situation: Some(group.name.clone()),
            rules_active: vec![group.rule.clone()],
            parent: None,
            children: Vec::new(),
            history: Vec::new(),
        };
        let taken: Vec<(String, String)> = inc
            .devices
            .iter()
            .filter(|d| ***d != *s.device)
            .map(|d| format!("{site}/{d}/{}", group.rule))
            .filter_map(|k| self.keys.get(&k).cloned().map(|id| (k, id)))
            .collect();
        inc.children = taken.iter().map(|(_, id)| id.clone()).collect();
        let note = format!("{n} devices of {site} within {} s", group.within.as_ms() / 1000);
        record(&mut inc, &mut self.commit, SYSTEM, "open", Some(note), now_ms);
        self.stats.opened += 1;
        self.keys.insert(key, id.clone());
        self.storms.entry(site.clone()).or_default().push(id.clone());
        self.rosters.insert(id.clone(), Roster::of(&inc));
        self.flaps.insert(id.clone(), Flaps { last_signal_ms: now_ms, ..Flaps::default() });
        self.push(inc);
        for (child_key, child_id) in taken {
            let Some(child) = self.incidents.get(&child_id) else { continue };
            let mut child = child.clone();
            child.parent = Some(id.clone());
            if child.state == IncidentState::Open {
                // Folded: the site incident carries the condition on; the rule engine still
                // holds it active, so the device's return reaches the site incident.
                child.state = IncidentState::Closed;
                child.rules_active.clear();
                self.keys.remove(&child_key);
                self.members.remove(&child_id);
                self.cleared_at.remove(&child_id);
                next_revision(&mut child, &mut self.commit, SYSTEM, "folded", Some(format!("into {id}: {n} devices of {site}")), now_ms);
            } else {
                next_revision(&mut child, &mut self.commit, SYSTEM, "parent", Some(format!("part of {id}: {n} devices of {site}")), now_ms);
            }
            self.push(child);
        }
    }

    /// A device added to (`joins`) or removed from an active group incident: noted in its
    /// roster, pushed at once if the storm's last push is `storm_update_every` ago, else with
    /// the others by [`Book::tick`].
    fn storm_change(&mut self, id: &str, s: &Signal, joins: bool, now_ms: i64) {
        let Some(roster) = self.rosters.get_mut(id) else { return };
        if joins {
            if roster.now.insert(s.device.to_string()) {
                roster.joined.push(s.device.to_string());
                roster.joins += 1;
            }
        } else if roster.now.remove(&*s.device) {
            roster.leaves += 1;
        }
        if now_ms - roster.pushed_ms >= self.cfg.storm_update_every.as_ms() {
            self.storm_flush(id, now_ms);
        }
    }

    /// Pushes a group incident's membership changes since its last revision as one revision
    /// carrying the whole list. A device that joined and left again meanwhile only counts.
    fn storm_flush(&mut self, id: &str, now_ms: i64) {
        let Some(roster) = self.rosters.get_mut(id) else { return };
        if !roster.pending() {
            return;
        }
        let Some(inc) = self.incidents.get_mut(id) else { return };
        let joins = std::mem::take(&mut roster.joins);
        roster.leaves = 0;
        let joined = std::mem::take(&mut roster.joined);
        let mut removed = Vec::new();
        let mut listed: HashSet<&str> = HashSet::with_capacity(inc.devices.len());
        for d in &inc.devices {
            if roster.now.contains(d) {
                listed.insert(d);
            } else {
                removed.push(d.clone());
            }
        }
        let added: Vec<String> = joined.into_iter().filter(|d| roster.now.contains(d) && !listed.contains(d.as_str())).collect();
        inc.count += joins;
        if added.is_empty() && removed.is_empty() {
            // Nothing an operator would see changed: persisted with the next coalesced update.
            self.dirty.insert(id.to_owned());
            return;
        }
        roster.pushed_ms = now_ms;
        let mut inc = inc.clone();
        inc.devices.retain(|d| roster.now.contains(d));
        let what = match (added.is_empty(), removed.is_empty()) {
            (false, true) => "device_added",
            (true, false) => "device_removed",
            _ => "devices_changed",
        };
        let note = membership_note(&added, &removed, inc.devices.len() + added.len());
        if let Some(last) = added.last() {
            inc.device = last.clone();
        }
        inc.devices.extend(added);
        inc.value = Some(inc.devices.len() as f64);
        inc.summary = storm_summary(&inc.rule, &inc.site, &inc.devices);
        next_revision(&mut inc, &mut self.commit, SYSTEM, what, Some(note), now_ms);
        self.push(inc);
    }

    /// Pushes every group incident's pending membership changes now, whatever the interval
    /// (the gateway is stopping: the final membership is never left unpushed).
    pub fn flush_storms(&mut self, now_ms: i64) {
        let pending: Vec<String> = self.rosters.iter().filter(|(_, r)| r.pending()).map(|(id, _)| id.clone()).collect();
        for id in pending {
            self.storm_flush(&id, now_ms);
        }
    }

    /// A device going offline again within the re-open window of its site's cleared storm.
    fn storm_reopen(&mut self, id: &str, s: &Signal, now_ms: i64) {
        let Some(inc) = self.incidents.get(id) else { return };
        let mut inc = inc.clone();
        inc.state = IncidentState::Open;
        inc.devices = vec![s.device.to_string()];
        inc.device = s.device.to_string();
        inc.value = Some(1.0);
        inc.count += 1;
        inc.rules_active = vec![inc.rule.clone()];
        inc.summary = storm_summary(&inc.rule, &inc.site, &inc.devices);
        let mut roster = Roster::of(&inc);
        roster.pushed_ms = now_ms;
        self.rosters.insert(id.to_owned(), roster);
        self.cleared_at.remove(id);
        self.stats.reopened += 1;
        next_revision(&mut inc, &mut self.commit, SYSTEM, "reopened", Some(s.device.to_string()), now_ms);
        self.push(inc);
    }

    /// A clear of a grouped rule: its device leaves its site's storm; the last one leaving
    /// clears it. False: the device is in no storm.
    fn storm_leave(&mut self, s: &Signal, now_ms: i64) -> bool {
        let Some(id) = self.storm_of(s) else { return false };
        let last = self.rosters.get(&id).is_some_and(|r| r.now.len() == 1);
        if !last {
            self.storm_change(&id, s, false, now_ms);
            return true;
        }
        // The clear is pushed at once and carries the final membership: none.
        if let Some(roster) = self.rosters.get_mut(&id) {
            *roster = Roster { pushed_ms: now_ms, ..Roster::default() };
        }
        let Some(inc) = self.incidents.get_mut(&id) else { return true };
        inc.devices.clear();
        inc.rules_active.clear();
        inc.value = Some(0.0);
        let summary = format!("{}: every device of {} back (the last: {})", inc.rule, inc.site, s.device);
        self.clear(&id, None, summary, now_ms);
        true
    }

    /// Timers: escalation, flapping's quiet period, silences ending, unanswered commands,
    /// re-open windows, and persisting coalesced updates.
    pub fn tick(&mut self, now_ms: i64, persist_updates: bool) {
        // Outage storms' membership changes whose interval is up.
        let every = self.cfg.storm_update_every.as_ms();
        let due: Vec<String> = self.rosters.iter().filter(|(_, r)| r.pending() && now_ms - r.pushed_ms >= every).map(|(id, _)| id.clone()).collect();
        for id in due {
            self.storm_flush(&id, now_ms);
        }
        // Escalation of unacknowledged incidents.
        let after = self.cfg.escalate_after.as_ms();
        let every = self.cfg.renotify_every.as_ms();
        let due: Vec<String> = self
            .incidents
            .values()
            .filter(|i| i.state == IncidentState::Open && i.severity >= self.cfg.escalate_severity)
            .filter(|i| now_ms >= i.opened_ms + after + i64::from(i.escalation) * every)
            .map(|i| i.id.clone())
            .collect();
        for id in due {
            let Some(inc) = self.incidents.get(&id) else { continue };
            let mut inc = inc.clone();
            inc.escalation += 1;
            self.stats.escalations += 1;
            let action = if inc.escalation == 1 { "escalated" } else { "renotified" };
            let note = format!("not acknowledged {} min after opening", (now_ms - inc.opened_ms) / 60_000);
            next_revision(&mut inc, &mut self.commit, SYSTEM, action, Some(note), now_ms);
            self.push(inc);
        }
        // Flapping ends after a quiet period.
        let quiet = self.cfg.flap_quiet.as_ms();
        let settled: Vec<(String, bool)> = self
            .flaps
            .iter()
            .filter(|(id, f)| self.incidents.get(*id).is_some_and(|i| i.flapping) && now_ms - f.last_signal_ms >= quiet)
            .map(|(id, f)| (id.clone(), f.pending_clear))
            .collect();
        for (id, pending_clear) in settled {
            let Some(inc) = self.incidents.get(&id) else { continue };
            let mut inc = inc.clone();
            inc.flapping = false;
            if let Some(f) = self.flaps.get_mut(&id) {
                f.at.clear();
                f.pending_clear = false;
            }
            if pending_clear && inc.state == IncidentState::Open {
                inc.state = IncidentState::Cleared;
                self.cleared_at.insert(id.clone(), now_ms);
                next_revision(&mut inc, &mut self.commit, SYSTEM, "cleared", Some("flapping ended with the condition clear".into()), now_ms);
            } else {
                next_revision(&mut inc, &mut self.commit, SYSTEM, "flapping_ended", None, now_ms);
            }
            self.push(inc);
        }
        // Cleared incidents past the re-open window no longer take new signals.
        let reopen = self.cfg.reopen_within.as_ms();
        let expired: Vec<String> = self.cleared_at.iter().filter(|(_, t)| now_ms - **t >= reopen).map(|(id, _)| id.clone()).collect();
        for id in expired {
            self.cleared_at.remove(&id);
            if let Some(inc) = self.incidents.get(&id) {
                if inc.state == IncidentState::Cleared && self.keys.get(&inc.key) == Some(&id) {
                    self.keys.remove(&inc.key);
                }
            }
        }
        // Silences that ended release what they held.
        self.silences.retain(|s| !s.expired_at(now_ms));
        let released: Vec<String> = self.held.iter().filter(|(_, s)| !self.silenced(s, now_ms)).map(|(k, _)| k.clone()).collect();
        for key in released {
            if let Some(s) = self.held.remove(&key) {
                self.apply(s, now_ms);
            }
        }
        // Commands nobody answered.
        let timeout = self.cfg.command_timeout.as_ms();
        let unanswered: Vec<String> = self.commands.iter().filter(|(_, (_, sent))| now_ms - sent >= timeout).map(|(c, _)| c.clone()).collect();
        for cmd_id in unanswered {
            let Some((id, _)) = self.commands.remove(&cmd_id) else { continue };
            let Some(inc) = self.incidents.get(&id) else { continue };
            let mut inc = inc.clone();
            self.stats.commands_unanswered += 1;
            next_revision(&mut inc, &mut self.commit, SYSTEM, "command_unanswered", Some(format!("{cmd_id}: no cmd_ack within {} s", timeout / 1000)), now_ms);
            self.push(inc);
        }
        if persist_updates {
            for id in std::mem::take(&mut self.dirty) {
                if let Some(inc) = self.incidents.get(&id) {
                    self.commit.incidents.push(Arc::new(inc.clone()));
                }
            }
        }
        // Closed incidents leave the book (they stay in the store).
        let closed: Vec<String> = self.incidents.values().filter(|i| i.state == IncidentState::Closed).map(|i| i.id.clone()).collect();
        for id in closed {
            self.incidents.remove(&id);
            self.members.remove(&id);
            self.flaps.remove(&id);
            self.cleared_at.remove(&id);
            self.rosters.remove(&id);
        }
        let incidents = &self.incidents;
        self.storms.retain(|_, ids| {
            ids.retain(|id| incidents.contains_key(id));
            !ids.is_empty()
        });
        let longest = self.groups.iter().map(|g| g.within.as_ms()).max().unwrap_or(0);
        self.storm_window.retain(|_, w| w.back().is_some_and(|(t, _)| now_ms - t <= longest));
    }

    /// Stores the new state and queues it for every push channel.
    fn push(&mut self, inc: Incident) {
        let arc = Arc::new(inc.clone());
        self.dirty.remove(&inc.id);
        self.commit.incidents.push(Arc::clone(&arc));
        self.commit.outbox.push(arc);
        self.incidents.insert(inc.id.clone(), inc);
    }
}

/// The commands an incident's history shows sent (`command`: "{cmd} {id}") with no later
/// `command_acked` ("{id} after …") or `command_unanswered` ("{id}: …"), oldest first.
fn pending_commands(inc: &Incident) -> Vec<(String, CommandKind)> {
    let mut pending: Vec<(String, CommandKind)> = Vec::new();
    for h in &inc.history {
        let Some(note) = h.note.as_deref() else { continue };
        match h.action.as_str() {
            "command" => {
                if let Some((cmd, id)) = note.split_once(' ') {
                    if let Some(cmd) = CommandKind::parse(cmd) {
                        pending.push((id.to_owned(), cmd));
                    }
                }
            }
            "command_acked" | "command_unanswered" => {
                let id = note.split([' ', ':']).next().unwrap_or_default();
                pending.retain(|(p, _)| p != id);
            }
            _ => {}
        }
    }
    pending
}

/// A situation incident's members as far as its body tells them. What each member last said is
/// not stored: the lead's is the incident's, the others are taken at the lowest severity until
/// their next repeat. `None`: not a device situation.
fn restored_members(inc: &Incident) -> Option<Vec<Member>> {
    if inc.situation.is_none() || inc.scope != Scope::Device {
        return None;
    }
    let members = inc
        .rules_active
        .iter()
        .map(|r| Member {
            rule: r.clone(),
            severity: if *r == inc.rule { inc.severity } else { Severity::Info },
            metric: inc.metric,
            value: inc.value,
            threshold: inc.threshold,
            summary: inc.summary.clone(),
        })
        .collect();
    Some(members)
}

/// Whether an incident is a group's site incident (an outage storm): site scope with a
/// situation (a `[[situation]]` is device scope only, so a site's situation is a group's).
fn is_group_incident(inc: &Incident) -> bool {
    inc.scope == Scope::Site && inc.situation.is_some()
}

/// Whether an incident in `state` can still be linked to a parent or take children: unclosed
/// and not resolved.
fn takes_part(state: IncidentState) -> bool {
    state.is_active() || state == IncidentState::Cleared
}

/// A group incident's summary: the rule, the site and the devices listed (the first ten).
fn storm_summary(rule: &str, site: &str, devices: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut list = devices.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    if devices.len() > SHOWN {
        list.push_str(&format!(" and {} more", devices.len() - SHOWN));
    }
    format!("{rule} at {} devices of {site} at once: {list}", devices.len())
}

/// A group incident's membership revision note: the devices added and back (the first ten of
/// each named) and how many are in it now. Bounded: every revision carries the whole history.
fn membership_note(added: &[String], removed: &[String], now: usize) -> String {
    const SHOWN: usize = 10;
    let named = |ds: &[String]| {
        let mut names = ds.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
        if ds.len() > SHOWN {
            names.push_str(&format!(" and {} more", ds.len() - SHOWN));
        }
        names
    };
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("+{}: {}", added.len(), named(added)));
    }
    if !removed.is_empty() {
        parts.push(format!("-{}: {}", removed.len(), named(removed)));
    }
    parts.push(format!("{now} now"));
    parts.join("; ")
}

/// The devices a site-scoped signal counts, the signalling one included.
fn site_members(s: &Signal) -> Vec<String> {
    let mut out: Vec<String> = s.members.iter().map(|d| d.to_string()).collect();
    if !out.iter().any(|d| **d == *s.device) {
        out.push(s.device.to_string());
    }
    out
}

/// Adds a history entry in the current revision (no new revision).
fn record(inc: &mut Incident, commit: &mut Commit, actor: &str, action: &str, note: Option<String>, now_ms: i64) {
    super::summary::localise(inc);
    let entry = HistoryEntry { revision: inc.revision, at: rfc3339(now_ms), at_ms: now_ms, actor: actor.to_owned(), action: action.to_owned(), state: inc.state, note };
    commit.audit.push((inc.id.clone(), entry.clone()));
    inc.history.push(entry);
}

/// Starts a new revision with one history entry.
fn next_revision(inc: &mut Incident, commit: &mut Commit, actor: &str, action: &str, note: Option<String>, now_ms: i64) {
    inc.revision += 1;
    inc.updated_ms = now_ms;
    inc.updated_at = rfc3339(now_ms);
    record(inc, commit, actor, action, note, now_ms);
}

#[cfg(test)]
mod tests;
