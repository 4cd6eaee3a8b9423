//! End to end through the embedded stack, over HTTP, as a device and an operator would use it.

use std::time::Duration;

use geostream_e2e::http::Client;
use geostream_local::{start, LocalConfig, RunningStack};
use serde_json::{json, Value};

async fn stack() -> RunningStack {
    let config = LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalConfig::default()
    };
    start(config).await.expect("the embedded stack starts")
}

fn now_ms() -> i64 {
    geostream_shared::now_millis()
}

async fn drained(running: &RunningStack) {
    assert!(
        running.wait_drained(Duration::from_secs(20)).await,
        "stream functions did not catch up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_becomes_position_archive_and_alerts() {
    let running = stack().await;
    let client = Client::new(running.addr);
    let t0 = now_ms() - 60_000;
    let reading = |n: i64, engine: f64| {
        json!({
            "device_id": "e2e-truck-1", "ts": t0 + n * 1000, "event_id": format!("e2e-truck-1-{n}"),
            "lat": 52.52 + n as f64 * 1e-4, "lon": 13.405, "speed_kmh": 40.0, "engine_temp_c": engine
        })
    };

    // A normal reading: the position is served by query-api.
    let (status, body) = client
        .post("/v1/telemetry", &json!([reading(0, 88.0)]))
        .await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    drained(&running).await;
    let (status, position) = client.get("/v1/vehicles/e2e-truck-1").await;
    assert_eq!(status, 200, "{position}");
    assert_eq!(
        (position["lat"].as_f64(), position["ts"].as_i64()),
        (Some(52.52), Some(t0))
    );
    let (_, near) = client
        .get("/v1/vehicles/near?lat=52.5201&lon=13.405&radius_m=100")
        .await;
    assert_eq!(near["vehicles"][0]["device_id"], "e2e-truck-1", "{near}");
    let (_, far) = client
        .get("/v1/vehicles/near?lat=48.1&lon=11.5&radius_m=5000")
        .await;
    assert_eq!(far["count"], 0);

    // An over-temperature raises exactly one active alert.
    let hot = json!([reading(1, 104.0), reading(2, 109.5), reading(3, 106.0)]);
    let (status, _) = client.post("/v1/telemetry", &hot).await;
    assert_eq!(status, 202);
    drained(&running).await;
    let (_, active) = client
        .get("/v1/alerts?state=active&device_id=e2e-truck-1")
        .await;
    assert_eq!(active["count"], 1, "{active}");
    let alert = active["alerts"][0].clone();
    assert_eq!(
        (
            alert["rule"].as_str(),
            alert["count"].as_u64(),
            alert["peak_value"].as_f64()
        ),
        (Some("engine_overheat"), Some(3), Some(109.5))
    );
    let transitions_after_raise = running.stack.stats().alert_transitions.unwrap();
    let (_, track) = client
        .get(&format!(
            "/v1/vehicles/e2e-truck-1/track?from={t0}&to={}",
            t0 + 10_000
        ))
        .await;
    assert_eq!(track["count"], 4);

    // A replay of the same batch (at-least-once delivery from a device) changes nothing.
    let (status, _) = client.post("/v1/telemetry", &hot).await;
    assert_eq!(status, 202);
    drained(&running).await;
    let (_, replayed) = client.get("/v1/alerts?device_id=e2e-truck-1").await;
    assert_eq!(
        replayed["alerts"], active["alerts"],
        "a replay must not touch the alert"
    );
    assert_eq!(
        running.stack.stats().alert_transitions.unwrap(),
        transitions_after_raise
    );
    let (_, track) = client
        .get(&format!(
            "/v1/vehicles/e2e-truck-1/track?from={t0}&to={}",
            t0 + 10_000
        ))
        .await;
    assert_eq!(track["count"], 4, "archive writes are upserts");
    let (_, position) = client.get("/v1/vehicles/e2e-truck-1").await;
    assert_eq!(position["ts"].as_i64(), Some(t0 + 3000));

    // An operator acknowledges it.
    let alert_id = alert["alert_id"].as_str().unwrap().replace('|', "%7C");
    let (status, acked) = client
        .post(
            &format!("/v1/alerts/{alert_id}/ack"),
            &json!({"by": "dispatch"}),
        )
        .await;
    assert_eq!(
        (status, acked["acknowledged_by"].as_str()),
        (200, Some("dispatch")),
        "{acked}"
    );

    // A normal reading does not clear it yet (the shipped rules damp flapping: 30 s of normal
    // readings); one 30 s later does, and the acknowledgement stays.
    let (status, _) = client
        .post("/v1/telemetry", &json!([reading(4, 90.0)]))
        .await;
    assert_eq!(status, 202);
    drained(&running).await;
    let (_, active) = client
        .get("/v1/alerts?state=active&device_id=e2e-truck-1")
        .await;
    assert_eq!(active["count"], 1, "{active}");
    let (status, _) = client
        .post("/v1/telemetry", &json!([reading(34, 90.0)]))
        .await;
    assert_eq!(status, 202);
    drained(&running).await;
    let (_, active) = client
        .get("/v1/alerts?state=active&device_id=e2e-truck-1")
        .await;
    assert_eq!(active["count"], 0, "{active}");
    let (_, cleared) = client
        .get("/v1/alerts?state=cleared&device_id=e2e-truck-1")
        .await;
    assert_eq!(cleared["count"], 1);
    assert_eq!(
        cleared["alerts"][0]["cleared_at"].as_i64(),
        Some(t0 + 34_000)
    );
    assert_eq!(cleared["alerts"][0]["acknowledged"], true);
    assert_eq!(
        running.stack.stats().alert_transitions.unwrap(),
        transitions_after_raise + 1
    );
    assert_eq!(running.stack.stats().dead_letters, Some(0));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_bad_items_keeps_its_valid_items() {
    let running = stack().await;
    let client = Client::new(running.addr);
    let now = now_ms();
    let batch = json!([
        {"device_id": "e2e-good-1", "ts": now, "lat": 40.0, "lon": -3.7},
        {"device_id": "e2e-bad", "ts": now, "lat": 95.0, "lon": -3.7},
        {"device_id": "e2e-good-2", "ts": rfc3339(now), "lat": 40.1, "lon": -3.7, "humidity_pct": 40},
        {"device_id": "e2e-bad-2", "ts": now + 86_400_000, "color": "red"},
    ]);
    let (status, body) = client.post("/v1/telemetry", &batch).await;
    assert_eq!(status, 207, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        body["results"][1],
        json!({"status": "rejected", "index": 1, "errors": [{"field": "lat", "message": "95 is out of range [-90, 90]"}]})
    );
    let bad_fields: Vec<&str> = body["results"][3]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(bad_fields, ["color", "ts"]);
    drained(&running).await;
    for device in ["e2e-good-1", "e2e-good-2"] {
        let (status, _) = client.get(&format!("/v1/vehicles/{device}")).await;
        assert_eq!(status, 200, "{device} was valid and must be stored");
    }
    let (status, _) = client.get("/v1/vehicles/e2e-bad").await;
    assert_eq!(status, 404);

    // Whole-body problems are a 400 that says what is wrong.
    let (status, body) = client.post_raw("/v1/telemetry", "{\"device_id\":").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
    running.shutdown().await;
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_is_processed_completely_and_its_anomalies_raise_alerts() {
    let running = stack().await;
    let truth_path =
        std::env::temp_dir().join(format!("geostream-e2e-truth-{}.jsonl", std::process::id()));
    let options = geostream_sim::SimOptions {
        vehicles: 200,
        interval_ms: 0,
        batch_size: 50,
        concurrency: 4,
        max_events: Some(6_000),
        anomaly_rate: 0.01,
        bad_item_ratio: 0.01,
        ground_truth: Some(truth_path.clone()),
        id_prefix: "sim-".into(),
        ..Default::default()
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let report = geostream_sim::run(options, &format!("http://{}", running.addr), stop_rx)
        .await
        .unwrap();
    assert_eq!(report.sent, 6_000);
    assert_eq!(report.request_errors, 0, "{report}");
    assert!(report.sent_invalid > 0);
    assert_eq!(
        report.rejected, report.sent_invalid,
        "exactly the invalid items are rejected"
    );
    assert_eq!(report.accepted + report.rejected, report.sent);
    drained(&running).await;

    let stats = running.stack.stats();
    assert_eq!(stats.positions, Some(200));
    assert_eq!(
        stats.archived_readings.map(|n| n as u64),
        Some(report.accepted),
        "every accepted reading is archived once"
    );
    assert_eq!(stats.dead_letters, Some(0));

    // Every injected anomaly of an instant rule raised an alert that started with it.
    let client = Client::new(running.addr);
    let (_, alerts) = client.get("/v1/alerts?limit=1000").await;
    let alerts = alerts["alerts"].as_array().unwrap().clone();
    let truth = std::fs::read_to_string(&truth_path).unwrap();
    let _ = std::fs::remove_file(&truth_path);
    let mut checked = 0;
    for line in truth.lines() {
        let injected: Value = serde_json::from_str(line).unwrap();
        // Tire pressure must stay low for 10 s before it raises: longer than this run.
        if injected["rule"] == "low_tire_pressure" || injected["readings"] == 0 {
            continue;
        }
        let found = alerts.iter().any(|a| {
            a["device_id"] == injected["device_id"]
                && a["rule"] == injected["rule"]
                && a["started_at"] == injected["started_ts"]
        });
        // The anomaly may have begun on a reading that was deliberately made invalid.
        let (_, track) = client
            .get(&format!(
                "/v1/vehicles/{}/track?from={}&to={}",
                injected["device_id"].as_str().unwrap(),
                injected["started_ts"],
                injected["started_ts"].as_i64().unwrap() + 1
            ))
            .await;
        if track["count"] == 1 {
            assert!(found, "no alert for injected anomaly {line}");
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} anomalies checked");
    running.shutdown().await;
}

/// Every GeoStream metric the dashboard definition draws is emitted by the function it names:
/// the pipeline runs readings good and bad, an alert raised and cleared, a poison record, and
/// the live page's metrics endpoint must then have a series for every widget metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_emitted_by_its_function() {
    use geostream_local::dashboard::Dashboard;
    use geostream_shared::ports::{BusRecord, EventBus};

    let running = stack().await;
    let client = Client::new(running.addr);
    let t0 = now_ms() - 60_000;
    let reading = |n: i64, engine: f64| json!({"device_id": "dash-1", "ts": t0 + n * 1000, "lat": 52.5, "lon": 13.4, "engine_temp_c": engine});
    let mixed = json!([reading(0, 90.0), {"device_id": "dash-2", "ts": "soon"}]);
    assert_eq!(client.post("/v1/telemetry", &mixed).await.0, 207);
    let hot = json!([reading(1, 105.0), reading(2, 108.0)]);
    assert_eq!(client.post("/v1/telemetry", &hot).await.0, 202);
    drained(&running).await;
    let cool = json!([reading(3, 90.0), reading(33, 90.0)]);
    assert_eq!(client.post("/v1/telemetry", &cool).await.0, 202);
    let memory = running.stack.memory.as_ref().unwrap();
    let poison = BusRecord {
        partition_key: "dash-1".into(),
        data: b"not an envelope".to_vec(),
        decoded: None,
    };
    assert!(memory.telemetry.publish(vec![poison]).await[0].is_ok());
    drained(&running).await;
    assert_eq!(client.get("/v1/vehicles/dash-1").await.0, 200);

    let (status, metrics) = client.get("/local/metrics").await;
    assert_eq!(status, 200);
    let total = |function: &str, metric: &str| -> Option<f64> {
        metrics["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["function"] == function && s["metric"] == metric)
            .map(|s| {
                s["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["sum"].as_f64().unwrap())
                    .sum()
            })
    };
    let (_, definition) = client.get("/local/dashboard.json").await;
    let dashboard = Dashboard::parse(&definition.to_string()).unwrap();
    for (function, metric) in dashboard.geostream_metrics().unwrap() {
        assert!(
            total(&function, metric.as_str()).is_some(),
            "the dashboard draws {} of {function}, which {function} does not emit",
            metric.as_str()
        );
    }
    for (function, metric, expected) in [
        ("ingest", "EventsAccepted", 5.0),
        ("ingest", "EventsRejected", 1.0),
        ("anomaly-inspector", "AlertsRaised", 1.0),
        ("anomaly-inspector", "AlertsCleared", 1.0),
        ("archiver", "ReadingsArchived", 5.0),
        ("geo-update", "DeadLetters", 1.0),
        ("archiver", "DeadLetters", 1.0),
        ("anomaly-inspector", "DeadLetters", 1.0),
        ("query-api", "Requests", 1.0),
    ] {
        assert_eq!(
            total(function, metric),
            Some(expected),
            "{function} {metric}"
        );
    }
    assert!(total("geo-update", "PositionsUpdated").unwrap() >= 1.0);
    running.shutdown().await;
}

/// Under a small memory budget the archive evicts its oldest readings and stays within its
/// part; nothing else is lost: every position, the newest part of each track, no dead letter,
/// and `/local/stats` counts what was evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memory_budget_evicts_the_oldest_readings_and_serves_the_rest() {
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        // 960 KiB for the archive: about 6,500 of the 12,000 readings posted; 256 KiB for the
        // telemetry stream.
        memory_budget: geostream_local::MemoryBudget::from_mib(2),
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts");
    let client = Client::new(running.addr);
    let (vehicles, rounds) = (200, 60);
    let t0 = now_ms() - 120_000;
    for round in 0..rounds {
        let items: Vec<Value> = (0..vehicles)
            .map(|v| {
                json!({
                    "device_id": format!("mem-{v:03}"), "ts": t0 + round * 1000,
                    "event_id": format!("mem-{v:03}-{round}"),
                    "lat": 52.5 + v as f64 * 1e-3, "lon": 13.4 + round as f64 * 1e-4,
                    "speed_kmh": 30.0, "heading_deg": 90.0, "engine_temp_c": 85.0,
                    "fuel_pct": 50.0
                })
            })
            .collect();
        let (status, body) = client.post("/v1/telemetry", &Value::from(items)).await;
        assert_eq!(
            (status, body["accepted"].as_u64()),
            (202, Some(vehicles as u64)),
            "{body}"
        );
        // One request at a time, each taken by every function before the next.
        drained(&running).await;
    }

    let (_, stats) = client.get("/local/stats").await;
    let memory = &stats["memory"];
    let archive_bytes = memory["archive_bytes"].as_u64().unwrap();
    assert!(
        archive_bytes <= memory["archive_max_bytes"].as_u64().unwrap(),
        "{memory}"
    );
    let evicted = memory["evicted_readings"].as_u64().unwrap();
    let archived = stats["archived_readings"].as_u64().unwrap();
    assert!(evicted > 1_000, "{memory}");
    assert_eq!(archived + evicted, (vehicles * rounds) as u64, "{stats}");
    assert!(
        memory["archive_bytes_per_reading"].as_f64().unwrap() < 200.0,
        "{memory}"
    );
    assert_eq!(stats["positions"], vehicles);
    assert_eq!(stats["dead_letters"], 0);
    // The stream dropped every record all its functions were done with as the next request
    // came, so it holds one request's records at most (under a KiB each, with their decoded
    // envelopes; its part is 256 KiB) and retention never had to trim.
    assert_eq!(memory["trimmed_stream_records"], 0, "{memory}");
    // Every function was done with a request's records before the next came: no publish
    // waited.
    assert_eq!(memory["held_back_publishes"], 0, "{memory}");
    assert_eq!(memory["publishes_waited_out"], 0, "{memory}");
    assert!(
        memory["telemetry_stream_bytes"].as_u64().unwrap() <= vehicles as u64 * 1024,
        "{memory}"
    );
    for mapping in stats["mappings"].as_array().unwrap() {
        assert_eq!(mapping["records"], vehicles * rounds, "{mapping}");
    }

    // Every vehicle's newest readings are still served, newest last; the evicted were the oldest.
    let mut oldest_kept = i64::MAX;
    for v in [0, 99, 199] {
        let (status, track) = client
            .get(&format!(
                "/v1/vehicles/mem-{v:03}/track?from={t0}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200, "{track}");
        let ts: Vec<i64> = track["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ts"].as_i64().unwrap())
            .collect();
        assert_eq!(ts.last(), Some(&(t0 + (rounds - 1) * 1000)), "{track}");
        assert!(
            ts.len() < rounds as usize,
            "some of mem-{v:03}'s readings were evicted"
        );
        assert!(
            ts.windows(2).all(|w| w[1] == w[0] + 1000),
            "contiguous: {ts:?}"
        );
        assert_eq!(track["readings"][0]["fuel_pct"], 50.0);
        oldest_kept = oldest_kept.min(ts[0]);
    }
    let (_, position) = client.get("/v1/vehicles/mem-000").await;
    assert_eq!(position["ts"], t0 + (rounds - 1) * 1000);
    assert!(oldest_kept > t0);
    assert!(
        memory["archive_bytes_per_reading"].as_f64().unwrap() > 50.0,
        "{memory}"
    );
}
