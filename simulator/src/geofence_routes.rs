//! Routes that cross geofences, with the fleet events they must make: a grid of geofences
//! (circles and squares, 3 km apart), vehicles that drive from one to a neighbour, some
//! zigzagging across the boundary on the way in (within the exit margin), stay, leave, and
//! some speeding on the open road between them.
//!
//! The ground truth comes from the route's design, not from GeoStream's evaluation: every
//! reading near a boundary is placed 10 m or more from it (radii and half-sides are 20k + 10 m,
//! readings near a geofence 20 m apart along a line through its centre), so which readings are
//! inside is known by construction, and the design keeps every stay longer than the dwell, every
//! zigzag shorter than it, every exit beyond the margin, every speeding episode longer than
//! the minimum duration and every slow stretch after it longer than the clear duration.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::fleet::{bearing_deg, destination, haversine_m, DeviceReading, EARTH_RADIUS_M};

/// The fleet rules the ground truth assumes (the `[fleet]` table to run the scenario with).
pub const SPEED_LIMIT_KMH: f64 = 90.0;
pub const OVERSPEED_MIN_DURATION_S: f64 = 10.0;
pub const OVERSPEED_CLEAR_DURATION_S: f64 = 10.0;
pub const OVERSPEED_HYSTERESIS_KMH: f64 = 5.0;
/// Each geofence's `dwell_s` and `exit_margin_m`, as the scenario writes them.
pub const DWELL_S: f64 = 10.0;
pub const EXIT_MARGIN_M: f64 = 40.0;

const SPACING_M: f64 = 3_000.0;
const INTERVAL_MS: i64 = 2_000;
/// 36 km/h: 20 m between readings.
const CRUISE_KMH: f64 = 36.0;
const STEP_M: f64 = 20.0;
/// Readings at the centre of a geofence: 30 s.
const STAY_READINGS: usize = 15;

/// What to generate.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub seed: u64,
    pub vehicles: usize,
    /// Geofences visited per vehicle.
    pub visits: usize,
    /// Geofences per side of the grid.
    pub grid: usize,
    /// South-west geofence's centre, (lat, lon).
    pub origin: (f64, f64),
    /// Event time of every vehicle's first reading.
    pub start_ts: i64,
}

/// A geofence: its id and the `PUT /v1/geofences/{id}` body.
#[derive(Debug, Clone)]
pub struct RouteGeofence {
    pub geofence_id: String,
    pub body: Value,
}

/// An event GeoStream must make, as `GET /v1/events` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpectedEvent {
    pub device_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub ts: i64,
    pub geofence_id: Option<String>,
    /// The peak speed, for overspeed events.
    pub value: Option<f64>,
}

/// The scenario: geofences to define, each vehicle's readings in time order, and the events.
#[derive(Debug, Clone)]
pub struct Routes {
    pub geofences: Vec<RouteGeofence>,
    pub readings: Vec<Vec<DeviceReading>>,
    pub truth: Vec<ExpectedEvent>,
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    center: (f64, f64),
    /// Radius of a circle, half the side of a square; 20k + 10 m.
    size_m: f64,
}

/// One vehicle's route as it is built.
struct Route {
    device_id: String,
    ts: i64,
    readings: Vec<DeviceReading>,
    truth: Vec<ExpectedEvent>,
    /// A speeding episode under way: where its start event sits in `truth`, and its peak.
    speeding: Option<(usize, f64)>,
}

impl Route {
    fn reading(&mut self, at: (f64, f64), speed_kmh: f64, heading_deg: f64) -> i64 {
        let ts = self.ts;
        self.readings.push(DeviceReading {
            device_id: self.device_id.clone(),
            ts,
            event_id: format!("{}@{ts}", self.device_id),
            lat: at.0,
            lon: at.1,
            speed_kmh,
            heading_deg,
            engine_temp_c: 90.0,
            battery_temp_c: 30.0,
            battery_soc_pct: 80.0,
            tire_pressure_psi: 34.0,
            fuel_pct: 60.0,
            temperature_c: 5.0,
            humidity_pct: 45.0,
        });
        self.ts += INTERVAL_MS;
        ts
    }

    /// Follows a reading's speed against the limit: an episode starts at the first reading
    /// above it (its start event's value the peak up to the reading that makes the minimum
    /// duration, when GeoStream makes the event) and ends at the first reading at or below
    /// the limit less the hysteresis (its value the episode's peak). The design keeps every
    /// episode longer than the minimum duration and every slow stretch after one longer than
    /// the clear duration.
    fn observe_speed(&mut self, ts: i64, speed_kmh: f64) {
        match self.speeding {
            None if speed_kmh > SPEED_LIMIT_KMH => {
                self.expect("overspeed_start", ts, None, Some(speed_kmh));
                self.speeding = Some((self.truth.len() - 1, speed_kmh));
            }
            Some((start, peak)) if speed_kmh > SPEED_LIMIT_KMH => {
                let peak = peak.max(speed_kmh);
                let confirmed_by =
                    self.truth[start].ts + (OVERSPEED_MIN_DURATION_S * 1000.0) as i64;
                if ts <= confirmed_by {
                    self.truth[start].value = Some(peak);
                }
                self.speeding = Some((start, peak));
            }
            Some((_, peak)) if speed_kmh <= SPEED_LIMIT_KMH - OVERSPEED_HYSTERESIS_KMH => {
                self.expect("overspeed_end", ts, None, Some(peak));
                self.speeding = None;
            }
            _ => {}
        }
    }

    fn expect(
        &mut self,
        kind: &'static str,
        ts: i64,
        geofence_id: Option<String>,
        value: Option<f64>,
    ) {
        self.truth.push(ExpectedEvent {
            device_id: self.device_id.clone(),
            kind,
            ts,
            geofence_id,
            value,
        });
    }
}

/// The scenario of `spec`.
pub fn routes(spec: &RouteSpec) -> Routes {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let metres_per_degree = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;
    let dlat = SPACING_M / metres_per_degree;
    let dlon = SPACING_M / (metres_per_degree * spec.origin.0.to_radians().cos());
    let id = |row: usize, column: usize| format!("zone-{row}-{column}");
    let mut cells = Vec::new();
    let mut geofences = Vec::new();
    for row in 0..spec.grid {
        for column in 0..spec.grid {
            let center = (
                spec.origin.0 + row as f64 * dlat,
                spec.origin.1 + column as f64 * dlon,
            );
            let size_m = 170.0 + 20.0 * rng.random_range(0..=11) as f64;
            let geometry = if (row + column) % 2 == 0 {
                json!({"type": "Point", "coordinates": [center.1, center.0], "radius_m": size_m})
            } else {
                let west = destination(center, 270.0, size_m).1;
                let east = destination(center, 90.0, size_m).1;
                let south = destination(center, 180.0, size_m).0;
                let north = destination(center, 0.0, size_m).0;
                json!({"type": "Polygon", "coordinates": [[
                    [west, south], [east, south], [east, north], [west, north], [west, south]
                ]]})
            };
            geofences.push(RouteGeofence {
                geofence_id: id(row, column),
                body: json!({
                    "name": format!("Zone {row}/{column}"),
                    "geometry": geometry,
                    "dwell_s": DWELL_S,
                    "exit_margin_m": EXIT_MARGIN_M,
                }),
            });
            cells.push(Cell { center, size_m });
        }
    }
    let neighbours = |(row, column): (usize, usize)| {
        let mut next = Vec::new();
        if row > 0 {
            next.push((row - 1, column));
        }
        if row + 1 < spec.grid {
            next.push((row + 1, column));
        }
        if column > 0 {
            next.push((row, column - 1));
        }
        if column + 1 < spec.grid {
            next.push((row, column + 1));
        }
        next
    };
    let mut readings = Vec::new();
    let mut truth = Vec::new();
    for vehicle in 0..spec.vehicles {
        let mut route = Route {
            device_id: format!("route-{vehicle:04}"),
            ts: spec.start_ts,
            readings: Vec::new(),
            truth: Vec::new(),
            speeding: None,
        };
        let mut at = (
            rng.random_range(0..spec.grid),
            rng.random_range(0..spec.grid),
        );
        // The first leg starts half-way to the first geofence.
        let mut from_s = SPACING_M / 2.0;
        for _ in 0..spec.visits {
            let options = neighbours(at);
            let next = options[rng.random_range(0..options.len())];
            let (x, y) = (
                cells[at.0 * spec.grid + at.1],
                cells[next.0 * spec.grid + next.1],
            );
            let zigzag = rng.random_bool(0.5);
            // The first leg's road (500 m) is too short for an episode.
            let speeding = from_s == 0.0 && rng.random_bool(0.6);
            drive(
                &mut route,
                &mut rng,
                x,
                y,
                from_s,
                (id(at.0, at.1), id(next.0, next.1)),
                zigzag,
                speeding,
            );
            at = next;
            from_s = 0.0;
        }
        // Out of the last one, eastwards along the grid, past its margin.
        let last = cells[at.0 * spec.grid + at.1];
        let mut first_out = None;
        let mut s = STEP_M;
        while s <= 1_000.0 {
            let ts = route.reading(destination(last.center, 90.0, s), CRUISE_KMH, 90.0);
            route.observe_speed(ts, CRUISE_KMH);
            if s > last.size_m && first_out.is_none() {
                first_out = Some(ts);
            }
            s += STEP_M;
        }
        if let Some(ts) = first_out {
            route.expect("geofence_exit", ts, Some(id(at.0, at.1)), None);
        }
        readings.push(route.readings);
        truth.extend(route.truth);
    }
    Routes {
        geofences,
        readings,
        truth,
    }
}

/// One leg: from `from_s` metres out of `x`'s centre towards `y`, into `y`, and a stay at
/// its centre, with the events that makes.
#[allow(clippy::too_many_arguments)]
fn drive(
    route: &mut Route,
    rng: &mut SmallRng,
    x: Cell,
    y: Cell,
    from_s: f64,
    (x_id, y_id): (String, String),
    zigzag: bool,
    speeding: bool,
) {
    let distance = haversine_m(x.center, y.center);
    let heading = bearing_deg(x.center, y.center);
    let along = |s: f64| destination(x.center, heading, s);
    // Out of x (20 m steps, so the first reading outside is 10 m past its boundary).
    let mut s = from_s;
    while s + STEP_M <= 1_000.0 {
        s += STEP_M;
        let ts = route.reading(along(s), CRUISE_KMH, heading);
        route.observe_speed(ts, CRUISE_KMH);
        if from_s == 0.0 && s - STEP_M < x.size_m && s > x.size_m {
            route.expect("geofence_exit", ts, Some(x_id.clone()), None);
        }
    }
    s = s.max(1_000.0);
    // The open road, with a speeding episode: 8-11 readings above the limit (14-20 s, at
    // most 800 m), then cruising (the approach below is 50 readings: far over the 10 s clear
    // duration before anything else).
    let road_end = distance - 1_000.0;
    let mut episode = if speeding {
        rng.random_range(8..=11)
    } else {
        0
    };
    while s < road_end {
        let speed = if episode > 0 {
            episode -= 1;
            SPEED_LIMIT_KMH + rng.random_range(20.0..40.0)
        } else {
            CRUISE_KMH
        };
        let ts = route.reading(along(s), speed, heading);
        route.observe_speed(ts, speed);
        s += speed / 3.6 * (INTERVAL_MS as f64 / 1000.0);
    }
    // Into y: readings every 20 m of the last kilometre, the zigzag at the boundary.
    let mut offset = 1_000.0;
    let mut entered = None;
    while offset >= 0.0 {
        let at = destination(x.center, heading, distance - offset);
        let speed = if offset == 0.0 { 0.0 } else { CRUISE_KMH };
        let ts = route.reading(at, speed, heading);
        route.observe_speed(ts, speed);
        if zigzag && (offset - (y.size_m + 10.0)).abs() < 1e-6 {
            // 10 m in, 10 m out, three times: 2 s inside at a time (under the dwell), 2 s
            // outside (within the margin, under the exit dwell): no event.
            for _ in 0..3 {
                route.reading(
                    destination(x.center, heading, distance - (y.size_m - 10.0)),
                    CRUISE_KMH,
                    heading,
                );
                route.reading(
                    destination(x.center, heading, distance - (y.size_m + 10.0)),
                    CRUISE_KMH,
                    heading,
                );
            }
        }
        if offset < y.size_m && entered.is_none() {
            entered = Some(ts);
        }
        offset -= STEP_M;
    }
    for _ in 0..STAY_READINGS {
        route.reading(y.center, 0.0, heading);
    }
    if let Some(ts) = entered {
        route.expect("geofence_enter", ts, Some(y_id), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RouteSpec {
        RouteSpec {
            seed: 7,
            vehicles: 20,
            visits: 4,
            grid: 4,
            origin: (48.10, 11.50),
            start_ts: 1_765_000_000_000,
        }
    }

    #[test]
    fn every_visit_enters_and_exits_and_readings_keep_clear_of_boundaries() {
        let routes = routes(&spec());
        assert_eq!(routes.geofences.len(), 16);
        for (vehicle, readings) in routes.readings.iter().enumerate() {
            let device = format!("route-{vehicle:04}");
            let events: Vec<&ExpectedEvent> = routes
                .truth
                .iter()
                .filter(|e| e.device_id == device)
                .collect();
            let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
            assert_eq!(count("geofence_enter"), 4, "{events:?}");
            assert_eq!(count("geofence_exit"), 4, "{events:?}");
            assert_eq!(count("overspeed_start"), count("overspeed_end"));
            assert!(readings
                .windows(2)
                .all(|w| w[1].ts == w[0].ts + INTERVAL_MS));
        }
        // Some vehicles speed, some do not.
        let speeding = routes
            .truth
            .iter()
            .filter(|e| e.kind == "overspeed_start")
            .count();
        assert!(speeding > 10 && speeding < 70, "{speeding}");
    }

    #[test]
    fn the_same_seed_makes_the_same_scenario() {
        let (a, b) = (routes(&spec()), routes(&spec()));
        assert_eq!(a.truth, b.truth);
        assert_eq!(a.readings.len(), b.readings.len());
    }
}
