//! Every rule kind against a controlled clock, and the engine's housekeeping.

use super::*;

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
