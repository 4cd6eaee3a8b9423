//! The whole pipeline through the real AWS SDK adapters against the AWS-API emulators (moto
//! server and LocalStack with DynamoDB Local, both started by `scripts/test`):
//! POST -> ingest -> Kinesis -> geo-update / archiver / anomaly-inspector -> DynamoDB /
//! Timestream or S3 / alerts stream, read back through query-api. Each test runs on both
//! emulators (`NAME::moto`, `NAME::localstack`); LocalStack's community tier has no
//! Timestream, so there the archive is S3.

use std::collections::BTreeMap;

use geostream_anomaly_inspector::AnomalyInspector;
use geostream_archiver::Archiver;
use geostream_aws::compose::Composition;
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::manifest::FUNCTIONS;
use geostream_aws::provision::{create_resources, ArchiveKind, ResourceNames};
use geostream_aws::timestream::TimestreamArchive;
use geostream_e2e::harness::{json_of, read_stream, request, Emulator, EmulatorKind};
use geostream_e2e::on_each_emulator;
use geostream_geo_update::GeoUpdate;
use geostream_ingest::Ingest;
use geostream_lambda::stream::{handle_kinesis, KinesisEvent};
use geostream_local::{AwsBackend, StoreKind};
use geostream_query_api::QueryApi;
use geostream_shared::metrics::{MetricName, RecordedMetrics};
use geostream_shared::stream::StreamFunction;
use serde_json::{json, Value};

struct Pipeline {
    names: ResourceNames,
    /// The test's own clients (reading streams and queues), not counted against a function.
    harness: Clients,
    /// Each function's ports, built by the composition root its Lambda `main` uses, from the
    /// settings Terraform gives it; one client set per function, so calls count per function.
    ports: BTreeMap<&'static str, Composition>,
    ingest: Ingest,
    geo_update: GeoUpdate,
    archiver: Archiver,
    inspector: AnomalyInspector,
    query_api: QueryApi,
    queue_url: String,
    metrics: RecordedMetrics,
}

async fn pipeline(emulator: &Emulator, test: &str) -> Pipeline {
    let sdk = sdk_config(Some(&emulator.endpoint)).await;
    let prefix = format!("gs-{test}-{}", std::process::id());
    let names = ResourceNames::with_prefix(&prefix);
    let setup = Clients::new(&sdk);
    let queue_url = create_resources(&setup, &names, 2, emulator.archive())
        .await
        .expect("resources are created on the emulator");
    let ports: BTreeMap<&'static str, Composition> = FUNCTIONS
        .iter()
        .map(|function| {
            let settings = names.settings(emulator.archive(), &queue_url);
            let composition = Composition::new(
                function.name,
                function.ports,
                Box::new(settings),
                Clients::new(&sdk),
            );
            (function.name, composition)
        })
        .collect();
    let built = "the composition root builds the function's ports";
    let ingest = &ports["ingest"];
    let geo = &ports["geo-update"];
    let archiver = &ports["archiver"];
    let inspector = &ports["anomaly-inspector"];
    let query = &ports["query-api"];
    Pipeline {
        ingest: Ingest::new(
            ingest.telemetry_bus().await.expect(built),
            ingest.metric_names().expect(built),
        ),
        geo_update: GeoUpdate::new(
            geo.positions().await.expect(built),
            geo.dead_letters().expect(built),
        ),
        archiver: Archiver::new(
            archiver.archive().await.expect(built),
            archiver.dead_letters().expect(built),
        ),
        inspector: AnomalyInspector::new(
            inspector.rules().expect(built),
            inspector.alerts().await.expect(built),
            inspector.alerts_bus().await.expect(built),
            inspector.dead_letters().expect(built),
        ),
        query_api: QueryApi::new(
            query.positions().await.expect(built),
            query.archive().await.expect(built),
            query.alert_records().expect(built),
        ),
        metrics: RecordedMetrics::new(),
        names,
        harness: setup,
        ports,
        queue_url,
    }
}

impl Pipeline {
    /// Every AWS operation each function was seen to call is declared in the manifest that
    /// infra/ is checked against (tests/src/lib.rs), so Terraform grants what the code uses.
    fn assert_calls_are_declared(&self) {
        for function in FUNCTIONS {
            let calls = &self.ports[function.name].clients().calls;
            for operation in calls.snapshot().keys() {
                assert!(
                    function.operations.contains(&operation.as_str()),
                    "{} called {operation}, which its manifest (and so its IAM policy) does not list",
                    function.name
                );
            }
        }
    }

    async fn post(&self, body: Value) -> Value {
        let response = self
            .ingest
            .handle(
                request("POST", "/v1/telemetry", &[], Some(body)),
                &self.metrics,
            )
            .await;
        assert_eq!(response.status_code, 202, "{:?}", response.body);
        json_of(&response)
    }

    /// Hands every telemetry record to the three stream functions; none may fail.
    async fn process(&self, events: &[KinesisEvent]) {
        let functions: [&dyn StreamFunction; 3] =
            [&self.geo_update, &self.archiver, &self.inspector];
        for event in events {
            for function in functions {
                let response = handle_kinesis(function, event.clone(), &self.metrics).await;
                assert!(
                    response.batch_item_failures.is_empty(),
                    "{} failed",
                    function.name()
                );
            }
        }
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> (i64, Value) {
        let response = self
            .query_api
            .handle(request("GET", path, query, None), &self.metrics)
            .await;
        (response.status_code, json_of(&response))
    }
}

on_each_emulator!(
    pipeline_through_the_sdk_adapters_and_replay_changes_nothing,
    aws_calls_per_thousand_events,
    the_local_runner_on_the_aws_backend_with_the_s3_archive,
    the_local_runner_on_the_aws_backend_with_positions_and_rule_state_in_valkey,
    the_s3_archive_partitions_by_hour_and_rewrites_on_replay,
    dynamodb_radius_queries_equal_a_brute_force_scan_at_every_radius,
    metric_names_are_bounded_across_instances,
);

async fn pipeline_through_the_sdk_adapters_and_replay_changes_nothing(emulator: Emulator) {
    let p = pipeline(&emulator, "pipe").await;
    let t0 = geostream_shared::now_millis() - 60_000;
    let reading = |device: &str, n: i64, lat: f64, engine: f64| json!({"device_id": device, "ts": t0 + n * 1000, "event_id": format!("{device}-{n}"), "lat": lat, "lon": 13.405, "engine_temp_c": engine});
    p.post(json!([
        reading("aws-truck-1", 0, 52.520, 90.0),
        reading("aws-truck-2", 0, 52.521, 90.0),
        reading("aws-hot-1", 0, 52.522, 104.0),
        reading("aws-hot-1", 1, 52.523, 108.0),
    ]))
    .await;
    let events = read_stream(&p.harness.kinesis, &p.names.telemetry_stream).await;
    assert_eq!(
        events.iter().map(|e| e.records.len()).sum::<usize>(),
        3,
        "one record per device per request"
    );
    p.process(&events).await;

    let (status, truck) = p.get("/v1/vehicles/aws-truck-1", &[]).await;
    assert_eq!(
        (status, truck["lat"].as_f64()),
        (200, Some(52.52)),
        "{truck}"
    );
    let (_, near) = p
        .get(
            "/v1/vehicles/near",
            &[
                ("lat", "52.521".into()),
                ("lon", "13.405".into()),
                ("radius_m", "1000".into()),
            ],
        )
        .await;
    let ids: Vec<&str> = near["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["aws-truck-2", "aws-truck-1", "aws-hot-1"], "{near}");
    let (_, active) = p.get("/v1/alerts", &[("state", "active".into())]).await;
    assert_eq!(active["count"], 1, "{active}");
    assert_eq!(
        (
            active["alerts"][0]["device_id"].as_str(),
            active["alerts"][0]["count"].as_u64()
        ),
        (Some("aws-hot-1"), Some(2))
    );
    let transitions = read_stream(&p.harness.kinesis, &p.names.alerts_stream).await;
    assert_eq!(
        transitions.iter().map(|e| e.records.len()).sum::<usize>(),
        1
    );

    // A replayed batch (Lambda retrying after a timeout) leaves every store as it was.
    let (_, hot_before) = p.get("/v1/vehicles/aws-hot-1", &[]).await;
    p.process(&events).await;
    let (_, hot_after) = p.get("/v1/vehicles/aws-hot-1", &[]).await;
    assert_eq!(hot_before, hot_after);
    let (_, active_after) = p.get("/v1/alerts", &[("state", "active".into())]).await;
    assert_eq!(active_after, active);
    let transitions = read_stream(&p.harness.kinesis, &p.names.alerts_stream).await;
    assert_eq!(
        transitions.iter().map(|e| e.records.len()).sum::<usize>(),
        1,
        "a replay raises nothing twice"
    );

    // Acknowledge through query-api, against DynamoDB.
    let alert_id = active["alerts"][0]["alert_id"]
        .as_str()
        .unwrap()
        .replace('|', "%7C");
    let response = p
        .query_api
        .handle(
            request(
                "POST",
                &format!("/v1/alerts/{alert_id}/ack"),
                &[],
                Some(json!({"by": "ops"})),
            ),
            &p.metrics,
        )
        .await;
    assert_eq!(json_of(&response)["acknowledged_by"], "ops");

    // Track reads, through the archive the pipeline wrote.
    let (from, to) = (t0, t0 + 10_000);
    if emulator.kind == EmulatorKind::Moto {
        // moto's Timestream query returns canned results only (it has no time-series engine),
        // so the exact query is registered with a canned answer and the parsing is tested.
        let archive = TimestreamArchive::new(
            p.harness.timestream_write.clone(),
            p.harness.timestream_query.clone(),
            p.harness.timestream_discovery,
            &p.names.timestream_database,
            &p.names.timestream_table,
        );
        let sql = archive.track_query("aws-hot-1", from, to, 1000);
        let canned = json!({"results": {sql: [{
            "QueryId": "canned",
            "ColumnInfo": [{"Name": "device_id", "Type": {"ScalarType": "VARCHAR"}}, {"Name": "measure_name", "Type": {"ScalarType": "VARCHAR"}},
                           {"Name": "time", "Type": {"ScalarType": "TIMESTAMP"}}, {"Name": "event_id", "Type": {"ScalarType": "VARCHAR"}},
                           {"Name": "engine_temp_c", "Type": {"ScalarType": "DOUBLE"}}],
            "Rows": [{"Data": [{"ScalarValue": "aws-hot-1"}, {"ScalarValue": "reading"}, {"ScalarValue": "2025-11-23 12:13:20.000000000"},
                               {"ScalarValue": "aws-hot-1-0"}, {"ScalarValue": "104.0"}]}]
        }]}});
        let posted = reqwest::Client::new()
            .post(format!(
                "{}/moto-api/static/timestream/query-results",
                emulator.endpoint
            ))
            .json(&canned)
            .send()
            .await
            .unwrap();
        assert!(posted.status().is_success());
    }
    let (status, track) = p
        .get(
            "/v1/vehicles/aws-hot-1/track",
            &[("from", from.to_string()), ("to", to.to_string())],
        )
        .await;
    assert_eq!(status, 200, "{track}");
    let readings: Vec<(i64, f64)> = track["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["ts"].as_i64().unwrap(),
                r["engine_temp_c"].as_f64().unwrap(),
            )
        })
        .collect();
    match emulator.kind {
        EmulatorKind::Moto => assert_eq!(readings, [(1_763_900_000_000, 104.0)], "{track}"),
        // The S3 archive: the objects the archiver wrote (twice, the replay included), read
        // back once each, in time order.
        EmulatorKind::LocalStack => {
            assert_eq!(readings, [(t0, 104.0), (t0 + 1000, 108.0)], "{track}")
        }
    }

    // A poison record goes to the SQS dead-letter queue with its reason.
    let mut poison = events[0].clone();
    poison.records.truncate(1);
    poison.records[0].kinesis.data.0 = b"not an envelope".to_vec();
    assert!(handle_kinesis(&p.geo_update, poison, &p.metrics)
        .await
        .batch_item_failures
        .is_empty());
    assert_eq!(
        p.metrics
            .total(geostream_geo_update::FUNCTION_NAME, MetricName::DeadLetters),
        1.0
    );
    let received = p
        .harness
        .sqs
        .receive_message()
        .queue_url(&p.queue_url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap();
    let bodies: Vec<Value> = received
        .messages()
        .iter()
        .map(|m| serde_json::from_str(m.body().unwrap()).unwrap())
        .collect();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0]["function"], "geo-update");
    assert!(bodies[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not a GeoStream envelope"));
    p.assert_calls_are_declared();
}

async fn aws_calls_per_thousand_events(emulator: Emulator) {
    let p = pipeline(&emulator, "calls").await;
    let t0 = geostream_shared::now_millis() - 120_000;
    // 100 vehicles x 10 readings, sent as two requests of 500 (5 readings per vehicle each).
    for half in 0..2 {
        let items: Vec<Value> = (0..100)
            .flat_map(|v| {
                (0..5).map(move |k| {
                    let n = half * 5 + k;
                    json!({"device_id": format!("count-{v:03}"), "ts": t0 + n * 1000, "lat": 52.5 + v as f64 * 1e-3, "lon": 13.4,
                           "engine_temp_c": 90.0, "tire_pressure_psi": 34.0})
                })
            })
            .collect();
        p.post(Value::Array(items)).await;
    }
    let events = read_stream(&p.harness.kinesis, &p.names.telemetry_stream).await;
    p.process(&events).await;
    let per_function: BTreeMap<&str, (u64, BTreeMap<String, u64>)> =
        ["ingest", "geo-update", "archiver", "anomaly-inspector"]
            .into_iter()
            .map(|name| {
                let calls = &p.ports[name].clients().calls;
                (name, (calls.total(), calls.snapshot()))
            })
            .collect();
    eprintln!(
        "AWS API calls for 1,000 events (100 vehicles, 2 requests, {} stream batches):",
        events.len()
    );
    for (function, (total, calls)) in &per_function {
        eprintln!("  {function:<18} {total:>4} calls  {calls:?}");
    }
    assert_eq!(per_function["ingest"].0, 2, "one PutRecords per request");
    // One WriteRecords per 100 readings of a stream batch (one batch per shard here).
    assert!(per_function["archiver"].0 <= (10 + events.len()) as u64);
    for (function, (total, _)) in &per_function {
        assert!(
            *total <= 400,
            "{function} made {total} calls for 1,000 events"
        );
    }
}

/// `geostream-local --backend aws --archive timestream`: on moto only (LocalStack's community
/// tier has no Timestream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_runner_on_the_aws_backend_with_the_timestream_archive() {
    let Some(emulator) = Emulator::get(EmulatorKind::Moto) else {
        return;
    };
    runner_on_the_aws_backend(&emulator, ArchiveKind::Timestream, StoreKind::DynamoDb).await;
}

/// `geostream-local --backend aws --archive s3`: the archive Terraform deploys by default,
/// built by the same composition root as the Lambda mains, read back through the query API.
async fn the_local_runner_on_the_aws_backend_with_the_s3_archive(emulator: Emulator) {
    runner_on_the_aws_backend(&emulator, ArchiveKind::S3, StoreKind::DynamoDb).await;
}

/// The runner with positions and rule state in Valkey (a real Redis server), the rest on the
/// emulator: the configuration docs/cost.md recommends for fleets.
async fn the_local_runner_on_the_aws_backend_with_positions_and_rule_state_in_valkey(
    emulator: Emulator,
) {
    let Some(url) = geostream_e2e::harness::valkey() else {
        return;
    };
    runner_on_the_aws_backend(&emulator, ArchiveKind::S3, StoreKind::Valkey { url }).await;
}

async fn runner_on_the_aws_backend(
    emulator: &Emulator,
    archive: ArchiveKind,
    position_store: StoreKind,
) {
    let valkey = matches!(position_store, StoreKind::Valkey { .. });
    let prefix = format!(
        "gs-runner-{:?}-{archive:?}-{}-{}",
        emulator.kind,
        if valkey { "valkey" } else { "ddb" },
        std::process::id()
    )
    .to_lowercase();
    let config = geostream_local::LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: geostream_local::Backend::Aws(AwsBackend {
            endpoint_url: Some(emulator.endpoint.clone()),
            names: ResourceNames::with_prefix(&prefix),
            create_resources: true,
            archive,
            rule_state_store: position_store.clone(),
            recent_tracks: match &position_store {
                StoreKind::Valkey { url } => Some(url.clone()),
                StoreKind::DynamoDb => None,
            },
            position_store,
        }),
        shards: 2,
        ..Default::default()
    };
    let running = geostream_local::start(config)
        .await
        .expect("the runner starts on the emulator");
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    let t0 = geostream_shared::now_millis() - 30_000;
    let body = json!([
        {"device_id": "runner-1", "ts": t0, "lat": 48.137, "lon": 11.575, "engine_temp_c": 101.5},
        {"device_id": "runner-1", "ts": t0 + 1000, "lat": 48.138, "lon": 11.575, "engine_temp_c": 103.0},
        {"device_id": "runner-2", "ts": t0, "lat": 48.139, "lon": 11.576, "humidity_pct": 40.0},
    ]);
    let response = http
        .post(format!("{base}/v1/telemetry"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    // The event-source-mapping loops poll Kinesis with GetRecords; poll for the results (the
    // deadline only bounds a failure).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut alerts: Value;
    loop {
        alerts = http
            .get(format!("{base}/v1/alerts?state=active"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let position = http
            .get(format!("{base}/v1/vehicles/runner-2"))
            .send()
            .await
            .unwrap();
        // runner-1's records may sit on another shard than runner-2's: wait for both.
        let newest_of_runner_1: Value = http
            .get(format!("{base}/v1/vehicles/runner-1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null);
        if alerts["count"] == 1
            && position.status().as_u16() == 200
            && newest_of_runner_1["ts"] == json!(t0 + 1000)
        {
            break;
        }
        if std::time::Instant::now() >= deadline {
            panic!("no alert and position from the runner in 60 s: alerts {alerts}, runner-2 {position:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(alerts["count"], 1, "{alerts}");
    assert_eq!(alerts["alerts"][0]["device_id"], "runner-1");
    assert_eq!(alerts["alerts"][0]["count"], 2);
    let near: Value = http
        .get(format!(
            "{base}/v1/vehicles/near?lat=48.138&lon=11.575&radius_m=500"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(near["count"], 2, "{near}");
    let stats = running.stack.stats();
    assert_eq!(stats.backend, "aws");
    // One PutRecords for the telemetry request, one for the alert raised. The alert shows once
    // its state is committed and is published just after: poll, with a deadline that only
    // bounds a failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut calls = stats.aws_calls.unwrap();
    while calls.get("PutRecords") < Some(&2) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        calls = running.stack.stats().aws_calls.unwrap();
    }
    assert_eq!(calls.get("PutRecords"), Some(&2), "{calls:?}");
    assert!(calls.get("GetRecords").is_some_and(|n| *n > 0));
    // Each function on its own clients: with positions in Valkey, geo-update calls no AWS API.
    let usage = running.stack.aws_usage.as_ref().unwrap();
    let calls_of = |function: &str| {
        usage
            .functions
            .iter()
            .find(|f| f.function == function)
            .map(|f| f.calls.snapshot())
            .unwrap()
    };
    let geo_update_calls = calls_of("geo-update");
    let inspector_calls = calls_of("anomaly-inspector");
    if valkey {
        assert!(geo_update_calls.is_empty(), "{geo_update_calls:?}");
        // Rule state in Valkey: DynamoDB only gets the raised alert's record, and the geofence
        // cache's reads when the first batch builds it (the version, then the table; the next
        // look is 30 s later).
        assert_eq!(
            inspector_calls.get("GetItem"),
            Some(&1),
            "{inspector_calls:?}"
        );
        assert_eq!(inspector_calls.get("Scan"), Some(&1), "{inspector_calls:?}");
        assert_eq!(
            inspector_calls.get("UpdateItem"),
            Some(&1),
            "{inspector_calls:?}"
        );
    } else {
        assert_eq!(
            geo_update_calls.get("PutItem"),
            Some(&2),
            "{geo_update_calls:?}"
        );
        assert!(
            inspector_calls.contains_key("GetItem"),
            "{inspector_calls:?}"
        );
    }
    match archive {
        ArchiveKind::Timestream => {
            // The archiver's mapping runs apart from the ones awaited above: poll, with a
            // deadline that only bounds a failure.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut calls = calls;
            while !calls.contains_key("WriteRecords") && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                calls = running.stack.stats().aws_calls.unwrap();
            }
            assert!(calls.contains_key("WriteRecords"), "{calls:?}");
            assert!(!calls.contains_key("PutObject"), "{calls:?}");
        }
        ArchiveKind::S3 => {
            assert!(!calls.contains_key("WriteRecords"), "{calls:?}");
            // moto's Timestream cannot answer queries; the S3 archive reads back what it wrote
            // (the archiver's mapping runs apart from the ones awaited above: poll, with a
            // deadline that only bounds a failure).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let (mut track, mut temperatures): (Value, Vec<Value>);
            loop {
                track = http
                    .get(format!("{base}/v1/vehicles/runner-1/track"))
                    .query(&[("from", t0 - 1000), ("to", t0 + 2000)])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                temperatures = track["readings"]
                    .as_array()
                    .map(|readings| {
                        readings
                            .iter()
                            .map(|r| r["engine_temp_c"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                if temperatures.len() >= 2 || std::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(temperatures, [json!(101.5), json!(103.0)], "{track}");
            // Counted only now: the archiver may not have written when the alert showed.
            let calls = running.stack.stats().aws_calls.unwrap();
            assert!(calls.contains_key("PutObject"), "{calls:?}");
        }
    }
    running.shutdown().await;
}

async fn the_s3_archive_partitions_by_hour_and_rewrites_on_replay(emulator: Emulator) {
    use geostream_shared::model::Reading;
    use geostream_shared::ports::Archive;
    let clients = Clients::new(&sdk_config(Some(&emulator.endpoint)).await);
    let bucket = format!("gs-archive-{}", std::process::id());
    clients
        .s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket is created on the emulator");
    let archive = geostream_aws::s3archive::S3Archive::new(clients.s3.clone(), &bucket);
    let t0 = 1_763_900_000_000; // 2025-11-23 12:13:20 UTC
    let readings: Vec<Reading> = (0..6)
        .map(|n| Reading {
            device_id: if n % 2 == 0 {
                "s3-truck-1"
            } else {
                "s3-truck-2"
            }
            .into(),
            ts: t0 + n * 20 * 60 * 1000, // every 20 minutes: two hour partitions
            event_id: format!("e{n}"),
            engine_temp_c: Some(90.0 + n as f64),
            ..Default::default()
        })
        .collect();
    assert!(archive.write(&readings).await.unwrap().is_empty());
    assert!(
        archive.write(&readings).await.unwrap().is_empty(),
        "a retried batch rewrites the same objects"
    );
    // The same readings in another batch (a replay from the stream) land in another object.
    assert!(archive.write(&readings[..2]).await.unwrap().is_empty());

    let listed = clients
        .s3
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("readings/")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys
        .iter()
        .any(|k| k.starts_with("readings/date=2025-11-23/hour=12/")));
    assert!(keys
        .iter()
        .any(|k| k.starts_with("readings/date=2025-11-23/hour=13/")));

    let track = archive
        .track("s3-truck-1", t0, t0 + 3 * 3_600_000, 100)
        .await
        .unwrap();
    let ids: Vec<&str> = track.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(
        ids,
        ["e0", "e2", "e4"],
        "one reading each, in time order, duplicates removed"
    );
    assert_eq!(track[1].engine_temp_c, Some(92.0));
    assert!(archive
        .track("s3-truck-1", t0, t0 + 49 * 3_600_000, 100)
        .await
        .is_err());
}

/// DynamoDB's geo index answers every radius the API accepts, exactly (equal to a brute-force
/// scan), through the query API's own composition: 2, 30 and 100 km around a metro area at
/// fleet A's density, rings just inside and outside each radius, and a circle around the pole
/// (more index cells than a query reads: a Scan). Prints the store requests per query.
async fn dynamodb_radius_queries_equal_a_brute_force_scan_at_every_radius(emulator: Emulator) {
    use futures::stream::{self, StreamExt};
    use geostream_e2e::fleet::{fleet, position, METRO, RADII_M};
    use geostream_shared::model::GeoPoint;
    use geostream_shared::ports::nearest;

    let p = pipeline(&emulator, "radius").await;
    let writer = p.ports["geo-update"].positions().await.unwrap();
    let reader = &p.ports["query-api"];
    let store = reader.positions().await.unwrap();
    // moto takes a few milliseconds per write: an eighth of the metro's density suffices to put
    // hundreds of vehicles in every radius, and the rings are all kept.
    let mut vehicles: Vec<_> = fleet()
        .into_iter()
        .enumerate()
        .filter(|(i, v)| i % 8 == 0 || !v.device_id.starts_with("metro-"))
        .map(|(_, v)| v)
        .collect();
    vehicles.push(position("polar-1", 9, "e", 89.9, 45.0));
    stream::iter(vehicles.clone())
        .for_each_concurrent(16, |v| {
            let writer = writer.clone();
            async move {
                writer.upsert_if_newer(v).await.unwrap();
            }
        })
        .await;

    let pole = GeoPoint {
        lat: 89.5,
        lon: 0.0,
    };
    let mut cases: Vec<(GeoPoint, f64)> = RADII_M.iter().map(|r| (METRO, *r)).collect();
    cases.push((pole, 100_000.0));
    for (center, radius_m) in cases {
        for limit in [100, 20_000] {
            let before = reader.clients().calls.snapshot();
            let answer = store.near(center, radius_m, limit).await.unwrap();
            let after = reader.clients().calls.snapshot();
            let requests: BTreeMap<&String, u64> = after
                .iter()
                .map(|(op, n)| (op, n - before.get(op).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect();
            assert_eq!(
                answer,
                nearest(center, radius_m, limit, &vehicles),
                "center {center:?}, radius {radius_m} m, limit {limit}"
            );
            println!(
                "dynamodb near {center:?} radius {radius_m} m limit {limit}: {} vehicles, requests {requests:?}",
                answer.len()
            );
        }
    }
}

/// The deployment's metric-name registry on DynamoDB: instances that share the table (each
/// with its own memory of known names) never admit more names than the limit together, a name
/// one admitted is admitted by all, and a known name costs no request.
async fn metric_names_are_bounded_across_instances(emulator: Emulator) {
    use geostream_aws::metric_names::{DynamoMetricNames, COUNT_KEY};
    use geostream_shared::ports::MetricNameRegistry;
    use std::collections::BTreeSet;

    let sdk = sdk_config(Some(&emulator.endpoint)).await;
    let names = ResourceNames::with_prefix(&format!("gs-names-{}", std::process::id()));
    create_resources(&Clients::new(&sdk), &names, 1, emulator.archive())
        .await
        .expect("resources are created on the emulator");
    let instance = || {
        let clients = Clients::new(&sdk);
        let calls = clients.calls.clone();
        let registry = DynamoMetricNames::new(clients.dynamodb, &names.metric_names_table, 3);
        (registry, calls)
    };
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    let (first, first_calls) = instance();
    let (second, _) = instance();

    assert_eq!(
        first.admit(&set(&["door_open", "fuel_l"])).await.unwrap(),
        set(&[])
    );
    // fuel_l is known to the table; oil_c takes the last place; tyre_bar is one too many.
    assert_eq!(
        second
            .admit(&set(&["fuel_l", "oil_c", "tyre_bar"]))
            .await
            .unwrap(),
        set(&["tyre_bar"])
    );
    assert_eq!(
        first.admit(&set(&["tyre_bar"])).await.unwrap(),
        set(&["tyre_bar"])
    );
    assert_eq!(
        first.admit(&set(&["oil_c"])).await.unwrap(),
        set(&[]),
        "another instance's"
    );
    let before = first_calls.total();
    assert_eq!(
        first
            .admit(&set(&["door_open", "fuel_l", "oil_c"]))
            .await
            .unwrap(),
        set(&[])
    );
    assert_eq!(first_calls.total(), before, "known names cost no request");

    // Eight instances at once, each with a name of its own, on a fresh limit of five.
    let names_now = |n: usize| format!("concurrent_{n}");
    let fresh = ResourceNames::with_prefix(&format!("gs-names2-{}", std::process::id()));
    create_resources(&Clients::new(&sdk), &fresh, 1, emulator.archive())
        .await
        .expect("resources are created on the emulator");
    let refused: usize = futures::future::join_all((0..8).map(|n| {
        let registry =
            DynamoMetricNames::new(Clients::new(&sdk).dynamodb, &fresh.metric_names_table, 5);
        async move {
            registry
                .admit(&set(&[names_now(n).as_str()]))
                .await
                .unwrap()
                .len()
        }
    }))
    .await
    .into_iter()
    .sum();
    assert_eq!(refused, 3, "five of eight admitted, never more");
    let count = Clients::new(&sdk)
        .dynamodb
        .get_item()
        .table_name(&fresh.metric_names_table)
        .key(
            "name",
            aws_sdk_dynamodb::types::AttributeValue::S(COUNT_KEY.into()),
        )
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    assert_eq!(
        count
            .item()
            .and_then(|i| i.get("name_count"))
            .and_then(|n| n.as_n().ok())
            .map(String::as_str),
        Some("5")
    );
}
