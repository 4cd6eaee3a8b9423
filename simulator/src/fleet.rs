//! The simulated fleet: vehicles driving between waypoints around a city centre, with sensor
//! readings that drift plausibly, and injected anomalies logged as ground truth.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub(crate) const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// The kinds of anomaly the simulator injects, each meant to trip one default rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    EngineOverheat,
    BatteryOverheat,
    LowTirePressure,
    CargoOverheat,
    LowHumidity,
}

impl AnomalyKind {
    const ALL: [AnomalyKind; 5] = [
        AnomalyKind::EngineOverheat,
        AnomalyKind::BatteryOverheat,
        AnomalyKind::LowTirePressure,
        AnomalyKind::CargoOverheat,
        AnomalyKind::LowHumidity,
    ];

    /// The default rule this anomaly should raise.
    pub fn rule(self) -> &'static str {
        match self {
            AnomalyKind::EngineOverheat => "engine_overheat",
            AnomalyKind::BatteryOverheat => "battery_overheat",
            AnomalyKind::LowTirePressure => "low_tire_pressure",
            AnomalyKind::CargoOverheat => "cargo_overheat",
            AnomalyKind::LowHumidity => "low_humidity",
        }
    }
}

/// One injected anomaly, as written to the ground-truth log.
#[derive(Debug, Clone, Serialize)]
pub struct GroundTruth {
    pub device_id: String,
    pub kind: AnomalyKind,
    pub rule: &'static str,
    pub started_ts: i64,
    /// Event time of the first normal reading after the anomaly; `None` if the run ended first.
    pub ended_ts: Option<i64>,
    pub readings: u32,
}

struct Anomaly {
    kind: AnomalyKind,
    remaining: u32,
    truth: GroundTruth,
}

/// A reading as a device sends it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReading {
    pub device_id: String,
    pub ts: i64,
    pub event_id: String,
    pub lat: f64,
    pub lon: f64,
    pub speed_kmh: f64,
    pub heading_deg: f64,
    pub engine_temp_c: f64,
    pub battery_temp_c: f64,
    pub battery_soc_pct: f64,
    pub tire_pressure_psi: f64,
    pub fuel_pct: f64,
    pub temperature_c: f64,
    pub humidity_pct: f64,
}

struct Vehicle {
    id: String,
    lat: f64,
    lon: f64,
    waypoint: (f64, f64),
    cruise_kmh: f64,
    speed_kmh: f64,
    heading_deg: f64,
    engine_temp_c: f64,
    battery_temp_c: f64,
    battery_soc_pct: f64,
    tire_pressure_psi: f64,
    fuel_pct: f64,
    cargo_temp_c: f64,
    humidity_pct: f64,
    last_ts: Option<i64>,
    sequence: u64,
    anomaly: Option<Anomaly>,
}

/// Where and how the fleet drives.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub vehicles: usize,
    pub center: (f64, f64),
    pub radius_m: f64,
    /// Chance per reading that a vehicle without an anomaly starts one.
    pub anomaly_rate: f64,
    /// Share of readings deliberately made invalid (to exercise validation).
    pub bad_item_ratio: f64,
    pub seed: u64,
    /// Prefix of every device id; runs that share a stack use different ones.
    pub id_prefix: String,
}

pub struct Fleet {
    spec: FleetSpec,
    vehicles: Vec<Vehicle>,
    rng: SmallRng,
    next: usize,
    finished: Vec<GroundTruth>,
    pub injected: u64,
    pub bad_items: u64,
}

/// A reading, or a deliberately invalid item.
pub enum Item {
    Valid(DeviceReading),
    Invalid(serde_json::Value),
}

impl Fleet {
    pub fn new(spec: FleetSpec) -> Fleet {
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let vehicles = (0..spec.vehicles)
            .map(|n| {
                let (lat, lon) = random_point(&mut rng, spec.center, spec.radius_m);
                let cruise_kmh = rng.random_range(20.0..70.0);
                Vehicle {
                    id: format!("{}{n:06}", spec.id_prefix),
                    lat,
                    lon,
                    waypoint: random_point(&mut rng, spec.center, spec.radius_m),
                    cruise_kmh,
                    speed_kmh: cruise_kmh,
                    heading_deg: 0.0,
                    engine_temp_c: rng.random_range(85.0..92.0),
                    battery_temp_c: rng.random_range(25.0..35.0),
                    battery_soc_pct: rng.random_range(40.0..100.0),
                    tire_pressure_psi: rng.random_range(33.0..36.0),
                    fuel_pct: rng.random_range(30.0..100.0),
                    cargo_temp_c: rng.random_range(4.0..20.0),
                    humidity_pct: rng.random_range(35.0..70.0),
                    last_ts: None,
                    sequence: 0,
                    anomaly: None,
                }
            })
            .collect();
        Fleet {
            spec,
            vehicles,
            rng,
            next: 0,
            finished: Vec::new(),
            injected: 0,
            bad_items: 0,
        }
    }

    /// The next reading, round-robin over the fleet, stamped `now`.
    pub fn next_item(&mut self, now: i64) -> Item {
        let index = self.next;
        self.next = (self.next + 1) % self.vehicles.len().max(1);
        let reading = self.step(index, now);
        if self.spec.bad_item_ratio > 0.0 && self.rng.random_bool(self.spec.bad_item_ratio.min(1.0))
        {
            self.bad_items += 1;
            let mut value = serde_json::to_value(&reading).unwrap_or_default();
            value["lat"] = serde_json::json!(91.5);
            return Item::Invalid(value);
        }
        Item::Valid(reading)
    }

    /// Ground truth of anomalies that have ended since the last call.
    pub fn take_finished(&mut self) -> Vec<GroundTruth> {
        std::mem::take(&mut self.finished)
    }

    /// Ground truth of anomalies still running (at the end of a run).
    pub fn running(&self) -> Vec<GroundTruth> {
        self.vehicles
            .iter()
            .filter_map(|v| v.anomaly.as_ref().map(|a| a.truth.clone()))
            .collect()
    }

    fn step(&mut self, index: usize, now: i64) -> DeviceReading {
        let rng = &mut self.rng;
        let vehicle = &mut self.vehicles[index];
        // Event times of one vehicle strictly increase, even when it reports within a millisecond.
        let ts = vehicle.last_ts.map_or(now, |last| now.max(last + 1));
        let dt_s = vehicle
            .last_ts
            .map_or(0.0, |last| (ts - last) as f64 / 1000.0)
            .min(60.0);
        vehicle.last_ts = Some(ts);
        vehicle.sequence += 1;

        // Drive towards the waypoint; pick a new one on arrival.
        let distance = haversine_m((vehicle.lat, vehicle.lon), vehicle.waypoint);
        let step_m = vehicle.speed_kmh / 3.6 * dt_s;
        if distance <= step_m.max(5.0) {
            vehicle.waypoint = random_point(rng, self.spec.center, self.spec.radius_m);
        } else {
            vehicle.heading_deg = bearing_deg((vehicle.lat, vehicle.lon), vehicle.waypoint);
            (vehicle.lat, vehicle.lon) =
                destination((vehicle.lat, vehicle.lon), vehicle.heading_deg, step_m);
        }
        vehicle.speed_kmh = (vehicle.speed_kmh + rng.random_range(-3.0..3.0))
            .clamp(vehicle.cruise_kmh * 0.5, vehicle.cruise_kmh * 1.3);

        // Sensors drift around their normal values.
        let drift = |value: f64, target: f64, noise: f64, rng: &mut SmallRng| {
            value + (target - value) * 0.1 + rng.random_range(-noise..noise)
        };
        vehicle.engine_temp_c = drift(vehicle.engine_temp_c, 89.0, 0.4, rng);
        vehicle.battery_temp_c = drift(vehicle.battery_temp_c, 30.0, 0.3, rng);
        vehicle.tire_pressure_psi = drift(vehicle.tire_pressure_psi, 34.5, 0.05, rng);
        vehicle.cargo_temp_c = drift(vehicle.cargo_temp_c, 12.0, 0.2, rng);
        vehicle.humidity_pct = drift(vehicle.humidity_pct, 50.0, 0.5, rng).clamp(0.0, 100.0);
        vehicle.fuel_pct = (vehicle.fuel_pct - 0.001 * dt_s).max(5.0);
        vehicle.battery_soc_pct = (vehicle.battery_soc_pct - 0.0005 * dt_s).max(10.0);

        let mut reading = DeviceReading {
            device_id: vehicle.id.clone(),
            ts,
            event_id: format!("{}-{}", vehicle.id, vehicle.sequence),
            lat: vehicle.lat,
            lon: vehicle.lon,
            speed_kmh: vehicle.speed_kmh,
            heading_deg: vehicle.heading_deg,
            engine_temp_c: vehicle.engine_temp_c,
            battery_temp_c: vehicle.battery_temp_c,
            battery_soc_pct: vehicle.battery_soc_pct,
            tire_pressure_psi: vehicle.tire_pressure_psi,
            fuel_pct: vehicle.fuel_pct,
            temperature_c: vehicle.cargo_temp_c,
            humidity_pct: vehicle.humidity_pct,
        };

        // Anomalies: start one now and then, and override the sensor while it lasts.
        if vehicle.anomaly.is_none()
            && self.spec.anomaly_rate > 0.0
            && rng.random_bool(self.spec.anomaly_rate.min(1.0))
        {
            let kind = AnomalyKind::ALL[rng.random_range(0..AnomalyKind::ALL.len())];
            self.injected += 1;
            vehicle.anomaly = Some(Anomaly {
                kind,
                remaining: rng.random_range(15..40),
                truth: GroundTruth {
                    device_id: vehicle.id.clone(),
                    kind,
                    rule: kind.rule(),
                    started_ts: ts,
                    ended_ts: None,
                    readings: 0,
                },
            });
        }
        if vehicle.anomaly.as_ref().is_some_and(|a| a.remaining == 0) {
            if let Some(anomaly) = vehicle.anomaly.take() {
                let mut truth = anomaly.truth;
                truth.ended_ts = Some(ts);
                self.finished.push(truth);
            }
        } else if let Some(anomaly) = vehicle.anomaly.as_mut() {
            anomaly.remaining -= 1;
            anomaly.truth.readings += 1;
            match anomaly.kind {
                AnomalyKind::EngineOverheat => {
                    reading.engine_temp_c = rng.random_range(104.0..115.0)
                }
                AnomalyKind::BatteryOverheat => {
                    reading.battery_temp_c = rng.random_range(60.0..66.0)
                }
                AnomalyKind::LowTirePressure => {
                    reading.tire_pressure_psi = rng.random_range(26.0..29.5)
                }
                AnomalyKind::CargoOverheat => reading.temperature_c = rng.random_range(52.0..58.0),
                AnomalyKind::LowHumidity => reading.humidity_pct = rng.random_range(4.0..8.0),
            }
        }
        reading
    }
}

fn random_point(rng: &mut SmallRng, center: (f64, f64), radius_m: f64) -> (f64, f64) {
    let distance = radius_m * rng.random::<f64>().sqrt();
    destination(center, rng.random_range(0.0..360.0), distance)
}

pub(crate) fn haversine_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lat2) = (a.0.to_radians(), b.0.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((b.1 - a.1).to_radians() / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

pub(crate) fn bearing_deg(from: (f64, f64), to: (f64, f64)) -> f64 {
    let (lat1, lat2) = (from.0.to_radians(), to.0.to_radians());
    let dlon = (to.1 - from.1).to_radians();
    let y = dlon.sin() * lat2.cos();
    let x = lat1.cos() * lat2.sin() - lat1.sin() * lat2.cos() * dlon.cos();
    (y.atan2(x).to_degrees() + 360.0) % 360.0
}

pub(crate) fn destination(from: (f64, f64), bearing_deg: f64, distance_m: f64) -> (f64, f64) {
    let angle = distance_m / EARTH_RADIUS_M;
    let (lat1, lon1, bearing) = (
        from.0.to_radians(),
        from.1.to_radians(),
        bearing_deg.to_radians(),
    );
    let lat2 = (lat1.sin() * angle.cos() + lat1.cos() * angle.sin() * bearing.cos()).asin();
    let lon2 = lon1
        + (bearing.sin() * angle.sin() * lat1.cos()).atan2(angle.cos() - lat1.sin() * lat2.sin());
    (
        lat2.to_degrees().clamp(-90.0, 90.0),
        (lon2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(anomaly_rate: f64) -> FleetSpec {
        FleetSpec {
            vehicles: 50,
            center: (52.52, 13.405),
            radius_m: 10_000.0,
            anomaly_rate,
            bad_item_ratio: 0.0,
            seed: 7,
            id_prefix: "sim-".into(),
        }
    }

    #[test]
    fn vehicles_stay_near_the_city_and_move_plausibly() {
        let mut fleet = Fleet::new(spec(0.0));
        let mut last: std::collections::HashMap<String, DeviceReading> = Default::default();
        for step in 0..50 * 120 {
            let now = 1_000_000 + (step / 50) * 1000;
            let Item::Valid(reading) = fleet.next_item(now) else {
                panic!("no bad items asked for")
            };
            assert!(haversine_m((reading.lat, reading.lon), (52.52, 13.405)) < 10_500.0);
            if let Some(previous) = last.get(&reading.device_id) {
                let moved = haversine_m((previous.lat, previous.lon), (reading.lat, reading.lon));
                let seconds = (reading.ts - previous.ts) as f64 / 1000.0;
                assert!(
                    moved <= 95.0 / 3.6 * seconds + 1.0,
                    "{moved} m in {seconds} s"
                );
                assert!(reading.ts > previous.ts);
            }
            assert!(
                (80.0..100.0).contains(&reading.engine_temp_c),
                "{}",
                reading.engine_temp_c
            );
            last.insert(reading.device_id.clone(), reading);
        }
    }

    #[test]
    fn anomalies_are_injected_and_logged() {
        let mut fleet = Fleet::new(spec(0.05));
        let mut hot = 0;
        for step in 0..50 * 200 {
            if let Item::Valid(reading) = fleet.next_item(1_000_000 + step * 20) {
                if reading.engine_temp_c > 100.0 {
                    hot += 1;
                }
            }
        }
        let finished = fleet.take_finished();
        assert!(fleet.injected > 10);
        assert!(!finished.is_empty());
        assert!(finished
            .iter()
            .all(|t| t.ended_ts.unwrap() > t.started_ts && t.readings > 0));
        assert!(hot > 0);
    }
}
