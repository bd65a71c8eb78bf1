use super::*;

fn encode_to_string(f: impl Fn(&mut [u8]) -> Result<usize, EncodeError>) -> std::string::String {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let n = f(&mut buf).expect("fits");
    std::string::String::from_utf8(buf[..n].to_vec()).expect("utf-8")
}

#[test]
fn topic_round_trip() {
    let t = Topic::parse("citywatch/v1/xuhui-01/gas-0042/telemetry").expect("valid");
    assert_eq!(t.site, "xuhui-01");
    assert_eq!(t.device, "gas-0042");
    assert_eq!(t.channel, Channel::Telemetry);
    assert_eq!(t.to_topic_string().as_str(), "citywatch/v1/xuhui-01/gas-0042/telemetry");
    for channel in Channel::ALL {
        let t = Topic::new("s", "d", *channel).expect("valid");
        assert_eq!(Topic::parse(t.to_topic_string().as_str()), Ok(t));
    }
}

#[test]
fn bad_topics_are_rejected() {
    let long = "x".repeat(65);
    let long_topic = format!("citywatch/v1/{long}/d/status");
    for topic in [
        "",
        "citywatch/v1",
        "citywatch/v1/s/d",
        "citywatch/v2/s/d/status",
        "citywatch/v1/s/d/status/extra",
        "citywatch/v1/s/d/nonsense",
        "citywatch/v1//d/status",
        "citywatch/v1/s/d d/status",
        "citywatch/v1/s/+/status",
        "citywatch/v1/s/#",
        "citywatch/v1/sité/d/status",
        long_topic.as_str(),
    ] {
        assert_eq!(Topic::parse(topic), Err(DecodeError::BadTopic), "{topic:?}");
    }
    assert!(Topic::parse(&format!("citywatch/v1/{}/d/status", "x".repeat(64))).is_ok());
}

#[test]
fn contract_examples_decode() {
    let s = Status::decode(br#"{"state":"online","kind":"gas_detector","fw":"0.1.0","interval_s":60}"#)
        .expect("status");
    assert_eq!(s.state, LinkState::Online);
    assert_eq!(s.kind, Some(DeviceKind::GasDetector));
    assert_eq!(s.fw.as_deref(), Some("0.1.0"));
    assert_eq!(s.interval_s, Some(60));

    let t = Telemetry::decode(
        br#"{"seq":42,"ts":1763800000123,"values":{"gas_lel":3.2,"valve_closed":0},"battery_v":3.01,"rssi_dbm":-71}"#,
    )
    .expect("telemetry");
    assert_eq!(t.seq, 42);
    assert_eq!(t.ts, Some(1_763_800_000_123));
    assert_eq!(t.values.get(Metric::GasLel), Some(3.2));
    assert_eq!(t.values.get(Metric::ValveClosed), Some(0.0));
    assert_eq!(t.battery_v, Some(3.01));
    assert_eq!(t.rssi_dbm, Some(-71.0));

    let e = Event::decode(br#"{"seq":43,"ts":1763800000999,"event":"alarm","metric":"gas_lel","value":54.0}"#)
        .expect("event");
    assert_eq!(e.event, EventKind::Alarm);
    assert_eq!(e.metric, Some(Metric::GasLel));
    assert_eq!(e.value, Some(54.0));

    let c = Command::decode(br#"{"id":"c-1","cmd":"close_valve"}"#).expect("cmd");
    assert_eq!(c.cmd, CommandKind::CloseValve);
    assert_eq!(c.arg, None);
}

#[test]
fn messages_round_trip() {
    let mut values = Values::new();
    values.set(Metric::TiltDeg, 0.125).expect("room");
    values.set(Metric::SectionLossPct, 4.5).expect("room");
    let telemetry = Telemetry { seq: u32::MAX, ts: Some(1), values, battery_v: Some(3.3), rssi_dbm: None };
    let text = encode_to_string(|b| telemetry.encode(b));
    assert_eq!(text, r#"{"seq":4294967295,"ts":1,"values":{"tilt_deg":0.125,"section_loss_pct":4.5},"battery_v":3.3}"#);
    assert_eq!(Telemetry::decode(text.as_bytes()), Ok(telemetry));

    for event in EventKind::ALL {
        let mut e = Event::new(7, None, *event);
        if *event == EventKind::CmdAck {
            e.id = Some(String::try_from("c-9").expect("short"));
        }
        let text = encode_to_string(|b| e.encode(b));
        assert_eq!(Event::decode(text.as_bytes()), Ok(e));
    }

    for kind in DeviceKind::ALL {
        let s = Status::online(*kind, "1.2.3", 30);
        let text = encode_to_string(|b| s.encode(b));
        assert_eq!(Status::decode(text.as_bytes()), Ok(s.clone()));
        let will = s.offline_of();
        let text = encode_to_string(|b| will.encode(b));
        assert_eq!(Status::decode(text.as_bytes()), Ok(will));
    }

    for cmd in CommandKind::ALL {
        let c = Command { id: String::try_from("c-abc").expect("short"), cmd: *cmd, arg: Some(5) };
        let text = encode_to_string(|b| c.encode(b));
        assert_eq!(Command::decode(text.as_bytes()), Ok(c));
    }
}

#[test]
fn malformed_payloads_are_rejected_with_a_reason() {
    let oversize = format!(r#"{{"seq":1,"values":{{}},"pad":"{}"}}"#, "x".repeat(MAX_PAYLOAD_LEN));
    let cases: &[(&[u8], DecodeError)] = &[
        (b"", DecodeError::NotJson),
        (b"hello", DecodeError::NotJson),
        (b"not json", DecodeError::NotJson),
        (b"null", DecodeError::WrongType),
        (b"{\"seq\":1,", DecodeError::NotJson),
        (b"\xff\xfe", DecodeError::NotUtf8),
        (br#"{"seq":"1","values":{}}"#, DecodeError::WrongType),
        (br#"{"seq":-1,"values":{}}"#, DecodeError::WrongType),
        (br#"{"values":{}}"#, DecodeError::WrongType),
        (br#"{"seq":1,"values":[]}"#, DecodeError::WrongType),
        (br#"{"seq":1,"values":{"gas_lel":"high"}}"#, DecodeError::WrongType),
        (br#"{"seq":1,"values":{"gas_lel":NaN}}"#, DecodeError::NonFinite),
        (br#"{"seq":1,"values":{"gas_lel":Infinity}}"#, DecodeError::NonFinite),
        (br#"{"seq":1,"values":{"gas_lel":null}}"#, DecodeError::NonFinite),
        (br#"{"seq":1,"values":{"gas_lel":1e999}}"#, DecodeError::NonFinite),
        (br#"{"seq":1,"values":{},"battery_v":1e999}"#, DecodeError::NonFinite),
        (br#"{"seq":1,"values":{"radon_bq":1}}"#, DecodeError::UnknownMetric),
        (br#"{"seq":1,"values":{"battery_v":3.1}}"#, DecodeError::UnknownMetric),
        (br#"{"seq":1,"values":{"gas_lel":1,"gas_lel":2}}"#, DecodeError::DuplicateMetric),
        (
            br#"{"seq":1,"values":{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6,"g":7,"h":8,"i":9}}"#,
            DecodeError::TooManyValues,
        ),
        (oversize.as_bytes(), DecodeError::Oversize),
    ];
    for (payload, reason) in cases {
        assert_eq!(
            Telemetry::decode(payload),
            Err(*reason),
            "{:?}",
            std::string::String::from_utf8_lossy(payload)
        );
    }

    assert_eq!(Status::decode(br#"{"state":"online","kind":"toaster"}"#), Err(DecodeError::UnknownKind));
    assert_eq!(Status::decode(br#"{"state":"asleep","kind":"gas_detector"}"#), Err(DecodeError::UnknownState));
    assert_eq!(Status::decode(br#"{"state":"online"}"#), Err(DecodeError::WrongType));
    assert!(Status::decode(br#"{"state":"offline"}"#).is_ok(), "a bare will is fine");
    let long_fw = format!(r#"{{"state":"online","kind":"gas_detector","fw":"{}"}}"#, "9".repeat(MAX_FW_LEN + 1));
    assert_eq!(Status::decode(long_fw.as_bytes()), Err(DecodeError::FieldTooLong));
    assert_eq!(Event::decode(br#"{"seq":1,"event":"explode"}"#), Err(DecodeError::UnknownEvent));
    assert_eq!(Event::decode(br#"{"seq":1,"event":"alarm","metric":"x"}"#), Err(DecodeError::UnknownMetric));
    assert_eq!(Event::decode(br#"{"seq":1,"event":"alarm","value":NaN}"#), Err(DecodeError::NonFinite));
    assert_eq!(Command::decode(br#"{"id":"c","cmd":"self_destruct"}"#), Err(DecodeError::UnknownCommand));
    assert_eq!(Uplink::decode(Channel::Cmd, b"{}"), Err(DecodeError::BadTopic));
}

#[test]
fn unknown_fields_are_ignored_for_forward_compatibility() {
    let t = Telemetry::decode(br#"{"seq":1,"values":{"temp_c":21.5},"extra":{"nested":[1,2]}}"#).expect("ok");
    assert_eq!(t.values.get(Metric::TempC), Some(21.5));
}

#[test]
fn kinds_own_their_metrics() {
    assert!(DeviceKind::GasDetector.has_metric(Metric::GasLel));
    assert!(DeviceKind::GasDetector.has_metric(Metric::BatteryV));
    assert!(!DeviceKind::GasDetector.has_metric(Metric::TiltDeg));
    assert!(DeviceKind::SirenMount.has_metric(Metric::CorrosionUm));
    assert!(!Metric::ValveClosed.is_analog());
    for metric in Metric::ALL {
        assert_eq!(Metric::parse(metric.as_str()), Some(*metric));
    }
    assert_eq!(DecodeError::ALL.len(), 14);
}

#[test]
fn values_reject_non_finite_and_overflow() {
    let mut v = Values::new();
    assert_eq!(v.set(Metric::GasLel, f64::NAN), Err(DecodeError::NonFinite));
    for (i, m) in Metric::ALL.iter().take(MAX_VALUES).enumerate() {
        v.set(*m, i as f64).expect("room");
    }
    assert_eq!(v.set(Metric::ALL[MAX_VALUES], 1.0), Err(DecodeError::TooManyValues));
    v.set(Metric::ALL[0], 9.0).expect("replace in place");
    assert_eq!(v.get(Metric::ALL[0]), Some(9.0));
}

#[test]
fn raw_control_characters_in_strings_are_not_json() {
    // From the fuzzer: a NUL inside `fw` decoded, then re-encoded to invalid JSON.
    let status = b"{\"state\":\"online\",\"kind\":\"gas_detector\",\"fw\":\"0\x00c.0\",\"interval_s\":60}";
    assert_eq!(Status::decode(status), Err(DecodeError::NotJson));
    let cmd = b"{\"id\":\"c-\x1f\",\"cmd\":\"self_test\"}";
    assert_eq!(Command::decode(cmd), Err(DecodeError::NotJson));
}

#[test]
fn escapes_in_free_text_are_refused_not_misread() {
    // From the fuzzer: `\k` inside a command id decoded as the raw text `\k`, then the encoder
    // escaped the backslash and the round trip no longer matched.
    let cmd = br#"{"id":"kkkkkikkkkkkkk\kkkNaNc-3","cmd":"silence","arg":600}"#;
    assert_eq!(Command::decode(cmd), Err(DecodeError::NotJson));
    let status = br#"{"state":"online","kind":"gas_detector","fw":"0.1\u0030","interval_s":60}"#;
    assert_eq!(Status::decode(status), Err(DecodeError::NotJson));
    // Plain text still decodes.
    assert!(Command::decode(br#"{"id":"c-42","cmd":"self_test"}"#).is_ok());
}
