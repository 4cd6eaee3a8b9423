//! Geo index math: the cell scheme (geohash, from the `geohash` crate), covering a circle by
//! cells, haversine distance, and the hot-spot-safe index key.
//!
//! Geohash cells nest exactly: every position's geohash starts with the geohash of each cell
//! that contains it, so "positions in a cell" is a prefix (range) scan in any ordered store,
//! and a covering of a circle is a short list of prefixes.

use crate::model::GeoPoint;

/// Mean Earth radius (IUGG), metres.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
/// Geohash length kept with every position: cells of about 4.8 m x 4.8 m.
pub const POSITION_GEOHASH_LEN: usize = 9;
/// A covering holds at most this many cells; it picks the finest length that fits.
pub const MAX_COVER_CELLS: usize = 64;
/// The largest radius a query may ask for.
pub const MAX_QUERY_RADIUS_M: f64 = 100_000.0;

/// Great-circle distance in metres.
pub fn haversine_m(a: GeoPoint, b: GeoPoint) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// The geohash of a position at [`POSITION_GEOHASH_LEN`]; `None` outside WGS84 ranges.
pub fn geohash_of(point: GeoPoint) -> Option<String> {
    geohash::encode(
        geohash::Coord {
            x: point.lon,
            y: point.lat,
        },
        POSITION_GEOHASH_LEN,
    )
    .ok()
}

/// Height and width in degrees of a geohash cell of `len` characters.
fn cell_size_deg(len: usize) -> (f64, f64) {
    let bits = 5 * len as i32;
    let lon_bits = (bits + 1) / 2;
    let lat_bits = bits / 2;
    (180.0 / 2f64.powi(lat_bits), 360.0 / 2f64.powi(lon_bits))
}

/// The latitude range and the (one or two, when crossing the antimeridian) longitude ranges of
/// the bounding box of a circle on the sphere.
fn bounding_box(center: GeoPoint, radius_m: f64) -> ((f64, f64), Vec<(f64, f64)>) {
    let angle = radius_m / EARTH_RADIUS_M;
    let dlat = angle.to_degrees();
    let (lat_min, lat_max) = (center.lat - dlat, center.lat + dlat);
    let full = vec![(-180.0, 180.0)];
    if lat_max >= 90.0 || lat_min <= -90.0 || angle >= std::f64::consts::FRAC_PI_2 {
        // A pole is inside the circle: every longitude is.
        return ((lat_min.max(-90.0), lat_max.min(90.0)), full);
    }
    let ratio = angle.sin() / center.lat.to_radians().cos();
    if ratio >= 1.0 {
        return ((lat_min, lat_max), full);
    }
    let dlon = ratio.asin().to_degrees();
    let (lo, hi) = (center.lon - dlon, center.lon + dlon);
    let lon_ranges = if lo < -180.0 {
        vec![(lo + 360.0, 180.0), (-180.0, hi)]
    } else if hi > 180.0 {
        vec![(lo, 180.0), (-180.0, hi - 360.0)]
    } else {
        vec![(lo, hi)]
    };
    ((lat_min, lat_max), lon_ranges)
}

/// Inclusive range of cell indices along one axis that the degree range `[lo, hi]` touches.
fn index_range(lo: f64, hi: f64, origin: f64, step: f64, cells: u64) -> (u64, u64) {
    let first = ((lo - origin) / step).floor().max(0.0) as u64;
    let last = (((hi - origin) / step).floor().max(0.0) as u64).min(cells - 1);
    (first.min(cells - 1), last)
}

/// Geohash prefixes whose cells together contain every point within `radius_m` of `center`:
/// the finest cell length whose covering of the circle's bounding box fits in
/// [`MAX_COVER_CELLS`], less the cells that lie wholly outside the circle. Callers filter
/// candidates by exact distance; the covering only has to be complete.
pub fn cover_circle(center: GeoPoint, radius_m: f64) -> Vec<String> {
    let radius_m = radius_m.max(0.0);
    let ((lat_min, lat_max), lon_ranges) = bounding_box(center, radius_m);
    let mut chosen = 1;
    for len in (1..=POSITION_GEOHASH_LEN).rev() {
        let (height, width) = cell_size_deg(len);
        let (lat_cells, lon_cells) = ((180.0 / height) as u64, (360.0 / width) as u64);
        let (i0, i1) = index_range(lat_min, lat_max, -90.0, height, lat_cells);
        let count: u64 = lon_ranges
            .iter()
            .map(|&(lo, hi)| {
                let (j0, j1) = index_range(lo, hi, -180.0, width, lon_cells);
                (j1 - j0 + 1) * (i1 - i0 + 1)
            })
            .sum();
        if count as usize <= MAX_COVER_CELLS {
            chosen = len;
            break;
        }
    }
    let (height, width) = cell_size_deg(chosen);
    let (lat_cells, lon_cells) = ((180.0 / height) as u64, (360.0 / width) as u64);
    let (i0, i1) = index_range(lat_min, lat_max, -90.0, height, lat_cells);
    let mut cells = Vec::new();
    for &(lo, hi) in &lon_ranges {
        let (j0, j1) = index_range(lo, hi, -180.0, width, lon_cells);
        for i in i0..=i1 {
            for j in j0..=j1 {
                let cell_center = GeoPoint {
                    lat: -90.0 + (i as f64 + 0.5) * height,
                    lon: -180.0 + (j as f64 + 0.5) * width,
                };
                if chosen >= 3 && cell_outside_circle(cell_center, height, width, center, radius_m)
                {
                    continue;
                }
                if let Ok(hash) = geohash::encode(
                    geohash::Coord {
                        x: cell_center.lon,
                        y: cell_center.lat,
                    },
                    chosen,
                ) {
                    cells.push(hash);
                }
            }
        }
    }
    cells.sort();
    cells.dedup();
    cells
}

/// True when no point of the cell can be within the radius: the distance to the cell's centre,
/// less the centre's distance to its farthest corner, exceeds the radius. (For cells of three
/// or more characters, at most 1.4 degrees on a side, the farthest point from the centre is a
/// corner.) A metre of slack absorbs rounding.
fn cell_outside_circle(
    cell_center: GeoPoint,
    height: f64,
    width: f64,
    center: GeoPoint,
    radius_m: f64,
) -> bool {
    let half_diagonal = [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]
        .iter()
        .map(|(dy, dx)| {
            let corner = GeoPoint {
                lat: (cell_center.lat + dy * height).clamp(-90.0, 90.0),
                lon: cell_center.lon + dx * width,
            };
            haversine_m(cell_center, corner)
        })
        .fold(0.0, f64::max);
    haversine_m(center, cell_center) - half_diagonal > radius_m + 1.0
}

/// The point `distance_m` from `from` on the initial `bearing_deg` (spherical destination).
pub fn destination(from: GeoPoint, bearing_deg: f64, distance_m: f64) -> GeoPoint {
    let angle = distance_m / EARTH_RADIUS_M;
    let (lat1, lon1, bearing) = (
        from.lat.to_radians(),
        from.lon.to_radians(),
        bearing_deg.to_radians(),
    );
    let lat2 = (lat1.sin() * angle.cos() + lat1.cos() * angle.sin() * bearing.cos()).asin();
    let lon2 = lon1
        + (bearing.sin() * angle.sin() * lat1.cos()).atan2(angle.cos() - lat1.sin() * lat2.sin());
    let lon = (lon2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0;
    GeoPoint {
        lat: lat2.to_degrees().clamp(-90.0, 90.0),
        lon,
    }
}

/// Geohash length of the partition part of a geo-index key: cells of 1.4 x 1.4 degrees (about
/// 156 km x 156 km at the equator, 105 km wide at 48 degrees). A metro area sits in one to four
/// of them, so a radius query reads few keys at any radius up to the API's 100 km (at most nine
/// cells below 60 degrees of latitude), each narrowed to its covering's geohash range.
pub const INDEX_PARTITION_GEOHASH_LEN: usize = 3;
/// Write shards per index cell.
///
/// The hot-spot arithmetic (docs/architecture.md, "Semantics"): a DynamoDB partition takes 1,000
/// writes/s, and a whole metro area may sit in one index cell. Spreading each cell over 16
/// shards by a hash of the device id caps any one key at a sixteenth of the cell's writes:
/// fleet B (100,000 vehicles every 10 s, 10,000 writes/s, all in one city) is 625 writes/s per
/// key (about 700 with the hash's binomial spread at 3 sigma), below the 1,000 a partition
/// takes. A radius query reads each covering cell's 16 shards.
pub const INDEX_SHARDS: u32 = 16;

/// The shard of a device in the geo index, stable across processes and versions (MD5, as
/// Kinesis uses for partition keys).
pub fn index_shard(device_id: &str) -> u32 {
    let digest = md5::compute(device_id.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % INDEX_SHARDS
}

/// The geo-index partition key of a position: `"{geohash3}#{shard:02}"`.
pub fn index_partition_key(geohash: &str, device_id: &str) -> String {
    let cell = &geohash[..geohash.len().min(INDEX_PARTITION_GEOHASH_LEN)];
    format!("{cell}#{:02}", index_shard(device_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn point(lat: f64, lon: f64) -> GeoPoint {
        GeoPoint { lat, lon }
    }

    #[test]
    fn haversine_known_distance() {
        // Berlin TV tower to Brandenburg Gate: about 2.2 km.
        let d = haversine_m(point(52.520_8, 13.409_4), point(52.516_3, 13.377_7));
        assert!((d - 2_200.0).abs() < 60.0, "{d}");
        assert_eq!(haversine_m(point(10.0, 20.0), point(10.0, 20.0)), 0.0);
    }

    #[test]
    fn covering_is_small_and_fine_for_city_radii() {
        let cells = cover_circle(point(52.52, 13.405), 1_000.0);
        assert!(!cells.is_empty() && cells.len() <= MAX_COVER_CELLS);
        assert!(cells.iter().all(|c| c.len() >= 5), "{cells:?}");
    }

    #[test]
    fn covering_crosses_the_antimeridian_and_poles() {
        let cells = cover_circle(point(0.0, 179.999), 5_000.0);
        let first: std::collections::BTreeSet<char> =
            cells.iter().map(|c| c.chars().next().unwrap()).collect();
        assert!(first.len() >= 2, "both sides of 180 degrees: {cells:?}");
        assert!(!cover_circle(point(89.99, 0.0), 10_000.0).is_empty());
        assert_eq!(cover_circle(point(0.0, 0.0), 30_000_000.0).len(), 32);
    }

    #[test]
    fn no_index_key_takes_a_city_beyond_a_partition() {
        // Fleet B's 10,000 writes/s in one index cell: 10,000 vehicles parked together, each
        // writing once a second.
        let mut writes_per_key: HashMap<String, u32> = HashMap::new();
        for n in 0..10_000 {
            let device = format!("truck-{n:05}");
            let hash = geohash_of(point(52.52 + (n % 100) as f64 * 1e-5, 13.405)).unwrap();
            *writes_per_key
                .entry(index_partition_key(&hash, &device))
                .or_default() += 1;
        }
        let hottest = writes_per_key.values().max().copied().unwrap();
        assert!(hottest < 1_000, "hottest key takes {hottest} writes/s");
        assert_eq!(writes_per_key.len(), INDEX_SHARDS as usize);
    }

    fn arb_point() -> impl Strategy<Value = GeoPoint> {
        prop_oneof![
            (-90.0..=90.0f64, -180.0..=180.0f64),
            (52.3..52.7f64, 13.1..13.7f64),
            (
                -1.0..1.0f64,
                prop_oneof![179.0..=180.0f64, -180.0..-179.0f64]
            ),
            (88.0..=90.0f64, -180.0..=180.0f64),
        ]
        .prop_map(|(lat, lon)| GeoPoint { lat, lon })
    }

    proptest! {
        /// Every point within the radius has a geohash that starts with a covering prefix.
        #[test]
        fn covering_contains_every_point_in_the_circle(
            center in arb_point(),
            radius in prop_oneof![1.0..2_000.0f64, 2_000.0..100_000.0f64],
            bearings in proptest::collection::vec((0.0..360.0f64, 0.0..=1.0f64), 1..50),
        ) {
            let cells = cover_circle(center, radius);
            prop_assert!(cells.len() <= MAX_COVER_CELLS * 2);
            for (bearing, fraction) in bearings {
                let target = destination(center, bearing, radius * fraction * 0.999_999);
                let hash = geohash_of(target).unwrap();
                prop_assert!(
                    cells.iter().any(|c| hash.starts_with(c.as_str())),
                    "{hash} at {target:?} ({} m) not covered by {cells:?}", haversine_m(center, target)
                );
            }
        }
    }
}
