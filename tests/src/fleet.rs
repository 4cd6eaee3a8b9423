//! The vehicles the radius-query tests place: fleet A's density around a metro centre, a wider
//! region, and rings just inside and outside each radius queried, for every position store.

use geostream_shared::geo::{destination, geohash_of};
use geostream_shared::model::{GeoPoint, Position};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A position as geo-update stores it.
pub fn position(device: &str, ts: i64, event_id: &str, lat: f64, lon: f64) -> Position {
    let point = GeoPoint { lat, lon };
    Position {
        device_id: device.to_string(),
        ts,
        event_id: event_id.to_string(),
        lat,
        lon,
        geohash: geohash_of(point).unwrap(),
        speed_kmh: Some(42.0),
        heading_deg: None,
        received_at: ts + 5,
    }
}

/// Fleet A's density: 10,000 vehicles in a 60 km x 60 km metro area, plus 2,000 spread over a
/// 600 km x 600 km region so that the 100 km queries reach past the metro area, and rings at
/// the queried radii.
pub fn fleet() -> Vec<Position> {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut vehicles = Vec::new();
    for i in 0..12_000 {
        let (span_km, device) = if i < 10_000 {
            (60.0, format!("metro-{i:05}"))
        } else {
            (600.0, format!("region-{i:05}"))
        };
        let lat = METRO.lat + (rng.random::<f64>() - 0.5) * span_km / 111.2;
        let lon = METRO.lon
            + (rng.random::<f64>() - 0.5) * span_km / (111.2 * METRO.lat.to_radians().cos());
        vehicles.push(position(&device, 1_000 + i, "e", lat, lon));
    }
    // Two vehicles at the same spot: ties go by device id.
    vehicles.push(position("twin-a", 5, "e", 48.2, 11.6));
    vehicles.push(position("twin-b", 5, "e", 48.2, 11.6));
    // Rings just inside and just outside each radius queried from the metro center, where a
    // store measuring on another sphere, or on rounded coordinates, would answer otherwise.
    for radius_m in RADII_M {
        for k in 0..24 {
            let bearing = f64::from(k) * 15.0;
            for (side, offset_m) in [("in", -0.5), ("out", 0.5)] {
                let point = destination(METRO, bearing, radius_m + offset_m);
                let device = format!("ring-{radius_m}-{k}-{side}");
                vehicles.push(position(&device, 7, "e", point.lat, point.lon));
            }
        }
    }
    vehicles
}

pub const METRO: GeoPoint = GeoPoint {
    lat: 48.137,
    lon: 11.575,
};
pub const RADII_M: [f64; 4] = [500.0, 2_000.0, 30_000.0, 100_000.0];
