//! Event source mappings: what Lambda does between a stream and a stream function, one policy
//! for every bus.
//!
//! A [`Source`] is what a mapping reads: one shard of the in-memory stream ([`memory`]) or of a
//! Kinesis stream ([`kinesis`]), or a Kafka consumer group's partitions ([`kafka`]). One loop
//! per source, one batch in flight per loop (so per-device order holds), each run the same
//! way:
//!
//! 1. read up to `batch_size` records, within the batching window;
//! 2. invoke the function with the event the source's trigger sends ([`event`]) and read its
//!    partial batch failures (a failure naming a record not in the batch fails the whole
//!    batch, as Lambda treats it);
//! 3. checkpoint, per partition, everything before the lowest failed record;
//! 4. retry the rest from that record, with capped exponential backoff and jitter, at most
//!    `max_retries` times;
//! 5. then send what it could not get past to the dead-letter sink: per partition, every
//!    record from the lowest failed one on (what Lambda's on-failure destination is told of),
//!    each whole and with its reason; only once the sink has taken them, checkpoint past them.
//!    (A Kafka response names only where to resume, a Kinesis one each failed record; cutting
//!    at the same place keeps both buses alike, and a redrive is idempotent.) When the sink fails, the
//!    checkpoint does not move: the send is retried (backing off) until it succeeds or the
//!    runner stops, and a stopped runner reads the records again when it starts.
//!
//! Nothing is acknowledged that was neither processed nor dead-lettered.

pub mod event;
pub mod kafka;
pub mod kinesis;
pub mod memory;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use geostream_shared::envelope::Envelope;
use geostream_shared::ports::{DeadLetter, DeadLetterSink, ErrorKind};
use geostream_shared::stream::RecordId;
use geostream_shared::{now_millis, EpochMillis};
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use crate::positions::{LatencySnapshot, SinceReading};

use event::{failed_records, EventSource, Invoke};

/// Event source mapping settings, named as in Lambda's API.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    pub batch_size: usize,
    pub batching_window: Duration,
    pub max_retries: u32,
    /// The first retry's delay; each further retry doubles it, up to `max_backoff`. Every
    /// delay is jittered: between half of that and all of it.
    pub retry_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            batch_size: 100,
            batching_window: Duration::ZERO,
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl MappingConfig {
    /// What Terraform deploys for the archiver's mapping.
    pub fn archiver_as_deployed() -> Self {
        let deployed = geostream_aws::manifest::MAPPING_DEFAULTS;
        MappingConfig {
            batch_size: deployed.archiver_batch_size,
            batching_window: Duration::from_secs(deployed.archiver_batching_window_seconds),
            ..Self::as_deployed()
        }
    }

    /// What Terraform deploys (Lambda's mappings), for the runner's AWS backend.
    pub fn as_deployed() -> Self {
        let deployed = geostream_aws::manifest::MAPPING_DEFAULTS;
        MappingConfig {
            batch_size: deployed.batch_size,
            batching_window: Duration::from_secs(deployed.batching_window_seconds),
            max_retries: deployed.max_retries,
            ..MappingConfig::default()
        }
    }

    /// The delay before retry `attempt` (1-based): capped exponential with equal jitter, so
    /// retries of many shards do not fall in step and a delay never collapses to nothing.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .retry_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=ceiling - half)
    }
}

/// A record as a source holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub id: RecordId,
    /// The shard id, or `topic-partition`: order and checkpoints are per partition.
    pub partition: String,
    pub partition_key: String,
    pub data: bytes::Bytes,
    pub arrival: EpochMillis,
    /// The envelope `data` encodes, when the source has it decoded (the in-memory stream).
    pub decoded: Option<Arc<Envelope>>,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct SourceRead {
    pub records: Vec<SourceRecord>,
    /// Records that expired from the stream before they were read (the in-memory stream tells;
    /// Kinesis does not say how many it trimmed).
    pub expired: u64,
}

#[async_trait]
pub trait Source: Send + Sync {
    /// What is read, for logs: `STREAM/shardId-...` or `TOPIC`.
    fn describe(&self) -> &str;
    /// The trigger this source stands for.
    fn event_source(&self) -> &EventSource;
    /// Records after the ones last returned, at most `max`, waiting up to `wait` for the first.
    async fn read(&self, max: usize, wait: Duration) -> Result<SourceRead, String>;
    /// Everything up to and including each record of `through` (the last done with, per
    /// partition) is done with.
    async fn checkpoint(&self, through: &[RecordId]) -> Result<(), String>;
    /// Records not yet done with, when the source can tell.
    fn backlog(&self) -> Option<u64>;
    /// Whether [`Source::backlog`] can ever tell (not on Kafka, whose consumer lag the broker's
    /// own tools report).
    fn sees_stream_end(&self) -> bool;
    /// Of `partitions`, the ones whose records are no longer this reader's to deliver. A Kafka
    /// rebalance can move a partition to another consumer of the group mid-retry; that one
    /// delivers it from the committed offset, so this one must let go of it. Asked once per
    /// delivery attempt with the batch's partitions, not per record: on Kafka the answer is a
    /// round trip to librdkafka's main thread (per record, it took the burst bench from
    /// 61,000 to 17,000 readings/s).
    fn released(&self, _partitions: &BTreeSet<&str>) -> BTreeSet<String> {
        BTreeSet::new()
    }
    /// Leaves the stream (a Kafka consumer leaves its group).
    fn close(&self) {}
    /// Whether the reader has its partitions: a Kafka consumer only once its group gave it
    /// some (a join takes seconds), every other source at once.
    fn ready(&self) -> bool {
        true
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
    /// Sends to the dead-letter sink that failed (and were retried with the checkpoint held).
    pub dead_letter_failures: AtomicU64,
    pub read_errors: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    /// Each record's age when a read returned it: since it was written to the stream (Kinesis's
    /// approximate arrival, Kafka's message timestamp), so producer, broker and fetch together.
    pub record_age_at_read: SinceReading,
    /// From a batch's read to the start of its first invocation: the batching window.
    pub read_to_invoke: SinceReading,
    /// Each invocation, from its start to the function's answer.
    pub invocation: SinceReading,
}

#[derive(Debug, Serialize)]
pub struct MappingSnapshot {
    pub function: String,
    pub invocations: u64,
    pub records: u64,
    pub failed_invocations: u64,
    pub retried_records: u64,
    pub dead_lettered: u64,
    pub dead_letter_failures: u64,
    pub read_errors: u64,
    pub checkpoint_errors: u64,
    /// Records on the stream not yet processed, all shards together, when the sources can tell.
    pub lag: Option<u64>,
    pub record_age_at_read: LatencySnapshot,
    pub read_to_invoke: LatencySnapshot,
    pub invocation: LatencySnapshot,
}

impl MappingStats {
    fn invoked(&self, records: usize) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(records as u64, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One function's mapping: its loops' counters and what they read.
pub struct Mapping {
    pub function: String,
    pub stats: Arc<MappingStats>,
    sources: Vec<Arc<dyn Source>>,
}

impl Mapping {
    pub fn snapshot(&self) -> MappingSnapshot {
        let stats = &self.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MappingSnapshot {
            function: self.function.clone(),
            invocations: load(&stats.invocations),
            records: load(&stats.records),
            failed_invocations: load(&stats.failed_invocations),
            retried_records: load(&stats.retried_records),
            dead_lettered: load(&stats.dead_lettered),
            dead_letter_failures: load(&stats.dead_letter_failures),
            read_errors: load(&stats.read_errors),
            checkpoint_errors: load(&stats.checkpoint_errors),
            lag: self.sources.iter().map(|s| s.backlog()).sum(),
            record_age_at_read: stats.record_age_at_read.snapshot(),
            read_to_invoke: stats.read_to_invoke.snapshot(),
            invocation: stats.invocation.snapshot(),
        }
    }

    /// Whether every reader of the mapping has its partitions (see [`Source::ready`]).
    pub fn ready(&self) -> bool {
        self.sources.iter().all(|s| s.ready())
    }

    /// Whether the mapping can tell when it has read everything (see [`Source::sees_stream_end`]).
    pub fn sees_stream_end(&self) -> bool {
        self.sources.iter().all(|s| s.sees_stream_end())
    }
}

/// Starts one loop per source for `function`, on the runner's runtime; they stop when
/// `shutdown` turns true, after the batch in flight.
pub fn start_mapping(
    function: Arc<dyn Invoke>,
    sources: Vec<Arc<dyn Source>>,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    shutdown: watch::Receiver<bool>,
) -> (Mapping, Vec<tokio::task::JoinHandle<()>>) {
    let (mapping, loops) = mapping_loops(function, sources, config, dead_letters, shutdown);
    let tasks = loops
        .into_iter()
        .map(|mapping_loop| tokio::spawn(mapping_loop.run()))
        .collect();
    (mapping, tasks)
}

/// As [`start_mapping`], but the loops run on a thread of their own (named after the
/// function), as a Lambda function runs in sandboxes of its own: the kernel wakes that thread
/// as soon as records arrive, instead of the loops waiting in the runner's run queue behind
/// the gateway's requests and the other functions' batches. The handle ends when the loops
/// have stopped.
pub fn start_mapping_on_own_thread(
    function: Arc<dyn Invoke>,
    sources: Vec<Arc<dyn Source>>,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Mapping, tokio::task::JoinHandle<()>), String> {
    let name = function.name().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for {name}'s mapping: {e}"))?;
    let (mapping, loops) = mapping_loops(function, sources, config, dead_letters, shutdown);
    let (stopped, on_stop) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            runtime.block_on(async move {
                let tasks: Vec<_> = loops
                    .into_iter()
                    .map(|mapping_loop| tokio::spawn(mapping_loop.run()))
                    .collect();
                for task in tasks {
                    if let Err(error) = task.await {
                        tracing::error!(%error, "a mapping loop ended abnormally");
                    }
                }
            });
            let _ = stopped.send(());
        })
        .map_err(|e| format!("cannot start a thread for {name}'s mapping: {e}"))?;
    let task = tokio::spawn(async move {
        // The sender goes when the thread ends, stopped or not.
        let _ = on_stop.await;
    });
    Ok((mapping, task))
}

fn mapping_loops(
    function: Arc<dyn Invoke>,
    sources: Vec<Arc<dyn Source>>,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    shutdown: watch::Receiver<bool>,
) -> (Mapping, Vec<MappingLoop>) {
    let stats = Arc::new(MappingStats::default());
    let loops = sources
        .iter()
        .map(|source| MappingLoop {
            function: function.clone(),
            source: source.clone(),
            config: config.clone(),
            dead_letters: dead_letters.clone(),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        })
        .collect();
    let mapping = Mapping {
        function: function.name().to_string(),
        stats,
        sources,
    };
    (mapping, loops)
}

/// How long one read waits for records before the loop looks at the shutdown flag again.
const READ_WAIT: Duration = Duration::from_millis(500);

struct MappingLoop {
    function: Arc<dyn Invoke>,
    source: Arc<dyn Source>,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    stats: Arc<MappingStats>,
    shutdown: watch::Receiver<bool>,
}

impl MappingLoop {
    async fn run(mut self) {
        let mut read_failures: u32 = 0;
        while !*self.shutdown.borrow() {
            let read = tokio::select! {
                read = self.source.read(self.config.batch_size, READ_WAIT) => read,
                _ = self.shutdown.changed() => continue,
            };
            let mut read = match read {
                Ok(read) => {
                    read_failures = 0;
                    self.stats
                        .record_age_at_read
                        .record_all(read.records.iter().map(|r| r.arrival));
                    read
                }
                Err(error) => {
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    read_failures += 1;
                    tracing::warn!(function = self.function.name(), source = self.source.describe(), %error, "reading the stream failed; retrying");
                    tokio::time::sleep(self.config.retry_delay(read_failures)).await;
                    continue;
                }
            };
            if read.expired > 0 {
                self.report_expired(read.expired).await;
            }
            if read.records.is_empty() {
                continue;
            }
            let read_at = now_millis();
            let wanted = self.config.batch_size.saturating_sub(read.records.len());
            if wanted > 0 && !self.config.batching_window.is_zero() {
                // Batching window: gather more records until the batch is full or the window ends.
                tokio::time::sleep(self.config.batching_window).await;
                if let Ok(more) = self.source.read(wanted, Duration::ZERO).await {
                    read.records.extend(more.records);
                }
            }
            self.deliver(read.records, read_at).await;
        }
        self.source.close();
    }

    /// Invokes the function until every record is processed or dead-lettered, checkpointing
    /// what is done as it goes.
    async fn deliver(&mut self, mut records: Vec<SourceRecord>, read_at: EpochMillis) {
        let name = self.function.name().to_string();
        let mut attempt: u32 = 0;
        self.stats.read_to_invoke.record(read_at);
        loop {
            attempt += 1;
            if !self.keep_owned(&mut records) {
                return;
            }
            self.stats.invoked(records.len());
            let event = self.source.event_source().event(&name, &records);
            let every_record = |records: &[SourceRecord]| -> Vec<RecordId> {
                records.iter().map(|r| r.id.clone()).collect()
            };
            let invoked_at = now_millis();
            let answer = self.function.invoke(event).await;
            self.stats.invocation.record(invoked_at);
            let (failed, reason) = match answer {
                Ok(response) => match failed_records(&response, &records) {
                    Some(failed) => (failed, format!("{name} reported the record as failed")),
                    None => (
                        every_record(&records),
                        "batch item failure naming no record of the batch".to_string(),
                    ),
                },
                Err(error) => {
                    self.stats
                        .failed_invocations
                        .fetch_add(1, Ordering::Relaxed);
                    (every_record(&records), format!("{name} failed: {error}"))
                }
            };
            // Per partition, the lowest failed record: retried from there, done before it.
            let mut lowest: BTreeMap<&str, &RecordId> = BTreeMap::new();
            for record in &records {
                if failed.contains(&record.id) {
                    let entry = lowest
                        .entry(record.partition.as_str())
                        .or_insert(&record.id);
                    if record.id < **entry {
                        *entry = &record.id;
                    }
                }
            }
            let done: Vec<&SourceRecord> = records
                .iter()
                .filter(|r| {
                    lowest
                        .get(r.partition.as_str())
                        .is_none_or(|low| r.id < **low)
                })
                .collect();
            self.checkpoint(&done).await;
            if failed.is_empty() {
                return;
            }
            let lowest: BTreeMap<String, RecordId> = lowest
                .into_iter()
                .map(|(partition, id)| (partition.to_string(), id.clone()))
                .collect();
            records.retain(|r| lowest.get(&r.partition).is_some_and(|low| r.id >= *low));
            if attempt > self.config.max_retries {
                if !self.keep_owned(&mut records) {
                    return;
                }
                let failed: HashSet<RecordId> = failed.into_iter().collect();
                self.dead_letter(
                    &records,
                    &failed,
                    &format!("{reason} on all {attempt} attempts"),
                    attempt,
                )
                .await;
                return;
            }
            MappingStats::add(&self.stats.retried_records, records.len());
            tracing::warn!(function = %name, source = self.source.describe(), attempt, retrying = records.len(), %reason, "retrying from the lowest failed record");
            tokio::time::sleep(self.config.retry_delay(attempt)).await;
        }
    }

    /// Lets go of the records of partitions this reader no longer owns (their new owner reads
    /// them again from the committed offset); whether any are left to deliver.
    fn keep_owned(&self, records: &mut Vec<SourceRecord>) -> bool {
        let partitions: BTreeSet<&str> = records.iter().map(|r| r.partition.as_str()).collect();
        let released = self.source.released(&partitions);
        if released.is_empty() {
            return !records.is_empty();
        }
        let before = records.len();
        records.retain(|r| !released.contains(&r.partition));
        if records.len() < before {
            tracing::info!(function = self.function.name(), source = self.source.describe(), released = before - records.len(), "a rebalance moved partitions away; their new owner delivers them from the committed offset");
        }
        !records.is_empty()
    }

    /// Moves the checkpoint past `done` (the last of each partition counts). A failed
    /// checkpoint means the records are read again, by handlers that are idempotent.
    async fn checkpoint(&self, done: &[&SourceRecord]) {
        let mut last: BTreeMap<&str, &RecordId> = BTreeMap::new();
        for record in done {
            let entry = last.entry(record.partition.as_str()).or_insert(&record.id);
            if record.id > **entry {
                *entry = &record.id;
            }
        }
        if last.is_empty() {
            return;
        }
        let through: Vec<RecordId> = last.into_values().cloned().collect();
        if let Err(error) = self.source.checkpoint(&through).await {
            self.stats.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = self.function.name(), source = self.source.describe(), %error, "checkpoint failed; the records may be delivered again");
        }
    }

    /// Sends the records the mapping cannot get past to the dead-letter sink, then checkpoints
    /// past them. Until the sink takes them, the checkpoint stays where it is.
    async fn dead_letter(
        &mut self,
        records: &[SourceRecord],
        failed: &HashSet<RecordId>,
        reason: &str,
        attempts: u32,
    ) {
        let name = self.function.name().to_string();
        let letters: Vec<DeadLetter> = records
            .iter()
            .map(|r| DeadLetter {
                function: name.clone(),
                record_id: r.id.to_string(),
                partition_key: r.partition_key.clone(),
                data: r.data.to_vec(),
                arrived_at: Some(r.arrival),
                error_kind: ErrorKind::Transient,
                reason: if failed.contains(&r.id) {
                    reason.to_string()
                } else {
                    format!("behind a failed record of its partition ({reason})")
                },
                attempts,
                failed_at: now_millis(),
            })
            .collect();
        let mut sends: u32 = 0;
        loop {
            sends += 1;
            match self.dead_letters.send(letters.clone()).await {
                Ok(()) => break,
                Err(error) => {
                    self.stats
                        .dead_letter_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(function = %name, source = self.source.describe(), %error, records = letters.len(), "the dead-letter sink failed; the checkpoint stays before the records");
                    let stop = tokio::select! {
                        _ = tokio::time::sleep(self.config.retry_delay(sends)) => false,
                        _ = self.shutdown.wait_for(|stop| *stop) => true,
                    };
                    if stop {
                        return;
                    }
                }
            }
        }
        MappingStats::add(&self.stats.dead_lettered, letters.len());
        tracing::error!(function = %name, source = self.source.describe(), records = letters.len(), %reason, "retries exhausted; records sent to dead letters");
        let done: Vec<&SourceRecord> = records.iter().collect();
        self.checkpoint(&done).await;
    }

    async fn report_expired(&self, count: u64) {
        let name = self.function.name();
        let letter = DeadLetter {
            function: name.to_string(),
            record_id: String::new(),
            partition_key: String::new(),
            data: Vec::new(),
            arrived_at: None,
            error_kind: ErrorKind::Transient,
            reason: format!(
                "{count} records of {} expired from the stream's retention before {name} read them",
                self.source.describe()
            ),
            attempts: 0,
            failed_at: now_millis(),
        };
        tracing::error!(
            function = name,
            source = self.source.describe(),
            count,
            "records expired before processing"
        );
        self.stats.dead_lettered.fetch_add(count, Ordering::Relaxed);
        if let Err(error) = self.dead_letters.send(vec![letter]).await {
            tracing::error!(function = name, %error, "dead-letter sink failed");
        }
    }
}

#[cfg(test)]
mod tests;
