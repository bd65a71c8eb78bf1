//! Configuration value types shared by every component's config: [`Duration`] written as text
//! ("30s", "5m", "30days"). A leaf module: nothing imported from the rest of the crate.

use serde::{Deserialize, Deserializer, Serialize};

/// A duration written as text: "30s", "5m", "30days", "2years".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Duration(#[serde(serialize_with = "ser_duration")] pub std::time::Duration);

fn ser_duration<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"30s\" or \"5m\": {e}")))
    }
}

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn as_ms(self) -> i64 {
        self.0.as_millis() as i64
    }
}
