//! What the end-to-end tests share: the emulators they run against, API Gateway v2 requests
//! as API Gateway sends them, and a stream read back as the `KinesisEvent`s Lambda would send.

use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use geostream_aws::provision::ArchiveKind;
use geostream_lambda::stream::{KinesisEvent, KinesisEventRecord, KinesisRecord, RecordData};
use geostream_shared::stream::SequenceNumber;
use serde_json::Value;

/// The AWS-API emulators the end-to-end tests run against; `scripts/test` starts both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmulatorKind {
    /// moto server: each service re-implemented in Python. Timestream writes work; its queries
    /// return only results canned beforehand.
    Moto,
    /// LocalStack 4.9 (community tier) as a plain process, its DynamoDB on DynamoDB Local,
    /// AWS's own engine. No Timestream.
    LocalStack,
}

impl EmulatorKind {
    /// The variable holding its endpoint URL.
    pub fn variable(self) -> &'static str {
        match self {
            EmulatorKind::Moto => "GEOSTREAM_AWS_ENDPOINT",
            EmulatorKind::LocalStack => "GEOSTREAM_LOCALSTACK_ENDPOINT",
        }
    }

    fn script(self) -> &'static str {
        match self {
            EmulatorKind::Moto => "scripts/moto start",
            EmulatorKind::LocalStack => "scripts/localstack start",
        }
    }
}

/// A running emulator: which one, and where.
#[derive(Debug, Clone)]
pub struct Emulator {
    pub kind: EmulatorKind,
    pub endpoint: String,
}

impl Emulator {
    /// The emulator's URL from its variable, or `None` (with a loud note) when it is not
    /// running; under `scripts/test` (GEOSTREAM_REQUIRE_EMULATOR=1) a missing one is a failure.
    pub fn get(kind: EmulatorKind) -> Option<Emulator> {
        let variable = kind.variable();
        match std::env::var(variable) {
            Ok(endpoint) if !endpoint.is_empty() => {
                for (name, value) in [
                    ("AWS_ACCESS_KEY_ID", "testing"),
                    ("AWS_SECRET_ACCESS_KEY", "testing"),
                    ("AWS_REGION", "us-east-1"),
                ] {
                    if std::env::var_os(name).is_none() {
                        std::env::set_var(name, value);
                    }
                }
                Some(Emulator { kind, endpoint })
            }
            _ if std::env::var_os("GEOSTREAM_REQUIRE_EMULATOR").is_some() => {
                panic!(
                    "{variable} is not set but GEOSTREAM_REQUIRE_EMULATOR is: start it with {}",
                    kind.script()
                )
            }
            _ => {
                eprintln!(
                    "SKIPPED: emulator test needs {variable} (scripts/test runs {} and sets it)",
                    kind.script()
                );
                None
            }
        }
    }

    /// The archive a pipeline on this emulator writes: Timestream where the emulator has it
    /// (moto), else the S3 archive (LocalStack's community tier has no Timestream).
    pub fn archive(&self) -> ArchiveKind {
        match self.kind {
            EmulatorKind::Moto => ArchiveKind::Timestream,
            EmulatorKind::LocalStack => ArchiveKind::S3,
        }
    }
}

/// Runs each named `async fn(Emulator)` as two tests, `NAME::moto` and `NAME::localstack`:
/// the emulator suite is run against both.
#[macro_export]
macro_rules! on_each_emulator {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn moto() {
                use $crate::harness::{Emulator, EmulatorKind};
                if let Some(emulator) = Emulator::get(EmulatorKind::Moto) {
                    super::$test(emulator).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn localstack() {
                use $crate::harness::{Emulator, EmulatorKind};
                if let Some(emulator) = Emulator::get(EmulatorKind::LocalStack) {
                    super::$test(emulator).await;
                }
            }
        }
    )+};
}

/// The Redis/Valkey server's URL, or `None` (with a loud note) when it is not running; under
/// `scripts/test` (GEOSTREAM_REQUIRE_VALKEY=1) a missing server is a failure.
pub fn valkey() -> Option<String> {
    match std::env::var("GEOSTREAM_VALKEY_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("GEOSTREAM_REQUIRE_VALKEY").is_some() => {
            panic!("GEOSTREAM_VALKEY_URL is not set but GEOSTREAM_REQUIRE_VALKEY is: start it with scripts/redis start")
        }
        _ => {
            eprintln!("SKIPPED: Valkey test needs GEOSTREAM_VALKEY_URL (scripts/test starts a Redis server and sets it)");
            None
        }
    }
}

/// An API Gateway HTTP API (payload v2) request.
pub fn request(
    method: &str,
    path: &str,
    query: &[(&str, String)],
    body: Option<Value>,
) -> ApiGatewayV2httpRequest {
    let mut request = ApiGatewayV2httpRequest::default();
    request.version = Some("2.0".into());
    request.raw_path = Some(path.into());
    request.request_context.http.method = method.parse().unwrap();
    request.request_context.http.path = Some(path.into());
    let map: std::collections::HashMap<String, String> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    request.query_string_parameters = map.into();
    request.body = body.map(|b| b.to_string());
    request
}

pub fn json_of(response: &ApiGatewayV2httpResponse) -> Value {
    match &response.body {
        Some(aws_lambda_events::encodings::Body::Text(text)) => serde_json::from_str(text).unwrap(),
        other => panic!("unexpected body {other:?}"),
    }
}

/// Every record of a stream, as one `KinesisEvent` per shard (what Lambda would send).
pub async fn read_stream(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> Vec<KinesisEvent> {
    let shards = kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut events = Vec::new();
    for shard in shards.shards() {
        let iterator = kinesis
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap();
        let mut iterator = iterator.shard_iterator().map(str::to_string);
        let mut event = KinesisEvent::default();
        let mut last_read: Option<SequenceNumber> = None;
        while let Some(current) = iterator.take() {
            let output = kinesis
                .get_records()
                .shard_iterator(current)
                .limit(1000)
                .send()
                .await
                .unwrap();
            // An iterator that did not move on (seen once in a CI run on LocalStack: the same
            // records again and again) ends the read rather than looping for ever.
            let first = output
                .records()
                .first()
                .map(|r| SequenceNumber::new(r.sequence_number()));
            if first.is_some() && first <= last_read {
                break;
            }
            last_read = output
                .records()
                .last()
                .map(|r| SequenceNumber::new(r.sequence_number()))
                .or(last_read);
            for record in output.records() {
                event.records.push(KinesisEventRecord {
                    event_source: Some("aws:kinesis".into()),
                    event_id: Some(format!("{}:{}", shard.shard_id(), record.sequence_number())),
                    kinesis: KinesisRecord {
                        partition_key: record.partition_key().unwrap_or_default().to_string(),
                        sequence_number: record.sequence_number().to_string(),
                        data: RecordData(record.data().as_ref().to_vec()),
                        ..Default::default()
                    },
                    ..Default::default()
                });
            }
            if output.records().is_empty() {
                break;
            }
            iterator = output.next_shard_iterator().map(str::to_string);
        }
        if !event.records.is_empty() {
            events.push(event);
        }
    }
    events
}
