//! The runner's Kinesis source against what Kinesis does and moto does not:
//!
//! - a device's records keep their order across a reshard: a child shard is read only after
//!   its parent is read to its end and done with, as Lambda does;
//! - an iterator Kinesis expired (a delivery took over five minutes) is replaced by a fresh one
//!   after the last record read, and the shard goes on without a gap or a repeat;
//! - a record an emulator returns again along a chain of iterators (kinesis-mock does at
//!   times) is delivered once.
//!
//! The second is shown twice: against the stand-in below, and against LocalStack's Kinesis
//! (kinesis-mock), which expires an iterator 300 s after handing it out as Kinesis does
//! (moto's iterators never expire): a function that takes five minutes over a batch.
//!
//! moto cannot show the first: its SplitShard moves the parent's records into the children (Kinesis
//! keeps them in the closed parent until they expire) and its MergeShards copies them. So the
//! real Kinesis client reads a small stand-in here that answers ListShards, GetShardIterator
//! and GetRecords as Kinesis does after a split: sixty records of one device in the closed
//! parent, the next sixty in the child that took the device's hash key, an empty sibling. The
//! function must see all 120 in order.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_lambda_events::event::streams::KinesisEventResponse;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use geostream_local::esm::event::{Event, Invoke, Response};
use geostream_local::esm::{kinesis, start_mapping, MappingConfig};
use geostream_shared::memory::MemoryDeadLetters;
use serde_json::{json, Value};

const PARENT: &str = "shardId-000000000000";
const CHILD: &str = "shardId-000000000001";
const SIBLING: &str = "shardId-000000000002";
const PER_SHARD: u64 = 60;

/// A shard's records (sequence number, data) and whether it is closed.
type Shard = (Vec<(u64, String)>, bool);

/// The stream after the split.
struct SplitStream {
    shards: HashMap<&'static str, Shard>,
    /// Answer the first GetRecords from this position of the parent with
    /// ExpiredIteratorException.
    expire_at: Option<usize>,
    expired: AtomicBool,
    iterators_given: AtomicUsize,
    /// Answer GetRecords with a next iterator that starts at the last record returned, as
    /// kinesis-mock (LocalStack) at times does, where Kinesis starts after it.
    repeats_last_record: bool,
}

impl SplitStream {
    fn new(expire_at: Option<usize>, repeats_last_record: bool) -> Self {
        let records = |first_sequence: u64, numbers: std::ops::Range<u64>| {
            numbers
                .enumerate()
                .map(|(i, n)| (first_sequence + i as u64, n.to_string()))
                .collect::<Vec<_>>()
        };
        SplitStream {
            shards: HashMap::from([
                (PARENT, (records(1_000, 0..PER_SHARD), true)),
                (CHILD, (records(5_000, PER_SHARD..2 * PER_SHARD), false)),
                (SIBLING, (Vec::new(), false)),
            ]),
            expire_at,
            expired: AtomicBool::new(false),
            iterators_given: AtomicUsize::new(0),
            repeats_last_record,
        }
    }

    fn answer(&self, target: &str, request: &Value) -> Result<Value, Value> {
        let range = |start: &str, end: Option<&str>| match end {
            Some(end) => json!({"StartingSequenceNumber": start, "EndingSequenceNumber": end}),
            None => json!({"StartingSequenceNumber": start}),
        };
        let half = 1u128 << 127;
        Ok(match target {
            "Kinesis_20131202.ListShards" => json!({"Shards": [
                {"ShardId": PARENT,
                 "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": (u128::MAX).to_string()},
                 "SequenceNumberRange": range("1000", Some("1059"))},
                {"ShardId": CHILD, "ParentShardId": PARENT,
                 "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": (half - 1).to_string()},
                 "SequenceNumberRange": range("5000", None)},
                {"ShardId": SIBLING, "ParentShardId": PARENT,
                 "HashKeyRange": {"StartingHashKey": half.to_string(), "EndingHashKey": (u128::MAX).to_string()},
                 "SequenceNumberRange": range("9000", None)},
            ]}),
            "Kinesis_20131202.GetShardIterator" => {
                let shard = request["ShardId"].as_str().unwrap_or_default();
                let records = &self.shards[shard].0;
                let position = match request["StartingSequenceNumber"].as_str() {
                    Some(after) => {
                        let after: u64 = after.parse().unwrap_or_default();
                        records.iter().take_while(|(s, _)| *s <= after).count()
                    }
                    None => 0,
                };
                self.iterators_given.fetch_add(1, Ordering::Relaxed);
                json!({"ShardIterator": format!("{shard}:{position}")})
            }
            "Kinesis_20131202.GetRecords" => {
                let iterator = request["ShardIterator"].as_str().unwrap_or_default();
                let (shard, position) = iterator.split_once(':').unwrap_or_default();
                let position: usize = position.parse().unwrap_or_default();
                if shard == PARENT
                    && self.expire_at == Some(position)
                    && !self.expired.swap(true, Ordering::Relaxed)
                {
                    return Err(json!({"__type": "ExpiredIteratorException",
                        "message": format!("Iterator {iterator} has expired")}));
                }
                let limit = request["Limit"].as_u64().unwrap_or(10_000) as usize;
                let (records, closed) = &self.shards[shard];
                let taken: Vec<Value> = records
                    .iter()
                    .skip(position)
                    .take(limit)
                    .map(|(sequence, data)| {
                        json!({"SequenceNumber": sequence.to_string(), "PartitionKey": "truck-7",
                            "Data": base64::engine::general_purpose::STANDARD.encode(data),
                            "ApproximateArrivalTimestamp": 1_765_000_000.0})
                    })
                    .collect();
                let next = position + taken.len();
                let resume = if self.repeats_last_record && !taken.is_empty() {
                    next - 1
                } else {
                    next
                };
                // A closed shard read to its end has no next iterator.
                let next_iterator =
                    (!(*closed && next >= records.len())).then(|| format!("{shard}:{resume}"));
                json!({"Records": taken, "NextShardIterator": next_iterator,
                    "MillisBehindLatest": if next >= records.len() { 0 } else { 1_000 }})
            }
            other => return Err(json!({"__type": "UnknownOperationException", "message": other})),
        })
    }
}

async fn stand_in(stream: Arc<SplitStream>) -> String {
    let app = Router::new().route(
        "/",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let stream = stream.clone();
            async move {
                let target = headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                match stream.answer(&target, &request) {
                    Ok(answer) => (StatusCode::OK, Json(answer)),
                    Err(error) => (StatusCode::BAD_REQUEST, Json(error)),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

/// A function that notes the data of every record it is given, in order, and takes
/// `first_batch_takes` over its first batch (as a function stuck on a slow store would).
struct Recorder {
    first_batch_takes: Duration,
    seen: Mutex<Vec<u64>>,
}

#[async_trait]
impl Invoke for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    async fn invoke(&self, event: Event) -> Result<Response, String> {
        let Event::Kinesis(event) = event else {
            return Err("a Kinesis mapping sent another event".into());
        };
        let first = self.seen.lock().unwrap().is_empty();
        for record in event.records {
            let text = String::from_utf8(record.kinesis.data.0).map_err(|e| e.to_string())?;
            let number = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
            self.seen.lock().unwrap().push(number);
        }
        if first {
            tokio::time::sleep(self.first_batch_takes).await;
        }
        // A little work per batch, so that shards read side by side would interleave.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Response::Kinesis(KinesisEventResponse::default()))
    }
}

/// A Kinesis client with test credentials for `endpoint` (the stand-in or an emulator).
fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .endpoint_url(endpoint)
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// Every record the mapping delivers from the stand-in, in delivery order.
async fn deliver(stream: Arc<SplitStream>) -> Vec<u64> {
    let client = kinesis_client(&stand_in(stream).await);
    let sources = kinesis::shards(&client, "telemetry").await.expect("shards");
    assert_eq!(sources.len(), 3, "the closed parent and its two children");

    let recorder = Arc::new(Recorder {
        first_batch_takes: Duration::ZERO,
        seen: Mutex::new(Vec::new()),
    });
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mapping = MappingConfig {
        batch_size: 10,
        ..MappingConfig::default()
    };
    let (_mapping, tasks) = start_mapping(
        recorder.clone(),
        sources,
        mapping,
        Arc::new(MemoryDeadLetters::new(10)),
        shutdown,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorder.seen.lock().unwrap().len() < 2 * PER_SHARD as usize && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).expect("the loops listen");
    for task in tasks {
        task.await.expect("a mapping loop ends");
    }
    let seen = recorder.seen.lock().unwrap().clone();
    seen
}

#[tokio::test]
async fn a_child_shard_is_read_after_its_parent_so_order_holds_across_a_split() {
    let seen = deliver(Arc::new(SplitStream::new(None, false))).await;
    let expected: Vec<u64> = (0..2 * PER_SHARD).collect();
    assert_eq!(
        seen, expected,
        "the device's records in the order they were put"
    );
}

#[tokio::test]
async fn an_expired_iterator_is_replaced_after_the_last_record_read() {
    let stream = Arc::new(SplitStream::new(Some(30), false));
    let seen = deliver(stream.clone()).await;
    assert!(
        stream.expired.load(Ordering::Relaxed),
        "the iterator did expire"
    );
    let expected: Vec<u64> = (0..2 * PER_SHARD).collect();
    assert_eq!(seen, expected, "no record lost or repeated");
    assert_eq!(
        stream.iterators_given.load(Ordering::Relaxed),
        4,
        "one iterator per shard, and one fresh one for the parent"
    );
}

/// kinesis-mock (LocalStack's Kinesis) at times answers GetRecords with a next iterator that
/// starts at the last record it returned, on every read after (seen on about half the streams
/// of a probe: a TRIM_HORIZON iterator asked for before the first record). Kinesis never
/// returns a record twice along a chain of iterators; the reader skips such repeats, or every
/// function would be invoked with the same records every 250 ms.
#[tokio::test]
async fn records_a_next_iterator_returns_again_are_delivered_once() {
    let stream = Arc::new(SplitStream::new(None, true));
    let seen = deliver(stream.clone()).await;
    let expected: Vec<u64> = (0..2 * PER_SHARD).collect();
    assert_eq!(seen, expected, "each record once, in order");
}

/// Kinesis expires a shard iterator five minutes after handing it out. The mapping holds the
/// iterator of its next read while a batch is delivered; a delivery of over five minutes
/// leaves it expired, and the shard must go on from the last record read. On LocalStack only:
/// moto's iterators never expire. Takes a little over five minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_localstack_expired_during_a_five_minute_delivery_is_replaced() {
    const EXPIRY: Duration = Duration::from_secs(300);
    let Some(endpoint) = common::emulator("GEOSTREAM_LOCALSTACK_ENDPOINT") else {
        return;
    };
    let client = kinesis_client(&endpoint);
    let stream = format!("expiry-{}", std::process::id());
    client
        .create_stream()
        .stream_name(&stream)
        .shard_count(1)
        .send()
        .await
        .expect("the stream is created");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .expect("the stream is described");
        let status = summary
            .stream_description_summary()
            .map(|s| s.stream_status().clone());
        if status == Some(aws_sdk_kinesis::types::StreamStatus::Active) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream is not active: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let put = |numbers: std::ops::Range<u64>| {
        let client = client.clone();
        let stream = stream.clone();
        async move {
            let entries = numbers
                .map(|n| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key("truck-7")
                        .data(aws_sdk_kinesis::primitives::Blob::new(n.to_string()))
                        .build()
                        .expect("an entry")
                })
                .collect();
            let output = client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(entries))
                .send()
                .await
                .expect("records are put");
            assert_eq!(output.failed_record_count(), Some(0));
        }
    };
    put(0..20).await;

    // An iterator handed out now, to show the emulator does expire it.
    let witness = client
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(PARENT)
        .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("an iterator")
        .shard_iterator()
        .expect("an iterator")
        .to_string();
    let function = Arc::new(Recorder {
        first_batch_takes: EXPIRY + Duration::from_secs(5),
        seen: Mutex::new(Vec::new()),
    });
    let sources = kinesis::shards(&client, &stream).await.expect("shards");
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let (mapping, tasks) = start_mapping(
        function.clone(),
        sources,
        MappingConfig {
            batch_size: 10,
            ..MappingConfig::default()
        },
        Arc::new(MemoryDeadLetters::new(10)),
        shutdown,
    );
    tokio::time::sleep(EXPIRY + Duration::from_secs(1)).await;
    let expired = client.get_records().shard_iterator(&witness).send().await;
    let code = expired
        .as_ref()
        .err()
        .and_then(|e| e.as_service_error())
        .map(|e| e.is_expired_iterator_exception());
    assert_eq!(
        code,
        Some(true),
        "LocalStack expires iterators after 300 s, as Kinesis does: {expired:?}"
    );
    put(20..30).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    while function.seen.lock().unwrap().len() < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).expect("the loops listen");
    for task in tasks {
        task.await.expect("a mapping loop ends");
    }
    let seen = function.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (0..30).collect::<Vec<u64>>(),
        "no record lost or repeated"
    );
    assert_eq!(
        mapping.snapshot().read_errors,
        1,
        "the held iterator expired once and was replaced"
    );
}
