//! `[modbus]`: the buses to poll and the devices on them. Parsing and checks only; register
//! maps are files, loaded when the poller starts (and by `check-config`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// `[modbus]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModbusConfig {
    /// `[[modbus.bus]]`: one per TCP connection or serial line. None: no polling.
    pub bus: Vec<BusConfig>,
}

/// How the gateway reaches a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Modbus TCP (a controller with Ethernet, or a TCP ↔ RS-485 gateway).
    Tcp,
    /// Modbus RTU on a serial line (RS-485).
    Rtu,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// `[[modbus.bus]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Names the bus in logs and metrics.
    pub name: String,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// TCP: `host:port` of the controller.
    pub address: Option<SocketAddr>,
    /// RTU: the serial device, e.g. `/dev/ttyUSB0`.
    pub serial: Option<PathBuf>,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Every device on the bus is read once per interval (one request at a time).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Limit of every call: connect and each read.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// A device whose controller misses this many polls in a row turns `offline`.
    #[serde(default = "default_offline_after")]
    pub offline_after_polls: u32,
    /// Reconnect delays: first, then doubling up to the max.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: Duration,
    /// `[[modbus.bus.device]]`
    #[serde(default)]
    pub device: Vec<DeviceConfig>,
}

/// `[[modbus.bus.device]]`: one Citywatch device behind a unit id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device id in Citywatch (unique across the deployment, `[A-Za-z0-9_-]{1,64}`).
    pub id: String,
    pub site: String,
    /// Modbus unit (slave) id of the controller.
    pub unit: u8,
    /// Register map file (TOML), relative to the working directory.
    pub map: PathBuf,
    /// Channel of a multi-detector controller (registers offset by channel × channel_stride).
    #[serde(default)]
    pub channel: u16,
}

fn default_transport() -> Transport {
    Transport::Tcp
}
fn default_baud() -> u32 {
    9600
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_poll_interval() -> Duration {
    Duration::secs(5)
}
fn default_timeout() -> Duration {
    Duration::secs(1)
}
fn default_offline_after() -> u32 {
    3
}
fn default_reconnect_min() -> Duration {
    Duration::secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::secs(60)
}

impl ModbusConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut ids = std::collections::HashSet::new();
        for (b, bus) in self.bus.iter().enumerate() {
            let key = |k: &str| format!("modbus.bus[{b}].{k}");
            match bus.transport {
                Transport::Tcp if bus.address.is_none() => return Err((key("address"), "a tcp bus needs address = \"host:port\"".into())),
                Transport::Rtu if bus.serial.is_none() => return Err((key("serial"), "an rtu bus needs serial = \"/dev/tty…\"".into())),
                Transport::Rtu if !cfg!(feature = "modbus-rtu") => {
                    return Err((key("transport"), "this build has no RTU support (feature modbus-rtu)".into()))
                }
                _ => {}
            }
            if !(5..=8).contains(&bus.data_bits) {
                return Err((key("data_bits"), "must be 5..=8".into()));
            }
            if !(1..=2).contains(&bus.stop_bits) {
                return Err((key("stop_bits"), "must be 1 or 2".into()));
            }
            if bus.poll_interval.0 < std::time::Duration::from_millis(100) {
                return Err((key("poll_interval"), "must be at least 100ms".into()));
            }
            if bus.timeout.0.is_zero() || bus.timeout.0 > bus.poll_interval.0 {
                return Err((key("timeout"), "must be more than 0 and at most poll_interval".into()));
            }
            if bus.offline_after_polls == 0 {
                return Err((key("offline_after_polls"), "must be at least 1".into()));
            }
            if bus.reconnect_min.0.is_zero() || bus.reconnect_max.0 < bus.reconnect_min.0 {
                return Err((key("reconnect_max"), "reconnect_min must be > 0 and reconnect_max ≥ reconnect_min".into()));
            }
            for (d, dev) in bus.device.iter().enumerate() {
                let key = |k: &str| format!("modbus.bus[{b}].device[{d}].{k}");
                if !citywatch_edge::wire::is_valid_id(&dev.id) {
                    return Err((key("id"), "must match [A-Za-z0-9_-]{1,64}".into()));
                }
                if !citywatch_edge::wire::is_valid_id(&dev.site) {
                    return Err((key("site"), "must match [A-Za-z0-9_-]{1,64}".into()));
                }
                if !ids.insert(dev.id.clone()) {
                    return Err((key("id"), format!("{:?} is configured twice", dev.id)));
                }
                if dev.unit == 0 || dev.unit > 247 {
                    return Err((key("unit"), "must be 1..=247".into()));
                }
            }
        }
        Ok(())
    }
}
