//! Gateway → device commands (`cmd`), which a board parses with no heap: decoding never
//! panics, and a decoded command survives an encode/decode round trip.
#![no_main]

use citywatch_edge::wire::{Command, MAX_PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = Command::decode(data) else { return };
    let mut buf = [0u8; MAX_PAYLOAD_LEN * 2];
    let Ok(n) = cmd.encode(&mut buf) else { return };
    let again = Command::decode(&buf[..n]).expect("what the encoder writes decodes");
    assert_eq!(again, cmd);
});
