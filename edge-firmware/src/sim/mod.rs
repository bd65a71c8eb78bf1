//! The fleet simulator behind `edge-sim` (std only): the firmware core over simulated physics,
//! talking real MQTT through rumqttc.
//!
//! [`physics`] makes sensor readings, [`link`] owns a connection, [`fleet`] runs the devices
//! and scenarios, [`city`] plays a million quiet devices in
//! a few bytes each, [`bad`] makes malformed messages. Nothing here runs on a device.

pub mod bad;
pub mod city;
pub mod fleet;
pub mod link;
pub mod physics;

pub use fleet::{run, FleetConfig, FleetStats, Scenario};
