//! Citywatch edge firmware core: what runs on a gas alarm, smoke detector or siren mount.
//!
//! Map, from the wire inwards:
//! - [`wire`]: the MQTT contract (topics, `status`, `telemetry`, `event`, `cmd`) shared with the gateway;
//! - [`drivers`]: sensors and outputs over embedded-hal 1.0 (ADC, gas, smoke, heat, tilt, corrosion, battery, valve, buzzer);
//! - [`alarm`]: local alarm decisions that need no network (valve, buzzer, latching, faults, self-test);
//! - [`buffer`]: the store-and-forward ring that holds messages while the link is down;
//! - [`device`]: the device loop — sample, decide, publish through a [`device::Transport`].
//!
//! The core is `no_std` with no heap. The `std` feature adds only the std error impls, so a
//! host (the gateway) reaches the wire contract alone; the `sim` feature (default) adds [`sim`],
//! the fleet simulator behind the `edge-sim` binary, which runs this same core over simulated physics.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]

pub mod alarm;
pub mod buffer;
pub mod device;
pub mod drivers;
pub mod wire;

#[cfg(feature = "sim")]
pub mod sim;
