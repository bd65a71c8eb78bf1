//! Alert rules: the rule pack (SPEC §4) with its per-kind, per-site and per-device overrides
//! ([`RuleSet`]), and the [`Engine`] turning readings, events, link states and time into
//! [`Signal`](crate::model::Signal)s. No incidents, no I/O past loading a pack file: what a
//! signal becomes (de-duplication, flapping, silences, escalation) is the incident manager's.
//!
//! `config/` reads and checks the pack (one parser per kind), `engine/` runs it (one evaluator
//! per kind); this module compiles the pack with its overrides into the lists the engine runs.

mod config;
mod engine;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use citywatch_edge::wire::DeviceKind;

pub use config::{
    Absence, Compare, Composite, Condition, EventRule, Expect, FollowUp, InvalidRule, Level, Override, Per, Rate,
    GroupDef, ParentDef, RuleDef, RuleSpec, RulesConfig, SituationDef, Stuck, Threshold, Trend,
};
pub use crate::model::DeviceCtx;
pub use engine::{Engine, EngineStats, SignalCounts};

use config::{PackError, Tier};
use engine::Effective;

/// The built-in pack.
const DEFAULT_PACK: &str = include_str!("../../rules/default.toml");

/// Why rules do not load. Every message names the rule or the override, and the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rules.pack: cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("rules.pack {origin}: {reason}")]
    Pack { origin: String, reason: String },
    /// E.g. `rule gas_low: open.for: "10x" is not a duration …`.
    #[error(transparent)]
    Rule(#[from] InvalidRule),
    /// E.g. `rules.override[2].rule: no rule named "gas_lo"`.
    #[error("rules.override[{index}]{key}: {reason}")]
    Override { index: usize, key: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The rules in force: the pack plus the overrides, compiled once. Shared by the engine and the
/// API; the lists per (kind, site) are built at load, so devices share them instead of holding
/// copies, and nothing is merged per reading.
#[derive(Debug)]
pub struct RuleSet {
    pack: Vec<RuleDef>,
    /// The pack's rules as written, which overrides merge into.
    tables: Vec<toml::Table>,
    overrides: Vec<Override>,
    /// Per device kind, for sites no override names.
    anywhere: [Arc<Effective>; 3],
    /// Per device kind, for each site an override names.
    by_site: HashMap<String, [Arc<Effective>; 3]>,
    /// Devices with device-scoped overrides: theirs are built when the engine first meets them.
    device_overrides: HashSet<String>,
    /// The pack's `[[situation]]` tables; empty when `[rules] situations = false`.
    situations: Vec<SituationDef>,
    /// The pack's `[[parent]]` tables; empty when `[rules] parents = false` or `situations = false`.
    parents: Vec<ParentDef>,
    /// The pack's `[[group]]` tables; empty when `[rules] groups = false` or `situations = false`.
    groups: Vec<GroupDef>,
}

impl RuleSet {
    /// The built-in pack, no overrides.
    pub fn default_pack() -> RuleSet {
        // Invariant: the built-in pack is valid; `tests::default_pack_loads_and_validates`
        // proves it on every build.
        #[allow(clippy::expect_used)]
        RuleSet::from_config(&RulesConfig::default()).expect("the built-in rule pack is valid")
    }

    /// Loads the pack (`cfg.pack` or the built-in one), checks every rule and override, and
    /// compiles the lists per device kind and overridden site.
    pub fn from_config(cfg: &RulesConfig) -> Result<RuleSet> {
        let mut set = RuleSet::load(cfg)?;
        // `situations = false` is the behaviour from before situations: one incident per
        // device × rule, nothing merged, linked or grouped.
        if cfg.situations == Some(false) {
            set.situations.clear();
            set.parents.clear();
            set.groups.clear();
        }
        if cfg.parents == Some(false) {
            set.parents.clear();
        }
        if cfg.groups == Some(false) {
            set.groups.clear();
        }
        Ok(set)
    }

    fn load(cfg: &RulesConfig) -> Result<RuleSet> {
        match &cfg.pack {
            None => RuleSet::build(DEFAULT_PACK, "(built-in)", &cfg.overrides),
            Some(path) => {
                let origin = path.display().to_string();
                let text =
                    std::fs::read_to_string(path).map_err(|source| Error::Read { path: origin.clone(), source })?;
                RuleSet::build(&text, &origin, &cfg.overrides)
            }
        }
    }

    /// A pack given as TOML text (`[[rule]]` tables), with overrides.
    pub fn from_pack_str(pack: &str, overrides: &[Override]) -> Result<RuleSet> {
        RuleSet::build(pack, "(text)", overrides)
    }

    fn build(text: &str, origin: &str, overrides: &[Override]) -> Result<RuleSet> {
        let rules = config::parse_pack(text).map_err(|e| match e {
            PackError::Syntax(reason) => Error::Pack { origin: origin.to_owned(), reason },
            PackError::Rule(e) => Error::Rule(e),
        })?;
        let config::Pack { rules, situations, parents, groups } = rules;
        let (pack, tables) = rules.into_iter().unzip();
        let mut set = RuleSet {
            pack,
            tables,
            overrides: overrides.to_vec(),
            anywhere: [DeviceKind::GasDetector, DeviceKind::SmokeDetector, DeviceKind::SirenMount]
                .map(|kind| Arc::new(Effective::build(kind, Vec::new()))),
            by_site: HashMap::new(),
            device_overrides: overrides.iter().filter_map(|o| o.device.clone()).collect(),
            situations,
            parents,
            groups,
        };
        set.check_overrides()?;
        let kinds = |site: Option<&str>| -> Result<[Arc<Effective>; 3]> {
            let build = |kind: DeviceKind| -> Result<Arc<Effective>> {
                Ok(Arc::new(Effective::build(kind, set.merged(kind, site, None)?)))
            };
            Ok([build(DeviceKind::ALL[0])?, build(DeviceKind::ALL[1])?, build(DeviceKind::ALL[2])?])
        };
        let anywhere = kinds(None)?;
        let sites: HashSet<&str> = set.overrides.iter().filter_map(|o| o.site.as_deref()).collect();
        let by_site = sites.into_iter().map(|site| Ok((site.to_owned(), kinds(Some(site))?))).collect::<Result<_>>()?;
        // Each overridden device's overrides, on top of every kind's: catches most combinations
        // that only fail together. (Those with a site's overrides too are checked when the
        // engine builds the device's list; there a failure is logged and the device's own
        // overrides are skipped.)
        for device in &set.device_overrides {
            for kind in DeviceKind::ALL {
                set.merged(*kind, None, Some(device))?;
            }
        }
        set.anywhere = anywhere;
        set.by_site = by_site;
        Ok(set)
    }

    /// The pack as loaded, before overrides.
    pub fn rules(&self) -> &[RuleDef] {
        &self.pack
    }

    /// The situations the incident book merges member rules into (empty: one incident per rule).
    pub fn situations(&self) -> &[SituationDef] {
        &self.situations
    }

    /// The parents the incident book links device incidents under (empty: none).
    pub fn parents(&self) -> &[ParentDef] {
        &self.parents
    }

    /// The groups the incident book makes site incidents of (empty: one incident per device).
    pub fn groups(&self) -> &[GroupDef] {
        &self.groups
    }

    /// The configured overrides.
    pub fn overrides(&self) -> &[Override] {
        &self.overrides
    }

    /// The enabled rules that apply to one device, after its overrides (`GET /api/v1/rules?device=`).
    pub fn effective(&self, kind: DeviceKind, site: &str, device: &str) -> Vec<RuleDef> {
        self.effective_for(kind, site, device).rules.iter().map(|r| r.def.clone()).collect()
    }

    /// The compiled list for one device: shared per (kind, site) unless the device has its own
    /// overrides.
    pub(crate) fn effective_for(&self, kind: DeviceKind, site: &str, device: &str) -> Arc<Effective> {
        let base = self.by_site.get(site).unwrap_or(&self.anywhere)[kind as usize].clone();
        if !self.device_overrides.contains(device) {
            return base;
        }
        match self.merged(kind, Some(site), Some(device)) {
            Ok(defs) => Arc::new(Effective::build(kind, defs)),
            Err(error) => {
                tracing::warn!(%device, %site, %error, "device's rule overrides skipped: invalid in combination");
                base
            }
        }
    }

    /// Checks each override alone against the pack.
    fn check_overrides(&self) -> Result<()> {
        for (index, o) in self.overrides.iter().enumerate() {
            let err = |key: &str, reason: String| Error::Override {
                index,
                key: if key.is_empty() { String::new() } else { format!(".{key}") },
                reason,
            };
            let Some(at) = self.pack.iter().position(|r| r.name == o.rule) else {
                return Err(err("rule", format!("no rule named {:?}", o.rule)));
            };
            o.check_scope().map_err(|(key, reason)| err(key, reason))?;
            let mut table = self.tables[at].clone();
            o.apply(&mut table);
            let def = RuleDef::try_from(table).map_err(|e| err("", e.to_string()))?;
            let defs = self.pack.iter().enumerate().map(|(k, d)| if k == at { &def } else { d });
            config::check_pack(defs).map_err(|e| err("", e.to_string()))?;
        }
        Ok(())
    }

    /// The pack with the overrides that match, applied in precedence order, parsed and checked.
    fn merged(&self, kind: DeviceKind, site: Option<&str>, device: Option<&str>) -> Result<Vec<RuleDef>> {
        let mut tables: Vec<Option<(toml::Table, usize)>> = vec![None; self.pack.len()];
        for tier in [Tier::Everywhere, Tier::Kind, Tier::Site, Tier::Device] {
            for (index, o) in self.overrides.iter().enumerate() {
                if o.tier() != tier || !o.matches(kind, site, device) {
                    continue;
                }
                let Some(at) = self.pack.iter().position(|r| r.name == o.rule) else { continue };
                let slot = tables[at].get_or_insert_with(|| (self.tables[at].clone(), index));
                o.apply(&mut slot.0);
                slot.1 = index;
            }
        }
        let defs = tables
            .into_iter()
            .zip(&self.pack)
            .map(|(merged, def)| match merged {
                None => Ok(def.clone()),
                Some((table, index)) => RuleDef::try_from(table).map_err(|e| Error::Override {
                    index,
                    key: String::new(),
                    reason: e.to_string(),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        config::check_pack(defs.iter()).map_err(|e| Error::Override {
            index: self.overrides.len().saturating_sub(1),
            key: String::new(),
            reason: format!(
                "the overrides for {kind} devices{} leave {e}",
                site.map(|s| format!(" at {s}")).unwrap_or_default()
            ),
        })?;
        Ok(defs)
    }
}

/// The decode stage runs the engine inline on every accepted message (constant work per
/// reading); it knows the engine only through [`crate::decode::Evaluator`].
impl crate::decode::Evaluator for Engine {
    fn track(&mut self, dev: &DeviceCtx, last_seen_ms: i64) {
        Engine::track(self, dev, last_seen_ms)
    }
    fn restore_active(&mut self, dev: &DeviceCtx, rule: &str) {
        Engine::restore_active(self, dev, rule)
    }
    fn release(&mut self, r: &crate::model::Release) {
        Engine::release(self, r.scope, &r.site, &r.device, &r.rule)
    }
    fn on_status(&mut self, dev: &DeviceCtx, state: citywatch_edge::wire::LinkState, now_ms: i64, out: &mut Vec<crate::model::Signal>) {
        Engine::on_status(self, dev, state, now_ms, out)
    }
    fn on_reading(&mut self, dev: &DeviceCtx, metric: citywatch_edge::wire::Metric, value: f64, ts_ms: i64, now_ms: i64, out: &mut Vec<crate::model::Signal>) {
        Engine::on_reading(self, dev, metric, value, ts_ms, now_ms, out)
    }
    fn on_event(
        &mut self,
        dev: &DeviceCtx,
        event: citywatch_edge::wire::EventKind,
        metric: Option<citywatch_edge::wire::Metric>,
        value: Option<f64>,
        ts_ms: i64,
        now_ms: i64,
        out: &mut Vec<crate::model::Signal>,
    ) {
        Engine::on_event(self, dev, event, metric, value, ts_ms, now_ms, out)
    }
    fn on_seen(&mut self, dev: &DeviceCtx, now_ms: i64, out: &mut Vec<crate::model::Signal>) {
        Engine::on_seen(self, dev, now_ms, out)
    }
    fn tick(&mut self, now_ms: i64, out: &mut Vec<crate::model::Signal>) {
        Engine::tick(self, now_ms, out)
    }
}
