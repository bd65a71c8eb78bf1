//! Rule pack, overrides and engine: every rule kind against a controlled clock, the bad configs
//! `check-config` must name, and property tests for panics and flapping.

use std::collections::HashMap;
use std::sync::Arc;

use citywatch_edge::wire::{CommandKind, DeviceKind, EventKind, LinkState, Metric};
use proptest::prelude::*;

use super::*;
use crate::incidents::{Change, Scope, Severity, Signal};

const S: i64 = 1000;
const MIN: i64 = 60 * S;
const H: i64 = 60 * MIN;
const DAY: i64 = 24 * H;
const T0: i64 = 1_763_800_000_000;

struct Dev {
    id: Arc<str>,
    site: Arc<str>,
    kind: DeviceKind,
    interval_s: u32,
}

impl Dev {
    fn new(id: &str, site: &str, kind: DeviceKind) -> Dev {
        Dev { id: id.into(), site: site.into(), kind, interval_s: 0 }
    }
    fn gas(id: &str) -> Dev {
        Dev::new(id, "s1", DeviceKind::GasDetector)
    }
    fn smoke(id: &str, site: &str) -> Dev {
        Dev::new(id, site, DeviceKind::SmokeDetector)
    }
    fn siren(id: &str) -> Dev {
        Dev::new(id, "s1", DeviceKind::SirenMount)
    }
    fn ctx(&self) -> DeviceCtx<'_> {
        DeviceCtx { id: &self.id, site: &self.site, kind: self.kind, interval_s: self.interval_s }
    }
}

struct Bench {
    engine: Engine,
}

impl Bench {
    fn new(rules: RuleSet) -> Bench {
        Bench { engine: Engine::new(Arc::new(rules)) }
    }
    fn default_pack() -> Bench {
        Bench::new(RuleSet::default_pack())
    }
    fn pack(text: &str) -> Bench {
        Bench::new(RuleSet::from_pack_str(text, &[]).expect("test pack"))
    }
    fn read(&mut self, d: &Dev, metric: Metric, value: f64, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_reading(&d.ctx(), metric, value, now, now, &mut out);
        out
    }
    fn event(&mut self, d: &Dev, event: EventKind, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_event(&d.ctx(), event, None, None, now, now, &mut out);
        out
    }
    fn status(&mut self, d: &Dev, state: LinkState, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_status(&d.ctx(), state, now, &mut out);
        out
    }
    fn seen(&mut self, d: &Dev, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.on_seen(&d.ctx(), now, &mut out);
        out
    }
    fn tick(&mut self, now: i64) -> Vec<Signal> {
        let mut out = Vec::new();
        self.engine.tick(now, &mut out);
        out
    }
}

/// The signals of one rule.
fn of<'a>(signals: &'a [Signal], rule: &str) -> Vec<&'a Signal> {
    signals.iter().filter(|s| &*s.rule == rule).collect()
}

/// "open", "repeat", "clear", "remind" for each signal of one rule.
fn changes(signals: &[Signal], rule: &str) -> Vec<&'static str> {
    of(signals, rule).iter().map(|s| change_name(&s.change)).collect()
}

fn change_name(change: &Change) -> &'static str {
    match change {
        Change::Open { .. } => "open",
        Change::Repeat { .. } => "repeat",
        Change::Clear { .. } => "clear",
        Change::Remind { .. } => "remind",
    }
}

fn severity(s: &Signal) -> Option<Severity> {
    match &s.change {
        Change::Open { severity, .. } | Change::Repeat { severity, .. } => Some(*severity),
        _ => None,
    }
}

fn load_err(pack: &str) -> String {
    RuleSet::from_pack_str(pack, &[]).expect_err("must be rejected").to_string()
}

fn override_err(overrides: &str) -> String {
    let cfg: RulesConfig = toml::from_str(overrides).expect("overrides parse");
    RuleSet::from_config(&cfg).expect_err("must be rejected").to_string()
}

// ---------------------------------------------------------------------------------------------
// The pack.

#[test]
fn default_pack_loads_and_validates() {
    let set = RuleSet::default_pack();
    let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gas_low",
            "gas_high",
            "gas_valve_failed",
            "device_alarm",
            "smoke",
            "heat",
            "fire_confirmed",
            "mount_tilt",
            "mount_corrosion",
            "mount_corrosion_rate",
            "device_offline",
            "low_battery",
            "sensor_fault",
            "sensor_stuck"
        ]
    );
    assert!(!names.contains(&"unacked_escalation"), "the incident manager's, not a rule");
    // Every rule round-trips through its serialised form, and serialises to JSON for the API.
    for rule in set.rules() {
        let table = toml::Table::try_from(rule).expect("serialises to TOML");
        assert_eq!(&RuleDef::try_from(table).expect("re-parses"), rule);
        serde_json::to_string(rule).expect("serialises to JSON");
    }
    let gas_high = &set.rules()[1];
    assert_eq!(gas_high.action, Some(CommandKind::CloseValve));
    let RuleSpec::Threshold(t) = &gas_high.spec else { panic!("threshold") };
    assert_eq!(
        (t.levels[0].when.compare, t.levels[0].when.value, t.levels[0].when.held_for),
        (Compare::AtLeast, 50.0, None)
    );
    // What applies to each kind.
    let effective = |kind| set.effective(kind, "s1", "d1").into_iter().map(|r| r.name).collect::<Vec<_>>();
    let gas = effective(DeviceKind::GasDetector);
    assert!(gas.contains(&"gas_valve_failed".to_owned()) && !gas.contains(&"smoke".to_owned()));
    assert!(!gas.contains(&"fire_confirmed".to_owned()) && !gas.contains(&"heat".to_owned()));
    let smoke = effective(DeviceKind::SmokeDetector);
    assert!(smoke.contains(&"fire_confirmed".to_owned()) && smoke.contains(&"sensor_stuck".to_owned()));
    let siren = effective(DeviceKind::SirenMount);
    assert!(siren.contains(&"mount_corrosion_rate".to_owned()) && !siren.contains(&"gas_valve_failed".to_owned()));
    assert_eq!(siren.len(), 8, "{siren:?}");
}

#[test]
fn rules_config_parses_with_overrides_and_rejects_unknown_keys() {
    let cfg: RulesConfig = toml::from_str(
        r#"
        [[override]]
        rule = "gas_low"
        site = "kitchen-3"
        open = { at_least = 25.0, for = "10s" }
        "#,
    )
    .expect("parses");
    assert_eq!(cfg.overrides[0].site.as_deref(), Some("kitchen-3"));
    assert!(cfg.overrides[0].set.contains_key("open"));
    RuleSet::from_config(&cfg).expect("valid");
    let err = toml::from_str::<RulesConfig>("packs = \"x.toml\"").expect_err("unknown key");
    assert!(err.to_string().contains("unknown field `packs`"), "{err}");
}

#[test]
fn pack_from_a_file_and_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, "[[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseverity = \"major\"\nmetric = \"temp_c\"\nopen = { above = 70 }\n")
        .expect("write");
    let set = RuleSet::from_config(&RulesConfig { pack: Some(path), overrides: vec![], ..Default::default() }).expect("loads");
    assert_eq!(set.rules().len(), 1);
    let missing = RuleSet::from_config(&RulesConfig { pack: Some(dir.path().join("nope.toml")), overrides: vec![], ..Default::default() });
    assert!(missing.expect_err("missing").to_string().starts_with("rules.pack: cannot read"));
}

#[test]
fn bad_packs_name_the_rule_and_key() {
    let rule = |body: &str| format!("[[rule]]\nname = \"x\"\nseverity = \"major\"\n{body}\n");
    let cases: &[(&str, &str)] = &[
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1 }\nopn = 2", "rule x: opn: unknown key"),
        ("kind = \"threshold\"\nmetric = \"gas_lelx\"\nopen = { at_least = 1 }", "rule x: metric: unknown variant `gas_lelx`"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1, for = \"10x\" }", "rule x: open.for: \"10x\" is not a duration"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1, below = 2 }", "rule x: open: needs exactly one of"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { for = \"1s\" }", "rule x: open: needs exactly one of"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = nan }", "rule x: open.at_least: must be a finite number"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = inf }", "must be a finite number"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"", "rule x: open: give exactly one of `open` or `levels`"),
        (
            "kind = \"threshold\"\nmetric = \"tilt_deg\"\nlevels = [{ severity = \"critical\", at_least = 1 }, { severity = \"warning\", at_least = 2 }]",
            "rule x: levels[1].severity: levels must have strictly rising severities",
        ),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1 }\nsummary = \"{valu}\"", "rule x: summary: unknown placeholder {valu}"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1 }\naction = \"explode\"", "rule x: action: unknown variant `explode`"),
        ("kind = \"threshold\"\nmetric = \"gas_lel\"\nopen = { at_least = 1 }\ndevices = [\"toaster\"]", "rule x: devices: unknown variant `toaster`"),
        ("kind = \"rate\"\nmetric = \"temp_c\"\nwindow = \"0s\"\nrise_at_least = 1", "rule x: window: must be longer than zero"),
        ("kind = \"rate\"\nmetric = \"temp_c\"\nwindow = \"1m\"\nrise_at_least = 1\nfall_at_least = 1", "give exactly one of rise_at_least"),
        ("kind = \"trend\"\nmetric = \"corrosion_um\"\nover = \"1day\"\nrate_above = 1", "rule x: over: must span 2 to 400 buckets"),
        ("kind = \"event\"\nopen_on = [\"alarm\"]\nclear_on = [\"alarmed\"]", "rule x: clear_on: unknown variant `alarmed`"),
        ("kind = \"event\"\nopen_on = [\"alarm\"]\nclear_on = [\"alarm\"]", "rule x: clear_on: alarm is also in open_on"),
        ("kind = \"composite\"\nof = [\"nope\"]\nwithin = \"60s\"", "rule x: of: no rule named \"nope\""),
        ("kind = \"composite\"\nof = [\"x\"]\nwithin = \"0s\"", "rule x: within: must be longer than zero"),
        ("kind = \"follow_up\"\nafter = \"nope\"\nwithin = \"30s\"\nexpect_event = \"valve_closed\"", "rule x: after: no rule named \"nope\""),
        ("kind = \"follow_up\"\nafter = \"x\"\nwithin = \"30s\"", "rule x: expect: give expect, expect_event or both"),
        ("kind = \"stuck\"\nmetrics = [\"valve_closed\"]\nfor = \"1h\"", "rule x: metrics: valve_closed is not analog"),
        ("kind = \"stuck\"\nmetrics = [\"gas_lel\"]\nfor = \"0s\"", "rule x: for: must be longer than zero"),
        ("kind = \"schedule\"\nremind_days = [30]", "rule x: kind: \"schedule\" is no longer a rule kind"),
        ("kind = \"teleport\"", "rule x: kind: unknown rule kind \"teleport\""),
    ];
    for (body, expected) in cases {
        let err = load_err(&rule(body));
        assert!(err.contains(expected), "{body}\n→ {err}\nexpected {expected}");
    }
    let dup = format!(
        "{}{}",
        rule("kind = \"event\"\nopen_on = [\"alarm\"]"),
        rule("kind = \"event\"\nopen_on = [\"fault\"]")
    );
    assert!(load_err(&dup).contains("rule x: name: duplicate rule name"), "{}", load_err(&dup));
    // The removed schedule kind says where reminders went.
    let schedule = load_err(&rule("kind = \"schedule\""));
    assert!(schedule.contains("[inspections] remind_days"), "{schedule}");
    assert!(load_err("[[rule]]\nkind = \"event\"").contains("rule #0: name: missing"));
    assert!(load_err("[[rule]\n").starts_with("rules.pack (text):"));
    assert!(load_err("rule = 1").contains("[[rule]]"));
    // A severity is required except with levels (then it is the highest level's).
    assert!(load_err("[[rule]]\nname = \"x\"\nkind = \"event\"\nopen_on = [\"alarm\"]")
        .contains("rule x: severity: missing"));
}

#[test]
fn bad_overrides_name_the_override_and_key() {
    let cases: &[(&str, &str)] = &[
        ("[[override]]\nrule = \"gas_lo\"", "rules.override[0].rule: no rule named \"gas_lo\""),
        (
            "[[override]]\nrule = \"gas_low\"\nopen = { at_least = 20, for = \"10x\" }",
            "rules.override[0]: rule gas_low: open.for: \"10x\" is not a duration",
        ),
        (
            "[[override]]\nrule = \"gas_low\"\nopn = { at_least = 20 }",
            "rules.override[0]: rule gas_low: opn: unknown key",
        ),
        (
            "[[override]]\nrule = \"gas_low\"\nkind = \"gas_detector\"\nsite = \"s1\"",
            "rules.override[0]: at most one of kind, site, device",
        ),
        ("[[override]]\nrule = \"gas_low\"\nname = \"gas_lower\"", "rules.override[0].name: cannot be overridden"),
        ("[[override]]\nrule = \"gas_low\"\nsite = \"a b\"", "rules.override[0].site: \"a b\" is not a valid id"),
        (
            "[[override]]\nrule = \"heat\"\n[[override]]\nrule = \"fire_confirmed\"\nof = [\"smok\"]",
            "rules.override[1]: rule fire_confirmed: of: no rule named \"smok\"",
        ),
    ];
    for (cfg, expected) in cases {
        let err = override_err(cfg);
        assert!(err.contains(expected), "{cfg}\n→ {err}\nexpected {expected}");
    }
    // An override's `kind` is the device kind it is scoped to, checked when the file parses.
    let err =
        toml::from_str::<RulesConfig>("[[override]]\nrule = \"gas_low\"\nkind = \"threshold\"").expect_err("bad kind");
    assert!(err.to_string().contains("unknown variant `threshold`"), "{err}");
}

#[test]
fn overrides_precedence_device_beats_site_beats_kind_and_enabled_false_removes() {
    // Listed in reverse precedence order, so config order alone would give the wrong answer.
    let cfg: RulesConfig = toml::from_str(
        r#"
        [[override]]
        rule = "gas_low"
        device = "g9"
        open = { at_least = 40.0 }
        [[override]]
        rule = "gas_low"
        site = "s1"
        open = { at_least = 35.0 }
        [[override]]
        rule = "gas_low"
        kind = "gas_detector"
        open = { at_least = 30.0 }
        [[override]]
        rule = "gas_low"
        severity = "critical"
        [[override]]
        rule = "sensor_stuck"
        site = "s2"
        enabled = false
        "#,
    )
    .expect("parses");
    let set = RuleSet::from_config(&cfg).expect("valid");
    let gas_low = |site: &str, device: &str| {
        let rules = set.effective(DeviceKind::GasDetector, site, device);
        let rule = rules.into_iter().find(|r| r.name == "gas_low").expect("gas_low applies");
        let RuleSpec::Threshold(t) = rule.spec else { panic!("threshold") };
        (t.levels[0].when.value, t.levels[0].when.held_for, t.levels[0].severity)
    };
    assert_eq!(gas_low("s0", "g1"), (30.0, None, Severity::Critical), "kind, with the everywhere severity");
    assert_eq!(gas_low("s1", "g1"), (35.0, None, Severity::Critical), "site beats kind");
    assert_eq!(gas_low("s1", "g9"), (40.0, None, Severity::Critical), "device beats site");
    assert_eq!(gas_low("s0", "g9"), (40.0, None, Severity::Critical), "device beats kind");
    let has_stuck = |site| set.effective(DeviceKind::GasDetector, site, "g1").iter().any(|r| r.name == "sensor_stuck");
    assert!(has_stuck("s1") && !has_stuck("s2"));
    // The pack itself is untouched.
    assert_eq!(set.rules()[0].severity, Severity::Major);

    // And the engine runs what `effective` says.
    let mut b = Bench::new(set);
    let (g_s0, g_s1, g9) = (Dev::new("g1", "s0", DeviceKind::GasDetector), Dev::gas("g2"), Dev::gas("g9"));
    assert_eq!(changes(&b.read(&g_s0, Metric::GasLel, 33.0, T0), "gas_low"), ["open"]);
    assert!(of(&b.read(&g_s1, Metric::GasLel, 33.0, T0), "gas_low").is_empty());
    assert!(of(&b.read(&g9, Metric::GasLel, 38.0, T0), "gas_low").is_empty());
    assert_eq!(changes(&b.read(&g9, Metric::GasLel, 41.0, T0 + S), "gas_low"), ["open"]);
}

#[test]
fn device_overrides_are_built_for_that_device_only() {
    let cfg: RulesConfig =
        toml::from_str("[[override]]\nrule = \"device_offline\"\ndevice = \"g1\"\nenabled = false\n").expect("parses");
    let mut b = Bench::new(RuleSet::from_config(&cfg).expect("valid"));
    let (g1, g2) = (Dev::gas("g1"), Dev::gas("g2"));
    b.seen(&g1, T0);
    b.seen(&g2, T0);
    let out = b.tick(T0 + 10 * MIN);
    assert_eq!(of(&out, "device_offline").len(), 1);
    assert_eq!(&*of(&out, "device_offline")[0].device, "g2");
}

// ---------------------------------------------------------------------------------------------
// Threshold.

#[test]
fn threshold_held_for_opens_from_tick_without_a_new_reading() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    assert!(of(&b.read(&g, Metric::GasLel, 25.0, T0), "gas_low").is_empty());
    assert!(of(&b.tick(T0 + 9_999), "gas_low").is_empty());
    let out = b.tick(T0 + 10 * S);
    let opened = of(&out, "gas_low");
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].ts_ms, T0 + 10 * S, "timer-caused: the gateway's clock");
    let Change::Open { severity, metric, value, threshold, action, .. } = &opened[0].change else { panic!("open") };
    assert_eq!(
        (*severity, *metric, *value, *threshold, *action),
        (Severity::Major, Some(Metric::GasLel), Some(25.0), Some(20.0), None)
    );
    assert!(of(&b.tick(T0 + 11 * S), "gas_low").is_empty(), "opens once");
}

#[test]
fn threshold_a_dip_resets_the_hold() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.read(&g, Metric::GasLel, 25.0, T0);
    b.read(&g, Metric::GasLel, 15.0, T0 + 5 * S);
    b.read(&g, Metric::GasLel, 25.0, T0 + 6 * S);
    assert!(of(&b.tick(T0 + 10 * S), "gas_low").is_empty());
    assert!(of(&b.tick(T0 + 15 * S), "gas_low").is_empty());
    assert_eq!(changes(&b.tick(T0 + 16 * S), "gas_low"), ["open"]);
}

#[test]
fn threshold_immediate_opens_on_the_reading_with_its_action_and_ts() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    let mut out = Vec::new();
    b.engine.on_reading(&g.ctx(), Metric::GasLel, 55.0, T0 - 300, T0, &mut out);
    let opened = of(&out, "gas_high");
    assert_eq!(opened[0].ts_ms, T0 - 300, "reading-caused: the reading's time");
    let Change::Open { severity, action, summary, .. } = &opened[0].change else { panic!("open") };
    assert_eq!((*severity, *action), (Severity::Critical, Some(CommandKind::CloseValve)));
    assert_eq!(summary, "Combustible gas 55 %LEL at g1 (s1), level-2 limit 50: closing the valve");
    assert_eq!(opened[0].scope, Scope::Device);
    // Still matching: one Repeat per reading.
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 56.0, T0 + S), "gas_high"), ["repeat"]);
}

#[test]
fn threshold_hysteresis_keeps_it_open_between_clear_and_open() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.read(&g, Metric::GasLel, 25.0, T0);
    assert_eq!(changes(&b.tick(T0 + 10 * S), "gas_low"), ["open"]);
    // 15 is under the open level but over the clear level: stays open, nothing to say.
    assert!(of(&b.read(&g, Metric::GasLel, 15.0, T0 + 20 * S), "gas_low").is_empty());
    assert!(of(&b.tick(T0 + 100 * S), "gas_low").is_empty());
    // Under 10, but not for 30 s: a bounce to 12 resets the clear hold.
    b.read(&g, Metric::GasLel, 5.0, T0 + 100 * S);
    assert!(of(&b.read(&g, Metric::GasLel, 12.0, T0 + 120 * S), "gas_low").is_empty());
    b.read(&g, Metric::GasLel, 5.0, T0 + 125 * S);
    assert!(of(&b.tick(T0 + 154_999), "gas_low").is_empty());
    let out = b.tick(T0 + 155 * S);
    assert_eq!(changes(&out, "gas_low"), ["clear"]);
    let Change::Clear { value, .. } = &of(&out, "gas_low")[0].change else { panic!("clear") };
    assert_eq!(*value, Some(5.0));
}

#[test]
fn threshold_without_clear_condition_clears_at_once() {
    let mut b = Bench::pack(
        "[[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseverity = \"major\"\nmetric = \"temp_c\"\nopen = { above = 70, for = \"5s\" }\n",
    );
    let g = Dev::gas("g1");
    b.read(&g, Metric::TempC, 75.0, T0);
    assert_eq!(changes(&b.tick(T0 + 5 * S), "hot"), ["open"]);
    assert_eq!(changes(&b.read(&g, Metric::TempC, 70.0, T0 + 6 * S), "hot"), ["clear"]);
}

#[test]
fn threshold_levels_upgrade_with_repeat_and_never_downgrade() {
    let mut b = Bench::default_pack();
    let m = Dev::siren("m1");
    b.read(&m, Metric::TiltDeg, 0.2, T0);
    assert!(of(&b.tick(T0 + H - 1), "mount_tilt").is_empty());
    let out = b.tick(T0 + H);
    assert_eq!(changes(&out, "mount_tilt"), ["open"]);
    assert_eq!(severity(of(&out, "mount_tilt")[0]), Some(Severity::Warning));
    let out = b.read(&m, Metric::TiltDeg, 0.4, T0 + H + S);
    assert_eq!(changes(&out, "mount_tilt"), ["repeat"]);
    assert_eq!(severity(of(&out, "mount_tilt")[0]), Some(Severity::Critical));
    let out = b.read(&m, Metric::TiltDeg, 0.2, T0 + H + 2 * S);
    assert_eq!(severity(of(&out, "mount_tilt")[0]), Some(Severity::Critical), "downgrades only through clearing");
    // Critical at once, from nothing.
    let m2 = Dev::siren("m2");
    let out = b.read(&m2, Metric::TiltDeg, 0.5, T0);
    assert_eq!(changes(&out, "mount_tilt"), ["open"]);
    assert_eq!(severity(of(&out, "mount_tilt")[0]), Some(Severity::Critical));
    // Section loss: warning then critical, cleared at once under 4.5.
    assert_eq!(
        severity(of(&b.read(&m2, Metric::SectionLossPct, 6.0, T0), "mount_corrosion")[0]),
        Some(Severity::Warning)
    );
    assert_eq!(
        severity(of(&b.read(&m2, Metric::SectionLossPct, 11.0, T0 + S), "mount_corrosion")[0]),
        Some(Severity::Critical)
    );
    assert!(of(&b.read(&m2, Metric::SectionLossPct, 4.8, T0 + 2 * S), "mount_corrosion").is_empty());
    assert_eq!(changes(&b.read(&m2, Metric::SectionLossPct, 4.4, T0 + 3 * S), "mount_corrosion"), ["clear"]);
}

#[test]
fn restored_incident_clears_without_an_open() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.engine.restore_active(&g.ctx(), "gas_high");
    b.engine.restore_active(&g.ctx(), "sensor_fault");
    let mut all = b.read(&g, Metric::GasLel, 5.0, T0);
    all.extend(b.tick(T0 + 29 * S));
    assert!(of(&all, "gas_high").is_empty());
    all.extend(b.tick(T0 + 30 * S));
    assert_eq!(changes(&all, "gas_high"), ["clear"]);
    // Still matching after a restore: a repeat, not a second open.
    b.engine.restore_active(&g.ctx(), "gas_high");
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 60.0, T0 + 40 * S), "gas_high"), ["repeat"]);
    assert_eq!(changes(&b.event(&g, EventKind::Fault, T0 + 41 * S), "sensor_fault"), ["repeat"]);
    assert_eq!(changes(&b.event(&g, EventKind::SelfTestOk, T0 + 42 * S), "sensor_fault"), ["clear"]);
}

#[test]
fn low_battery_opens_on_the_event_or_the_floor_and_clears_above_2_8() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    assert!(of(&b.read(&g, Metric::BatteryV, 2.75, T0), "low_battery").is_empty());
    let out = b.event(&g, EventKind::LowBattery, T0 + S);
    assert_eq!(changes(&out, "low_battery"), ["open"]);
    assert!(of(&b.read(&g, Metric::BatteryV, 2.75, T0 + 2 * S), "low_battery").is_empty(), "between floor and clear");
    assert_eq!(changes(&b.read(&g, Metric::BatteryV, 2.9, T0 + 3 * S), "low_battery"), ["clear"]);
    assert_eq!(changes(&b.read(&g, Metric::BatteryV, 2.6, T0 + 4 * S), "low_battery"), ["open"]);
}

// ---------------------------------------------------------------------------------------------
// Absence.

#[test]
fn absence_after_three_intervals_or_90s_from_tick() {
    let mut b = Bench::default_pack();
    let mut slow = Dev::gas("slow");
    slow.interval_s = 60;
    let mut fast = Dev::gas("fast");
    fast.interval_s = 10;
    b.seen(&slow, T0);
    b.seen(&fast, T0);
    let out = b.tick(T0 + 90 * S - 1);
    assert!(of(&out, "device_offline").is_empty());
    let out = b.tick(T0 + 90 * S);
    assert_eq!(of(&out, "device_offline").iter().map(|s| &*s.device).collect::<Vec<_>>(), ["fast"]);
    // A message in between moves the deadline.
    b.seen(&slow, T0 + 100 * S);
    assert!(of(&b.tick(T0 + 279 * S), "device_offline").is_empty());
    let out = b.tick(T0 + 280 * S);
    assert_eq!(of(&out, "device_offline").iter().map(|s| &*s.device).collect::<Vec<_>>(), ["slow"]);
    assert_eq!(of(&out, "device_offline")[0].ts_ms, T0 + 280 * S);
    // Cleared by the next message, once.
    assert_eq!(changes(&b.seen(&slow, T0 + 300 * S), "device_offline"), ["clear"]);
    assert!(of(&b.seen(&slow, T0 + 301 * S), "device_offline").is_empty());
}

#[test]
fn absence_at_once_on_offline_status_cleared_by_data_or_online() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.seen(&g, T0);
    assert_eq!(changes(&b.status(&g, LinkState::Offline, T0 + S), "device_offline"), ["open"]);
    // The offline status is itself a message: it must not clear what it opened.
    assert!(of(&b.seen(&g, T0 + S), "device_offline").is_empty());
    assert!(of(&b.tick(T0 + 10 * MIN), "device_offline").is_empty(), "no second open");
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 1.0, T0 + 11 * MIN), "device_offline"), ["clear"]);
    assert_eq!(changes(&b.status(&g, LinkState::Offline, T0 + 12 * MIN), "device_offline"), ["open"]);
    assert_eq!(changes(&b.status(&g, LinkState::Online, T0 + 13 * MIN), "device_offline"), ["clear"]);
}

#[test]
fn tracked_devices_go_offline_without_ever_speaking() {
    let mut b = Bench::default_pack();
    let mut g = Dev::gas("g1");
    g.interval_s = 60;
    b.engine.track(&g.ctx(), T0 - 170 * S);
    assert!(of(&b.tick(T0), "device_offline").is_empty());
    assert_eq!(changes(&b.tick(T0 + 10 * S), "device_offline"), ["open"]);
    // Restored at start: the retained offline status and its on_seen do not flap it.
    let mut b = Bench::default_pack();
    b.engine.restore_active(&g.ctx(), "device_offline");
    b.engine.track(&g.ctx(), T0 - DAY);
    let mut out = b.seen(&g, T0);
    out.extend(b.status(&g, LinkState::Offline, T0));
    out.extend(b.tick(T0 + H));
    assert!(of(&out, "device_offline").is_empty(), "{out:?}");
    assert_eq!(changes(&b.status(&g, LinkState::Online, T0 + 2 * H), "device_offline"), ["clear"]);
}

// ---------------------------------------------------------------------------------------------
// Follow-up.

#[test]
fn follow_up_opens_at_the_deadline_without_valve_closed() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 55.0, T0), "gas_high"), ["open"]);
    assert!(of(&b.tick(T0 + 30 * S - 1), "gas_valve_failed").is_empty());
    let out = b.tick(T0 + 30 * S);
    assert_eq!(changes(&out, "gas_valve_failed"), ["open"]);
    assert_eq!(of(&out, "gas_valve_failed")[0].ts_ms, T0 + 30 * S);
    // Met later: clears.
    assert_eq!(changes(&b.read(&g, Metric::ValveClosed, 1.0, T0 + 40 * S), "gas_valve_failed"), ["clear"]);
}

#[test]
fn follow_up_does_not_fire_when_the_valve_closes() {
    let mut b = Bench::default_pack();
    // By reading, within the deadline.
    let g1 = Dev::gas("g1");
    b.read(&g1, Metric::GasLel, 55.0, T0);
    b.read(&g1, Metric::ValveClosed, 1.0, T0 + 3 * S);
    // By event.
    let g2 = Dev::gas("g2");
    b.read(&g2, Metric::GasLel, 55.0, T0);
    b.event(&g2, EventKind::ValveClosed, T0 + 29 * S);
    // Already closed before gas_high opened (same message, valve first).
    let g3 = Dev::gas("g3");
    b.read(&g3, Metric::ValveClosed, 1.0, T0);
    b.read(&g3, Metric::GasLel, 55.0, T0);
    // gas_high cleared before the deadline: cancelled.
    let mut b2 = Bench::pack(
        "[[rule]]\nname = \"hi\"\nkind = \"threshold\"\nseverity = \"critical\"\nmetric = \"gas_lel\"\nopen = { at_least = 50 }\n\
         [[rule]]\nname = \"valve\"\nkind = \"follow_up\"\nseverity = \"critical\"\nafter = \"hi\"\nwithin = \"30s\"\nexpect_event = \"valve_closed\"\n",
    );
    b2.read(&g1, Metric::GasLel, 55.0, T0);
    assert_eq!(changes(&b2.read(&g1, Metric::GasLel, 5.0, T0 + 10 * S), "hi"), ["clear"]);
    assert!(of(&b2.tick(T0 + MIN), "valve").is_empty());
    let out = b.tick(T0 + 5 * MIN);
    assert!(of(&out, "gas_valve_failed").is_empty(), "{out:?}");
    // A valve opened (0) without gas_high: nothing.
    let g4 = Dev::gas("g4");
    assert!(of(&b.read(&g4, Metric::ValveClosed, 0.0, T0), "gas_valve_failed").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Composite.

#[test]
fn composite_two_detectors_of_one_site_within_60s_confirm_fire() {
    let mut b = Bench::default_pack();
    let (d1, d2, d3) = (Dev::smoke("d1", "garage"), Dev::smoke("d2", "garage"), Dev::smoke("d3", "garage"));
    b.read(&d1, Metric::SmokeDbM, 0.2, T0);
    let out = b.tick(T0 + 5 * S);
    assert_eq!(changes(&out, "smoke"), ["open"]);
    assert!(of(&out, "fire_confirmed").is_empty(), "one device is not a confirmation");
    let out = b.read(&d1, Metric::SmokeDbM, 0.25, T0 + 20 * S);
    assert_eq!(changes(&out, "smoke"), ["repeat"]);
    assert!(of(&out, "fire_confirmed").is_empty(), "nor is one device twice");
    // A second device, by another rule (heat is immediate).
    let out = b.read(&d2, Metric::TempC, 65.0, T0 + 40 * S);
    assert_eq!(changes(&out, "heat"), ["open"]);
    let fire = of(&out, "fire_confirmed");
    assert_eq!(changes(&out, "fire_confirmed"), ["open"]);
    assert_eq!((fire[0].scope, &*fire[0].site, &*fire[0].device), (Scope::Site, "garage", "d2"));
    let Change::Open { severity, value, .. } = &fire[0].change else { panic!("open") };
    assert_eq!((*severity, *value), (Severity::Critical, Some(2.0)));
    // The same devices again: nothing new. A third: repeat.
    assert!(of(&b.read(&d1, Metric::SmokeDbM, 0.3, T0 + 45 * S), "fire_confirmed").is_empty());
    let out = b.event(&d3, EventKind::Alarm, T0 + 50 * S);
    assert_eq!(changes(&out, "device_alarm"), ["open"]);
    assert_eq!(changes(&out, "fire_confirmed"), ["repeat"]);
    // Never clears on its own.
    assert!(of(&b.tick(T0 + DAY), "fire_confirmed").is_empty());
}

#[test]
fn composite_needs_one_site_and_the_window() {
    let mut b = Bench::default_pack();
    let (a, other_site, late) = (Dev::smoke("a", "s1"), Dev::smoke("b", "s2"), Dev::smoke("c", "s1"));
    let mut out = b.read(&a, Metric::TempC, 65.0, T0);
    out.extend(b.read(&other_site, Metric::TempC, 65.0, T0 + S));
    out.extend(b.read(&late, Metric::TempC, 65.0, T0 + 62 * S));
    assert_eq!(changes(&out, "heat").len(), 3);
    assert!(of(&out, "fire_confirmed").is_empty(), "{out:?}");
    // Gas detectors do not count (devices = smoke_detector) and have no heat rule.
    let g = Dev::new("g", "s1", DeviceKind::GasDetector);
    assert!(of(&b.event(&g, EventKind::Alarm, T0 + 63 * S), "fire_confirmed").is_empty());
}

#[test]
fn composite_with_clear_after_clears_and_release_reopens() {
    let pack = "[[rule]]\nname = \"alarm\"\nkind = \"event\"\nseverity = \"critical\"\nopen_on = [\"alarm\"]\n\
                [[rule]]\nname = \"fire\"\nkind = \"composite\"\nseverity = \"critical\"\nof = [\"alarm\"]\nwithin = \"60s\"\nclear_after = \"10m\"\n";
    let mut b = Bench::pack(pack);
    let (d1, d2) = (Dev::smoke("d1", "s1"), Dev::smoke("d2", "s1"));
    b.event(&d1, EventKind::Alarm, T0);
    assert_eq!(changes(&b.event(&d2, EventKind::Alarm, T0 + S), "fire"), ["open"]);
    assert!(of(&b.tick(T0 + 10 * MIN), "fire").is_empty());
    let out = b.tick(T0 + S + 10 * MIN);
    assert_eq!(changes(&out, "fire"), ["clear"]);
    assert_eq!(of(&out, "fire")[0].scope, Scope::Site);
    // The event rule has no clear_on: it never clears itself; released by an operator, it opens anew.
    assert_eq!(changes(&b.event(&d1, EventKind::Alarm, T0 + H), "alarm"), ["repeat"]);
    b.engine.release(Scope::Device, "s1", "d1", "alarm");
    assert_eq!(changes(&b.event(&d1, EventKind::Alarm, T0 + H + S), "alarm"), ["open"]);
}

// ---------------------------------------------------------------------------------------------
// Stuck, rate, trend.

#[test]
fn stuck_sensor_opens_after_24h_unchanged_and_clears_on_change() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.read(&g, Metric::GasLel, 3.0, T0);
    b.read(&g, Metric::BatteryV, 3.0, T0 + H);
    assert!(of(&b.tick(T0 + DAY - 1), "sensor_stuck").is_empty());
    let out = b.tick(T0 + DAY);
    assert_eq!(changes(&out, "sensor_stuck"), ["open"]);
    let Change::Open { metric, value, .. } = &of(&out, "sensor_stuck")[0].change else { panic!("open") };
    assert_eq!((*metric, *value), (Some(Metric::GasLel), Some(3.0)));
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 3.0, T0 + DAY + S), "sensor_stuck"), ["repeat"]);
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 3.1, T0 + DAY + 2 * S), "sensor_stuck"), ["clear"]);
    // A silent device is the absence rule's business: not stuck from the clock alone…
    let quiet = Dev::gas("quiet");
    b.read(&quiet, Metric::GasLel, 2.0, T0);
    assert!(of(&b.tick(T0 + 2 * DAY), "sensor_stuck").is_empty());
    // …but a later identical reading proves it.
    assert_eq!(changes(&b.read(&quiet, Metric::GasLel, 2.0, T0 + 2 * DAY), "sensor_stuck"), ["open"]);
    // Valve position is digital: never stuck.
    let mut b = Bench::default_pack();
    b.read(&g, Metric::ValveClosed, 0.0, T0);
    b.read(&g, Metric::ValveClosed, 0.0, T0 + 2 * DAY);
    assert!(of(&b.tick(T0 + 3 * DAY), "sensor_stuck").is_empty());
}

#[test]
fn rate_opens_on_a_rise_within_the_window_and_clears_from_tick() {
    let mut b = Bench::pack(
        "[[rule]]\nname = \"temp_rise\"\nkind = \"rate\"\nseverity = \"major\"\nmetric = \"temp_c\"\nwindow = \"60s\"\nrise_at_least = 10.0\n",
    );
    let d = Dev::smoke("d1", "s1");
    b.read(&d, Metric::TempC, 20.0, T0);
    assert!(of(&b.read(&d, Metric::TempC, 25.0, T0 + 30 * S), "temp_rise").is_empty());
    let out = b.read(&d, Metric::TempC, 31.0, T0 + 50 * S);
    assert_eq!(changes(&out, "temp_rise"), ["open"]);
    let Change::Open { value, .. } = &of(&out, "temp_rise")[0].change else { panic!("open") };
    assert_eq!(*value, Some(11.0));
    // At T0+90s the value at the window's start (T0+30s) was 25: a change of 6.
    assert!(of(&b.tick(T0 + 89 * S), "temp_rise").is_empty());
    assert_eq!(changes(&b.tick(T0 + 90 * S), "temp_rise"), ["clear"]);
    // A slow rise never opens.
    let d2 = Dev::smoke("d2", "s1");
    let mut out = Vec::new();
    for k in 0..20 {
        out.extend(b.read(&d2, Metric::TempC, 20.0 + f64::from(k) * 2.0, T0 + i64::from(k) * 20 * S));
    }
    assert!(of(&out, "temp_rise").is_empty());
}

/// Readings every 6 h of device time for `days`, rising `um_per_year`, with a little noise.
fn corrosion(b: &mut Bench, m: &Dev, um_per_year: f64, days: i64) -> Vec<Signal> {
    let mut out = Vec::new();
    for k in 0..days * 4 {
        let t = k * 6 * H;
        let noise = [0.05, -0.05, 0.02, -0.02][(k % 4) as usize];
        let value = 100.0 + um_per_year * t as f64 / (365.25 * DAY as f64) + noise;
        b.engine.on_reading(&m.ctx(), Metric::CorrosionUm, value, T0 + t, T0 + t, &mut out);
    }
    out
}

#[test]
fn trend_opens_on_100_um_per_year_not_on_50() {
    let mut b = Bench::default_pack();
    let (fast, slow) = (Dev::siren("fast"), Dev::siren("slow"));
    let out = corrosion(&mut b, &fast, 100.0, 40);
    let opened = of(&out, "mount_corrosion_rate");
    assert_eq!(changes(&out, "mount_corrosion_rate")[0], "open");
    assert!(opened[0].ts_ms >= T0 + 7 * DAY, "needs min_span of data first");
    let Change::Open { value: Some(rate), threshold, .. } = &opened[0].change else { panic!("open") };
    assert!((rate - 100.0).abs() < 10.0, "{rate}");
    assert_eq!(*threshold, Some(80.0));
    assert!(!changes(&out, "mount_corrosion_rate").contains(&"clear"));
    assert!(of(&corrosion(&mut b, &slow, 50.0, 40), "mount_corrosion_rate").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Housekeeping.

#[test]
fn forgotten_devices_leave_no_timers_behind_and_stats_count() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("g1");
    b.read(&g, Metric::GasLel, 25.0, T0);
    b.read(&g, Metric::GasLel, 60.0, T0);
    let stats = b.engine.stats();
    assert_eq!((stats.devices, stats.signals.open), (1, 1));
    assert!(stats.timers_pending >= 2);
    b.engine.forget("g1");
    assert!(b.tick(T0 + DAY).is_empty());
    let stats = b.engine.stats();
    assert_eq!((stats.devices, stats.timers_pending), (0, 0));
    assert!(format!("{:?}", b.engine).contains("Engine"));
    serde_json::to_string(&stats).expect("serialises");
}

#[test]
fn a_device_changing_kind_gets_the_new_kinds_rules() {
    let mut b = Bench::default_pack();
    let g = Dev::gas("d1");
    assert_eq!(changes(&b.read(&g, Metric::GasLel, 60.0, T0), "gas_high"), ["open"]);
    let d = Dev::smoke("d1", "s1");
    assert_eq!(changes(&b.read(&d, Metric::TempC, 65.0, T0 + S), "heat"), ["open"]);
    assert!(of(&b.read(&d, Metric::GasLel, 60.0, T0 + 2 * S), "gas_high").is_empty(), "not a smoke detector's rule");
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
enum Op {
    Reading { dev: usize, metric: usize, value: f64, ts: Option<i64> },
    Event { dev: usize, event: usize },
    Status { dev: usize, online: bool },
    Seen { dev: usize },
    Forget { dev: usize },
    Wait { ms: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    let value = prop_oneof![
        Just(0.0),
        Just(0.15),
        Just(2.7),
        Just(20.0),
        Just(50.0),
        Just(60.0),
        -1.0e3..1.0e3f64,
        proptest::num::f64::ANY,
    ];
    prop_oneof![
        6 => (0..6usize, 0..Metric::ALL.len(), value, prop_oneof![9 => Just(None), 1 => any::<i64>().prop_map(Some)])
            .prop_map(|(dev, metric, value, ts)| Op::Reading { dev, metric, value, ts }),
        2 => (0..6usize, 0..EventKind::ALL.len()).prop_map(|(dev, event)| Op::Event { dev, event }),
        1 => (0..6usize, any::<bool>()).prop_map(|(dev, online)| Op::Status { dev, online }),
        1 => (0..6usize).prop_map(|dev| Op::Seen { dev }),
        1 => (0..6usize).prop_map(|dev| Op::Forget { dev }),
        3 => prop_oneof![0..5_000i64, 0..120_000i64, 0..(2 * DAY)].prop_map(|ms| Op::Wait { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random traffic never panics, and per (device or site, rule) the signals follow
    /// open → (repeat)* → clear, never a second open while open.
    #[test]
    fn random_traffic_never_panics_and_signals_are_well_formed(ops in proptest::collection::vec(op(), 1..200)) {
        let kinds = [DeviceKind::GasDetector, DeviceKind::SmokeDetector, DeviceKind::SirenMount];
        let devs: Vec<Dev> = (0..6)
            .map(|i| {
                let mut d = Dev::new(&format!("d{i}"), if i % 2 == 0 { "a" } else { "b" }, kinds[i % 3]);
                d.interval_s = 30;
                d
            })
            .collect();
        let mut b = Bench::default_pack();
        let mut open: HashMap<(String, String), bool> = HashMap::new();
        let mut now = T0;
        for op in ops {
            let mut out = Vec::new();
            match op {
                Op::Reading { dev, metric, value, ts } => {
                    // Device time is the device's: sometimes wild.
                    b.engine.on_reading(&devs[dev].ctx(), Metric::ALL[metric], value, ts.unwrap_or(now - 5), now, &mut out);
                    b.engine.on_seen(&devs[dev].ctx(), now, &mut out);
                }
                Op::Event { dev, event } => b.engine.on_event(&devs[dev].ctx(), EventKind::ALL[event], Some(Metric::GasLel), Some(1.0), now, now, &mut out),
                Op::Status { dev, online } => {
                    let state = if online { LinkState::Online } else { LinkState::Offline };
                    b.engine.on_seen(&devs[dev].ctx(), now, &mut out);
                    b.engine.on_status(&devs[dev].ctx(), state, now, &mut out);
                }
                Op::Seen { dev } => b.engine.on_seen(&devs[dev].ctx(), now, &mut out),
                Op::Forget { dev } => {
                    b.engine.forget(&devs[dev].id);
                    open.retain(|(who, _), _| who != &*devs[dev].id);
                }
                Op::Wait { ms } => {
                    now += ms;
                    b.engine.tick(now, &mut out);
                }
            }
            for s in &out {
                let who = match s.scope { Scope::Device => s.device.to_string(), Scope::Site => format!("site:{}", s.site) };
                let is_open = open.entry((who, s.rule.to_string())).or_default();
                match s.change {
                    Change::Open { .. } => { prop_assert!(!*is_open, "second open: {s:?}"); *is_open = true; }
                    Change::Repeat { .. } => prop_assert!(*is_open, "repeat while not open: {s:?}"),
                    Change::Clear { .. } => { prop_assert!(*is_open, "clear while not open: {s:?}"); *is_open = false; }
                    Change::Remind { .. } => prop_assert_eq!(&*s.rule, "inspection_due"),
                }
            }
        }
    }

    /// A threshold rule with hysteresis never opens before its level held for its `for`, and
    /// never clears before its clear condition held for its `for`: no flapping faster than that.
    #[test]
    fn hysteresis_never_flaps_faster_than_its_conditions_allow(
        steps in proptest::collection::vec((0..40_000i64, prop_oneof![0.0..30.0f64, Just(5.0), Just(15.0), Just(25.0)]), 1..120)
    ) {
        let mut b = Bench::pack(
            "[[rule]]\nname = \"gas\"\nkind = \"threshold\"\nseverity = \"major\"\nmetric = \"gas_lel\"\n\
             open = { at_least = 20.0, for = \"10s\" }\nclear = { below = 10.0, for = \"30s\" }\n",
        );
        let g = Dev::gas("g1");
        let (mut now, mut open_since, mut clear_since): (i64, Option<i64>, Option<i64>) = (T0, None, None);
        let mut is_open = false;
        let mut check = |out: Vec<Signal>, open_since: Option<i64>, clear_since: Option<i64>| -> Result<(), TestCaseError> {
            for s in of(&out, "gas") {
                match s.change {
                    Change::Open { .. } => {
                        prop_assert!(!is_open);
                        prop_assert!(open_since.is_some_and(|t| s.ts_ms - t >= 10 * S), "open too early: {s:?} {open_since:?}");
                        is_open = true;
                    }
                    Change::Clear { .. } => {
                        prop_assert!(is_open);
                        prop_assert!(clear_since.is_some_and(|t| s.ts_ms - t >= 30 * S), "clear too early: {s:?} {clear_since:?}");
                        is_open = false;
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        for (gap, value) in steps {
            // Tick every second through the gap, as the gateway does.
            let end = now + gap;
            while now + S <= end {
                now += S;
                check(b.tick(now), open_since, clear_since)?;
            }
            now = end;
            open_since = if value >= 20.0 { open_since.or(Some(now)) } else { None };
            clear_since = if value < 10.0 { clear_since.or(Some(now)) } else { None };
            check(b.read(&g, Metric::GasLel, value, now), open_since, clear_since)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties under faults (issue 8): device clocks that jump, devices that come and go.

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The hysteresis property again, with the device's clock jumping anywhere (far past, far
    /// future, back and forth): "held for" runs on the gateway's clock, so a lying device clock
    /// can neither open early nor clear early.
    #[test]
    fn a_jumping_device_clock_never_makes_hysteresis_flap(
        steps in proptest::collection::vec(
            (0..40_000i64, prop_oneof![0.0..30.0f64, Just(5.0), Just(25.0)], prop_oneof![Just(0i64), -400 * DAY..400 * DAY, Just(i64::MIN / 2), Just(i64::MAX / 2)]),
            1..120,
        )
    ) {
        let mut b = Bench::pack(
            "[[rule]]\nname = \"gas\"\nkind = \"threshold\"\nseverity = \"major\"\nmetric = \"gas_lel\"\n\
             open = { at_least = 20.0, for = \"10s\" }\nclear = { below = 10.0, for = \"30s\" }\n",
        );
        let g = Dev::gas("g1");
        let (mut now, mut open_since, mut clear_since): (i64, Option<i64>, Option<i64>) = (T0, None, None);
        let mut is_open = false;
        let mut check = |out: Vec<Signal>, now: i64, open_since: Option<i64>, clear_since: Option<i64>| -> Result<(), TestCaseError> {
            for s in of(&out, "gas") {
                match s.change {
                    Change::Open { .. } => {
                        prop_assert!(!is_open);
                        prop_assert!(open_since.is_some_and(|t| now - t >= 10 * S), "open too early at {now}: {s:?} {open_since:?}");
                        is_open = true;
                    }
                    Change::Clear { .. } => {
                        prop_assert!(is_open);
                        prop_assert!(clear_since.is_some_and(|t| now - t >= 30 * S), "clear too early at {now}: {s:?} {clear_since:?}");
                        is_open = false;
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        for (gap, value, skew) in steps {
            let end = now + gap;
            while now + S <= end {
                now += S;
                check(b.tick(now), now, open_since, clear_since)?;
            }
            now = end;
            open_since = if value >= 20.0 { open_since.or(Some(now)) } else { None };
            clear_since = if value < 10.0 { clear_since.or(Some(now)) } else { None };
            let mut out = Vec::new();
            b.engine.on_reading(&g.ctx(), Metric::GasLel, value, now.saturating_add(skew), now, &mut out);
            check(out, now, open_since, clear_since)?;
        }
    }

    /// A device heard from at least every `max(3 × interval, 90 s)` (whatever its clock says)
    /// never gets a `device_offline`; one that then falls silent gets exactly one.
    #[test]
    fn a_device_heard_in_time_never_goes_offline_and_a_silent_one_does_once(
        gaps in proptest::collection::vec(0..90i64, 1..60),
        skews in proptest::collection::vec(prop_oneof![Just(0i64), -400 * DAY..400 * DAY], 60),
    ) {
        let mut b = Bench::default_pack();
        let mut g = Dev::gas("g1");
        g.interval_s = 10; // the bound is then max(30 s, 90 s) = 90 s
        let mut now = T0;
        let mut opens = 0;
        for (i, gap) in gaps.iter().enumerate() {
            for _ in 0..*gap {
                now += S;
                opens += changes(&b.tick(now), "device_offline").iter().filter(|c| **c == "open").count();
            }
            let mut out = Vec::new();
            b.engine.on_reading(&g.ctx(), Metric::GasLel, 1.0, now.saturating_add(skews[i]), now, &mut out);
            opens += changes(&out, "device_offline").iter().filter(|c| **c == "open").count();
        }
        prop_assert_eq!(opens, 0, "offline while heard within 90 s");
        for _ in 0..200 {
            now += S;
            opens += changes(&b.tick(now), "device_offline").iter().filter(|c| **c == "open").count();
        }
        prop_assert_eq!(opens, 1, "one device_offline after 200 s of silence");
    }

    /// Devices that churn (appear, talk, go, are forgotten) leave no engine state behind once
    /// their timers have come due: nothing keyed by device outlives the device.
    #[test]
    fn churned_devices_leave_no_state_behind(ops in proptest::collection::vec(op(), 1..150)) {
        let kinds = [DeviceKind::GasDetector, DeviceKind::SmokeDetector, DeviceKind::SirenMount];
        let devs: Vec<Dev> = (0..6).map(|i| Dev::new(&format!("d{i}"), "a", kinds[i % 3])).collect();
        let mut b = Bench::default_pack();
        let mut now = T0;
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Reading { dev, metric, value, ts } => {
                    b.engine.on_reading(&devs[dev].ctx(), Metric::ALL[metric], value, ts.unwrap_or(now), now, &mut out)
                }
                Op::Event { dev, event } => b.engine.on_event(&devs[dev].ctx(), EventKind::ALL[event], None, None, now, now, &mut out),
                Op::Status { dev, online } => {
                    let state = if online { LinkState::Online } else { LinkState::Offline };
                    b.engine.on_status(&devs[dev].ctx(), state, now, &mut out)
                }
                Op::Seen { dev } => b.engine.on_seen(&devs[dev].ctx(), now, &mut out),
                Op::Forget { dev } => b.engine.forget(&devs[dev].id),
                Op::Wait { ms } => {
                    now += ms;
                    b.engine.tick(now, &mut out);
                }
            }
        }
        for d in &devs {
            b.engine.forget(&d.id);
        }
        // Every deadline a device could have queued (follow-ups, held-for, absence, trends,
        // stuck sensors) lies within 400 days.
        b.engine.tick(now + 400 * DAY, &mut out);
        let stats = b.engine.stats();
        prop_assert_eq!((stats.devices, stats.timers_pending), (0, 0), "{:?}", stats);
    }
}
