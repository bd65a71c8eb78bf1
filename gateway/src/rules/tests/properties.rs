//! Property tests: random traffic never panics and signals are well formed, hysteresis never
//! flaps, and the same under device clocks that jump and devices that churn.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

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
