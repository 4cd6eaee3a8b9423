//! The telemetry model shared by every function.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::EpochMillis;

/// The named numeric readings a device may send, in the order they appear in the contract.
/// Each entry is the JSON field name and the inclusive range of values that are accepted.
pub const READING_FIELDS: &[(&str, f64, f64)] = &[
    ("speed_kmh", 0.0, 400.0),
    ("heading_deg", 0.0, 360.0),
    ("engine_temp_c", -60.0, 200.0),
    ("battery_temp_c", -60.0, 150.0),
    ("battery_soc_pct", 0.0, 100.0),
    ("tire_pressure_psi", 0.0, 200.0),
    ("fuel_pct", 0.0, 100.0),
    ("temperature_c", -90.0, 100.0),
    ("humidity_pct", 0.0, 100.0),
];

/// A WGS84 coordinate in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

/// One validated telemetry reading of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Reading {
    pub device_id: String,
    /// Event time, epoch milliseconds.
    pub ts: EpochMillis,
    /// Client-supplied idempotency id, or `"{device_id}@{ts}"` when the client sent none.
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_kmh: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heading_deg: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_temp_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_temp_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_soc_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tire_pressure_psi: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity_pct: Option<f64>,
    /// Free-form numeric metrics, name -> value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl Reading {
    /// The position, when the reading carries one.
    pub fn position(&self) -> Option<GeoPoint> {
        match (self.lat, self.lon) {
            (Some(lat), Some(lon)) => Some(GeoPoint { lat, lon }),
            _ => None,
        }
    }

    /// The value of a named reading: one of [`READING_FIELDS`], or `metrics.<name>` for a
    /// free metric.
    pub fn value(&self, name: &str) -> Option<f64> {
        if let Some(metric) = name.strip_prefix("metrics.") {
            return self.metrics.get(metric).copied();
        }
        match name {
            "speed_kmh" => self.speed_kmh,
            "heading_deg" => self.heading_deg,
            "engine_temp_c" => self.engine_temp_c,
            "battery_temp_c" => self.battery_temp_c,
            "battery_soc_pct" => self.battery_soc_pct,
            "tire_pressure_psi" => self.tire_pressure_psi,
            "fuel_pct" => self.fuel_pct,
            "temperature_c" => self.temperature_c,
            "humidity_pct" => self.humidity_pct,
            "lat" => self.lat,
            "lon" => self.lon,
            _ => None,
        }
    }

    /// Sets one of the named readings of [`READING_FIELDS`]; returns false for an unknown name.
    pub fn set_value(&mut self, name: &str, value: f64) -> bool {
        let slot = match name {
            "speed_kmh" => &mut self.speed_kmh,
            "heading_deg" => &mut self.heading_deg,
            "engine_temp_c" => &mut self.engine_temp_c,
            "battery_temp_c" => &mut self.battery_temp_c,
            "battery_soc_pct" => &mut self.battery_soc_pct,
            "tire_pressure_psi" => &mut self.tire_pressure_psi,
            "fuel_pct" => &mut self.fuel_pct,
            "temperature_c" => &mut self.temperature_c,
            "humidity_pct" => &mut self.humidity_pct,
            _ => return false,
        };
        *slot = Some(value);
        true
    }

    /// The order in which readings of one device are evaluated: event time, then event id so
    /// that two readings with the same timestamp still have one fixed order.
    pub fn order_key(&self) -> (EpochMillis, &str) {
        (self.ts, self.event_id.as_str())
    }
}

/// The latest known position of one vehicle, as kept by the position store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub device_id: String,
    pub ts: EpochMillis,
    pub event_id: String,
    pub lat: f64,
    pub lon: f64,
    /// Geohash of the position at [`crate::geo::POSITION_GEOHASH_LEN`] characters.
    pub geohash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_kmh: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heading_deg: Option<f64>,
    /// When the gateway received the request that carried this reading.
    pub received_at: EpochMillis,
}

impl Position {
    pub fn point(&self) -> GeoPoint {
        GeoPoint {
            lat: self.lat,
            lon: self.lon,
        }
    }
}

/// Severity of an alert, as ThingsBoard-like platforms name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Major,
    Critical,
}

/// Whether an alert is still going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Active,
    Cleared,
}

impl std::str::FromStr for AlertState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(AlertState::Active),
            "cleared" => Ok(AlertState::Cleared),
            other => Err(format!(
                "unknown alert state {other:?}: expected active or cleared"
            )),
        }
    }
}

/// One alert: at most one is active per (device, rule); a repeat updates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `"{device_id}|{rule}|{started_at}"`: deterministic, so a replayed batch finds the same alert.
    pub alert_id: String,
    pub device_id: String,
    pub rule: String,
    pub severity: Severity,
    pub state: AlertState,
    pub acknowledged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<EpochMillis>,
    pub started_at: EpochMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at: Option<EpochMillis>,
    pub peak_value: f64,
    pub last_value: f64,
    /// How many readings breached the rule while the alert was active.
    pub count: u64,
}

impl Alert {
    pub fn make_id(device_id: &str, rule: &str, started_at: EpochMillis) -> String {
        format!("{device_id}|{rule}|{started_at}")
    }
}

/// A raise or clear of an alert, as published on the alerts bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertTransition {
    /// `"{alert_id}|raised"`, `"{alert_id}|cleared"`, or one of those with `"|retracted"`:
    /// consumers deduplicate on it.
    pub transition_id: String,
    pub kind: TransitionKind,
    /// The event time of the reading that made the transition: a raise after the rule's
    /// minimum duration comes with a later reading than the alert's `started_at`.
    #[serde(default)]
    pub at: EpochMillis,
    pub alert: Alert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransitionKind {
    Raised,
    Cleared,
    /// A raise or clear published earlier that in-order delivery would not have made: a late
    /// reading, evaluated in its place, showed it. `transition_id` is the retracted one's with
    /// `|retracted`, `alert` as it was published.
    Retracted,
}

impl AlertTransition {
    pub fn new(kind: TransitionKind, at: EpochMillis, alert: Alert) -> Self {
        let suffix = match kind {
            TransitionKind::Raised => "raised",
            TransitionKind::Cleared => "cleared",
            TransitionKind::Retracted => "retracted",
        };
        AlertTransition {
            transition_id: format!("{}|{suffix}", alert.alert_id),
            kind,
            at,
            alert,
        }
    }

    /// The retraction of this transition, made by a late reading at `at`.
    pub fn retraction(&self, at: EpochMillis) -> Self {
        AlertTransition {
            transition_id: format!("{}|retracted", self.transition_id),
            kind: TransitionKind::Retracted,
            at,
            alert: self.alert.clone(),
        }
    }
}
