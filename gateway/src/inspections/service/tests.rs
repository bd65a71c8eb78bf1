use std::sync::atomic::{AtomicI64, Ordering};

use super::*;
use crate::incidents::Severity;
use crate::incidents::book::Book;
use crate::incidents::manager::Manager;
use crate::incidents::store::IncidentStore;
use crate::incidents::IncidentsConfig;

const DAY: i64 = schedule::DAY_MS;

fn incidents(dir: &std::path::Path) -> IncidentsHandle {
    let store = Arc::new(IncidentStore::open(dir).expect("incident store"));
    let book = Book::new(IncidentsConfig::default(), Vec::new(), Vec::new(), crate::ingest::now_ms());
    let (manager, handle, requests) = Manager::new(book, store, Vec::new(), None, 365 * DAY);
    let (_delivered_tx, delivered) = mpsc::channel(16);
    tokio::spawn(async move {
        let _keep = _delivered_tx;
        manager.run(requests, delivered).await
    });
    handle
}

fn service(dir: &std::path::Path, handle: &IncidentsHandle, clock: &Arc<AtomicI64>) -> (Service, InspectionsHandle) {
    let c = Arc::clone(clock);
    let cfg = InspectionsConfig { siren_test: super::super::siren_test::SirenTestConfig { enabled: false, ..Default::default() }, ..Default::default() };
    let store = MaintenanceStore::open(dir).expect("store");
    let registry = Arc::new(Registry::new());
    Service::with_clock(cfg, store, registry, None, handle.clone(), Arc::new(move || c.load(Ordering::SeqCst)), Arc::new(crate::ingest::now_ms))
        .expect("service")
}

/// The device's incident of `rule`: (revision, severity, state, last history action).
fn incident_of(handle: &IncidentsHandle, rule: &str) -> Option<(u32, Severity, IncidentState, String)> {
    let list = handle.store.list(&IncidentFilter { limit: 10, rule: Some(rule.into()), ..Default::default() }).expect("list");
    assert!(list.len() <= 1, "{list:?}");
    list.first().map(|i| (i.revision, i.severity, i.state, i.history.last().map(|h| h.action.clone()).unwrap_or_default()))
}

#[tokio::test]
async fn reminders_fall_on_their_days_once_even_across_a_restart_and_a_completion_closes_the_incident() {
    let dir = tempfile::tempdir().expect("tmp");
    let handle = incidents(dir.path());
    // Calibrated 2025-12-20, due 2026-12-20 00:00 Shanghai.
    let due = schedule::midnight_ms(jiff::civil::date(2026, 12, 20), &jiff::tz::TimeZone::get("Asia/Shanghai").expect("tz"));
    let clock = Arc::new(AtomicI64::new(due - 31 * DAY));
    let (mut s, _h) = service(dir.path(), &handle, &clock);
    let csv = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n\
               xh,g-1,gas_detector,Kitchen,2025-06-01,2025-12-20,,crew-7,13812345678\n";
    let report = s.import(csv.as_bytes().to_vec()).await.expect("import");
    assert_eq!((report.imported, report.rejected), (1, 0));
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE), None, "31 days before: nothing");
    clock.store(due - 30 * DAY, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE), Some((1, Severity::Info, IncidentState::Open, "open".into())), "the 30-day reminder");
    clock.store(due - 8 * DAY, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE).map(|i| i.0), Some(1), "between reminders: nothing");
    clock.store(due - 7 * DAY, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE), Some((2, Severity::Info, IncidentState::Open, "reminder".into())), "the 7-day reminder");

    // Restart: the marks are in the store; the 7-day reminder is not sent again.
    drop(s);
    let (mut s, _h) = service(dir.path(), &handle, &clock);
    clock.store(due - 6 * DAY, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE).map(|i| i.0), Some(2));
    clock.store(due - DAY, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE).map(|i| (i.0, i.3)), Some((3, "reminder".into())), "the 1-day reminder");
    clock.store(due, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, RULE_INSPECTION_DUE), Some((4, Severity::Warning, IncidentState::Open, "severity".into())), "overdue");
    let orders = s.work_orders(&WorkOrderQuery { due_within_days: 0, site: None, overdue_only: true });
    assert_eq!(orders.items.len(), 1);
    assert_eq!(orders.items[0].phone, "138****5678");

    // A failed inspection resets nothing; a pass closes the incident.
    let failed = s
        .complete(CompletionRequest { device: "g-1".into(), task: Task::Inspection, result: Outcome::Fail, notes: String::new(), by: "crew-7".into() })
        .await
        .expect("fail recorded");
    assert!(!failed.incident_closed);
    let view = s
        .complete(CompletionRequest { device: "g-1".into(), task: Task::Calibration, result: Outcome::Pass, notes: "ok".into(), by: "crew-7".into() })
        .await
        .expect("pass");
    assert!(view.incident_closed);
    assert_eq!(view.tasks.iter().find(|t| t.task == Task::Calibration).map(|t| t.due.as_str()), Some("2027-12-19T16:00:00.000Z"));
    let (_, _, state, action) = incident_of(&handle, RULE_INSPECTION_DUE).expect("incident");
    assert_eq!((state, action.as_str()), (IncidentState::Closed, "closed"));
    assert!(matches!(
        s.complete(CompletionRequest { device: "g-1".into(), task: Task::Cleaning, result: Outcome::Pass, notes: String::new(), by: "x".into() }).await,
        Err(Error::Invalid(_))
    ));
}

#[tokio::test]
async fn an_imported_silent_device_is_never_reported_then_overdue_and_its_first_report_clears_it() {
    use crate::registry::{Health, InventoryMark};
    let dir = tempfile::tempdir().expect("tmp");
    let handle = incidents(dir.path());
    let registry = Arc::new(Registry::new());
    let now = crate::ingest::now_ms();
    let clock = Arc::new(AtomicI64::new(now));
    let open = |registry: &Arc<Registry>| {
        let c = Arc::clone(&clock);
        let cfg = InspectionsConfig { siren_test: super::super::siren_test::SirenTestConfig { enabled: false, ..Default::default() }, ..Default::default() };
        let store = MaintenanceStore::open(dir.path()).expect("store");
        Service::with_clock(cfg, store, Arc::clone(registry), None, handle.clone(), Arc::new(move || c.load(Ordering::SeqCst)), Arc::new(crate::ingest::now_ms))
            .expect("service")
    };
    // Heard before the import, and not in it.
    registry.upsert("x-1", || crate::registry::Device::new("x-1", "xh", citywatch_edge::wire::DeviceKind::GasDetector, now), |_, _| ());
    let (mut s, _h) = open(&registry);
    let csv = "site,device,kind,location,install_date,last_inspection,inspection_interval_months,crew,phone\n\
               xh,g-1,gas_detector,Kitchen,2025-06-01,,,crew-7,13812345678\n";
    s.import(csv.as_bytes().to_vec()).await.expect("import");
    let cfg = crate::ingest::IngestConfig::default();
    let g = registry.get("g-1").expect("in the registry from the import");
    assert_eq!(g.health_flags(now, &cfg), vec![Health::NeverReported]);
    assert_eq!(registry.get("x-1").map(|d| d.inventory), Some(InventoryMark::Missing));
    assert!(registry.get("x-1").expect("x-1").health_flags(now, &cfg).contains(&Health::NotInInventory));

    s.tick().await;
    clock.store(now + 24 * 3600 * 1000 - 1, Ordering::SeqCst);
    s.tick().await;
    assert_eq!(incident_of(&handle, crate::inspections::RULE_COMMISSIONING_OVERDUE), None, "within the grace period");
    // Installed 2025-06-01 and never inspected: its calibration is overdue as well, a separate incident.
    assert!(incident_of(&handle, RULE_INSPECTION_DUE).is_some());
    clock.store(now + 24 * 3600 * 1000, Ordering::SeqCst);
    s.tick().await;
    let (revision, severity, state, _) = incident_of(&handle, crate::inspections::RULE_COMMISSIONING_OVERDUE).expect("commissioning_overdue");
    assert_eq!((revision, severity, state), (1, Severity::Warning, IncidentState::Open));

    // A restart does not open it again; the registry is refilled from the inventory store.
    drop(s);
    let fresh = Arc::new(Registry::new());
    let (mut s, _h) = open(&fresh);
    assert_eq!(fresh.get("g-1").map(|d| d.never_reported), Some(true), "listed after a restart");
    s.tick().await;
    assert_eq!(incident_of(&handle, crate::inspections::RULE_COMMISSIONING_OVERDUE).map(|i| i.0), Some(1));

    // Its first message (the decode stage clears the flag): cleared.
    fresh.upsert("g-1", || unreachable!("known"), |_, d| d.never_reported = false);
    s.tick().await;
    assert_eq!(incident_of(&handle, crate::inspections::RULE_COMMISSIONING_OVERDUE).map(|i| i.2), Some(IncidentState::Cleared));
}
