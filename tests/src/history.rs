//! A simulated working day of one vehicle, with its ground truth: parked overnight, a drive to
//! work, parked (moved across the yard once, which is no trip), two errands, the drive home,
//! parked. Parked readings come every minute with a few metres of GPS wander and speed 0; drives
//! report every 10 s, three of them with their speed, one (the second errand) with positions
//! only. Readings carry an engine temperature, a fuel level and a `load_kg` metric.

use geostream_shared::geo::destination;
use geostream_shared::model::GeoPoint;
use serde_json::{json, Value};

/// Where the vehicle sleeps.
pub const HOME: GeoPoint = GeoPoint {
    lat: 52.5200,
    lon: 13.4050,
};

/// A trip as it happened: from the last parked reading before it to its last moving one.
#[derive(Debug, Clone, PartialEq)]
pub struct TrueTrip {
    pub start_ts: i64,
    pub end_ts: i64,
    pub distance_m: f64,
}

/// A stop as it happened, where it began.
#[derive(Debug, Clone, PartialEq)]
pub struct TrueStop {
    pub start_ts: i64,
    pub end_ts: i64,
    pub at: GeoPoint,
}

pub struct Day {
    /// Telemetry items, oldest first.
    pub readings: Vec<Value>,
    pub trips: Vec<TrueTrip>,
    /// Complete stops (the one the day ends in is under way).
    pub stops: Vec<TrueStop>,
}

enum Phase {
    /// Parked until this second of the day.
    Park { until_s: i64 },
    /// Driving until this second of the day on a heading, at a speed that swings 30% either
    /// side of `kmh`.
    Drive {
        until_s: i64,
        heading: f64,
        kmh: f64,
        sends_speed: bool,
    },
}

/// The day beginning at `midnight` (epoch ms) of vehicle `device`.
pub fn day(device: &str, midnight: i64) -> Day {
    let phases = [
        Phase::Park { until_s: 7 * 3600 },
        Phase::Drive {
            until_s: 7 * 3600 + 45 * 60,
            heading: 80.0,
            kmh: 50.0,
            sends_speed: true,
        },
        Phase::Park { until_s: 12 * 3600 },
        // Across the yard: 2 minutes at about 8 km/h, some 270 m, no trip.
        Phase::Drive {
            until_s: 12 * 3600 + 120,
            heading: 0.0,
            kmh: 8.0,
            sends_speed: true,
        },
        Phase::Park {
            until_s: 12 * 3600 + 30 * 60,
        },
        Phase::Drive {
            until_s: 13 * 3600,
            heading: 10.0,
            kmh: 45.0,
            sends_speed: true,
        },
        Phase::Park {
            until_s: 13 * 3600 + 20 * 60,
        },
        Phase::Drive {
            until_s: 13 * 3600 + 50 * 60,
            heading: 190.0,
            kmh: 45.0,
            sends_speed: false,
        },
        Phase::Park { until_s: 17 * 3600 },
        Phase::Drive {
            until_s: 17 * 3600 + 45 * 60,
            heading: 260.0,
            kmh: 50.0,
            sends_speed: true,
        },
        Phase::Park { until_s: 20 * 3600 },
    ];
    let mut readings = Vec::new();
    let mut trips = Vec::new();
    let mut stops = Vec::new();
    let mut here = HOME;
    let mut t = 0;
    let mut n = 0;
    let mut stop_since = Some((0, HOME));
    let reading = |t: i64, at: GeoPoint, speed: Option<f64>, n: &mut u64| {
        let mut item = json!({
            "device_id": device, "ts": midnight + t * 1000, "event_id": format!("{device}-{n}"),
            "lat": at.lat, "lon": at.lon,
            "engine_temp_c": 20.0 + (*n % 70) as f64, "fuel_pct": 90.0 - (*n as f64) * 0.01,
        });
        if let Some(kmh) = speed {
            item["speed_kmh"] = json!(kmh);
        }
        if *n % 4 == 0 {
            item["metrics"] = json!({ "load_kg": (*n * 13 % 800) as f64 });
        }
        *n += 1;
        item
    };
    readings.push(reading(0, HOME, Some(0.0), &mut n));
    for phase in &phases {
        match *phase {
            Phase::Park { until_s } => {
                while t < until_s {
                    t += 60;
                    // Wander a few metres; the last reading of the stop is at the spot again.
                    let at = if t < until_s {
                        destination(here, (n * 47 % 360) as f64, (n % 6) as f64)
                    } else {
                        here
                    };
                    readings.push(reading(t, at, Some(0.0), &mut n));
                }
            }
            Phase::Drive {
                until_s,
                heading,
                kmh,
                sends_speed,
            } => {
                let start = t;
                let mut distance = 0.0;
                while t < until_s {
                    t += 10;
                    let speed = kmh * (1.0 + 0.3 * ((t - start) as f64 / 300.0).sin());
                    let step = speed / 3.6 * 10.0;
                    here = destination(here, heading, step);
                    distance += step;
                    readings.push(reading(t, here, sends_speed.then_some(speed), &mut n));
                }
                if distance >= 500.0 || t - start >= 300 {
                    if let Some((since, at)) = stop_since.take() {
                        stops.push(TrueStop {
                            start_ts: midnight + since * 1000,
                            end_ts: midnight + start * 1000,
                            at,
                        });
                    }
                    trips.push(TrueTrip {
                        start_ts: midnight + start * 1000,
                        end_ts: midnight + t * 1000,
                        distance_m: distance,
                    });
                    stop_since = Some((t, here));
                }
            }
        }
    }
    Day {
        readings,
        trips,
        stops,
    }
}
