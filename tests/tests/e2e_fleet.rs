//! Fleet events end to end through the embedded stack, over HTTP: a geofence defined with
//! `PUT /v1/geofences/{id}`, a vehicle that drives in, zigzags across the boundary within the
//! exit margin for a minute, stays (speeding for a while in the depot's 30 km/h zone), and
//! drives out; a replay of all of it; then silence, and a reading again.

use std::time::Duration;

use geostream_local::{start, LocalConfig, RunningStack};
use geostream_shared::geo::destination;
use geostream_shared::model::GeoPoint;
use geostream_shared::rules::RuleSet;
use serde_json::{json, Value};

const DEVICE: &str = "truck-fleet-1";

async fn stack() -> RunningStack {
    let mut rules = RuleSet::default_rules();
    // Silent for 3 s is offline here (the default is 600 s), so the test sees it happen.
    rules.fleet.offline_after_ms = 3_000;
    let config = LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rules,
        ..LocalConfig::default()
    };
    start(config).await.expect("the embedded stack starts")
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn events(&self, query: &str) -> Vec<Value> {
        let (status, body) = self
            .send(reqwest::Method::GET, &format!("/v1/events?{query}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["events"].as_array().cloned().unwrap_or_default()
    }
}

/// The depot: a square of about 1.1 km by 1.1 km in Munich.
fn depot() -> Value {
    json!({
        "name": "Depot Nord",
        "geometry": {"type": "Polygon", "coordinates": [[
            [11.57, 48.132], [11.585, 48.132], [11.585, 48.142], [11.57, 48.142], [11.57, 48.132]
        ]]},
        "speed_limit_kmh": 30,
        "dwell_s": 20,
        "exit_margin_m": 40
    })
}

/// `metres` east of the depot's western edge (negative: west of it).
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

/// The drive, a reading every 2 s ending 5 s ago, and the times the events must carry.
struct Drive {
    readings: Vec<Value>,
    first_of_stay: i64,
    first_out: i64,
    speeding_from: i64,
    slow_from: i64,
}

fn drive() -> Drive {
    // (metres east of the edge, km/h) per reading.
    let mut path: Vec<(f64, f64)> = Vec::new();
    path.extend((-500..0).step_by(50).map(|m| (m as f64, 25.0)));
    // The zigzag: 15 m in, 15 m out, for a minute.
    path.extend((0..30).map(|i| (if i % 2 == 0 { 15.0 } else { -15.0 }, 10.0)));
    let first_of_stay = path.len();
    path.extend((0..20).map(|_| (300.0, 20.0)));
    let speeding_from = path.len();
    path.extend([45.0, 48.0, 52.0, 47.0, 44.0, 41.0, 38.0].map(|v| (300.0, v)));
    let slow_from = path.len();
    path.extend((0..60).map(|_| (300.0, 15.0)));
    let first_out_offset = path.len() + 6;
    path.extend((0..=10).rev().map(|i| (i as f64 * 50.0 - 210.0, 25.0)));
    // 300, 290 ... inside; the 7th of the way out (-10 m) is the first outside.
    let n = path.len() as i64;
    let t0 = geostream_shared::now_millis() - 5_000 - (n - 1) * 2_000;
    let ts = |i: usize| t0 + i as i64 * 2_000;
    let readings = path
        .iter()
        .enumerate()
        .map(|(i, (metres, speed))| {
            let at = off_west_edge(*metres);
            json!({"device_id": DEVICE, "ts": ts(i), "lat": at.lat, "lon": at.lon, "speed_kmh": speed})
        })
        .collect();
    Drive {
        readings,
        first_of_stay: ts(first_of_stay),
        first_out: ts(first_out_offset),
        speeding_from: ts(speeding_from),
        slow_from: ts(slow_from),
    }
}

fn kinds(events: &[Value]) -> Vec<(String, i64)> {
    let mut kinds: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["ts"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    kinds.sort_by_key(|(_, ts)| *ts);
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geofence_overspeed_and_offline_events_over_http() {
    let running = stack().await;
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://{}", running.addr),
    };
    use reqwest::Method;

    // Geofences: an invalid one is refused naming the problem; the depot is stored.
    let mut open_ring = depot();
    open_ring["geometry"]["coordinates"][0]
        .as_array_mut()
        .unwrap()
        .pop();
    let (status, body) = client
        .send(Method::PUT, "/v1/geofences/depot", Some(&open_ring))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("not closed"), "{body}");
    let (status, body) = client
        .send(Method::PUT, "/v1/geofences/depot", Some(&depot()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, listed) = client.send(Method::GET, "/v1/geofences", None).await;
    assert_eq!(
        (status, listed["count"].clone()),
        (200, json!(1)),
        "{listed}"
    );
    let (status, one) = client.send(Method::GET, "/v1/geofences/depot", None).await;
    assert_eq!((status, one["name"].clone()), (200, json!("Depot Nord")));

    // The whole drive in one POST (one reading per POST works the same; one request keeps the
    // test quick), then the same again: a client's retry.
    let drive = drive();
    let body = Value::Array(drive.readings.clone());
    // Heard from between these two moments (the offline check goes by when readings arrive).
    let posted_at = geostream_shared::now_millis();
    let mut evaluated_by = posted_at;
    for attempt in 0..2 {
        let (status, answer) = client
            .send(Method::POST, "/v1/telemetry", Some(&body))
            .await;
        assert_eq!(status, 202, "{answer}");
        assert!(running.wait_drained(Duration::from_secs(20)).await);
        if attempt == 0 {
            evaluated_by = geostream_shared::now_millis();
        }
    }
    let events = client.events(&format!("device_id={DEVICE}")).await;
    let moving: Vec<(String, i64)> = kinds(&events)
        .into_iter()
        .filter(|(kind, _)| !kind.starts_with("device_"))
        .collect();
    assert_eq!(
        moving,
        [
            ("geofence_enter".to_string(), drive.first_of_stay),
            ("overspeed_start".to_string(), drive.speeding_from),
            ("overspeed_end".to_string(), drive.slow_from),
            ("geofence_exit".to_string(), drive.first_out),
        ],
        "{events:#?}"
    );
    let start = events
        .iter()
        .find(|e| e["type"] == "overspeed_start")
        .unwrap();
    assert_eq!(start["limit"], json!(30.0));
    assert_eq!(start["geofence_id"], "depot");
    let end = events
        .iter()
        .find(|e| e["type"] == "overspeed_end")
        .unwrap();
    assert_eq!(end["value"], json!(52.0), "the peak speed");
    // Filters: by type, by geofence, by time.
    let enters = client.events("type=geofence_enter&geofence_id=depot").await;
    assert_eq!(enters.len(), 1);
    let later = client
        .events(&format!("device_id={DEVICE}&from={}", drive.slow_from))
        .await;
    assert!(later
        .iter()
        .all(|e| e["ts"].as_i64() >= Some(drive.slow_from)));
    let (status, bad) = client
        .send(Method::GET, "/v1/events?type=teleport", None)
        .await;
    assert_eq!(status, 400, "{bad}");

    // Out of the depot: nobody inside. A vehicle parked inside is.
    let (_, inside) = client
        .send(Method::GET, "/v1/geofences/depot/vehicles", None)
        .await;
    assert_eq!(inside["count"], 0, "{inside}");
    let parked = off_west_edge(500.0);
    let now = geostream_shared::now_millis();
    let parked_readings: Vec<Value> = (0..12)
        .map(|i| json!({"device_id": "van-2", "ts": now - 30_000 + i * 2_500, "lat": parked.lat, "lon": parked.lon}))
        .collect();
    let (status, _) = client
        .send(
            Method::POST,
            "/v1/telemetry",
            Some(&Value::Array(parked_readings)),
        )
        .await;
    assert_eq!(status, 202);
    assert!(running.wait_drained(Duration::from_secs(20)).await);
    let (_, inside) = client
        .send(Method::GET, "/v1/geofences/depot/vehicles", None)
        .await;
    assert_eq!(inside["vehicles"][0]["device_id"], "van-2", "{inside}");

    // Silent for the 3 s: offline (once), with the time it became so; then back.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let offline = loop {
        let offline = client
            .events(&format!("device_id={DEVICE}&type=device_offline"))
            .await;
        if !offline.is_empty() || std::time::Instant::now() > deadline {
            break offline;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(offline.len(), 1, "{offline:?}");
    let offline_at = offline[0]["ts"].as_i64().unwrap_or_default();
    assert!(
        (posted_at + 3_000..=evaluated_by + 3_000).contains(&offline_at),
        "offline 3 s after the vehicle was last heard from: {offline_at} not in {}..={}",
        posted_at + 3_000,
        evaluated_by + 3_000
    );
    let back_at = geostream_shared::now_millis();
    let at = off_west_edge(-600.0);
    let (status, _) = client
        .send(
            Method::POST,
            "/v1/telemetry",
            Some(&json!({"device_id": DEVICE, "ts": back_at, "lat": at.lat, "lon": at.lon})),
        )
        .await;
    assert_eq!(status, 202);
    assert!(running.wait_drained(Duration::from_secs(20)).await);
    let online = client
        .events(&format!("device_id={DEVICE}&type=device_online"))
        .await;
    assert_eq!(online.len(), 1, "{online:?}");
    assert_eq!(online[0]["ts"].as_i64(), Some(back_at));

    // Deleted: gone from the list and the index.
    let (status, _) = client
        .send(Method::DELETE, "/v1/geofences/depot", None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = client.send(Method::GET, "/v1/geofences/depot", None).await;
    assert_eq!(status, 404);
    running.shutdown().await;
}

/// The simulator's routes across a grid of geofences (zigzags at boundaries, speeding on the
/// road), posted as a fleet posts them (each vehicle once per request, in time order): the
/// fleet events equal the ground truth the routes were designed with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_routes_make_exactly_their_ground_truth_events() {
    let rules = geostream_e2e::fleet_events::route_rules();
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        rules,
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts");
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://{}", running.addr),
    };
    let (routes, longest) = geostream_e2e::fleet_events::routes_ending_now(16, 20, 4, 4);
    for geofence in &routes.geofences {
        let (status, body) = client
            .send(
                reqwest::Method::PUT,
                &format!("/v1/geofences/{}", geofence.geofence_id),
                Some(&geofence.body),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for tick in 0..longest {
        let batch: Vec<Value> = routes
            .readings
            .iter()
            .filter_map(|readings| readings.get(tick))
            .map(|reading| serde_json::to_value(reading).unwrap())
            .collect();
        let (status, answer) = client
            .send(
                reqwest::Method::POST,
                "/v1/telemetry",
                Some(&Value::Array(batch)),
            )
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    assert!(running.wait_drained(Duration::from_secs(60)).await);

    let expected = geostream_e2e::fleet_events::truth_keys(&routes);
    let mut made = Vec::new();
    for vehicle in 0..20 {
        let device = format!("route-{vehicle:04}");
        for event in client
            .events(&format!("device_id={device}&limit=1000"))
            .await
        {
            // device_offline/online are left out: the readings are minutes old, so the
            // vehicles go offline and come back as they are posted; the other test checks them.
            made.extend(geostream_e2e::fleet_events::event_key(&event));
        }
    }
    made.sort();
    assert!(
        expected.len() > 150,
        "a scenario worth the name: {}",
        expected.len()
    );
    assert_eq!(made, expected);
    running.shutdown().await;
}
