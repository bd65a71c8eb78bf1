//! The annual siren test day (沪府办〔2022〕29号): a window (default the third Saturday of
//! September, 11:35–11:58 Asia/Shanghai) during which `siren_activated` is expected and held
//! back (an incidents silence), and after which every siren mount that did not report
//! `siren_activated` within it gets an incident. Pure: [`WindowTracker`] is stepped with the
//! clock and says when a window has closed and may be checked.

use citywatch_edge::wire::DeviceKind;
use jiff::civil::Time;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::units::Duration;
use crate::incidents::silence::{Recurring, Silence, SilenceConfig};

/// `[inspections.siren_test]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SirenTestConfig {
    pub enabled: bool,
    /// The yearly window.
    pub recurring: Recurring,
    /// A one-off window instead (RFC 3339, both given): a rehearsal, or a moved test day.
    pub start: Option<String>,
    pub end: Option<String>,
    /// How long after the window sirens' last reports may still arrive before the check.
    pub grace: Duration,
}

impl Default for SirenTestConfig {
    fn default() -> Self {
        SirenTestConfig {
            enabled: true,
            recurring: Recurring {
                month: Some(9),
                day: None,
                weekday: Some("saturday".into()),
                nth: Some(3),
                from: "11:35".into(),
                to: "11:58".into(),
                tz: "Asia/Shanghai".into(),
            },
            start: None,
            end: None,
            grace: Duration::secs(10),
        }
    }
}

/// The silence id of the siren test window.
pub const SILENCE_ID: &str = "siren-test-day";
/// The device event the sirens report when they sound.
pub const EVENT_RULE: &str = "siren_activated";

impl SirenTestConfig {
    /// The incidents silence holding `siren_activated` back during the window.
    pub fn silence(&self) -> Result<Silence, String> {
        let one_off = self.start.is_some() || self.end.is_some();
        Silence::new(SilenceConfig {
            id: Some(SILENCE_ID.into()),
            site: None,
            device: None,
            kind: Some(DeviceKind::SirenMount),
            rule: Some(EVENT_RULE.into()),
            start: self.start.clone(),
            end: self.end.clone(),
            recurring: (!one_off).then(|| self.recurring.clone()),
            reason: "annual air-raid siren test".into(),
            actor: None,
        })
    }

    /// Checks the window; the error names the key (relative to `[inspections.siren_test]`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.start.is_some() != self.end.is_some() {
            return Err(("start".into(), "start and end go together".into()));
        }
        self.silence().map(|_| ()).map_err(|e| {
            let key = e.split(':').next().unwrap_or("recurring").to_owned();
            (key, e)
        })
    }
}

/// Follows the window and reports each one that has closed.
#[derive(Debug)]
pub struct WindowTracker {
    silence: Silence,
    from: Option<Time>,
    tz: TimeZone,
    grace_ms: i64,
    /// Start of the window now open.
    open_since: Option<i64>,
    /// A closed window (start, end) waiting for its grace period.
    closed: Option<(i64, i64)>,
}

impl WindowTracker {
    pub fn new(cfg: &SirenTestConfig) -> Result<WindowTracker, String> {
        let silence = cfg.silence()?;
        let one_off = cfg.start.is_some();
        let from = if one_off { None } else { cfg.recurring.from.parse::<Time>().ok() };
        let tz = TimeZone::get(&cfg.recurring.tz).unwrap_or(TimeZone::UTC);
        Ok(WindowTracker { silence, from, tz, grace_ms: cfg.grace.as_ms(), open_since: None, closed: None })
    }

    /// Where the window that is open at `now_ms` began: today's `from` for the yearly window,
    /// `start` for a one-off one (so a gateway restarted mid-window still counts early reports).
    fn window_start(&self, now_ms: i64) -> i64 {
        if let Some(from) = self.from {
            let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms) else { return now_ms };
            let date = ts.to_zoned(self.tz.clone()).date();
            return date.to_datetime(from).to_zoned(self.tz.clone()).map(|z| z.timestamp().as_millisecond()).unwrap_or(now_ms);
        }
        self.silence.config.start.as_deref().and_then(|s| s.parse::<jiff::Timestamp>().ok()).map_or(now_ms, |t| t.as_millisecond())
    }

    /// Advances to `now_ms`; returns `(start, end)` of a window whose check is due now (its
    /// end plus the grace period has passed). Reports each window once.
    pub fn step(&mut self, now_ms: i64) -> Option<(i64, i64)> {
        let active = self.silence.active_at(now_ms);
        match (active, self.open_since) {
            (true, None) => self.open_since = Some(self.window_start(now_ms)),
            (false, Some(start)) => {
                self.open_since = None;
                self.closed = Some((start, now_ms));
            }
            _ => {}
        }
        match self.closed {
            Some((start, end)) if now_ms >= end.saturating_add(self.grace_ms) => {
                self.closed = None;
                Some((start, end))
            }
            _ => None,
        }
    }

    /// Whether a window is open now (as of the last step).
    pub fn is_open(&self) -> bool {
        self.open_since.is_some()
    }

    /// How long after a window its reports are still accepted.
    pub fn grace_ms(&self) -> i64 {
        self.grace_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t: &str) -> i64 {
        t.parse::<jiff::Timestamp>().expect("time").as_millisecond()
    }

    #[test]
    fn the_yearly_window_closes_once_and_is_checked_after_the_grace() {
        let mut t = WindowTracker::new(&SirenTestConfig::default()).expect("valid");
        assert_eq!(t.step(ms("2026-09-19T11:30:00+08:00")), None);
        // Started mid-window: the window still began at 11:35.
        assert_eq!(t.step(ms("2026-09-19T11:40:00+08:00")), None);
        assert!(t.is_open());
        assert_eq!(t.step(ms("2026-09-19T11:58:00+08:00")), None, "closed, grace running");
        assert_eq!(
            t.step(ms("2026-09-19T11:58:10+08:00")),
            Some((ms("2026-09-19T11:35:00+08:00"), ms("2026-09-19T11:58:00+08:00")))
        );
        assert_eq!(t.step(ms("2026-09-19T12:30:00+08:00")), None, "reported once");
    }

    #[test]
    fn a_one_off_window_replaces_the_yearly_one() {
        let cfg = SirenTestConfig {
            start: Some("2026-12-02T04:00:00Z".into()),
            end: Some("2026-12-02T04:00:10Z".into()),
            grace: Duration::secs(2),
            ..SirenTestConfig::default()
        };
        cfg.validate().expect("valid");
        let mut t = WindowTracker::new(&cfg).expect("valid");
        assert_eq!(t.step(ms("2026-12-02T04:00:05Z")), None);
        assert_eq!(t.step(ms("2026-12-02T04:00:11Z")), None);
        assert_eq!(t.step(ms("2026-12-02T04:00:13Z")), Some((ms("2026-12-02T04:00:00Z"), ms("2026-12-02T04:00:11Z"))));
        let bad = SirenTestConfig { start: Some("soon".into()), end: Some("later".into()), ..SirenTestConfig::default() };
        assert_eq!(bad.validate().expect_err("bad").0, "start");
        let half = SirenTestConfig { start: Some("2026-12-02T04:00:00Z".into()), ..SirenTestConfig::default() };
        assert_eq!(half.validate().expect_err("half").0, "start");
    }
}
