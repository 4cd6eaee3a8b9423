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

    let (routes, longest) = geostream_e2e::fleet_events::routes_ending_now(23, 2, 2, 3);
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

    // Ten seconds of the fleet per request: each vehicle's readings of those ticks (one bus
    // record per vehicle in a request).
    let batches: Vec<(Vec<Value>, u64)> = (0..longest)
        .collect::<Vec<_>>()
        .chunks(5)
        .map(|ticks| {
            let mut vehicles = 0;
            let mut batch = Vec::new();
            for readings in &routes.readings {
                let of_vehicle: Vec<Value> = ticks
                    .iter()
                    .filter_map(|tick| readings.get(*tick))
                    .map(|reading| serde_json::to_value(reading).unwrap())
                    .collect();
                vehicles += u64::from(!of_vehicle.is_empty());
                batch.extend(of_vehicle);
            }
            (batch, vehicles)
        })
        .collect();
    let post_all = || async {
        for (batch, _) in &batches {
            let (status, answer) = send(
                reqwest::Method::POST,
                "/v1/telemetry".into(),
                Some(Value::Array(batch.clone())),
            )
            .await;
            assert_eq!(status, 202, "{answer}");
        }
    };
    post_all().await;

    let expected = geostream_e2e::fleet_events::truth_keys(&routes);
    // The mappings poll the stream: poll the events, with a deadline that only bounds a
    // failure.
    // Every vehicle's events, as keys comparable with the truth, sorted.
    let event_keys = || async {
        let mut keys = Vec::new();
        for vehicle in 0..2 {
            let (status, body) = send(
                reqwest::Method::GET,
                format!("/v1/events?device_id=route-{vehicle:04}&limit=1000"),
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let events = body["events"].as_array().cloned().unwrap_or_default();
            keys.extend(
                events
                    .iter()
                    .filter_map(geostream_e2e::fleet_events::event_key),
            );
        }
        keys.sort();
        keys
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let made = loop {
        let made = event_keys().await;
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

    // All of it again (a client's retry, a redrive): once the inspector has taken every
    // record of it, no event more.
    let inspected = || -> u64 {
        running
            .stack
            .stats()
            .mappings
            .iter()
            .filter(|m| m.function == geostream_anomaly_inspector::FUNCTION_NAME)
            .map(|m| m.records)
            .sum()
    };
    let before = inspected();
    post_all().await;
    let replayed: u64 = batches.iter().map(|(_, records)| records).sum();
    let deadline = Instant::now() + Duration::from_secs(180);
    while inspected() < before + replayed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        inspected() >= before + replayed,
        "the replay was not taken in time"
    );
    let after_replay = event_keys().await;
    assert_eq!(after_replay, expected, "a replay adds nothing");

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

on_each_emulator!(a_silent_vehicle_is_found_by_the_scheduled_offline_check);

/// The offline-check function as its Lambda main builds it, on the runner's tables: a vehicle
/// heard from once, silent past `offline_after_s`, goes offline once; its next reading brings
/// it back online.
async fn a_silent_vehicle_is_found_by_the_scheduled_offline_check(emulator: Emulator) {
    use geostream_anomaly_inspector::{AnomalyInspector, GEOFENCE_REFRESH};
    use geostream_aws::compose::Composition;
    use geostream_aws::config::{sdk_config, Clients};
    use geostream_offline_check::OfflineCheck;

    let prefix = format!("gs-offline-{:?}-{}", emulator.kind, std::process::id()).to_lowercase();
    let names = ResourceNames::with_prefix(&prefix);
    let config = geostream_local::LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: geostream_local::Backend::Aws(AwsBackend {
            endpoint_url: Some(emulator.endpoint.clone()),
            names: names.clone(),
            create_resources: true,
            archive: ArchiveKind::S3,
            rule_state_store: StoreKind::DynamoDb,
            recent_tracks: None,
            position_store: StoreKind::DynamoDb,
        }),
        shards: 1,
        ..Default::default()
    };
    let running = geostream_local::start(config)
        .await
        .expect("the runner starts on the emulator");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let post = |ts: i64| {
        http.post(format!("{base}/v1/telemetry"))
            .json(&json!({"device_id": "quiet-1", "ts": ts, "lat": 48.1, "lon": 11.5, "speed_kmh": 30.0}))
            .send()
    };
    assert_eq!(
        post(geostream_shared::now_millis())
            .await
            .unwrap()
            .status()
            .as_u16(),
        202
    );

    // The function's ports, built as its main builds them, from the settings Terraform gives it.
    let sdk = sdk_config(Some(&emulator.endpoint)).await;
    let clients = Clients::new(&sdk);
    let queue = geostream_aws::provision::queue_url(&clients, &names.dead_letter_queue)
        .await
        .unwrap();
    let manifest =
        geostream_aws::manifest::function(geostream_offline_check::FUNCTION_NAME).unwrap();
    let ports = Composition::new(
        manifest.name,
        manifest.ports,
        Box::new(names.settings(ArchiveKind::S3, &queue)),
        clients,
    );
    let mut rules = geostream_shared::rules::RuleSet::default_rules();
    rules.fleet.offline_after_ms = 1_500;
    let alerts = ports.alerts().await.unwrap();
    let inspector = AnomalyInspector::new(
        std::sync::Arc::new(rules),
        alerts.clone(),
        ports.alerts_bus().await.unwrap(),
        ports.dead_letters().unwrap(),
    )
    .with_fleet(
        ports.geofences().unwrap(),
        ports.fleet_events().unwrap(),
        GEOFENCE_REFRESH,
    );
    let check = OfflineCheck::new(inspector, ports.silent_candidates().unwrap(), 1_500);

    // Wait until the runner's inspector has heard from the vehicle (a deadline that only
    // bounds a failure), then for the silence.
    let deadline = Instant::now() + Duration::from_secs(60);
    let heard_at = loop {
        let state = alerts.load_rule_states("quiet-1").await.unwrap();
        if let Some(seen) = state.fleet.seen_at {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the inspector never evaluated the reading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = check.run(geostream_shared::now_millis()).await.unwrap();
        if report["offline"] == 1 || Instant::now() > deadline {
            break report;
        }
    };
    assert_eq!(report["offline"], 1, "{report}");
    let again = check.run(geostream_shared::now_millis()).await.unwrap();
    assert_eq!(again["offline"], 0, "once: {again}");
    let events = |kind: &'static str| {
        let url = format!("{base}/v1/events?device_id=quiet-1&type={kind}");
        let http = http.clone();
        async move {
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            body["events"].as_array().cloned().unwrap_or_default()
        }
    };
    let offline = events("device_offline").await;
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert_eq!(offline[0]["ts"].as_i64(), Some(heard_at + 1_500));

    // Back: its next reading, through the runner's inspector.
    let back_at = geostream_shared::now_millis();
    assert_eq!(post(back_at).await.unwrap().status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    let online = loop {
        let online = events("device_online").await;
        if !online.is_empty() || Instant::now() > deadline {
            break online;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(online.len(), 1, "{online:?}");
    assert_eq!(online[0]["ts"].as_i64(), Some(back_at));
    running.shutdown().await;
}
