//! The archiver function: every reading to the time-series archive, one batched upsert per
//! stream batch (the archive is keyed by device, time and event id, so a retried batch
//! rewrites the same rows).

use std::sync::Arc;

use async_trait::async_trait;
use geostream_shared::metrics::{Measurements, MetricName};
use geostream_shared::now_millis;
use geostream_shared::ports::{Archive, DeadLetter, DeadLetterSink};
use geostream_shared::stream::{decode_batch, BatchOutcome, RecordId, StreamBatch, StreamFunction};

pub const FUNCTION_NAME: &str = "archiver";

pub struct Archiver {
    archive: Arc<dyn Archive>,
    dead_letters: Arc<dyn DeadLetterSink>,
}

impl Archiver {
    pub fn new(archive: Arc<dyn Archive>, dead_letters: Arc<dyn DeadLetterSink>) -> Self {
        Archiver {
            archive,
            dead_letters,
        }
    }
}

#[async_trait]
impl StreamFunction for Archiver {
    fn name(&self) -> &'static str {
        FUNCTION_NAME
    }

    async fn process(&self, batch: StreamBatch) -> BatchOutcome {
        let decoded = decode_batch(FUNCTION_NAME, batch, self.dead_letters.as_ref()).await;
        let mut failed = decoded.retry;
        let mut measurements = Measurements::default();
        measurements.count(MetricName::DeadLetters, decoded.dead_lettered);
        if decoded.records.is_empty() {
            return BatchOutcome {
                failed,
                measurements,
            };
        }
        let mut record_ids = Vec::with_capacity(decoded.records.len());
        let mut readings = Vec::new();
        // The record (index into record_ids) each reading came from.
        let mut source = Vec::new();
        for (record_id, envelope) in decoded.records {
            source.extend(std::iter::repeat_n(
                record_ids.len(),
                envelope.readings.len(),
            ));
            record_ids.push(record_id);
            readings.extend(envelope.readings);
        }
        match self.archive.write(&readings).await {
            Ok(rejected) if rejected.is_empty() => {
                measurements.count(MetricName::ReadingsArchived, readings.len());
                measurements.count(MetricName::ArchiveRejects, 0);
            }
            Ok(rejected) => {
                measurements.count(
                    MetricName::ReadingsArchived,
                    readings.len().saturating_sub(rejected.len()),
                );
                measurements.count(MetricName::ArchiveRejects, rejected.len());
                // The records the refused readings came from, beside their dead letters.
                let (affected, letters): (Vec<RecordId>, Vec<DeadLetter>) = rejected
                    .into_iter()
                    .filter_map(|r| {
                        let reading = readings.get(r.index)?;
                        let record_id = record_ids[source[r.index]].clone();
                        let letter = DeadLetter {
                            function: FUNCTION_NAME.to_string(),
                            record_id: record_id.to_string(),
                            partition_key: reading.device_id.clone(),
                            data: serde_json::to_string(reading).unwrap_or_default(),
                            reason: format!("archive refused the reading: {}", r.reason),
                            attempts: 1,
                            failed_at: now_millis(),
                        };
                        Some((record_id, letter))
                    })
                    .unzip();
                tracing::warn!(
                    function = FUNCTION_NAME,
                    refused = letters.len(),
                    "archive refused readings; sent to dead letters"
                );
                let letter_count = letters.len();
                match self.dead_letters.send(letters).await {
                    Ok(()) => measurements.count(MetricName::DeadLetters, letter_count),
                    Err(error) => {
                        tracing::error!(function = FUNCTION_NAME, %error, "dead-letter sink failed; records will be retried");
                        failed.extend(affected);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(function = FUNCTION_NAME, readings = readings.len(), %error, "archive write failed; batch will be retried");
                failed.extend(record_ids);
            }
        }
        failed.sort();
        failed.dedup();
        BatchOutcome {
            failed,
            measurements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use aws_lambda_events::event::kinesis::KinesisEvent;
    use geostream_lambda::stream::{handle_kafka, handle_kinesis};
    use geostream_shared::memory::{MemoryArchive, MemoryDeadLetters};
    use geostream_shared::metrics::RecordedMetrics;
    use geostream_shared::model::Reading;
    use geostream_shared::ports::{RejectedReading, StoreError};

    fn event() -> KinesisEvent {
        serde_json::from_str(geostream_lambda::fixtures::KINESIS_EVENT).unwrap()
    }

    #[tokio::test]
    async fn archives_every_reading_once_even_when_replayed() {
        let archive = Arc::new(MemoryArchive::new(100));
        let handler = Archiver::new(archive.clone(), Arc::new(MemoryDeadLetters::new(1)));
        let metrics = RecordedMetrics::new();
        for _ in 0..2 {
            assert!(handle_kinesis(&handler, event(), &metrics)
                .await
                .batch_item_failures
                .is_empty());
        }
        assert_eq!(
            metrics.total(FUNCTION_NAME, MetricName::ReadingsArchived),
            2.0,
            "one reading, archived twice (a replay), counted once each time"
        );
        let track = archive.track("truck-7", 0, i64::MAX, 10).await.unwrap();
        assert_eq!(track.len(), 1);
        assert_eq!(track[0].engine_temp_c, Some(104.5));
    }

    struct FailingArchive;
    #[async_trait]
    impl Archive for FailingArchive {
        async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
            match readings[0].engine_temp_c {
                Some(t) if t > 200.0 => Ok(vec![RejectedReading {
                    index: 0,
                    reason: "ValidationException: out of retention".into(),
                }]),
                _ => Err(StoreError::transient("WriteRecords", "ThrottlingException")),
            }
        }
        async fn track(
            &self,
            _: &str,
            _: i64,
            _: i64,
            _: usize,
        ) -> Result<Vec<Reading>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn a_failed_write_reports_the_records_for_retry() {
        let handler = Archiver::new(
            Arc::new(FailingArchive),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let metrics = RecordedMetrics::new();
        let response = handle_kinesis(&handler, event(), &metrics).await;
        assert_eq!(
            metrics.total(FUNCTION_NAME, MetricName::RecordsRetried),
            1.0
        );
        let ids: Vec<_> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["49590338271490256608559692538361571095921575989136588898"]
        );
    }

    #[tokio::test]
    async fn a_failed_write_on_kafka_answers_the_offset_to_resume_from_per_partition() {
        let event: aws_lambda_events::event::kafka::KafkaEvent =
            serde_json::from_str(geostream_lambda::fixtures::KAFKA_EVENT).unwrap();
        let handler = Archiver::new(
            Arc::new(FailingArchive),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let response = handle_kafka(&handler, event, &RecordedMetrics::new()).await;
        assert_eq!(
            serde_json::to_value(response).unwrap(),
            serde_json::json!({"batchItemFailures": [
                {"itemIdentifier": {"partition": "telemetry-0", "offset": 15}},
                {"itemIdentifier": {"partition": "telemetry-1", "offset": 7}},
            ]})
        );
    }
}
