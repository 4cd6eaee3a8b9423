use super::*;
use crate::geo::destination;
use proptest::prelude::*;

const HOME: GeoPoint = GeoPoint {
    lat: 48.137,
    lon: 11.575,
};

fn at(ts: EpochMillis, point: GeoPoint, speed_kmh: Option<f64>) -> Reading {
    Reading {
        device_id: "truck-1".into(),
        ts,
        event_id: format!("truck-1@{ts}"),
        lat: Some(point.lat),
        lon: Some(point.lon),
        speed_kmh,
        ..Default::default()
    }
}

fn advance_all(rules: &TripRules, readings: &[Reading], cuts: &[usize]) -> Vec<HistoryItem> {
    let mut state = HistoryState::default();
    let mut items = Vec::new();
    let mut from = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (readings.len() + 1)).collect();
    cuts.sort_unstable();
    for cut in cuts.into_iter().chain([readings.len()]) {
        if cut < from {
            continue;
        }
        // Through a serialized copy of the state, as a store keeps it.
        let stored = serde_json::to_string(&state).unwrap();
        state = serde_json::from_str(&stored).unwrap();
        items.extend(rules.advance(&mut state, &readings[from..cut]).items);
        from = cut;
    }
    items
}

fn split(items: Vec<HistoryItem>) -> (Vec<Trip>, Vec<Stop>, Vec<Rollup>) {
    let (mut trips, mut stops, mut minutes) = (Vec::new(), Vec::new(), Vec::new());
    for item in items {
        match item {
            HistoryItem::Trip(t) => trips.push(t),
            HistoryItem::Stop(s) => stops.push(s),
            HistoryItem::Minute(m) => minutes.push(m),
        }
    }
    (trips, stops, minutes)
}

/// The definitions of the module's documentation applied to a whole track at once: every
/// interval classified, the runs of still ones found, then the stretches between stops judged.
fn brute_force(rules: &TripRules, readings: &[Reading]) -> (Vec<Trip>, Vec<Stop>, Vec<Rollup>) {
    let fixes: Vec<&Reading> = readings.iter().filter(|r| r.position().is_some()).collect();
    let point = |i: usize| fixes[i].position().unwrap();
    let ts = |i: usize| fixes[i].ts;
    // Per interval i (fixes i-1 to i), i >= 1.
    let n = fixes.len();
    let mut distance = vec![0.0; n];
    let mut speed: Vec<Option<f64>> = vec![fixes.first().and_then(|r| r.speed_kmh); n.max(1)];
    let mut gap = vec![false; n];
    let mut still = vec![false; n];
    for i in 1..n {
        distance[i] = haversine_m(point(i - 1), point(i));
        let elapsed = ts(i) - ts(i - 1);
        speed[i] = fixes[i]
            .speed_kmh
            .or((elapsed > 0).then(|| distance[i] / (elapsed as f64 / 1000.0) * 3.6));
        gap[i] = elapsed >= rules.max_gap_ms;
        still[i] = gap[i] || speed[i].is_none_or(|s| s < rules.moving_speed_kmh);
    }
    // Stops: runs of still intervals (a, b) long enough or holding a gap.
    let mut stop_runs = Vec::new();
    let mut i = 1;
    while i < n {
        if !still[i] {
            i += 1;
            continue;
        }
        let a = i - 1;
        while i < n && still[i] {
            i += 1;
        }
        let b = i - 1;
        if (a + 1..=b).any(|k| gap[k]) || ts(b) - ts(a) >= rules.min_stop_duration_ms {
            stop_runs.push((a, b));
        }
    }
    let kept = |s: usize, e: usize| {
        // A stretch from s judged at e, the end of its last moving interval.
        let covered: f64 = distance[s + 1..=e].iter().sum();
        e > s
            && (ts(e) - ts(s) >= rules.min_trip_duration_ms || covered >= rules.min_trip_distance_m)
    };
    // A stop from fix `since` to fix `end`, placed at `since`.
    let stop_between = |since: usize, end: usize| Stop {
        start_ts: ts(since),
        end_ts: ts(end),
        lat: point(since).lat,
        lon: point(since).lon,
        duration_s: (ts(end) - ts(since)) as f64 / 1000.0,
    };
    let (mut trips, mut stops) = (Vec::new(), Vec::new());
    let mut stop_since: Option<usize> = None;
    let mut s = 0;
    for &(a, b) in &stop_runs {
        if n > 0 && kept(s, a) {
            if let Some(since) = stop_since {
                stops.push(stop_between(since, s));
            }
            let covered: f64 = distance[s + 1..=a].iter().sum();
            let duration_s = (ts(a) - ts(s)) as f64 / 1000.0;
            trips.push(Trip {
                start_ts: ts(s),
                end_ts: ts(a),
                start: point(s),
                end: point(a),
                distance_m: covered,
                duration_s,
                max_speed_kmh: (s + 1..=a)
                    .map(|k| speed[k].unwrap_or(0.0))
                    .fold(0.0, f64::max),
                avg_speed_kmh: covered / duration_s * 3.6,
            });
            stop_since = Some(a);
        } else {
            stop_since = stop_since.or(Some(a));
        }
        s = b;
    }
    // The stretch under way: a trip once it is long or far enough by its last moving interval.
    if let Some(since) = stop_since {
        let last_moving = (s + 1..n).filter(|&k| !still[k]).max();
        if last_moving.is_some_and(|e| kept(s, e)) {
            stops.push(stop_between(since, s));
        }
    }

    let mut minutes: BTreeMap<EpochMillis, Rollup> = BTreeMap::new();
    let mut fix_index = 0;
    for reading in readings {
        let start = reading.ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        let minute = minutes.entry(start).or_insert_with(|| Rollup::empty(start));
        minute.count += 1;
        for (name, _, _) in READING_FIELDS {
            if let Some(v) = reading.value(name) {
                minute.add_field(name, v);
            }
        }
        for (name, v) in &reading.metrics {
            minute.add_field(&format!("metrics.{name}"), *v);
        }
        if reading.position().is_some() {
            minute.max_speed_kmh = max_of(minute.max_speed_kmh, speed[fix_index]);
            if fix_index > 0 && !gap[fix_index] {
                minute.distance_m += distance[fix_index];
            }
            fix_index += 1;
        }
    }
    // The newest minute is still under way.
    minutes.pop_last();
    (trips, stops, minutes.into_values().collect())
}

/// How a simulated vehicle spends its time.
#[derive(Debug, Clone)]
enum Phase {
    /// Parked: readings every `every_s`, a few metres of GPS wander.
    Park { readings: usize, every_s: i64 },
    /// Driving at `kmh` on a heading, readings every `every_s`.
    Drive {
        readings: usize,
        every_s: i64,
        kmh: f64,
        heading: f64,
    },
    /// Silent this long.
    Silent { seconds: i64 },
}

fn arb_phase() -> impl Strategy<Value = Phase> {
    prop_oneof![
        (1usize..40, 1i64..90).prop_map(|(readings, every_s)| Phase::Park { readings, every_s }),
        (1usize..40, 1i64..60, 6.0f64..120.0, 0.0f64..360.0).prop_map(
            |(readings, every_s, kmh, heading)| Phase::Drive {
                readings,
                every_s,
                kmh,
                heading
            }
        ),
        (60i64..8_000).prop_map(|seconds| Phase::Silent { seconds }),
    ]
}

/// The readings of a day made of `phases`; `sent_speed[i]` says whether reading i sends its
/// speed, `wander[i]` how far (m) a parked one strays, `no_fix[i]` whether it has no position.
fn track(phases: &[Phase], sent_speed: &[bool], wander: &[f64], no_fix: &[bool]) -> Vec<Reading> {
    let mut readings = Vec::new();
    let mut ts: EpochMillis = 1_700_000_000_000;
    let mut here = HOME;
    let mut k = 0;
    let mut push = |ts: EpochMillis, point: GeoPoint, kmh: f64, k: &mut usize| {
        let mut reading = at(ts, point, sent_speed[*k % sent_speed.len()].then_some(kmh));
        if no_fix[*k % no_fix.len()] {
            (reading.lat, reading.lon) = (None, None);
        }
        reading.engine_temp_c = Some(80.0 + (*k % 17) as f64);
        if *k % 3 == 0 {
            reading
                .metrics
                .insert("load_kg".into(), (*k * 7 % 900) as f64);
        }
        readings.push(reading);
        *k += 1;
    };
    for phase in phases {
        match phase {
            Phase::Park {
                readings: n,
                every_s,
            } => {
                for _ in 0..*n {
                    ts += every_s * 1000;
                    let strayed =
                        destination(here, (k * 37 % 360) as f64, wander[k % wander.len()]);
                    push(ts, strayed, 0.0, &mut k);
                }
            }
            Phase::Drive {
                readings: n,
                every_s,
                kmh,
                heading,
            } => {
                for _ in 0..*n {
                    ts += every_s * 1000;
                    here = destination(here, *heading, kmh / 3.6 * *every_s as f64);
                    push(ts, here, *kmh, &mut k);
                }
            }
            Phase::Silent { seconds } => ts += seconds * 1000,
        }
    }
    readings
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Trips, stops and minutes taken batch by batch (the state stored and read back between
    /// batches) are exactly those of the whole track at once.
    #[test]
    fn taken_batch_by_batch_equals_the_whole_track_at_once(
        phases in proptest::collection::vec(arb_phase(), 1..14),
        sent_speed in proptest::collection::vec(any::<bool>(), 1..20),
        wander in proptest::collection::vec(0.0f64..15.0, 1..10),
        no_fix in proptest::collection::vec(prop::bool::weighted(0.1), 1..20),
        cuts in proptest::collection::vec(0usize..600, 0..12),
    ) {
        let rules = TripRules::default();
        let readings = track(&phases, &sent_speed, &wander, &no_fix);
        let taken = split(advance_all(&rules, &readings, &cuts));
        let expected = brute_force(&rules, &readings);
        prop_assert_eq!(&taken.0, &expected.0, "trips");
        prop_assert_eq!(&taken.1, &expected.1, "stops");
        prop_assert_eq!(&taken.2, &expected.2, "minutes");
    }
}

/// A day with a known story: parked, a drive, parked, moved across the yard, parked, a drive.
#[test]
fn a_day_makes_its_trips_and_stops() {
    let rules = TripRules::default();
    let mut readings = Vec::new();
    let mut ts = 0;
    let mut here = HOME;
    let mut every =
        |seconds: i64, count: usize, kmh: f64, heading: f64, readings: &mut Vec<Reading>| {
            for _ in 0..count {
                ts += seconds * 1000;
                here = destination(here, heading, kmh / 3.6 * seconds as f64);
                readings.push(at(ts, here, Some(kmh)));
            }
        };
    every(30, 20, 0.0, 0.0, &mut readings); // parked 10 min (0:00:30 .. 0:10:00)
    every(10, 120, 50.0, 90.0, &mut readings); // 20 min at 50 km/h east: 16.7 km
    every(30, 40, 0.0, 0.0, &mut readings); // parked 20 min
    every(10, 3, 10.0, 0.0, &mut readings); // 30 s across the yard: 83 m
    every(30, 40, 0.0, 0.0, &mut readings); // parked 20 min
    every(10, 60, 40.0, 180.0, &mut readings); // 10 min south
    every(30, 20, 0.0, 0.0, &mut readings); // parked (under way)
    let (trips, stops, _) = split(rules.advance(&mut HistoryState::default(), &readings).items);
    assert_eq!(trips.len(), 2, "{trips:#?}");
    let first = &trips[0];
    assert_eq!((first.start_ts, first.end_ts), (600_000, 1_800_000));
    assert!((first.distance_m - 16_666.7).abs() < 5.0, "{first:?}");
    assert_eq!(first.max_speed_kmh, 50.0);
    assert!((first.avg_speed_kmh - 50.0).abs() < 0.1);
    // The yard move is no trip: one stop from the end of the first drive to the second.
    assert_eq!(stops.len(), 2, "{stops:#?}");
    assert_eq!((stops[0].start_ts, stops[0].end_ts), (30_000, 600_000));
    assert_eq!(stops[1].start_ts, 1_800_000);
    assert_eq!(stops[1].end_ts, trips[1].start_ts);
    assert_eq!(stops[1].duration_s, 2_430.0);
    assert_eq!(trips[1].duration_s, 600.0);
}

/// A data gap ends a trip where the vehicle was last seen and counts as a stop.
#[test]
fn a_gap_ends_a_trip_and_is_a_stop() {
    let rules = TripRules::default();
    let mut readings = Vec::new();
    let mut here = HOME;
    for i in 1..=60 {
        here = destination(here, 0.0, 100.0);
        readings.push(at(i * 10_000, here, Some(36.0)));
    }
    // Two hours silent, then driving on.
    for i in 1..=60 {
        here = destination(here, 0.0, 100.0);
        readings.push(at(600_000 + 7_200_000 + i * 10_000, here, Some(36.0)));
    }
    let (trips, stops, _) = split(rules.advance(&mut HistoryState::default(), &readings).items);
    assert_eq!(trips.len(), 1, "{trips:#?}");
    assert_eq!(trips[0].end_ts, 600_000);
    assert_eq!(stops.len(), 1, "{stops:#?}");
    assert_eq!((stops[0].start_ts, stops[0].end_ts), (600_000, 7_810_000));
}

/// Summaries combine minutes into hours and days; a replayed or late reading is not counted
/// again.
#[test]
fn minutes_combine_and_readings_count_once() {
    let rules = TripRules::default();
    let mut state = HistoryState::default();
    let readings: Vec<Reading> = (0..180)
        .map(|i| {
            let mut r = at(i * 20_000, HOME, Some(i as f64 % 7.0));
            r.engine_temp_c = Some(i as f64);
            r
        })
        .collect();
    let first = rules.advance(&mut state, &readings[..100]);
    let replay = rules.advance(&mut state, &readings[50..150]);
    assert_eq!(replay.skipped, 50);
    let rest = rules.advance(&mut state, &readings[150..]);
    let minutes: Vec<Rollup> = [first.items, replay.items, rest.items]
        .into_iter()
        .flatten()
        .filter_map(|item| match item {
            HistoryItem::Minute(m) => Some(m),
            _ => None,
        })
        .collect();
    // 180 readings, 3 a minute: 59 complete minutes, the 60th under way.
    assert_eq!(minutes.len(), 59);
    assert!(minutes.iter().all(|m| m.count == 3));
    let hours = summarize(&minutes, SummaryInterval::Hour);
    assert_eq!(hours.len(), 1);
    assert_eq!(hours[0].count, 177);
    let engine = &hours[0].fields["engine_temp_c"];
    assert_eq!((engine.min, engine.max), (0.0, 176.0));
    assert!((engine.avg - 88.0).abs() < 1e-9);
    assert_eq!(hours[0].max_speed_kmh, Some(6.0));
    assert_eq!(summarize(&minutes, SummaryInterval::Day)[0].count, 177);
    assert_eq!(summarize(&minutes, SummaryInterval::Minute).len(), 59);
}

#[test]
fn trip_settings_are_checked_by_name() {
    let raw: RawTripRules = toml::from_str("min_stop_duration_s = 0").unwrap();
    let error = raw.compile().unwrap_err();
    assert!(error.contains("min_stop_duration_s"), "{error}");
    let raw: RawTripRules = toml::from_str("max_gap_s = 1800\nmoving_speed_kmh = 3").unwrap();
    let rules = raw.compile().unwrap();
    assert_eq!((rules.max_gap_ms, rules.moving_speed_kmh), (1_800_000, 3.0));
    assert!(toml::from_str::<RawTripRules>("min_trip_s = 1").is_err());
}
