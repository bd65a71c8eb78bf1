//! MQTT topic names: parsing any string never panics, and a parsed topic prints back to the
//! very string it came from (so quarantine and the API show what the device sent).
#![no_main]

use citywatch_edge::wire::Topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(topic) = Topic::parse(text) else { return };
    assert_eq!(topic.to_topic_string().as_str(), text);
    assert_eq!(topic.to_string(), text);
    assert_eq!(Topic::parse(text), Ok(topic));
});
