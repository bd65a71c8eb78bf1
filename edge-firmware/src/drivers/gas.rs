//! Combustible-gas sensor (catalytic bead or IR, analog output) read through an `AnalogInput`,
//! with two-point zero/span calibration to %LEL and under/over-range fault detection.
//! Not covered: sensor excitation/bridge hardware, warm-up timing, alarm thresholds or latching.

use super::analog::AnalogInput;

/// Errors of [`GasSensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GasError<E> {
    /// The analog input failed.
    Adc(E),
    /// The signal is far below zero or above the sensor's full range: a sensor or
    /// wiring fault (or gas beyond what the sensor can measure), never a value.
    OutOfRange,
    /// The calibration is unusable (span point too close to zero, span
    /// concentration not in (0, 100] %LEL, arithmetic overflow). A rejected
    /// calibration step leaves the previous calibration in place.
    InvalidCalibration,
}

/// Two-point calibration: sensor output in clean air (`zero_mv`) and with a span
/// gas of `span_lel` %LEL applied (`span_mv`). The output may rise or fall with
/// gas; only the two points matter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Output in clean air, mV.
    pub zero_mv: i32,
    /// Output with the span gas applied, mV.
    pub span_mv: i32,
    /// Span gas concentration, %LEL (typically 50).
    pub span_lel: f32,
}

impl Calibration {
    /// Smallest accepted |span − zero|: 50 mV, i.e. ≥ 1 mV per %LEL with a 50 %LEL
    /// span gas, so 1 mV ADC steps still resolve 1 %LEL.
    pub const MIN_SPAN_DELTA_MV: i32 = 50;

    /// Whether the two points define a usable line.
    pub fn is_valid(&self) -> bool {
        let delta = i64::from(self.span_mv) - i64::from(self.zero_mv);
        delta.abs() >= i64::from(Self::MIN_SPAN_DELTA_MV)
            && self.span_lel.is_finite()
            && self.span_lel > 0.0
            && self.span_lel <= GasSensor::<()>::FULL_SCALE_LEL
    }

    /// Linear map of a reading to %LEL, not clamped. Call only on a valid calibration.
    pub fn lel(&self, mv: i32) -> f32 {
        let num = (i64::from(mv) - i64::from(self.zero_mv)) as f32;
        let den = (i64::from(self.span_mv) - i64::from(self.zero_mv)) as f32;
        num / den * self.span_lel
    }
}

/// A gas sensor on one analog input.
#[derive(Debug)]
pub struct GasSensor<A> {
    input: A,
    cal: Calibration,
    last_mv: Option<i32>,
}

impl<A> GasSensor<A> {
    /// Nominal full range of the sensor, %LEL.
    pub const FULL_SCALE_LEL: f32 = 100.0;
    /// Readings above `FULL_SCALE_LEL + OVER_RANGE_MARGIN_LEL` are a fault.
    pub const OVER_RANGE_MARGIN_LEL: f32 = 10.0;
    /// Readings below zero by more than this fraction of the span range
    /// (i.e. below `-UNDER_RANGE_FRACTION × span_lel` %LEL) are a fault; smaller
    /// negative readings are zero drift and read as 0 %LEL.
    pub const UNDER_RANGE_FRACTION: f32 = 0.10;

    /// Wrap an input with a calibration. An invalid calibration is not rejected
    /// here but makes every [`read_lel`](Self::read_lel) fail with
    /// [`GasError::InvalidCalibration`].
    pub fn new(input: A, calibration: Calibration) -> Self {
        Self {
            input,
            cal: calibration,
            last_mv: None,
        }
    }

    /// The calibration in use (persist it after a calibration step).
    pub fn calibration(&self) -> Calibration {
        self.cal
    }

    /// The raw millivolts of the last successful input read (for diagnostics
    /// after an `OutOfRange` fault).
    pub fn last_mv(&self) -> Option<i32> {
        self.last_mv
    }

    /// Give back the input.
    pub fn release(self) -> A {
        self.input
    }

    /// Apply range checks and clamping to a reading under the current calibration.
    fn lel_checked<E>(&self, mv: i32) -> Result<f32, GasError<E>> {
        if !self.cal.is_valid() {
            return Err(GasError::InvalidCalibration);
        }
        let lel = self.cal.lel(mv);
        if lel < -Self::UNDER_RANGE_FRACTION * self.cal.span_lel
            || lel > Self::FULL_SCALE_LEL + Self::OVER_RANGE_MARGIN_LEL
        {
            return Err(GasError::OutOfRange);
        }
        Ok(lel.max(0.0))
    }
}

impl<A: AnalogInput> GasSensor<A> {
    fn sample(&mut self) -> Result<i32, GasError<A::Error>> {
        let mv = self.input.read_mv().map_err(GasError::Adc)?;
        self.last_mv = Some(mv);
        Ok(mv)
    }

    /// Read the concentration in %LEL, clamped at 0 for small negative drift.
    pub fn read_lel(&mut self) -> Result<f32, GasError<A::Error>> {
        let mv = self.sample()?;
        self.lel_checked(mv)
    }

    /// Zero calibration (clean air applied): the current reading becomes the zero
    /// point. The span point moves by the same offset, so the gain (mV per %LEL)
    /// set by the last span calibration is kept. Returns the new calibration.
    pub fn calibrate_zero(&mut self) -> Result<Calibration, GasError<A::Error>> {
        let mv = self.sample()?;
        let offset = i64::from(mv) - i64::from(self.cal.zero_mv);
        let span_mv = i32::try_from(i64::from(self.cal.span_mv) + offset)
            .map_err(|_| GasError::InvalidCalibration)?;
        let cal = Calibration {
            zero_mv: mv,
            span_mv,
            ..self.cal
        };
        if !cal.is_valid() {
            return Err(GasError::InvalidCalibration);
        }
        self.cal = cal;
        Ok(cal)
    }

    /// Span calibration (span gas of `span_lel` %LEL applied): the current
    /// reading becomes the span point. Rejected (calibration unchanged) if the
    /// reading is within [`Calibration::MIN_SPAN_DELTA_MV`] of zero or `span_lel`
    /// is not in (0, 100]. Returns the new calibration.
    pub fn calibrate_span(&mut self, span_lel: f32) -> Result<Calibration, GasError<A::Error>> {
        let mv = self.sample()?;
        let cal = Calibration {
            span_mv: mv,
            span_lel,
            ..self.cal
        };
        if !cal.is_valid() {
            return Err(GasError::InvalidCalibration);
        }
        self.cal = cal;
        Ok(cal)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drivers::ads1115::tests::conversion;
    use crate::drivers::ads1115::{self, Ads1115, Ads1115Channel};
    use crate::drivers::analog::fake::{FakeAdcError, FakeInput};
    use core::cell::RefCell;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::Mock as I2cMock;

    /// 400 mV clean air, 1200 mV at 50 %LEL → 16 mV per %LEL.
    const CAL: Calibration = Calibration {
        zero_mv: 400,
        span_mv: 1200,
        span_lel: 50.0,
    };

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-4
    }

    fn sensor(readings: &[i32]) -> GasSensor<FakeInput> {
        GasSensor::new(FakeInput::new(readings), CAL)
    }

    #[test]
    fn linear_two_point_conversion() {
        let mut s = sensor(&[400, 800, 1200, 1840]);
        assert!(close(s.read_lel().unwrap(), 0.0));
        assert!(close(s.read_lel().unwrap(), 25.0));
        assert!(close(s.read_lel().unwrap(), 50.0));
        assert!(close(s.read_lel().unwrap(), 90.0));
        s.release().done();
    }

    #[test]
    fn small_negative_drift_clamps_to_zero_large_is_fault() {
        // -5 %LEL (= 10 % of the 50 %LEL span) is the limit: 320 mV.
        let mut s = sensor(&[390, 321, 319, 0]);
        assert_eq!(s.read_lel(), Ok(0.0));
        assert_eq!(s.read_lel(), Ok(0.0));
        assert_eq!(s.read_lel(), Err(GasError::OutOfRange));
        assert_eq!(s.read_lel(), Err(GasError::OutOfRange));
        assert_eq!(s.last_mv(), Some(0));
        s.release().done();
    }

    #[test]
    fn above_full_range_is_fault() {
        // 110 %LEL = 400 + 110 × 16 = 2160 mV.
        let mut s = sensor(&[2159, 2161]);
        assert!(close(s.read_lel().unwrap(), 109.9375));
        assert_eq!(s.read_lel(), Err(GasError::OutOfRange));
        s.release().done();
    }

    #[test]
    fn adc_error_is_mapped() {
        let mut input = FakeInput::new(&[]);
        input.push_error();
        let mut s = GasSensor::new(input, CAL);
        assert_eq!(s.read_lel(), Err(GasError::Adc(FakeAdcError)));
        s.release().done();
    }

    #[test]
    fn falling_output_sensor_is_supported() {
        let cal = Calibration {
            zero_mv: 2000,
            span_mv: 1000,
            span_lel: 50.0,
        };
        let mut s = GasSensor::new(FakeInput::new(&[1500, 2050, 2200]), cal);
        assert!(close(s.read_lel().unwrap(), 25.0));
        assert_eq!(s.read_lel(), Ok(0.0)); // -2.5 %LEL: drift
        assert_eq!(s.read_lel(), Err(GasError::OutOfRange)); // -10 %LEL
        s.release().done();
    }

    #[test]
    fn invalid_calibration_never_yields_a_value() {
        let cal = Calibration {
            zero_mv: 400,
            span_mv: 420,
            span_lel: 50.0,
        };
        let mut s = GasSensor::new(FakeInput::new(&[800]), cal);
        assert_eq!(s.read_lel(), Err(GasError::InvalidCalibration));
        s.release().done();
        assert!(!Calibration {
            span_lel: f32::NAN,
            ..CAL
        }
        .is_valid());
    }

    #[test]
    fn zero_calibration_keeps_gain() {
        let mut s = sensor(&[430, 830]);
        let cal = s.calibrate_zero().unwrap();
        assert_eq!(cal.zero_mv, 430);
        assert_eq!(cal.span_mv, 1230);
        assert!(close(s.read_lel().unwrap(), 25.0));
        s.release().done();
    }

    #[test]
    fn span_calibration_sets_gain() {
        // 40 %LEL gives 1000 mV → 15 mV per %LEL; 700 mV is then 20 %LEL.
        let mut s = sensor(&[1000, 700]);
        let cal = s.calibrate_span(40.0).unwrap();
        assert_eq!(cal.span_mv, 1000);
        assert!(close(s.read_lel().unwrap(), 20.0));
        assert_eq!(s.calibration(), cal);
        s.release().done();
    }

    #[test]
    fn span_too_close_to_zero_or_bad_concentration_is_rejected() {
        let mut s = sensor(&[449, 1000, 1000, 1000]);
        assert_eq!(s.calibrate_span(50.0), Err(GasError::InvalidCalibration));
        assert_eq!(s.calibrate_span(0.0), Err(GasError::InvalidCalibration));
        assert_eq!(
            s.calibrate_span(f32::NAN),
            Err(GasError::InvalidCalibration)
        );
        assert_eq!(s.calibrate_span(150.0), Err(GasError::InvalidCalibration));
        assert_eq!(s.calibration(), CAL); // unchanged
        s.release().done();
    }

    #[test]
    fn reads_through_a_shared_ads1115_channel() {
        // AIN0 code 6400 × 125 µV = 800 mV → 25 %LEL.
        let exp = conversion(0x48, 0, 1, 6400);
        let mut i2c = I2cMock::new(&exp);
        let adc = RefCell::new(Ads1115::new(i2c.clone(), 0x48));
        let mut s = GasSensor::new(Ads1115Channel::new(&adc, 0).unwrap(), CAL);
        assert!(close(s.read_lel().unwrap(), 25.0));
        i2c.done();
    }

    #[test]
    fn ads1115_bus_error_surfaces_as_adc_error() {
        let exp = [
            embedded_hal_mock::eh1::i2c::Transaction::write(0x48, vec![0x01, 0xC3, 0xE3])
                .with_error(ErrorKind::Other),
        ];
        let mut i2c = I2cMock::new(&exp);
        let adc = RefCell::new(Ads1115::new(i2c.clone(), 0x48));
        let mut s = GasSensor::new(Ads1115Channel::new(&adc, 0).unwrap(), CAL);
        assert_eq!(
            s.read_lel(),
            Err(GasError::Adc(ads1115::Error::Bus(ErrorKind::Other)))
        );
        i2c.done();
    }
}
