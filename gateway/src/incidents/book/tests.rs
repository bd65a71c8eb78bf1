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

/// A critical gas leak of `device` whose rule asks for `close_valve`.
fn leak_closing_the_valve(device: &str) -> Signal {
    let mut s = open(device, "gas_high", Severity::Critical);
    if let Change::Open { action, .. } = &mut s.change {
        *action = Some(CommandKind::CloseValve);
    }
    s
}

#[test]
fn a_command_still_unanswered_when_an_incident_is_taken_over_is_sent_again_under_its_id() {
    let mut b = book();
    b.apply(leak_closing_the_valve("g1"), T0);
    b.apply(leak_closing_the_valve("g2"), T0);
    let (commit, first) = b.take();
    assert_eq!(first.len(), 2);
    b.command_acked("g2", &first[1].id, T0 + 100);
    let (acked, _) = b.take();
    // As the store or the cluster's log holds them: g1's command unanswered, g2's acknowledged.
    let latest = |id: &str| acked.incidents.iter().chain(&commit.incidents).find(|i| i.id == id).map(|i| (**i).clone()).expect("incident");
    let held = vec![latest(&commit.outbox[0].id), latest(&commit.outbox[1].id)];

    for how in ["restart", "adoption"] {
        let mut b = match how {
            "restart" => Book::new(IncidentsConfig::default(), held.clone(), Vec::new(), T0 + 5000),
            _ => {
                let mut b = book();
                for inc in &held {
                    assert!(b.adopt(inc.clone(), T0 + 5000));
                }
                b
            }
        };
        let (commit, again) = b.take();
        assert!(commit.outbox.is_empty(), "{how}: no new revision");
        assert_eq!(again.len(), 1, "{how}: only the unanswered one: {again:?}");
        assert_eq!((again[0].id.as_str(), again[0].cmd, again[0].device.as_str()), (first[0].id.as_str(), CommandKind::CloseValve, "g1"), "{how}");
        assert_eq!(b.stats.commands_resent, 1, "{how}");
        // Taking the same incident over again sends nothing more.
        if how == "adoption" {
            let mut newer = held[0].clone();
            newer.count += 1;
            assert!(b.adopt(newer, T0 + 6000));
            assert!(b.take().1.is_empty(), "adopted twice, sent once");
        }
        // Its ack is recorded; a new command of this book does not reuse a taken id.
        b.command_acked("g1", &first[0].id, T0 + 6000);
        let inc = b.get(&held[0].id).expect("incident");
        assert_eq!(inc.history.last().map(|h| (h.action.as_str(), h.note.as_deref())), Some(("command_acked", Some(format!("{} after 1000 ms", first[0].id).as_str()))), "{how}");
        b.apply(leak_closing_the_valve("g3"), T0 + 7000);
        let (_, next) = b.take();
        assert!(first.iter().all(|c| c.id != next[0].id), "{how}: {} reused", next[0].id);
    }
    // Unanswered again after the resend: given up on, and not sent a third time at the next load.
    let mut b = Book::new(IncidentsConfig::default(), held.clone(), Vec::new(), T0 + 5000);
    b.take();
    b.tick(T0 + 5000 + 30_000, false);
    let (commit, _) = b.take();
    let given_up: Vec<Incident> = commit.incidents.iter().map(|i| (**i).clone()).collect();
    assert_eq!(given_up.last().and_then(|i| i.history.last()).map(|h| h.action.as_str()), Some("command_unanswered"));
    let mut b = Book::new(IncidentsConfig::default(), given_up, Vec::new(), T0 + 40_000);
    assert!(b.take().1.is_empty());
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

// ---------------------------------------------------------------------------------------------
// Parents (`[[parent]]`): a confirmed fire over its site's smoke incidents.

fn pack_book() -> Book {
    let pack = crate::rules::RuleSet::default_pack();
    book().with_situations(pack.situations().to_vec()).with_parents(pack.parents().to_vec()).with_groups(pack.groups().to_vec())
}

fn at_site(site: &str, mut s: Signal) -> Signal {
    s.site = site.into();
    s
}

fn smoke(device: &str) -> Signal {
    let mut s = signal(device, "smoke", Change::Open { severity: Severity::Critical, metric: Some(Metric::SmokeDbM), value: Some(0.3), threshold: Some(0.15), summary: "smoke".into(), action: None });
    s.kind = DeviceKind::SmokeDetector;
    s
}

fn fire(devices: &[&str]) -> Signal {
    Signal {
        rule: "fire_confirmed".into(),
        scope: Scope::Site,
        site: "xh".into(),
        device: devices.last().copied().unwrap_or_default().into(),
        kind: DeviceKind::SmokeDetector,
        ts_ms: T0,
        change: Change::Open { severity: Severity::Critical, metric: None, value: Some(devices.len() as f64), threshold: Some(2.0), summary: "fire".into(), action: None },
        members: devices.iter().map(|d| Arc::from(*d)).collect(),
    }
}

/// The pushed incidents, in commit order.
fn pushed_incidents(b: &mut Book) -> Vec<Incident> {
    b.take().0.outbox.iter().map(|i| (**i).clone()).collect()
}

fn id_of(p: &[Incident], device: &str, rule: &str) -> String {
    p.iter().find(|i| i.device == device && i.rule == rule).map(|i| i.id.clone()).unwrap_or_else(|| panic!("{device}/{rule} in {p:?}"))
}

#[test]
fn a_confirmed_fire_is_the_parent_of_its_sites_smoke_incidents_both_ways() {
    let mut b = pack_book();
    b.apply(smoke("s1"), T0);
    b.apply(smoke("s2"), T0 + 1000);
    // Not children: a gas detector's alarm at the same site, smoke at another site.
    b.apply(alarm("g1", None), T0 + 1000);
    b.apply(at_site("other", smoke("s9")), T0 + 1000);
    let p = pushed_incidents(&mut b);
    let (s1, s2, g1, s9) = (id_of(&p, "s1", "smoke"), id_of(&p, "s2", "smoke"), id_of(&p, "g1", "device_alarm"), id_of(&p, "s9", "smoke"));
    b.apply(fire(&["s1", "s2"]), T0 + 2000);
    let p = pushed_incidents(&mut b);
    let fire_id = p[0].id.clone();
    assert_eq!(
        p.iter().map(|i| (i.id.clone(), i.revision)).collect::<Vec<_>>(),
        [(fire_id.clone(), 1), (s1.clone(), 2), (s2.clone(), 2)],
        "the parent first, then one revision per child linked"
    );
    assert_eq!(p[0].children, [s1.clone(), s2.clone()]);
    for child in [&s1, &s2] {
        let c = b.get(child).expect("child");
        assert_eq!(c.parent.as_deref(), Some(fire_id.as_str()));
        assert_eq!(c.history.last().map(|h| h.action.as_str()), Some("parent"));
    }
    for other in [&g1, &s9] {
        assert_eq!(b.get(other).expect("not a child").parent, None);
    }
    // A smoke detector opened after the fire joins it: its first revision names the parent,
    // the parent gets a revision listing it.
    b.apply(smoke("s3"), T0 + 3000);
    let p = pushed_incidents(&mut b);
    let s3 = id_of(&p, "s3", "smoke");
    assert_eq!(p.iter().map(|i| (i.id.clone(), i.revision)).collect::<Vec<_>>(), [(s3.clone(), 1), (fire_id.clone(), 2)]);
    assert_eq!(p[0].parent.as_deref(), Some(fire_id.as_str()));
    assert_eq!(p[1].children, [s1.clone(), s2.clone(), s3.clone()]);
    assert_eq!(p[1].history.last().map(|h| h.action.as_str()), Some("child_added"));
    // A heat reading joining s1's smoke situation does not link it twice.
    b.apply(signal("s1", "heat", Change::Open { severity: Severity::Critical, metric: Some(Metric::TempC), value: Some(70.0), threshold: Some(60.0), summary: "heat".into(), action: None }), T0 + 3500);
    pushed_incidents(&mut b);
    assert_eq!(b.get(&fire_id).expect("fire").children.len(), 3);
}

#[test]
fn acknowledging_the_fire_acknowledges_its_open_children_each_with_its_own_revision() {
    let mut b = pack_book();
    b.apply(smoke("s1"), T0);
    b.apply(smoke("s2"), T0);
    b.apply(smoke("s3"), T0);
    b.apply(fire(&["s1", "s2", "s3"]), T0 + 1000);
    let p = pushed_incidents(&mut b);
    let fire_id = p.iter().find(|i| i.rule == "fire_confirmed").map(|i| i.id.clone()).expect("fire");
    let (s1, s2, s3) = (id_of(&p, "s1", "smoke"), id_of(&p, "s2", "smoke"), id_of(&p, "s3", "smoke"));
    // s2 is already taken by someone; s3 cleared on its own.
    b.transition(&s2, Action::Ack, "wang", None, None, T0 + 2000).expect("ack s2");
    b.apply(signal("s3", "smoke", Change::Clear { value: Some(0.0), summary: "clear".into() }), T0 + 2000);
    pushed_incidents(&mut b);
    let fire = b.transition(&fire_id, Action::Ack, "li", Some("crew en route".into()), None, T0 + 3000).expect("ack fire");
    assert_eq!(fire.state, IncidentState::Acknowledged);
    let p = pushed_incidents(&mut b);
    assert_eq!(p.iter().map(|i| (i.id.clone(), i.state)).collect::<Vec<_>>(), [(fire_id.clone(), IncidentState::Acknowledged), (s1.clone(), IncidentState::Acknowledged)]);
    let last = b.get(&s1).expect("s1").history.last().cloned().expect("entry");
    assert_eq!((last.actor.as_str(), last.action.as_str()), ("li", "acknowledged"));
    assert_eq!(last.note, Some(format!("with parent {fire_id}: crew en route")));
    assert_eq!(b.get(&s2).expect("s2").history.last().map(|h| h.actor.as_str()), Some("wang"), "an acknowledged child keeps its own ack");
    assert_eq!(b.get(&s3).expect("s3").state, IncidentState::Cleared);
    // Only the ack cascades: resolving the fire leaves the children to the crew.
    b.transition(&fire_id, Action::Resolve, "li", None, None, T0 + 4000).expect("resolve");
    let p = pushed_incidents(&mut b);
    assert_eq!(p.len(), 1);
    assert_eq!(b.get(&s1).expect("s1").state, IncidentState::Acknowledged);
    // A resolved fire takes no more children.
    b.apply(smoke("s4"), T0 + 5000);
    let p = pushed_incidents(&mut b);
    assert_eq!((p.len(), p[0].parent.as_deref()), (1, None));
}

#[test]
fn without_parents_nothing_is_linked_and_an_ack_is_the_parents_alone() {
    let pack = crate::rules::RuleSet::default_pack();
    let mut b = book().with_situations(pack.situations().to_vec()).with_groups(pack.groups().to_vec());
    b.apply(smoke("s1"), T0);
    b.apply(smoke("s2"), T0);
    b.apply(fire(&["s1", "s2"]), T0);
    let p = pushed_incidents(&mut b);
    assert_eq!(p.len(), 3);
    assert!(p.iter().all(|i| i.parent.is_none() && i.children.is_empty()));
    let fire_id = p.iter().find(|i| i.rule == "fire_confirmed").map(|i| i.id.clone()).expect("fire");
    b.transition(&fire_id, Action::Ack, "li", None, None, T0).expect("ack");
    assert_eq!(pushed_incidents(&mut b).len(), 1);
    let cfg = |situations, parents, groups| crate::rules::RulesConfig { situations, parents, groups, ..Default::default() };
    let off = crate::rules::RuleSet::from_config(&cfg(None, Some(false), None)).expect("rules");
    assert!(off.parents().is_empty() && !off.groups().is_empty() && !off.situations().is_empty());
    let off = crate::rules::RuleSet::from_config(&cfg(None, None, Some(false))).expect("rules");
    assert!(!off.parents().is_empty() && off.groups().is_empty());
    let old = crate::rules::RuleSet::from_config(&cfg(Some(false), None, None)).expect("rules");
    assert!(old.parents().is_empty() && old.groups().is_empty() && old.situations().is_empty(), "the behaviour from before: one incident per rule");
}

// ---------------------------------------------------------------------------------------------
// Groups (`[[group]]`): an outage storm as one site incident.

fn offline(device: &str) -> Signal {
    signal(device, "device_offline", Change::Open { severity: Severity::Warning, metric: None, value: None, threshold: None, summary: format!("{device} offline"), action: None })
}

fn back(device: &str) -> Signal {
    signal(device, "device_offline", Change::Clear { value: None, summary: format!("{device} back") })
}

#[test]
fn an_outage_storm_is_one_site_incident_that_folds_the_early_device_incidents() {
    let mut b = pack_book();
    b.apply(offline("d1"), T0);
    b.apply(offline("d2"), T0 + 5000);
    let p = pushed_incidents(&mut b);
    let (d1, d2) = (p[0].id.clone(), p[1].id.clone());
    assert_eq!(p.len(), 2, "below the threshold: one incident per device");
    // Somebody took d2 already: it is not taken from them.
    b.transition(&d2, Action::Ack, "wang", None, None, T0 + 6000).expect("ack");
    pushed_incidents(&mut b);
    b.apply(offline("d3"), T0 + 10_000);
    let p = pushed_incidents(&mut b);
    let storm = p[0].clone();
    assert_eq!((storm.scope, storm.key.as_str(), storm.situation.as_deref(), storm.rule.as_str()), (Scope::Site, "xh/*/site_offline", Some("site_offline"), "device_offline"));
    assert_eq!((storm.severity, storm.state, storm.revision), (Severity::Major, IncidentState::Open, 1));
    assert_eq!(storm.devices, ["d1", "d2", "d3"]);
    assert_eq!(storm.children, [d1.clone(), d2.clone()]);
    assert!(storm.summary_zh.starts_with("站点设备成批离线"), "{}", storm.summary_zh);
    assert_eq!(p.len(), 3, "the storm, then the two early incidents, each one revision: {p:?}");
    assert_eq!((p[1].id.as_str(), p[1].state, p[1].parent.as_deref()), (d1.as_str(), IncidentState::Closed, Some(storm.id.as_str())));
    assert_eq!(p[1].history.last().map(|h| h.action.as_str()), Some("folded"));
    assert_eq!((p[2].id.as_str(), p[2].state, p[2].parent.as_deref()), (d2.as_str(), IncidentState::Acknowledged, Some(storm.id.as_str())));
    assert!(b.take_released().is_empty(), "folding does not end the rule: the devices' return still arrives");
    // Seven more within the interval: one revision of the same incident when it is up.
    for i in 4..=10 {
        b.apply(offline(&format!("d{i}")), T0 + 11_000 + i);
    }
    assert!(pushed_incidents(&mut b).is_empty(), "coalesced until storm_update_every has passed");
    b.tick(T0 + 14_999, false);
    assert!(pushed_incidents(&mut b).is_empty());
    b.tick(T0 + 15_000, false);
    let p = pushed_incidents(&mut b);
    assert_eq!(p.iter().map(|i| (i.id.clone(), i.revision)).collect::<Vec<_>>(), [(storm.id.clone(), 2)]);
    let inc = b.get(&storm.id).expect("storm").clone();
    assert_eq!((inc.devices.len(), inc.value, inc.count), (10, Some(10.0), 10));
    assert_eq!(inc.devices[3..], ["d4", "d5", "d6", "d7", "d8", "d9", "d10"]);
    let last = inc.history.last().expect("history");
    assert_eq!((last.action.as_str(), last.note.as_deref()), ("device_added", Some("+7: d4, d5, d6, d7, d8, d9, d10; 10 now")));
    let mut active: Vec<String> = b.active_device_rules().into_iter().filter(|(_, r, _)| r == "device_offline").map(|(d, _, _)| d).collect();
    active.sort();
    active.dedup();
    assert_eq!(active.len(), 10, "the rule engine resumes every listed device: {active:?}");
    assert_eq!(b.stats.opened, 3, "d1, d2 and the storm");
    // Returns: the first after a quiet interval is pushed at once, the next waits for the
    // interval; d2's own incident sees its condition clear at once.
    b.apply(back("d1"), T0 + 20_000);
    b.apply(back("d2"), T0 + 21_000);
    let p = pushed_incidents(&mut b);
    let actions = |p: &[Incident]| p.iter().map(|i| (i.id.clone(), i.history.last().map(|h| h.action.clone()).unwrap_or_default())).collect::<Vec<_>>();
    assert_eq!(actions(&p), [(storm.id.clone(), "device_removed".to_owned()), (d2.clone(), "condition_cleared".to_owned())]);
    assert_eq!(p[0].devices.len(), 9);
    b.tick(T0 + 25_000, false);
    let p = pushed_incidents(&mut b);
    assert_eq!(actions(&p), [(storm.id.clone(), "device_removed".to_owned())]);
    assert_eq!((p[0].devices.len(), p[0].revision), (8, 4));
    assert_eq!(p[0].history.last().and_then(|h| h.note.as_deref()), Some("-1: d2; 8 now"));
    for i in 3..=10 {
        b.apply(back(&format!("d{i}")), T0 + 30_000 + i);
    }
    let inc = b.get(&storm.id).expect("storm").clone();
    assert_eq!((inc.state, inc.devices.len(), inc.revision), (IncidentState::Cleared, 0, 6), "d3 at once, the last one back clears it with the rest");
    assert!(inc.rules_active.is_empty());
    assert_eq!(b.stats.signals_without_incident, 0);
    // Offline again within the re-open window: the same site incident.
    pushed_incidents(&mut b);
    b.apply(offline("d5"), T0 + 40_000);
    let p = pushed_incidents(&mut b);
    assert_eq!((p.len(), p[0].id.as_str(), p[0].state, p[0].devices.clone()), (1, storm.id.as_str(), IncidentState::Open, vec!["d5".to_owned()]));
}

#[test]
fn below_the_threshold_or_outside_the_window_devices_keep_their_own_incidents() {
    let mut b = pack_book();
    b.apply(offline("d1"), T0);
    b.apply(offline("d2"), T0 + 30_000);
    // d1 is out of the minute: two within it.
    b.apply(offline("d3"), T0 + 61_000);
    // e1 came back before e2 and e3: two offline now.
    b.apply(at_site("east", offline("e1")), T0);
    b.apply(at_site("east", back("e1")), T0 + 1000);
    b.apply(at_site("east", offline("e2")), T0 + 2000);
    b.apply(at_site("east", offline("e3")), T0 + 3000);
    // Two sites are two sites.
    b.apply(at_site("west", offline("w1")), T0 + 61_500);
    let p = pushed_incidents(&mut b);
    assert!(p.iter().all(|i| i.scope == Scope::Device), "{p:?}");
    assert_eq!(b.stats.opened, 7);
    // The third device of xh within the minute of d2 and d3 starts the storm.
    b.apply(offline("d4"), T0 + 62_000);
    let p = pushed_incidents(&mut b);
    assert_eq!(p[0].devices, ["d2", "d3", "d4"]);
    assert_eq!(b.get(&p[0].children[0]).map(|i| i.state), Some(IncidentState::Closed));
    // Without groups: one incident per device, as before.
    let pack = crate::rules::RuleSet::default_pack();
    let mut b = book().with_situations(pack.situations().to_vec()).with_parents(pack.parents().to_vec());
    for i in 0..5 {
        b.apply(offline(&format!("d{i}")), T0 + i);
    }
    assert_eq!(pushed_incidents(&mut b).len(), 5);
}

#[test]
fn resolving_a_storm_releases_each_device_and_a_restart_keeps_it() {
    let mut b = pack_book();
    for d in ["d1", "d2", "d3", "d4"] {
        b.apply(offline(d), T0);
    }
    // The gateway stops: what is pending is pushed (d4, within the interval of the opening).
    b.flush_storms(T0);
    let (commit, _) = b.take();
    let storm = commit.outbox.iter().find(|i| i.scope == Scope::Site).map(|i| i.id.clone()).expect("storm");
    // Restart: the unclosed incidents as stored.
    let mut stored: HashMap<String, Incident> = HashMap::new();
    for i in &commit.incidents {
        stored.insert(i.id.clone(), (**i).clone());
    }
    let unclosed: Vec<Incident> = stored.into_values().filter(|i| i.state != IncidentState::Closed).collect();
    let pack = crate::rules::RuleSet::default_pack();
    let mut b = Book::new(IncidentsConfig::default(), unclosed, Vec::new(), T0 + 1000)
        .with_situations(pack.situations().to_vec())
        .with_parents(pack.parents().to_vec())
        .with_groups(pack.groups().to_vec());
    b.apply(back("d1"), T0 + 2000);
    b.apply(offline("d5"), T0 + 2000);
    assert!(pushed_incidents(&mut b).is_empty(), "within the interval of the stored revision");
    b.tick(T0 + 5000, false);
    let p = pushed_incidents(&mut b);
    assert_eq!(p.iter().map(|i| (i.id.as_str(), i.history.last().map(|h| h.action.as_str()))).collect::<Vec<_>>(), [(storm.as_str(), Some("devices_changed"))]);
    assert_eq!(b.get(&storm).expect("storm").devices, ["d2", "d3", "d4", "d5"]);
    b.transition(&storm, Action::Resolve, "li", Some("power restored by the utility".into()), None, T0 + 6000).expect("resolve");
    let mut released: Vec<(Scope, String, String)> = b.take_released().into_iter().map(|r| (r.scope, r.device, r.rule)).collect();
    released.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(released.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["d2", "d3", "d4", "d5"]);
    assert!(released.iter().all(|r| r.0 == Scope::Device && r.2 == "device_offline"));
    // The next outage is a new incident.
    pushed_incidents(&mut b);
    b.tick(T0 + 7000, false);
    for d in ["d6", "d7", "d8"] {
        b.apply(offline(d), T0 + 8000);
    }
    let p = pushed_incidents(&mut b);
    let new = p.iter().find(|i| i.scope == Scope::Site).expect("new storm");
    assert_ne!(new.id, storm);
}

#[test]
fn parents_and_groups_naming_what_is_not_there_are_refused_with_their_key() {
    let rules = "[[rule]]\nname = \"a\"\nkind = \"event\"\nseverity = \"major\"\nopen_on = [\"alarm\"]\n\
                 [[rule]]\nname = \"off\"\nkind = \"absence\"\nseverity = \"warning\"\n\
                 [[rule]]\nname = \"c\"\nkind = \"composite\"\nseverity = \"critical\"\nof = [\"a\"]\nwithin = \"60s\"\n";
    let err = |extra: &str| crate::rules::RuleSet::from_pack_str(&format!("{extra}\n{rules}"), &[]).expect_err("refused").to_string();
    assert!(err("[[parent]]\nrule = \"a\"\nchildren = [\"a\"]\n").contains("parent a: rule: must be a composite"));
    assert!(err("[[parent]]\nrule = \"c\"\nchildren = [\"nope\"]\n").contains("children: no rule or situation named \"nope\""));
    assert!(err("[[group]]\nname = \"g\"\nrule = \"off\"\nmin_devices = 1\nwithin = \"60s\"\n").contains("group g: min_devices: must be at least 2"));
    assert!(err("[[group]]\nname = \"g\"\nrule = \"c\"\nmin_devices = 3\nwithin = \"60s\"\n").contains("composite"));
    assert!(err("[[group]]\nname = \"a\"\nrule = \"off\"\nmin_devices = 3\nwithin = \"60s\"\n").contains("group a: name: a rule has this name"));
    assert!(err("[[group]]\nname = \"g\"\nrule = \"off\"\nmin_devices = 3\nwithin = \"1m\"\nlevel = 2\n").contains("[[group]]"));
    let ok = crate::rules::RuleSet::from_pack_str(&format!("[[parent]]\nrule = \"c\"\nchildren = [\"a\"]\n[[group]]\nname = \"g\"\nrule = \"off\"\nmin_devices = 3\nwithin = \"60s\"\n{rules}"), &[]).expect("loads");
    assert!(ok.parents()[0].ack_children, "acknowledging children is the default");
    assert_eq!(ok.groups()[0].severity, None);
}

/// Cluster mode: a gateway gaining a partition adopts the incidents another gateway left in the
/// log; the condition going on updates the same id, the next change is the next revision.
#[test]
fn an_adopted_incident_continues_with_its_id_and_next_revision() {
    let mut a = book();
    a.apply(open("g1", "gas_high", Severity::Critical), T0);
    let id = pushed(&mut a)[0].0.clone();
    let acked = a.transition(&id, Action::Ack, "li", None, None, T0 + 10).expect("ack");
    assert_eq!(acked.revision, 2);
    let mut b = book();
    assert!(b.adopt(acked.clone(), T0 + 20), "new to this book");
    assert!(!b.adopt(acked.clone(), T0 + 21), "the same state twice changes nothing");
    let (commit, _) = b.take();
    assert!(commit.outbox.is_empty(), "adopting pushes nothing");
    assert_eq!(commit.incidents.len(), 1, "but stores it");
    b.apply(open("g1", "gas_high", Severity::Critical), T0 + 30);
    assert!(pushed(&mut b).is_empty(), "a continuing condition is a repeat of the adopted incident");
    b.apply(clear("g1", "gas_high"), T0 + 40);
    let p = pushed(&mut b);
    assert_eq!(p, [(id.clone(), 3, IncidentState::Acknowledged)], "the crew's state stays; the next revision");
    // The log's entry wins over a local copy, and a closed one leaves the book at the next tick.
    let mut closed = acked;
    closed.revision = 9;
    closed.state = IncidentState::Closed;
    assert!(b.adopt(closed, T0 + 50));
    b.tick(T0 + 60, false);
    assert!(b.get(&id).is_none());
    b.apply(open("g1", "gas_high", Severity::Critical), T0 + 70);
    let p = pushed(&mut b);
    assert_eq!(p.len(), 1);
    assert_ne!(p[0].0, id, "after close the condition is a new incident");
}

// ---------------------------------------------------------------------------------------------
// Outage storms' membership changes, coalesced (`storm_update_every`).

fn storm_book(every: u64) -> Book {
    let pack = crate::rules::RuleSet::default_pack();
    let cfg = IncidentsConfig { storm_update_every: crate::units::Duration(std::time::Duration::from_millis(every)), ..IncidentsConfig::default() };
    Book::new(cfg, Vec::new(), Vec::new(), T0).with_situations(pack.situations().to_vec()).with_parents(pack.parents().to_vec()).with_groups(pack.groups().to_vec())
}

fn storm_pushes(b: &mut Book) -> Vec<Incident> {
    pushed_incidents(b).into_iter().filter(|i| i.scope == Scope::Site).collect()
}

#[test]
fn thousands_of_devices_of_one_site_make_one_revision_per_interval_and_nothing_is_lost() {
    let mut b = storm_book(5000);
    // 3000 devices going offline over 3 s, ticking every second as the manager does.
    let mut pushes = Vec::new();
    for i in 0..3000i64 {
        let now = T0 + i;
        b.apply(offline(&format!("d{i:04}")), now);
        if i % 1000 == 999 {
            b.tick(now, false);
        }
        pushes.extend(storm_pushes(&mut b));
    }
    // The opening is not held back: the third device opens it at once.
    assert_eq!(pushes.len(), 1, "{:?}", pushes.iter().map(|i| i.revision).collect::<Vec<_>>());
    assert_eq!((pushes[0].revision, pushes[0].devices.len(), pushes[0].state), (1, 3, IncidentState::Open));
    let id = pushes[0].id.clone();
    b.tick(T0 + 5001, false);
    assert!(storm_pushes(&mut b).is_empty(), "opened at T0 + 2: not yet");
    b.tick(T0 + 5002, false);
    let p = storm_pushes(&mut b);
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].revision, p[0].devices.len(), p[0].value, p[0].count), (2, 3000, Some(3000.0), 3000));
    let note = p[0].history.last().and_then(|h| h.note.clone()).unwrap_or_default();
    assert_eq!(note, "+2997: d0003, d0004, d0005, d0006, d0007, d0008, d0009, d0010, d0011, d0012 and 2987 more; 3000 now");
    assert!(p[0].summary.ends_with("and 2990 more"), "{}", p[0].summary);
    assert_eq!(b.active_device_rules().len(), 3000);
    // Half come back over a second: one revision when the interval is up.
    for i in 0..1500i64 {
        b.apply(back(&format!("d{i:04}")), T0 + 6000 + i / 2);
    }
    assert!(storm_pushes(&mut b).is_empty());
    b.tick(T0 + 10_002, false);
    let p = storm_pushes(&mut b);
    assert_eq!((p.len(), p[0].revision, p[0].devices.len()), (1, 3, 1500));
    assert_eq!(p[0].devices.first().map(String::as_str), Some("d1500"));
    // The rest: the last one back clears it at once, carrying the final (empty) membership.
    for i in 1500..3000i64 {
        b.apply(back(&format!("d{i:04}")), T0 + 11_000);
    }
    let p = storm_pushes(&mut b);
    assert_eq!(p.len(), 1, "the clear carries what was pending");
    assert_eq!((p[0].id.as_str(), p[0].revision, p[0].state, p[0].devices.len()), (id.as_str(), 4, IncidentState::Cleared, 0));
    assert!(b.active_device_rules().is_empty());
    assert_eq!(b.stats.signals_without_incident, 0);
}

#[test]
fn without_an_interval_every_device_is_a_revision_as_before() {
    let mut b = storm_book(0);
    for i in 0..10 {
        b.apply(offline(&format!("d{i}")), T0 + i);
    }
    b.apply(back("d0"), T0 + 20);
    let p = storm_pushes(&mut b);
    assert_eq!(p.iter().map(|i| (i.revision, i.devices.len())).collect::<Vec<_>>(), [(1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8), (7, 9), (8, 10), (9, 9)]);
    assert_eq!(p[1].history.last().and_then(|h| h.note.as_deref()), Some("+1: d3; 4 now"));
}

#[test]
fn a_device_gone_and_back_within_the_interval_is_counted_not_pushed() {
    let mut b = storm_book(5000);
    for d in ["d1", "d2", "d3"] {
        b.apply(offline(d), T0);
    }
    storm_pushes(&mut b);
    b.apply(offline("d4"), T0 + 1000);
    b.apply(back("d4"), T0 + 2000);
    b.tick(T0 + 6000, true);
    let (commit, _) = b.take();
    assert!(commit.outbox.is_empty(), "nothing a duty officer would see changed");
    let stored = commit.incidents.iter().find(|i| i.scope == Scope::Site).expect("the count is persisted");
    assert_eq!((stored.revision, stored.count, stored.devices.len()), (1, 4, 3));
    // Back again and away again: the roster follows, the next change is pushed at once.
    b.apply(offline("d4"), T0 + 7000);
    let p = storm_pushes(&mut b);
    assert_eq!((p.len(), p[0].revision, p[0].devices.clone()), (1, 2, vec!["d1".to_owned(), "d2".to_owned(), "d3".to_owned(), "d4".to_owned()]));
}

#[test]
fn an_operator_acts_on_the_storm_as_it_is_now_and_stopping_pushes_what_is_pending() {
    let mut b = storm_book(5000);
    for d in ["d1", "d2", "d3"] {
        b.apply(offline(d), T0);
    }
    let id = storm_pushes(&mut b)[0].id.clone();
    b.apply(offline("d4"), T0 + 100);
    b.apply(back("d1"), T0 + 200);
    b.transition(&id, Action::Ack, "wang", None, None, T0 + 300).expect("ack");
    let p = storm_pushes(&mut b);
    assert_eq!(p.iter().map(|i| (i.revision, i.state, i.devices.len())).collect::<Vec<_>>(), [(2, IncidentState::Open, 3), (3, IncidentState::Acknowledged, 3)]);
    assert_eq!(p[1].devices, ["d2", "d3", "d4"]);
    // A resolve with changes pending releases exactly the devices offline now.
    b.apply(offline("d5"), T0 + 400);
    b.apply(back("d2"), T0 + 500);
    b.transition(&id, Action::Resolve, "wang", None, None, T0 + 600).expect("resolve");
    let mut released: Vec<String> = b.take_released().into_iter().map(|r| r.device).collect();
    released.sort();
    assert_eq!(released, ["d3", "d4", "d5"]);
    storm_pushes(&mut b);
    // The gateway stopping: pending changes are pushed whatever the interval.
    let mut b = storm_book(60_000);
    for d in ["e1", "e2", "e3", "e4"] {
        b.apply(at_site("east", offline(d)), T0);
    }
    assert_eq!(storm_pushes(&mut b).iter().map(|i| i.devices.len()).collect::<Vec<_>>(), [3]);
    b.flush_storms(T0 + 1);
    let p = storm_pushes(&mut b);
    assert_eq!((p.len(), p[0].revision, p[0].devices.len()), (1, 2, 4));
    b.flush_storms(T0 + 2);
    assert!(storm_pushes(&mut b).is_empty(), "nothing pending, nothing pushed");
}

#[test]
fn a_restart_keeps_the_pushed_membership_and_the_interval() {
    let mut b = storm_book(5000);
    for d in ["d1", "d2", "d3"] {
        b.apply(offline(d), T0);
    }
    let (commit, _) = b.take();
    let mut stored: HashMap<String, Incident> = HashMap::new();
    for i in &commit.incidents {
        stored.insert(i.id.clone(), (**i).clone());
    }
    let stored: Vec<Incident> = stored.into_values().filter(|i| i.state != IncidentState::Closed).collect();
    let pack = crate::rules::RuleSet::default_pack();
    let cfg = IncidentsConfig { storm_update_every: crate::units::Duration::secs(5), ..IncidentsConfig::default() };
    let mut b = Book::new(cfg, stored, Vec::new(), T0 + 1000).with_situations(pack.situations().to_vec()).with_parents(pack.parents().to_vec()).with_groups(pack.groups().to_vec());
    b.apply(offline("d4"), T0 + 2000);
    assert!(storm_pushes(&mut b).is_empty(), "the stored revision's time starts the interval");
    let mut active: Vec<String> = b.active_device_rules().into_iter().map(|(d, _, _)| d).collect();
    active.sort();
    assert_eq!(active, ["d1", "d2", "d3", "d4"], "the rule engine resumes the storm as it is now");
    b.tick(T0 + 5000, false);
    assert_eq!(storm_pushes(&mut b).iter().map(|i| (i.revision, i.devices.len())).collect::<Vec<_>>(), [(2, 4)]);
}

/// The cost of an outage storm of `n` devices of one site going offline within `spread_ms` and
/// coming back, as the manager drives the book (a commit taken after each signal, a tick each
/// second): revisions pushed, JSON bytes pushed, the largest single push and the time taken.
fn storm_cost(every_ms: u64, n: i64, spread_ms: i64) -> (usize, usize, usize, std::time::Duration) {
    let started = std::time::Instant::now();
    let mut b = storm_book(every_ms);
    let (mut revisions, mut bytes, mut largest) = (0, 0, 0);
    let mut count = |b: &mut Book| {
        for i in b.take().0.outbox.iter().filter(|i| i.scope == Scope::Site) {
            let len = serde_json::to_vec(&**i).map(|v| v.len()).unwrap_or(0);
            revisions += 1;
            bytes += len;
            largest = largest.max(len);
        }
    };
    let mut next_tick = T0 + 1000;
    for (phase, start) in [(0, T0), (1, T0 + 120_000)] {
        for i in 0..n {
            let now = start + i * spread_ms / n;
            while now >= next_tick {
                b.tick(next_tick, false);
                count(&mut b);
                next_tick += 1000;
            }
            let d = format!("dev-{i:06}");
            b.apply(if phase == 0 { offline(&d) } else { back(&d) }, now);
            count(&mut b);
        }
        for _ in 0..10 {
            b.tick(next_tick, false);
            count(&mut b);
            next_tick += 1000;
        }
        next_tick = next_tick.max(start + 120_000);
    }
    (revisions, bytes, largest, started.elapsed())
}

/// Before/after figures for the README; run with
/// `cargo test --release -p citywatch-gateway --lib storm_cost_figures -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test: prints figures"]
fn storm_cost_figures() {
    for (every, n) in [(0, 1000), (0, 2000), (0, 4000), (5000, 1000), (5000, 2000), (5000, 4000), (5000, 10_000), (5000, 27_000), (5000, 100_000)] {
        let (revisions, bytes, largest, took) = storm_cost(every, n, 10_000);
        println!("storm_update_every={every}ms devices={n}: {revisions} revisions, {:.1} MB JSON pushed, largest {:.1} kB, {:.2} s", bytes as f64 / 1e6, largest as f64 / 1e3, took.as_secs_f64());
    }
}

/// Cluster mode: a partition's new owner adopts the log's incidents, then replays the window.
/// A replayed signal leaves an incident of the log alone (an open and clear the old owner
/// logged are not pushed again), and recomputes what the log does not have: an incident the
/// old owner committed and never appended, with the replay's own later signals.
#[test]
fn replayed_signals_change_only_what_the_incident_log_does_not_hold() {
    let mut old = book();
    old.apply(open("g1", "gas_low", Severity::Major), T0);
    old.apply(clear("g1", "gas_low"), T0 + 1000);
    let logged: Vec<Incident> = old.take().0.outbox.iter().map(|i| Incident::clone(i)).collect();
    let last = logged.last().cloned().expect("logged");
    assert_eq!(last.state, IncidentState::Cleared);
    let mut b = book();
    assert!(b.adopt(last, T0 + 2000));
    pushed(&mut b);
    // g3's incident an operator closed within the window: adopted as closed, so it stays closed.
    let mut closed = logged[0].clone();
    (closed.id, closed.key, closed.device, closed.state) = ("inc-g3".into(), "xh/g3/gas_low".into(), "g3".into(), IncidentState::Closed);
    b.adopt(closed, T0 + 2000);
    b.apply_replayed(open("g1", "gas_low", Severity::Major), T0 + 3000);
    b.apply_replayed(clear("g1", "gas_low"), T0 + 3000);
    b.apply_replayed(open("g3", "gas_low", Severity::Major), T0 + 3000);
    assert!(pushed(&mut b).is_empty(), "the log's incidents stand");
    // g2's open never reached the log: recomputed, then cleared by the replay itself.
    b.apply_replayed(open("g2", "gas_low", Severity::Major), T0 + 3000);
    b.apply_replayed(clear("g2", "gas_low"), T0 + 3000);
    let p = pushed(&mut b);
    assert_eq!(p.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(), [(1, IncidentState::Open), (2, IncidentState::Cleared)], "{p:?}");
    // Live signals are not affected: g1 opens again, as it would have on the old owner.
    b.apply(open("g1", "gas_low", Severity::Major), T0 + 4000);
    assert_eq!(pushed(&mut b).len(), 1);
}
