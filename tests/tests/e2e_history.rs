//! Trips, stops and summaries end to end over HTTP: a simulated day of one vehicle, posted with
//! past timestamps as a tracker that was offline would, gives the trips and stops of its ground
//! truth, and summaries equal to a computation over the readings posted; on the embedded stack,
//! and through the AWS adapters (`geostream-local --backend aws`, the history in the DynamoDB
//! table Terraform declares) on each emulator.
//!
//! Tolerance: trip and stop times are exact (each begins and ends at a reading); distances
//! within 0.1% of the ground truth's (the positions are the path's own points); a stop's place
//! within 10 m of where the vehicle came to rest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use geostream_aws::provision::{ArchiveKind, ResourceNames};
use geostream_e2e::harness::Emulator;
use geostream_e2e::history::{day, Day};
use geostream_e2e::http::Client;
use geostream_e2e::on_each_emulator;
use geostream_local::{start, AwsBackend, Backend, LocalConfig, RunningStack, StoreKind};
use geostream_shared::geo::haversine_m;
use geostream_shared::model::GeoPoint;
use serde_json::Value;

const DEVICE: &str = "history-van-1";
const DAY_MS: i64 = 86_400_000;

/// Two days ago, at midnight UTC: within the seven days a reading may be late.
fn midnight() -> i64 {
    let now = geostream_shared::now_millis();
    now - now % DAY_MS - 2 * DAY_MS
}

async fn post_day(client: &Client, day: &Day) {
    for items in day.readings.chunks(100) {
        let (status, body) = client
            .post("/v1/telemetry", &Value::from(items.to_vec()))
            .await;
        assert_eq!(
            (status, body["accepted"].as_u64()),
            (202, Some(items.len() as u64)),
            "{body}"
        );
    }
}

fn point(value: &Value) -> GeoPoint {
    GeoPoint {
        lat: value["lat"].as_f64().unwrap(),
        lon: value["lon"].as_f64().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_gives_its_trips_stops_and_summaries() {
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts");
    a_day_checked_against_its_truth(running).await;
}

on_each_emulator!(a_day_through_the_aws_adapters_gives_its_trips_stops_and_summaries);

async fn a_day_through_the_aws_adapters_gives_its_trips_stops_and_summaries(emulator: Emulator) {
    let prefix = format!("gs-history-{:?}-{}", emulator.kind, std::process::id()).to_lowercase();
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::Aws(AwsBackend {
            endpoint_url: Some(emulator.endpoint.clone()),
            names: ResourceNames::with_prefix(&prefix),
            create_resources: true,
            archive: ArchiveKind::S3,
            rule_state_store: StoreKind::DynamoDb,
            recent_tracks: None,
            position_store: StoreKind::DynamoDb,
        }),
        shards: 2,
        ..LocalConfig::default()
    })
    .await
    .expect("the runner starts on the emulator");
    a_day_checked_against_its_truth(running).await;
}

async fn a_day_checked_against_its_truth(running: RunningStack) {
    let client = Client::new(running.addr);
    let midnight = midnight();
    let day = day(DEVICE, midnight);
    post_day(&client, &day).await;
    let range = format!("from={midnight}&to={}", midnight + DAY_MS);
    // Until the newest complete minute is summarized (on the AWS backend the runner cannot tell
    // when Kinesis is read to its end: moto says every read is at the tip).
    let newest_complete =
        day.readings.last().unwrap()["ts"].as_i64().unwrap() / 60_000 * 60_000 - 60_000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, last_minute) = client
            .get(&format!(
                "/v1/vehicles/{DEVICE}/summary?from={newest_complete}&to={}&interval=1m",
                newest_complete + 60_000
            ))
            .await;
        if last_minute["count"] == 1 && running.wait_drained(Duration::from_secs(5)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the day's last minute was not summarized in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (status, trips) = client
        .get(&format!("/v1/vehicles/{DEVICE}/trips?{range}"))
        .await;
    assert_eq!(status, 200, "{trips}");
    let trips = trips["trips"].as_array().unwrap();
    assert_eq!(trips.len(), day.trips.len(), "{trips:#?}");
    assert_eq!(trips.len(), 4);
    for (trip, truth) in trips.iter().zip(&day.trips) {
        assert_eq!(trip["start_ts"], truth.start_ts, "{trip}");
        assert_eq!(trip["end_ts"], truth.end_ts, "{trip}");
        let distance = trip["distance_m"].as_f64().unwrap();
        assert!(
            (distance - truth.distance_m).abs() <= truth.distance_m * 1e-3,
            "{trip} vs {truth:?}"
        );
        let duration_s = trip["duration_s"].as_f64().unwrap();
        assert_eq!(duration_s, (truth.end_ts - truth.start_ts) as f64 / 1000.0);
        let avg = trip["avg_speed_kmh"].as_f64().unwrap();
        assert!((avg - distance / duration_s * 3.6).abs() < 1e-9, "{trip}");
        // Speeds swing 30% about 45-50 km/h.
        let max = trip["max_speed_kmh"].as_f64().unwrap();
        assert!((55.0..=66.0).contains(&max), "{trip}");
        assert!(haversine_m(point(&trip["start"]), point(&trip["end"])) > 500.0);
    }

    let (status, stops) = client
        .get(&format!("/v1/vehicles/{DEVICE}/stops?{range}"))
        .await;
    assert_eq!(status, 200, "{stops}");
    let stops = stops["stops"].as_array().unwrap();
    assert_eq!(stops.len(), day.stops.len(), "{stops:#?}");
    for (stop, truth) in stops.iter().zip(&day.stops) {
        assert_eq!(stop["start_ts"], truth.start_ts, "{stop}");
        assert_eq!(stop["end_ts"], truth.end_ts, "{stop}");
        assert!(
            haversine_m(point(stop), truth.at) < 10.0,
            "{stop} vs {truth:?}"
        );
    }
    // The yard move was no trip: the stop at work lasts from arrival to the next errand.
    assert_eq!(
        stops[1]["duration_s"].as_f64(),
        Some((day.trips[1].start_ts - day.trips[0].end_ts) as f64 / 1000.0)
    );

    // Summaries against the readings posted (but the newest minute's: still under way).
    let newest_minute = day.readings.last().unwrap()["ts"].as_i64().unwrap() / 60_000 * 60_000;
    let counted: Vec<&Value> = day
        .readings
        .iter()
        .filter(|r| r["ts"].as_i64().unwrap() < newest_minute)
        .collect();
    for (interval, width) in [("1h", 3_600_000), ("1m", 60_000), ("1d", DAY_MS)] {
        let (status, summary) = client
            .get(&format!(
                "/v1/vehicles/{DEVICE}/summary?{range}&interval={interval}"
            ))
            .await;
        assert_eq!(status, 200, "{summary}");
        let expected = brute_force(&day.readings, &counted, width);
        let buckets = summary["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), expected.len(), "{interval}");
        for (bucket, (start, truth)) in buckets.iter().zip(&expected) {
            assert_eq!(bucket["start"], *start, "{interval}");
            assert_eq!(bucket["count"], truth.count, "{interval} {bucket}");
            let distance = bucket["distance_m"].as_f64().unwrap();
            assert!(
                (distance - truth.distance_m).abs() <= 1e-6 * truth.distance_m.max(1.0),
                "{interval} {bucket}: {} m expected",
                truth.distance_m
            );
            assert_eq!(
                bucket["max_speed_kmh"].as_f64(),
                truth.max_speed,
                "{bucket}"
            );
            let fields = bucket["fields"].as_object().unwrap();
            assert_eq!(
                fields.keys().collect::<Vec<_>>(),
                truth.fields.keys().collect::<Vec<_>>(),
                "{bucket}"
            );
            for (name, (min, sum, max, n)) in &truth.fields {
                let field = &fields[name];
                assert_eq!(field["min"].as_f64(), Some(*min), "{name} {bucket}");
                assert_eq!(field["max"].as_f64(), Some(*max), "{name} {bucket}");
                let avg = field["avg"].as_f64().unwrap();
                assert!((avg - sum / *n as f64).abs() < 1e-9, "{name} {bucket}");
            }
        }
    }
    running.shutdown().await;
}

#[derive(Default)]
struct TrueBucket {
    count: u64,
    distance_m: f64,
    max_speed: Option<f64>,
    /// min, sum, max, count
    fields: BTreeMap<String, (f64, f64, f64, u64)>,
}

/// Buckets of `width` over the `counted` readings: each reading's fields, its speed (sent, or
/// implied by the distance from the previous reading of the day), and the distance from the
/// previous reading (the day has no data gap).
fn brute_force(all: &[Value], counted: &[&Value], width: i64) -> BTreeMap<i64, TrueBucket> {
    let mut buckets: BTreeMap<i64, TrueBucket> = BTreeMap::new();
    for (i, reading) in all.iter().enumerate().take(counted.len()) {
        let ts = reading["ts"].as_i64().unwrap();
        let bucket = buckets.entry(ts / width * width).or_default();
        bucket.count += 1;
        let mut fields: Vec<(String, f64)> = ["engine_temp_c", "fuel_pct", "speed_kmh"]
            .iter()
            .filter_map(|name| Some((name.to_string(), reading[*name].as_f64()?)))
            .collect();
        if let Some(load) = reading["metrics"]["load_kg"].as_f64() {
            fields.push(("metrics.load_kg".into(), load));
        }
        for (name, value) in fields {
            let entry = bucket.fields.entry(name).or_insert((value, 0.0, value, 0));
            *entry = (
                entry.0.min(value),
                entry.1 + value,
                entry.2.max(value),
                entry.3 + 1,
            );
        }
        let mut speed = reading["speed_kmh"].as_f64();
        if i > 0 {
            let previous = &all[i - 1];
            let metres = haversine_m(point(previous), point(reading));
            bucket.distance_m += metres;
            let elapsed_s = (ts - previous["ts"].as_i64().unwrap()) as f64 / 1000.0;
            speed = speed.or(Some(metres / elapsed_s * 3.6));
        }
        if let Some(speed) = speed {
            bucket.max_speed = Some(bucket.max_speed.map_or(speed, |m: f64| m.max(speed)));
        }
    }
    buckets
}
