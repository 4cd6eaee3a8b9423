use super::*;
use crate::geo::destination;
use proptest::prelude::*;
use serde_json::json;

/// A square of about 1.1 km side around (48.137, 11.575) (Munich), corners in GeoJSON order.
fn depot() -> Geofence {
    Geofence::from_request(
        "depot",
        json!({
            "name": "Depot",
            "geometry": {"type": "Polygon", "coordinates": [[
                [11.57, 48.132], [11.585, 48.132], [11.585, 48.142], [11.57, 48.142], [11.57, 48.132]
            ]]},
            "speed_limit_kmh": 30,
            "dwell_s": 20,
            "exit_margin_m": 40
        })
        .to_string()
        .as_bytes(),
        0,
    )
    .unwrap()
}

fn reading(ts: EpochMillis, at: GeoPoint, speed_kmh: f64) -> Reading {
    Reading {
        device_id: "truck-1".into(),
        ts,
        event_id: format!("truck-1@{ts}"),
        lat: Some(at.lat),
        lon: Some(at.lon),
        speed_kmh: Some(speed_kmh),
        ..Default::default()
    }
}

/// The depot's western edge is at longitude 11.57; `metres` east of it (negative: west).
fn off_west_edge(metres: f64) -> GeoPoint {
    destination(
        GeoPoint {
            lat: 48.137,
            lon: 11.57,
        },
        90.0,
        metres,
    )
}

/// Evaluates as the anomaly-inspector does, its clock at the newest reading's time.
fn eval<R: std::borrow::Borrow<Reading>>(
    rules: &FleetRules,
    index: &GeofenceIndex,
    state: &mut FleetState,
    readings: &[R],
) -> Vec<FleetEvent> {
    let now = readings.iter().map(|r| r.borrow().ts).max().unwrap_or(0);
    rules.evaluate(index, "truck-1", state, readings, now)
}

fn kinds(events: &[FleetEvent]) -> Vec<(FleetEventType, EpochMillis)> {
    events.iter().map(|e| (e.kind, e.ts)).collect()
}

/// Drives in from 500 m west, zigzags across the western edge within the 40 m margin for a
/// minute, stays 5 minutes, then drives out to the west: one enter, one exit.
fn drive_in_zigzag_stay_and_out() -> Vec<Reading> {
    let mut readings = Vec::new();
    let mut ts = 1_000_000;
    let mut at = |ts: &mut EpochMillis, metres: f64| {
        readings.push(reading(*ts, off_west_edge(metres), 20.0));
        *ts += 2_000;
    };
    for m in (-500..0).step_by(50) {
        at(&mut ts, m as f64);
    }
    // First inside reading at 1_020_000 (after ten approach readings).
    for i in 0..30 {
        at(&mut ts, if i % 2 == 0 { 15.0 } else { -15.0 });
    }
    for _ in 0..150 {
        at(&mut ts, 300.0);
    }
    for m in (0..=500).rev().step_by(50) {
        at(&mut ts, m as f64 - 500.0 + 290.0);
    }
    readings
}

#[test]
fn jitter_at_the_boundary_makes_one_enter_and_one_exit() {
    let rules = FleetRules::default();
    let (index, refused) = GeofenceIndex::build(&[depot()], &rules);
    assert!(refused.is_empty());
    let readings = drive_in_zigzag_stay_and_out();
    let mut state = FleetState::default();
    let events = eval(&rules, &index, &mut state, &readings);
    let geofence: Vec<_> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                FleetEventType::GeofenceEnter | FleetEventType::GeofenceExit
            )
        })
        .collect();
    assert_eq!(
        geofence.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [FleetEventType::GeofenceEnter, FleetEventType::GeofenceExit],
        "{events:#?}"
    );
    // The enter is the first reading inside of the streak that lasted the 20 s dwell: the
    // zigzag's readings inside alternate with ones outside, so only the stay counts.
    let first_stay = 1_000_000 + (10 + 30) * 2_000;
    assert_eq!(geofence[0].ts, first_stay);
    // The exit is the first reading outside on the way out (the margin passed later).
    let first_out = readings
        .iter()
        .rev()
        .take_while(|r| {
            !index
                .get("depot")
                .unwrap()
                .shape
                .contains(r.position().unwrap())
        })
        .last()
        .unwrap()
        .ts;
    assert_eq!(geofence[1].ts, first_out);
    assert!(state.geofences.is_empty());

    // A replay, or the same readings again in another order, makes nothing.
    let mut shuffled = readings.clone();
    shuffled.reverse();
    assert!(eval(&rules, &index, &mut state, &shuffled).is_empty());
}

#[test]
fn the_same_readings_in_batches_of_any_size_make_the_same_events() {
    let rules = FleetRules::default();
    let (index, _) = GeofenceIndex::build(&[depot()], &rules);
    let readings = drive_in_zigzag_stay_and_out();
    let mut whole = FleetState::default();
    let expected = eval(&rules, &index, &mut whole, &readings);
    for size in [1, 7, 50] {
        let mut state = FleetState::default();
        let events: Vec<FleetEvent> = readings
            .chunks(size)
            .flat_map(|chunk| eval(&rules, &index, &mut state, chunk))
            .collect();
        assert_eq!(events, expected, "batches of {size}");
        assert_eq!(state, whole);
    }
}

#[test]
fn overspeed_in_a_zone_starts_once_and_ends_once_with_the_peak() {
    let rules = FleetRules {
        speed_limit_kmh: Some(90.0),
        ..FleetRules::default()
    };
    let (index, _) = GeofenceIndex::build(&[depot()], &rules);
    let inside = off_west_edge(500.0);
    // The depot's limit is 30 km/h (the fleet's 90 applies outside). A reading every 2 s: a
    // burst above 30 cut short by 29 km/h at index 4 (under the 10 s minimum: no start), then
    // above 30 from index 5 for over 10 s (peak 46), 27 km/h at index 12 (not yet at or below
    // 25, the limit less the 5 km/h hysteresis), then 20 km/h from index 13 for 10 s.
    let speeds = [
        25.0, 45.0, 47.0, 52.0, 29.0, 46.0, 44.0, 45.0, 43.0, 41.0, 40.0, 38.0, 27.0, 20.0, 20.0,
        20.0, 20.0, 20.0, 20.0, 20.0,
    ];
    let readings: Vec<Reading> = speeds
        .iter()
        .enumerate()
        .map(|(i, v)| reading(2_000_000 + i as i64 * 2_000, inside, *v))
        .collect();
    let mut state = FleetState::default();
    let events = eval(&rules, &index, &mut state, &readings);
    let overspeed: Vec<&FleetEvent> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                FleetEventType::OverspeedStart | FleetEventType::OverspeedEnd
            )
        })
        .collect();
    assert_eq!(
        kinds(&overspeed.iter().map(|e| (*e).clone()).collect::<Vec<_>>()),
        [
            (FleetEventType::OverspeedStart, 2_010_000),
            (FleetEventType::OverspeedEnd, 2_026_000)
        ],
        "{events:#?}"
    );
    assert_eq!(overspeed[0].limit, Some(30.0));
    assert_eq!(overspeed[0].geofence_id.as_deref(), Some("depot"));
    assert_eq!(overspeed[1].value, Some(46.0), "the peak of the episode");
    // Outside the depot only the fleet-wide 90 applies.
    let mut outside = FleetState::default();
    let far = GeoPoint {
        lat: 48.2,
        lon: 11.7,
    };
    let fast: Vec<Reading> = (0..10)
        .map(|i| reading(3_000_000 + i * 2_000, far, 60.0))
        .collect();
    assert!(eval(&rules, &index, &mut outside, &fast).is_empty());
}

#[test]
fn a_silent_vehicle_goes_offline_once_and_its_next_reading_brings_it_online() {
    let rules = FleetRules {
        offline_after_ms: 600_000,
        ..FleetRules::default()
    };
    let index = GeofenceIndex::default();
    let mut state = FleetState::default();
    let far = GeoPoint {
        lat: 48.2,
        lon: 11.7,
    };
    eval(&rules, &index, &mut state, &[reading(1_000, far, 0.0)]);
    assert_eq!(rules.check_offline("truck-1", &mut state, 600_999), None);
    let offline = rules.check_offline("truck-1", &mut state, 601_000).unwrap();
    assert_eq!(
        (offline.kind, offline.ts),
        (FleetEventType::DeviceOffline, 601_000)
    );
    assert_eq!(offline.lat, Some(48.2));
    assert_eq!(rules.check_offline("truck-1", &mut state, 900_000), None);
    let back = eval(&rules, &index, &mut state, &[reading(900_000, far, 0.0)]);
    assert_eq!(kinds(&back), [(FleetEventType::DeviceOnline, 900_000)]);
    // A replay of the reading that brought it back makes nothing.
    assert!(eval(&rules, &index, &mut state, &[reading(900_000, far, 0.0)]).is_empty());
}

#[test]
fn a_circle_geofence_and_a_deleted_one() {
    let rules = FleetRules {
        default_dwell_ms: 0,
        ..FleetRules::default()
    };
    let yard = Geofence::from_request(
        "yard",
        br#"{"geometry": {"type": "Point", "coordinates": [11.6, 48.1], "radius_m": 200}}"#,
        0,
    )
    .unwrap();
    let (index, _) = GeofenceIndex::build(&[yard], &rules);
    let center = GeoPoint {
        lat: 48.1,
        lon: 11.6,
    };
    let mut state = FleetState::default();
    let events = eval(
        &rules,
        &index,
        &mut state,
        &[
            reading(1_000, destination(center, 0.0, 400.0), 10.0),
            reading(2_000, destination(center, 0.0, 150.0), 10.0),
            reading(3_000, destination(center, 0.0, 210.0), 10.0),
            reading(4_000, destination(center, 0.0, 260.0), 10.0),
        ],
    );
    assert_eq!(
        kinds(&events),
        [
            (FleetEventType::GeofenceEnter, 2_000),
            (FleetEventType::GeofenceExit, 3_000)
        ]
    );
    eval(&rules, &index, &mut state, &[reading(5_000, center, 10.0)]);
    assert_eq!(state.geofences.get("yard"), Some(&Membership::Inside));
    // Deleted: the membership ends without an exit.
    let empty = GeofenceIndex::default();
    assert!(eval(&rules, &empty, &mut state, &[reading(6_000, center, 10.0)]).is_empty());
    assert!(state.geofences.is_empty());
}

#[test]
fn invalid_geometries_are_refused_naming_the_problem() {
    let refused = |geometry: Value| {
        Geofence::from_request(
            "g",
            json!({ "geometry": geometry }).to_string().as_bytes(),
            0,
        )
        .unwrap_err()
    };
    let open =
        refused(json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}));
    assert!(open.contains("not closed"), "{open}");
    let bowtie = refused(
        json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}),
    );
    assert!(bowtie.contains("self-intersect"), "{bowtie}");
    let far =
        refused(json!({"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [1, 1], [0, 0]]]}));
    assert!(far.contains("longitude 200"), "{far}");
    let many: Vec<Value> = (0..=MAX_GEOFENCE_VERTICES)
        .map(|i| {
            let angle = i as f64 / MAX_GEOFENCE_VERTICES as f64 * std::f64::consts::TAU;
            json!([angle.cos(), angle.sin()])
        })
        .collect();
    let mut ring = many.clone();
    ring.push(many[0].clone());
    let too_many = refused(json!({"type": "Polygon", "coordinates": [ring]}));
    assert!(too_many.contains("vertices"), "{too_many}");
    let no_radius = refused(json!({"type": "Point", "coordinates": [11.6, 48.1]}));
    assert!(no_radius.contains("radius_m"), "{no_radius}");
    let line = refused(json!({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}));
    assert!(line.contains("LineString"), "{line}");
    let wide = refused(
        json!({"type": "Polygon", "coordinates": [[[-170, 0], [170, 0], [170, 1], [-170, 1], [-170, 0]]]}),
    );
    assert!(wide.contains("antimeridian"), "{wide}");
    let bad_field =
        Geofence::from_request("g", br#"{"geometry": null, "colour": 1}"#, 0).unwrap_err();
    assert!(bad_field.contains("colour"), "{bad_field}");
    assert!(Geofence::from_request("a b", b"{}", 0)
        .unwrap_err()
        .contains("geofence id"));
}

fn arb_fence() -> impl Strategy<Value = Geofence> {
    (
        47.0f64..49.0,
        10.0f64..12.0,
        3usize..12,
        100.0f64..20_000.0,
        0.0f64..500.0,
        any::<bool>(),
    )
        .prop_map(|(lat, lon, corners, size_m, margin, circle)| {
            let center = GeoPoint { lat, lon };
            let geometry = if circle {
                json!({"type": "Point", "coordinates": [lon, lat], "radius_m": size_m})
            } else {
                // A convex polygon: corners on a circle, counter-clockwise.
                let mut ring: Vec<Value> = (0..corners)
                    .map(|i| {
                        let p = destination(center, i as f64 * 360.0 / corners as f64, size_m);
                        json!([p.lon, p.lat])
                    })
                    .collect();
                ring.push(ring[0].clone());
                json!({"type": "Polygon", "coordinates": [ring]})
            };
            Geofence {
                geofence_id: format!("g-{lat:.5}-{lon:.5}"),
                name: "g".into(),
                geometry,
                speed_limit_kmh: None,
                dwell_s: None,
                exit_margin_m: Some(margin),
                updated_at: 0,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The index never leaves out a geofence a point is inside or within the margin of: its
    /// answer holds every one a brute-force test over all geofences finds.
    #[test]
    fn the_index_finds_every_geofence_near_a_point(
        fences in prop::collection::vec(arb_fence(), 1..40),
        points in prop::collection::vec((46.9f64..49.1, 9.9f64..12.1), 1..60),
    ) {
        let rules = FleetRules::default();
        let (index, refused) = GeofenceIndex::build(&fences, &rules);
        prop_assert!(refused.is_empty(), "{:?}", refused);
        let all: Vec<CompiledGeofence> = fences
            .iter()
            .map(|f| CompiledGeofence::compile(f, &rules).unwrap())
            .collect();
        for (lat, lon) in points {
            let point = GeoPoint { lat, lon };
            let found: Vec<&str> = index.candidates(point).map(|f| &*f.geofence_id).collect();
            for fence in &all {
                if fence.shape.distance_m(point) <= fence.exit_margin_m {
                    prop_assert!(found.contains(&&*fence.geofence_id), "{} near {:?}", fence.geofence_id, point);
                }
            }
        }
    }
}

#[test]
fn silence_is_judged_by_when_readings_arrive_and_kept_readings_do_not_come_back_early() {
    let rules = FleetRules::default();
    let index = GeofenceIndex::default();
    let far = GeoPoint {
        lat: 48.2,
        lon: 11.7,
    };
    let mut state = FleetState::default();
    // A device uploading readings an hour old is heard from now: not silent.
    let now = 10_000_000;
    rules.evaluate(
        &index,
        "truck-1",
        &mut state,
        &[reading(now - 3_600_000, far, 0.0)],
        now,
    );
    assert_eq!(
        rules.check_offline("truck-1", &mut state, now + 1_000),
        None
    );
    let offline = rules
        .check_offline("truck-1", &mut state, now + 600_000)
        .unwrap();
    assert_eq!(offline.ts, now + 600_000);
    // Back with a reading it kept from before it went offline: online when heard from, not
    // before the offline.
    let back = rules.evaluate(
        &index,
        "truck-1",
        &mut state,
        &[reading(now - 3_500_000, far, 0.0)],
        now + 700_000,
    );
    assert_eq!(
        kinds(&back),
        [(FleetEventType::DeviceOnline, now + 600_000)]
    );
}

#[test]
fn a_reading_without_a_fix_keeps_the_zone_limit_it_was_last_seen_in() {
    let rules = FleetRules {
        speed_limit_kmh: Some(90.0),
        ..FleetRules::default()
    };
    let (index, _) = GeofenceIndex::build(&[depot()], &rules);
    let inside = off_west_edge(500.0);
    let mut readings: Vec<Reading> = (0..8)
        .map(|i| reading(1_000_000 + i * 2_000, inside, 45.0))
        .collect();
    // Into a tunnel in the depot's 30 km/h zone: no position, still 45 km/h.
    readings.extend((8..14).map(|i| Reading {
        lat: None,
        lon: None,
        ..reading(1_000_000 + i * 2_000, inside, 45.0)
    }));
    let events = eval(&rules, &index, &mut FleetState::default(), &readings);
    let overspeed: Vec<_> = kinds(&events)
        .into_iter()
        .filter(|(kind, _)| {
            matches!(
                kind,
                FleetEventType::OverspeedStart | FleetEventType::OverspeedEnd
            )
        })
        .collect();
    assert_eq!(overspeed, [(FleetEventType::OverspeedStart, 1_000_000)]);
}
