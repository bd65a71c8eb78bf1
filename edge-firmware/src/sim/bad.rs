//! Deliberately malformed messages: ammunition for the gateway's input hardening.
//!
//! Each call yields the next kind in a fixed rotation, labelled with the reason the gateway
//! should count it under (the labels of [`crate::wire::DecodeError::reason`]). These bypass
//! the firmware core: no real firmware would send them, a broken or hostile one might.

use rumqttc::QoS;

use super::fleet::Queued;
use crate::wire::{DecodeError, MAX_PAYLOAD_LEN};

/// The rotation of bad messages of one device.
#[derive(Debug)]
pub struct BadPayloads {
    site: String,
    device: String,
    next: usize,
}

/// Reasons in rotation order.
pub const ROTATION: [DecodeError; 8] = [
    DecodeError::NotJson,
    DecodeError::NonFinite,
    DecodeError::WrongType,
    DecodeError::Oversize,
    DecodeError::UnknownKind,
    DecodeError::UnknownMetric,
    DecodeError::BadTopic,
    DecodeError::BadTopic,
];

impl BadPayloads {
    pub fn new(site: &str, device: &str) -> Self {
        BadPayloads { site: site.to_owned(), device: device.to_owned(), next: 0 }
    }

    /// The next bad message and the reason the gateway should give for it.
    pub(super) fn next_message(&mut self) -> (&'static str, Queued) {
        let slot = self.next % ROTATION.len();
        self.next += 1;
        let (site, device) = (&self.site, &self.device);
        let base = format!("citywatch/v1/{site}/{device}");
        let (topic, payload): (String, Vec<u8>) = match slot {
            0 => (format!("{base}/telemetry"), b"gas 3.2 %LEL, valve open".to_vec()),
            1 => (format!("{base}/telemetry"), br#"{"seq":0,"values":{"gas_lel":NaN}}"#.to_vec()),
            2 => (format!("{base}/telemetry"), br#"{"seq":"seven","values":{"gas_lel":"high"}}"#.to_vec()),
            3 => {
                let pad = "x".repeat(MAX_PAYLOAD_LEN * 2);
                (format!("{base}/telemetry"), format!(r#"{{"seq":0,"values":{{}},"pad":"{pad}"}}"#).into_bytes())
            }
            // On the status topic but not retained, so the device's real status stands.
            4 => (
                format!("{base}/status"),
                br#"{"state":"online","kind":"toaster","fw":"0.1.0","interval_s":60}"#.to_vec(),
            ),
            5 => (format!("{base}/telemetry"), br#"{"seq":0,"values":{"radon_bq":3.0}}"#.to_vec()),
            6 => (format!("citywatch/v1/{site}.annex/{device}/telemetry"), br#"{"seq":0,"values":{}}"#.to_vec()),
            _ => (format!("{base}/firmware"), br#"{"seq":0,"values":{}}"#.to_vec()),
        };
        let reason = ROTATION[slot].reason();
        (reason, Queued { topic, payload, qos: QoS::AtLeastOnce, retain: false, channel: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Topic, Uplink};

    #[test]
    fn every_bad_message_earns_the_reason_it_is_labelled_with() {
        let mut bad = BadPayloads::new("s1", "s1-gas-00000");
        for _ in 0..ROTATION.len() {
            let (reason, m) = bad.next_message();
            let got = Topic::parse(&m.topic).and_then(|t| Uplink::decode(t.channel, &m.payload));
            assert_eq!(got.err().map(|e| e.reason()), Some(reason), "{}", m.topic);
        }
    }
}
