//! Device → gateway payloads (`status`, `telemetry`, `event`): the first byte picks the
//! channel, the rest is the payload. Decoding never panics, and whatever decodes re-encodes
//! to bytes that decode to the same message (so the gateway and a board agree on it).
#![no_main]

use citywatch_edge::wire::{Channel, Uplink, MAX_PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else { return };
    let channel = [Channel::Status, Channel::Telemetry, Channel::Event][usize::from(pick) % 3];
    let Ok(uplink) = Uplink::decode(channel, payload) else { return };
    assert_eq!(uplink.channel(), channel);
    let mut buf = [0u8; MAX_PAYLOAD_LEN * 2];
    // Encoding may refuse (e.g. a value that prints longer than it parsed); it must not panic.
    let Ok(n) = uplink.encode(&mut buf) else { return };
    let again = Uplink::decode(channel, &buf[..n]).expect("what the encoder writes decodes");
    assert_eq!(again, uplink, "round trip of {:?}", String::from_utf8_lossy(payload));
});
