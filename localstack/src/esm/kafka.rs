//! A Kafka topic read as Lambda's self-managed Kafka trigger reads it: one consumer group per
//! stream function (`PREFIX-FUNCTION`) with one consumer, and one mapping loop, per partition;
//! offsets committed by hand only for what is done, so a runner killed mid-batch has its
//! uncommitted records delivered again to idempotent handlers.

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use geostream_kafka::rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use geostream_kafka::rdkafka::message::Message;
use geostream_kafka::rdkafka::{Offset, TopicPartitionList};
use geostream_kafka::KafkaSettings;
use geostream_shared::stream::RecordId;

use super::event::EventSource;
use super::{Source, SourceRead, SourceRecord};

/// Group membership settings: the broker notices a dead runner after `session.timeout.ms`,
/// and a join takes about half of it on Tansu, so it is kept short.
const SESSION_TIMEOUT_MS: &str = "6000";
const HEARTBEAT_INTERVAL_MS: &str = "500";

/// How long the broker may hold a fetch (librdkafka's default is 500 ms). A broker that holds
/// every fetch for the whole wait instead of answering when a record comes (Tansu does) makes
/// it the records' age: at 10,000 readings/s, 500 ms gave POST-to-position p50 203 ms and p99
/// 387 ms, 50 ms gave 55 ms and 165 ms, 10 ms 56 ms and 148 ms but twice the POST latency (the
/// fetches' load on a 2-core machine). docs/performance.md has the runs.
const FETCH_WAIT_MAX_MS: &str = "50";

/// After the first record of a read, how long to gather what else is there: a burst becomes
/// one batch rather than many.
const GATHER: Duration = Duration::from_millis(5);

/// A consumer group's view of a topic: every partition the group gives this consumer.
pub struct KafkaTopic {
    consumer: StreamConsumer,
    describe: String,
    event_source: EventSource,
}

impl KafkaTopic {
    /// Joins `group` on `topic`.
    pub fn subscribe(settings: &KafkaSettings, topic: &str, group: &str) -> Result<Self, String> {
        let consumer: StreamConsumer = settings
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
            .set("heartbeat.interval.ms", HEARTBEAT_INTERVAL_MS)
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
            .create()
            .map_err(|e| format!("cannot create the Kafka consumer of {group}: {e}"))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| format!("{group} cannot subscribe to {topic}: {e}"))?;
        Ok(KafkaTopic {
            consumer,
            describe: format!("{topic} (group {group})"),
            event_source: EventSource::InProcess,
        })
    }

    /// How many partitions `topic` has: a group gets one consumer per partition, so that each
    /// partition is read by its own loop (as a Kinesis mapping reads each shard), and one
    /// partition's slow batch does not hold up the others'.
    pub async fn partition_count(settings: &KafkaSettings, topic: &str) -> Result<usize, String> {
        let settings = settings.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: geostream_kafka::rdkafka::consumer::BaseConsumer = settings
                .client_config()
                .create()
                .map_err(|e| format!("cannot create a Kafka client: {e}"))?;
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| format!("reading the metadata of {topic}: {e}"))?;
            metadata
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("topic {topic} has no partitions"))
        })
        .await
        .map_err(|e| format!("reading a Kafka topic's metadata: {e}"))?
    }

    async fn receive(&self) -> Result<SourceRecord, String> {
        let message = self.consumer.recv().await.map_err(|e| e.to_string())?;
        let topic = message.topic().to_string();
        let partition = message.partition();
        Ok(SourceRecord {
            partition: format!("{topic}-{partition}"),
            id: RecordId::kafka(topic, partition, message.offset()),
            partition_key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            data: bytes::Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            arrival: message.timestamp().to_millis().unwrap_or(0),
            decoded: None,
        })
    }
}

#[async_trait]
impl Source for KafkaTopic {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn event_source(&self) -> &EventSource {
        &self.event_source
    }

    async fn read(&self, max: usize, wait: Duration) -> Result<SourceRead, String> {
        let first = if wait.is_zero() {
            tokio::time::timeout(GATHER, self.receive()).await
        } else {
            tokio::time::timeout(wait, self.receive()).await
        };
        let mut records = match first {
            Ok(record) => vec![record?],
            Err(_) => return Ok(SourceRead::default()),
        };
        let deadline = tokio::time::Instant::now() + GATHER;
        while records.len() < max {
            match tokio::time::timeout_at(deadline, self.receive()).await {
                Ok(Ok(record)) => records.push(record),
                Ok(Err(error)) => {
                    tracing::warn!(source = %self.describe, %error, "reading the topic failed");
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(SourceRead {
            records,
            expired: 0,
        })
    }

    /// Commits, per partition, the offset after the last record done with.
    async fn checkpoint(&self, through: &[RecordId]) -> Result<(), String> {
        let mut offsets = TopicPartitionList::new();
        for id in through {
            let RecordId::Kafka {
                topic,
                partition,
                offset,
            } = id
            else {
                return Err(format!("{id} is not a record of {}", self.describe));
            };
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(offset + 1))
                .map_err(|e| format!("{id}: {e}"))?;
        }
        // Queued, not awaited: librdkafka sends the commit from its own thread, so the next
        // batch is not held up by a broker round trip (a synchronous commit also blocked a
        // runtime thread for it). A commit that fails or is lost (a rebalance moved the
        // partition away, the runner stopped first) means the records are delivered again,
        // to idempotent handlers.
        self.consumer
            .commit(&offsets, CommitMode::Async)
            .map_err(|e| format!("committing {}: {e}", self.describe))
    }

    fn backlog(&self) -> Option<u64> {
        None
    }

    /// The partitions (`topic-partition`) the group no longer assigns to this consumer. When
    /// the assignment cannot be read, none are released: a duplicate delivery is harmless to
    /// idempotent handlers, a dropped one is not.
    fn released(&self, partitions: &BTreeSet<&str>) -> BTreeSet<String> {
        let Ok(assigned) = self.consumer.assignment() else {
            return BTreeSet::new();
        };
        let assigned: BTreeSet<String> = assigned
            .elements()
            .iter()
            .map(|e| format!("{}-{}", e.topic(), e.partition()))
            .collect();
        partitions
            .iter()
            .filter(|p| !assigned.contains(**p))
            .map(|p| p.to_string())
            .collect()
    }

    fn sees_stream_end(&self) -> bool {
        false
    }

    fn close(&self) {
        self.consumer.unsubscribe();
    }

    fn ready(&self) -> bool {
        self.consumer
            .assignment()
            .is_ok_and(|assigned| assigned.count() > 0)
    }
}
