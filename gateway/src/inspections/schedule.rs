//! Schedules per device kind: which maintenance tasks a device has, when each falls due, and
//! which reminder is due at a given moment. Pure: dates in, dates out, the clock passed in.
//!
//! Gas detectors: inspection with calibration every 12 months; replacement at end of life
//! (3 years commercial / 5 residential, the shut-off valve 10). Smoke detectors: tested every
//! 12 months, cleaned every 3 years once 2 years in service. Siren mounts: inspected every 6
//! months and before the flood and typhoon season (1 June). All configurable.

use citywatch_edge::wire::DeviceKind;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Span;
use serde::{Deserialize, Serialize};

use super::inventory::Premises;
use super::InspectionsConfig;

pub const DAY_MS: i64 = 86_400_000;

/// A kind of maintenance work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Inspection,
    Calibration,
    Cleaning,
    Replacement,
    SirenSeason,
}

impl Task {
    pub const ALL: [Task; 5] = [Task::Inspection, Task::Calibration, Task::Cleaning, Task::Replacement, Task::SirenSeason];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Inspection => "inspection",
            Task::Calibration => "calibration",
            Task::Cleaning => "cleaning",
            Task::Replacement => "replacement",
            Task::SirenSeason => "siren_season",
        }
    }

    pub fn parse(s: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// What the schedule of one device depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maintained {
    pub kind: DeviceKind,
    pub premises: Premises,
    /// From the inventory: when the device (and its valve) went in.
    pub install_date: Date,
    /// The detector was replaced on this date (its end of life counts from here; the valve's not).
    pub replaced_on: Option<Date>,
    /// The inventory's interval for the kind's periodic task, else the configured one.
    pub interval_months: Option<u32>,
    pub last_inspection: Option<Date>,
    pub last_calibration: Option<Date>,
    pub last_cleaning: Option<Date>,
}

/// One task's next due date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDue {
    pub task: Task,
    pub due: Date,
    /// Due at local midnight, ms since the epoch.
    pub due_ms: i64,
    /// Why, e.g. "detector end of life (3 years, commercial)".
    pub note: String,
}

fn plus_months(d: Date, months: u32) -> Date {
    d.checked_add(Span::new().months(i64::from(months))).unwrap_or(Date::MAX)
}

fn plus_years(d: Date, years: u32) -> Date {
    d.checked_add(Span::new().years(i64::from(years))).unwrap_or(Date::MAX)
}

/// "MM-DD" → (month, day), a valid day of a leap year.
pub fn parse_month_day(s: &str) -> Option<(i8, i8)> {
    let (m, d) = s.split_once('-')?;
    let (m, d) = (m.parse::<i8>().ok()?, d.parse::<i8>().ok()?);
    Date::new(2024, m, d).ok().map(|_| (m, d))
}

/// Local midnight of `date` in `tz`, ms since the epoch.
pub fn midnight_ms(date: Date, tz: &TimeZone) -> i64 {
    date.to_zoned(tz.clone()).map(|z| z.timestamp().as_millisecond()).unwrap_or(i64::MAX)
}

/// The local date of an instant.
pub fn local_date(now_ms: i64, tz: &TimeZone) -> Date {
    jiff::Timestamp::from_millisecond(now_ms).map(|t| t.to_zoned(tz.clone()).date()).unwrap_or(Date::MIN)
}

/// Whole days from `today` to `due` (negative when overdue).
pub fn days_between(today: Date, due: Date) -> i64 {
    today.until(due).map(|s| i64::from(s.get_days())).unwrap_or(0)
}

/// The season inspection's due date: the first season start after `last`, unless `last` was
/// within the window before it (then that season is covered and the next one is due).
fn season_due(last: Date, (month, day): (i8, i8), window_months: u32) -> Date {
    let at = |year: i16| Date::new(year, month, day).unwrap_or_else(|_| Date::new(year, month, 28).unwrap_or(Date::MAX));
    let mut start = at(last.year());
    if last >= start {
        start = at(last.year().saturating_add(1));
    }
    let window_opens = start.checked_sub(Span::new().months(i64::from(window_months))).unwrap_or(Date::MIN);
    if window_months > 0 && last >= window_opens {
        start = at(start.year().saturating_add(1));
    }
    start
}

/// Every task of a device with its next due date, earliest first.
pub fn tasks(cfg: &InspectionsConfig, m: &Maintained, tz: &TimeZone) -> Vec<TaskDue> {
    let mut out = Vec::with_capacity(3);
    let mut push = |task: Task, due: Date, note: String| out.push(TaskDue { task, due, due_ms: midnight_ms(due, tz), note });
    let last = m.last_inspection.unwrap_or(m.install_date);
    match m.kind {
        DeviceKind::GasDetector => {
            let g = &cfg.gas_detector;
            let months = m.interval_months.unwrap_or(g.calibrate_every_months);
            let since = m.last_calibration.max(m.last_inspection).unwrap_or(m.install_date);
            push(Task::Calibration, plus_months(since, months), format!("inspection and calibration every {months} months"));
            let years = match m.premises {
                Premises::Commercial => g.end_of_life_commercial_years,
                Premises::Residential => g.end_of_life_residential_years,
            };
            let detector = plus_years(m.replaced_on.unwrap_or(m.install_date), years);
            let valve = plus_years(m.install_date, g.valve_end_of_life_years);
            if valve < detector {
                push(Task::Replacement, valve, format!("shut-off valve end of life ({} years)", g.valve_end_of_life_years));
            } else {
                push(Task::Replacement, detector, format!("detector end of life ({years} years, {})", m.premises.as_str()));
            }
        }
        DeviceKind::SmokeDetector => {
            let s = &cfg.smoke_detector;
            let months = m.interval_months.unwrap_or(s.test_every_months);
            push(Task::Inspection, plus_months(last, months), format!("functional test every {months} months"));
            let clean = match m.last_cleaning {
                Some(c) => plus_months(c, s.clean_every_months),
                None => plus_months(m.install_date, s.clean_after_months),
            };
            push(Task::Cleaning, clean, format!("cleaning every {} months once {} in service", s.clean_every_months, s.clean_after_months));
        }
        DeviceKind::SirenMount => {
            let s = &cfg.siren_mount;
            let months = m.interval_months.unwrap_or(s.inspect_every_months);
            push(Task::Inspection, plus_months(last, months), format!("bracket inspection every {months} months"));
            if let Some(md) = parse_month_day(&s.season_start) {
                push(Task::SirenSeason, season_due(last, md, s.season_window_months), format!("before the flood and typhoon season ({})", s.season_start));
            }
        }
    }
    out.sort_by_key(|t| t.due);
    out
}

/// The tasks a completion of `task` with result `replaced` or `pass` resets, and how.
pub fn complete(m: &mut Maintained, task: Task, replaced: bool, today: Date) {
    if replaced || task == Task::Replacement {
        m.replaced_on = Some(today);
        m.last_inspection = Some(today);
        m.last_calibration = Some(today);
        m.last_cleaning = Some(today);
        return;
    }
    match task {
        // An inspection of a gas detector includes its calibration (one visit, one record).
        Task::Inspection | Task::Calibration => {
            m.last_inspection = Some(today);
            if m.kind == DeviceKind::GasDetector {
                m.last_calibration = Some(today);
            }
        }
        Task::SirenSeason => m.last_inspection = Some(today),
        Task::Cleaning => m.last_cleaning = Some(today),
        Task::Replacement => {}
    }
}

/// Whether `task` is one of this kind's (inspection is accepted for every kind).
pub fn applies(kind: DeviceKind, task: Task) -> bool {
    matches!(
        (kind, task),
        (_, Task::Inspection)
            | (DeviceKind::GasDetector, Task::Calibration | Task::Replacement)
            | (DeviceKind::SmokeDetector, Task::Cleaning | Task::Replacement)
            | (DeviceKind::SirenMount, Task::SirenSeason | Task::Replacement)
    )
}

/// What a task needs at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing yet; look again at this time.
    NotYet(i64),
    /// The reminder `days_before` the due date (the latest one passed: a due date learnt late
    /// gets one reminder, not a burst).
    Remind(u32),
    Overdue,
}

/// What `remind_days` (any order) ask for a task due at `due_ms`, at `now_ms`.
pub fn due_at(remind_days: &[u32], due_ms: i64, now_ms: i64) -> Due {
    if now_ms >= due_ms {
        return Due::Overdue;
    }
    let remind_at = |d: u32| due_ms.saturating_sub(i64::from(d) * DAY_MS);
    match remind_days.iter().copied().filter(|d| remind_at(*d) <= now_ms).min() {
        Some(d) => Due::Remind(d),
        None => Due::NotYet(remind_days.iter().map(|d| remind_at(*d)).min().unwrap_or(due_ms)),
    }
}

/// When `due_at` answers differently next, after it answered `Remind(days)` or `NotYet`.
pub fn next_change(remind_days: &[u32], due_ms: i64, now_ms: i64) -> i64 {
    let remind_at = |d: u32| due_ms.saturating_sub(i64::from(d) * DAY_MS);
    remind_days.iter().map(|d| remind_at(*d)).filter(|at| *at > now_ms).min().unwrap_or(due_ms).min(due_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn m(kind: DeviceKind, install: Date, last: Option<Date>) -> Maintained {
        Maintained {
            kind,
            premises: Premises::Commercial,
            install_date: install,
            replaced_on: None,
            interval_months: None,
            last_inspection: last,
            last_calibration: None,
            last_cleaning: None,
        }
    }

    fn due_of(list: &[TaskDue], task: Task) -> Date {
        list.iter().find(|t| t.task == task).map(|t| t.due).expect("task present")
    }

    #[test]
    fn gas_detectors_are_calibrated_yearly_and_replaced_at_end_of_life() {
        let cfg = InspectionsConfig::default();
        let tz = cfg.time_zone();
        let mut g = m(DeviceKind::GasDetector, date(2024, 3, 1), Some(date(2025, 12, 20)));
        let list = tasks(&cfg, &g, &tz);
        assert_eq!(due_of(&list, Task::Calibration), date(2026, 12, 20));
        assert_eq!(due_of(&list, Task::Replacement), date(2027, 3, 1), "3 years commercial");
        g.premises = Premises::Residential;
        assert_eq!(due_of(&tasks(&cfg, &g, &tz), Task::Replacement), date(2029, 3, 1), "5 years residential");
        // Replaced after 5 years twice: the valve's 10 years come first.
        g.replaced_on = Some(date(2032, 1, 1));
        let list = tasks(&cfg, &g, &tz);
        assert_eq!(due_of(&list, Task::Replacement), date(2034, 3, 1));
        assert!(list.iter().any(|t| t.note.contains("valve")));
        // Due at Shanghai midnight.
        assert_eq!(list[0].due_ms, "2026-12-19T16:00:00Z".parse::<jiff::Timestamp>().expect("ts").as_millisecond());
    }

    #[test]
    fn smoke_detectors_are_tested_yearly_and_cleaned_after_two_years_then_every_three() {
        let cfg = InspectionsConfig::default();
        let tz = cfg.time_zone();
        let mut s = m(DeviceKind::SmokeDetector, date(2024, 5, 10), None);
        let list = tasks(&cfg, &s, &tz);
        assert_eq!(due_of(&list, Task::Inspection), date(2025, 5, 10));
        assert_eq!(due_of(&list, Task::Cleaning), date(2026, 5, 10));
        complete(&mut s, Task::Cleaning, false, date(2026, 5, 2));
        assert_eq!(due_of(&tasks(&cfg, &s, &tz), Task::Cleaning), date(2029, 5, 2));
    }

    #[test]
    fn siren_mounts_every_six_months_and_before_june() {
        let cfg = InspectionsConfig::default();
        let tz = cfg.time_zone();
        let s = m(DeviceKind::SirenMount, date(2023, 1, 1), Some(date(2025, 9, 1)));
        let list = tasks(&cfg, &s, &tz);
        assert_eq!(due_of(&list, Task::Inspection), date(2026, 3, 1));
        assert_eq!(due_of(&list, Task::SirenSeason), date(2026, 6, 1));
        // Inspected in April: this season is covered, next June is due.
        let s = m(DeviceKind::SirenMount, date(2023, 1, 1), Some(date(2026, 4, 15)));
        assert_eq!(due_of(&tasks(&cfg, &s, &tz), Task::SirenSeason), date(2027, 6, 1));
        // Inspected in July: next June.
        let s = m(DeviceKind::SirenMount, date(2023, 1, 1), Some(date(2026, 7, 15)));
        assert_eq!(due_of(&tasks(&cfg, &s, &tz), Task::SirenSeason), date(2027, 6, 1));
        // Inspected in January: before the window, this June is still due.
        let s = m(DeviceKind::SirenMount, date(2023, 1, 1), Some(date(2026, 1, 15)));
        assert_eq!(due_of(&tasks(&cfg, &s, &tz), Task::SirenSeason), date(2026, 6, 1));
    }

    #[test]
    fn reminders_30_7_1_days_before_then_overdue() {
        let r = [30, 7, 1];
        let due = 100 * DAY_MS;
        assert_eq!(due_at(&r, due, 60 * DAY_MS), Due::NotYet(70 * DAY_MS));
        assert_eq!(due_at(&r, due, 70 * DAY_MS), Due::Remind(30));
        assert_eq!(next_change(&r, due, 70 * DAY_MS), 93 * DAY_MS);
        assert_eq!(due_at(&r, due, 92 * DAY_MS), Due::Remind(30));
        assert_eq!(due_at(&r, due, 93 * DAY_MS), Due::Remind(7));
        assert_eq!(due_at(&r, due, 99 * DAY_MS), Due::Remind(1));
        assert_eq!(next_change(&r, due, 99 * DAY_MS), due);
        assert_eq!(due_at(&r, due, due), Due::Overdue);
        // Learnt 3 days before: only the 7-day reminder is asked for, not 30 and 7.
        assert_eq!(due_at(&r, due, 97 * DAY_MS), Due::Remind(7));
    }

    #[test]
    fn completions_reset_the_right_dates() {
        let mut g = m(DeviceKind::GasDetector, date(2024, 3, 1), None);
        complete(&mut g, Task::Inspection, false, date(2026, 12, 2));
        assert_eq!(g.last_calibration, Some(date(2026, 12, 2)));
        complete(&mut g, Task::Inspection, true, date(2026, 12, 3));
        assert_eq!(g.replaced_on, Some(date(2026, 12, 3)));
        assert!(applies(DeviceKind::SirenMount, Task::SirenSeason));
        assert!(!applies(DeviceKind::SirenMount, Task::Cleaning));
        assert_eq!(days_between(date(2026, 12, 2), date(2026, 12, 20)), 18);
        assert_eq!(days_between(date(2026, 12, 2), date(2026, 11, 30)), -2);
    }
}
