//! Battery voltage through a resistor divider into an `AnalogInput`, in volts.
//! Not covered: state of charge, temperature compensation or low-battery thresholds.

use super::analog::AnalogInput;

/// Battery monitor: `V_battery = V_adc × ratio`, where for a divider
/// `battery — R_top — (ADC node) — R_bottom — GND` the ratio is
/// `(R_top + R_bottom) / R_bottom`.
#[derive(Debug)]
pub struct BatteryMonitor<A> {
    input: A,
    ratio: f32,
}

impl<A> BatteryMonitor<A> {
    /// Monitor with a known divider ratio (V_battery / V_adc, ≥ 1).
    pub fn new(input: A, ratio: f32) -> Self {
        Self { input, ratio }
    }

    /// Monitor from the divider's resistor values (any consistent unit).
    pub fn from_divider(input: A, r_top: f32, r_bottom: f32) -> Self {
        Self::new(input, (r_top + r_bottom) / r_bottom)
    }

    /// The divider ratio.
    pub fn ratio(&self) -> f32 {
        self.ratio
    }

    /// Give back the input.
    pub fn release(self) -> A {
        self.input
    }
}

impl<A: AnalogInput> BatteryMonitor<A> {
    /// Battery voltage, V. The input's error is passed through unchanged.
    pub fn read_volts(&mut self) -> Result<f32, A::Error> {
        let mv = self.input.read_mv()?;
        Ok(mv as f32 * self.ratio / 1000.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drivers::ads1115::tests::conversion;
    use crate::drivers::ads1115::{Ads1115, Ads1115Channel};
    use crate::drivers::analog::fake::{FakeAdcError, FakeInput};
    use core::cell::RefCell;
    use embedded_hal_mock::eh1::i2c::Mock as I2cMock;

    #[test]
    fn scales_by_ratio() {
        let mut input = FakeInput::new(&[1850, 1183]);
        input.push_error();
        let mut b = BatteryMonitor::new(input, 2.0);
        assert!((b.read_volts().unwrap() - 3.7).abs() < 1e-5);
        let mut b = BatteryMonitor::from_divider(b.release(), 100_000.0, 47_000.0);
        assert!((b.ratio() - 147.0 / 47.0).abs() < 1e-6);
        assert!((b.read_volts().unwrap() - 3.70011).abs() < 1e-4);
        assert_eq!(b.read_volts(), Err(FakeAdcError));
        b.release().done();
    }

    #[test]
    fn battery_on_ads1115_channel_3() {
        // Code 14800 × 125 µV = 1850 mV; ratio 2 → 3.7 V.
        let exp = conversion(0x49, 3, 0, 14800);
        let mut i2c = I2cMock::new(&exp);
        let adc = RefCell::new(Ads1115::new(i2c.clone(), 0x49));
        let mut b = BatteryMonitor::new(Ads1115Channel::new(&adc, 3).unwrap(), 2.0);
        assert!((b.read_volts().unwrap() - 3.7).abs() < 1e-5);
        i2c.done();
    }
}
