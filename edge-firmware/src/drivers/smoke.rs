//! Fire inputs read through `AnalogInput`: an optical smoke chamber (mV → obscuration dB/m with
//! slow clean-air drift compensation) and an NTC `Thermistor` heat input (°C, open/short faults).
//! Not covered: alarm thresholds, verification delays or latching (that is the detection logic's job).

use super::analog::AnalogInput;

/// Errors of [`SmokeChamber`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmokeError<E> {
    /// The analog input failed.
    Adc(E),
    /// Drift compensation has reached `drift_limit_mv`: the chamber is dirty (or
    /// the emitter ageing) and needs maintenance. Compensation stops at the limit.
    DriftLimitExceeded,
    /// The configuration is unusable (non-positive sensitivity or alarm level,
    /// `alpha` or `track_fraction` outside [0, 1), drift limit not > 0).
    InvalidConfig,
}

/// Configuration of a [`SmokeChamber`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmokeConfig {
    /// Clean-air chamber signal measured at commissioning, mV.
    pub baseline_mv: i32,
    /// Chamber signal increase per dB/m of obscuration, mV/(dB/m); > 0.
    pub sensitivity_mv_per_db_m: f32,
    /// The alarm level, dB/m; > 0. Used to decide what counts as "clean air".
    pub alarm_db_m: f32,
    /// The baseline tracks only while |obscuration| < `track_fraction × alarm_db_m`
    /// (e.g. 0.1), so real smoke is never compensated away.
    pub track_fraction: f32,
    /// Exponential filter coefficient per reading, in [0, 1): baseline +=
    /// alpha × (reading − baseline). Time constant ≈ sample interval / alpha,
    /// e.g. 10 s readings with alpha = 1/8640 track with τ ≈ 1 day. 0 disables.
    pub alpha: f32,
    /// Drift limit, mV; > 0. When |tracked baseline − commissioning baseline|
    /// reaches it, compensation stops and the chamber reports a fault.
    pub drift_limit_mv: f32,
}

impl SmokeConfig {
    /// Whether every field is in its documented range.
    pub fn is_valid(&self) -> bool {
        self.sensitivity_mv_per_db_m.is_finite()
            && self.sensitivity_mv_per_db_m > 0.0
            && self.alarm_db_m.is_finite()
            && self.alarm_db_m > 0.0
            && (0.0..1.0).contains(&self.track_fraction)
            && (0.0..1.0).contains(&self.alpha)
            && self.drift_limit_mv.is_finite()
            && self.drift_limit_mv > 0.0
    }
}

/// Optical (scatter) smoke chamber on one analog input.
#[derive(Debug)]
pub struct SmokeChamber<A> {
    input: A,
    config: SmokeConfig,
    /// Tracked clean-air baseline, mV. f64 so that tiny `alpha` steps still
    /// accumulate (an f32 near 1000 mV cannot add steps below ~6e-5 mV).
    baseline_mv: f64,
}

impl<A> SmokeChamber<A> {
    /// Wrap an input. An invalid config makes every read fail with
    /// [`SmokeError::InvalidConfig`].
    pub fn new(input: A, config: SmokeConfig) -> Self {
        Self {
            input,
            config,
            baseline_mv: f64::from(config.baseline_mv),
        }
    }

    /// The configuration (with the commissioning baseline).
    pub fn config(&self) -> SmokeConfig {
        self.config
    }

    /// The tracked clean-air baseline, mV.
    pub fn baseline_mv(&self) -> f32 {
        self.baseline_mv as f32
    }

    /// How far compensation has moved the baseline from commissioning, mV
    /// (positive: chamber signal has risen, typically dust).
    pub fn drift_mv(&self) -> f32 {
        (self.baseline_mv - f64::from(self.config.baseline_mv)) as f32
    }

    /// Give back the input.
    pub fn release(self) -> A {
        self.input
    }
}

impl<A: AnalogInput> SmokeChamber<A> {
    /// Read the obscuration in dB/m (≥ 0) against the tracked baseline, then let
    /// the baseline follow the reading if it is near clean air.
    ///
    /// Once compensation reaches the drift limit the baseline stops moving and
    /// this returns [`SmokeError::DriftLimitExceeded`] — except when the reading is
    /// at or above the alarm level, which is returned as a value: an alarm takes
    /// precedence over a maintenance fault.
    pub fn read_db_m(&mut self) -> Result<f32, SmokeError<A::Error>> {
        let cfg = self.config;
        if !cfg.is_valid() {
            return Err(SmokeError::InvalidConfig);
        }
        let mv = f64::from(self.input.read_mv().map_err(SmokeError::Adc)?);
        let db_m = (mv - self.baseline_mv) / f64::from(cfg.sensitivity_mv_per_db_m);

        if db_m.abs() < f64::from(cfg.track_fraction) * f64::from(cfg.alarm_db_m) {
            self.baseline_mv += f64::from(cfg.alpha) * (mv - self.baseline_mv);
        }

        let origin = f64::from(cfg.baseline_mv);
        let limit = f64::from(cfg.drift_limit_mv);
        let over_limit = (self.baseline_mv - origin).abs() >= limit;
        self.baseline_mv = self.baseline_mv.clamp(origin - limit, origin + limit);

        let db_m = db_m.max(0.0) as f32;
        if over_limit && db_m < cfg.alarm_db_m {
            return Err(SmokeError::DriftLimitExceeded);
        }
        Ok(db_m)
    }

    /// After cleaning or replacing the chamber: take the current reading as the
    /// new commissioning baseline (drift back to 0). Returns it.
    pub fn recommission(&mut self) -> Result<i32, SmokeError<A::Error>> {
        let mv = self.input.read_mv().map_err(SmokeError::Adc)?;
        self.config.baseline_mv = mv;
        self.baseline_mv = f64::from(mv);
        Ok(mv)
    }
}

/// Errors of [`Thermistor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThermistorError<E> {
    /// The analog input failed.
    Adc(E),
    /// Resistance above the range (colder than `min_c`, or divider at the
    /// reference voltage): NTC disconnected.
    OpenCircuit,
    /// Resistance below the range (hotter than `max_c`, or divider at 0 V):
    /// NTC or wiring shorted.
    ShortCircuit,
}

/// NTC thermistor in a divider: `Vref — series resistor — (ADC node) — NTC — GND`,
/// so `V = Vref·R/(Rs+R)` and `R = Rs·V/(Vref−V)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThermistorConfig {
    /// Divider supply, mV (ratiometric: the ADC reference should be the same rail).
    pub vref_mv: i32,
    /// Series (top) resistor, Ω.
    pub series_ohm: f32,
    /// NTC resistance at `t0_c`, Ω.
    pub r0_ohm: f32,
    /// Reference temperature of `r0_ohm`, °C (usually 25).
    pub t0_c: f32,
    /// Beta constant, K.
    pub beta: f32,
    /// Colder than this reads as [`ThermistorError::OpenCircuit`].
    pub min_c: f32,
    /// Hotter than this reads as [`ThermistorError::ShortCircuit`].
    pub max_c: f32,
}

impl ThermistorConfig {
    /// 10 kΩ / B = 3950 K NTC with a 10 kΩ series resistor on 3.3 V, −40..125 °C.
    pub const NTC_10K_B3950: Self = Self {
        vref_mv: 3300,
        series_ohm: 10_000.0,
        r0_ohm: 10_000.0,
        t0_c: 25.0,
        beta: 3950.0,
        min_c: -40.0,
        max_c: 125.0,
    };
}

/// Heat input: an NTC thermistor read through an analog input.
#[derive(Debug)]
pub struct Thermistor<A> {
    input: A,
    config: ThermistorConfig,
}

impl<A> Thermistor<A> {
    const KELVIN: f32 = 273.15;

    /// Wrap an input.
    pub fn new(input: A, config: ThermistorConfig) -> Self {
        Self { input, config }
    }

    /// Give back the input.
    pub fn release(self) -> A {
        self.input
    }

    /// Divider voltage → °C with the Beta equation
    /// `1/T = 1/T0 + ln(R/R0)/B` (T in kelvin), with open/short detection.
    pub fn mv_to_celsius<E>(&self, mv: i32) -> Result<f32, ThermistorError<E>> {
        let c = &self.config;
        if mv >= c.vref_mv {
            return Err(ThermistorError::OpenCircuit);
        }
        if mv <= 0 {
            return Err(ThermistorError::ShortCircuit);
        }
        let r = c.series_ohm * mv as f32 / (c.vref_mv - mv) as f32;
        let inv_t = 1.0 / (c.t0_c + Self::KELVIN) + libm::logf(r / c.r0_ohm) / c.beta;
        let t = 1.0 / inv_t - Self::KELVIN;
        // NaN (bad config) fails both comparisons: report it as open circuit.
        if t.is_nan() || t < c.min_c {
            return Err(ThermistorError::OpenCircuit);
        }
        if t > c.max_c {
            return Err(ThermistorError::ShortCircuit);
        }
        Ok(t)
    }
}

impl<A: AnalogInput> Thermistor<A> {
    /// Read the temperature, °C.
    pub fn read_temp_c(&mut self) -> Result<f32, ThermistorError<A::Error>> {
        let mv = self.input.read_mv().map_err(ThermistorError::Adc)?;
        self.mv_to_celsius(mv)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drivers::analog::fake::{FakeAdcError, FakeInput};

    /// Baseline 500 mV, 100 mV per dB/m, alarm 0.5 dB/m, track below 0.05 dB/m.
    const CFG: SmokeConfig = SmokeConfig {
        baseline_mv: 500,
        sensitivity_mv_per_db_m: 100.0,
        alarm_db_m: 0.5,
        track_fraction: 0.1,
        alpha: 0.01,
        drift_limit_mv: 20.0,
    };

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn converts_against_baseline_and_clamps_negative() {
        // 540 mV is 0.4 dB/m: outside the tracking band, so no drift either.
        let mut s = SmokeChamber::new(FakeInput::new(&[540, 500, 450]), CFG);
        assert!(close(s.read_db_m().unwrap(), 0.4, 1e-6));
        assert_eq!(s.drift_mv(), 0.0);
        assert_eq!(s.read_db_m(), Ok(0.0));
        assert_eq!(s.read_db_m(), Ok(0.0)); // -0.5 dB/m reads 0, is not tracked
        assert_eq!(s.drift_mv(), 0.0);
        s.release().done();
    }

    #[test]
    fn baseline_tracks_slow_drift_near_clean_air() {
        // Clean air has crept to 504 mV (0.04 dB/m, inside the band).
        let n = 200;
        let mut s = SmokeChamber::new(FakeInput::new(&vec![504; n]), CFG);
        for _ in 0..n {
            s.read_db_m().unwrap();
        }
        // After n steps: drift = 4 × (1 − 0.99^n)
        let expected = 4.0 * (1.0 - 0.99f32.powi(n as i32));
        assert!(close(s.drift_mv(), expected, 1e-3), "{}", s.drift_mv());
        assert!(s.drift_mv() > 3.4);
        s.release().done();
    }

    #[test]
    fn real_smoke_is_never_compensated_away() {
        // A long smoulder just above the tracking band (0.06 dB/m) plus full smoke.
        let mut readings = vec![506; 1000];
        readings.push(560);
        let mut s = SmokeChamber::new(FakeInput::new(&readings), CFG);
        for _ in 0..1000 {
            assert!(close(s.read_db_m().unwrap(), 0.06, 1e-6));
        }
        assert_eq!(s.drift_mv(), 0.0);
        assert!(close(s.read_db_m().unwrap(), 0.6, 1e-6));
        s.release().done();
    }

    #[test]
    fn drift_limit_is_a_fault_but_alarm_wins() {
        let cfg = SmokeConfig {
            alpha: 0.5,
            drift_limit_mv: 3.0,
            ..CFG
        };
        // 504 mV tracked at alpha 0.5: 502, 503, 503.5 → limit 3 mV reached on the 2nd.
        let mut s = SmokeChamber::new(FakeInput::new(&[504, 504, 504, 560]), cfg);
        assert!(close(s.read_db_m().unwrap(), 0.04, 1e-6));
        assert!(close(s.drift_mv(), 2.0, 1e-6));
        assert_eq!(s.read_db_m(), Err(SmokeError::DriftLimitExceeded));
        assert!(close(s.drift_mv(), 3.0, 1e-6));
        assert_eq!(s.read_db_m(), Err(SmokeError::DriftLimitExceeded));
        assert!(close(s.drift_mv(), 3.0, 1e-6)); // clamped, not 3.5
                                                 // 560 mV against the 503 mV baseline: 0.57 dB/m ≥ alarm → a value.
        assert!(close(s.read_db_m().unwrap(), 0.57, 1e-5));
        s.release().done();
    }

    #[test]
    fn recommission_resets_drift() {
        let cfg = SmokeConfig { alpha: 0.5, ..CFG };
        let mut s = SmokeChamber::new(FakeInput::new(&[504, 530, 530]), cfg);
        s.read_db_m().unwrap();
        assert!(s.drift_mv() > 1.0);
        assert_eq!(s.recommission(), Ok(530));
        assert_eq!(s.drift_mv(), 0.0);
        assert_eq!(s.baseline_mv(), 530.0);
        assert_eq!(s.read_db_m(), Ok(0.0));
        s.release().done();
    }

    #[test]
    fn smoke_errors_are_mapped_and_config_checked() {
        let mut input = FakeInput::new(&[]);
        input.push_error();
        let mut s = SmokeChamber::new(input, CFG);
        assert_eq!(s.read_db_m(), Err(SmokeError::Adc(FakeAdcError)));
        s.release().done();

        let bad = SmokeConfig {
            sensitivity_mv_per_db_m: 0.0,
            ..CFG
        };
        let mut s = SmokeChamber::new(FakeInput::new(&[]), bad);
        assert_eq!(s.read_db_m(), Err(SmokeError::InvalidConfig));
        s.release().done();
    }

    fn ntc(readings: &[i32]) -> Thermistor<FakeInput> {
        Thermistor::new(FakeInput::new(readings), ThermistorConfig::NTC_10K_B3950)
    }

    #[test]
    fn thermistor_beta_equation() {
        // Reference values from the Beta equation evaluated in f64 off-line.
        let mut t = ntc(&[1650, 600, 200, 3200]);
        assert!(close(t.read_temp_c().unwrap(), 25.0, 0.01));
        assert!(close(t.read_temp_c().unwrap(), 63.184, 0.01));
        assert!(close(t.read_temp_c().unwrap(), 102.771, 0.01));
        assert!(close(t.read_temp_c().unwrap(), -36.823, 0.01));
        t.release().done();
    }

    #[test]
    fn thermistor_open_and_short_circuit() {
        // 3221 mV = −40.2 °C (open side), 114 mV = 125.11 °C (short side);
        // 115 mV = 124.75 °C and 3219 mV = −39.85 °C are just inside.
        let mut t = ntc(&[3300, 3221, 0, 114, 115, 3219]);
        assert_eq!(t.read_temp_c(), Err(ThermistorError::OpenCircuit));
        assert_eq!(t.read_temp_c(), Err(ThermistorError::OpenCircuit));
        assert_eq!(t.read_temp_c(), Err(ThermistorError::ShortCircuit));
        assert_eq!(t.read_temp_c(), Err(ThermistorError::ShortCircuit));
        assert!(close(t.read_temp_c().unwrap(), 124.751, 0.01));
        assert!(close(t.read_temp_c().unwrap(), -39.847, 0.01));
        t.release().done();
    }

    #[test]
    fn thermistor_adc_error_is_mapped() {
        let mut input = FakeInput::new(&[]);
        input.push_error();
        let mut t = Thermistor::new(input, ThermistorConfig::NTC_10K_B3950);
        assert_eq!(t.read_temp_c(), Err(ThermistorError::Adc(FakeAdcError)));
        t.release().done();
    }
}
