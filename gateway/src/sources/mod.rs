//! Where messages come from: the embedded MQTT broker ([`broker`]) or an external one
//! ([`mqtt`]), and Modbus controllers polled by the gateway ([`modbus`]). All deliver [`Inbound`](crate::ingest::Inbound) messages into one bounded
//! channel, so a slow pipeline pushes back on the broker instead of growing memory.

pub mod broker;
pub mod config;
pub mod door;
pub mod modbus;
pub mod mqtt;

/// Errors starting or running a source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("embedded broker: {0}")]
    Broker(String),
    #[error("external broker: {0}")]
    External(String),
    #[error("invalid MQTT settings: {0}")]
    Config(String),
    #[error("modbus: {0}")]
    Modbus(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
