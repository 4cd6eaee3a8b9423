//! Benchmarks of the domain core's hot paths: validating a full request, the bus codec, radius
//! queries over 100,000 vehicles, rule evaluation, and fleet events against 10,000 geofences.
//!
//! Run: `cargo bench -p geostream-shared --bench core`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use geostream_shared::envelope::{envelopes_by_device, Envelope};
use geostream_shared::fleet::{FleetRules, FleetState, Geofence, GeofenceIndex};
use geostream_shared::geo::{cover_circle, destination};
use geostream_shared::memory::MemoryPositionStore;
use geostream_shared::model::{GeoPoint, Position, Reading};
use geostream_shared::ports::PositionStore;
use geostream_shared::rules::{DeviceRuleStates, RuleSet};
use geostream_shared::validation::{validate_body, ValidationPolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const NOW: i64 = 1_763_900_000_000;

fn request_body(items: usize) -> Vec<u8> {
    let items: Vec<serde_json::Value> = (0..items)
        .map(|n| {
            serde_json::json!({
                "device_id": format!("veh-{:06}", n % 1000), "ts": NOW - n as i64, "event_id": format!("e-{n}"),
                "lat": 52.52 + n as f64 * 1e-5, "lon": 13.405, "speed_kmh": 42.5, "heading_deg": 181.0,
                "engine_temp_c": 90.5, "battery_temp_c": 31.0, "battery_soc_pct": 80.0, "tire_pressure_psi": 34.2,
                "fuel_pct": 55.0, "temperature_c": 8.0, "humidity_pct": 45.0
            })
        })
        .collect();
    serde_json::to_vec(&items).unwrap()
}

fn validation_and_codec(c: &mut Criterion) {
    let body = request_body(500);
    let policy = ValidationPolicy::default();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(500));
    group.bench_function("validate 500-item body", |b| {
        b.iter(|| validate_body(black_box(&body), NOW, &policy).unwrap())
    });
    let readings: Vec<Reading> = validate_body(&body, NOW, &policy)
        .unwrap()
        .accepted
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    group.bench_function("group and encode 500 readings", |b| {
        b.iter_batched(
            || readings.clone(),
            |readings| {
                envelopes_by_device(readings, NOW)
                    .iter()
                    .map(Envelope::encode)
                    .count()
            },
            BatchSize::SmallInput,
        )
    });
    let encoded: Vec<Vec<u8>> = envelopes_by_device(readings, NOW)
        .iter()
        .map(Envelope::encode)
        .collect();
    group.bench_function("decode 500 readings", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|data| Envelope::decode(black_box(data)).unwrap().readings.len())
                .sum::<usize>()
        })
    });
    group.finish();
}

fn radius_queries(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryPositionStore::new();
    // 100,000 vehicles spread over a 60 km x 60 km metro area.
    let mut rng = SmallRng::seed_from_u64(7);
    let mut next = || rng.random::<f64>();
    runtime.block_on(async {
        for n in 0..100_000 {
            let (lat, lon) = (52.25 + next() * 0.54, 12.95 + next() * 0.9);
            store
                .upsert_if_newer(Position {
                    device_id: format!("veh-{n:06}"),
                    ts: NOW,
                    event_id: format!("e{n}"),
                    lat,
                    lon,
                    geohash: String::new(),
                    speed_kmh: None,
                    heading_deg: None,
                    received_at: NOW,
                })
                .await
                .unwrap();
        }
    });
    let center = GeoPoint {
        lat: 52.52,
        lon: 13.405,
    };
    let mut group = c.benchmark_group("radius query over 100k vehicles");
    for radius in [500.0, 2_000.0, 10_000.0] {
        group.bench_function(format!("radius {radius} m, limit 100"), |b| {
            b.iter(|| {
                runtime
                    .block_on(store.near(black_box(center), radius, 100))
                    .unwrap()
                    .len()
            })
        });
    }
    group.bench_function("covering only, radius 2000 m", |b| {
        b.iter(|| cover_circle(black_box(center), 2_000.0))
    });
    group.finish();
}

fn rules(c: &mut Criterion) {
    let rules = RuleSet::default_rules();
    let readings: Vec<Reading> = (0..100)
        .map(|n| Reading {
            device_id: "veh-1".into(),
            ts: NOW + n * 1000,
            event_id: format!("e{n}"),
            engine_temp_c: Some(if n % 20 < 3 { 104.0 } else { 90.0 }),
            battery_temp_c: Some(31.0),
            tire_pressure_psi: Some(34.0),
            temperature_c: Some(8.0),
            humidity_pct: Some(45.0),
            ..Default::default()
        })
        .collect();
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(readings.len() as u64));
    group.bench_function("evaluate 100 readings x 6 default rules", |b| {
        b.iter_batched(
            DeviceRuleStates::default,
            |mut state| {
                rules
                    .evaluate("veh-1", &mut state, black_box(&readings))
                    .transitions
                    .len()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// 10,000 geofences over a 100 km square (an 8-corner polygon or a circle each, 150-1,500 m
/// across, a limit on a third), and 100 vehicles' readings spread over it: what one reading
/// costs the anomaly-inspector's fleet step (index lookup, exact tests, state).
fn fleet_events(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(16);
    let center = GeoPoint {
        lat: 48.137,
        lon: 11.575,
    };
    let geofences: Vec<Geofence> = (0..10_000)
        .map(|n| {
            let at = destination(
                center,
                rng.random_range(0.0..360.0),
                rng.random_range(0.0..50_000.0),
            );
            let size_m = rng.random_range(75.0..750.0);
            let geometry = if n % 2 == 0 {
                serde_json::json!({"type": "Point", "coordinates": [at.lon, at.lat], "radius_m": size_m})
            } else {
                let mut ring: Vec<serde_json::Value> = (0..8)
                    .map(|i| {
                        let p = destination(at, i as f64 * 45.0, size_m);
                        serde_json::json!([p.lon, p.lat])
                    })
                    .collect();
                ring.push(ring[0].clone());
                serde_json::json!({"type": "Polygon", "coordinates": [ring]})
            };
            Geofence {
                geofence_id: format!("zone-{n}"),
                name: format!("zone {n}"),
                geometry,
                speed_limit_kmh: (n % 3 == 0).then_some(50.0),
                dwell_s: None,
                exit_margin_m: None,
                updated_at: 0,
            }
        })
        .collect();
    let rules = FleetRules {
        speed_limit_kmh: Some(110.0),
        ..FleetRules::default()
    };
    let (index, refused) = GeofenceIndex::build(&geofences, &rules);
    assert!(refused.is_empty(), "{refused:?}");
    let readings: Vec<Reading> = (0..1_000)
        .map(|n| {
            let at = destination(
                center,
                rng.random_range(0.0..360.0),
                rng.random_range(0.0..50_000.0),
            );
            Reading {
                device_id: format!("veh-{}", n % 100),
                ts: NOW + (n / 100) * 1000,
                event_id: format!("e{n}"),
                lat: Some(at.lat),
                lon: Some(at.lon),
                speed_kmh: Some(rng.random_range(0.0..130.0)),
                ..Default::default()
            }
        })
        .collect();
    let mut group = c.benchmark_group("fleet");
    group.throughput(Throughput::Elements(readings.len() as u64));
    group.bench_function("evaluate 1,000 readings x 10,000 geofences", |b| {
        b.iter_batched(
            || vec![FleetState::default(); 100],
            |mut states| {
                let mut events = 0;
                for (n, reading) in readings.iter().enumerate() {
                    events += rules
                        .evaluate(
                            &index,
                            &reading.device_id,
                            &mut states[n % 100],
                            std::slice::from_ref(black_box(reading)),
                            reading.ts,
                        )
                        .len();
                }
                events
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("build the index of 10,000 geofences", |b| {
        b.iter(|| GeofenceIndex::build(black_box(&geofences), &rules).0.len())
    });
    group.finish();
}

criterion_group!(
    benches,
    validation_and_codec,
    radius_queries,
    rules,
    fleet_events
);
criterion_main!(benches);
