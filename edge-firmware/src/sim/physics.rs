//! Simulated physics: what each sensor of a simulated device would read, second by second.
//!
//! One [`Physics`] per device, driven by its scenario [`Role`]. It produces the same
//! [`Sample`] a board's drivers would, and reacts to the outputs the firmware core drives
//! (a closed valve stops a leak). Time-compressed where the real process takes months
//! (corrosion). Not a model of anything beyond what the scenarios need.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::alarm::{Outputs, Sample};
use crate::wire::{DeviceKind, Metric};

/// What a device does in its scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// Quiet readings with sensor noise.
    Normal,
    /// A gas leak from `start_s`: ramps through 20 and 50 %LEL until the valve closes, then
    /// ventilates away; a crew resets the alarm and reopens the valve once gas is gone.
    GasLeak { start_s: f64 },
    /// A fire near the detector from `start_s`: smoke and heat rise, then die down.
    Fire { start_s: f64 },
    /// The bracket tilts and corrodes, one simulated day per real second.
    Corroding,
    /// Readings that cross the alarm set point back and forth every `half_period_s`.
    Flapping { half_period_s: f64 },
}

/// Gas ramp while the valve is open, %LEL per second. Slow enough that 20 → 50 %LEL takes
/// longer than `gas_low`'s 10 s hold, so a leak shows both levels in order.
pub const LEAK_RAMP_LEL_PER_S: f64 = 2.5;
/// Highest concentration a leak reaches.
pub const LEAK_PEAK_LEL: f64 = 75.0;
/// Time constant of ventilation once the valve is shut, seconds.
pub const VENTILATION_TAU_S: f64 = 15.0;
/// How long gas must stay under 5 %LEL before the crew resets and reopens, seconds.
pub const CREW_RESET_AFTER_S: f64 = 20.0;
/// How long a fire lasts before it is out, seconds.
pub const FIRE_DURATION_S: f64 = 90.0;
/// Nominal bracket section thickness for the ER probe conversion, µm.
pub const BRACKET_THICKNESS_UM: f64 = 6_000.0;

/// What the crew does when the sim says it is time (handled by the device task).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrewAction {
    ResetAndReopen,
}

/// The simulated surroundings of one device.
#[derive(Debug)]
pub struct Physics {
    kind: DeviceKind,
    role: Role,
    rng: SmallRng,
    battery_v: f64,
    gas_lel: f64,
    valve_closed_at_s: Option<f64>,
    gas_clear_since_s: Option<f64>,
    leak_over: bool,
    last_s: f64,
}

impl Physics {
    pub fn new(kind: DeviceKind, role: Role, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let battery_v = rng.random_range(2.95..3.15);
        Physics {
            kind,
            role,
            rng,
            battery_v,
            gas_lel: 0.5,
            valve_closed_at_s: None,
            gas_clear_since_s: None,
            leak_over: false,
            last_s: 0.0,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    fn noise(&mut self, spread: f64) -> f64 {
        self.rng.random_range(-spread..=spread)
    }

    /// The readings at `t_s` seconds into the run.
    pub fn sample(&mut self, t_s: f64) -> Sample {
        let dt = (t_s - self.last_s).max(0.0);
        self.last_s = t_s;
        let mut sample = Sample {
            battery_v: Some(round(self.battery_v + self.noise(0.01), 3)),
            rssi_dbm: Some((-70.0 + self.noise(6.0)).round()),
            ..Sample::default()
        };
        let mut set = |m: Metric, v: f64, digits: i32| {
            // Values computed here are finite by construction.
            let _ = sample.values.set(m, round(v, digits));
        };
        match self.kind {
            DeviceKind::GasDetector => {
                let lel = self.gas(t_s, dt);
                set(Metric::GasLel, lel, 2);
                set(Metric::TempC, 22.0 + self.noise(0.3), 2);
            }
            DeviceKind::SmokeDetector => {
                let (smoke, temp) = self.smoke(t_s);
                set(Metric::SmokeDbM, smoke, 4);
                set(Metric::TempC, temp, 2);
                set(Metric::CoPpm, (2.0 + self.noise(1.0) + (temp - 22.0).max(0.0)).max(0.0), 1);
            }
            DeviceKind::SirenMount => {
                let (tilt, loss_pct) = match self.role {
                    // One simulated day per real second: 0.004°/day, 0.1 %/day.
                    Role::Corroding => (0.02 + 0.004 * t_s, 0.5 + 0.1 * t_s),
                    Role::Flapping { half_period_s } if phase_high(t_s, half_period_s) => (0.45, 0.5),
                    _ => (0.02, 0.5),
                };
                let loss_pct = loss_pct.min(60.0);
                set(Metric::TiltDeg, (tilt + self.noise(0.002)).max(0.0), 4);
                set(Metric::VibrationMg, 20.0 + self.noise(5.0), 1);
                // Uniform loss on both faces: loss % = 2 × metal loss / thickness × 100.
                set(Metric::CorrosionUm, loss_pct / 100.0 * BRACKET_THICKNESS_UM / 2.0, 1);
                set(Metric::SectionLossPct, loss_pct, 3);
            }
        }
        sample
    }

    fn gas(&mut self, t_s: f64, dt: f64) -> f64 {
        match self.role {
            Role::GasLeak { start_s } if !self.leak_over && t_s >= start_s => {
                if self.valve_closed_at_s.is_some() {
                    self.gas_lel *= (-dt / VENTILATION_TAU_S).exp();
                } else {
                    self.gas_lel = (self.gas_lel + LEAK_RAMP_LEL_PER_S * dt).min(LEAK_PEAK_LEL);
                }
                self.gas_lel
            }
            Role::Flapping { half_period_s } => {
                if phase_high(t_s, half_period_s) {
                    25.0
                } else {
                    5.0
                }
            }
            _ => {
                self.gas_lel = 0.5;
                (0.5 + self.noise(0.3)).max(0.0)
            }
        }
    }

    fn smoke(&mut self, t_s: f64) -> (f64, f64) {
        let quiet = (0.01 + self.noise(0.004), 22.0 + self.noise(0.3));
        match self.role {
            Role::Fire { start_s } if t_s >= start_s && t_s < start_s + FIRE_DURATION_S => {
                let burn = t_s - start_s;
                let smoke = (0.02 + 0.03 * burn).min(0.6);
                let temp = (22.0 + 1.2 * burn).min(70.0);
                (smoke + self.noise(0.005), temp + self.noise(0.3))
            }
            Role::Flapping { half_period_s } if phase_high(t_s, half_period_s / 2.0) => (0.2, quiet.1),
            _ => quiet,
        }
    }

    /// Feeds back what the firmware drove; returns a crew action when one is due.
    pub fn apply(&mut self, t_s: f64, outputs: Outputs) -> Option<CrewAction> {
        if !matches!(self.role, Role::GasLeak { .. }) || self.leak_over {
            return None;
        }
        match (outputs.valve_closed, self.valve_closed_at_s) {
            (true, None) => self.valve_closed_at_s = Some(t_s),
            (false, Some(_)) => {
                // Reopened: the leak was repaired.
                self.valve_closed_at_s = None;
                self.leak_over = true;
            }
            _ => {}
        }
        if self.valve_closed_at_s.is_some() && self.gas_lel < 5.0 {
            let since = *self.gas_clear_since_s.get_or_insert(t_s);
            if t_s - since >= CREW_RESET_AFTER_S {
                return Some(CrewAction::ResetAndReopen);
            }
        } else {
            self.gas_clear_since_s = None;
        }
        None
    }
}

fn phase_high(t_s: f64, half_period_s: f64) -> bool {
    ((t_s / half_period_s).floor() as u64).is_multiple_of(2)
}

fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_passes_both_set_points_and_ventilates_after_the_valve_closes() {
        let mut p = Physics::new(DeviceKind::GasDetector, Role::GasLeak { start_s: 1.0 }, 7);
        let mut peak = 0.0f64;
        let mut t = 0.0;
        while t < 25.0 {
            let lel = p.sample(t).values.get(Metric::GasLel).expect("gas");
            peak = peak.max(lel);
            t += 0.25;
        }
        assert!(peak >= 50.0, "peak {peak}");
        p.apply(t, Outputs { valve_closed: true, buzzer: true });
        let mut action = None;
        while t < 200.0 && action.is_none() {
            t += 0.25;
            p.sample(t);
            action = p.apply(t, Outputs { valve_closed: true, buzzer: true });
        }
        assert_eq!(action, Some(CrewAction::ResetAndReopen));
        p.apply(t, Outputs::default());
        let lel = p.sample(t + 1.0).values.get(Metric::GasLel).expect("gas");
        assert!(lel < 2.0, "leak over: {lel}");
    }

    #[test]
    fn corrosion_is_time_compressed_and_consistent() {
        let mut p = Physics::new(DeviceKind::SirenMount, Role::Corroding, 1);
        let s = p.sample(100.0);
        let loss = s.values.get(Metric::SectionLossPct).expect("loss");
        let um = s.values.get(Metric::CorrosionUm).expect("um");
        assert!((loss - 10.5).abs() < 1e-6);
        assert!((um - 315.0).abs() < 1e-6);
        assert!(s.values.get(Metric::TiltDeg).expect("tilt") > 0.38);
    }

    #[test]
    fn fire_raises_smoke_past_the_set_point() {
        let mut p = Physics::new(DeviceKind::SmokeDetector, Role::Fire { start_s: 0.0 }, 3);
        assert!(p.sample(10.0).values.get(Metric::SmokeDbM).expect("smoke") > 0.15);
        assert!(p.sample(200.0).values.get(Metric::SmokeDbM).expect("smoke") < 0.05);
    }
}
