//! Retention by age on the embedded runner (`--retention KIND=DAYS`): a vehicle's day four days
//! ago, kept two days, is swept away (its position, track, trips, stops and summaries, counted
//! on `/local/stats`), while a vehicle reporting now keeps all of its own.

use std::time::{Duration, Instant};

use geostream_e2e::history::day;
use geostream_e2e::http::Client;
use geostream_local::retention::Retention;
use geostream_local::{start, LocalConfig};
use serde_json::{json, Value};

const DAY_MS: i64 = 86_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_older_than_its_retention_is_swept_away() {
    let mut retention = Retention {
        sweep_every: Duration::from_millis(100),
        ..Retention::default()
    };
    for kind in ["readings", "history", "positions", "fleet-events", "alerts"] {
        retention.set(&format!("{kind}=2")).unwrap();
    }
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        retention,
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts");
    let client = Client::new(running.addr);
    let now = geostream_shared::now_millis();
    let midnight = now - now % DAY_MS - 4 * DAY_MS;
    let old = day("old-van", midnight);
    for items in old.readings.chunks(500) {
        let (status, body) = client
            .post("/v1/telemetry", &Value::from(items.to_vec()))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let fresh =
        json!({"device_id": "new-van", "ts": now, "lat": 52.5, "lon": 13.4, "speed_kmh": 30});
    assert_eq!(client.post("/v1/telemetry", &fresh).await.0, 202);
    assert!(running.wait_drained(Duration::from_secs(30)).await);

    let range = format!("from={midnight}&to={}", midnight + DAY_MS);
    // What the old van left, as an operator would ask for it; empty once it is swept away (a
    // sweep may come while the inspector is still writing the day's last items: the next one
    // takes those).
    let left_of_old_van = || async {
        let mut left = Vec::new();
        if client.get("/v1/vehicles/old-van").await.0 != 404 {
            left.push("position".to_string());
        }
        let (_, track) = client
            .get(&format!("/v1/vehicles/old-van/track?{range}&limit=10000"))
            .await;
        if track["readings"] != json!([]) {
            left.push(format!("track {track}"));
        }
        for kind in ["trips", "stops"] {
            let (_, items) = client
                .get(&format!("/v1/vehicles/old-van/{kind}?{range}"))
                .await;
            if items[kind] != json!([]) {
                left.push(format!("{kind} {items}"));
            }
        }
        let (_, summary) = client
            .get(&format!("/v1/vehicles/old-van/summary?{range}&interval=1h"))
            .await;
        if summary["buckets"] != json!([]) {
            left.push(format!("summary {summary}"));
        }
        left
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = left_of_old_van().await;
        // Read after looking: a sweep between the two would otherwise show the old van gone
        // with counters taken before it went (each sweep counts what it removed once removed).
        let (_, stats) = client.get("/local/stats").await;
        let expired = stats["memory"]["expired"].clone();
        let counted = expired["readings"] == old.readings.len()
            // Once, or again if a late write brought it back between two sweeps.
            && expired["positions"].as_u64().is_some_and(|n| n >= 1)
            && expired["history_items"].as_u64().is_some_and(|n| n > 0);
        if left.is_empty() && counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not swept and counted in 20 s: expired {expired}, left {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, position) = client.get("/v1/vehicles/new-van").await;
    assert_eq!((status, position["ts"].as_i64()), (200, Some(now)));
    let (_, track) = client
        .get(&format!(
            "/v1/vehicles/new-van/track?from={}&to={}",
            now - 1,
            now + 1
        ))
        .await;
    assert_eq!(track["readings"].as_array().map(Vec::len), Some(1));
}
