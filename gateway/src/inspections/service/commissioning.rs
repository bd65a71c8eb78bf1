//! Commissioning: every inventory device is in the registry from its import (health
//! `never_reported`); one never heard `commissioning_grace` after its import or install date
//! (the later) opens `commissioning_overdue`, cleared when it first reports. Devices the
//! registry heard of that the inventory does not list are marked `not_in_inventory`.

use super::{with_store, Service, SIGNALS_PER_REQUEST};
use crate::incidents::{Change, Severity, Signal};
use crate::inspections::store::{Commissioning, Item};
use crate::inspections::{mask_phone, schedule, RULE_COMMISSIONING_OVERDUE};
use crate::registry::{Device, InventoryMark};

impl Service {
    /// Puts the inventory's facts on the registry's device, registering it (never reported)
    /// when the gateway has not heard of it.
    pub(super) fn sync_registry(&self, item: &Item) {
        let make = || Device::from_inventory(&item.device, &item.site, item.m.kind, (self.wall)());
        self.registry.upsert(&item.device, make, |_, d| {
            let p = d.placement_mut();
            p.location = Some(item.location.clone());
            p.lat = item.position.map(|p| p.lat);
            p.lon = item.position.map(|p| p.lon);
            p.install_date = Some(item.m.install_date.to_string());
            p.crew = Some(item.crew.clone());
            p.phone = Some(mask_phone(&item.phone));
            d.inventory = InventoryMark::Listed;
        });
    }

    /// Marks every registry device listed or missing, once an inventory exists.
    pub(super) fn mark_inventory(&self) {
        if self.entries.is_empty() {
            return;
        }
        let entries = &self.entries;
        self.registry.for_each_mut(|d| {
            d.inventory = if entries.contains_key(&*d.id) { InventoryMark::Listed } else { InventoryMark::Missing };
        });
    }

    /// Where a device new to the inventory starts counting its grace period: the later of now
    /// and its install date (local midnight).
    pub(super) fn commissioning_since(&self, item: &Item, now: i64) -> i64 {
        now.max(schedule::midnight_ms(item.m.install_date, &self.tz))
    }

    /// Opens `commissioning_overdue` for devices silent past their grace, clears it for those
    /// that reported, and forgets devices that reported.
    pub(super) async fn check_commissioning(&mut self, now: i64) {
        let grace = self.cfg.commissioning_grace.as_ms();
        let mut open = Vec::new();
        let mut clear = Vec::new();
        let mut quiet = Vec::new();
        for (device, &(since, state)) in &self.commissioning {
            match (self.registry.has_reported(device), state) {
                (Some(true), Commissioning::Overdue) => clear.push(device.clone()),
                (Some(true), _) => quiet.push((device.clone(), Commissioning::Reported)),
                (_, Commissioning::Waiting) if now >= since.saturating_add(grace) => open.push(device.clone()),
                _ => {}
            }
        }
        if !quiet.is_empty() {
            self.commit_commissioning(quiet).await;
        }
        for (devices, to) in [(clear, Commissioning::Reported), (open, Commissioning::Overdue)] {
            for chunk in devices.chunks(SIGNALS_PER_REQUEST) {
                let signals: Vec<Signal> = chunk.iter().filter_map(|d| self.commissioning_signal(d, to, now)).collect();
                if !self.send_committed(signals).await {
                    return; // not committed: the next check tries again
                }
                self.commit_commissioning(chunk.iter().map(|d| (d.clone(), to)).collect()).await;
            }
        }
    }

    fn commissioning_signal(&self, device: &str, to: Commissioning, now: i64) -> Option<Signal> {
        let item = &self.entries.get(device)?.item;
        let change = match to {
            Commissioning::Overdue => Change::Open {
                severity: Severity::Warning,
                metric: None,
                value: None,
                threshold: None,
                summary: format!(
                    "{device} ({}, {}) installed {} has never reported, {} after import or installation; crew {} ({})",
                    item.site,
                    item.location,
                    item.m.install_date,
                    humantime::format_duration(self.cfg.commissioning_grace.0),
                    item.crew,
                    mask_phone(&item.phone)
                ),
                action: None,
            },
            _ => Change::Clear { value: None, summary: format!("{device} ({}, {}) reported for the first time", item.site, item.location) },
        };
        Some(self.signal(item, RULE_COMMISSIONING_OVERDUE, now, change))
    }

    async fn commit_commissioning(&mut self, changes: Vec<(String, Commissioning)>) {
        let to_write = changes.clone();
        if let Err(e) = with_store(&self.store, move |s| s.set_commissioning(&to_write)).await {
            tracing::error!(error = %e, "could not record commissioning; it is checked again after a restart");
        }
        for (device, state) in changes {
            match state {
                Commissioning::Reported => {
                    self.commissioning.remove(&device);
                }
                _ => {
                    if let Some(c) = self.commissioning.get_mut(&device) {
                        c.1 = state;
                    }
                }
            }
        }
    }
}
