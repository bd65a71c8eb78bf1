//! Sensor and actuator drivers, generic over embedded-hal 1.0 (no heap, no unsafe).
//! Map: `analog` (AnalogInput trait) ← `ads1115` (I2C ADC) → `gas`, `smoke` (+ thermistor),
//! `corrosion`, `battery`; `accel` (ADXL345 + tilt math); `outputs` (valve, buzzer).

pub mod accel;
pub mod ads1115;
pub mod analog;
pub mod battery;
pub mod corrosion;
pub mod gas;
pub mod outputs;
pub mod smoke;

pub use accel::{Accel, AccelAverager, Adxl345, Error as Adxl345Error, TiltMonitor};
pub use ads1115::{Ads1115, Ads1115Channel, Error as Ads1115Error};
pub use analog::AnalogInput;
pub use battery::BatteryMonitor;
pub use corrosion::{CorrosionConfig, CorrosionError, CorrosionProbe, CorrosionReading};
pub use gas::{Calibration, GasError, GasSensor};
pub use outputs::{Buzzer, OutputError, Valve, ValveState};
pub use smoke::{
    SmokeChamber, SmokeConfig, SmokeError, Thermistor, ThermistorConfig, ThermistorError,
};
