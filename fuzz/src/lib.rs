//! One function per parser of outside input, each taking the raw bytes as they arrive; the
//! fuzz targets (`src/bin/`) hand them AFL++'s inputs. Any panic is a crash. Where a parse
//! succeeds, what it promises is checked too.

use aws_lambda_events::event::kafka::KafkaEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_lambda::stream::{batch_from_kafka, batch_from_kinesis};
use geostream_shared::envelope::Envelope;
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
