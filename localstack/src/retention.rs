//! How long the embedded backend keeps each kind of data: the same kinds and defaults as the
//! AWS deployment's variables (`archive_expiration_days`, `history_retention_days`,
//! `fleet_event_retention_days`, `alert_retention_days`, `position_retention_days`), applied
//! by a sweep of the in-memory stores once a minute. The memory budget bounds them besides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use geostream_shared::EpochMillis;
use serde::Serialize;

use crate::wiring::MemoryParts;

const DAY_MS: f64 = 86_400_000.0;

/// Days each kind is kept (fractions allowed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Archived readings, from their time.
    pub readings_days: f64,
    /// Trips, stops and minute summaries, from their end.
    pub history_days: f64,
    pub fleet_event_days: f64,
    /// Cleared alerts, from their clear (active alerts stay).
    pub alert_days: f64,
    /// Positions of vehicles gone silent, from their reading.
    pub position_days: f64,
    /// How often the stores are swept.
    pub sweep_every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            readings_days: 365.0,
            history_days: 90.0,
            fleet_event_days: 30.0,
            alert_days: 90.0,
            position_days: 90.0,
            sweep_every: Duration::from_secs(60),
        }
    }
}

impl Retention {
    /// Sets one kind from `KIND=DAYS` (the `--retention` flag); the kinds are `readings`,
    /// `history`, `fleet-events`, `alerts` and `positions`.
    pub fn set(&mut self, setting: &str) -> Result<(), String> {
        let (kind, days) = setting
            .split_once('=')
            .ok_or_else(|| format!("{setting:?}: expected KIND=DAYS, such as readings=30"))?;
        let days: f64 = days
            .trim()
            .parse()
            .ok()
            .filter(|d: &f64| d.is_finite() && *d > 0.0)
            .ok_or_else(|| {
                format!("{setting:?}: DAYS must be a number above 0, such as 30 or 0.5")
            })?;
        let field = match kind.trim() {
            "readings" => &mut self.readings_days,
            "history" => &mut self.history_days,
            "fleet-events" => &mut self.fleet_event_days,
            "alerts" => &mut self.alert_days,
            "positions" => &mut self.position_days,
            other => {
                return Err(format!(
                    "{other:?} is not a kind of data: readings, history, fleet-events, alerts or positions"
                ))
            }
        };
        *field = days;
        Ok(())
    }
}

/// What the sweeps removed so far, per kind.
#[derive(Debug, Default)]
pub struct Expired {
    readings: AtomicU64,
    history_items: AtomicU64,
    fleet_events: AtomicU64,
    alerts: AtomicU64,
    positions: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ExpiredCounts {
    pub readings: u64,
    pub history_items: u64,
    pub fleet_events: u64,
    pub alerts: u64,
    pub positions: u64,
}

impl Expired {
    pub fn counts(&self) -> ExpiredCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ExpiredCounts {
            readings: get(&self.readings),
            history_items: get(&self.history_items),
            fleet_events: get(&self.fleet_events),
            alerts: get(&self.alerts),
            positions: get(&self.positions),
        }
    }

    /// Removes from each store what is older than its kind's retention at `now`.
    pub fn sweep(&self, memory: &MemoryParts, retention: &Retention, now: EpochMillis) {
        let cut = |days: f64| now.saturating_sub((days * DAY_MS) as EpochMillis);
        let add = |counter: &AtomicU64, removed: usize| {
            counter.fetch_add(removed as u64, Ordering::Relaxed);
        };
        add(
            &self.readings,
            memory.archive.expire(cut(retention.readings_days)),
        );
        add(
            &self.history_items,
            memory.history.expire(cut(retention.history_days)),
        );
        add(
            &self.fleet_events,
            memory.fleet_events.expire(cut(retention.fleet_event_days)),
        );
        add(
            &self.alerts,
            memory.alerts.expire_cleared(cut(retention.alert_days)),
        );
        add(
            &self.positions,
            memory.positions.expire(cut(retention.position_days)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_set_by_name_and_a_mistake_is_named() {
        let mut retention = Retention::default();
        retention.set("readings=30").unwrap();
        retention.set("fleet-events=0.5").unwrap();
        assert_eq!(
            (retention.readings_days, retention.fleet_event_days),
            (30.0, 0.5)
        );
        assert!(retention
            .set("tracks=3")
            .unwrap_err()
            .contains("readings, history"));
        assert!(retention.set("alerts=0").unwrap_err().contains("above 0"));
        assert!(retention.set("alerts").unwrap_err().contains("KIND=DAYS"));
    }
}
