//! The neutral batch that stream handlers take, whichever bus it came from, and what they
//! answer: the records to retry. Building a batch from a Lambda event and answering Lambda's
//! partial batch response is the entry points' job (`geostream-lambda`); this module knows
//! records, their typed ids and the processing every stream function shares.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::envelope::Envelope;
use crate::metrics::{Measurements, MetricName, MetricsSink};
use crate::ports::{DeadLetter, DeadLetterSink, StoreError};
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

    /// The id [`RecordId`]'s `Display` wrote: `topic-partition@offset` for Kafka, else a
    /// Kinesis sequence number.
    pub fn parse(text: &str) -> Self {
        let kafka = text.rsplit_once('@').and_then(|(topic_partition, offset)| {
            let (topic, partition) = topic_partition.rsplit_once('-')?;
            Some(RecordId::kafka(
                topic,
                partition.parse().ok()?,
                offset.parse().ok()?,
            ))
        });
        kafka.unwrap_or_else(|| RecordId::kinesis(text))
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
    /// Shared, not copied, by every function a record is handed to.
    pub data: bytes::Bytes,
    /// When the bus took the record (Kinesis' approximate arrival time, Kafka's timestamp).
    pub arrived_at: Option<EpochMillis>,
    /// The envelope `data` encodes, when the bus handed it over decoded (the embedded runner's
    /// in-process bus): taken as it is instead of parsing `data` again.
    pub decoded: Option<Arc<Envelope>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamBatch {
    pub records: Vec<StreamRecord>,
}

/// A stream function (geo-update, archiver, anomaly-inspector): a batch in, the records to
/// retry (with why) out. Transport (which Lambda event, which response) is not its concern.
#[async_trait::async_trait]
pub trait StreamFunction: Send + Sync {
    /// The function's name, as logs and dead letters give it.
    fn name(&self) -> &'static str;

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome;
}

#[async_trait::async_trait]
impl<T: StreamFunction + ?Sized> StreamFunction for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
        (**self).process(batch).await
    }
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
    let outcome = function.process(&batch).await;
    measurements.count(MetricName::RecordsRetried, outcome.failed.len());
    measurements.millis(
        MetricName::BatchDuration,
        started.elapsed().as_secs_f64() * 1000.0,
    );
    measurements.extend(outcome.measurements);
    metrics.publish(function.name(), &measurements);
    outcome.failed.into_iter().map(|retry| retry.id).collect()
}

/// A record to retry, and the error that failed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub id: RecordId,
    pub error: StoreError,
}

impl Retry {
    /// Every one of `ids`, failed by `error`.
    pub fn all(ids: impl IntoIterator<Item = RecordId>, error: &StoreError) -> Vec<Retry> {
        ids.into_iter()
            .map(|id| Retry {
                id,
                error: error.clone(),
            })
            .collect()
    }
}

/// The records that failed and should be retried, and what the function measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    pub failed: Vec<Retry>,
    pub measurements: Measurements,
}

impl BatchOutcome {
    pub fn retry(failed: Vec<Retry>) -> Self {
        BatchOutcome {
            failed,
            measurements: Measurements::default(),
        }
    }

    /// The ids of the records to retry, in order, each once.
    pub fn failed_ids(&self) -> Vec<RecordId> {
        let mut ids: Vec<RecordId> = self.failed.iter().map(|r| r.id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// A decoded record: its id and its envelope (shared with the bus that handed it over decoded).
pub type DecodedRecord = (RecordId, Arc<Envelope>);

/// A batch after decoding.
pub struct DecodedBatch {
    pub records: Vec<DecodedRecord>,
    /// Undecodable records the dead-letter sink did not take: to retry.
    pub retry: Vec<Retry>,
    /// Undecodable records the dead-letter sink took.
    pub dead_lettered: usize,
}

/// One device's part of a batch: the records that carried it and their envelopes, in order.
#[derive(Debug)]
pub struct DeviceRecords {
    pub device_id: String,
    pub record_ids: Vec<RecordId>,
    pub envelopes: Vec<Arc<Envelope>>,
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

/// Records that a store refused for good (retrying cannot help): sent to the dead-letter sink
/// whole, with the store's reason, instead of stalling the shard until the mapping gives up.
/// Answers how many were dead-lettered; when the sink did not take them, they are added to
/// `failed` instead (neither lost nor acknowledged).
pub async fn dead_letter_refused(
    function: &str,
    record_ids: &[RecordId],
    envelopes: &[Arc<Envelope>],
    error: &StoreError,
    dead_letters: &dyn DeadLetterSink,
    failed: &mut Vec<Retry>,
) -> usize {
    let letters = record_ids
        .iter()
        .zip(envelopes)
        .map(|(id, envelope)| {
            DeadLetter::new(function, id, &envelope.device_id, envelope.encode(), error)
        })
        .collect();
    tracing::warn!(function, records = record_ids.len(), %error, "records a store refused for good go to dead letters");
    send_or_retry(function, letters, record_ids.to_vec(), dead_letters, failed).await
}

/// Sends dead letters; answers how many the sink took. When it did not take them, the records
/// (`ids`) are added to `failed`, so that a record is never acknowledged without its letter.
pub async fn send_or_retry(
    function: &str,
    letters: Vec<DeadLetter>,
    ids: Vec<RecordId>,
    dead_letters: &dyn DeadLetterSink,
    failed: &mut Vec<Retry>,
) -> usize {
    let count = letters.len();
    if count == 0 {
        return 0;
    }
    match dead_letters.send(letters).await {
        Ok(()) => count,
        Err(error) => {
            tracing::error!(function, %error, "dead-letter sink failed; records will be retried");
            failed.extend(Retry::all(ids, &error));
            0
        }
    }
}

/// Decodes every record of a batch. Records that cannot be decoded will never decode, so they
/// go straight to the dead-letter sink with the reason instead of blocking the shard.
pub async fn decode_batch(
    function: &str,
    batch: &StreamBatch,
    dead_letters: &dyn DeadLetterSink,
) -> DecodedBatch {
    let mut decoded = Vec::with_capacity(batch.records.len());
    let mut poison = Vec::new();
    let mut poison_ids = Vec::new();
    for record in &batch.records {
        if let Some(envelope) = &record.decoded {
            decoded.push((record.id.clone(), envelope.clone()));
            continue;
        }
        match Envelope::decode(&record.data) {
            Ok(envelope) => decoded.push((record.id.clone(), Arc::new(envelope))),
            Err(error) => {
                tracing::warn!(function, record_id = %record.id, %error, "undecodable record sent to dead letters");
                let refusal = StoreError::permanent("decode", error.to_string());
                let mut letter = DeadLetter::new(
                    function,
                    &record.id,
                    record.partition_key.clone(),
                    record.data.to_vec(),
                    &refusal,
                );
                letter.arrived_at = record.arrived_at;
                poison.push(letter);
                poison_ids.push(record.id.clone());
            }
        }
    }
    let mut retry = Vec::new();
    let dead_lettered = send_or_retry(function, poison, poison_ids, dead_letters, &mut retry).await;
    DecodedBatch {
        records: decoded,
        retry,
        dead_lettered,
    }
}

/// How long a stream function keeps failing a record before it dead-letters the record itself.
/// Lambda's event source mapping, once its retries or the record's maximum age run out, tells
/// its on-failure destination only where the records sat; a function that gives up first
/// sends them whole, so a redrive needs nothing from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Invocations that fail a record before it is dead-lettered: the mapping's retries plus
    /// the first attempt (the function gives up on the last attempt the mapping makes).
    pub attempts: u32,
    /// A record this old (since the bus took it) is dead-lettered on its next failure.
    pub max_age_ms: Option<EpochMillis>,
}

impl RetryBudget {
    /// The budget under a mapping with `max_retries` retries and records discarded at
    /// `max_record_age_s`: give up on the last attempt, or at nine tenths of the maximum
    /// age (a margin for the retry in flight when the record would expire).
    pub fn within_mapping(max_retries: u32, max_record_age_s: Option<u64>) -> Self {
        RetryBudget {
            attempts: max_retries.saturating_add(1),
            max_age_ms: max_record_age_s.map(|s| (s as EpochMillis) * 900),
        }
    }
}

/// Failed attempts counted per record; above this many records the count starts afresh
/// (a record then gives up later, by age or by the mapping, never sooner).
const MAX_COUNTED_RECORDS: usize = 100_000;

/// A record as the attempt count knows it: its partition key beside its id, since Kinesis
/// promises sequence numbers unique within a shard only (and emulators number each shard from 1).
type AttemptKey = (String, RecordId);

/// A stream function that dead-letters, whole, the records it has failed for its whole
/// [`RetryBudget`], and answers only the rest for retry. Attempts are counted in this process
/// (Lambda retries a shard's batch on a warm instance, usually this one); the record's age
/// bounds what a count missed.
pub struct WithRetryBudget<F> {
    function: F,
    budget: RetryBudget,
    dead_letters: std::sync::Arc<dyn DeadLetterSink>,
    attempts: std::sync::Mutex<HashMap<AttemptKey, u32>>,
}

impl<F: StreamFunction> WithRetryBudget<F> {
    pub fn new(
        function: F,
        budget: RetryBudget,
        dead_letters: std::sync::Arc<dyn DeadLetterSink>,
    ) -> Self {
        WithRetryBudget {
            function,
            budget,
            dead_letters,
            attempts: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, u32>> {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts an attempt: forgets the records of `batch` that passed and answers each failed
    /// one's attempts so far.
    fn count(&self, batch: &StreamBatch, failed: &[Retry]) -> HashMap<RecordId, u32> {
        let failing: std::collections::HashSet<&RecordId> = failed.iter().map(|r| &r.id).collect();
        let mut ledger = self.ledger();
        if !ledger.is_empty() {
            for record in batch.records.iter().filter(|r| !failing.contains(&r.id)) {
                ledger.remove(&(record.partition_key.clone(), record.id.clone()));
            }
        }
        if ledger.len() + failed.len() > MAX_COUNTED_RECORDS {
            ledger.clear();
        }
        batch
            .records
            .iter()
            .filter(|r| failing.contains(&r.id))
            .map(|record| {
                let count = ledger
                    .entry((record.partition_key.clone(), record.id.clone()))
                    .or_insert(0);
                *count += 1;
                (record.id.clone(), *count)
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl<F: StreamFunction> StreamFunction for WithRetryBudget<F> {
    fn name(&self) -> &'static str {
        self.function.name()
    }

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
        let mut outcome = self.function.process(batch).await;
        if outcome.failed.is_empty() {
            if !self.ledger().is_empty() {
                self.count(batch, &[]);
            }
            return outcome;
        }
        let attempts = self.count(batch, &outcome.failed);
        let now = now_millis();
        let by_id: HashMap<&RecordId, &StreamRecord> =
            batch.records.iter().map(|r| (&r.id, r)).collect();
        let mut letters = Vec::new();
        let mut given_up = Vec::new();
        for retry in &outcome.failed {
            let Some(record) = by_id.get(&retry.id) else {
                continue;
            };
            let attempts = attempts.get(&retry.id).copied().unwrap_or(1);
            let age_ms = record.arrived_at.map(|at| now - at);
            let too_old = matches!(
                (age_ms, self.budget.max_age_ms),
                (Some(age), Some(max)) if age >= max
            );
            if attempts < self.budget.attempts && !too_old {
                continue;
            }
            let mut letter = DeadLetter::new(
                self.function.name(),
                &record.id,
                record.partition_key.clone(),
                record.data.to_vec(),
                &retry.error,
            );
            letter.arrived_at = record.arrived_at;
            letter.attempts = attempts;
            letter.reason = format!(
                "{} (failed on {attempts} attempts{}: retry budget spent)",
                retry.error,
                age_ms
                    .map(|ms| format!(", {} s after the bus took it", ms / 1000))
                    .unwrap_or_default()
            );
            letters.push(letter);
            given_up.push(record.id.clone());
        }
        if given_up.is_empty() {
            return outcome;
        }
        let name = self.function.name();
        tracing::error!(
            function = name,
            records = given_up.len(),
            "retry budget spent; the records go to dead letters whole"
        );
        let dead_letters = self.dead_letters.as_ref();
        let mut unsent = Vec::new();
        let count = send_or_retry(name, letters, given_up.clone(), dead_letters, &mut unsent).await;
        if unsent.is_empty() {
            outcome.failed.retain(|retry| !given_up.contains(&retry.id));
            outcome.measurements.count(MetricName::DeadLetters, count);
            let mut ledger = self.ledger();
            for record in batch.records.iter().filter(|r| given_up.contains(&r.id)) {
                ledger.remove(&(record.partition_key.clone(), record.id.clone()));
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryDeadLetters;
    use crate::ports::ErrorKind;
    use std::sync::Arc;

    /// Fails every record whose data starts with `!`, for the moment.
    struct Flaky;

    #[async_trait::async_trait]
    impl StreamFunction for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
            let failing = batch.records.iter().filter(|r| r.data.starts_with(b"!"));
            BatchOutcome::retry(Retry::all(
                failing.map(|r| r.id.clone()),
                &StoreError::transient("PutItem", "ProvisionedThroughputExceededException"),
            ))
        }
    }

    fn record(id: &str, data: &[u8], arrived_at: Option<EpochMillis>) -> StreamRecord {
        StreamRecord {
            id: RecordId::kinesis(id),
            partition_key: "truck-1".into(),
            data: data.to_vec().into(),
            arrived_at,
            decoded: None,
        }
    }

    #[tokio::test]
    async fn a_record_failing_on_the_last_attempt_is_dead_lettered_whole() {
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let function =
            WithRetryBudget::new(Flaky, RetryBudget::within_mapping(2, None), dead.clone());
        // Not valid UTF-8: the letter must carry the bytes, not a lossy text of them.
        let data = b"!\xff\x00 not utf-8";
        let batch = || StreamBatch {
            records: vec![record("1", b"fine", None), record("2", data, Some(5))],
        };
        for attempt in 1..=2 {
            let outcome = function.process(&batch()).await;
            assert_eq!(
                outcome.failed_ids(),
                [RecordId::kinesis("2")],
                "attempt {attempt}"
            );
            assert_eq!(dead.snapshot().1, 0);
        }
        let last = function.process(&batch()).await;
        assert!(last.failed.is_empty(), "given up, not retried");
        assert_eq!(last.measurements.get(MetricName::DeadLetters), Some(1.0));
        let (letters, _) = dead.snapshot();
        let letter = &letters[0];
        assert_eq!(letter.data, data);
        assert_eq!(
            (letter.attempts, letter.error_kind, letter.arrived_at),
            (3, ErrorKind::Transient, Some(5))
        );
        assert_eq!(letter.record_id, "2");
        assert!(
            letter.reason.contains("ProvisionedThroughputExceeded"),
            "{}",
            letter.reason
        );
        let json = serde_json::to_value(letter).unwrap();
        let back: DeadLetter = serde_json::from_value(json).unwrap();
        assert_eq!(&back, letter, "a letter reads back as it was sent");
    }

    #[tokio::test]
    async fn a_record_near_its_maximum_age_is_dead_lettered_on_its_first_failure() {
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let function = WithRetryBudget::new(
            Flaky,
            RetryBudget::within_mapping(10_000, Some(3_600)),
            dead.clone(),
        );
        let old = now_millis() - 3_300_000;
        let outcome = function
            .process(&StreamBatch {
                records: vec![
                    record("7", b"!late", Some(old)),
                    record("8", b"!new", Some(now_millis())),
                ],
            })
            .await;
        assert_eq!(outcome.failed_ids(), [RecordId::kinesis("8")]);
        let (letters, _) = dead.snapshot();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].record_id, "7");
        assert_eq!(letters[0].attempts, 1);
    }

    #[tokio::test]
    async fn a_spent_record_is_retried_while_the_dead_letter_sink_is_down() {
        struct Down;
        #[async_trait::async_trait]
        impl DeadLetterSink for Down {
            async fn send(&self, _: Vec<DeadLetter>) -> Result<(), StoreError> {
                Err(StoreError::transient("SendMessageBatch", "unavailable"))
            }
        }
        let function =
            WithRetryBudget::new(Flaky, RetryBudget::within_mapping(0, None), Arc::new(Down));
        let outcome = function
            .process(&StreamBatch {
                records: vec![record("3", b"!x", None)],
            })
            .await;
        assert_eq!(outcome.failed_ids(), [RecordId::kinesis("3")]);
    }

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
        for id in [
            RecordId::kinesis("49590338271490256608559692538361571095921575989136588898"),
            RecordId::kafka("geostream-telemetry", 12, 4),
        ] {
            assert_eq!(RecordId::parse(&id.to_string()), id);
        }
    }
}
