//! One function per parser of outside input, each taking the raw bytes as they arrive; the
//! fuzz targets (`src/bin/`) hand them AFL++'s inputs. Any panic is a crash. Where a parse
//! succeeds, what it promises is checked too.

use std::sync::Arc;

use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::apigw::ApiGatewayV2httpRequest;
use geostream_lambda::http::query_parameters;
use geostream_lambda::stream::{batch_from_kafka, batch_from_kinesis, KafkaEvent, KinesisEvent};
use geostream_query_api::QueryApi;
use geostream_shared::envelope::Envelope;
use geostream_shared::memory::{MemoryAlertStore, MemoryArchive, MemoryPositionStore};
use geostream_shared::metrics::RecordedMetrics;
use geostream_shared::model::{Position, Reading};
use geostream_shared::ports::{AlertStore, Archive, PositionStore};
use geostream_shared::rules::{DeviceRuleStates, RuleSet};
use geostream_shared::stream::StreamBatch;
use geostream_shared::validation::{validate_body, ValidationPolicy};

/// A fixed "now", so a run is reproducible.
const NOW: i64 = 1_796_500_000_000;

/// `POST /v1/telemetry`'s body: every item is accepted or rejected with a reason, never both,
/// never neither.
pub fn telemetry_body(data: &[u8]) {
    if let Ok(batch) = validate_body(data, NOW, &ValidationPolicy::default()) {
        let items = batch.item_count();
        let mut seen: Vec<usize> = batch
            .accepted
            .iter()
            .map(|(index, _)| *index)
            .chain(batch.rejected.iter().map(|r| r.index))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), items, "every item answered once");
    }
}

/// A record on the bus: what decodes encodes back to the same envelope.
pub fn bus_envelope(data: &[u8]) {
    if let Ok(envelope) = Envelope::decode(data) {
        let again = Envelope::decode(&envelope.encode()).expect("an encoded envelope decodes");
        assert_eq!(again, envelope);
    }
}

/// The Kinesis event Lambda hands a stream function, then each record's envelope.
pub fn kinesis_event(data: &[u8]) {
    if let Ok(event) = serde_json::from_slice::<KinesisEvent>(data) {
        let records = event.records.len();
        records_decode(&batch_from_kinesis(event), records);
    }
}

/// The Kafka event of a self-managed Kafka source, then each record's envelope.
pub fn kafka_event(data: &[u8]) {
    if let Ok(event) = serde_json::from_slice::<KafkaEvent>(data) {
        let records: usize = event.records.values().map(Vec::len).sum();
        records_decode(&batch_from_kafka(event), records);
    }
}

fn records_decode(batch: &StreamBatch, records: usize) {
    assert!(batch.records.len() <= records);
    for record in &batch.records {
        bus_envelope(&record.data);
    }
}

/// A query-api request as the gateway hands it over: the input's first line is the request
/// line (`METHOD /path?query`), the rest the body. The path is routed and percent-decoded, the
/// query string parsed as API Gateway does (`form_urlencoded`), every parameter checked, and
/// the in-memory stores (a few vehicles, a track, an alert) queried. Whatever the request, the
/// answer is JSON with a status the route can give: 200, 400, 404 or 405 (never 500 or 503,
/// which only a failing store may cause).
pub fn query_request(runtime: &tokio::runtime::Runtime, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (line, body) = text.split_once('\n').unwrap_or((&text, ""));
    let Some((method, target)) = line.split_once(' ') else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = ApiGatewayV2httpRequest::default();
    request.raw_path = Some(path.to_string());
    request.raw_query_string = Some(raw_query.to_string());
    request.query_string_parameters = query_parameters(raw_query);
    request.request_context.http.method = method;
    request.request_context.http.path = Some(path.to_string());
    request.body = (!body.is_empty()).then(|| body.to_string());
    let response = runtime.block_on(async {
        let api = query_api_with_data().await;
        api.handle(request, &RecordedMetrics::new()).await
    });
    assert!(
        matches!(response.status_code, 200 | 400 | 404 | 405),
        "status {} for {line:?}",
        response.status_code
    );
    let Some(Body::Text(answer)) = &response.body else {
        panic!("no JSON body for {line:?}");
    };
    let answer: serde_json::Value = serde_json::from_str(answer).expect("the answer is JSON");
    assert!(answer.is_object(), "{answer}");
}

/// Three vehicles in Berlin, a five-reading track of one, and one active alert.
async fn query_api_with_data() -> QueryApi {
    let positions = Arc::new(MemoryPositionStore::new());
    for (n, (lat, lon)) in [(52.52, 13.405), (52.521, 13.406), (-33.9, 151.2)]
        .into_iter()
        .enumerate()
    {
        let position = Position {
            device_id: format!("v{n}"),
            ts: NOW,
            event_id: format!("v{n}@{NOW}"),
            lat,
            lon,
            geohash: String::new(),
            speed_kmh: Some(30.0),
            heading_deg: None,
            received_at: NOW,
        };
        positions.upsert_if_newer(position).await.expect("memory store");
    }
    let archive = Arc::new(MemoryArchive::new(100));
    let track: Vec<Reading> = (0..5)
        .map(|n| Reading {
            device_id: "v0".into(),
            ts: NOW - 60_000 + n * 1_000,
            event_id: format!("v0@{n}"),
            speed_kmh: Some(n as f64),
            ..Default::default()
        })
        .collect();
    archive.write(&track).await.expect("memory archive");
    let alerts = Arc::new(MemoryAlertStore::new());
    let hot = Reading {
        device_id: "v0".into(),
        ts: NOW,
        event_id: "v0@hot".into(),
        engine_temp_c: Some(120.0),
        ..Default::default()
    };
    let mut state = DeviceRuleStates::default();
    let evaluation = RuleSet::default_rules().evaluate("v0", &mut state, &[hot]);
    alerts
        .commit("v0", 0, &state, &evaluation.touched_alerts)
        .await
        .expect("memory alerts");
    QueryApi::new(positions, archive, alerts)
}
