//! The pack and its overrides: the default pack, files, and the bad configs `check-config`
//! must name by rule and key.

use super::*;

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
