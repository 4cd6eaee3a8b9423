//! Kill the runner mid-stream on the Kafka bus, restart it, and end exactly where an
//! uninterrupted run ends. The runner is the real `geostream-local` process, killed with
//! SIGKILL while its consumer groups have batches in flight; its stores live outside it (moto's
//! DynamoDB), its bus on a real broker (Tansu). scripts/test starts both and sets
//! GEOSTREAM_AWS_ENDPOINT and GEOSTREAM_KAFKA_BROKERS.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use geostream_local::{start, LocalConfig};
use serde_json::{json, Value};

const VEHICLES: usize = 12;
const ROUNDS: i64 = 16;
/// Rounds posted before the kill; the rest go to the restarted runner.
const ROUNDS_BEFORE_KILL: i64 = 12;

fn setting(name: &str, required_by: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Some(value),
        _ if std::env::var_os(required_by).is_some() => {
            panic!("{name} is not set but {required_by} is: run the test through scripts/test")
        }
        _ => {
            eprintln!("SKIPPED: the Kafka restart test needs {name} (scripts/test sets it)");
            None
        }
    }
}

/// One round of telemetry: every vehicle reports once. Vehicles 0-3 overheat in rounds 4-7
/// (raise, then clear); vehicles 4-5 overheat in every round, so their alerts count every
/// reading: a single lost record of the anomaly-inspector would show in the count.
fn round(t0: i64, n: i64) -> Value {
    let readings: Vec<Value> = (0..VEHICLES)
        .map(|v| {
            let hot = (v < 4 && (4..8).contains(&n)) || (4..6).contains(&v);
            json!({
                "device_id": format!("crash-{v}"), "event_id": format!("crash-{v}-{n}"), "ts": t0 + n * 1000,
                "lat": 52.4 + v as f64 * 0.01 + n as f64 * 1e-4, "lon": 13.3 + n as f64 * 2e-4,
                "speed_kmh": 20.0 + n as f64, "engine_temp_c": if hot { 104.0 + n as f64 } else { 88.0 }
            })
        })
        .collect();
    Value::Array(readings)
}

async fn post_round(http: &reqwest::Client, base: &str, body: &Value) {
    let response = http
        .post(format!("{base}/v1/telemetry"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        202,
        "{}",
        response.text().await.unwrap()
    );
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// What a run ended with: each vehicle's position and every alert, keyed for comparison.
async fn outcome(http: &reqwest::Client, base: &str) -> (BTreeMap<String, Value>, Vec<Value>) {
    let mut positions = BTreeMap::new();
    for v in 0..VEHICLES {
        let id = format!("crash-{v}");
        let p = get(http, format!("{base}/v1/vehicles/{id}")).await;
        positions.insert(id, json!([p["lat"], p["lon"], p["ts"], p["speed_kmh"]]));
    }
    let mut alerts: Vec<Value> = get(http, format!("{base}/v1/alerts?limit=500")).await["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            json!([
                a["alert_id"],
                a["state"],
                a["count"],
                a["peak_value"],
                a["last_value"],
                a["started_at"],
                a["cleared_at"]
            ])
        })
        .collect();
    alerts.sort_by_key(|a| a[0].as_str().unwrap_or_default().to_string());
    (positions, alerts)
}

struct Runner {
    child: Child,
    base: String,
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn runner(prefix: &str, endpoint: &str, brokers: &str, create: bool) -> Runner {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_geostream-local"));
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--backend", "aws", "--endpoint-url", endpoint])
        .args(["--bus", "kafka", "--brokers", brokers])
        .args(["--resource-prefix", prefix, "--shards", "2"])
        .args(["--esm-batch-size", "10"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ] {
        if std::env::var_os(name).is_none() {
            command.env(name, value);
        }
    }
    if create {
        command.arg("--create-resources");
    }
    let mut child = command.spawn().expect("geostream-local starts");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = reqwest::get(format!("{base}/local/stats")).await {
            if response.status().is_success() {
                return Runner { child, base };
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("geostream-local exited with {status} before serving");
        }
        assert!(
            Instant::now() < deadline,
            "geostream-local did not serve {base}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn records_processed(stats: &Value) -> Vec<u64> {
    stats["mappings"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["records"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_stream_resumes_without_loss_and_ends_as_without_the_crash() {
    let Some(endpoint) = setting("GEOSTREAM_AWS_ENDPOINT", "GEOSTREAM_REQUIRE_EMULATOR") else {
        return;
    };
    let Some(brokers) = setting("GEOSTREAM_KAFKA_BROKERS", "GEOSTREAM_REQUIRE_KAFKA") else {
        return;
    };
    let http = reqwest::Client::new();
    let t0 = geostream_shared::now_millis() - 120_000;
    let rounds: Vec<Value> = (0..ROUNDS).map(|n| round(t0, n)).collect();

    // The reference: the same telemetry through an uninterrupted embedded stack.
    let reference = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalConfig::default()
    })
    .await
    .unwrap();
    let reference_base = format!("http://{}", reference.addr);
    for body in &rounds {
        post_round(&http, &reference_base, body).await;
        assert!(reference.wait_drained(Duration::from_secs(20)).await);
    }
    let expected = outcome(&http, &reference_base).await;
    reference.shutdown().await;
    let active_counts: Vec<&Value> = expected
        .1
        .iter()
        .filter(|a| a[1] == "active")
        .map(|a| &a[2])
        .collect();
    assert_eq!(
        active_counts,
        [&json!(ROUNDS), &json!(ROUNDS)],
        "{:?}",
        expected.1
    );
    assert_eq!(
        expected.1.len(),
        6,
        "four alerts raised and cleared, two still active: {:?}",
        expected.1
    );

    // The crash: post most rounds, then SIGKILL the runner while it is working through them.
    let prefix = format!("kr{}", std::process::id());
    let mut first = runner(&prefix, &endpoint, &brokers, true).await;
    for body in &rounds[..ROUNDS_BEFORE_KILL as usize] {
        post_round(&http, &first.base, body).await;
    }
    let posted_records = VEHICLES as u64 * ROUNDS_BEFORE_KILL as u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    let at_kill = loop {
        let stats = get(&http, format!("{}/local/stats", first.base)).await;
        let processed = records_processed(&stats);
        if processed.len() == 3 && processed.iter().all(|n| *n >= 20) {
            break processed;
        }
        assert!(
            Instant::now() < deadline,
            "the runner processed nothing: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    eprintln!(
        "killed the runner with {at_kill:?} of {posted_records} records processed per function"
    );
    assert!(
        at_kill.iter().any(|n| *n < posted_records),
        "the kill came after everything was processed ({at_kill:?}): nothing was tested"
    );

    // The restart: the same consumer groups resume from their committed offsets.
    let second = runner(&prefix, &endpoint, &brokers, false).await;
    for body in &rounds[ROUNDS_BEFORE_KILL as usize..] {
        post_round(&http, &second.base, body).await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let actual = outcome(&http, &second.base).await;
        if actual == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart the stores did not converge on the uninterrupted run's\nexpected {expected:?}\nactual   {actual:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stats = get(&http, format!("{}/local/stats", second.base)).await;
    for mapping in stats["mappings"].as_array().unwrap() {
        assert_eq!(mapping["dead_lettered"], 0, "{mapping}");
    }
    eprintln!(
        "after the restart: {:?} records processed per function (the rest of the stream plus the redelivered uncommitted batches)",
        records_processed(&stats)
    );
}
