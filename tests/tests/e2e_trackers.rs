//! Tracker apps through the runner over HTTP: the payloads captured from Traccar Client and
//! OwnTracks (shared/src/trackers/fixtures, their times moved to now) are accepted with their
//! devices' secrets and land as positions; a missing or wrong secret is refused 401, a revoked
//! device 403; and the simulator, speaking each app's protocol, is taken in whole.

use std::time::{Duration, Instant};

use base64::Engine;
use geostream_e2e::http::Client;
use geostream_local::{start, LocalConfig, RunningStack};
use geostream_shared::device_secret::DeviceSecrets;
use geostream_sim::trackers::Protocol;
use geostream_sim::SimOptions;
use serde_json::Value;

const KEY: &str = "tracker-test-key-0123456789abcdef0123456789";
const REVOKED: &str = "revoked-phone";

fn secrets() -> DeviceSecrets {
    DeviceSecrets::new(KEY.as_bytes(), []).unwrap()
}

fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/src/trackers/fixtures")
}

fn fixtures(prefix: &str) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(prefix))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures {prefix}*");
    files
        .into_iter()
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect()
}

async fn running() -> RunningStack {
    start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        device_secrets: Some(DeviceSecrets::new(KEY.as_bytes(), [REVOKED.to_string()]).unwrap()),
        ..LocalConfig::default()
    })
    .await
    .expect("the embedded stack starts")
}

/// Waits for a vehicle's position, as an operator would read it.
async fn position_of(client: &Client, device: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = client.get(&format!("/v1/vehicles/{device}")).await;
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "no position of {device}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A query string with its `timestamp` moved to `seconds`.
fn with_timestamp(query: &str, seconds: i64) -> String {
    let pairs = form_urlencoded::parse(query.as_bytes())
        .filter(|(name, _)| name != "timestamp")
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .chain([("timestamp".to_string(), seconds.to_string())]);
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn device_of_query(query: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "id" || name == "deviceid")
        .map(|(_, id)| id.into_owned())
        .expect("every captured query names its device")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_tracker_payloads_are_accepted_with_their_secrets() {
    let running = running().await;
    let client = Client::new(running.addr);
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let secrets = secrets();
    let now_s = geostream_shared::now_millis() / 1000;

    // Traccar Client before version 9 (and the OsmAnd app): parameters in the URL.
    for (n, query) in fixtures("osmand-query.txt")[0].lines().enumerate() {
        let device = device_of_query(query);
        let query = with_timestamp(query, now_s - 60 + n as i64);
        let url = format!(
            "{base}/v1/ingest/osmand?{query}&secret={}",
            secrets.issue(&device)
        );
        let response = http.post(&url).send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "{query}: {}",
            response.text().await.unwrap()
        );
        if query.contains("lat=") || query.contains("location=") {
            position_of(&client, &device).await;
        }
    }

    // Traccar Client 9: JSON, the secret in the server URL.
    for body in fixtures("traccar-client-") {
        let mut message: Value = serde_json::from_str(&body).unwrap();
        message["location"]["timestamp"] = Value::from(
            chrono::DateTime::from_timestamp(now_s - 30, 0)
                .unwrap()
                .to_rfc3339(),
        );
        let device = message["device_id"].as_str().unwrap().to_string();
        let response = http
            .post(format!(
                "{base}/v1/ingest/osmand?secret={}",
                secrets.issue(&device)
            ))
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "{body}: {}",
            response.text().await.unwrap()
        );
        let position = position_of(&client, &device).await;
        assert_eq!(
            position["lat"].as_f64(),
            message["location"]["coords"]["latitude"].as_f64(),
            "{position}"
        );
    }

    // OwnTracks: its headers name the device, HTTP Basic carries the secret, and the answer
    // is an empty list of commands.
    for (n, body) in fixtures("owntracks-").into_iter().enumerate() {
        let mut message: Value = serde_json::from_str(&body).unwrap();
        message["tst"] = Value::from(now_s - 20);
        let (user, phone) = ("fleet", format!("phone{n}"));
        let device = format!("{user}:{phone}");
        let response = http
            .post(format!("{base}/v1/ingest/owntracks"))
            .basic_auth(user, Some(secrets.issue(&device)))
            .header("X-Limit-U", user)
            .header("X-Limit-D", &phone)
            .json(&message)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            serde_json::json!([])
        );
        let position = position_of(&client, &device).await;
        assert_eq!(
            position["lon"].as_f64(),
            message["lon"].as_f64(),
            "{position}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_and_revoked_secrets_are_refused() {
    let running = running().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let secrets = secrets();
    let now_s = geostream_shared::now_millis() / 1000;
    let osmand = |device: &str, secret: Option<String>| {
        let mut url =
            format!("{base}/v1/ingest/osmand?id={device}&timestamp={now_s}&lat=52.5&lon=13.4");
        if let Some(secret) = secret {
            url.push_str(&format!("&secret={secret}"));
        }
        http.post(url).send()
    };

    let response = osmand("phone-1", None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("presented no secret"));
    // Another device's secret.
    let response = osmand("phone-1", Some(secrets.issue("phone-2")))
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = osmand(REVOKED, Some(secrets.issue(REVOKED))).await.unwrap();
    assert_eq!(response.status(), 403);
    assert!(response.text().await.unwrap().contains("revoked"));
    assert_eq!(
        osmand("phone-1", Some(secrets.issue("phone-1")))
            .await
            .unwrap()
            .status(),
        200
    );

    let owntracks = |password: &str| {
        http.post(format!("{base}/v1/ingest/owntracks"))
            .header("X-Limit-U", "phone-3")
            .header(
                "Authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("phone-3:{password}"))
                ),
            )
            .body(format!(
                r#"{{"_type":"location","lat":52.5,"lon":13.4,"tst":{now_s}}}"#
            ))
            .send()
    };
    assert_eq!(owntracks("guess").await.unwrap().status(), 401);
    assert_eq!(
        owntracks(&secrets.issue("phone-3")).await.unwrap().status(),
        200
    );

    // A reading the contract refuses is answered 400 with the reason, under the app's name.
    let url = format!(
        "{base}/v1/ingest/osmand?id=phone-1&timestamp={now_s}&lat=95&lon=13.4&secret={}",
        secrets.issue("phone-1")
    );
    let response = http.post(url).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"][0]["errors"][0]["field"], "lat", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_speaks_both_apps_through_the_runner() {
    let running = running().await;
    let client = Client::new(running.addr);
    let base = format!("http://{}", running.addr);
    for (protocol, prefix) in [(Protocol::Osmand, "osm-"), (Protocol::Owntracks, "ot-")] {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let report = geostream_sim::run(
            SimOptions {
                vehicles: 20,
                interval_ms: 1000,
                max_events: Some(60),
                concurrency: 4,
                protocol,
                device_secret_key: Some(KEY.into()),
                id_prefix: prefix.into(),
                anomaly_rate: 0.0,
                ..SimOptions::default()
            },
            &base,
            stop,
        )
        .await
        .unwrap();
        assert_eq!(
            (report.sent, report.accepted, report.rejected, report.failed),
            (60, 60, 0, 0),
            "{protocol:?}: {report}"
        );
        assert_eq!(report.requests, 60, "one reading per request");
        for vehicle in 0..20 {
            position_of(&client, &format!("{prefix}{vehicle:06}")).await;
        }
    }
    // Without the key the simulated devices are refused.
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let report = geostream_sim::run(
        SimOptions {
            vehicles: 2,
            interval_ms: 1000,
            max_events: Some(2),
            protocol: Protocol::Osmand,
            device_secret_key: None,
            ..SimOptions::default()
        },
        &base,
        stop,
    )
    .await
    .unwrap();
    assert_eq!(report.accepted, 0, "{report}");
}
