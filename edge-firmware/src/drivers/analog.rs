//! The `AnalogInput` trait: one analog channel read as a voltage in millivolts.
//! embedded-hal 1.0 has no ADC trait, so ADC drivers adapt to this and sensors consume it.
//! It is not an ADC driver and knows nothing of gain, scaling or units beyond millivolts.

/// One analog input channel, read as a voltage in millivolts.
///
/// Implemented by ADC channel adapters (e.g. [`super::ads1115::Ads1115Channel`]);
/// consumed by the sensor drivers (gas, smoke, thermistor, corrosion, battery).
pub trait AnalogInput {
    /// Error of the underlying converter / bus.
    type Error;

    /// Take one reading, in millivolts.
    fn read_mv(&mut self) -> Result<i32, Self::Error>;
}

/// A mutable borrow of an input is an input, so a sensor driver can borrow a
/// channel instead of owning it.
impl<T: AnalogInput + ?Sized> AnalogInput for &mut T {
    type Error = T::Error;

    fn read_mv(&mut self) -> Result<i32, Self::Error> {
        (**self).read_mv()
    }
}

/// Test double: a scripted analog input that hands out readings in order and
/// checks, like the embedded-hal-mock mocks, that all were consumed (`done()`).
#[cfg(test)]
pub(crate) mod fake {
    use super::AnalogInput;
    use std::collections::VecDeque;

    /// Error produced by [`FakeInput`] when a reading is scripted to fail.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct FakeAdcError;

    #[derive(Debug)]
    pub(crate) struct FakeInput {
        script: VecDeque<Result<i32, FakeAdcError>>,
    }

    impl FakeInput {
        pub(crate) fn new(readings: &[i32]) -> Self {
            Self {
                script: readings.iter().copied().map(Ok).collect(),
            }
        }

        pub(crate) fn push_error(&mut self) {
            self.script.push_back(Err(FakeAdcError));
        }

        pub(crate) fn done(&self) {
            assert!(
                self.script.is_empty(),
                "not all scripted readings consumed: {:?}",
                self.script
            );
        }
    }

    impl AnalogInput for FakeInput {
        type Error = FakeAdcError;

        fn read_mv(&mut self) -> Result<i32, FakeAdcError> {
            self.script
                .pop_front()
                .expect("read_mv called more often than scripted")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeAdcError, FakeInput};
    use super::AnalogInput;

    fn read_twice<A: AnalogInput>(mut a: A) -> (Result<i32, A::Error>, Result<i32, A::Error>) {
        (a.read_mv(), a.read_mv())
    }

    #[test]
    fn mut_borrow_is_an_input_and_forwards_errors() {
        let mut input = FakeInput::new(&[1234]);
        input.push_error();
        let (a, b) = read_twice(&mut input);
        assert_eq!(a, Ok(1234));
        assert_eq!(b, Err(FakeAdcError));
        input.done();
    }
}
