//! The embedded backend's in-memory stream, read shard by shard as Kinesis is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use geostream_shared::memory::{format_sequence, MemoryStream};
use geostream_shared::stream::RecordId;

use super::event::EventSource;
use super::{Source, SourceRead, SourceRecord};

/// One shard of the in-memory stream. Sequence numbers start at 1.
pub struct MemoryShard {
    stream: Arc<MemoryStream>,
    shard: usize,
    shard_id: String,
    describe: String,
    event_source: EventSource,
    /// The next sequence number to read.
    next_read: AtomicU64,
    /// The first sequence number not yet done with, registered with the stream (which drops
    /// what every reader is done with).
    next_undone: Arc<AtomicU64>,
}

impl MemoryShard {
    /// A source per shard of `stream`.
    pub fn all(stream: &Arc<MemoryStream>) -> Vec<Arc<dyn Source>> {
        (0..stream.shard_count())
            .map(|shard| {
                let shard_id = MemoryStream::shard_id(shard);
                Arc::new(MemoryShard {
                    stream: stream.clone(),
                    shard,
                    describe: format!("{}/{shard_id}", stream.name()),
                    event_source: EventSource::InProcess,
                    shard_id,
                    next_read: AtomicU64::new(1),
                    next_undone: stream.register_reader(shard),
                }) as Arc<dyn Source>
            })
            .collect()
    }
}

#[async_trait]
impl Source for MemoryShard {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn event_source(&self) -> &EventSource {
        &self.event_source
    }

    async fn read(&self, max: usize, wait: Duration) -> Result<SourceRead, String> {
        let next = self.next_read.load(Ordering::Acquire);
        let mut tip = self
            .stream
            .subscribe(self.shard)
            .ok_or_else(|| format!("no shard {}", self.shard))?;
        if *tip.borrow_and_update() < next && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, tip.wait_for(|newest| *newest >= next)).await;
        }
        let read = self.stream.read(self.shard, next, max);
        if let Some(last) = read.records.last() {
            self.next_read.store(last.sequence + 1, Ordering::Release);
        }
        Ok(SourceRead {
            records: read
                .records
                .into_iter()
                .map(|r| SourceRecord {
                    id: RecordId::kinesis(format_sequence(r.sequence)),
                    partition: self.shard_id.clone(),
                    partition_key: r.partition_key,
                    data: r.data,
                    arrival: r.arrival,
                    decoded: r.decoded,
                })
                .collect(),
            expired: read.expired,
        })
    }

    async fn checkpoint(&self, through: &[RecordId]) -> Result<(), String> {
        for id in through {
            let sequence = match id {
                RecordId::Kinesis(sequence) => sequence.as_str().parse::<u64>().ok(),
                RecordId::Kafka { .. } => None,
            }
            .ok_or_else(|| format!("{id} is not a record of {}", self.describe))?;
            self.next_undone.fetch_max(sequence + 1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn backlog(&self) -> Option<u64> {
        let tip = *self.stream.tips().get(self.shard)?;
        Some((tip + 1).saturating_sub(self.next_undone.load(Ordering::Acquire)))
    }

    fn sees_stream_end(&self) -> bool {
        true
    }
}
