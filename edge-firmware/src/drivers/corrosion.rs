//! Electrical-resistance (ER) corrosion probe read through two `AnalogInput`s: metal loss of the
//! exposed element (temperature-compensated by a protected reference element) and bracket section loss.
//! Not covered: the excitation current source and its switching, corrosion rate over time, pitting.

use super::analog::AnalogInput;

/// Errors of [`CorrosionProbe`]; `EA`/`EB` are the errors of the exposed and
/// reference inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrosionError<EA, EB> {
    /// The exposed-element input failed.
    Exposed(EA),
    /// The reference-element input failed.
    Reference(EB),
    /// Reference voltage below `min_reference_mv` (no excitation, open circuit)
    /// or exposed voltage ≤ 0 (shorted element): no ratio can be formed.
    SignalFault,
    /// Metal loss has reached `life_fraction × initial_thickness_um`: the element
    /// is consumed and the probe must be replaced.
    ProbeConsumed,
    /// A configuration value is out of range (see [`CorrosionConfig`]).
    InvalidConfig,
}

/// Probe and structure parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorrosionConfig {
    /// Initial thickness of the exposed element, µm; > 0.
    pub initial_thickness_um: f32,
    /// Exposed/reference resistance ratio of the new probe (see
    /// [`CorrosionProbe::commission`]); > 0.
    pub r0_ratio: f32,
    /// Nominal section thickness of the monitored bracket, µm; > 0.
    pub nominal_section_um: f32,
    /// The element counts as consumed once metal loss reaches this fraction of
    /// its initial thickness, in (0, 1]. 1.0 is "loss ≥ initial thickness", which
    /// the formula only reaches as R → ∞; probe makers usually rate the useful
    /// life at 0.5 (past that the element is non-linear and may break).
    pub life_fraction: f32,
    /// Smallest reference voltage taken as a valid excitation, mV (> 0).
    pub min_reference_mv: i32,
}

impl CorrosionConfig {
    /// Whether every field is in its documented range.
    pub fn is_valid(&self) -> bool {
        let pos = |v: f32| v.is_finite() && v > 0.0;
        pos(self.initial_thickness_um)
            && pos(self.r0_ratio)
            && pos(self.nominal_section_um)
            && pos(self.life_fraction)
            && self.life_fraction <= 1.0
            && self.min_reference_mv > 0
    }
}

/// One probe reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorrosionReading {
    /// Metal lost from the exposed element since commissioning, µm (≥ 0).
    pub metal_loss_um: f32,
    /// Estimated section loss of the bracket, % of its nominal thickness.
    pub section_loss_pct: f32,
}

/// ER probe: an exposed element and a protected reference element carrying the
/// same excitation current (in series), each read as a voltage.
///
/// With equal current, V_exposed/V_reference = R_exposed/R_reference. Both share
/// the temperature, so the ratio cancels the resistance's temperature
/// coefficient. An element's resistance is R = ρ·L/(w·t): thickness is inversely
/// proportional to resistance, so with ratio r now and r0 when new,
/// t/t0 = r0/r and
///
/// `metal_loss_um = initial_thickness_um × (1 − r0_ratio / ratio)`.
///
/// The bracket is assumed to lose metal uniformly on both faces at the probe's
/// rate, so `section_loss_pct = 2 × metal_loss_um / nominal_section_um × 100`.
#[derive(Debug)]
pub struct CorrosionProbe<A, B> {
    exposed: A,
    reference: B,
    config: CorrosionConfig,
}

impl<A, B> CorrosionProbe<A, B> {
    /// Wrap the two inputs. An invalid config makes every read fail with
    /// [`CorrosionError::InvalidConfig`].
    pub fn new(exposed: A, reference: B, config: CorrosionConfig) -> Self {
        Self {
            exposed,
            reference,
            config,
        }
    }

    /// The configuration (persist it after [`commission`](Self::commission)).
    pub fn config(&self) -> CorrosionConfig {
        self.config
    }

    /// Give back the inputs (exposed, reference).
    pub fn release(self) -> (A, B) {
        (self.exposed, self.reference)
    }

    /// Metal loss and section loss for a resistance ratio (pure math, with the
    /// consumed-element check; negative loss from noise reads 0).
    pub fn reading_from_ratio<EA, EB>(
        &self,
        ratio: f32,
    ) -> Result<CorrosionReading, CorrosionError<EA, EB>> {
        let c = &self.config;
        if !c.is_valid() {
            return Err(CorrosionError::InvalidConfig);
        }
        let loss = (c.initial_thickness_um * (1.0 - c.r0_ratio / ratio)).max(0.0);
        if loss >= c.life_fraction * c.initial_thickness_um {
            return Err(CorrosionError::ProbeConsumed);
        }
        Ok(CorrosionReading {
            metal_loss_um: loss,
            section_loss_pct: 2.0 * loss / c.nominal_section_um * 100.0,
        })
    }
}

impl<A: AnalogInput, B: AnalogInput> CorrosionProbe<A, B> {
    /// Read both elements (exposed first; the excitation must be on for both)
    /// and return exposed/reference.
    pub fn read_ratio(&mut self) -> Result<f32, CorrosionError<A::Error, B::Error>> {
        let ve = self.exposed.read_mv().map_err(CorrosionError::Exposed)?;
        let vr = self
            .reference
            .read_mv()
            .map_err(CorrosionError::Reference)?;
        if vr < self.config.min_reference_mv || ve <= 0 {
            return Err(CorrosionError::SignalFault);
        }
        Ok(ve as f32 / vr as f32)
    }

    /// Read metal loss and section loss.
    pub fn read(&mut self) -> Result<CorrosionReading, CorrosionError<A::Error, B::Error>> {
        if !self.config.is_valid() {
            return Err(CorrosionError::InvalidConfig);
        }
        let ratio = self.read_ratio()?;
        self.reading_from_ratio(ratio)
    }

    /// At installation of a new probe: take the current ratio as `r0_ratio`
    /// (zero metal loss). Returns it.
    pub fn commission(&mut self) -> Result<f32, CorrosionError<A::Error, B::Error>> {
        let ratio = self.read_ratio()?;
        self.config.r0_ratio = ratio;
        Ok(ratio)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drivers::analog::fake::{FakeAdcError, FakeInput};

    /// 250 µm element, r0 = 1.0, 5 mm bracket, life 50 %.
    const CFG: CorrosionConfig = CorrosionConfig {
        initial_thickness_um: 250.0,
        r0_ratio: 1.0,
        nominal_section_um: 5000.0,
        life_fraction: 0.5,
        min_reference_mv: 10,
    };

    fn probe(exposed: &[i32], reference: &[i32]) -> CorrosionProbe<FakeInput, FakeInput> {
        CorrosionProbe::new(FakeInput::new(exposed), FakeInput::new(reference), CFG)
    }

    fn done(p: CorrosionProbe<FakeInput, FakeInput>) {
        let (a, b) = p.release();
        a.done();
        b.done();
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-3
    }

    #[test]
    fn metal_and_section_loss() {
        // ratio 1.25 → t = 250 × 0.8 = 200 µm → 50 µm lost; 2 × 50 / 5000 = 2 %.
        // Same ratio at a higher temperature (both elements +10 %): same result.
        let mut p = probe(&[1250, 1375], &[1000, 1100]);
        for _ in 0..2 {
            let r = p.read().unwrap();
            assert!(close(r.metal_loss_um, 50.0), "{r:?}");
            assert!(close(r.section_loss_pct, 2.0), "{r:?}");
        }
        done(p);
    }

    #[test]
    fn uses_commissioned_ratio() {
        // New probe reads 1.02; later 1.36 → 250 × (1 − 1.02/1.36) = 62.5 µm.
        let mut p = probe(&[1020, 1360], &[1000, 1000]);
        assert!(close(p.commission().unwrap(), 1.02));
        assert!(close(p.config().r0_ratio, 1.02));
        let r = p.read().unwrap();
        assert!(close(r.metal_loss_um, 62.5), "{r:?}");
        assert!(close(r.section_loss_pct, 2.5), "{r:?}");
        done(p);
    }

    #[test]
    fn noise_below_r0_reads_zero_loss() {
        let mut p = probe(&[995], &[1000]);
        assert_eq!(
            p.read(),
            Ok(CorrosionReading {
                metal_loss_um: 0.0,
                section_loss_pct: 0.0
            })
        );
        done(p);
    }

    #[test]
    fn consumed_element_is_a_fault() {
        // life 0.5 × 250 = 125 µm ↔ ratio 2.0.
        let mut p = probe(&[1990, 2000, 5000], &[1000, 1000, 1000]);
        assert!(close(p.read().unwrap().metal_loss_um, 124.372));
        assert_eq!(p.read(), Err(CorrosionError::ProbeConsumed));
        assert_eq!(p.read(), Err(CorrosionError::ProbeConsumed));
        done(p);
        // With life 1.0 only an effectively infinite ratio is consumed.
        let p = CorrosionProbe::new(
            FakeInput::new(&[]),
            FakeInput::new(&[]),
            CorrosionConfig {
                life_fraction: 1.0,
                ..CFG
            },
        );
        assert!(p.reading_from_ratio::<(), ()>(50.0).is_ok());
        assert_eq!(
            p.reading_from_ratio::<(), ()>(f32::INFINITY),
            Err(CorrosionError::ProbeConsumed)
        );
        done(p);
    }

    #[test]
    fn signal_faults_and_error_mapping() {
        let mut p = probe(&[1000, 0], &[9, 1000]);
        assert_eq!(p.read(), Err(CorrosionError::SignalFault)); // no excitation
        assert_eq!(p.read(), Err(CorrosionError::SignalFault)); // shorted element
        done(p);

        let mut exposed = FakeInput::new(&[]);
        exposed.push_error();
        let mut p = CorrosionProbe::new(exposed, FakeInput::new(&[]), CFG);
        assert_eq!(p.read(), Err(CorrosionError::Exposed(FakeAdcError)));
        done(p);

        let mut reference = FakeInput::new(&[]);
        reference.push_error();
        let mut p = CorrosionProbe::new(FakeInput::new(&[1000]), reference, CFG);
        assert_eq!(p.read(), Err(CorrosionError::Reference(FakeAdcError)));
        done(p);
    }

    #[test]
    fn invalid_config_reads_nothing() {
        let cfg = CorrosionConfig {
            nominal_section_um: 0.0,
            ..CFG
        };
        let mut p = CorrosionProbe::new(FakeInput::new(&[]), FakeInput::new(&[]), cfg);
        assert_eq!(p.read(), Err(CorrosionError::InvalidConfig));
        done(p);
    }
}
