//! Fleet events through the AWS adapters: `geostream-local --backend aws` on each emulator,
//! with geofences, events and occupants in the DynamoDB tables Terraform declares, built by
//! the composition root the Lambda mains use. The simulator's routes across a grid of
//! geofences (zigzags at boundaries, speeding on the road) must make exactly their ground
//! truth, as on the embedded stack (`tests/tests/e2e_fleet.rs`).

use std::time::{Duration, Instant};

use geostream_aws::provision::{ArchiveKind, ResourceNames};
use geostream_e2e::harness::Emulator;
use geostream_e2e::on_each_emulator;
use geostream_local::{AwsBackend, StoreKind};
use geostream_sim::geofence_routes::{self, RouteSpec};
use serde_json::{json, Value};

on_each_emulator!(fleet_events_through_the_aws_adapters_equal_the_ground_truth);

async fn fleet_events_through_the_aws_adapters_equal_the_ground_truth(emulator: Emulator) {
    let prefix = format!("gs-fleet-{:?}-{}", emulator.kind, std::process::id()).to_lowercase();
    let rules = geostream_e2e::fleet_events::route_rules();
    let config = geostream_local::LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: geostream_local::Backend::Aws(AwsBackend {
            endpoint_url: Some(emulator.endpoint.clone()),
            names: ResourceNames::with_prefix(&prefix),
            create_resources: true,
            archive: ArchiveKind::S3,
            rule_state_store: StoreKind::DynamoDb,
            recent_tracks: None,
            position_store: StoreKind::DynamoDb,
        }),
        shards: 2,
        rules,
        ..Default::default()
    };
    let running = geostream_local::start(config)
        .await
        .expect("the runner starts on the emulator");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut request = http.request(method, format!("{base}{path}"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    let mut spec = RouteSpec {
        seed: 23,
        vehicles: 2,
        visits: 2,
        grid: 3,
        origin: (48.10, 11.50),
        start_ts: 0,
    };
    let longest = geofence_routes::routes(&spec)
        .readings
        .iter()
        .map(Vec::len)
        .max()
        .unwrap() as i64;
    spec.start_ts = geostream_shared::now_millis() - 5_000 - longest * 2_000;
    let routes = geofence_routes::routes(&spec);
    for geofence in &routes.geofences {
        let (status, body) = send(
            reqwest::Method::PUT,
            format!("/v1/geofences/{}", geofence.geofence_id),
            Some(geofence.body.clone()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, listed) = send(reqwest::Method::GET, "/v1/geofences".into(), None).await;
    assert_eq!(
        (status, listed["count"].clone()),
        (200, json!(9)),
        "{listed}"
    );
    let (status, refused) = send(
        reqwest::Method::PUT,
        "/v1/geofences/open".into(),
        Some(json!({"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");

    // Ten seconds of the fleet per request: each vehicle's readings of those ticks.
    for ticks in (0..longest as usize).collect::<Vec<_>>().chunks(5) {
        let batch: Vec<Value> = routes
            .readings
            .iter()
            .flat_map(|readings| ticks.iter().filter_map(|tick| readings.get(*tick)))
            .map(|reading| serde_json::to_value(reading).unwrap())
            .collect();
        let (status, answer) = send(
            reqwest::Method::POST,
            "/v1/telemetry".into(),
            Some(Value::Array(batch)),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
    }

    let expected = geostream_e2e::fleet_events::truth_keys(&routes);
    // The mappings poll the stream: poll the events, with a deadline that only bounds a
    // failure.
    let deadline = Instant::now() + Duration::from_secs(180);
    let made = loop {
        let mut made = Vec::new();
        for vehicle in 0..spec.vehicles {
            let device = format!("route-{vehicle:04}");
            let (status, body) = send(
                reqwest::Method::GET,
                format!("/v1/events?device_id={device}&limit=1000"),
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().cloned().unwrap_or_default();
            made.extend(
                events
                    .iter()
                    .filter_map(geostream_e2e::fleet_events::event_key),
            );
        }
        made.sort();
        if made.len() >= expected.len() || Instant::now() > deadline {
            break made;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        expected.len() >= 8,
        "a scenario worth the name: {expected:?}"
    );
    assert_eq!(made, expected);

    // The fleet-wide listing (the by-day index) and one geofence's (the by-geofence index).
    let enters = routes
        .truth
        .iter()
        .filter(|e| e.kind == "geofence_enter")
        .count();
    let (_, all) = send(
        reqwest::Method::GET,
        "/v1/events?type=geofence_enter&limit=1000".into(),
        None,
    )
    .await;
    assert_eq!(all["count"], json!(enters), "{all}");
    let visited = routes
        .truth
        .iter()
        .find_map(|e| e.geofence_id.clone())
        .unwrap();
    let (_, one) = send(
        reqwest::Method::GET,
        format!("/v1/events?geofence_id={visited}&limit=1000"),
        None,
    )
    .await;
    let of_visited = routes
        .truth
        .iter()
        .filter(|e| e.geofence_id.as_deref() == Some(visited.as_str()))
        .count();
    assert_eq!(one["count"], json!(of_visited), "{one}");
    // Every vehicle drove out of its last geofence: nobody is inside.
    let (status, inside) = send(
        reqwest::Method::GET,
        format!("/v1/geofences/{visited}/vehicles"),
        None,
    )
    .await;
    assert_eq!(
        (status, inside["count"].clone()),
        (200, json!(0)),
        "{inside}"
    );

    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("/v1/geofences/{visited}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send(
        reqwest::Method::DELETE,
        format!("/v1/geofences/{visited}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "a second delete finds nothing");
    running.shutdown().await;
}
