//! The pipeline on the Kafka bus, against a real broker (scripts/test starts Tansu and sets
//! GEOSTREAM_KAFKA_BROKERS): POST -> telemetry topic (keyed by device) -> geo-update, archiver
//! and anomaly-inspector through consumer groups -> stores, and alert transitions on the alerts
//! topic.

use std::time::{Duration, Instant};

use geostream_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use geostream_kafka::rdkafka::Message;
use geostream_kafka::KafkaSettings;
use geostream_local::{start, Bus, KafkaBusConfig, LocalConfig};
use serde_json::{json, Value};

fn broker() -> Option<String> {
    match std::env::var("GEOSTREAM_KAFKA_BROKERS") {
        Ok(brokers) if !brokers.is_empty() => Some(brokers),
        _ if std::env::var_os("GEOSTREAM_REQUIRE_KAFKA").is_some() => {
            panic!("GEOSTREAM_KAFKA_BROKERS is not set but GEOSTREAM_REQUIRE_KAFKA is: start a broker with scripts/tansu start")
        }
        _ => {
            eprintln!("SKIPPED: Kafka test needs GEOSTREAM_KAFKA_BROKERS (scripts/test starts Tansu and sets it)");
            None
        }
    }
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Reads `topic` from the beginning until `wanted` holds for a message, at most `timeout`.
async fn find_on_topic(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    wanted: impl Fn(Option<&[u8]>, &Value) -> bool,
) -> bool {
    let consumer: StreamConsumer = KafkaSettings::plaintext(brokers)
        .client_config()
        .set("group.id", format!("{topic}-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        let value: Value =
            serde_json::from_slice(message.payload().unwrap_or_default()).unwrap_or(Value::Null);
        if wanted(message.key(), &value) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_flows_through_kafka_to_the_stores_and_alerts_to_the_alerts_topic() {
    let Some(brokers) = broker() else { return };
    let prefix = format!(
        "e2e-kafka-{}-{}",
        std::process::id(),
        geostream_shared::now_millis()
    );
    let kafka = KafkaBusConfig {
        telemetry_topic: format!("{prefix}-telemetry"),
        alerts_topic: format!("{prefix}-alerts"),
        group_prefix: prefix.clone(),
        ..KafkaBusConfig::local(brokers.as_str())
    };
    let running = start(LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        bus: Bus::Kafka(kafka.clone()),
        shards: 3,
        ..LocalConfig::default()
    })
    .await
    .expect("the stack starts on the Kafka bus");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();

    // 20 vehicles, 5 readings each, and one that overheats; plus one invalid item.
    let t0 = geostream_shared::now_millis() - 60_000;
    let mut readings = Vec::new();
    for round in 0..5i64 {
        for vehicle in 0..20 {
            readings.push(json!({
                "device_id": format!("kafka-{vehicle}"), "ts": t0 + round * 1000,
                "lat": 52.5 + vehicle as f64 * 1e-3, "lon": 13.4 + round as f64 * 1e-4, "speed_kmh": 30.0
            }));
        }
        let engine = if round >= 2 {
            106.0 + round as f64
        } else {
            90.0
        };
        readings.push(json!({
            "device_id": "kafka-hot", "ts": t0 + round * 1000, "lat": 52.6, "lon": 13.5, "engine_temp_c": engine
        }));
    }
    readings.insert(0, json!({"device_id": "kafka-bad", "ts": "yesterday"}));
    for chunk in readings.chunks(21) {
        let response = http
            .post(format!("{base}/v1/telemetry"))
            .json(&chunk)
            .send()
            .await
            .unwrap();
        assert!(
            [202, 207].contains(&response.status().as_u16()),
            "{}",
            response.text().await.unwrap()
        );
    }

    // Every stream function gets there through its consumer group, each at its own pace: done
    // when each one's last reading shows (the archiver's count, kafka-7's last position, the
    // alert's third breach), whichever comes last.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (alerts, position) = loop {
        let stats = running.stack.stats();
        let archived = stats.positions == Some(21) && stats.archived_readings == Some(105);
        let alerts = get_json(
            &http,
            format!("{base}/v1/alerts?state=active&device_id=kafka-hot"),
        )
        .await;
        let position = get_json(&http, format!("{base}/v1/vehicles/kafka-7")).await;
        if archived && alerts["alerts"][0]["count"] == 3 && position["ts"] == t0 + 4000 {
            break (alerts, position);
        }
        assert!(
            Instant::now() < deadline,
            "the pipeline did not finish on Kafka: {stats:?}, alerts {alerts}, kafka-7 {position}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alerts["count"], 1, "{alerts}");
    assert_eq!(alerts["alerts"][0]["rule"], "engine_overheat");
    assert_eq!(alerts["alerts"][0]["peak_value"], 110.0);
    assert_eq!(position["lon"], 13.4 + 4.0 * 1e-4);
    for mapping in &running.stack.stats().mappings {
        assert_eq!(mapping.dead_lettered, 0, "{mapping:?}");
    }

    // The telemetry topic is keyed by device; the alerts topic carries the raise.
    assert!(
        find_on_topic(
            &brokers,
            &kafka.telemetry_topic,
            Duration::from_secs(30),
            |key, value| {
                key == Some(b"kafka-hot".as_slice()) && value["device_id"] == "kafka-hot"
            }
        )
        .await,
        "no envelope keyed by its device on {}",
        kafka.telemetry_topic
    );
    assert!(
        find_on_topic(
            &brokers,
            &kafka.alerts_topic,
            Duration::from_secs(30),
            |key, value| {
                key == Some(b"kafka-hot".as_slice())
                    && value["kind"] == "raised"
                    && value["alert"]["rule"] == "engine_overheat"
            }
        )
        .await,
        "no raised transition on {}",
        kafka.alerts_topic
    );
    running.shutdown().await;
}
