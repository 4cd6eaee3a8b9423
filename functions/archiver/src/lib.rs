//! The archiver function: every reading to the time-series archive, one batched upsert per
//! stream batch (the archive is keyed by device, time and event id, so a retried batch
//! rewrites the same rows).

use std::sync::Arc;

use async_trait::async_trait;
use geostream_shared::metrics::{Measurements, MetricName};
use std::collections::BTreeMap;

use geostream_shared::envelope::Envelope;
use geostream_shared::model::Reading;
use geostream_shared::ports::{
    Archive, DeadLetter, DeadLetterSink, ErrorKind, RejectedReading, StoreError,
};
use geostream_shared::stream::{
    dead_letter_refused, decode_batch, send_or_retry, BatchOutcome, RecordId, Retry, StreamBatch,
    StreamFunction,
};

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

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
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
        let mut envelopes = Vec::with_capacity(decoded.records.len());
        let mut readings = Vec::new();
        // The record (index into record_ids) each reading came from.
        let mut source = Vec::new();
        for (record_id, envelope) in decoded.records {
            source.extend(std::iter::repeat_n(
                record_ids.len(),
                envelope.readings.len(),
            ));
            record_ids.push(record_id);
            readings.extend(envelope.readings.iter().cloned());
            envelopes.push(envelope);
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
                let letters =
                    refused_letters(&record_ids, &envelopes, &source, &readings, rejected);
                tracing::warn!(
                    function = FUNCTION_NAME,
                    refused = letters.len(),
                    "archive refused readings; sent to dead letters"
                );
                let affected = letters.iter().map(|(id, _)| id.clone()).collect();
                let letters = letters.into_iter().map(|(_, letter)| letter).collect();
                let sink = self.dead_letters.as_ref();
                let sent = send_or_retry(FUNCTION_NAME, letters, affected, sink, &mut failed).await;
                measurements.count(MetricName::DeadLetters, sent);
            }
            // Retrying cannot help: the whole batch to dead letters, record by record.
            Err(error) if error.kind == ErrorKind::Permanent => {
                let sent = dead_letter_refused(
                    FUNCTION_NAME,
                    &record_ids,
                    &envelopes,
                    &error,
                    self.dead_letters.as_ref(),
                    &mut failed,
                )
                .await;
                measurements.count(MetricName::DeadLetters, sent);
            }
            Err(error) => {
                tracing::warn!(function = FUNCTION_NAME, readings = readings.len(), %error, "archive write failed; batch will be retried");
                failed.extend(Retry::all(record_ids, &error));
            }
        }
        failed.sort_by(|a, b| a.id.cmp(&b.id));
        failed.dedup_by(|a, b| a.id == b.id);
        BatchOutcome {
            failed,
            measurements,
        }
    }
}

/// The dead letters of readings the archive refused: per record, an envelope of just its
/// refused readings (a redrive replays those, not the ones already archived).
fn refused_letters(
    record_ids: &[RecordId],
    envelopes: &[Arc<Envelope>],
    source: &[usize],
    readings: &[Reading],
    rejected: Vec<RejectedReading>,
) -> Vec<(RecordId, DeadLetter)> {
    let mut by_record: BTreeMap<usize, (Vec<Reading>, Vec<String>)> = BTreeMap::new();
    for refusal in rejected {
        let (Some(reading), Some(&record)) =
            (readings.get(refusal.index), source.get(refusal.index))
        else {
            continue;
        };
        let entry = by_record.entry(record).or_default();
        entry.0.push(reading.clone());
        entry
            .1
            .push(format!("{}: {}", reading.event_id, refusal.reason));
    }
    by_record
        .into_iter()
        .map(|(record, (refused, reasons))| {
            let record_id = record_ids[record].clone();
            let original = &envelopes[record];
            let envelope = Envelope {
                v: original.v,
                device_id: original.device_id.clone(),
                received_at: original.received_at,
                readings: refused,
            };
            let device_id = envelope.device_id.clone();
            let error = StoreError::permanent("archive", format!("refused {}", reasons.join("; ")));
            let letter = DeadLetter::new(
                FUNCTION_NAME,
                &record_id,
                device_id,
                envelope.encode(),
                &error,
            );
            (record_id, letter)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use geostream_lambda::stream::KinesisEvent;
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
        let event: geostream_lambda::stream::KafkaEvent =
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
