//! Fleet events: geofence enters and exits, overspeed starts and ends, vehicles going offline
//! and coming back. Evaluated per device in event-time order from a small state kept with the
//! device's rule state (no extra store request per reading), and jitter-free by construction:
//!
//! - an enter needs the vehicle inside for the geofence's `dwell_s`;
//! - an exit needs the vehicle beyond `exit_margin_m` from the boundary, or outside (within
//!   the margin) for the fleet rules' `exit_dwell_s`;
//! - overspeed starts after `overspeed_min_duration_s` above the limit and ends after
//!   `overspeed_clear_duration_s` at or below the limit less `overspeed_hysteresis_kmh`.
//!
//! An event's `ts` is the event time of the reading that began what the event confirms: the
//! first reading inside for an enter, the first reading outside for an exit, the first reading
//! above the limit for a start, the first at or below the clear speed for an end. Event ids are
//! made of the device, type, geofence and that time: a replayed or retried batch makes the same
//! ids, and the state's watermark makes it make none.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::geo::{BoundingRect, Contains, Distance, Euclidean, Validation};
use ::geo::{Coord, LineString, MultiPolygon, Point, Polygon};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::{RTree, AABB};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use smol_str::SmolStr;

use crate::geo::{haversine_m, EARTH_RADIUS_M};
use crate::model::{GeoPoint, Reading};
use crate::ports::{GeofenceStore, StoreError};
use crate::EpochMillis;

/// The most vertices a geofence may have (all rings of all polygons together): the stored
/// geofence stays far under DynamoDB's 400 KB item, and a point-in-polygon test stays cheap.
pub const MAX_GEOFENCE_VERTICES: usize = 5_000;
/// The most bytes of JSON a geofence's geometry may take (foreign members included): with the
/// vertex limit, a stored geofence stays far under DynamoDB's 400 KB item.
pub const MAX_GEOMETRY_BYTES: usize = 256 * 1024;
/// The largest circle radius, and the largest exit margin, in metres.
pub const MAX_GEOFENCE_RADIUS_M: f64 = 100_000.0;
pub const MAX_EXIT_MARGIN_M: f64 = 10_000.0;
pub const MAX_DWELL_S: f64 = 86_400.0;
pub const MAX_SPEED_LIMIT_KMH: f64 = 500.0;
const METRES_PER_DEGREE: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;

/// The fleet-wide settings, from the `[fleet]` table of the rules file.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRules {
    /// Overspeed anywhere; a geofence's own limit applies inside it (the lower one wins).
    pub speed_limit_kmh: Option<f64>,
    pub overspeed_min_duration_ms: EpochMillis,
    pub overspeed_clear_duration_ms: EpochMillis,
    pub overspeed_hysteresis_kmh: f64,
    /// A vehicle whose newest reading is this old (event time against the clock) is offline.
    pub offline_after_ms: EpochMillis,
    /// For geofences that set no `dwell_s` / `exit_margin_m`.
    pub default_dwell_ms: EpochMillis,
    pub default_exit_margin_m: f64,
    /// Outside a geofence, but within its margin, this long: an exit.
    pub exit_dwell_ms: EpochMillis,
}

impl Default for FleetRules {
    fn default() -> Self {
        FleetRules {
            speed_limit_kmh: None,
            overspeed_min_duration_ms: 10_000,
            overspeed_clear_duration_ms: 10_000,
            overspeed_hysteresis_kmh: 5.0,
            offline_after_ms: 600_000,
            default_dwell_ms: 10_000,
            default_exit_margin_m: 25.0,
            exit_dwell_ms: 60_000,
        }
    }
}

/// The `[fleet]` table as written; every field optional, checked by name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleetRules {
    speed_limit_kmh: Option<f64>,
    overspeed_min_duration_s: Option<f64>,
    overspeed_clear_duration_s: Option<f64>,
    overspeed_hysteresis_kmh: Option<f64>,
    offline_after_s: Option<f64>,
    dwell_s: Option<f64>,
    exit_margin_m: Option<f64>,
    exit_dwell_s: Option<f64>,
}

fn seconds(name: &str, value: Option<f64>, default_ms: EpochMillis) -> Result<EpochMillis, String> {
    match value {
        None => Ok(default_ms),
        Some(s) if s.is_finite() && (0.0..=MAX_DWELL_S).contains(&s) => {
            Ok((s * 1000.0).round() as EpochMillis)
        }
        Some(s) => Err(format!(
            "[fleet] {name} = {s} must be from 0 to {MAX_DWELL_S} seconds"
        )),
    }
}

impl RawFleetRules {
    pub(crate) fn compile(self) -> Result<FleetRules, String> {
        let defaults = FleetRules::default();
        let speed_limit_kmh = match self.speed_limit_kmh {
            None => None,
            Some(v) if v.is_finite() && v > 0.0 && v <= MAX_SPEED_LIMIT_KMH => Some(v),
            Some(v) => {
                return Err(format!(
                "[fleet] speed_limit_kmh = {v} must be above 0 and at most {MAX_SPEED_LIMIT_KMH}"
            ))
            }
        };
        let hysteresis = match self.overspeed_hysteresis_kmh {
            None => defaults.overspeed_hysteresis_kmh,
            Some(v) if v.is_finite() && (0.0..=100.0).contains(&v) => v,
            Some(v) => {
                return Err(format!(
                    "[fleet] overspeed_hysteresis_kmh = {v} must be from 0 to 100"
                ))
            }
        };
        let exit_margin_m = match self.exit_margin_m {
            None => defaults.default_exit_margin_m,
            Some(v) if v.is_finite() && (0.0..=MAX_EXIT_MARGIN_M).contains(&v) => v,
            Some(v) => {
                return Err(format!(
                    "[fleet] exit_margin_m = {v} must be from 0 to {MAX_EXIT_MARGIN_M}"
                ))
            }
        };
        let offline_after_ms = seconds(
            "offline_after_s",
            self.offline_after_s,
            defaults.offline_after_ms,
        )?;
        if offline_after_ms == 0 {
            return Err("[fleet] offline_after_s must be above 0".into());
        }
        Ok(FleetRules {
            speed_limit_kmh,
            overspeed_min_duration_ms: seconds(
                "overspeed_min_duration_s",
                self.overspeed_min_duration_s,
                defaults.overspeed_min_duration_ms,
            )?,
            overspeed_clear_duration_ms: seconds(
                "overspeed_clear_duration_s",
                self.overspeed_clear_duration_s,
                defaults.overspeed_clear_duration_ms,
            )?,
            overspeed_hysteresis_kmh: hysteresis,
            offline_after_ms,
            default_dwell_ms: seconds("dwell_s", self.dwell_s, defaults.default_dwell_ms)?,
            default_exit_margin_m: exit_margin_m,
            exit_dwell_ms: seconds("exit_dwell_s", self.exit_dwell_s, defaults.exit_dwell_ms)?,
        })
    }
}

/// A geofence as stored and served: the request's fields as given (the geometry is the
/// GeoJSON sent), with its id and when it was last written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Geofence {
    pub geofence_id: String,
    pub name: String,
    pub geometry: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_limit_kmh: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwell_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_margin_m: Option<f64>,
    pub updated_at: EpochMillis,
}

/// The body of `PUT /v1/geofences/{geofence_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GeofenceRequest {
    name: Option<String>,
    geometry: Option<Value>,
    speed_limit_kmh: Option<f64>,
    dwell_s: Option<f64>,
    exit_margin_m: Option<f64>,
}

/// Whether `id` may name a geofence: 1-128 of `A-Z a-z 0-9 _ . : -`.
pub fn is_valid_geofence_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Geofence {
    /// A geofence from a PUT body, checked whole (the geometry compiled): an error names the
    /// field and the problem.
    pub fn from_request(
        geofence_id: &str,
        body: &[u8],
        now: EpochMillis,
    ) -> Result<Geofence, String> {
        if !is_valid_geofence_id(geofence_id) {
            return Err(format!(
                "{geofence_id:?} is not a geofence id (1-128 of A-Z a-z 0-9 _ . : -)"
            ));
        }
        let request: GeofenceRequest =
            serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
        let name = request.name.unwrap_or_else(|| geofence_id.to_string());
        if name.trim().is_empty() || name.chars().count() > 200 {
            return Err("name must be 1-200 characters".into());
        }
        let geometry = request.geometry.ok_or(
            "geometry is required: a GeoJSON Polygon, MultiPolygon, or a Point with radius_m",
        )?;
        let size = geometry.to_string().len();
        if size > MAX_GEOMETRY_BYTES {
            return Err(format!(
                "geometry: {size} bytes of JSON; at most {MAX_GEOMETRY_BYTES} (simplify it)"
            ));
        }
        if let Some(v) = request.speed_limit_kmh {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SPEED_LIMIT_KMH) {
                return Err(format!(
                    "speed_limit_kmh {v} must be above 0 and at most {MAX_SPEED_LIMIT_KMH}"
                ));
            }
        }
        if let Some(v) = request.dwell_s {
            if !(v.is_finite() && (0.0..=MAX_DWELL_S).contains(&v)) {
                return Err(format!("dwell_s {v} must be from 0 to {MAX_DWELL_S}"));
            }
        }
        if let Some(v) = request.exit_margin_m {
            if !(v.is_finite() && (0.0..=MAX_EXIT_MARGIN_M).contains(&v)) {
                return Err(format!(
                    "exit_margin_m {v} must be from 0 to {MAX_EXIT_MARGIN_M}"
                ));
            }
        }
        let geofence = Geofence {
            geofence_id: geofence_id.to_string(),
            name,
            geometry,
            speed_limit_kmh: request.speed_limit_kmh,
            dwell_s: request.dwell_s,
            exit_margin_m: request.exit_margin_m,
            updated_at: now,
        };
        Shape::parse(&geofence.geometry).map_err(|e| format!("geometry: {e}"))?;
        Ok(geofence)
    }
}

/// A geofence's area: polygons in longitude/latitude degrees (GeoJSON's axis order), or a
/// circle measured on the sphere.
#[derive(Debug, Clone)]
pub enum Shape {
    Area(MultiPolygon<f64>),
    Circle { center: GeoPoint, radius_m: f64 },
}

fn position(value: &Value, at: &str) -> Result<Coord<f64>, String> {
    let pair = value
        .as_array()
        .filter(|p| (2..=3).contains(&p.len()))
        .ok_or_else(|| format!("{at}: a position is [longitude, latitude]"))?;
    let number = |i: usize, what: &str| {
        pair[i]
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{at}: {what} is not a number"))
    };
    let lon = number(0, "longitude")?;
    let lat = number(1, "latitude")?;
    if !(-180.0..=180.0).contains(&lon) {
        return Err(format!("{at}: longitude {lon} is outside -180..180"));
    }
    if !(-90.0..=90.0).contains(&lat) {
        return Err(format!("{at}: latitude {lat} is outside -90..90"));
    }
    Ok(Coord { x: lon, y: lat })
}

fn ring(value: &Value, at: &str, vertices: &mut usize) -> Result<LineString<f64>, String> {
    let positions = value
        .as_array()
        .ok_or_else(|| format!("{at}: a ring is an array of positions"))?;
    *vertices += positions.len();
    if *vertices > MAX_GEOFENCE_VERTICES {
        return Err(format!(
            "more than {MAX_GEOFENCE_VERTICES} vertices; simplify the geometry"
        ));
    }
    if positions.len() < 4 {
        return Err(format!(
            "{at}: a ring needs at least 4 positions (3 corners and the first again), has {}",
            positions.len()
        ));
    }
    let coords = positions
        .iter()
        .enumerate()
        .map(|(i, p)| position(p, &format!("{at}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if coords.first() != coords.last() {
        return Err(format!(
            "{at}: the ring is not closed (its last position must repeat its first)"
        ));
    }
    Ok(LineString::new(coords))
}

fn polygon(value: &Value, at: &str, vertices: &mut usize) -> Result<Polygon<f64>, String> {
    let rings = value
        .as_array()
        .filter(|r| !r.is_empty())
        .ok_or_else(|| format!("{at}: a polygon is an array of rings, the outer one first"))?;
    let mut rings = rings
        .iter()
        .enumerate()
        .map(|(i, r)| ring(r, &format!("{at}[{i}]"), vertices))
        .collect::<Result<Vec<_>, _>>()?;
    let exterior = rings.remove(0);
    Ok(Polygon::new(exterior, rings))
}

impl Shape {
    /// The shape of a GeoJSON geometry: a Polygon, a MultiPolygon, or a Point with
    /// `radius_m` (a foreign member of the geometry object). Open rings, self-intersections,
    /// overlapping parts, too many vertices, coordinates out of range and polygons wider than
    /// 180° of longitude (one crossing the antimeridian must be split in two, as GeoJSON says)
    /// are refused, naming the problem.
    pub fn parse(geometry: &Value) -> Result<Shape, String> {
        let kind = geometry
            .get("type")
            .and_then(Value::as_str)
            .ok_or("a GeoJSON geometry object with a \"type\"")?;
        let coordinates = geometry
            .get("coordinates")
            .ok_or_else(|| format!("{kind}: \"coordinates\" is missing"))?;
        let mut vertices = 0;
        let area = match kind {
            "Point" => {
                let center = position(coordinates, "coordinates")?;
                let radius_m = geometry
                    .get("radius_m")
                    .and_then(Value::as_f64)
                    .ok_or("a Point geofence needs \"radius_m\" (metres) in the geometry")?;
                if !(radius_m.is_finite() && radius_m > 0.0 && radius_m <= MAX_GEOFENCE_RADIUS_M) {
                    return Err(format!(
                        "radius_m {radius_m} must be above 0 and at most {MAX_GEOFENCE_RADIUS_M}"
                    ));
                }
                return Ok(Shape::Circle {
                    center: GeoPoint {
                        lat: center.y,
                        lon: center.x,
                    },
                    radius_m,
                });
            }
            "Polygon" => {
                MultiPolygon::new(vec![polygon(coordinates, "coordinates", &mut vertices)?])
            }
            "MultiPolygon" => {
                let parts = coordinates
                    .as_array()
                    .filter(|p| !p.is_empty())
                    .ok_or("coordinates: a MultiPolygon is an array of polygons")?;
                MultiPolygon::new(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| polygon(p, &format!("coordinates[{i}]"), &mut vertices))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            other => {
                return Err(format!(
                "type {other:?}: a geofence is a Polygon, a MultiPolygon or a Point with radius_m"
            ))
            }
        };
        area.check_validation().map_err(|e| e.to_string())?;
        let bounds = area.bounding_rect().ok_or("the geometry has no extent")?;
        if bounds.width() > 180.0 {
            return Err(
                "the geometry spans more than 180° of longitude: split one that crosses the antimeridian"
                    .into(),
            );
        }
        Ok(Shape::Area(area))
    }

    fn contains(&self, point: GeoPoint) -> bool {
        match self {
            Shape::Area(area) => area.contains(&Point::new(point.lon, point.lat)),
            Shape::Circle { center, radius_m } => haversine_m(*center, point) <= *radius_m,
        }
    }

    /// How far `point` is from the shape, in metres (0 inside). Polygons are measured in a
    /// local equirectangular projection around the point: exact enough for margins of metres
    /// to kilometres.
    fn distance_m(&self, point: GeoPoint) -> f64 {
        match self {
            Shape::Circle { center, radius_m } => (haversine_m(*center, point) - radius_m).max(0.0),
            Shape::Area(area) => {
                let scale_x = METRES_PER_DEGREE * point.lat.to_radians().cos();
                let project = |c: Coord<f64>| Coord {
                    x: (c.x - point.lon) * scale_x,
                    y: (c.y - point.lat) * METRES_PER_DEGREE,
                };
                let origin = Point::new(0.0, 0.0);
                area.iter()
                    .map(|polygon| {
                        let projected = Polygon::new(
                            polygon.exterior().coords().map(|c| project(*c)).collect(),
                            polygon
                                .interiors()
                                .iter()
                                .map(|ring| ring.coords().map(|c| project(*c)).collect())
                                .collect(),
                        );
                        Euclidean.distance(&origin, &projected)
                    })
                    .fold(f64::INFINITY, f64::min)
            }
        }
    }

    /// The shape's bounds in degrees, grown by `margin_m` on every side.
    fn envelope(&self, margin_m: f64) -> AABB<[f64; 2]> {
        let (min, max) = match self {
            Shape::Area(area) => {
                let bounds = area.bounding_rect().unwrap_or(::geo::Rect::new(
                    Coord { x: 0.0, y: 0.0 },
                    Coord { x: 0.0, y: 0.0 },
                ));
                (bounds.min(), bounds.max())
            }
            Shape::Circle { center, .. } => {
                let c = Coord {
                    x: center.lon,
                    y: center.lat,
                };
                (c, c)
            }
        };
        let reach_m = margin_m
            + match self {
                Shape::Circle { radius_m, .. } => *radius_m,
                Shape::Area(_) => 0.0,
            };
        // A little more than the margin, so a point the margin test would keep is never
        // left out by the index.
        let reach_m = reach_m * 1.01 + 1.0;
        let dlat = reach_m / METRES_PER_DEGREE;
        let polar_lat = (max.y + dlat).abs().max((min.y - dlat).abs()).min(89.9);
        let dlon = (reach_m / (METRES_PER_DEGREE * polar_lat.to_radians().cos())).min(360.0);
        AABB::from_corners(
            [min.x - dlon, (min.y - dlat).max(-90.0)],
            [max.x + dlon, (max.y + dlat).min(90.0)],
        )
    }
}

/// A geofence ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledGeofence {
    pub geofence_id: Arc<str>,
    pub shape: Shape,
    pub speed_limit_kmh: Option<f64>,
    pub dwell_ms: EpochMillis,
    pub exit_margin_m: f64,
}

impl CompiledGeofence {
    pub fn compile(geofence: &Geofence, rules: &FleetRules) -> Result<CompiledGeofence, String> {
        Ok(CompiledGeofence {
            geofence_id: geofence.geofence_id.as_str().into(),
            shape: Shape::parse(&geofence.geometry)?,
            speed_limit_kmh: geofence.speed_limit_kmh,
            dwell_ms: geofence.dwell_s.map_or(rules.default_dwell_ms, |s| {
                (s * 1000.0).round() as EpochMillis
            }),
            exit_margin_m: geofence
                .exit_margin_m
                .unwrap_or(rules.default_exit_margin_m),
        })
    }
}

type Indexed = GeomWithData<Rectangle<[f64; 2]>, usize>;

/// Every geofence, in an R*-tree of their bounds grown by their exit margins: a reading is
/// tested exactly (point in polygon, distance to the boundary) only against the few whose
/// bounds hold it.
#[derive(Debug, Default)]
pub struct GeofenceIndex {
    tree: RTree<Indexed>,
    fences: Vec<CompiledGeofence>,
    by_id: HashMap<Arc<str>, usize>,
}

impl GeofenceIndex {
    /// The index of `geofences`; one that does not compile (stored before a rule changed) is
    /// left out and named in the second part.
    pub fn build(geofences: &[Geofence], rules: &FleetRules) -> (GeofenceIndex, Vec<String>) {
        let mut fences = Vec::with_capacity(geofences.len());
        let mut refused = Vec::new();
        for geofence in geofences {
            match CompiledGeofence::compile(geofence, rules) {
                Ok(fence) => fences.push(fence),
                Err(error) => refused.push(format!("{}: {error}", geofence.geofence_id)),
            }
        }
        let entries = fences
            .iter()
            .enumerate()
            .map(|(i, fence)| {
                let envelope = fence.shape.envelope(fence.exit_margin_m);
                GeomWithData::new(
                    Rectangle::from_corners(envelope.lower(), envelope.upper()),
                    i,
                )
            })
            .collect();
        let by_id = fences
            .iter()
            .enumerate()
            .map(|(i, fence)| (fence.geofence_id.clone(), i))
            .collect();
        (
            GeofenceIndex {
                tree: RTree::bulk_load(entries),
                fences,
                by_id,
            },
            refused,
        )
    }

    pub fn len(&self) -> usize {
        self.fences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    pub fn get(&self, geofence_id: &str) -> Option<&CompiledGeofence> {
        self.by_id.get(geofence_id).map(|&i| &self.fences[i])
    }

    /// The geofences whose grown bounds hold `point`: every one the point is inside or within
    /// the exit margin of, and a few more.
    pub fn candidates(&self, point: GeoPoint) -> impl Iterator<Item = &CompiledGeofence> {
        self.tree
            .locate_all_at_point(&[point.lon, point.lat])
            .map(|entry| &self.fences[entry.data])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetEventType {
    GeofenceEnter,
    GeofenceExit,
    OverspeedStart,
    OverspeedEnd,
    DeviceOffline,
    DeviceOnline,
}

impl FleetEventType {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetEventType::GeofenceEnter => "geofence_enter",
            FleetEventType::GeofenceExit => "geofence_exit",
            FleetEventType::OverspeedStart => "overspeed_start",
            FleetEventType::OverspeedEnd => "overspeed_end",
            FleetEventType::DeviceOffline => "device_offline",
            FleetEventType::DeviceOnline => "device_online",
        }
    }
}

impl std::str::FromStr for FleetEventType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        [
            FleetEventType::GeofenceEnter,
            FleetEventType::GeofenceExit,
            FleetEventType::OverspeedStart,
            FleetEventType::OverspeedEnd,
            FleetEventType::DeviceOffline,
            FleetEventType::DeviceOnline,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
        .ok_or_else(|| {
            format!(
                "type {text:?} is not one of geofence_enter, geofence_exit, overspeed_start, overspeed_end, device_offline, device_online"
            )
        })
    }
}

/// A fleet event, as listed by `GET /v1/events` and published on the alerts bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetEvent {
    /// `{device_id}|{type}|{geofence_id or -}|{ts}`: the same for a replay; consumers
    /// deduplicate on it.
    pub event_id: String,
    pub device_id: String,
    #[serde(rename = "type")]
    pub kind: FleetEventType,
    pub ts: EpochMillis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geofence_id: Option<String>,
    /// The peak speed, for overspeed events (km/h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The speed limit exceeded (km/h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
}

/// A fleet event as the alerts bus carries it, beside alert transitions: `transition_id` (the
/// event id) for consumers to deduplicate on, `kind` `fleet_event` to tell it from a raise or
/// a clear, `at` the event's time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetTransition {
    pub transition_id: String,
    pub kind: FleetTransitionKind,
    pub at: EpochMillis,
    pub event: FleetEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetTransitionKind {
    FleetEvent,
}

impl From<&FleetEvent> for FleetTransition {
    fn from(event: &FleetEvent) -> Self {
        FleetTransition {
            transition_id: event.event_id.clone(),
            kind: FleetTransitionKind::FleetEvent,
            at: event.ts,
            event: event.clone(),
        }
    }
}

impl FleetEvent {
    fn new(
        device_id: &str,
        kind: FleetEventType,
        ts: EpochMillis,
        geofence_id: Option<&str>,
        at: Option<GeoPoint>,
    ) -> FleetEvent {
        FleetEvent {
            event_id: format!(
                "{device_id}|{}|{}|{ts}",
                kind.as_str(),
                geofence_id.unwrap_or("-")
            ),
            device_id: device_id.to_string(),
            kind,
            ts,
            geofence_id: geofence_id.map(str::to_string),
            value: None,
            limit: None,
            lat: at.map(|p| p.lat),
            lon: at.map(|p| p.lon),
        }
    }
}

/// Where a vehicle stands with one geofence (no entry: outside, nothing pending).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Membership {
    /// Inside since `since`, not yet for the dwell.
    Entering {
        since: EpochMillis,
        at: GeoPoint,
    },
    Inside,
    /// Entered, now outside within the exit margin since `since`.
    Leaving {
        since: EpochMillis,
        at: GeoPoint,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Overspeed {
    #[default]
    Normal,
    /// Above the limit since `since`, not yet for the minimum duration.
    Pending {
        since: EpochMillis,
        at: Option<GeoPoint>,
        peak: f64,
        limit: f64,
        geofence_id: Option<String>,
    },
    Active {
        peak: f64,
        limit: f64,
        geofence_id: Option<String>,
    },
    /// At or below the clear speed since `since`, not yet for the clear duration.
    Clearing {
        since: EpochMillis,
        at: Option<GeoPoint>,
        peak: f64,
        limit: f64,
        geofence_id: Option<String>,
    },
}

/// One device's fleet-event state, kept with its rule state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetState {
    /// The newest reading evaluated, `(ts, event_id)`: readings at or before it are replays
    /// (or later than the device's newest: fleet events follow event-time order and skip
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<(EpochMillis, SmolStr)>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub geofences: BTreeMap<String, Membership>,
    #[serde(default, skip_serializing_if = "is_normal")]
    pub overspeed: Overspeed,
    /// Set when `device_offline` was made, until a newer reading comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<EpochMillis>,
    /// When a new reading of the vehicle was last evaluated, by the evaluating function's
    /// clock: silence is judged on it, not on event time, so a device whose clock lags or that
    /// uploads old readings is not taken for silent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_at: Option<EpochMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_position: Option<GeoPoint>,
}

fn is_normal(overspeed: &Overspeed) -> bool {
    *overspeed == Overspeed::Normal
}

impl FleetRules {
    /// Steps `state` through `readings` (any order; sorted here) and answers the events made;
    /// `now` is the evaluating function's clock. Readings at or before the state's mark change
    /// nothing.
    pub fn evaluate<R: std::borrow::Borrow<Reading>>(
        &self,
        index: &GeofenceIndex,
        device_id: &str,
        state: &mut FleetState,
        readings: &[R],
        now: EpochMillis,
    ) -> Vec<FleetEvent> {
        let mut fresh: Vec<&Reading> = readings
            .iter()
            .map(R::borrow)
            .filter(|r| {
                state
                    .mark
                    .as_ref()
                    .is_none_or(|(ts, id)| r.order_key() > (*ts, id.as_str()))
            })
            .collect();
        fresh.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        fresh.dedup_by(|a, b| a.order_key() == b.order_key());
        let mut events = Vec::new();
        if !fresh.is_empty() {
            state.seen_at = Some(now);
        }
        for reading in &fresh {
            self.step(index, device_id, state, reading, &mut events);
        }
        if let Some(newest) = fresh.last() {
            state.mark = Some((newest.ts, SmolStr::from(newest.event_id.as_str())));
        }
        events
    }

    fn step(
        &self,
        index: &GeofenceIndex,
        device_id: &str,
        state: &mut FleetState,
        reading: &Reading,
        events: &mut Vec<FleetEvent>,
    ) {
        let ts = reading.ts;
        let point = reading
            .position()
            .filter(|p| p.lat.is_finite() && p.lon.is_finite());
        if let Some(offline_since) = state.offline_since.take() {
            // A reading the device had kept through the silence is older than the offline:
            // it is back when it is heard from again, not before it went offline.
            events.push(FleetEvent::new(
                device_id,
                FleetEventType::DeviceOnline,
                ts.max(offline_since),
                None,
                point,
            ));
        }
        let mut zone_limit: Option<(f64, &str)> = None;
        if let Some(point) = point {
            let mut seen: Vec<&str> = Vec::new();
            for fence in index.candidates(point) {
                let id: &str = &fence.geofence_id;
                seen.push(id);
                let inside = fence.shape.contains(point);
                if inside {
                    if let Some(limit) = fence.speed_limit_kmh {
                        if zone_limit.is_none_or(|(l, _)| limit < l) {
                            zone_limit = Some((limit, id));
                        }
                    }
                }
                self.step_geofence(fence, device_id, state, point, ts, inside, events);
            }
            // Tracked geofences the point is far from (beyond their grown bounds), or that are
            // gone: out, without waiting.
            let far: Vec<String> = state
                .geofences
                .keys()
                .filter(|id| !seen.contains(&id.as_str()))
                .cloned()
                .collect();
            for id in far {
                let membership = state.geofences.remove(&id);
                if index.get(&id).is_none() {
                    // The geofence was deleted: its memberships end without an event.
                    continue;
                }
                match membership {
                    Some(Membership::Inside) => events.push(FleetEvent::new(
                        device_id,
                        FleetEventType::GeofenceExit,
                        ts,
                        Some(&id),
                        Some(point),
                    )),
                    Some(Membership::Leaving { since, at }) => events.push(FleetEvent::new(
                        device_id,
                        FleetEventType::GeofenceExit,
                        since,
                        Some(&id),
                        Some(at),
                    )),
                    _ => {}
                }
            }
            state.last_position = Some(point);
        } else if let Some(last) = state.last_position {
            // No fix (a tunnel): the zone the vehicle was last seen in still sets its limit.
            for fence in index.candidates(last) {
                if let Some(limit) = fence.speed_limit_kmh {
                    if fence.shape.contains(last) && zone_limit.is_none_or(|(l, _)| limit < l) {
                        zone_limit = Some((limit, &fence.geofence_id));
                    }
                }
            }
        }
        if let Some(speed) = reading.speed_kmh.filter(|v| v.is_finite()) {
            let limit = match (self.speed_limit_kmh, zone_limit) {
                (Some(fleet), Some((zone, id))) if zone < fleet => Some((zone, Some(id))),
                (Some(fleet), _) => Some((fleet, None)),
                (None, Some((zone, id))) => Some((zone, Some(id))),
                (None, None) => None,
            };
            let at = point.or(state.last_position);
            self.step_overspeed(device_id, state, ts, at, speed, limit, events);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step_geofence(
        &self,
        fence: &CompiledGeofence,
        device_id: &str,
        state: &mut FleetState,
        point: GeoPoint,
        ts: EpochMillis,
        inside: bool,
        events: &mut Vec<FleetEvent>,
    ) {
        let id: &str = &fence.geofence_id;
        let event = |kind, ts, at| FleetEvent::new(device_id, kind, ts, Some(id), Some(at));
        let next = match (state.geofences.get(id), inside) {
            (None, false) => None,
            (None, true) if fence.dwell_ms == 0 => {
                events.push(event(FleetEventType::GeofenceEnter, ts, point));
                Some(Membership::Inside)
            }
            (None, true) => Some(Membership::Entering {
                since: ts,
                at: point,
            }),
            (Some(Membership::Entering { since, at }), true) => {
                if ts - since >= fence.dwell_ms {
                    events.push(event(FleetEventType::GeofenceEnter, *since, *at));
                    Some(Membership::Inside)
                } else {
                    Some(Membership::Entering {
                        since: *since,
                        at: *at,
                    })
                }
            }
            // Out again before the dwell: no enter.
            (Some(Membership::Entering { .. }), false) => None,
            (Some(Membership::Inside | Membership::Leaving { .. }), true) => {
                Some(Membership::Inside)
            }
            (Some(membership @ (Membership::Inside | Membership::Leaving { .. })), false) => {
                let (since, at) = match membership {
                    Membership::Leaving { since, at } => (*since, *at),
                    _ => (ts, point),
                };
                if fence.shape.distance_m(point) > fence.exit_margin_m
                    || ts - since >= self.exit_dwell_ms
                {
                    events.push(event(FleetEventType::GeofenceExit, since, at));
                    None
                } else {
                    Some(Membership::Leaving { since, at })
                }
            }
        };
        match next {
            Some(membership) => {
                state.geofences.insert(id.to_string(), membership);
            }
            None => {
                state.geofences.remove(id);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step_overspeed(
        &self,
        device_id: &str,
        state: &mut FleetState,
        ts: EpochMillis,
        at: Option<GeoPoint>,
        speed: f64,
        limit: Option<(f64, Option<&str>)>,
        events: &mut Vec<FleetEvent>,
    ) {
        let here = at;
        let above = limit.is_some_and(|(l, _)| speed > l);
        // With no limit where the vehicle is now, an overspeed ends.
        let clear = limit.is_none_or(|(l, _)| speed <= l - self.overspeed_hysteresis_kmh);
        let made = |kind,
                    since: EpochMillis,
                    at: Option<GeoPoint>,
                    peak: f64,
                    limit: f64,
                    zone: &Option<String>| {
            let mut event = FleetEvent::new(device_id, kind, since, zone.as_deref(), at);
            event.value = Some(peak);
            event.limit = Some(limit);
            event
        };
        let next = match std::mem::take(&mut state.overspeed) {
            Overspeed::Normal => match limit {
                Some((limit, zone)) if above => {
                    let zone = zone.map(str::to_string);
                    if self.overspeed_min_duration_ms == 0 {
                        events.push(made(
                            FleetEventType::OverspeedStart,
                            ts,
                            here,
                            speed,
                            limit,
                            &zone,
                        ));
                        Overspeed::Active {
                            peak: speed,
                            limit,
                            geofence_id: zone,
                        }
                    } else {
                        Overspeed::Pending {
                            since: ts,
                            at: here,
                            peak: speed,
                            limit,
                            geofence_id: zone,
                        }
                    }
                }
                _ => Overspeed::Normal,
            },
            Overspeed::Pending {
                since,
                at,
                peak,
                limit,
                geofence_id,
            } => {
                if !above {
                    Overspeed::Normal
                } else {
                    let peak = peak.max(speed);
                    if ts - since >= self.overspeed_min_duration_ms {
                        events.push(made(
                            FleetEventType::OverspeedStart,
                            since,
                            at,
                            peak,
                            limit,
                            &geofence_id,
                        ));
                        Overspeed::Active {
                            peak,
                            limit,
                            geofence_id,
                        }
                    } else {
                        Overspeed::Pending {
                            since,
                            at,
                            peak,
                            limit,
                            geofence_id,
                        }
                    }
                }
            }
            Overspeed::Active {
                peak,
                limit: started_limit,
                geofence_id,
            } => {
                let peak = peak.max(speed);
                if !clear {
                    Overspeed::Active {
                        peak,
                        limit: started_limit,
                        geofence_id,
                    }
                } else if self.overspeed_clear_duration_ms == 0 {
                    events.push(made(
                        FleetEventType::OverspeedEnd,
                        ts,
                        here,
                        peak,
                        started_limit,
                        &geofence_id,
                    ));
                    Overspeed::Normal
                } else {
                    Overspeed::Clearing {
                        since: ts,
                        at: here,
                        peak,
                        limit: started_limit,
                        geofence_id,
                    }
                }
            }
            Overspeed::Clearing {
                since,
                at,
                peak,
                limit: started_limit,
                geofence_id,
            } => {
                if !clear {
                    Overspeed::Active {
                        peak: peak.max(speed),
                        limit: started_limit,
                        geofence_id,
                    }
                } else if ts - since >= self.overspeed_clear_duration_ms {
                    events.push(made(
                        FleetEventType::OverspeedEnd,
                        since,
                        at,
                        peak,
                        started_limit,
                        &geofence_id,
                    ));
                    Overspeed::Normal
                } else {
                    Overspeed::Clearing {
                        since,
                        at,
                        peak,
                        limit: started_limit,
                        geofence_id,
                    }
                }
            }
        };
        state.overspeed = next;
    }

    /// `device_offline` for a vehicle last heard from (a new reading evaluated, by the
    /// evaluating function's clock) `offline_after_s` before `now`, once until it reports
    /// again; its `ts` is when the vehicle became offline: that moment plus `offline_after_s`.
    pub fn check_offline(
        &self,
        device_id: &str,
        state: &mut FleetState,
        now: EpochMillis,
    ) -> Option<FleetEvent> {
        let seen = state.seen_at.or(state.mark.as_ref().map(|(ts, _)| *ts))?;
        if state.offline_since.is_some() || now - seen < self.offline_after_ms {
            return None;
        }
        let since = seen + self.offline_after_ms;
        state.offline_since = Some(since);
        Some(FleetEvent::new(
            device_id,
            FleetEventType::DeviceOffline,
            since,
            None,
            state.last_position,
        ))
    }
}

/// The geofence index a stream function evaluates with: built from the store, and built
/// again when the store's version changes, which is looked at most once per `refresh` (a
/// change takes effect within that time plus one batch).
pub struct GeofenceCache {
    store: Arc<dyn GeofenceStore>,
    rules: FleetRules,
    refresh: Duration,
    cached: tokio::sync::Mutex<Option<CachedIndex>>,
}

struct CachedIndex {
    version: u64,
    checked: Instant,
    index: Arc<GeofenceIndex>,
}

impl GeofenceCache {
    pub fn new(store: Arc<dyn GeofenceStore>, rules: FleetRules, refresh: Duration) -> Self {
        GeofenceCache {
            store,
            rules,
            refresh,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    pub fn rules(&self) -> &FleetRules {
        &self.rules
    }

    pub async fn index(&self) -> Result<Arc<GeofenceIndex>, StoreError> {
        let mut cached = self.cached.lock().await;
        if let Some(current) = cached.as_ref() {
            if current.checked.elapsed() < self.refresh {
                return Ok(current.index.clone());
            }
        }
        // The version is read before the list: a write between the two is built next time.
        let version = self.store.version().await?;
        if let Some(current) = cached.as_mut() {
            if version == current.version {
                current.checked = Instant::now();
                return Ok(current.index.clone());
            }
        }
        let geofences = self.store.list().await?;
        let (index, refused) = GeofenceIndex::build(&geofences, &self.rules);
        for problem in refused {
            tracing::warn!(%problem, "a stored geofence does not compile; left out");
        }
        let index = Arc::new(index);
        *cached = Some(CachedIndex {
            version,
            checked: Instant::now(),
            index: index.clone(),
        });
        Ok(index)
    }
}

#[cfg(test)]
mod tests;
