//! Silences and maintenance windows: while one matches a signal, the incident it would open is
//! held back (not pushed, not shown as open); if the condition still holds when the window ends,
//! the incident opens then. One-off windows have a start and end; recurring ones repeat daily,
//! weekly or yearly (e.g. the annual siren test, third Saturday of September 11:35–11:58 in
//! Shanghai) in a named time zone.

use citywatch_edge::wire::DeviceKind;
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// `[[incidents.silence]]`, or the body of `POST /api/v1/silences`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceConfig {
    /// Assigned when created through the API; optional in config (then "config-{index}").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Matchers: every one given must match; none given matches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// One-off window, RFC 3339 ("2026-09-19T11:35:00+08:00"). Absent start: from now on;
    /// absent end: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// A window that repeats instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurring: Option<Recurring>,
    /// Why (shown in the API and the audit).
    #[serde(default)]
    pub reason: String,
    /// Who created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// A window repeating daily (only `from`/`to`), weekly (`weekday`), monthly on the nth weekday
/// (`weekday` + `nth`), or yearly (`month` + `weekday` + `nth`, or `month` + `day`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recurring {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<i8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<i8>,
    /// "monday" … "sunday".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekday: Option<String>,
    /// 1–5: the nth such weekday of the month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth: Option<i8>,
    /// Local times "HH:MM"; `to` after `from`.
    pub from: String,
    pub to: String,
    /// IANA zone name; default "Asia/Shanghai".
    #[serde(default = "default_tz")]
    pub tz: String,
}

fn default_tz() -> String {
    "Asia/Shanghai".into()
}

/// A validated silence, ready to match.
#[derive(Debug, Clone)]
pub struct Silence {
    pub config: SilenceConfig,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    recurring: Option<CompiledRecurring>,
}

#[derive(Debug, Clone)]
struct CompiledRecurring {
    month: Option<i8>,
    day: Option<i8>,
    weekday: Option<Weekday>,
    nth: Option<i8>,
    from: Time,
    to: Time,
    tz: TimeZone,
}

fn parse_weekday(s: &str) -> Option<Weekday> {
    Some(match s.to_ascii_lowercase().as_str() {
        "monday" | "mon" => Weekday::Monday,
        "tuesday" | "tue" => Weekday::Tuesday,
        "wednesday" | "wed" => Weekday::Wednesday,
        "thursday" | "thu" => Weekday::Thursday,
        "friday" | "fri" => Weekday::Friday,
        "saturday" | "sat" => Weekday::Saturday,
        "sunday" | "sun" => Weekday::Sunday,
        _ => return None,
    })
}

fn parse_instant(key: &str, text: &str) -> Result<i64, String> {
    text.parse::<Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| format!("{key}: {text:?} is not an RFC 3339 time like \"2026-09-19T11:35:00+08:00\": {e}"))
}

impl Silence {
    /// Validates a silence; the error names the key.
    pub fn new(config: SilenceConfig) -> Result<Silence, String> {
        let start_ms = config.start.as_deref().map(|t| parse_instant("start", t)).transpose()?;
        let end_ms = config.end.as_deref().map(|t| parse_instant("end", t)).transpose()?;
        if let (Some(s), Some(e)) = (start_ms, end_ms) {
            if e <= s {
                return Err("end: must be after start".into());
            }
        }
        let recurring = config.recurring.as_ref().map(compile_recurring).transpose()?;
        if recurring.is_some() && (start_ms.is_some() || end_ms.is_some()) {
            return Err("recurring: give either start/end or recurring, not both".into());
        }
        if let Some(rule) = &config.rule {
            if rule.is_empty() {
                return Err("rule: must not be empty".into());
            }
        }
        Ok(Silence { config, start_ms, end_ms, recurring })
    }

    /// Whether it covers a signal of `rule` for this device.
    pub fn matches(&self, site: &str, device: &str, kind: DeviceKind, rule: &str) -> bool {
        let c = &self.config;
        c.site.as_deref().is_none_or(|s| s == site)
            && c.device.as_deref().is_none_or(|d| d == device)
            && c.kind.is_none_or(|k| k == kind)
            && c.rule.as_deref().is_none_or(|r| r == rule)
    }

    /// Whether the window is open at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        if let Some(r) = &self.recurring {
            return r.active_at(now_ms);
        }
        self.start_ms.is_none_or(|s| now_ms >= s) && self.end_ms.is_none_or(|e| now_ms < e)
    }

    /// Whether it can never be active again (a one-off window that has ended).
    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.recurring.is_none() && self.end_ms.is_some_and(|e| now_ms >= e)
    }

    pub fn id(&self) -> &str {
        self.config.id.as_deref().unwrap_or("")
    }
}

fn compile_recurring(r: &Recurring) -> Result<CompiledRecurring, String> {
    let time = |key: &str, t: &str| t.parse::<Time>().map_err(|e| format!("recurring.{key}: {t:?} is not a time like \"11:35\": {e}"));
    let from = time("from", &r.from)?;
    let to = time("to", &r.to)?;
    if to <= from {
        return Err("recurring.to: must be after recurring.from (windows do not cross midnight)".into());
    }
    let tz = TimeZone::get(&r.tz).map_err(|e| format!("recurring.tz: {:?} is not a known time zone: {e}", r.tz))?;
    let weekday = r.weekday.as_deref().map(|w| parse_weekday(w).ok_or_else(|| format!("recurring.weekday: {w:?} is not a weekday"))).transpose()?;
    if let Some(m) = r.month {
        if !(1..=12).contains(&m) {
            return Err("recurring.month: must be 1–12".into());
        }
    }
    if let Some(d) = r.day {
        if !(1..=31).contains(&d) || r.month.is_none() || weekday.is_some() {
            return Err("recurring.day: 1–31, needs month, and not with weekday".into());
        }
    }
    if let Some(n) = r.nth {
        if !(1..=5).contains(&n) || weekday.is_none() {
            return Err("recurring.nth: 1–5, and needs weekday".into());
        }
    }
    Ok(CompiledRecurring { month: r.month, day: r.day, weekday, nth: r.nth, from, to, tz })
}

impl CompiledRecurring {
    fn active_at(&self, now_ms: i64) -> bool {
        let Ok(ts) = Timestamp::from_millisecond(now_ms) else { return false };
        let local = ts.to_zoned(self.tz.clone());
        let date: Date = local.date();
        let time = local.time();
        if time < self.from || time >= self.to {
            return false;
        }
        if self.month.is_some_and(|m| m != date.month()) {
            return false;
        }
        if self.day.is_some_and(|d| d != date.day()) {
            return false;
        }
        if let Some(w) = self.weekday {
            if date.weekday() != w {
                return false;
            }
            if let Some(n) = self.nth {
                // The nth such weekday: days 1–7 are the first, 8–14 the second, …
                if (date.day() - 1) / 7 + 1 != n {
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: &str) -> i64 {
        t.parse::<Timestamp>().expect("time").as_millisecond()
    }

    fn siren_test_day() -> Silence {
        Silence::new(SilenceConfig {
            id: None,
            site: None,
            device: None,
            kind: Some(DeviceKind::SirenMount),
            rule: Some("siren_activated".into()),
            start: None,
            end: None,
            recurring: Some(Recurring {
                month: Some(9),
                day: None,
                weekday: Some("saturday".into()),
                nth: Some(3),
                from: "11:35".into(),
                to: "11:58".into(),
                tz: "Asia/Shanghai".into(),
            }),
            reason: "annual air-raid siren test".into(),
            actor: None,
        })
        .expect("valid")
    }

    #[test]
    fn the_annual_siren_test_window_is_the_third_saturday_of_september_in_shanghai() {
        let s = siren_test_day();
        // 2026-09-19 is the third Saturday of September 2026.
        assert!(s.active_at(ms("2026-09-19T11:35:00+08:00")));
        assert!(s.active_at(ms("2026-09-19T03:50:00Z")));
        assert!(!s.active_at(ms("2026-09-19T11:58:00+08:00")));
        assert!(!s.active_at(ms("2026-09-19T11:34:59+08:00")));
        assert!(!s.active_at(ms("2026-09-12T11:40:00+08:00")), "second Saturday");
        assert!(!s.active_at(ms("2026-09-26T11:40:00+08:00")), "fourth Saturday");
        assert!(!s.active_at(ms("2026-10-17T11:40:00+08:00")), "October");
        assert!(s.active_at(ms("2027-09-18T11:40:00+08:00")), "next year's third Saturday");
        assert!(!s.expired_at(ms("2030-01-01T00:00:00Z")));
        assert!(s.matches("xuhui", "d1", DeviceKind::SirenMount, "siren_activated"));
        assert!(!s.matches("xuhui", "d1", DeviceKind::GasDetector, "siren_activated"));
        assert!(!s.matches("xuhui", "d1", DeviceKind::SirenMount, "mount_tilt"));
    }

    #[test]
    fn one_off_windows_and_bad_input() {
        let cfg = |start: Option<&str>, end: Option<&str>| SilenceConfig {
            id: None,
            site: Some("a".into()),
            device: None,
            kind: None,
            rule: None,
            start: start.map(str::to_owned),
            end: end.map(str::to_owned),
            recurring: None,
            reason: String::new(),
            actor: None,
        };
        let s = Silence::new(cfg(Some("2026-01-01T00:00:00Z"), Some("2026-01-02T00:00:00Z"))).expect("valid");
        assert!(s.active_at(ms("2026-01-01T12:00:00Z")));
        assert!(!s.active_at(ms("2026-01-02T00:00:00Z")));
        assert!(s.expired_at(ms("2026-01-03T00:00:00Z")));
        assert!(s.matches("a", "x", DeviceKind::GasDetector, "gas_high"));
        assert!(!s.matches("b", "x", DeviceKind::GasDetector, "gas_high"));
        let err = Silence::new(cfg(Some("2026-01-02T00:00:00Z"), Some("2026-01-01T00:00:00Z"))).expect_err("end before start");
        assert!(err.starts_with("end"), "{err}");
        let err = Silence::new(cfg(Some("yesterday"), None)).expect_err("bad time");
        assert!(err.starts_with("start"), "{err}");
        let mut bad_tz = siren_test_day().config;
        bad_tz.recurring.as_mut().expect("recurring").tz = "Mars/Olympus".into();
        assert!(Silence::new(bad_tz).expect_err("tz").starts_with("recurring.tz"));
    }
}
