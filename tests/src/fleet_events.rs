//! What the fleet-event tests share: the fleet rules the simulator's geofence routes assume,
//! and the events on both sides (the routes' ground truth, the API's answer) as comparable
//! keys.

use geostream_shared::rules::RuleSet;
use geostream_sim::geofence_routes::{self, RouteSpec, Routes};
use serde_json::Value;

/// The default rules with the `[fleet]` settings the routes' ground truth assumes.
pub fn route_rules() -> RuleSet {
    let mut rules = RuleSet::default_rules();
    rules.fleet.speed_limit_kmh = Some(geofence_routes::SPEED_LIMIT_KMH);
    rules.fleet.overspeed_min_duration_ms =
        (geofence_routes::OVERSPEED_MIN_DURATION_S * 1000.0) as i64;
    rules.fleet.overspeed_clear_duration_ms =
        (geofence_routes::OVERSPEED_CLEAR_DURATION_S * 1000.0) as i64;
    rules.fleet.overspeed_hysteresis_kmh = geofence_routes::OVERSPEED_HYSTERESIS_KMH;
    rules
}

fn key(device: &str, kind: &str, ts: i64, geofence: Option<&str>, value: Option<f64>) -> String {
    format!(
        "{device} {kind} {ts} {} {}",
        geofence.unwrap_or("-"),
        value.map_or("-".to_string(), |v| format!("{v:.3}"))
    )
}

/// The routes' ground truth, sorted.
pub fn truth_keys(routes: &Routes) -> Vec<String> {
    let mut keys: Vec<String> = routes
        .truth
        .iter()
        .map(|e| {
            key(
                &e.device_id,
                e.kind,
                e.ts,
                e.geofence_id.as_deref(),
                e.value,
            )
        })
        .collect();
    keys.sort();
    keys
}

/// An event as `GET /v1/events` lists it; `None` for `device_offline` and `device_online`,
/// which the routes' truth leaves out (their readings are minutes old when posted).
pub fn event_key(event: &Value) -> Option<String> {
    let kind = event["type"].as_str().unwrap_or_default();
    (!kind.starts_with("device_")).then(|| {
        key(
            event["device_id"].as_str().unwrap_or_default(),
            kind,
            event["ts"].as_i64().unwrap_or_default(),
            event["geofence_id"].as_str(),
            event["value"].as_f64(),
        )
    })
}

/// The routes of `seed` (`vehicles` vehicles visiting `visits` geofences each on a `grid` x
/// `grid` grid in Munich), timed so that every reading is in the past, the newest 5 s ago;
/// and the most readings one vehicle has.
pub fn routes_ending_now(
    seed: u64,
    vehicles: usize,
    visits: usize,
    grid: usize,
) -> (Routes, usize) {
    let mut spec = RouteSpec {
        seed,
        vehicles,
        visits,
        grid,
        origin: (48.10, 11.50),
        start_ts: 0,
    };
    let longest = geofence_routes::routes(&spec)
        .readings
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    spec.start_ts = geostream_shared::now_millis() - 5_000 - longest as i64 * 2_000;
    (geofence_routes::routes(&spec), longest)
}
