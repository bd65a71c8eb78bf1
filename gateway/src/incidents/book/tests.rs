use std::sync::Arc;

use citywatch_edge::wire::{CommandKind, DeviceKind, Metric};

use super::*;
use crate::incidents::silence::SilenceConfig;
use crate::rules::SituationDef;

const T0: i64 = 1_800_000_000_000;

fn signal(device: &str, rule: &str, change: Change) -> Signal {
    Signal { rule: rule.into(), scope: Scope::Device, site: "xh".into(), device: device.into(), kind: DeviceKind::GasDetector, ts_ms: T0, change, members: Vec::new() }
}

fn open(device: &str, rule: &str, severity: Severity) -> Signal {
    signal(device, rule, Change::Open { severity, metric: Some(Metric::GasLel), value: Some(55.0), threshold: Some(50.0), summary: "gas".into(), action: None })
}

fn clear(device: &str, rule: &str) -> Signal {
    signal(device, rule, Change::Clear { value: Some(1.0), summary: "ok".into() })
}

fn book() -> Book {
    Book::new(IncidentsConfig::default(), Vec::new(), Vec::new(), T0)
}

/// Commits taken: the pushed (id, revision, state) triples.
fn pushed(b: &mut Book) -> Vec<(String, u32, IncidentState)> {
    b.take().0.outbox.iter().map(|i| (i.id.clone(), i.revision, i.state)).collect()
}

#[test]
fn one_incident_per_device_and_rule_repeats_update_it() {
    let mut b = book();
    b.apply(open("g1", "gas_high", Severity::Critical), T0);
    b.apply(open("g1", "gas_high", Severity::Critical), T0 + 1000);
    b.apply(signal("g1", "gas_high", Change::Repeat { severity: Severity::Critical, value: Some(60.0), summary: "gas".into() }), T0 + 2000);
    b.apply(open("g2", "gas_high", Severity::Critical), T0);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 2, "one push per new incident, repeats are not pushed: {p:?}");
    let id = &p[0].0;
    let inc = b.get(id).expect("incident");
    assert_eq!(inc.count, 3);
    assert_eq!(inc.value, Some(60.0));
    assert_eq!(inc.revision, 1);
    assert_eq!(inc.key, "xh/g1/gas_high");
}

#[test]
fn the_closed_loop_and_its_refusals() {
    let mut b = book();
    b.apply(open("g1", "gas_high", Severity::Critical), T0);
    let id = pushed(&mut b)[0].0.clone();
    let err = b.transition(&id, Action::Close, "li", None, None, T0).expect_err("close an open incident");
    assert!(matches!(err, TransitionError::NotAllowed { .. }), "{err}");
    assert!(matches!(b.transition(&id, Action::Dispatch, "li", None, None, T0), Err(TransitionError::Invalid(_))), "dispatch needs a crew");
    assert!(matches!(b.transition(&id, Action::Ack, " ", None, None, T0), Err(TransitionError::Invalid(_))), "actor required");
    assert!(matches!(b.transition("inc-nope", Action::Ack, "li", None, None, T0), Err(TransitionError::NotFound(_))));
    let inc = b.transition(&id, Action::Ack, "li", Some("on it".into()), None, T0 + 10).expect("ack");
    assert_eq!((inc.state, inc.revision), (IncidentState::Acknowledged, 2));
    let inc = b.transition(&id, Action::Dispatch, "li", None, Some("crew-7".into()), T0 + 20).expect("dispatch");
    assert_eq!(inc.crew.as_deref(), Some("crew-7"));
    b.transition(&id, Action::Resolve, "wang", Some("valve replaced".into()), None, T0 + 30).expect("resolve");
    let inc = b.transition(&id, Action::Close, "li", None, None, T0 + 40).expect("close");
    assert_eq!((inc.state, inc.revision), (IncidentState::Closed, 5));
    let actions: Vec<&str> = inc.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(actions, ["open", "acknowledged", "dispatched", "resolved", "closed"]);
    assert_eq!(inc.history[1].note.as_deref(), Some("on it"));
    assert_eq!(inc.history[2].note.as_deref(), Some("to crew-7"));
    let p = pushed(&mut b);
    assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [2, 3, 4, 5], "each transition is one pushed revision");
    // After close, the condition coming back is a new incident.
    b.tick(T0 + 50, false);
    b.apply(open("g1", "gas_high", Severity::Critical), T0 + 60);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1);
    assert_ne!(p[0].0, id);
}

#[test]
fn cleared_then_back_within_the_window_reopens_the_same_incident() {
    let mut b = book();
    b.apply(open("g1", "gas_low", Severity::Major), T0);
    b.apply(clear("g1", "gas_low"), T0 + 1000);
    b.apply(open("g1", "gas_low", Severity::Major), T0 + 2000);
    let p = pushed(&mut b);
    assert_eq!(p.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(), [(1, IncidentState::Open), (2, IncidentState::Cleared), (3, IncidentState::Open)]);
    assert!(p.iter().all(|x| x.0 == p[0].0), "same incident");
    // Past the re-open window, a new one.
    b.apply(clear("g1", "gas_low"), T0 + 3000);
    b.tick(T0 + 3000 + IncidentsConfig::default().reopen_within.as_ms(), false);
    pushed(&mut b);
    b.apply(open("g1", "gas_low", Severity::Major), T0 + 4000 + IncidentsConfig::default().reopen_within.as_ms());
    let p2 = pushed(&mut b);
    assert_eq!(p2.len(), 1);
    assert_ne!(p2[0].0, p[0].0);
}

#[test]
fn flapping_is_one_incident_with_few_pushes_and_settles_when_quiet() {
    let mut b = book();
    let mut now = T0;
    for _ in 0..30 {
        b.apply(open("s1", "device_offline", Severity::Warning), now);
        now += 10_000;
        b.apply(clear("s1", "device_offline"), now);
        now += 10_000;
    }
    let p = pushed(&mut b);
    let ids: std::collections::HashSet<_> = p.iter().map(|x| &x.0).collect();
    assert_eq!(ids.len(), 1, "one incident");
    assert!(p.len() <= 5, "flips after the threshold are not pushed: {} pushes", p.len());
    let id = p[0].0.clone();
    assert!(b.get(&id).expect("incident").flapping);
    assert_eq!(b.get(&id).expect("incident").count, 30);
    // Quiet: flapping ends, with the last word (clear) applied.
    b.tick(now + IncidentsConfig::default().flap_quiet.as_ms(), false);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].2, IncidentState::Cleared);
    assert!(!b.get(&id).expect("incident").flapping);
}

#[test]
fn silences_hold_signals_back_and_release_them_when_they_end() {
    let cfg = SilenceConfig {
        id: Some("s".into()),
        site: Some("xh".into()),
        device: None,
        kind: None,
        rule: None,
        start: None,
        end: Some(crate::model::rfc3339(T0 + 60_000)),
        recurring: None,
        reason: "maintenance".into(),
        actor: None,
    };
    let mut b = Book::new(IncidentsConfig::default(), Vec::new(), vec![Silence::new(cfg).expect("silence")], T0);
    b.apply(open("g1", "gas_low", Severity::Major), T0);
    b.apply(open("g2", "gas_low", Severity::Major), T0);
    b.apply(clear("g2", "gas_low"), T0 + 1000);
    b.apply(open("g3", "device_alarm", Severity::Critical), T0);
    b.apply(clear("g3", "device_alarm"), T0 + 2000);
    let p = pushed(&mut b);
    assert!(p.is_empty(), "nothing pushed inside the window: {p:?}");
    assert_eq!(b.stats.silenced, 3);
    b.tick(T0 + 30_000, false);
    assert!(pushed(&mut b).is_empty(), "still silenced");
    b.tick(T0 + 60_000, false);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1, "g1 still holds when the window ends; g2 cleared inside it");
    assert_eq!(b.get(&p[0].0).expect("incident").device, "g1");
}

#[test]
fn unacknowledged_critical_incidents_escalate_then_renotify() {
    let mut b = book();
    b.apply(open("g1", "gas_high", Severity::Critical), T0);
    b.apply(open("g2", "gas_low", Severity::Major), T0);
    pushed(&mut b);
    b.tick(T0 + 299_000, false);
    assert!(pushed(&mut b).is_empty());
    b.tick(T0 + 300_000, false);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1, "only the critical one escalates");
    let inc = b.get(&p[0].0).expect("incident");
    assert_eq!((inc.escalation, inc.history.last().map(|h| h.action.as_str())), (1, Some("escalated")));
    b.tick(T0 + 600_000, false);
    assert_eq!(b.get(&p[0].0).expect("incident").escalation, 2);
    b.transition(&p[0].0.clone(), Action::Ack, "li", None, None, T0 + 600_001).expect("ack");
    pushed(&mut b);
    b.tick(T0 + 2_000_000, false);
    assert!(pushed(&mut b).is_empty(), "acknowledged: no more escalation");
}

#[test]
fn commands_are_sent_with_the_incident_and_their_ack_is_recorded() {
    let mut b = book();
    let mut s = open("g1", "gas_high", Severity::Critical);
    if let Change::Open { action, .. } = &mut s.change {
        *action = Some(CommandKind::CloseValve);
    }
    b.apply(s, T0);
    let (commit, commands) = b.take();
    assert_eq!(commands.len(), 1);
    assert_eq!((commands[0].cmd, commands[0].device.as_str()), (CommandKind::CloseValve, "g1"));
    let id = commit.outbox[0].id.clone();
    b.command_acked("other-device", &commands[0].id, T0 + 100);
    b.command_acked("g1", &commands[0].id, T0 + 200);
    let inc = b.get(&id).expect("incident");
    let actions: Vec<&str> = inc.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(actions, ["open", "command", "command_acked"]);
    // One that is never answered is noted.
    let mut s = open("g2", "gas_high", Severity::Critical);
    if let Change::Open { action, .. } = &mut s.change {
        *action = Some(CommandKind::CloseValve);
    }
    b.apply(s, T0);
    let (commit, _) = b.take();
    let id2 = commit.outbox.last().expect("pushed").id.clone();
    b.tick(T0 + 30_000, false);
    assert_eq!(b.get(&id2).expect("incident").history.last().map(|h| h.action.as_str()), Some("command_unanswered"));
}

#[test]
fn a_restart_resumes_open_incidents_without_reopening() {
    let mut b = book();
    b.apply(open("g1", "gas_high", Severity::Critical), T0);
    let (commit, _) = b.take();
    let stored: Vec<Incident> = commit.incidents.iter().map(|i| (**i).clone()).collect();
    let mut b = Book::new(IncidentsConfig::default(), stored, Vec::new(), T0 + 5000);
    assert_eq!(b.active_device_rules(), vec![("g1".to_owned(), "gas_high".to_owned(), Scope::Device)]);
    b.apply(open("g1", "gas_high", Severity::Critical), T0 + 6000);
    b.apply(clear("g1", "gas_high"), T0 + 7000);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1, "no duplicate open, only the clear: {p:?}");
    assert_eq!((p[0].1, p[0].2), (2, IncidentState::Cleared));
    let _ = Arc::clone(&commit.outbox[0]);
}

#[test]
fn each_reminder_is_its_own_pushed_revision_and_overdue_raises_it() {
    let mut b = book();
    let remind = |days: u32| signal("g1", "inspection_due", Change::Remind { due_ms: T0 + 30 * 86_400_000, days_before: days, summary: format!("due in {days} days") });
    b.apply(remind(30), T0);
    b.apply(remind(7), T0 + 1000);
    b.apply(open("g1", "inspection_due", Severity::Warning), T0 + 2000);
    let p = pushed(&mut b);
    assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [1, 2, 3], "open, reminder, severity: {p:?}");
    let inc = b.get(&p[0].0).expect("incident");
    assert_eq!(inc.severity, Severity::Warning);
    let actions: Vec<&str> = inc.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(actions, ["open", "reminder", "severity"]);
    assert_eq!(inc.history[1].note.as_deref(), Some("due in 7 days"));
}

// ---------------------------------------------------------------------------------------------
// Situations: one incident per device and situation.

fn situations() -> Vec<SituationDef> {
    crate::rules::RuleSet::default_pack().situations().to_vec()
}

fn situation_book() -> Book {
    book().with_situations(situations())
}

fn open_at(device: &str, rule: &str, severity: Severity, value: f64, threshold: f64, action: Option<CommandKind>) -> Signal {
    signal(device, rule, Change::Open { severity, metric: Some(Metric::GasLel), value: Some(value), threshold: Some(threshold), summary: format!("{rule} {value}"), action })
}

fn alarm(device: &str, metric: Option<Metric>) -> Signal {
    signal(device, "device_alarm", Change::Open { severity: Severity::Critical, metric, value: Some(30.0), threshold: None, summary: "alarm".into(), action: None })
}

#[test]
fn a_gas_leak_rises_and_falls_as_one_incident() {
    let mut b = situation_book();
    b.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    b.apply(open_at("g1", "gas_high", Severity::Critical, 55.0, 50.0, Some(CommandKind::CloseValve)), T0 + 1000);
    let (commit, commands) = b.take();
    assert_eq!(commands.len(), 1, "close_valve still sent when gas_high joins");
    assert_eq!(commands[0].cmd, CommandKind::CloseValve);
    let p: Vec<_> = commit.outbox.iter().map(|i| (i.id.clone(), i.revision, i.rule.clone(), i.severity)).collect();
    let id = p[0].0.clone();
    assert_eq!(
        p.iter().map(|x| (x.1, x.2.as_str(), x.3)).collect::<Vec<_>>(),
        [(1, "gas_low", Severity::Major), (2, "gas_high", Severity::Critical)]
    );
    assert!(p.iter().all(|x| x.0 == id));
    b.apply(signal("g1", "gas_valve_failed", Change::Open { severity: Severity::Critical, metric: Some(Metric::ValveClosed), value: None, threshold: Some(1.0), summary: "valve".into(), action: None }), T0 + 31_000);
    // Repeats of members are not pushed.
    b.apply(signal("g1", "gas_low", Change::Repeat { severity: Severity::Major, value: Some(56.0), summary: "x".into() }), T0 + 32_000);
    b.apply(signal("g1", "gas_high", Change::Repeat { severity: Severity::Critical, value: Some(57.0), summary: "x".into() }), T0 + 33_000);
    let inc = b.get(&id).expect("incident").clone();
    assert_eq!((inc.rule.as_str(), inc.revision), ("gas_valve_failed", 3));
    assert_eq!(inc.rules_active, ["gas_low", "gas_high", "gas_valve_failed"]);
    assert_eq!((inc.key.as_str(), inc.situation.as_deref()), ("xh/g1/gas_leak", Some("gas_leak")));
    // The valve closes late: the follow-up clears, the incident falls back to gas_high.
    b.apply(signal("g1", "gas_valve_failed", Change::Clear { value: Some(1.0), summary: "closed".into() }), T0 + 40_000);
    let inc = b.get(&id).expect("incident").clone();
    assert_eq!((inc.rule.as_str(), inc.severity, inc.value), ("gas_high", Severity::Critical, Some(57.0)));
    b.apply(signal("g1", "gas_high", Change::Clear { value: Some(35.0), summary: "down".into() }), T0 + 70_000);
    let inc = b.get(&id).expect("incident").clone();
    assert_eq!((inc.rule.as_str(), inc.severity, inc.state, inc.threshold), ("gas_low", Severity::Major, IncidentState::Open, Some(20.0)));
    assert_eq!(inc.rules_active, ["gas_low"]);
    b.apply(clear("g1", "gas_low"), T0 + 100_000);
    let inc = b.get(&id).expect("incident").clone();
    assert_eq!((inc.state, inc.revision), (IncidentState::Cleared, 6));
    assert!(inc.rules_active.is_empty());
    let actions: Vec<&str> = inc.history.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(actions, ["open", "raised", "command", "raised", "lowered", "lowered", "cleared"]);
    let p = pushed(&mut b);
    assert_eq!(p.iter().map(|x| x.1).collect::<Vec<_>>(), [3, 4, 5, 6], "one pushed revision per change");
    assert!(p.iter().all(|x| x.0 == id), "one incident");
    // Back within the re-open window, at gas_high straight away: the same incident, valve closed again.
    b.apply(open_at("g1", "gas_high", Severity::Critical, 60.0, 50.0, Some(CommandKind::CloseValve)), T0 + 110_000);
    let (commit, commands) = b.take();
    assert_eq!((commit.outbox.len(), commands.len()), (1, 1));
    let inc = &commit.outbox[0];
    assert_eq!((inc.id.as_str(), inc.state, inc.rule.as_str()), (id.as_str(), IncidentState::Open, "gas_high"));
    assert_eq!(b.stats.opened, 1);
}

#[test]
fn a_devices_own_alarm_joins_the_situation_it_confirms() {
    let mut b = situation_book();
    b.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    b.apply(alarm("g1", Some(Metric::GasLel)), T0 + 1000);
    // An alarm without a metric stays its own incident.
    b.apply(alarm("g2", None), T0 + 1000);
    let p = pushed(&mut b);
    let ids: std::collections::BTreeSet<_> = p.iter().map(|x| x.0.clone()).collect();
    assert_eq!(ids.len(), 2, "{p:?}");
    let id = p[0].0.clone();
    let inc = b.get(&id).expect("incident");
    assert_eq!((inc.rule.as_str(), inc.severity), ("device_alarm", Severity::Critical));
    assert_eq!(inc.rules_active, ["gas_low", "device_alarm"]);
    // alarm_cleared carries no metric: it still finds the situation.
    b.apply(signal("g1", "device_alarm", Change::Clear { value: None, summary: "alarm cleared".into() }), T0 + 2000);
    let inc = b.get(&id).expect("incident");
    assert_eq!((inc.rule.as_str(), inc.severity, inc.state), ("gas_low", Severity::Major, IncidentState::Open));
    assert_eq!(b.stats.signals_without_incident, 0);
}

#[test]
fn resolving_a_situation_releases_every_member_and_the_next_leak_is_new() {
    let mut b = situation_book();
    b.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    b.apply(open_at("g1", "gas_high", Severity::Critical, 55.0, 50.0, None), T0 + 1000);
    let id = pushed(&mut b)[0].0.clone();
    let mut active: Vec<(String, String)> = b.active_device_rules().into_iter().map(|(d, r, _)| (d, r)).collect();
    active.sort();
    assert_eq!(active, [("g1".into(), "gas_high".into()), ("g1".into(), "gas_low".into())]);
    b.transition(&id, Action::Resolve, "li", None, None, T0 + 2000).expect("resolve");
    let mut released: Vec<String> = b.take_released().into_iter().map(|r| r.rule).collect();
    released.sort();
    assert_eq!(released, ["gas_high", "gas_low"]);
    pushed(&mut b);
    b.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0 + 3000);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1);
    assert_ne!(p[0].0, id);
}

#[test]
fn incidents_keyed_by_rule_keep_their_ids_and_join_their_situation_on_load() {
    // Stored by a gateway that had no situations: gas_low and gas_high of g1, gas_low of g2.
    let mut old = book();
    old.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    old.apply(open_at("g1", "gas_high", Severity::Critical, 55.0, 50.0, None), T0 + 1000);
    old.apply(open_at("g2", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    let (commit, _) = old.take();
    let stored: Vec<Incident> = commit.incidents.iter().map(|i| (**i).clone()).collect();
    let id_of = |device: &str, rule: &str| stored.iter().find(|i| i.device == device && i.rule == rule).map(|i| i.id.clone()).expect("stored");
    let (g1_low, g1_high, g2_low) = (id_of("g1", "gas_low"), id_of("g1", "gas_high"), id_of("g2", "gas_low"));
    let mut b = Book::new(IncidentsConfig::default(), stored, Vec::new(), T0 + 5000).with_situations(situations());
    assert_eq!(b.get(&g1_high).expect("loaded").key, "xh/g1/gas_leak", "the worst takes the situation");
    assert_eq!(b.get(&g1_low).expect("loaded").key, "xh/g1/gas_low", "the other keeps its rule key until it ends");
    assert_eq!(b.get(&g2_low).expect("loaded").key, "xh/g2/gas_leak");
    // g2 rises: the loaded incident is raised, not a new one.
    b.apply(open_at("g2", "gas_high", Severity::Critical, 55.0, 50.0, None), T0 + 6000);
    // g1's gas_low clears into its own incident; gas_high into the situation.
    b.apply(clear("g1", "gas_low"), T0 + 7000);
    b.apply(clear("g1", "gas_high"), T0 + 7000);
    let p = pushed(&mut b);
    let touched: Vec<(String, u32, IncidentState)> = p;
    assert_eq!(touched.len(), 3, "{touched:?}");
    assert!(touched.contains(&(g2_low.clone(), 2, IncidentState::Open)));
    assert!(touched.contains(&(g1_low, 2, IncidentState::Cleared)));
    assert!(touched.contains(&(g1_high, 2, IncidentState::Cleared)));
    assert_eq!(b.get(&g2_low).expect("g2").rule, "gas_high");
    assert_eq!(b.stats.opened, 0);
}

#[test]
fn without_situations_every_rule_is_its_own_incident() {
    let mut b = book().with_situations(Vec::new());
    b.apply(open_at("g1", "gas_low", Severity::Major, 22.0, 20.0, None), T0);
    b.apply(open_at("g1", "gas_high", Severity::Critical, 55.0, 50.0, None), T0 + 1000);
    b.apply(alarm("g1", Some(Metric::GasLel)), T0 + 1000);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 3);
    assert_eq!(p.iter().map(|x| &x.0).collect::<std::collections::BTreeSet<_>>().len(), 3);
    assert_eq!(b.get(&p[0].0).expect("incident").rules_active, ["gas_low"]);
    let off = crate::rules::RuleSet::from_config(&crate::rules::RulesConfig { situations: Some(false), ..Default::default() }).expect("rules");
    assert!(off.situations().is_empty());
    assert_eq!(situations().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["gas_leak", "smoke"]);
}

#[test]
fn a_situation_naming_an_unknown_or_shared_rule_is_refused_with_its_key() {
    let pack = |situations: &str| {
        format!("{situations}\n[[rule]]\nname = \"a\"\nkind = \"event\"\nseverity = \"major\"\nopen_on = [\"alarm\"]\n[[rule]]\nname = \"b\"\nkind = \"event\"\nseverity = \"major\"\nopen_on = [\"fault\"]\n")
    };
    let err = |s: &str| crate::rules::RuleSet::from_pack_str(&pack(s), &[]).expect_err("refused").to_string();
    assert!(err("[[situation]]\nname = \"x\"\nrules = [\"nope\"]\n").contains("situation x: rules: no rule named \"nope\""));
    assert!(err("[[situation]]\nname = \"x\"\nrules = [\"a\"]\n[[situation]]\nname = \"y\"\nrules = [\"a\"]\n").contains("already in another situation"));
    assert!(err("[[situation]]\nname = \"x\"\nrules = [\"a\"]\nlevel = 1\n").contains("[[situation]]"));
    let ok = crate::rules::RuleSet::from_pack_str(&pack("[[situation]]\nname = \"x\"\nrules = [\"a\", \"b\"]\n"), &[]).expect("loads");
    assert_eq!(ok.situations()[0].alarm_rules, ["device_alarm"]);
}
