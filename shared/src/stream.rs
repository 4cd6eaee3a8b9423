//! The neutral batch type that stream handlers take (DESIGN.md section 2): built from a
//! `KinesisEvent` (and, in Redpanda mode, a Kafka event), answered with partial batch failures.

use std::collections::{BTreeMap, HashMap};

use aws_lambda_events::event::kafka::KafkaEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use base64::Engine;
use serde::{Deserialize, Serialize};

use std::time::Instant;

use crate::envelope::Envelope;
use crate::metrics::{Measurements, MetricName, MetricsSink};
use crate::ports::{DeadLetter, DeadLetterSink};
use crate::{now_millis, EpochMillis};

/// How many devices of one batch a stream function works on at once. Devices are independent
/// (each device's readings stay together and in order), and the stores' latency, not CPU,
/// bounds a batch: one device at a time would make a 100-device batch cost 100 round trips.
pub const DEVICE_CONCURRENCY: usize = 16;

/// One record of a stream batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// The id Lambda expects back in a batch item failure: the Kinesis sequence number.
    pub id: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// When the bus took the record (Kinesis' approximate arrival time).
    pub arrived_at: Option<EpochMillis>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamBatch {
    pub records: Vec<StreamRecord>,
}

impl From<KinesisEvent> for StreamBatch {
    fn from(event: KinesisEvent) -> Self {
        StreamBatch {
            records: event
                .records
                .into_iter()
                .map(|record| StreamRecord {
                    id: record.kinesis.sequence_number,
                    partition_key: record.kinesis.partition_key,
                    data: record.kinesis.data.0,
                    // An event without the timestamp deserializes to the epoch: unknown.
                    arrived_at: Some(
                        record
                            .kinesis
                            .approximate_arrival_timestamp
                            .0
                            .timestamp_millis(),
                    )
                    .filter(|millis| *millis > 0),
                })
                .collect(),
        }
    }
}

impl From<KafkaEvent> for StreamBatch {
    /// Lambda's Kafka event groups records by "topic-partition", with base64 keys and values.
    /// Records keep their order within a partition; ids are `topic-partition@offset`.
    fn from(event: KafkaEvent) -> Self {
        let decode = |text: Option<String>| {
            text.map(|t| base64::engine::general_purpose::STANDARD.decode(t.as_bytes()))
        };
        let mut partitions: Vec<_> = event.records.into_iter().collect();
        partitions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut records = Vec::new();
        for (topic_partition, mut messages) in partitions {
            messages.sort_by_key(|m| m.offset);
            for message in messages {
                let id = format!("{topic_partition}@{}", message.offset);
                let timestamp = message.timestamp.0.timestamp_millis();
                // An undecodable value is kept as its text, for the dead-letter sink to show.
                let data = match decode(message.value.clone()) {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(_)) | None => message.value.unwrap_or_default().into_bytes(),
                };
                let partition_key = match decode(message.key) {
                    Some(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    _ => String::new(),
                };
                records.push(StreamRecord {
                    id,
                    partition_key,
                    data,
                    arrived_at: Some(timestamp).filter(|millis| *millis > 0),
                });
            }
        }
        StreamBatch { records }
    }
}

/// Lambda's partial batch response for Kafka event source mappings: per failed
/// topic-partition, the offset to resume from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchResponse {
    pub batch_item_failures: Vec<KafkaBatchItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchItemFailure {
    pub item_identifier: KafkaItemIdentifier,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaItemIdentifier {
    /// `topic-partition`, as the event's record groups are keyed.
    pub partition: String,
    pub offset: i64,
}

impl KafkaBatchResponse {
    /// From the ids of failed records (`topic-partition@offset`): the lowest failed offset of
    /// each partition, from which the partition is redelivered.
    pub fn from_failed(failed: &[String]) -> Self {
        let mut resume: BTreeMap<&str, i64> = BTreeMap::new();
        for id in failed {
            let Some((partition, offset)) = id.rsplit_once('@') else {
                continue;
            };
            let Ok(offset) = offset.parse::<i64>() else {
                continue;
            };
            resume
                .entry(partition)
                .and_modify(|lowest| *lowest = (*lowest).min(offset))
                .or_insert(offset);
        }
        KafkaBatchResponse {
            batch_item_failures: resume
                .into_iter()
                .map(|(partition, offset)| KafkaBatchItemFailure {
                    item_identifier: KafkaItemIdentifier {
                        partition: partition.to_string(),
                        offset,
                    },
                })
                .collect(),
        }
    }
}

/// A stream function (geo-update, archiver, anomaly-inspector): a batch in, the ids of the
/// records to retry out.
#[async_trait::async_trait]
pub trait StreamFunction: Send + Sync {
    /// The function's name, as logs and dead letters give it.
    fn name(&self) -> &'static str;

    async fn process(&self, batch: StreamBatch) -> BatchOutcome;

    /// Handles a batch and publishes what it measured, with the measurements every stream
    /// function shares: records in, records retried, iterator age and batch duration.
    async fn process_measured(&self, batch: StreamBatch, metrics: &dyn MetricsSink) -> Vec<String> {
        let started = Instant::now();
        let records = batch.records.len();
        let oldest_arrival = batch.records.iter().filter_map(|r| r.arrived_at).min();
        let mut measurements = Measurements::default();
        measurements.count(MetricName::RecordsIn, records);
        if let Some(arrival) = oldest_arrival {
            let age = (now_millis() - arrival).max(0);
            measurements.millis(MetricName::IteratorAge, age as f64);
        }
        let outcome = self.process(batch).await;
        measurements.count(MetricName::RecordsRetried, outcome.failed.len());
        measurements.millis(
            MetricName::BatchDuration,
            started.elapsed().as_secs_f64() * 1000.0,
        );
        measurements.extend(outcome.measurements);
        metrics.publish(self.name(), &measurements);
        outcome.failed
    }

    /// Lambda's view: a `KinesisEvent` in, partial batch failures out.
    async fn handle(&self, event: KinesisEvent, metrics: &dyn MetricsSink) -> KinesisEventResponse {
        let failed = self
            .process_measured(StreamBatch::from(event), metrics)
            .await;
        BatchOutcome::retry(failed).into_kinesis_response()
    }

    /// Lambda's view in Kafka mode: a `KafkaEvent` in, the offset to resume from per failed
    /// partition out.
    async fn handle_kafka(
        &self,
        event: KafkaEvent,
        metrics: &dyn MetricsSink,
    ) -> KafkaBatchResponse {
        let failed = self
            .process_measured(StreamBatch::from(event), metrics)
            .await;
        KafkaBatchResponse::from_failed(&failed)
    }
}

/// The ids of the records that failed and should be retried, and what the function measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    pub failed: Vec<String>,
    pub measurements: Measurements,
}

impl BatchOutcome {
    pub fn retry(failed: Vec<String>) -> Self {
        BatchOutcome {
            failed,
            measurements: Measurements::default(),
        }
    }

    pub fn into_kinesis_response(self) -> KinesisEventResponse {
        let mut response = KinesisEventResponse::default();
        response.batch_item_failures = self
            .failed
            .into_iter()
            .map(|id| {
                let mut failure = KinesisBatchItemFailure::default();
                failure.item_identifier = Some(id);
                failure
            })
            .collect();
        response
    }
}

/// A decoded record: its id and its envelope.
pub type DecodedRecord = (String, Envelope);

/// A batch after decoding.
pub struct DecodedBatch {
    pub records: Vec<DecodedRecord>,
    /// Undecodable records the dead-letter sink did not take: to retry.
    pub retry: Vec<String>,
    /// Undecodable records the dead-letter sink took.
    pub dead_lettered: usize,
}

/// One device's part of a batch: the records that carried it and their envelopes, in order.
#[derive(Debug)]
pub struct DeviceRecords {
    pub device_id: String,
    pub record_ids: Vec<String>,
    pub envelopes: Vec<Envelope>,
}

/// Groups decoded records by device, devices in the order they first appear. Devices are
/// independent, so stream functions work on these groups concurrently; within a group the
/// records keep their order.
pub fn group_by_device(records: Vec<DecodedRecord>) -> Vec<DeviceRecords> {
    let mut groups: Vec<DeviceRecords> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (record_id, envelope) in records {
        let position = *index.entry(envelope.device_id.clone()).or_insert_with(|| {
            groups.push(DeviceRecords {
                device_id: envelope.device_id.clone(),
                record_ids: Vec::new(),
                envelopes: Vec::new(),
            });
            groups.len() - 1
        });
        groups[position].record_ids.push(record_id);
        groups[position].envelopes.push(envelope);
    }
    groups
}

/// Decodes every record of a batch. Records that cannot be decoded will never decode, so they
/// go straight to the dead-letter sink with the reason instead of blocking the shard.
pub async fn decode_batch(
    function: &str,
    batch: StreamBatch,
    dead_letters: &dyn DeadLetterSink,
) -> DecodedBatch {
    let mut decoded = Vec::with_capacity(batch.records.len());
    let mut poison = Vec::new();
    for record in batch.records {
        match Envelope::decode(&record.data) {
            Ok(envelope) => decoded.push((record.id, envelope)),
            Err(error) => {
                tracing::warn!(function, record_id = %record.id, %error, "undecodable record sent to dead letters");
                poison.push(DeadLetter {
                    function: function.to_string(),
                    record_id: record.id,
                    partition_key: record.partition_key,
                    data: String::from_utf8_lossy(&record.data).into_owned(),
                    reason: error.to_string(),
                    attempts: 1,
                    failed_at: now_millis(),
                });
            }
        }
    }
    let mut retry = Vec::new();
    let mut dead_lettered = 0;
    if !poison.is_empty() {
        let ids: Vec<String> = poison.iter().map(|l| l.record_id.clone()).collect();
        match dead_letters.send(poison).await {
            Ok(()) => dead_lettered = ids.len(),
            Err(error) => {
                tracing::error!(function, %error, "dead-letter sink failed; records will be retried");
                retry = ids;
            }
        }
    }
    DecodedBatch {
        records: decoded,
        retry,
        dead_lettered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_from_a_real_kafka_event_fixture_and_answers_per_partition() {
        let event: KafkaEvent =
            serde_json::from_str(include_str!("../tests/fixtures/kafka-event.json")).unwrap();
        let batch = StreamBatch::from(event);
        let ids: Vec<&str> = batch.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["telemetry-0@15", "telemetry-0@16", "telemetry-1@7"],
            "ordered by partition, then offset"
        );
        assert_eq!(batch.records[0].partition_key, "truck-7");
        assert_eq!(batch.records[0].arrived_at, Some(1_763_900_000_125));
        let envelope = Envelope::decode(&batch.records[0].data).unwrap();
        assert_eq!(envelope.readings[0].engine_temp_c, Some(104.5));

        let response = KafkaBatchResponse::from_failed(&[
            "telemetry-0@16".into(),
            "telemetry-1@7".into(),
            "telemetry-0@15".into(),
        ]);
        assert_eq!(
            serde_json::to_value(response).unwrap(),
            serde_json::json!({"batchItemFailures": [
                {"itemIdentifier": {"partition": "telemetry-0", "offset": 15}},
                {"itemIdentifier": {"partition": "telemetry-1", "offset": 7}},
            ]})
        );
    }

    #[test]
    fn builds_from_a_real_kinesis_event_fixture() {
        let event: KinesisEvent =
            serde_json::from_str(include_str!("../tests/fixtures/kinesis-event.json")).unwrap();
        let batch = StreamBatch::from(event);
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].partition_key, "truck-7");
        let envelope = Envelope::decode(&batch.records[0].data).unwrap();
        assert_eq!(envelope.readings[0].engine_temp_c, Some(104.5));
        assert_eq!(batch.records[0].arrived_at, Some(1_763_900_000_123));
        let response =
            BatchOutcome::retry(vec![batch.records[0].id.clone()]).into_kinesis_response();
        let json = serde_json::to_value(response).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "49590338271490256608559692538361571095921575989136588898"}]})
        );
    }
}
