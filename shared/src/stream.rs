//! The neutral batch type that stream handlers take (DESIGN.md section 2): built from a
//! `KinesisEvent` (and, in Redpanda mode, a Kafka event), answered with partial batch failures.

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};

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
