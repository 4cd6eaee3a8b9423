//! The function side of an event source mapping: records turned into the event the function
//! is invoked with, and its partial batch response read back as the records to retry. A
//! Kinesis shard's records become the `KinesisEvent` Lambda's trigger sends. The embedded
//! runner's in-memory stream hands its records to the function as the core's batch, envelopes
//! still decoded: nothing crosses a process boundary there, and building a Lambda event only to
//! take it apart again cost a fifth of the burst bench's CPU (base64, ids and ARNs formatted per
//! record, every envelope parsed once per function). Kafka partitions' records go the same way,
//! as the bytes the broker delivered (each function decodes them, as on Lambda): Lambda's
//! `KafkaEvent` (base64 keys and values) cost the Kafka burst a tenth of the runner's CPU
//! (docs/performance.md). The Kafka event adapter is exercised by the Lambda binaries under the
//! Runtime API, its unit tests on a captured event and its fuzz target; the mapping's retries
//! from the lowest failed record per partition are Lambda's Kafka semantics either way.

use std::sync::Arc;

use async_trait::async_trait;
use aws_lambda_events::event::streams::KinesisEventResponse;
use geostream_lambda::stream::{
    handle_kinesis, KinesisEvent, KinesisEventRecord, KinesisRecord, RecordData,
};
use geostream_shared::metrics::MetricsSink;
use geostream_shared::stream::{
    process_measured, RecordId, StreamBatch, StreamFunction, StreamRecord,
};

use super::SourceRecord;

/// Which trigger a source stands for, with what its events carry.
#[derive(Debug, Clone)]
pub enum EventSource {
    /// The embedded runner's in-memory stream and Kafka topics: no Lambda event, the batch as
    /// it is.
    InProcess,
    Kinesis {
        stream_arn: String,
        shard_id: String,
    },
}

/// One invocation's event.
#[derive(Debug, Clone)]
pub enum Event {
    InProcess(StreamBatch),
    Kinesis(KinesisEvent),
}

/// One invocation's answer: Lambda's partial batch response for the event's kind.
#[derive(Debug, Clone)]
pub enum Response {
    /// The records to retry, as the core answers them.
    InProcess(Vec<RecordId>),
    Kinesis(KinesisEventResponse),
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
    }
}
