//! Digital actuators on an `OutputPin`: the gas shut-off `Valve` and the `Buzzer`.
//! Not covered: coil drive timing (hit-and-hold PWM), valve position feedback, tone generation.

use embedded_hal::digital::OutputPin;

/// Errors of the output drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputError<E> {
    /// The pin could not be set; the actuator state is now unknown.
    Pin(E),
}

/// Commanded valve position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValveState {
    /// Coil energised, gas flows.
    Open,
    /// Coil de-energised, gas shut off.
    Closed,
}

/// Normally-closed (fail-safe) solenoid shut-off valve.
///
/// Pin **low = coil de-energised = closed**; pin high = open. A reset, a
/// brown-out or a floating/low pin therefore shuts the gas off.
#[derive(Debug)]
pub struct Valve<P> {
    pin: P,
    state: Option<ValveState>,
}

impl<P> Valve<P> {
    /// Wrap the pin; no pin change, state unknown until the first command.
    pub fn new(pin: P) -> Self {
        Self { pin, state: None }
    }

    /// Last successfully commanded state; `None` before the first command or
    /// after a failed one.
    pub fn state(&self) -> Option<ValveState> {
        self.state
    }

    /// Give back the pin.
    pub fn release(self) -> P {
        self.pin
    }
}

impl<P: OutputPin> Valve<P> {
    /// Shut the gas off (pin low).
    pub fn close(&mut self) -> Result<(), OutputError<P::Error>> {
        self.state = None;
        self.pin.set_low().map_err(OutputError::Pin)?;
        self.state = Some(ValveState::Closed);
        Ok(())
    }

    /// Let gas flow (pin high).
    pub fn open(&mut self) -> Result<(), OutputError<P::Error>> {
        self.state = None;
        self.pin.set_high().map_err(OutputError::Pin)?;
        self.state = Some(ValveState::Open);
        Ok(())
    }
}

/// Active buzzer (self-oscillating): pin high = sounding.
#[derive(Debug)]
pub struct Buzzer<P> {
    pin: P,
    on: Option<bool>,
}

impl<P> Buzzer<P> {
    /// Wrap the pin; no pin change.
    pub fn new(pin: P) -> Self {
        Self { pin, on: None }
    }

    /// Last successfully commanded state; `None` before the first command or
    /// after a failed one.
    pub fn is_on(&self) -> Option<bool> {
        self.on
    }

    /// Give back the pin.
    pub fn release(self) -> P {
        self.pin
    }
}

impl<P: OutputPin> Buzzer<P> {
    /// Sound (pin high).
    pub fn on(&mut self) -> Result<(), OutputError<P::Error>> {
        self.on = None;
        self.pin.set_high().map_err(OutputError::Pin)?;
        self.on = Some(true);
        Ok(())
    }

    /// Silence (pin low).
    pub fn off(&mut self) -> Result<(), OutputError<P::Error>> {
        self.on = None;
        self.pin.set_low().map_err(OutputError::Pin)?;
        self.on = Some(false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as T};
    use embedded_hal_mock::eh1::MockError;
    use std::io::ErrorKind;

    #[test]
    fn valve_levels_and_state() {
        let exp = [T::set(State::High), T::set(State::Low)];
        let mut v = Valve::new(PinMock::new(&exp));
        assert_eq!(v.state(), None);
        assert_eq!(v.open(), Ok(()));
        assert_eq!(v.state(), Some(ValveState::Open));
        assert_eq!(v.close(), Ok(()));
        assert_eq!(v.state(), Some(ValveState::Closed));
        v.release().done();
    }

    #[test]
    fn valve_pin_error_is_mapped_and_state_unknown() {
        let err = MockError::Io(ErrorKind::NotConnected);
        let exp = [
            T::set(State::Low),
            T::set(State::High).with_error(err.clone()),
        ];
        let mut v = Valve::new(PinMock::new(&exp));
        v.close().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(v.open(), Err(OutputError::Pin(err)));
        assert_eq!(v.state(), None);
        v.release().done();
    }

    #[test]
    fn buzzer_levels_and_errors() {
        let err = MockError::Io(ErrorKind::Other);
        let exp = [
            T::set(State::High),
            T::set(State::Low),
            T::set(State::High).with_error(err.clone()),
        ];
        let mut b = Buzzer::new(PinMock::new(&exp));
        assert_eq!(b.on(), Ok(()));
        assert_eq!(b.is_on(), Some(true));
        assert_eq!(b.off(), Ok(()));
        assert_eq!(b.is_on(), Some(false));
        assert_eq!(b.on(), Err(OutputError::Pin(err)));
        assert_eq!(b.is_on(), None);
        b.release().done();
    }
}
