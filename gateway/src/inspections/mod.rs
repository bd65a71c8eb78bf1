//! Maintenance beside the [`crate::registry`]: the crews' inventory (import, validation), the
//! inspection schedules per device kind, end of life, reminders before due dates, recorded
//! completions, work orders, and the annual siren test day.
//!
//! The domain is pure and clocked from outside ([`inventory::parse_inventory`],
//! [`schedule`], [`siren_test`]); [`service`] is the one task that owns the inventory store,
//! sends reminders and overdue/silent-siren signals to the incident manager (so they reach
//! every push channel through the durable outbox), and answers the maintenance endpoints ([`crate::api::inspections`]). Not here: incident
//! lifecycle (the manager's) and device health (the registry's).

pub mod client;
pub mod inventory;
pub mod schedule;
pub mod service;
pub mod siren_test;
pub mod store;

use serde::{Deserialize, Serialize};

pub use inventory::{parse_inventory, Premises, Row, RowError};
pub use schedule::{Task, TaskDue};
pub use service::{InspectionsHandle, Service};

use crate::units::Duration;

/// Errors of the maintenance side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("inventory store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("inventory store: {0}")]
    Io(#[from] std::io::Error),
    #[error("no device {0:?} in the inventory")]
    UnknownDevice(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the maintenance service has stopped")]
    Stopped,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The rule name of every maintenance incident and reminder (raised here, not by the rule pack).
pub const RULE_INSPECTION_DUE: &str = "inspection_due";
/// The rule name of the incident for an inventory device never heard after its grace period.
pub const RULE_COMMISSIONING_OVERDUE: &str = "commissioning_overdue";
/// The rule name of the incident for a siren mount silent through the siren test window.
pub const RULE_SIREN_TEST_SILENT: &str = "siren_test_silent";

/// Shows a phone number as `138****5678`: the first three and last four characters stay, the
/// rest is hidden (shorter numbers are hidden whole). Used for every phone the API shows or a
/// log line names.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().filter(|c| !c.is_whitespace()).collect();
    if chars.len() < 8 {
        return "****".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

/// `[inspections]`: schedules per kind, reminders, the siren test day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InspectionsConfig {
    /// Reminders to the owning crew this many days before a due date, each sent once.
    pub remind_days: Vec<u32>,
    /// Due dates fall at local midnight in this IANA time zone.
    pub tz: String,
    /// How often due dates are checked.
    pub check_every: Duration,
    /// An inventory device never heard this long after its import or its install date (the
    /// later) opens `commissioning_overdue`.
    pub commissioning_grace: Duration,
    pub gas_detector: GasSchedule,
    pub smoke_detector: SmokeSchedule,
    pub siren_mount: SirenSchedule,
    pub siren_test: siren_test::SirenTestConfig,
}

impl Default for InspectionsConfig {
    fn default() -> Self {
        InspectionsConfig {
            remind_days: vec![30, 7, 1],
            tz: "Asia/Shanghai".into(),
            check_every: Duration::secs(1),
            commissioning_grace: Duration::secs(24 * 3600),
            gas_detector: GasSchedule::default(),
            smoke_detector: SmokeSchedule::default(),
            siren_mount: SirenSchedule::default(),
            siren_test: siren_test::SirenTestConfig::default(),
        }
    }
}

/// `[inspections.gas_detector]`: inspected and calibrated every 12 months; end of life 3 years
/// in commercial premises, 5 in residential; the shut-off valve 10 years (CJJ/T 146-2011).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GasSchedule {
    pub calibrate_every_months: u32,
    pub end_of_life_commercial_years: u32,
    pub end_of_life_residential_years: u32,
    pub valve_end_of_life_years: u32,
}

impl Default for GasSchedule {
    fn default() -> Self {
        GasSchedule { calibrate_every_months: 12, end_of_life_commercial_years: 3, end_of_life_residential_years: 5, valve_end_of_life_years: 10 }
    }
}

/// `[inspections.smoke_detector]`: tested yearly; cleaned every 3 years once 2 in service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmokeSchedule {
    pub test_every_months: u32,
    pub clean_after_months: u32,
    pub clean_every_months: u32,
}

impl Default for SmokeSchedule {
    fn default() -> Self {
        SmokeSchedule { test_every_months: 12, clean_after_months: 24, clean_every_months: 36 }
    }
}

/// `[inspections.siren_mount]`: inspected every 6 months and before the flood and typhoon
/// season (an inspection within `season_window_months` before `season_start` counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SirenSchedule {
    pub inspect_every_months: u32,
    /// "MM-DD".
    pub season_start: String,
    pub season_window_months: u32,
}

impl Default for SirenSchedule {
    fn default() -> Self {
        SirenSchedule { inspect_every_months: 6, season_start: "06-01".into(), season_window_months: 3 }
    }
}

impl InspectionsConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, reason: &str| Err((format!("inspections.{key}"), reason.to_owned()));
        if self.remind_days.contains(&0) || self.remind_days.len() > 16 {
            return bad("remind_days", "days must be at least 1, at most 16 of them");
        }
        if jiff::tz::TimeZone::get(&self.tz).is_err() {
            return bad("tz", "not a known IANA time zone");
        }
        if self.check_every.0 < std::time::Duration::from_millis(100) {
            return bad("check_every", "must be at least 100ms");
        }
        if self.commissioning_grace.0 < std::time::Duration::from_secs(1) {
            return bad("commissioning_grace", "must be at least 1s");
        }
        let months = [
            ("gas_detector.calibrate_every_months", self.gas_detector.calibrate_every_months),
            ("smoke_detector.test_every_months", self.smoke_detector.test_every_months),
            ("smoke_detector.clean_every_months", self.smoke_detector.clean_every_months),
            ("siren_mount.inspect_every_months", self.siren_mount.inspect_every_months),
            ("gas_detector.end_of_life_commercial_years", self.gas_detector.end_of_life_commercial_years),
            ("gas_detector.end_of_life_residential_years", self.gas_detector.end_of_life_residential_years),
            ("gas_detector.valve_end_of_life_years", self.gas_detector.valve_end_of_life_years),
        ];
        for (key, v) in months {
            if !(1..=240).contains(&v) {
                return bad(key, "must be 1–240");
            }
        }
        if schedule::parse_month_day(&self.siren_mount.season_start).is_none() {
            return bad("siren_mount.season_start", "must be a date of the year like \"06-01\"");
        }
        if self.siren_mount.season_window_months > 11 {
            return bad("siren_mount.season_window_months", "must be 0–11");
        }
        self.siren_test.validate().map_err(|(k, r)| (format!("inspections.siren_test.{k}"), r))
    }

    /// The local time zone of due dates (validated: falls back to UTC only if unvalidated).
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(&self.tz).unwrap_or(jiff::tz::TimeZone::UTC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked() {
        assert_eq!(mask_phone("13812345678"), "138****5678");
        assert_eq!(mask_phone("+86 138 1234 5678"), "+86****5678");
        assert_eq!(mask_phone("12345"), "****");
    }

    #[test]
    fn defaults_validate_and_bad_keys_are_named() {
        InspectionsConfig::default().validate().expect("defaults are valid");
        let c = InspectionsConfig { tz: "Mars/Olympus".into(), ..InspectionsConfig::default() };
        assert_eq!(c.validate().expect_err("tz").0, "inspections.tz");
        let mut c = InspectionsConfig::default();
        c.siren_mount.season_start = "13-40".into();
        assert_eq!(c.validate().expect_err("season").0, "inspections.siren_mount.season_start");
    }
}
