//! `docs/openapi.json` describes what the running stack answers: every route of the description
//! is called on the embedded stack, with answers of success and of refusal, and each answer's
//! body is validated against the schema the description gives for its route and status. A
//! route, method or status the description lacks fails the test, and so does a route of the
//! description no request here reaches.

use std::collections::BTreeSet;

use geostream_e2e::http::Client;
use geostream_local::{start, LocalConfig};
use geostream_shared::device_secret::DeviceSecrets;
use serde_json::{json, Value};

struct Description {
    document: Value,
    /// (method, path template) seen.
    seen: BTreeSet<(String, String)>,
}

impl Description {
    fn load() -> Description {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
                .expect("docs/openapi.json is readable");
        Description {
            document: serde_json::from_str(&text).expect("docs/openapi.json is JSON"),
            seen: BTreeSet::new(),
        }
    }

    /// Fails unless `body`, answered `status` to `method template`, is what the description
    /// says.
    fn check(&mut self, method: &str, template: &str, (status, body): &(u16, Value)) {
        let escaped = template.replace('~', "~0").replace('/', "~1");
        let response = format!("/paths/{escaped}/{method}/responses/{status}");
        let described_without_body = self
            .document
            .pointer(&response)
            .is_some_and(|answer| answer.get("content").is_none());
        if described_without_body {
            assert!(
                body.is_null(),
                "{method} {template} {status} is described without a body: {body}"
            );
            self.seen.insert((method.to_string(), template.to_string()));
            return;
        }
        let pointer = format!("{response}/content/application~1json/schema");
        assert!(
            self.document.pointer(&pointer).is_some(),
            "the description has no {} {template} answered {status}: {body}",
            method.to_uppercase()
        );
        let mut schema = self.document.clone();
        // As a URI fragment: the braces of a path template percent-encoded.
        let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
        schema["$ref"] = json!(format!("#{fragment}"));
        let validator = jsonschema::draft202012::new(&schema)
            .unwrap_or_else(|e| panic!("the schema of {method} {template} {status}: {e}"));
        let problems: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            problems.is_empty(),
            "{} {template} {status} does not answer as described: {problems:#?}\n{body}",
            method.to_uppercase()
        );
        self.seen.insert((method.to_string(), template.to_string()));
    }

    fn every_route_was_called(&self) {
        let described: BTreeSet<(String, String)> = self.document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(template, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(|method| (method.clone(), template.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let missed: Vec<_> = described.difference(&self.seen).collect();
        assert!(
            missed.is_empty(),
            "routes of the description not called: {missed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_stack_answers_as_its_openapi_description_says() {
    let secrets =
        DeviceSecrets::new(TRACKER_KEY.as_bytes(), ["revoked-phone".to_string()]).unwrap();
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        device_secrets: Some(secrets.clone()),
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts");
    let client = Client::new(running.addr);
    let mut api = Description::load();
    let now = geostream_shared::now_millis();
    let hour_ago = now - 3_600_000;

    let (status, served) = client.get("/openapi.json").await;
    assert_eq!((status, &served), (200, &api.document));
    api.check("get", "/openapi.json", &(status, served));

    // A van parked for ten minutes, then driving for thirty, parked again and overheating; and
    // items refused.
    let readings: Vec<Value> = (0..50)
        .map(|i| {
            let moving = (10..40).contains(&i);
            let lat = 52.52 + (i.clamp(9, 39) - 9) as f64 * 0.005;
            json!({
                "device_id": "spec-van-1", "ts": hour_ago + i * 60_000,
                "lat": lat, "lon": 13.405,
                "speed_kmh": if moving { 40.0 } else { 0.0 },
                "engine_temp_c": if i == 49 { 130.0 } else { 90.0 },
                "metrics": {"load_kg": 100.0 + i as f64}
            })
        })
        .collect();
    let posted = client.post("/v1/telemetry", &Value::from(readings)).await;
    assert_eq!(posted.0, 202, "{}", posted.1);
    api.check("post", "/v1/telemetry", &posted);
    let mixed = client
        .post(
            "/v1/telemetry",
            &json!([{"device_id": "spec-van-2", "ts": now, "lat": 52.5, "lon": 13.4},
                    {"device_id": "spec-van-3", "ts": now, "lat": 95}]),
        )
        .await;
    assert_eq!(mixed.0, 207);
    api.check("post", "/v1/telemetry", &mixed);
    let refused = client
        .post(
            "/v1/telemetry",
            &json!([{"device_id": "bad id!", "ts": now}]),
        )
        .await;
    assert_eq!(refused.0, 400);
    api.check("post", "/v1/telemetry", &refused);
    let not_json = client.post_raw("/v1/telemetry", "{\"device_id\":").await;
    api.check("post", "/v1/telemetry", &not_json);
    assert!(
        running
            .wait_drained(std::time::Duration::from_secs(20))
            .await
    );

    let vehicle = client.get("/v1/vehicles/spec-van-1").await;
    assert_eq!(vehicle.0, 200);
    api.check("get", "/v1/vehicles/{id}", &vehicle);
    api.check(
        "get",
        "/v1/vehicles/{id}",
        &client.get("/v1/vehicles/nobody").await,
    );
    let near = client
        .get("/v1/vehicles/near?lat=52.67&lon=13.405&radius_m=5000")
        .await;
    assert_eq!(near.1["count"], 1, "{}", near.1);
    api.check("get", "/v1/vehicles/near", &near);
    api.check(
        "get",
        "/v1/vehicles/near",
        &client.get("/v1/vehicles/near?lat=91&lon=0").await,
    );
    let range = format!("from={}&to={}", hour_ago - 1, now + 1);
    for (route, template) in [
        ("track", "/v1/vehicles/{id}/track"),
        ("trips", "/v1/vehicles/{id}/trips"),
        ("stops", "/v1/vehicles/{id}/stops"),
        ("summary", "/v1/vehicles/{id}/summary"),
    ] {
        let answer = client
            .get(&format!("/v1/vehicles/spec-van-1/{route}?{range}"))
            .await;
        assert_eq!(answer.0, 200, "{}", answer.1);
        api.check("get", template, &answer);
        let backwards = client
            .get(&format!(
                "/v1/vehicles/spec-van-1/{route}?from={now}&to={hour_ago}"
            ))
            .await;
        api.check("get", template, &backwards);
    }
    let trips = client
        .get(&format!("/v1/vehicles/spec-van-1/trips?{range}"))
        .await;
    assert_eq!(trips.1["count"], 1, "the drive is a trip: {}", trips.1);
    let stops = client
        .get(&format!("/v1/vehicles/spec-van-1/stops?{range}"))
        .await;
    assert_eq!(stops.1["count"], 1, "parked before it: {}", stops.1);
    let minutes = client
        .get(&format!(
            "/v1/vehicles/spec-van-1/summary?{range}&interval=1m"
        ))
        .await;
    assert_eq!(minutes.1["count"], 49, "{}", minutes.1);
    api.check("get", "/v1/vehicles/{id}/summary", &minutes);
    api.check(
        "get",
        "/v1/vehicles/{id}/summary",
        &client
            .get("/v1/vehicles/spec-van-1/summary?interval=1w")
            .await,
    );

    let alerts = client.get("/v1/alerts?device_id=spec-van-1").await;
    // The overheat, by threshold and by z-score.
    assert_eq!(alerts.1["count"], 2, "{}", alerts.1);
    api.check("get", "/v1/alerts", &alerts);
    api.check(
        "get",
        "/v1/alerts",
        &client.get("/v1/alerts?state=maybe").await,
    );
    let alert_id = alerts.1["alerts"][0]["alert_id"]
        .as_str()
        .unwrap()
        .replace('|', "%7C");
    let acked = client
        .post(&format!("/v1/alerts/{alert_id}/ack"), &json!({"by": "ops"}))
        .await;
    assert_eq!(acked.0, 200, "{}", acked.1);
    api.check("post", "/v1/alerts/{alert_id}/ack", &acked);
    api.check(
        "post",
        "/v1/alerts/{alert_id}/ack",
        &client.post("/v1/alerts/none/ack", &json!({})).await,
    );

    let depot = json!({"name": "Depot", "speed_limit_kmh": 30,
        "geometry": {"type": "Point", "coordinates": [13.405, 52.67], "radius_m": 500}});
    let put = client.put("/v1/geofences/depot", &depot).await;
    assert_eq!(put.0, 200, "{}", put.1);
    api.check("put", "/v1/geofences/{geofence_id}", &put);
    api.check(
        "put",
        "/v1/geofences/{geofence_id}",
        &client
            .put(
                "/v1/geofences/open",
                &json!({"name": "x", "geometry": {"type": "Polygon"}}),
            )
            .await,
    );
    // The van is seen inside it for 15 s (the dwell is 10 s): an enter, an occupant.
    let inside = (1..=2)
        .map(|k| {
            json!({"device_id": "spec-van-1", "ts": now - 30_000 + k * 15_000,
                        "lat": 52.67, "lon": 13.405, "speed_kmh": 0.0})
        })
        .collect::<Vec<_>>();
    assert_eq!(
        client.post("/v1/telemetry", &Value::from(inside)).await.0,
        202
    );
    assert!(
        running
            .wait_drained(std::time::Duration::from_secs(20))
            .await
    );
    api.check("get", "/v1/geofences", &client.get("/v1/geofences").await);
    api.check(
        "get",
        "/v1/geofences/{geofence_id}",
        &client.get("/v1/geofences/depot").await,
    );
    api.check(
        "get",
        "/v1/geofences/{geofence_id}",
        &client.get("/v1/geofences/nowhere").await,
    );
    let occupants = client.get("/v1/geofences/depot/vehicles").await;
    assert_eq!(occupants.1["count"], 1, "{}", occupants.1);
    api.check("get", "/v1/geofences/{geofence_id}/vehicles", &occupants);
    let events = client.get("/v1/events?device_id=spec-van-1").await;
    assert_eq!(
        events.1["events"][0]["type"], "geofence_enter",
        "{}",
        events.1
    );
    api.check("get", "/v1/events", &events);
    api.check(
        "get",
        "/v1/events",
        &client.get("/v1/events?type=teleport").await,
    );
    let deleted = client.delete("/v1/geofences/depot").await;
    assert_eq!(deleted.0, 200, "{}", deleted.1);
    api.check("delete", "/v1/geofences/{geofence_id}", &deleted);
    api.check(
        "delete",
        "/v1/geofences/{geofence_id}",
        &client.delete("/v1/geofences/depot").await,
    );

    tracker_routes(&mut api, &running.addr.to_string(), &secrets).await;
    api.every_route_was_called();
    running.shutdown().await;
}

const TRACKER_KEY: &str = "openapi-test-key-0123456789abcdef0123456789";

/// The tracker apps' routes: taken, refused for the reading, for the secret, for the device.
async fn tracker_routes(api: &mut Description, addr: &str, secrets: &DeviceSecrets) {
    let http = reqwest::Client::new();
    let now_s = geostream_shared::now_millis() / 1000;
    // Status and body (`null` when empty, as the OsmAnd answer is).
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, body)
    };
    let osmand = |device: &str, lat: f64, secret: bool| {
        let mut url = format!(
            "http://{addr}/v1/ingest/osmand?id={device}&timestamp={now_s}&lat={lat}&lon=13.4&speed=12"
        );
        if secret {
            url.push_str(&format!("&secret={}", secrets.issue(device)));
        }
        url
    };
    let cases = [
        ("post", osmand("spec-phone", 52.5, true), 200),
        ("get", osmand("spec-phone", 52.6, true), 200),
        ("post", osmand("spec-phone", 95.0, true), 400),
        (
            "post",
            format!("http://{addr}/v1/ingest/osmand?lat=1&lon=2"),
            400,
        ),
        ("get", osmand("spec-phone", 52.5, false), 401),
        ("post", osmand("revoked-phone", 52.5, true), 403),
    ];
    for (method, url, status) in cases {
        let request = match method {
            "get" => http.get(&url),
            _ => http.post(&url),
        };
        let answer = send(request).await;
        assert_eq!(answer.0, status, "{method} {url}: {}", answer.1);
        api.check(method, "/v1/ingest/osmand", &answer);
    }

    let owntracks = |password: String| {
        http.post(format!("http://{addr}/v1/ingest/owntracks"))
            .basic_auth("spec", Some(password))
            .header("X-Limit-U", "spec")
            .header("X-Limit-D", "phone")
            .json(&json!({"_type": "location", "lat": 52.5, "lon": 13.4, "tst": now_s, "vel": 30}))
    };
    let taken = send(owntracks(secrets.issue("spec:phone"))).await;
    assert_eq!(taken, (200, json!([])));
    api.check("post", "/v1/ingest/owntracks", &taken);
    let wrong = send(owntracks("guess".into())).await;
    assert_eq!(wrong.0, 401);
    api.check("post", "/v1/ingest/owntracks", &wrong);
}
