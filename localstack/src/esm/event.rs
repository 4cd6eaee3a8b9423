//! The function side of an event source mapping: records turned into the event Lambda's
//! trigger sends (`KinesisEvent` from a Kinesis shard, `KafkaEvent` from Kafka partitions), and
//! the function's partial batch response read back as the records to retry. The embedded
//! runner's in-memory stream hands its records to the function as the core's batch, envelopes
//! still decoded: nothing crosses a process boundary there, and building a Lambda event only to
//! take it apart again cost a fifth of the burst bench's CPU (base64, ids and ARNs formatted per
//! record, every envelope parsed once per function). The Lambda event adapters are exercised
//! by the Kinesis and Kafka buses and by the real binaries under the Runtime API.

use std::sync::Arc;

use async_trait::async_trait;
use aws_lambda_events::event::streams::KinesisEventResponse;
use base64::Engine;
use geostream_lambda::stream::{
    handle_kafka, handle_kinesis, KafkaBatchResponse, KafkaEvent, KafkaRecord, KinesisEvent,
    KinesisEventRecord, KinesisRecord, RecordData,
};
use geostream_shared::metrics::MetricsSink;
use geostream_shared::stream::{
    process_measured, RecordId, StreamBatch, StreamFunction, StreamRecord,
};

use super::SourceRecord;

/// Which trigger a source stands for, with what its events carry.
#[derive(Debug, Clone)]
pub enum EventSource {
    /// The embedded runner's in-memory stream: no Lambda event, the batch as it is.
    InProcess,
    Kinesis {
        stream_arn: String,
        shard_id: String,
    },
    Kafka {
        bootstrap_servers: String,
    },
}

/// One invocation's event.
#[derive(Debug, Clone)]
pub enum Event {
    InProcess(StreamBatch),
    Kinesis(KinesisEvent),
    Kafka(KafkaEvent),
}

/// One invocation's answer: Lambda's partial batch response for the event's kind.
#[derive(Debug, Clone)]
pub enum Response {
    /// The records to retry, as the core answers them.
    InProcess(Vec<RecordId>),
    Kinesis(KinesisEventResponse),
    Kafka(KafkaBatchResponse),
}

/// A stream function as Lambda sees it: an event in, partial batch failures out, or an error
/// for the whole invocation.
#[async_trait]
pub trait Invoke: Send + Sync {
    fn name(&self) -> &str;
    async fn invoke(&self, event: Event) -> Result<Response, String>;
}

/// The real handlers, invoked in this process, publishing their metrics where the runner keeps
/// them. They answer every batch with partial failures, so an invocation never fails whole.
pub struct InProcess {
    pub function: Arc<dyn StreamFunction>,
    pub metrics: Arc<dyn MetricsSink>,
}

#[async_trait]
impl Invoke for InProcess {
    fn name(&self) -> &str {
        self.function.name()
    }

    async fn invoke(&self, event: Event) -> Result<Response, String> {
        let function = self.function.as_ref();
        let metrics = self.metrics.as_ref();
        Ok(match event {
            Event::InProcess(batch) => {
                Response::InProcess(process_measured(function, batch, metrics).await)
            }
            Event::Kinesis(event) => {
                Response::Kinesis(handle_kinesis(function, event, metrics).await)
            }
            Event::Kafka(event) => Response::Kafka(handle_kafka(function, event, metrics).await),
        })
    }
}

impl EventSource {
    /// The event this trigger sends `function` for `records`.
    pub fn event(&self, function: &str, records: &[SourceRecord]) -> Event {
        match self {
            EventSource::InProcess => Event::InProcess(in_process_batch(records)),
            EventSource::Kinesis {
                stream_arn,
                shard_id,
            } => Event::Kinesis(kinesis_event(stream_arn, shard_id, function, records)),
            EventSource::Kafka { bootstrap_servers } => {
                Event::Kafka(kafka_event(bootstrap_servers, records))
            }
        }
    }
}

fn in_process_batch(records: &[SourceRecord]) -> StreamBatch {
    StreamBatch {
        records: records
            .iter()
            .map(|source| StreamRecord {
                id: source.id.clone(),
                partition_key: source.partition_key.clone(),
                data: source.data.clone(),
                arrived_at: Some(source.arrival),
                decoded: source.decoded.clone(),
            })
            .collect(),
    }
}

fn kinesis_event(
    stream_arn: &str,
    shard_id: &str,
    function: &str,
    records: &[SourceRecord],
) -> KinesisEvent {
    KinesisEvent {
        records: records
            .iter()
            .map(|source| KinesisEventRecord {
                aws_region: Some("local".into()),
                event_id: Some(format!("{shard_id}:{}", source.id)),
                event_name: Some("aws:kinesis:record".into()),
                event_source: Some("aws:kinesis".into()),
                event_source_arn: Some(stream_arn.to_string()),
                event_version: Some("1.0".into()),
                invoke_identity_arn: Some(format!(
                    "arn:aws:iam::000000000000:role/geostream-{function}"
                )),
                kinesis: KinesisRecord {
                    kinesis_schema_version: Some("1.0".into()),
                    partition_key: source.partition_key.clone(),
                    sequence_number: source.id.to_string(),
                    data: RecordData(source.data.to_vec()),
                    approximate_arrival_timestamp: Some(source.arrival as f64 / 1000.0),
                },
            })
            .collect(),
    }
}

/// Lambda's Kafka event: records grouped by `topic-partition`, base64 keys and values.
fn kafka_event(bootstrap_servers: &str, records: &[SourceRecord]) -> KafkaEvent {
    let base64 = &base64::engine::general_purpose::STANDARD;
    let mut event = KafkaEvent {
        event_source: Some("SelfManagedKafka".into()),
        bootstrap_servers: Some(bootstrap_servers.to_string()),
        ..KafkaEvent::default()
    };
    for source in records {
        let RecordId::Kafka {
            topic,
            partition,
            offset,
        } = &source.id
        else {
            continue;
        };
        let record = KafkaRecord {
            topic: Some(topic.clone()),
            partition: *partition,
            offset: *offset,
            timestamp: Some(source.arrival),
            timestamp_type: Some("CREATE_TIME".into()),
            key: Some(base64.encode(&source.partition_key)),
            value: Some(base64.encode(&source.data)),
        };
        event
            .records
            .entry(source.partition.clone())
            .or_default()
            .push(record);
    }
    event
}

/// The records of the batch the response asks to retry, or `None` when it names something
/// that is not in the batch (Lambda then treats the whole batch as failed).
pub fn failed_records(response: &Response, records: &[SourceRecord]) -> Option<Vec<RecordId>> {
    match response {
        Response::InProcess(failed) => failed
            .iter()
            .map(|id| records.iter().find(|r| &r.id == id).map(|r| r.id.clone()))
            .collect(),
        Response::Kinesis(response) => response
            .batch_item_failures
            .iter()
            .map(|failure| {
                let id = failure.item_identifier.as_deref()?;
                records
                    .iter()
                    .find(|r| matches!(&r.id, RecordId::Kinesis(s) if s.as_str() == id))
                    .map(|r| r.id.clone())
            })
            .collect(),
        Response::Kafka(response) => {
            let mut failed = Vec::new();
            for failure in &response.batch_item_failures {
                let resume = &failure.item_identifier;
                let in_partition = records.iter().filter(|r| r.partition == resume.partition);
                let from = in_partition.clone().find(
                    |r| matches!(r.id, RecordId::Kafka { offset, .. } if offset == resume.offset),
                )?;
                failed.extend(
                    in_partition
                        .filter(|r| r.id >= from.id)
                        .map(|r| r.id.clone()),
                );
            }
            Some(failed)
        }
    }
}
