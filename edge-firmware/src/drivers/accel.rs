//! ADXL345-class I2C 3-axis accelerometer (full resolution, mg) and the pure math on top:
//! `TiltMonitor` (angle to the installed gravity vector, vibration) and `AccelAverager`.
//! Not covered: FIFO, interrupts, tap/activity detection, offset registers, SPI.

use embedded_hal::i2c::I2c;

/// Errors of the [`Adxl345`] driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// I2C bus error.
    Bus(E),
    /// The DEVID register did not hold 0xE5; the value read is attached.
    WrongDevice(u8),
}

/// Register addresses.
#[derive(Debug)]
pub struct Register;

impl Register {
    /// Device ID, reads 0xE5.
    pub const DEVID: u8 = 0x00;
    /// Data rate and power mode.
    pub const BW_RATE: u8 = 0x2C;
    /// Power control (measure bit).
    pub const POWER_CTL: u8 = 0x2D;
    /// Data format (full resolution, range).
    pub const DATA_FORMAT: u8 = 0x31;
    /// First of six data bytes: X0, X1, Y0, Y1, Z0, Z1 (little-endian i16 each).
    pub const DATAX0: u8 = 0x32;
}

/// Bit fields.
#[derive(Debug)]
pub struct BitFlags;

impl BitFlags {
    /// POWER_CTL D3: measurement mode.
    pub const MEASURE: u8 = 0b0000_1000;
    /// DATA_FORMAT D3: full resolution (4 mg/LSB at every range).
    pub const FULL_RES: u8 = 0b0000_1000;
    /// DATA_FORMAT D1:D0 = 11: ±16 g.
    pub const RANGE_16G: u8 = 0b0000_0011;
}

/// One acceleration sample, mg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accel {
    /// X axis, mg.
    pub x: i32,
    /// Y axis, mg.
    pub y: i32,
    /// Z axis, mg.
    pub z: i32,
}

impl Accel {
    /// As an f64 vector.
    pub fn to_f64(self) -> [f64; 3] {
        [f64::from(self.x), f64::from(self.y), f64::from(self.z)]
    }

    /// |a|, mg.
    pub fn magnitude_mg(self) -> f32 {
        norm(self.to_f64()) as f32
    }
}

/// ADXL345 on I2C.
#[derive(Debug)]
pub struct Adxl345<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C> Adxl345<I2C> {
    /// Address with ALT ADDRESS pin low.
    pub const DEFAULT_ADDRESS: u8 = 0x53;
    /// Address with ALT ADDRESS pin high.
    pub const ALT_ADDRESS: u8 = 0x1D;
    /// Content of DEVID.
    pub const DEVICE_ID: u8 = 0xE5;
    /// Scale in full-resolution mode, mg per LSB (datasheet typical 3.9; the
    /// scale error cancels in tilt angles, and vibration compares against the
    /// measured baseline magnitude, not 1000 mg).
    pub const MG_PER_LSB: i32 = 4;

    /// Create a driver; no bus traffic until [`init`](Adxl345::init).
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self { i2c, address }
    }

    /// Destroy the driver and give back the bus.
    pub fn release(self) -> I2C {
        self.i2c
    }
}

impl<I2C: I2c> Adxl345<I2C> {
    /// Check the device ID, select full resolution ±16 g, start measuring
    /// (default 100 Hz output rate).
    pub fn init(&mut self) -> Result<(), Error<I2C::Error>> {
        let mut id = [0u8; 1];
        self.i2c
            .write_read(self.address, &[Register::DEVID], &mut id)
            .map_err(Error::Bus)?;
        if id[0] != Self::DEVICE_ID {
            return Err(Error::WrongDevice(id[0]));
        }
        self.write_register(
            Register::DATA_FORMAT,
            BitFlags::FULL_RES | BitFlags::RANGE_16G,
        )?;
        self.write_register(Register::POWER_CTL, BitFlags::MEASURE)
    }

    /// One sample of all three axes (single 6-byte burst read), mg.
    pub fn read_mg(&mut self) -> Result<Accel, Error<I2C::Error>> {
        let mut b = [0u8; 6];
        self.i2c
            .write_read(self.address, &[Register::DATAX0], &mut b)
            .map_err(Error::Bus)?;
        let axis = |lo: u8, hi: u8| i32::from(i16::from_le_bytes([lo, hi])) * Self::MG_PER_LSB;
        Ok(Accel {
            x: axis(b[0], b[1]),
            y: axis(b[2], b[3]),
            z: axis(b[4], b[5]),
        })
    }

    fn write_register(&mut self, register: u8, value: u8) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write(self.address, &[register, value])
            .map_err(Error::Bus)
    }
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn norm(a: [f64; 3]) -> f64 {
    libm::sqrt(dot(a, a))
}

/// Running mean of samples, so tilt can be resolved below one LSB (4 mg ≈ 0.23°
/// at 1 g, while the alarm thresholds are 0.11° and 0.38°). No heap: sums in i64.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccelAverager {
    sum: [i64; 3],
    count: u32,
}

impl AccelAverager {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a sample.
    pub fn push(&mut self, a: Accel) {
        self.sum[0] += i64::from(a.x);
        self.sum[1] += i64::from(a.y);
        self.sum[2] += i64::from(a.z);
        self.count = self.count.saturating_add(1);
    }

    /// Number of samples added.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The mean vector, mg; `None` before the first sample.
    pub fn mean(&self) -> Option<[f64; 3]> {
        if self.count == 0 {
            return None;
        }
        let n = f64::from(self.count);
        Some([
            self.sum[0] as f64 / n,
            self.sum[1] as f64 / n,
            self.sum[2] as f64 / n,
        ])
    }

    /// Start again.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Tilt relative to the gravity vector at installation. Pure math, no bus.
///
/// The angle is `atan2(|b × a|, b · a)` in f64, which stays accurate for small
/// angles (an `acos` of the normalised dot product would lose them to rounding).
/// It does not depend on the sensor's scale factor. A zero vector gives 0°:
/// validate the baseline (|b| near 1 g) before installing it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TiltMonitor {
    baseline: [f64; 3],
}

impl TiltMonitor {
    /// Monitor with `baseline` as the installed gravity vector.
    pub fn new(baseline: Accel) -> Self {
        Self::from_mean(baseline.to_f64())
    }

    /// Monitor with an averaged baseline (see [`AccelAverager::mean`]).
    pub fn from_mean(baseline: [f64; 3]) -> Self {
        Self { baseline }
    }

    /// Install a new baseline gravity vector.
    pub fn set_baseline(&mut self, accel: Accel) {
        self.baseline = accel.to_f64();
    }

    /// Install an averaged baseline gravity vector, mg.
    pub fn set_baseline_mean(&mut self, mean: [f64; 3]) {
        self.baseline = mean;
    }

    /// The baseline vector, mg.
    pub fn baseline(&self) -> [f64; 3] {
        self.baseline
    }

    /// Angle between the baseline and `accel`, degrees.
    pub fn tilt_deg(&self, accel: Accel) -> f32 {
        self.tilt_deg_mean(accel.to_f64())
    }

    /// Angle between the baseline and an averaged vector, degrees.
    pub fn tilt_deg_mean(&self, mean: [f64; 3]) -> f32 {
        let s = norm(cross(self.baseline, mean));
        let c = dot(self.baseline, mean);
        libm::atan2(s, c).to_degrees() as f32
    }

    /// Vibration estimate for one sample: | |a| − |baseline| |, mg — how far the
    /// magnitude departs from the installed gravity magnitude (≈ 1000 mg, but
    /// measured, so a scale error of the part does not show as vibration).
    /// Pure tilt does not change it; shocks and oscillation do.
    pub fn vibration_mg(&self, accel: Accel) -> f32 {
        (norm(accel.to_f64()) - norm(self.baseline)).abs() as f32
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as T};

    const ADDR: u8 = 0x53;

    fn sample(x: i16, y: i16, z: i16) -> Vec<u8> {
        [x, y, z].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn init_checks_id_then_configures() {
        let exp = [
            T::write_read(ADDR, vec![0x00], vec![0xE5]),
            T::write(ADDR, vec![0x31, 0x0B]),
            T::write(ADDR, vec![0x2D, 0x08]),
        ];
        let mut dev = Adxl345::new(I2cMock::new(&exp), ADDR);
        dev.init().unwrap();
        dev.release().done();
    }

    #[test]
    fn init_wrong_id_stops_before_configuring() {
        let exp = [T::write_read(0x1D, vec![0x00], vec![0x33])];
        let mut dev = Adxl345::new(I2cMock::new(&exp), 0x1D);
        assert_eq!(dev.init(), Err(Error::WrongDevice(0x33)));
        dev.release().done();
    }

    #[test]
    fn read_is_one_burst_little_endian_4mg() {
        let exp = [T::write_read(ADDR, vec![0x32], sample(1, -250, 0x0100))];
        let mut dev = Adxl345::new(I2cMock::new(&exp), ADDR);
        assert_eq!(
            dev.read_mg().unwrap(),
            Accel {
                x: 4,
                y: -1000,
                z: 1024
            }
        );
        dev.release().done();
    }

    #[test]
    fn bus_errors_are_mapped() {
        let exp = [
            T::write_read(ADDR, vec![0x00], vec![0xE5]),
            T::write(ADDR, vec![0x31, 0x0B]).with_error(ErrorKind::Other),
            T::write_read(ADDR, vec![0x32], sample(0, 0, 0)).with_error(ErrorKind::Other),
        ];
        let mut dev = Adxl345::new(I2cMock::new(&exp), ADDR);
        assert_eq!(dev.init(), Err(Error::Bus(ErrorKind::Other)));
        assert_eq!(dev.read_mg(), Err(Error::Bus(ErrorKind::Other)));
        dev.release().done();
    }

    /// Rodrigues rotation of `v` about unit `axis` by `deg`.
    fn rotate(v: [f64; 3], axis: [f64; 3], deg: f64) -> [f64; 3] {
        let (s, c) = deg.to_radians().sin_cos();
        let k = axis;
        let kxv = cross(k, v);
        let kv = dot(k, v);
        [
            v[0] * c + kxv[0] * s + k[0] * kv * (1.0 - c),
            v[1] * c + kxv[1] * s + k[1] * kv * (1.0 - c),
            v[2] * c + kxv[2] * s + k[2] * kv * (1.0 - c),
        ]
    }

    #[test]
    fn half_degree_rotation_reads_half_degree() {
        let base = [0.0, 0.0, 1000.0];
        let m = TiltMonitor::from_mean(base);
        let tilted = rotate(base, [1.0, 0.0, 0.0], 0.5);
        let t = m.tilt_deg_mean(tilted);
        assert!((t - 0.5).abs() < 0.01, "{t}");
        assert!((t - 0.5).abs() < 1e-5, "{t}");
    }

    #[test]
    fn alarm_threshold_angles_are_resolved_for_any_mounting() {
        // Oblique installation, rotation axis perpendicular to gravity.
        let base = [312.0, -205.0, 927.0];
        let axis = {
            let c = cross(base, [0.0, 0.0, 1.0]);
            let n = norm(c);
            [c[0] / n, c[1] / n, c[2] / n]
        };
        let m = TiltMonitor::from_mean(base);
        for deg in [0.11, 0.38, 2.0, 30.0] {
            let t = m.tilt_deg_mean(rotate(base, axis, deg));
            assert!((f64::from(t) - deg).abs() < 1e-4, "{deg}: {t}");
        }
        assert_eq!(m.tilt_deg_mean(base), 0.0);
    }

    #[test]
    fn integer_samples_and_averaging() {
        let m = TiltMonitor::new(Accel {
            x: 0,
            y: 0,
            z: 1000,
        });
        assert!(
            (m.tilt_deg(Accel {
                x: 0,
                y: 1000,
                z: 1000
            }) - 45.0)
                .abs()
                < 1e-5
        );
        assert!(
            (m.tilt_deg(Accel {
                x: 0,
                y: 0,
                z: -1000
            }) - 180.0)
                .abs()
                < 1e-5
        );

        // Samples 8, 9, 9, 9 mg on X average to 8.75 mg: atan(8.75/1000).
        let mut avg = AccelAverager::new();
        assert_eq!(avg.mean(), None);
        for x in [8, 9, 9, 9] {
            avg.push(Accel { x, y: 0, z: 1000 });
        }
        assert_eq!(avg.count(), 4);
        let mean = avg.mean().unwrap();
        assert_eq!(mean, [8.75, 0.0, 1000.0]);
        let expected = (8.75f64 / 1000.0).atan().to_degrees();
        assert!((f64::from(m.tilt_deg_mean(mean)) - expected).abs() < 1e-5);
        avg.reset();
        assert_eq!(avg.count(), 0);
    }

    #[test]
    fn baseline_from_bus_then_tilt() {
        // Two baseline samples straight down Z, then one tilted sample.
        let exp = [
            T::write_read(ADDR, vec![0x32], sample(0, 0, 250)),
            T::write_read(ADDR, vec![0x32], sample(0, 2, 250)),
            T::write_read(ADDR, vec![0x32], sample(0, 251, 250)),
        ];
        let mut dev = Adxl345::new(I2cMock::new(&exp), ADDR);
        let mut avg = AccelAverager::new();
        avg.push(dev.read_mg().unwrap());
        avg.push(dev.read_mg().unwrap());
        let mut m = TiltMonitor::new(Accel::default());
        m.set_baseline_mean(avg.mean().unwrap()); // [0, 4, 1000]
        assert_eq!(m.baseline(), [0.0, 4.0, 1000.0]);
        let t = m.tilt_deg(dev.read_mg().unwrap()); // [0, 1004, 1000]
        let expected = (1004f64.atan2(1000.0) - 4f64.atan2(1000.0)).to_degrees();
        assert!((f64::from(t) - expected).abs() < 1e-4, "{t} vs {expected}");
        dev.release().done();
    }

    #[test]
    fn vibration_is_magnitude_deviation_from_baseline() {
        let mut m = TiltMonitor::new(Accel {
            x: 0,
            y: 0,
            z: 1000,
        });
        assert!(
            (m.vibration_mg(Accel {
                x: 0,
                y: 0,
                z: 1100
            }) - 100.0)
                .abs()
                < 1e-3
        );
        assert!((m.vibration_mg(Accel { x: 0, y: 0, z: 850 }) - 150.0).abs() < 1e-3);
        // Pure tilt: same magnitude, no vibration.
        assert!(
            m.vibration_mg(Accel {
                x: 600,
                y: 0,
                z: 800
            })
            .abs()
                < 1e-3
        );
        // Against a measured 1024 mg baseline, 1024 mg is still rest.
        m.set_baseline(Accel {
            x: 0,
            y: 0,
            z: 1024,
        });
        assert!(
            m.vibration_mg(Accel {
                x: 0,
                y: 0,
                z: 1024
            })
            .abs()
                < 1e-3
        );
        assert!(
            (Accel {
                x: 300,
                y: 400,
                z: 0
            }
            .magnitude_mg()
                - 500.0)
                .abs()
                < 1e-3
        );
    }
}
