//! The gateway's decode stage with the default rule pack, fed a sequence of MQTT messages
//! from a few devices of two sites: registration, site checks, `seq` de-duplication, quarantine
//! and the rule engine see any bytes and never panic. Every message ends in exactly one place:
//! readings, an event, a status, a duplicate, or quarantine.
//!
//! Input: chunks of `[head, len, payload × len]`. `head` bits 0-1: channel (status, telemetry,
//! event, cmd); 2-3: device; 4: site; 5-6: how far the clock moves; 7: the payload's first half
//! is the topic itself (bad topics).
#![no_main]

use std::sync::{Arc, OnceLock};

use citywatch_gateway::config::IngestConfig;
use citywatch_gateway::decode::{Batch, DecodeStage};
use citywatch_gateway::ingest::{Inbound, Origin};
use citywatch_gateway::metrics::Metrics;
use citywatch_gateway::registry::Registry;
use citywatch_gateway::rules::{Engine, RuleSet};
use libfuzzer_sys::fuzz_target;

const CHANNELS: [&str; 4] = ["status", "telemetry", "event", "cmd"];
const DEVICES: [&str; 4] = ["gas-1", "smoke-1", "siren-1", "gas-2"];
const SITES: [&str; 2] = ["xuhui", "pudong"];

fuzz_target!(|data: &[u8]| {
    let incidents = citywatch_gateway::decode::Unwired;
    let (_releases_tx, releases) = tokio::sync::mpsc::channel(1);
    // Parsing the pack is the slow part; it is the same for every input.
    static PACK: OnceLock<Arc<RuleSet>> = OnceLock::new();
    let engine = Engine::new(Arc::clone(PACK.get_or_init(|| Arc::new(RuleSet::default_pack()))));
    let mut stage = DecodeStage::new(Arc::new(Registry::new()), Arc::new(Metrics::new()), IngestConfig::default())
        .with_rules(engine, incidents, releases, &[]);
    let mut now: i64 = 1_800_000_000_000;
    let mut rest = data;
    let mut batch = Batch::default();
    while let [head, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        now += [0, 1_000, 60_000, 86_400_000][usize::from(head >> 5 & 3)];
        let (topic, payload) = if head & 0x80 != 0 {
            let (t, p) = payload.split_at(payload.len() / 2);
            (String::from_utf8_lossy(t).into_owned(), p)
        } else {
            let site = SITES[usize::from(head >> 4 & 1)];
            let device = DEVICES[usize::from(head >> 2 & 3)];
            (format!("citywatch/v1/{site}/{device}/{}", CHANNELS[usize::from(head & 3)]), payload)
        };
        let message = Inbound { topic, payload: bytes::Bytes::copy_from_slice(payload), received_ms: now, ack: None, origin: Origin::Live };
        stage.handle(message, now, &mut batch);
        if batch.readings.len() > 10_000 {
            batch = Batch::default();
        }
    }
});
