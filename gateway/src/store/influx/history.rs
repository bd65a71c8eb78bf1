//! Reading a device's readings back from the long-term store: VictoriaMetrics' export API
//! (`GET /api/v1/export`), which returns the raw samples the sink wrote (the `reading`
//! measurement's field `{metric}` becomes the series `reading_{metric}`, its tags labels).
//! Used in cluster mode, where a partition's new owner has in its own store only what it took
//! in since its takeover (see `api::city`). Only VictoriaMetrics: InfluxDB 2 and 3 answer other
//! query languages (Flux, SQL/InfluxQL), and nothing here speaks them.
//!
//! Not here: writing (the sink), and how its answer is merged with the owner's.

use std::time::Duration;

use crate::http_client;

/// Most samples one export may return: a readings query asks for at most
/// `api::MAX_POINTS` buckets, but the raw samples of a long range can be many more.
const MAX_SAMPLES: usize = 2_000_000;

/// A VictoriaMetrics to read readings history from.
#[derive(Debug, Clone)]
pub struct History {
    client: reqwest::Client,
    export: reqwest::Url,
}

impl History {
    /// `base` is the server's base URL (as `[storage.influx] history_url`); each export is
    /// bounded by `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<History, String> {
        let base = reqwest::Url::parse(base).map_err(|e| format!("history_url {base:?}: {e}"))?;
        let export = base.join("api/v1/export").map_err(|e| format!("history_url {base}: {e}"))?;
        let client = http_client::build(&export, timeout, None).map_err(|e| format!("history client: {e}"))?;
        Ok(History { client, export })
    }

    /// Every sample of `device`'s `metric` (wire name) stored in `[from_ms, to_ms)`, as
    /// (ts ms, value), oldest first. Samples of several series (the device's site or kind tag
    /// changed) are all returned; one timestamp once.
    pub async fn readings(&self, device: &str, metric: &str, from_ms: i64, to_ms: i64) -> Result<Vec<(i64, f64)>, String> {
        let selector = format!("reading_{metric}{{device=\"{}\"}}", device.replace('\\', "\\\\").replace('"', "\\\""));
        let seconds = |ms: i64| format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000));
        let mut url = self.export.clone();
        url.query_pairs_mut().append_pair("match[]", &selector).append_pair("start", &seconds(from_ms)).append_pair("end", &seconds(to_ms - 1));
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("long-term store: {}", http_client::error_chain(&e)))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("long-term store: reading the answer: {}", http_client::error_chain(&e)))?;
        if !status.is_success() {
            return Err(format!("long-term store answered {status}: {}", text.chars().take(200).collect::<String>()));
        }
        let mut samples = parse_export(&text)?;
        samples.retain(|(ts, _)| (from_ms..to_ms).contains(ts));
        samples.sort_by_key(|(ts, _)| *ts);
        samples.dedup_by_key(|(ts, _)| *ts);
        Ok(samples)
    }
}

/// The samples of an export answer: one JSON object per line, `values` and `timestamps` (ms).
fn parse_export(text: &str) -> Result<Vec<(i64, f64)>, String> {
    #[derive(serde::Deserialize)]
    struct Series {
        values: Vec<Option<f64>>,
        timestamps: Vec<i64>,
    }
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let series: Series = serde_json::from_str(line).map_err(|e| format!("long-term store: an export line is not a series: {e}"))?;
        out.extend(series.timestamps.into_iter().zip(series.values).filter_map(|(ts, v)| v.map(|v| (ts, v))));
        if out.len() > MAX_SAMPLES {
            return Err(format!("long-term store: more than {MAX_SAMPLES} samples in the range; ask for a shorter one"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_answer_is_read_into_samples() {
        let text = concat!(
            r#"{"metric":{"__name__":"reading_gas_lel","device":"d1","site":"s"},"values":[1.5,2.5],"timestamps":[1000,2000]}"#,
            "\n",
            r#"{"metric":{"__name__":"reading_gas_lel","device":"d1","site":"t"},"values":[3.5],"timestamps":[3000]}"#,
            "\n\n"
        );
        assert_eq!(parse_export(text).expect("valid"), vec![(1000, 1.5), (2000, 2.5), (3000, 3.5)]);
        assert_eq!(parse_export("").expect("nothing"), Vec::new());
        assert!(parse_export("{not json").unwrap_err().contains("not a series"));
    }
}
