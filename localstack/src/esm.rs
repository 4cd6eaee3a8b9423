//! The event-source-mapping loop: what Lambda does between a stream and a function.
//!
//! One loop per (function, shard), one batch in flight per shard (so per-device order holds):
//! wait for records, gather up to `batch_size` of them within the batching window, hand the
//! function a real `KinesisEvent`, and read its `batchItemFailures`. Records before the lowest
//! failed one are checkpointed; the rest are retried (Lambda's ReportBatchItemFailures
//! behaviour) with backoff, at most `max_retries` times, after which the failed records go to
//! the dead-letter sink with the reason and the loop moves on. Checkpoints are kept per shard
//! for the life of the process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord, KinesisRecord};
use aws_lambda_events::event::streams::KinesisEventResponse;
use chrono::TimeZone;
use geostream_shared::now_millis;
use geostream_shared::ports::{DeadLetter, DeadLetterSink};
use serde::Serialize;
use tokio::sync::watch;

use crate::source::{compare_sequences, ShardSource, SourceRecord};

/// A stream function as Lambda sees it: a `KinesisEvent` in, partial batch failures out, or an
/// error for the whole invocation.
#[async_trait]
pub trait KinesisFunction: Send + Sync {
    fn name(&self) -> &str;
    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String>;
}

/// Event source mapping settings, named as in Lambda's API.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub max_retries: u32,
    /// First retry delay; doubles with every retry.
    pub retry_backoff: Duration,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            batch_size: 100,
            batching_window: Duration::ZERO,
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// Counters of one mapping, shared with the stats endpoint.
#[derive(Debug, Default)]
pub struct MappingStats {
    pub invocations: AtomicU64,
    pub records: AtomicU64,
    pub failed_invocations: AtomicU64,
    pub retried_records: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub read_errors: AtomicU64,
    /// Per shard: the sequence number of the last record done with.
    pub checkpoints: Mutex<Vec<Option<String>>>,
}

#[derive(Debug, Serialize)]
pub struct MappingSnapshot {
    pub function: String,
    pub invocations: u64,
    pub records: u64,
    pub failed_invocations: u64,
    pub retried_records: u64,
    pub dead_lettered: u64,
    pub read_errors: u64,
    /// Records on the stream not yet processed, all shards together, when the source can tell.
    pub lag: Option<u64>,
}

impl MappingStats {
    /// Counts one invocation of the function with `records` records.
    pub fn invoked(&self, records: usize) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
    }

    fn new(shards: usize) -> Self {
        MappingStats {
            checkpoints: Mutex::new(vec![None; shards]),
            ..Default::default()
        }
    }

    /// `source` is the stream the mapping reads, when the runner can measure its backlog (not
    /// for Kafka mappings, whose lag the broker's own tools report).
    pub fn snapshot(&self, function: &str, source: Option<&dyn ShardSource>) -> MappingSnapshot {
        let checkpoints = self
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lag = source.and_then(|source| {
            checkpoints
                .iter()
                .enumerate()
                .map(|(shard, checkpoint)| source.backlog(shard, checkpoint.as_deref()))
                .sum()
        });
        MappingSnapshot {
            function: function.to_string(),
            invocations: self.invocations.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            failed_invocations: self.failed_invocations.load(Ordering::Relaxed),
            retried_records: self.retried_records.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            lag,
        }
    }
}

/// Starts one loop per shard of `source` for `function`; they stop when `shutdown` turns true,
/// after the batch in flight.
pub fn start_mapping(
    function: Arc<dyn KinesisFunction>,
    source: Arc<dyn ShardSource>,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    shutdown: watch::Receiver<bool>,
) -> (Arc<MappingStats>, Vec<tokio::task::JoinHandle<()>>) {
    let shards = source.shard_ids().len();
    let stats = Arc::new(MappingStats::new(shards));
    let tasks = (0..shards)
        .map(|shard| {
            let shard_loop = ShardLoop {
                function: function.clone(),
                source: source.clone(),
                shard,
                config: config.clone(),
                dead_letters: dead_letters.clone(),
                stats: stats.clone(),
            };
            tokio::spawn(shard_loop.run(shutdown.clone()))
        })
        .collect();
    (stats, tasks)
}

/// How long one read waits for records before the loop looks at the shutdown flag again.
const READ_WAIT: Duration = Duration::from_millis(500);

struct ShardLoop {
    function: Arc<dyn KinesisFunction>,
    source: Arc<dyn ShardSource>,
    shard: usize,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    stats: Arc<MappingStats>,
}

impl ShardLoop {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut checkpoint: Option<String> = None;
        while !*shutdown.borrow() {
            let read = tokio::select! {
                read = self.source.read(self.shard, checkpoint.as_deref(), self.config.batch_size, READ_WAIT) => read,
                _ = shutdown.changed() => continue,
            };
            let mut read = match read {
                Ok(read) => read,
                Err(error) => {
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(function = self.function.name(), shard = self.shard, %error, "reading the stream failed; retrying");
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
            };
            if read.expired > 0 {
                self.report_expired(read.expired).await;
            }
            if read.records.is_empty() {
                continue;
            }
            if read.records.len() < self.config.batch_size && !self.config.batching_window.is_zero()
            {
                // Batching window: gather more records until the batch is full or the window ends.
                tokio::time::sleep(self.config.batching_window).await;
                let last = read.records.last().map(|r| r.sequence.clone());
                let wanted = self.config.batch_size - read.records.len();
                if let Ok(more) = self
                    .source
                    .read(self.shard, last.as_deref(), wanted, Duration::ZERO)
                    .await
                {
                    read.records.extend(more.records);
                }
            }
            let last = read.records.last().map(|r| r.sequence.clone());
            self.deliver(read.records).await;
            checkpoint = last;
            self.stats
                .checkpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())[self.shard]
                .clone_from(&checkpoint);
        }
    }

    /// Invokes the function until every record succeeded or retries ran out.
    async fn deliver(&self, mut records: Vec<SourceRecord>) {
        let mut attempt: u32 = 0;
        let mut backoff = self.config.retry_backoff;
        loop {
            attempt += 1;
            self.stats.invoked(records.len());
            let event = self.kinesis_event(&records);
            let every_record = || {
                records
                    .iter()
                    .map(|r| r.sequence.clone())
                    .collect::<Vec<_>>()
            };
            let (failed, reason): (Vec<String>, String) = match self.function.invoke(event).await {
                Ok(response) => {
                    let ids: Option<Vec<String>> = response
                        .batch_item_failures
                        .iter()
                        .map(|f| {
                            f.item_identifier
                                .clone()
                                .filter(|id| records.iter().any(|r| &r.sequence == id))
                        })
                        .collect();
                    match ids {
                        Some(ids) => (
                            ids,
                            format!("{} reported the record as failed", self.function.name()),
                        ),
                        // Lambda treats an unusable itemIdentifier as a failure of the whole batch.
                        None => (
                            every_record(),
                            "batch item failure without a valid itemIdentifier".into(),
                        ),
                    }
                }
                Err(error) => {
                    self.stats
                        .failed_invocations
                        .fetch_add(1, Ordering::Relaxed);
                    (
                        every_record(),
                        format!("{} failed: {error}", self.function.name()),
                    )
                }
            };
            let Some(lowest) = failed
                .iter()
                .min_by(|a, b| compare_sequences(a, b))
                .cloned()
            else {
                return;
            };
            if attempt > self.config.max_retries {
                let letters: Vec<DeadLetter> = records
                    .iter()
                    .filter(|r| failed.contains(&r.sequence))
                    .map(|r| DeadLetter {
                        function: self.function.name().to_string(),
                        record_id: r.sequence.clone(),
                        partition_key: r.partition_key.clone(),
                        data: String::from_utf8_lossy(&r.data).into_owned(),
                        reason: format!("{reason} on all {attempt} attempts"),
                        attempts: attempt,
                        failed_at: now_millis(),
                    })
                    .collect();
                self.stats
                    .dead_lettered
                    .fetch_add(letters.len() as u64, Ordering::Relaxed);
                tracing::error!(function = self.function.name(), shard = self.shard, records = letters.len(), %reason, "retries exhausted; records sent to dead letters");
                if let Err(error) = self.dead_letters.send(letters).await {
                    tracing::error!(function = self.function.name(), %error, "dead-letter sink failed");
                }
                return;
            }
            // Checkpoint before the lowest failure; retry from there.
            records.retain(|r| compare_sequences(&r.sequence, &lowest).is_ge());
            self.stats
                .retried_records
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            tracing::warn!(function = self.function.name(), shard = self.shard, attempt, retrying = records.len(), %reason, "retrying batch");
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }

    async fn report_expired(&self, count: u64) {
        let shard_id = &self.source.shard_ids()[self.shard];
        let letter = DeadLetter {
            function: self.function.name().to_string(),
            record_id: String::new(),
            partition_key: String::new(),
            data: String::new(),
            reason: format!(
                "{count} records of {shard_id} expired from the stream's retention before {} read them",
                self.function.name()
            ),
            attempts: 0,
            failed_at: now_millis(),
        };
        tracing::error!(
            function = self.function.name(),
            shard = self.shard,
            count,
            "records expired before processing"
        );
        self.stats.dead_lettered.fetch_add(count, Ordering::Relaxed);
        if let Err(error) = self.dead_letters.send(vec![letter]).await {
            tracing::error!(function = self.function.name(), %error, "dead-letter sink failed");
        }
    }

    fn kinesis_event(&self, records: &[SourceRecord]) -> KinesisEvent {
        let shard_id = &self.source.shard_ids()[self.shard];
        let stream_arn = format!(
            "arn:aws:kinesis:local:000000000000:stream/{}",
            self.source.stream_name()
        );
        let mut event = KinesisEvent::default();
        event.records = records
            .iter()
            .map(|source| {
                let mut kinesis = KinesisRecord::default();
                kinesis.approximate_arrival_timestamp.0 = chrono::Utc
                    .timestamp_millis_opt(source.arrival)
                    .single()
                    .unwrap_or_default();
                kinesis.data.0 = source.data.clone();
                kinesis.partition_key = source.partition_key.clone();
                kinesis.sequence_number = source.sequence.clone();
                kinesis.kinesis_schema_version = Some("1.0".into());
                let mut record = KinesisEventRecord::default();
                record.aws_region = Some("local".into());
                record.event_id = Some(format!("{shard_id}:{}", source.sequence));
                record.event_name = Some("aws:kinesis:record".into());
                record.event_source = Some("aws:kinesis".into());
                record.event_source_arn = Some(stream_arn.clone());
                record.event_version = Some("1.0".into());
                record.invoke_identity_arn = Some(format!(
                    "arn:aws:iam::000000000000:role/geostream-{}",
                    self.function.name()
                ));
                record.kinesis = kinesis;
                record
            })
            .collect();
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemorySource;
    use geostream_shared::memory::{MemoryDeadLetters, MemoryStream};
    use geostream_shared::ports::{BusRecord, EventBus};

    /// Fails the record with this payload on its first `fail_times` deliveries.
    struct Flaky {
        poison: Vec<u8>,
        seen: Mutex<Vec<Vec<u8>>>,
        failures_left: Mutex<u32>,
    }

    #[async_trait]
    impl KinesisFunction for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
            let mut response = KinesisEventResponse::default();
            for record in event.records {
                self.seen
                    .lock()
                    .unwrap()
                    .push(record.kinesis.data.0.clone());
                let mut left = self.failures_left.lock().unwrap();
                if record.kinesis.data.0 == self.poison && *left > 0 {
                    *left -= 1;
                    response.add_failure(record.kinesis.sequence_number);
                }
            }
            Ok(response)
        }
    }

    async fn run_with(fail_times: u32, max_retries: u32) -> (Arc<Flaky>, Arc<MemoryDeadLetters>) {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let records: Vec<BusRecord> = (0..5u8)
            .map(|n| BusRecord {
                partition_key: "k".into(),
                data: vec![n],
            })
            .collect();
        stream.publish(records).await;
        let source: Arc<dyn ShardSource> = Arc::new(MemorySource::new(stream));
        let function = Arc::new(Flaky {
            poison: vec![2],
            seen: Mutex::new(Vec::new()),
            failures_left: Mutex::new(fail_times),
        });
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let (stop_tx, stop_rx) = watch::channel(false);
        let config = MappingConfig {
            batch_size: 10,
            max_retries,
            retry_backoff: Duration::from_millis(1),
            ..Default::default()
        };
        let (stats, tasks) = start_mapping(
            function.clone(),
            source.clone(),
            config,
            dead.clone(),
            stop_rx,
        );
        for _ in 0..200 {
            if stats.snapshot("flaky", Some(source.as_ref())).lag == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(true).unwrap();
        for task in tasks {
            task.await.unwrap();
        }
        (function, dead)
    }

    #[tokio::test]
    async fn a_failed_record_is_retried_from_its_sequence_number() {
        let (function, dead) = run_with(2, 3).await;
        let seen = function.seen.lock().unwrap().clone();
        // First delivery 0..4, then twice from the failed record 2 onwards.
        let expected: Vec<Vec<u8>> = [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4]
            .iter()
            .map(|n| vec![*n])
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(dead.snapshot().1, 0);
    }

    #[tokio::test]
    async fn retries_are_bounded_then_the_record_is_dead_lettered() {
        let (function, dead) = run_with(100, 2).await;
        assert_eq!(function.seen.lock().unwrap().len(), 5 + 3 + 3);
        let (letters, total) = dead.snapshot();
        assert_eq!(total, 1);
        assert_eq!(letters[0].data, "\u{2}");
        assert_eq!(letters[0].attempts, 3);
        assert!(
            letters[0].reason.contains("on all 3 attempts"),
            "{}",
            letters[0].reason
        );
    }
}
