//! ADS1115-class 16-bit I2C ADC: single-shot, single-ended conversions in millivolts
//! (PGA ±4.096 V, 860 SPS, comparator off), and `Ads1115Channel` so one chip feeds several sensors.
//! Not covered: differential inputs, continuous mode, the ALERT/RDY comparator, other PGA gains.

use core::cell::RefCell;

use embedded_hal::i2c::I2c;

use super::analog::AnalogInput;

/// Errors of the ADS1115 driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// I2C bus error.
    Bus(E),
    /// Channel number is not 0..=3.
    InvalidChannel,
    /// The conversion did not finish within the polling budget.
    Timeout,
    /// An [`Ads1115Channel`] found the shared ADC already borrowed (re-entrant use
    /// of the same `RefCell` from inside a bus call). Cannot happen in plain
    /// single-threaded polling; reported instead of panicking.
    Busy,
}

/// Register addresses.
#[derive(Debug)]
pub struct Register;

impl Register {
    /// Conversion result register (16-bit, two's complement, big-endian).
    pub const CONVERSION: u8 = 0x00;
    /// Configuration register.
    pub const CONFIG: u8 = 0x01;
}

/// Bit fields of the configuration register.
#[derive(Debug)]
pub struct BitFlags;

impl BitFlags {
    /// Operational status. Write 1: start a single conversion. Read 1: device idle
    /// (conversion finished); read 0: conversion in progress.
    pub const OS: u16 = 0b1000_0000_0000_0000;
    /// MUX bits 14:12 = 100: AIN0 vs GND (AIN1..3 follow as 101, 110, 111).
    pub const MUX_AIN0_GND: u16 = 0b0100_0000_0000_0000;
    /// Shift of the MUX field.
    pub const MUX_SHIFT: u16 = 12;
    /// PGA bits 11:9 = 001: full scale ±4.096 V (125 µV/LSB).
    pub const PGA_4_096V: u16 = 0b0000_0010_0000_0000;
    /// MODE bit 8 = 1: single-shot / power-down.
    pub const MODE_SINGLE_SHOT: u16 = 0b0000_0001_0000_0000;
    /// DR bits 7:5 = 111: 860 samples per second.
    pub const DR_860SPS: u16 = 0b0000_0000_1110_0000;
    /// COMP_QUE bits 1:0 = 11: comparator disabled (COMP_MODE/POL/LAT left 0).
    pub const COMP_QUE_DISABLE: u16 = 0b0000_0000_0000_0011;
}

/// TI ADS1115 (and pin-compatible ADS1114/ADS1015-style 16-bit parts) on I2C.
#[derive(Debug)]
pub struct Ads1115<I2C> {
    i2c: I2C,
    address: u8,
    max_polls: u8,
}

impl<I2C> Ads1115<I2C> {
    /// Default I2C address (ADDR pin to GND).
    pub const DEFAULT_ADDRESS: u8 = 0x48;
    /// Full-scale LSB size at PGA ±4.096 V, in microvolts.
    pub const UV_PER_LSB: i32 = 125;
    /// Default number of config-register polls before [`Error::Timeout`].
    ///
    /// A conversion at 860 SPS takes ≤ 1.3 ms (incl. ±10 % oscillator tolerance);
    /// one poll (write 1 byte + read 2) takes ~0.11 ms at 400 kHz and ~0.45 ms at
    /// 100 kHz, so 16 polls cover the conversion at either bus speed without a delay.
    pub const DEFAULT_MAX_POLLS: u8 = 16;

    /// Create a driver for the chip at `address` (0x48..=0x4B). No bus traffic.
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self {
            i2c,
            address,
            max_polls: Self::DEFAULT_MAX_POLLS,
        }
    }

    /// Set how many times the config register is polled for end of conversion
    /// (at least 1) before giving up with [`Error::Timeout`].
    pub fn set_max_polls(&mut self, polls: u8) {
        self.max_polls = polls.max(1);
    }

    /// Destroy the driver and give back the bus.
    pub fn release(self) -> I2C {
        self.i2c
    }

    /// The config word for a single-shot single-ended conversion on `channel`.
    pub fn single_shot_config(channel: u8) -> Option<u16> {
        if channel > 3 {
            return None;
        }
        Some(
            BitFlags::OS
                | (BitFlags::MUX_AIN0_GND + (u16::from(channel) << BitFlags::MUX_SHIFT))
                | BitFlags::PGA_4_096V
                | BitFlags::MODE_SINGLE_SHOT
                | BitFlags::DR_860SPS
                | BitFlags::COMP_QUE_DISABLE,
        )
    }

    /// Raw code → millivolts at 125 µV/LSB, rounded half away from zero.
    pub fn raw_to_mv(raw: i16) -> i32 {
        let uv = i32::from(raw) * Self::UV_PER_LSB;
        if uv >= 0 {
            (uv + 500) / 1000
        } else {
            (uv - 500) / 1000
        }
    }
}

impl<I2C: I2c> Ads1115<I2C> {
    /// Single-shot conversion of AIN`channel` vs GND; returns the raw 16-bit code.
    pub fn read_single_ended_raw(&mut self, channel: u8) -> Result<i16, Error<I2C::Error>> {
        let config = Self::single_shot_config(channel).ok_or(Error::InvalidChannel)?;
        self.write_register(Register::CONFIG, config)?;
        let mut ready = false;
        for _ in 0..self.max_polls {
            if self.read_register(Register::CONFIG)? & BitFlags::OS != 0 {
                ready = true;
                break;
            }
        }
        if !ready {
            return Err(Error::Timeout);
        }
        let raw = self.read_register(Register::CONVERSION)?;
        Ok(i16::from_be_bytes(raw.to_be_bytes()))
    }

    /// Single-shot conversion of AIN`channel` vs GND, in millivolts (125 µV/LSB).
    pub fn read_single_ended_mv(&mut self, channel: u8) -> Result<i32, Error<I2C::Error>> {
        self.read_single_ended_raw(channel).map(Self::raw_to_mv)
    }

    fn write_register(&mut self, register: u8, value: u16) -> Result<(), Error<I2C::Error>> {
        let [hi, lo] = value.to_be_bytes();
        self.i2c
            .write(self.address, &[register, hi, lo])
            .map_err(Error::Bus)
    }

    fn read_register(&mut self, register: u8) -> Result<u16, Error<I2C::Error>> {
        let mut buf = [0u8; 2];
        self.i2c
            .write_read(self.address, &[register], &mut buf)
            .map_err(Error::Bus)?;
        Ok(u16::from_be_bytes(buf))
    }
}

/// One single-ended input of a shared [`Ads1115`], usable as an [`AnalogInput`].
///
/// The ADC lives in a `core::cell::RefCell` (no heap, no unsafe) so several channel
/// handles can exist at once, e.g. the gas sensor on AIN0 and the battery on AIN3:
///
/// ```ignore
/// let adc = RefCell::new(Ads1115::new(i2c, 0x48));
/// let gas = GasSensor::new(Ads1115Channel::new(&adc, 0)?, cal);
/// let battery = BatteryMonitor::new(Ads1115Channel::new(&adc, 3)?, 2.0);
/// ```
#[derive(Debug)]
pub struct Ads1115Channel<'a, I2C> {
    adc: &'a RefCell<Ads1115<I2C>>,
    channel: u8,
}

impl<'a, I2C: I2c> Ads1115Channel<'a, I2C> {
    /// A handle on AIN`channel` (0..=3) of `adc`. No bus traffic.
    pub fn new(adc: &'a RefCell<Ads1115<I2C>>, channel: u8) -> Result<Self, Error<I2C::Error>> {
        if channel > 3 {
            return Err(Error::InvalidChannel);
        }
        Ok(Self { adc, channel })
    }
}

impl<I2C> Ads1115Channel<'_, I2C> {
    /// The channel number.
    pub fn channel(&self) -> u8 {
        self.channel
    }
}

impl<I2C: I2c> AnalogInput for Ads1115Channel<'_, I2C> {
    type Error = Error<I2C::Error>;

    fn read_mv(&mut self) -> Result<i32, Self::Error> {
        let mut adc = self.adc.try_borrow_mut().map_err(|_| Error::Busy)?;
        adc.read_single_ended_mv(self.channel)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as T};

    const ADDR: u8 = 0x48;

    /// The exact bus traffic of one successful conversion with `busy_polls`
    /// "still converting" answers before the ready one.
    pub(crate) fn conversion(addr: u8, channel: u8, busy_polls: usize, raw: i16) -> Vec<T> {
        let cfg = 0xC3E3u16 | (u16::from(channel) << 12);
        let [hi, lo] = cfg.to_be_bytes();
        let mut v = vec![T::write(addr, vec![0x01, hi, lo])];
        for _ in 0..busy_polls {
            v.push(T::write_read(addr, vec![0x01], vec![hi & 0x7F, lo]));
        }
        v.push(T::write_read(addr, vec![0x01], vec![hi, lo]));
        v.push(T::write_read(addr, vec![0x00], raw.to_be_bytes().to_vec()));
        v
    }

    #[test]
    fn config_words_match_datasheet() {
        // OS=1, MUX=1xx, PGA=001, MODE=1, DR=111, COMP_QUE=11
        assert_eq!(Ads1115::<()>::single_shot_config(0), Some(0xC3E3));
        assert_eq!(Ads1115::<()>::single_shot_config(1), Some(0xD3E3));
        assert_eq!(Ads1115::<()>::single_shot_config(2), Some(0xE3E3));
        assert_eq!(Ads1115::<()>::single_shot_config(3), Some(0xF3E3));
        assert_eq!(Ads1115::<()>::single_shot_config(4), None);
    }

    #[test]
    fn raw_to_mv_rounds_at_125uv_per_lsb() {
        assert_eq!(Ads1115::<()>::raw_to_mv(8000), 1000);
        assert_eq!(Ads1115::<()>::raw_to_mv(i16::MAX), 4096); // 4095.875
        assert_eq!(Ads1115::<()>::raw_to_mv(4), 1); // 0.5 mV rounds up
        assert_eq!(Ads1115::<()>::raw_to_mv(3), 0); // 0.375 mV
        assert_eq!(Ads1115::<()>::raw_to_mv(-12), -2); // -1.5 mV
        assert_eq!(Ads1115::<()>::raw_to_mv(i16::MIN), -4096);
    }

    #[test]
    fn single_shot_on_ain2_polls_then_reads() {
        let exp = conversion(ADDR, 2, 2, 0x3039); // 12345 * 125 µV = 1543.125 mV
        let mut i2c = I2cMock::new(&exp);
        let mut adc = Ads1115::new(i2c.clone(), ADDR);
        assert_eq!(adc.read_single_ended_mv(2).unwrap(), 1543);
        i2c.done();
    }

    #[test]
    fn negative_code_and_other_address() {
        let exp = conversion(0x4B, 0, 0, -80); // -10 mV
        let mut adc = Ads1115::new(I2cMock::new(&exp), 0x4B);
        assert_eq!(adc.read_single_ended_raw(0).unwrap(), -80);
        adc.release().done();
    }

    #[test]
    fn invalid_channel_touches_no_bus() {
        let mut i2c = I2cMock::new(&[]);
        let mut adc = Ads1115::new(i2c.clone(), ADDR);
        assert_eq!(adc.read_single_ended_mv(4), Err(Error::InvalidChannel));
        i2c.done();
    }

    #[test]
    fn never_ready_times_out_after_max_polls() {
        let busy = [0x43, 0xE3];
        let exp = [
            T::write(ADDR, vec![0x01, 0xC3, 0xE3]),
            T::write_read(ADDR, vec![0x01], busy.to_vec()),
            T::write_read(ADDR, vec![0x01], busy.to_vec()),
            T::write_read(ADDR, vec![0x01], busy.to_vec()),
        ];
        let mut i2c = I2cMock::new(&exp);
        let mut adc = Ads1115::new(i2c.clone(), ADDR);
        adc.set_max_polls(3);
        assert_eq!(adc.read_single_ended_mv(0), Err(Error::Timeout));
        i2c.done();
    }

    #[test]
    fn default_poll_budget_is_bounded() {
        let busy = [0x43, 0xE3];
        let mut exp = vec![T::write(ADDR, vec![0x01, 0xC3, 0xE3])];
        for _ in 0..Ads1115::<()>::DEFAULT_MAX_POLLS {
            exp.push(T::write_read(ADDR, vec![0x01], busy.to_vec()));
        }
        let mut i2c = I2cMock::new(&exp);
        let mut adc = Ads1115::new(i2c.clone(), ADDR);
        assert_eq!(adc.read_single_ended_mv(0), Err(Error::Timeout));
        i2c.done();
    }

    #[test]
    fn bus_errors_are_mapped() {
        let exp = [
            T::write(ADDR, vec![0x01, 0xD3, 0xE3]),
            T::write_read(ADDR, vec![0x01], vec![0xD3, 0xE3]),
            T::write_read(ADDR, vec![0x00], vec![0, 0]).with_error(ErrorKind::Other),
        ];
        let mut i2c = I2cMock::new(&exp);
        let mut adc = Ads1115::new(i2c.clone(), ADDR);
        assert_eq!(
            adc.read_single_ended_mv(1),
            Err(Error::Bus(ErrorKind::Other))
        );
        i2c.done();
    }

    #[test]
    fn two_channels_share_one_chip() {
        let mut exp = conversion(ADDR, 0, 1, 3200); // 400 mV
        exp.extend(conversion(ADDR, 3, 0, 16000)); // 2000 mV
        let mut i2c = I2cMock::new(&exp);
        let adc = RefCell::new(Ads1115::new(i2c.clone(), ADDR));
        let mut gas = Ads1115Channel::new(&adc, 0).unwrap();
        let mut batt = Ads1115Channel::new(&adc, 3).unwrap();
        assert_eq!(gas.read_mv(), Ok(400));
        assert_eq!(batt.read_mv(), Ok(2000));
        assert_eq!(batt.channel(), 3);
        i2c.done();
    }

    #[test]
    fn channel_rejects_bad_number_and_reports_busy() {
        let mut i2c = I2cMock::new(&[]);
        let adc = RefCell::new(Ads1115::new(i2c.clone(), ADDR));
        assert!(matches!(
            Ads1115Channel::new(&adc, 7),
            Err(Error::InvalidChannel)
        ));
        let mut ch = Ads1115Channel::new(&adc, 1).unwrap();
        let guard = adc.borrow_mut();
        assert_eq!(ch.read_mv(), Err(Error::Busy));
        drop(guard);
        i2c.done();
    }
}
