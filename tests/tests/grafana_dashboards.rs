//! The Grafana dashboards of `dashboards/grafana/` against the InfluxDB schema the gateway
//! writes: every dashboard parses, uses the provisioned datasource, reads bucket `citywatch`,
//! and names only the measurements `reading` and `incident`, their tags, and metrics of the
//! wire contract (SPEC §3). A renamed metric breaks this test, not a dashboard at 3 a.m.

use std::collections::BTreeSet;
use std::path::PathBuf;

use citywatch_edge::wire::Metric;
use citywatch_tests::workspace_root;
use serde_json::Value;

const DATASOURCE_UID: &str = "citywatch-influx";
const INCIDENT_FIELDS: &[&str] = &["revision", "value"];
const TAGS: &[&str] = &["site", "device", "kind", "rule", "severity", "state"];

fn grafana() -> PathBuf {
    workspace_root().join("dashboards/grafana")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = grafana().join("dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display()));
            (p.file_name().expect("name").to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every quoted string that follows `needle` in `query` (e.g. `r._field == "gas_lel"`).
fn quoted_after<'a>(query: &'a str, needle: &str) -> Vec<&'a str> {
    query
        .match_indices(needle)
        .filter_map(|(i, _)| {
            let rest = &query[i + needle.len()..];
            let rest = rest.trim_start().strip_prefix('"')?;
            Some(&rest[..rest.find('"')?])
        })
        .collect()
}

/// Identifiers after `r.` (the columns a Flux predicate reads).
fn columns(query: &str) -> BTreeSet<&str> {
    query
        .match_indices("r.")
        .filter(|(i, _)| *i == 0 || !query.as_bytes()[i - 1].is_ascii_alphanumeric())
        .map(|(i, _)| {
            let rest = &query[i + 2..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect()
}

#[test]
fn the_five_dashboards_are_there_with_unique_uids() {
    let all = dashboards();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["fleet-health.json", "gas.json", "incident-rate.json", "siren-mounts.json", "smoke.json"]);
    let uids: BTreeSet<&str> = all.iter().map(|(_, d)| d["uid"].as_str().expect("uid")).collect();
    assert_eq!(uids.len(), all.len(), "uids must be unique");
    for (name, d) in &all {
        assert!(d["title"].as_str().is_some_and(|t| t.starts_with("Citywatch")), "{name}: title");
        assert!(d["panels"].as_array().is_some_and(|p| p.len() >= 4), "{name}: panels");
        let var = &d["templating"]["list"][0];
        assert_eq!(var["name"], "site", "{name}: the site variable");
    }
}

#[test]
fn every_query_reads_bucket_citywatch_through_the_provisioned_datasource_and_known_metrics() {
    let measurements = ["reading", "incident"];
    let mut metrics_used = BTreeSet::new();
    for (name, d) in dashboards() {
        let mut ids = BTreeSet::new();
        for panel in d["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "{name}: duplicate panel id at {title:?}");
            assert_eq!(panel["datasource"]["uid"], DATASOURCE_UID, "{name}/{title}: datasource");
            let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{name}/{title}: no targets"));
            for target in targets {
                assert_eq!(target["datasource"]["uid"], DATASOURCE_UID, "{name}/{title}: target datasource");
                let q = target["query"].as_str().unwrap_or_else(|| panic!("{name}/{title}: no Flux query"));
                assert_eq!(quoted_after(q, "from(bucket:"), ["citywatch"], "{name}/{title}: bucket");
                assert!(q.contains("range(start: v.timeRangeStart") || q.contains("range(start: -"), "{name}/{title}: a time range");
                let ms = quoted_after(q, "r._measurement ==");
                assert!(!ms.is_empty(), "{name}/{title}: no measurement filter");
                for m in &ms {
                    assert!(measurements.contains(m), "{name}/{title}: unknown measurement {m:?}");
                }
                for field in quoted_after(q, "r._field ==") {
                    if ms.contains(&"incident") {
                        assert!(INCIDENT_FIELDS.contains(&field), "{name}/{title}: incident has no field {field:?}");
                    } else {
                        assert!(Metric::parse(field).is_some(), "{name}/{title}: {field:?} is not a metric of the contract");
                        metrics_used.insert(field.to_owned());
                    }
                }
                for column in columns(q) {
                    assert!(column.starts_with('_') || TAGS.contains(&column) || column == "silent_s", "{name}/{title}: unknown column r.{column}");
                }
                for kind in quoted_after(q, "r.kind ==") {
                    assert!(citywatch_edge::wire::DeviceKind::parse(kind).is_some(), "{name}/{title}: unknown kind {kind:?}");
                }
            }
        }
    }
    // Every metric of the contract is on some dashboard.
    let all: BTreeSet<String> = Metric::ALL.iter().map(|m| m.as_str().to_owned()).collect();
    assert_eq!(metrics_used, all, "metrics without a panel: {:?}", all.difference(&metrics_used).collect::<Vec<_>>());
}

#[test]
fn provisioning_names_the_datasource_uid_and_the_dashboards_folder() {
    let ds = std::fs::read_to_string(grafana().join("provisioning/datasources/citywatch-influxdb.yaml")).expect("datasource yaml");
    assert!(ds.contains(&format!("uid: {DATASOURCE_UID}")), "{ds}");
    assert!(ds.contains("type: influxdb") && ds.contains("version: Flux") && ds.contains("defaultBucket: citywatch"), "{ds}");
    let dash = std::fs::read_to_string(grafana().join("provisioning/dashboards/citywatch.yaml")).expect("dashboards yaml");
    assert!(dash.contains("type: file") && dash.contains("path: /var/lib/grafana/dashboards/citywatch"), "{dash}");
}
