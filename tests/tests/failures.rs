//! Failure paths on the AWS adapters, through a fault-injecting proxy in front of each emulator
//! (moto server and LocalStack, started by `scripts/test`): a store outage longer than the retry budget ends
//! in dead letters that a redrive replays into the state a run without the outage reaches, and
//! Lambda's on-failure batches are read again from the stream and replayed.

use std::collections::BTreeMap;
use std::sync::Arc;

use geostream_aws::compose::Composition;
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::manifest;
use geostream_aws::provision::{create_resources, queue_url, ArchiveKind, ResourceNames};
use geostream_aws::redrive::Redrive;
use geostream_e2e::harness::{json_of, read_stream, request, Emulator};
use geostream_e2e::on_each_emulator;
use geostream_geo_update::GeoUpdate;
use geostream_ingest::Ingest;
use geostream_lambda::stream::handle_kinesis;
use geostream_lambda::stream::KinesisEvent;
use geostream_local::fault_proxy::{Fault, FaultPlan, FaultProxy, Outage};
use geostream_shared::metrics::RecordedMetrics;
use geostream_shared::model::Position;
use geostream_shared::ports::PositionStore;
use geostream_shared::stream::{RetryBudget, StreamFunction, WithRetryBudget};
use serde_json::{json, Value};

/// A deployment's resources on the emulator, and each function's ports reaching them through
/// `endpoint` (the proxy), built by the composition root the Lambda mains use.
struct Deployment {
    names: ResourceNames,
    dead_letter_queue: String,
    clients: Clients,
    ports: BTreeMap<&'static str, Composition>,
}

async fn deployment(emulator: &str, endpoint: &str, test: &str) -> Deployment {
    let prefix = format!("gs-{test}-{}", std::process::id());
    let names = ResourceNames::with_prefix(&prefix);
    let setup = Clients::new(&sdk_config(Some(emulator)).await);
    let dead_letter_queue = create_resources(&setup, &names, 2, ArchiveKind::S3)
        .await
        .expect("resources are created on the emulator");
    let sdk = sdk_config(Some(endpoint)).await;
    let ports = manifest::FUNCTIONS
        .iter()
        .map(|function| {
            let settings = names.settings(ArchiveKind::S3, &dead_letter_queue);
            let composition = Composition::new(
                function.name,
                function.ports,
                Box::new(settings),
                Clients::new(&sdk),
            );
            (function.name, composition)
        })
        .collect();
    Deployment {
        names,
        dead_letter_queue,
        clients: Clients::new(&sdk),
        ports,
    }
}

impl Deployment {
    async fn geo_update(&self) -> GeoUpdate {
        let ports = &self.ports["geo-update"];
        let built = "the composition root builds geo-update's ports";
        GeoUpdate::new(
            ports.positions().await.expect(built),
            ports.dead_letters().expect(built),
        )
    }

    async fn positions(&self) -> Arc<dyn PositionStore> {
        self.ports["query-api"]
            .positions()
            .await
            .expect("the composition root builds the query API's positions")
    }

    async fn post(&self, body: Value) {
        let ports = &self.ports["ingest"];
        let ingest = Ingest::new(
            ports
                .telemetry_bus()
                .await
                .expect("the composition root builds ingest's bus"),
            ports
                .metric_names()
                .expect("the composition root builds ingest's metric names"),
        );
        let response = ingest
            .handle(
                request("POST", "/v1/telemetry", &[], Some(body)),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(response.status_code, 202, "{:?}", json_of(&response));
    }

    async fn stream(&self) -> Vec<KinesisEvent> {
        read_stream(&self.clients.kinesis, &self.names.telemetry_stream).await
    }

    fn redrive<'a>(&self, functions: &'a [&'a dyn StreamFunction]) -> Redrive<'a> {
        Redrive {
            functions,
            sqs: self.clients.sqs.clone(),
            s3: self.clients.s3.clone(),
            kinesis: self.clients.kinesis.clone(),
        }
    }
}

const DEVICES: usize = 12;
const READINGS: i64 = 3;
const BULK_READINGS: i64 = 500;

/// Readings of a small fleet, one per POST, and one vehicle uploading a backlog of 500 readings
/// in one POST (its record is larger than an SQS message once base64'd).
async fn post_fleet(deployment: &Deployment, t0: i64) {
    for n in 0..READINGS {
        for device in 0..DEVICES {
            let lat = 52.5 + device as f64 * 0.001 + n as f64 * 0.0001;
            deployment
                .post(json!({"device_id": format!("fault-truck-{device}"), "ts": t0 + n * 1000, "lat": lat, "lon": 13.4, "engine_temp_c": 90.0}))
                .await;
        }
    }
    let metrics: serde_json::Map<String, Value> = (0..20)
        .map(|m| (format!("sensor_{m:02}"), json!(m as f64 + 0.25)))
        .collect();
    let backlog: Vec<Value> = (0..BULK_READINGS)
        .map(|n| json!({"device_id": "fault-bulk", "ts": t0 + n * 100, "lat": 48.1 + n as f64 * 1e-5, "lon": 11.5, "metrics": metrics}))
        .collect();
    deployment.post(Value::Array(backlog)).await;
}

async fn fleet_positions(store: &dyn PositionStore) -> BTreeMap<String, Position> {
    let mut positions = BTreeMap::new();
    let devices = (0..DEVICES)
        .map(|d| format!("fault-truck-{d}"))
        .chain(["fault-bulk".to_string()]);
    for device in devices {
        if let Some(position) = store.get(&device).await.unwrap() {
            positions.insert(device, position);
        }
    }
    positions
}

on_each_emulator!(
    a_position_store_outage_past_the_retry_budget_then_a_redrive_ends_as_without_it,
    batches_lambda_gave_up_on_are_read_again_from_the_stream_and_replayed,
);

async fn a_position_store_outage_past_the_retry_budget_then_a_redrive_ends_as_without_it(
    emulator: Emulator,
) {
    let emulator = emulator.endpoint;
    let proxy = FaultProxy::start(&emulator, FaultPlan::none())
        .await
        .unwrap();
    let faulty = deployment(&emulator, &proxy.url, "outage").await;
    let t0 = geostream_shared::now_millis() - 120_000;
    post_fleet(&faulty, t0).await;
    let events = faulty.stream().await;
    let records: usize = events.iter().map(|e| e.records.len()).sum();
    assert_eq!(records, DEVICES * READINGS as usize + 1);

    // DynamoDB answers the positions table with 503s for longer than the mapping retries.
    proxy.set_plan(FaultPlan {
        outages: vec![Outage {
            operation: "PutItem".into(),
            body_contains: Some(faulty.names.positions_table.clone()),
            fault: Fault::Unavailable,
        }],
        ..FaultPlan::none()
    });
    let max_retries = 2;
    let geo_update = WithRetryBudget::new(
        faulty.geo_update().await,
        RetryBudget::within_mapping(max_retries, None),
        faulty.ports["geo-update"].dead_letters().unwrap(),
    );
    let metrics = RecordedMetrics::new();
    for attempt in 1..=max_retries + 1 {
        let mut failed = 0;
        for event in &events {
            failed += handle_kinesis(&geo_update, event.clone(), &metrics)
                .await
                .batch_item_failures
                .len();
        }
        let expected = if attempt <= max_retries { records } else { 0 };
        assert_eq!(
            failed, expected,
            "attempt {attempt}: what the mapping retries"
        );
    }
    assert!(proxy.stats().total_injected() > 0);
    let positions = faulty.positions().await;
    assert!(fleet_positions(positions.as_ref()).await.is_empty());
    // The backlog's letter was too large for SQS: it went to the dead-letter bucket.
    let spilled = faulty
        .clients
        .s3
        .list_objects_v2()
        .bucket(&faulty.names.dead_letter_bucket)
        .prefix("dead-letters/geo-update/")
        .send()
        .await
        .unwrap();
    assert_eq!(spilled.contents().len(), 1, "the backlog's letter is on S3");

    // The store is back; the operator redrives.
    proxy.set_plan(FaultPlan::none());
    let plain = faulty.geo_update().await;
    let functions: [&dyn StreamFunction; 1] = [&plain];
    let report = faulty
        .redrive(&functions)
        .dead_letters(&faulty.dead_letter_queue)
        .await
        .unwrap();
    println!("redrive after the outage: {report}");
    assert_eq!(report.messages, records);
    assert_eq!(report.replayed.get("geo-update"), Some(&records));
    assert_eq!((report.failed_again, report.deleted), (0, records));
    assert!(
        report.not_replayable.is_empty(),
        "{:?}",
        report.not_replayable
    );
    let redriven = fleet_positions(positions.as_ref()).await;

    // The same records through a deployment that had no outage.
    let healthy = deployment(&emulator, &emulator, "healthy").await;
    let healthy_geo_update = healthy.geo_update().await;
    for event in &events {
        let response = handle_kinesis(&healthy_geo_update, event.clone(), &metrics).await;
        assert!(response.batch_item_failures.is_empty());
    }
    let expected = fleet_positions(healthy.positions().await.as_ref()).await;
    assert_eq!(expected.len(), DEVICES + 1);
    assert_eq!(redriven, expected);
    assert_eq!(expected["fault-bulk"].ts, t0 + (BULK_READINGS - 1) * 100);

    // A second redrive finds nothing and changes nothing.
    let again = faulty
        .redrive(&functions)
        .dead_letters(&faulty.dead_letter_queue)
        .await
        .unwrap();
    assert_eq!(again.messages, 0);
    assert_eq!(fleet_positions(positions.as_ref()).await, expected);
}

async fn batches_lambda_gave_up_on_are_read_again_from_the_stream_and_replayed(emulator: Emulator) {
    let emulator = emulator.endpoint;
    let deployment = deployment(&emulator, &emulator, "onfailure").await;
    let t0 = geostream_shared::now_millis() - 120_000;
    post_fleet(&deployment, t0).await;
    let events = deployment.stream().await;
    let stream = deployment
        .clients
        .kinesis
        .describe_stream_summary()
        .stream_name(&deployment.names.telemetry_stream)
        .send()
        .await
        .unwrap();
    let stream_arn = stream
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_string();
    let failures = queue_url(&deployment.clients, &deployment.names.stream_failures_queue)
        .await
        .unwrap();
    // What Lambda sends its on-failure destination when it gives up on a batch: the shard and
    // the sequence range, not the records.
    let mut records = 0;
    for event in events.iter().filter(|e| !e.records.is_empty()) {
        let first = &event.records[0];
        let last = &event.records[event.records.len() - 1];
        let shard = first
            .event_id
            .as_deref()
            .unwrap()
            .split(':')
            .next()
            .unwrap();
        records += event.records.len();
        let body = json!({
            "requestContext": {
                "requestId": "c9b8fa9f-5a7f-xmpl-af9c-0c604cde93a5",
                "functionArn": format!("arn:aws:lambda:us-east-1:123456789012:function:{}-geo-update", deployment.names.telemetry_stream.trim_end_matches("-telemetry")),
                "condition": "RetryAttemptsExhausted",
                "approximateInvokeCount": 6
            },
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
            "version": "1.0",
            "timestamp": "2026-11-24T00:38:06.021Z",
            "KinesisBatchInfo": {
                "shardId": shard,
                "startSequenceNumber": first.kinesis.sequence_number,
                "endSequenceNumber": last.kinesis.sequence_number,
                "approximateArrivalOfFirstRecord": "2026-11-24T00:38:04.835Z",
                "approximateArrivalOfLastRecord": "2026-11-24T00:38:05.580Z",
                "batchSize": event.records.len(),
                "streamArn": stream_arn
            }
        });
        deployment
            .clients
            .sqs
            .send_message()
            .queue_url(&failures)
            .message_body(body.to_string())
            .send()
            .await
            .unwrap();
    }
    let geo_update = deployment.geo_update().await;
    let functions: [&dyn StreamFunction; 1] = [&geo_update];
    let report = deployment
        .redrive(&functions)
        .stream_failures(&failures)
        .await
        .unwrap();
    println!("redrive of on-failure batches: {report}");
    assert!(
        report.not_replayable.is_empty(),
        "{:?}",
        report.not_replayable
    );
    assert_eq!(report.replayed.get("geo-update"), Some(&records));
    let positions = fleet_positions(deployment.positions().await.as_ref()).await;
    assert_eq!(positions.len(), DEVICES + 1);
    assert_eq!(
        positions["fault-truck-3"].ts,
        t0 + (READINGS - 1) * 1000,
        "the newest reading of each vehicle"
    );
    let again = deployment
        .redrive(&functions)
        .stream_failures(&failures)
        .await
        .unwrap();
    assert_eq!(
        again.messages, 0,
        "every batch was replayed and its message deleted"
    );
}
