//! An incident's summary in both languages of the dashboard (SPEC §5: `summary_zh`,
//! `summary_en`). The English text is the rule's own (`summary`, from the rule pack's template);
//! the Chinese one is written here from the incident's facts (rule, place, metric, value,
//! threshold, state), so a custom English template never leaks into the Chinese board.
//! Pure: no I/O, no clock.

use citywatch_edge::wire::Metric;

use crate::model::{Incident, IncidentState, Scope};

/// Fills `summary_en` (= `summary`) and `summary_zh` from the incident as it is now.
pub fn localise(inc: &mut Incident) {
    inc.summary_en.clone_from(&inc.summary);
    inc.summary_zh = summary_zh(inc);
}

/// The rule's name as Chinese duty officers say it (the dashboard's words); unknown rules
/// (a centre's own) keep their name.
pub fn rule_zh(rule: &str) -> &str {
    match rule {
        "gas_low" => "燃气浓度一级报警",
        "gas_high" => "燃气浓度二级报警",
        "gas_valve_failed" => "切断阀未关闭",
        "device_alarm" => "设备报警",
        "smoke" => "烟雾报警",
        "heat" => "温度报警",
        "fire_confirmed" => "火情确认",
        "mount_tilt" => "警报器支架倾斜",
        "mount_corrosion" => "警报器支架腐蚀",
        "mount_corrosion_rate" => "警报器支架腐蚀速率超限",
        "device_offline" => "设备离线",
        "site_offline" => "站点设备成批离线",
        "low_battery" => "电量低",
        "sensor_fault" => "传感器故障",
        "sensor_stuck" => "读数卡滞",
        "inspection_due" => "检验到期",
        "siren_test_silent" => "试鸣未响应",
        "commissioning_overdue" => "逾期未投运",
        other => other,
    }
}

fn metric_zh(m: Metric) -> (&'static str, &'static str) {
    match m.as_str() {
        "gas_lel" => ("燃气浓度", " %LEL"),
        "valve_closed" => ("切断阀", ""),
        "temp_c" => ("温度", " °C"),
        "smoke_db_m" => ("烟雾浓度", " dB/m"),
        "co_ppm" => ("一氧化碳", " ppm"),
        "tilt_deg" => ("倾斜角", "°"),
        "vibration_mg" => ("振动", " mg"),
        "corrosion_um" => ("腐蚀深度", " µm"),
        "section_loss_pct" => ("截面损失", " %"),
        "battery_v" => ("电池电压", " V"),
        "rssi_dbm" => ("信号强度", " dBm"),
        _ => ("读数", ""),
    }
}

/// At most two decimals, no trailing zeros: 55, 3.2, 0.15.
fn number(v: f64) -> String {
    let text = format!("{v:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".into() } else { text.into() }
}

/// E.g. "燃气浓度二级报警：g-1（站点 s1）燃气浓度 55 %LEL，限值 50 %LEL，已下发关阀指令".
pub fn summary_zh(inc: &Incident) -> String {
    // A site's group incident (an outage storm) is named by its group, e.g. "site_offline".
    let rule = match (inc.scope, &inc.situation) {
        (Scope::Site, Some(group)) => rule_zh(group),
        _ => rule_zh(&inc.rule),
    };
    let mut text = String::from(rule);
    if inc.state == IncidentState::Cleared {
        text.push_str("（已自行恢复）");
    }
    text.push('：');
    match inc.scope {
        Scope::Site => {
            text.push_str(&format!("站点 {}", inc.site));
            if !inc.devices.is_empty() {
                text.push_str(&format!("，涉及 {} 台设备", inc.devices.len()));
            }
        }
        Scope::Device => text.push_str(&format!("{}（站点 {}）", inc.device, inc.site)),
    }
    match (inc.metric, inc.value) {
        (Some(m), Some(v)) => {
            let (name, unit) = metric_zh(m);
            text.push_str(&format!("，{name} {}{unit}", number(v)));
            if let Some(t) = inc.threshold {
                text.push_str(&format!("，限值 {}{unit}", number(t)));
            }
        }
        (None, Some(v)) if inc.rule == "fire_confirmed" => text.push_str(&format!("，{} 个探测器报警", number(v))),
        _ => {}
    }
    if inc.history.iter().any(|h| h.action == "command" && h.note.as_deref().is_some_and(|n| n.starts_with("close_valve"))) {
        text.push_str("，已下发关阀指令");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HistoryEntry, Severity};
    use citywatch_edge::wire::DeviceKind;

    fn incident(rule: &str, state: IncidentState) -> Incident {
        Incident {
            id: "inc-1".into(),
            key: format!("s1/g-1/{rule}"),
            revision: 1,
            rule: rule.into(),
            severity: Severity::Critical,
            state,
            scope: Scope::Device,
            site: "s1".into(),
            device: "g-1".into(),
            kind: DeviceKind::GasDetector,
            metric: Some(Metric::GasLel),
            value: Some(55.0),
            threshold: Some(50.0),
            opened_at: String::new(),
            updated_at: String::new(),
            opened_ms: 0,
            updated_ms: 0,
            summary: "Combustible gas 55 %LEL at g-1 (s1), level-2 limit 50: closing the valve".into(),
            summary_zh: String::new(),
            summary_en: String::new(),
            count: 1,
            escalation: 0,
            flapping: false,
            crew: None,
            devices: Vec::new(),
            situation: None,
            rules_active: Vec::new(),
            parent: None,
            children: Vec::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn a_gas_leak_reads_in_chinese_and_english() {
        let mut inc = incident("gas_high", IncidentState::Open);
        inc.history.push(HistoryEntry {
            revision: 1,
            at: String::new(),
            at_ms: 0,
            actor: "system".into(),
            action: "command".into(),
            state: IncidentState::Open,
            note: Some("close_valve c-1".into()),
        });
        localise(&mut inc);
        assert_eq!(inc.summary_en, inc.summary);
        assert_eq!(inc.summary_zh, "燃气浓度二级报警：g-1（站点 s1），燃气浓度 55 %LEL，限值 50 %LEL，已下发关阀指令");
    }

    #[test]
    fn no_english_words_in_the_chinese_summary_of_a_known_rule() {
        for rule in ["gas_low", "device_alarm", "device_offline", "inspection_due", "sensor_stuck"] {
            let mut inc = incident(rule, IncidentState::Cleared);
            inc.value = Some(3.25);
            localise(&mut inc);
            let words: String = inc.summary_zh.replace(&inc.device, "").replace(&inc.site, "").replace("%LEL", "");
            assert!(!words.chars().any(|c| c.is_ascii_alphabetic()), "{rule}: {}", inc.summary_zh);
            assert!(inc.summary_zh.contains("已自行恢复") && inc.summary_zh.contains("3.25"), "{}", inc.summary_zh);
        }
    }

    #[test]
    fn a_site_incident_counts_its_devices() {
        let mut inc = incident("fire_confirmed", IncidentState::Open);
        inc.scope = Scope::Site;
        inc.metric = None;
        inc.value = Some(2.0);
        inc.devices = vec!["a".into(), "b".into()];
        assert_eq!(summary_zh(&inc), "火情确认：站点 s1，涉及 2 台设备，2 个探测器报警");
    }
}
