//! The neutral batch that stream handlers take, whichever bus it came from, and what they
//! answer: the records to retry. Building a batch from a Lambda event and answering Lambda's
//! partial batch response is the entry points' job (`geostream-lambda`); this module knows
//! records, their typed ids and the processing every stream function shares.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use crate::envelope::Envelope;
use crate::metrics::{Measurements, MetricName, MetricsSink};
use crate::ports::{DeadLetter, DeadLetterSink};
use crate::{now_millis, EpochMillis};

/// How many devices of one batch a stream function works on at once. Devices are independent
/// (each device's readings stay together and in order), and the stores' latency, not CPU,
/// bounds a batch: one device at a time would make a 100-device batch cost 100 round trips.
pub const DEVICE_CONCURRENCY: usize = 16;

/// A Kinesis sequence number: a decimal string of up to 128 bits. It is kept as the text the
/// stream gave (Lambda wants that exact text back in a batch item failure) and ordered as a
/// number, so `"9" < "10"` and zero-padded forms compare equal to unpadded ones.
#[derive(Debug, Clone, Eq)]
pub struct SequenceNumber(String);

impl SequenceNumber {
    pub fn new(text: impl Into<String>) -> Self {
        SequenceNumber(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn digits(&self) -> &str {
        self.0.trim_start_matches('0')
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.digits(), other.digits());
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for SequenceNumber {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl std::hash::Hash for SequenceNumber {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.digits().hash(state);
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a record sits on its bus: what a stream function names when it asks for a record to
/// be retried, and what the event source mapping resumes from. Typed, so that answering a
/// failure never depends on parsing an id back (a parse that fails would acknowledge it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordId {
    /// A record of a Kinesis shard (or of the embedded stream, which numbers records the same way).
    Kinesis(SequenceNumber),
    /// A record of a Kafka topic partition.
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
    },
}

impl RecordId {
    pub fn kinesis(sequence: impl Into<String>) -> Self {
        RecordId::Kinesis(SequenceNumber::new(sequence))
    }

    pub fn kafka(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        RecordId::Kafka {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

/// Kinesis: the sequence number; Kafka: `topic-partition@offset`, as logs and dead letters show it.
impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordId::Kinesis(sequence) => sequence.fmt(f),
            RecordId::Kafka {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}-{partition}@{offset}"),
        }
    }
}

/// One record of a stream batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    pub id: RecordId,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// When the bus took the record (Kinesis' approximate arrival time, Kafka's timestamp).
    pub arrived_at: Option<EpochMillis>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamBatch {
    pub records: Vec<StreamRecord>,
}

/// A stream function (geo-update, archiver, anomaly-inspector): a batch in, the ids of the
/// records to retry out. Transport (which Lambda event, which response) is not its concern.
#[async_trait::async_trait]
pub trait StreamFunction: Send + Sync {
    /// The function's name, as logs and dead letters give it.
    fn name(&self) -> &'static str;

    async fn process(&self, batch: StreamBatch) -> BatchOutcome;
}

/// Processes a batch and publishes what the function measured, with the measurements every
/// stream function shares: records in, records retried, iterator age and batch duration.
/// Answers the ids of the records to retry.
pub async fn process_measured(
    function: &dyn StreamFunction,
    batch: StreamBatch,
    metrics: &dyn MetricsSink,
) -> Vec<RecordId> {
    let started = Instant::now();
    let records = batch.records.len();
    let oldest_arrival = batch.records.iter().filter_map(|r| r.arrived_at).min();
    let mut measurements = Measurements::default();
    measurements.count(MetricName::RecordsIn, records);
    if let Some(arrival) = oldest_arrival {
        let age = (now_millis() - arrival).max(0);
        measurements.millis(MetricName::IteratorAge, age as f64);
    }
    let outcome = function.process(batch).await;
    measurements.count(MetricName::RecordsRetried, outcome.failed.len());
    measurements.millis(
        MetricName::BatchDuration,
        started.elapsed().as_secs_f64() * 1000.0,
    );
    measurements.extend(outcome.measurements);
    metrics.publish(function.name(), &measurements);
    outcome.failed
}

/// The ids of the records that failed and should be retried, and what the function measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    pub failed: Vec<RecordId>,
    pub measurements: Measurements,
}

impl BatchOutcome {
    pub fn retry(failed: Vec<RecordId>) -> Self {
        BatchOutcome {
            failed,
            measurements: Measurements::default(),
        }
    }
}

/// A decoded record: its id and its envelope.
pub type DecodedRecord = (RecordId, Envelope);

/// A batch after decoding.
pub struct DecodedBatch {
    pub records: Vec<DecodedRecord>,
    /// Undecodable records the dead-letter sink did not take: to retry.
    pub retry: Vec<RecordId>,
    /// Undecodable records the dead-letter sink took.
    pub dead_lettered: usize,
}

/// One device's part of a batch: the records that carried it and their envelopes, in order.
#[derive(Debug)]
pub struct DeviceRecords {
    pub device_id: String,
    pub record_ids: Vec<RecordId>,
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

/// A device's records that a store refused for good (retrying cannot help): sent to the
/// dead-letter sink whole, with the store's reason, instead of stalling the shard until the
/// mapping gives up. Answers the ids still to retry: none when the sink took them, all when it
/// did not (the records are then neither lost nor acknowledged).
pub async fn dead_letter_refused(
    function: &str,
    group: &DeviceRecords,
    error: &crate::ports::StoreError,
    dead_letters: &dyn DeadLetterSink,
) -> Vec<RecordId> {
    let letters = group
        .record_ids
        .iter()
        .zip(&group.envelopes)
        .map(|(id, envelope)| DeadLetter {
            function: function.to_string(),
            record_id: id.to_string(),
            partition_key: group.device_id.clone(),
            data: String::from_utf8_lossy(&envelope.encode()).into_owned(),
            reason: error.to_string(),
            attempts: 1,
            failed_at: now_millis(),
        })
        .collect();
    tracing::warn!(function, device_id = %group.device_id, %error, "records a store refused for good go to dead letters");
    send_or_retry(function, letters, group.record_ids.clone(), dead_letters).await
}

/// Sends dead letters; answers the ids to retry: none when the sink took them, all of them
/// (`ids`) when it did not, so that a record is never acknowledged without its dead letter.
async fn send_or_retry(
    function: &str,
    letters: Vec<DeadLetter>,
    ids: Vec<RecordId>,
    dead_letters: &dyn DeadLetterSink,
) -> Vec<RecordId> {
    if letters.is_empty() {
        return Vec::new();
    }
    match dead_letters.send(letters).await {
        Ok(()) => Vec::new(),
        Err(error) => {
            tracing::error!(function, %error, "dead-letter sink failed; records will be retried");
            ids
        }
    }
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
    let mut poison_ids = Vec::new();
    for record in batch.records {
        match Envelope::decode(&record.data) {
            Ok(envelope) => decoded.push((record.id, envelope)),
            Err(error) => {
                tracing::warn!(function, record_id = %record.id, %error, "undecodable record sent to dead letters");
                poison.push(DeadLetter {
                    function: function.to_string(),
                    record_id: record.id.to_string(),
                    partition_key: record.partition_key,
                    data: String::from_utf8_lossy(&record.data).into_owned(),
                    reason: error.to_string(),
                    attempts: 1,
                    failed_at: now_millis(),
                });
                poison_ids.push(record.id);
            }
        }
    }
    let sent = poison_ids.len();
    let retry = send_or_retry(function, poison, poison_ids, dead_letters).await;
    let dead_lettered = if retry.is_empty() { sent } else { 0 };
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
    fn sequence_numbers_order_as_numbers_and_keep_their_text() {
        let seq = |s: &str| SequenceNumber::new(s);
        assert!(seq("9") < seq("10"));
        assert_eq!(seq("00000000000000000010"), seq("10"));
        assert!(
            seq("49590338271490256608559692538361571095921575989136588898")
                < seq("49590338271490256608559692538361571095921575989136588899")
        );
        assert_eq!(
            seq("00000000000000000010").to_string(),
            "00000000000000000010"
        );
    }

    #[test]
    fn record_ids_show_where_the_record_sits() {
        assert_eq!(RecordId::kinesis("42").to_string(), "42");
        assert_eq!(
            RecordId::kafka("geostream-telemetry", 3, 17).to_string(),
            "geostream-telemetry-3@17"
        );
        assert!(RecordId::kafka("t", 0, 9) < RecordId::kafka("t", 0, 10));
    }
}
