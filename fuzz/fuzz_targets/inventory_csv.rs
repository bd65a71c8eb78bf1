//! The inspections CSV inventory import, as uploaded by a facility manager: any bytes give
//! rows or an error naming the line, never a panic. Built with `--features gateway`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = citywatch_gateway::inspections::parse_inventory(data);
});
