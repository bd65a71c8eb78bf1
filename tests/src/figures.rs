//! Figures for the `bench-*` binaries: percentiles of latency samples, counters read from a
//! gateway's `/metrics`, and the partition owners `citywatch cluster status` reports. Measures
//! only: nothing here passes or fails on time, and nothing here starts a server.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::citywatch_bin;

/// p50/p90/p99/max/mean of a set of samples (nearest-rank percentiles), in the samples' unit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// All zeros for no samples.
    pub fn of(samples: &[f64]) -> Percentiles {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return Percentiles::default();
        }
        let rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Percentiles {
            count: sorted.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }

    /// Printed rows, `unit` after each figure.
    pub fn rows(&self, unit: &str) -> String {
        format!(
            "  samples     {:>10}\n  p50         {:>10.3} {unit}\n  p90         {:>10.3} {unit}\n  p99         {:>10.3} {unit}\n  max         {:>10.3} {unit}\n  mean        {:>10.3} {unit}",
            self.count, self.p50, self.p90, self.p99, self.max, self.mean
        )
    }

    /// `{"count", "p50", …}` rounded to microseconds when the unit is ms.
    pub fn json(&self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({"count": self.count, "p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99), "max": r(self.max), "mean": r(self.mean)})
    }
}

/// The sum over every label set of the sample `name` in Prometheus or OpenMetrics text
/// (`name` as it appears on the sample line, e.g. `citywatch_readings_total`).
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The value of one exact series (`name{label="v"}`), 0 when absent.
pub fn metric_series(metrics: &str, series: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// `citywatch cluster status --config F` as JSON.
pub fn cluster_status(config: &Path) -> anyhow::Result<Value> {
    let out = Command::new(citywatch_bin()).args(["cluster", "status", "--config"]).arg(config).output().context("running citywatch cluster status")?;
    anyhow::ensure!(out.status.success(), "cluster status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("cluster status printed no JSON")
}

/// The owner of every partition in a status (empty string for a partition nobody holds).
pub fn partition_owners(status: &Value) -> Vec<String> {
    status["partitions"].as_array().map(|ps| ps.iter().map(|p| p["owner"].as_str().unwrap_or("").to_owned()).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&samples);
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max, p.mean), (100, 50.0, 90.0, 99.0, 100.0, 50.5));
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }

    #[test]
    fn metrics_are_summed_over_label_sets_and_read_by_series() {
        let text = "# TYPE x counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\nx_totalish 9\n# EOF\n";
        assert_eq!(metric_sum(text, "x_total"), 5.5);
        assert_eq!(metric_series(text, "x_total{a=\"2\"}"), 3.5);
        assert_eq!(metric_series(text, "y"), 0.0);
    }
}
