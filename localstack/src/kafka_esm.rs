//! The Kafka event-source-mapping loop: what Lambda's self-managed Kafka trigger does between a
//! topic and a function.
//!
//! One consumer group per stream function (`PREFIX-FUNCTION`), offsets committed by hand: a
//! batch of up to `batch_size` records (within the batching window) becomes a real `KafkaEvent`
//! (records grouped by "topic-partition", base64 keys and values); the function answers with
//! the offset to resume from per failed partition. Offsets are committed only for what is done:
//! the whole batch, or the successful prefix of each failed partition, whose rest is retried
//! with backoff up to `max_retries` times and then dead-lettered (and committed past). A runner
//! killed mid-batch therefore redelivers at most its uncommitted batch, which the idempotent
//! handlers absorb.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::kafka::{KafkaEvent, KafkaRecord};
use base64::Engine;
use chrono::TimeZone;
use geostream_kafka::rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use geostream_kafka::rdkafka::message::{Message, OwnedMessage};
use geostream_kafka::rdkafka::{Offset, TopicPartitionList};
use geostream_kafka::KafkaSettings;
use geostream_lambda::stream::{handle_kafka, KafkaBatchResponse};
use geostream_shared::metrics::MetricsSink;
use geostream_shared::now_millis;
use geostream_shared::ports::{DeadLetter, DeadLetterSink};
use geostream_shared::stream::StreamFunction;
use tokio::sync::watch;

use crate::esm::{MappingConfig, MappingStats};

/// Group membership settings: the broker notices a dead runner after `session.timeout.ms`,
/// and a join takes about half of it on Tansu, so it is kept short.
const SESSION_TIMEOUT_MS: &str = "6000";
const HEARTBEAT_INTERVAL_MS: &str = "500";

/// Starts the consumer loop of one stream function; it stops when `shutdown` turns true, after
/// the batch in flight.
#[allow(clippy::too_many_arguments)]
pub fn start_kafka_mapping(
    function: Arc<dyn StreamFunction>,
    metrics: Arc<dyn MetricsSink>,
    settings: &KafkaSettings,
    topic: &str,
    group: &str,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<MappingStats>, tokio::task::JoinHandle<()>), String> {
    let consumer: StreamConsumer = settings
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS)
        .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("cannot create the Kafka consumer of {group}: {e}"))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| format!("{group} cannot subscribe to {topic}: {e}"))?;
    let stats = Arc::new(MappingStats::default());
    let mapping = KafkaMapping {
        function,
        metrics,
        consumer,
        bootstrap_servers: settings.bootstrap_servers.clone(),
        config,
        dead_letters,
        stats: stats.clone(),
    };
    Ok((stats, tokio::spawn(mapping.run(shutdown))))
}

struct KafkaMapping {
    function: Arc<dyn StreamFunction>,
    metrics: Arc<dyn MetricsSink>,
    consumer: StreamConsumer,
    bootstrap_servers: String,
    config: MappingConfig,
    dead_letters: Arc<dyn DeadLetterSink>,
    stats: Arc<MappingStats>,
}

/// A partition's key in Lambda's event: `topic-partition`.
fn partition_key(message: &OwnedMessage) -> String {
    format!("{}-{}", message.topic(), message.partition())
}

impl KafkaMapping {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.function.name();
        while !*shutdown.borrow() {
            let first = tokio::select! {
                received = self.consumer.recv() => received,
                _ = shutdown.changed() => continue,
            };
            let first = match first {
                Ok(message) => message.detach(),
                Err(error) => {
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(function = name, %error, "reading the topic failed; retrying");
                    tokio::time::sleep(self.config.retry_backoff).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            // Gather what else is there, up to the batch size, within the batching window (at
            // least a moment, so that a burst is one batch rather than many).
            let window = self.config.batching_window.max(Duration::from_millis(5));
            let deadline = tokio::time::Instant::now() + window;
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(Ok(message)) => batch.push(message.detach()),
                    Ok(Err(error)) => {
                        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(function = name, %error, "reading the topic failed");
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.deliver(batch).await;
        }
        self.consumer.unsubscribe();
    }

    /// Invokes the function until every record succeeded or retries ran out, committing what
    /// is done as it goes.
    async fn deliver(&self, mut messages: Vec<OwnedMessage>) {
        let name = self.function.name();
        let mut attempt: u32 = 0;
        let mut backoff = self.config.retry_backoff;
        loop {
            attempt += 1;
            self.stats.invoked(messages.len());
            let event = self.kafka_event(&messages);
            let response = handle_kafka(self.function.as_ref(), event, self.metrics.as_ref()).await;
            let resume = resume_offsets(&response, &messages);
            // Commit everything before the resume points (all of it when nothing failed).
            self.commit(&messages, &resume);
            if resume.is_empty() {
                return;
            }
            messages.retain(|m| {
                resume
                    .get(&partition_key(m))
                    .is_some_and(|from| m.offset() >= *from)
            });
            if attempt > self.config.max_retries {
                self.dead_letter(&messages, attempt).await;
                self.commit(&messages, &HashMap::new());
                return;
            }
            self.stats
                .retried_records
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                function = name,
                attempt,
                retrying = messages.len(),
                "retrying the failed part of the batch"
            );
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
    }

    /// Commits, per partition of `messages`, the offset after the last message done with:
    /// before the resume point of a failed partition, after the last message otherwise.
    fn commit(&self, messages: &[OwnedMessage], resume: &HashMap<String, i64>) {
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for message in messages {
            let done_up_to = match resume.get(&partition_key(message)) {
                Some(from) => *from,
                None => message.offset() + 1,
            };
            let entry = next
                .entry((message.topic().to_string(), message.partition()))
                .or_insert(done_up_to);
            *entry = (*entry).max(done_up_to);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            if let Err(error) =
                offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            {
                tracing::warn!(%error, topic, partition, "cannot add an offset to commit");
            }
        }
        if offsets.count() == 0 {
            return;
        }
        // A failed commit (a rebalance moved the partition away) means the records are
        // delivered again, to handlers that are idempotent.
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Sync) {
            tracing::warn!(function = self.function.name(), %error, "offset commit failed; the batch may be redelivered");
        }
    }

    async fn dead_letter(&self, messages: &[OwnedMessage], attempts: u32) {
        let name = self.function.name();
        let letters: Vec<DeadLetter> = messages
            .iter()
            .map(|m| DeadLetter {
                function: name.to_string(),
                record_id: format!("{}@{}", partition_key(m), m.offset()),
                partition_key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                data: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                reason: format!("{name} reported the record as failed on all {attempts} attempts"),
                attempts,
                failed_at: now_millis(),
            })
            .collect();
        self.stats
            .dead_lettered
            .fetch_add(letters.len() as u64, Ordering::Relaxed);
        tracing::error!(
            function = name,
            records = letters.len(),
            "retries exhausted; records sent to dead letters"
        );
        if let Err(error) = self.dead_letters.send(letters).await {
            tracing::error!(function = name, %error, "dead-letter sink failed");
        }
    }

    /// The event Lambda's self-managed Kafka trigger would send.
    fn kafka_event(&self, messages: &[OwnedMessage]) -> KafkaEvent {
        let base64 = &base64::engine::general_purpose::STANDARD;
        let mut event = KafkaEvent::default();
        event.event_source = Some("SelfManagedKafka".into());
        event.bootstrap_servers = Some(self.bootstrap_servers.clone());
        for message in messages {
            let mut record = KafkaRecord::default();
            record.topic = Some(message.topic().to_string());
            record.partition = i64::from(message.partition());
            record.offset = message.offset();
            if let Some(created) = message.timestamp().to_millis() {
                if let Some(time) = chrono::Utc.timestamp_millis_opt(created).single() {
                    record.timestamp.0 = time;
                }
            }
            record.timestamp_type = Some("CREATE_TIME".into());
            record.key = message.key().map(|k| base64.encode(k));
            record.value = message.payload().map(|v| base64.encode(v));
            event
                .records
                .entry(partition_key(message))
                .or_default()
                .push(record);
        }
        event
    }
}

/// Per failed partition, the offset to resume from. A failure naming a partition or offset that
/// is not in the batch makes the whole batch fail, as Lambda treats it.
fn resume_offsets(
    response: &KafkaBatchResponse,
    messages: &[OwnedMessage],
) -> HashMap<String, i64> {
    let mut resume = HashMap::new();
    for failure in &response.batch_item_failures {
        let id = &failure.item_identifier;
        let known = messages
            .iter()
            .any(|m| partition_key(m) == id.partition && m.offset() == id.offset);
        if !known {
            tracing::warn!(partition = %id.partition, offset = id.offset, "batch item failure names no record of the batch; retrying the whole batch");
            return messages
                .iter()
                .map(|m| (partition_key(m), m.offset()))
                .fold(HashMap::new(), |mut lowest, (partition, offset)| {
                    let entry = lowest.entry(partition).or_insert(offset);
                    *entry = (*entry).min(offset);
                    lowest
                });
        }
        let entry = resume.entry(id.partition.clone()).or_insert(id.offset);
        *entry = (*entry).min(id.offset);
    }
    resume
}
