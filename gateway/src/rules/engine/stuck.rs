//! `kind = "stuck"`: an analog metric exactly unchanged for a long time. This kind's state per
//! watched metric; the engine routes readings and the deadline here.

use citywatch_edge::wire::{DeviceKind, Metric};

use super::state::{State, NONE};

#[derive(Debug)]
pub(super) struct StuckMetric {
    pub(super) metric: Metric,
    pub(super) last: f64,
    /// When `last` was first seen (gateway time), or NONE.
    pub(super) since: i64,
    pub(super) stuck: bool,
}

pub(super) fn stuck_state(metrics: &[Metric], kind: DeviceKind) -> State {
    State::Stuck(
        metrics
            .iter()
            .filter(|m| kind.has_metric(**m))
            .map(|&metric| StuckMetric { metric, last: f64::NAN, since: NONE, stuck: false })
            .collect(),
    )
}
