//! Where the event-source-mapping loops read records from: the in-memory stream (embedded
//! backend) or a Kinesis stream through GetShardIterator/GetRecords (AWS backend).

use std::cmp::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::types::ShardIteratorType;
use geostream_shared::memory::{format_sequence, parse_sequence, MemoryStream};
use geostream_shared::EpochMillis;

/// A record as a stream function receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub sequence: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub arrival: EpochMillis,
}

/// What one read returned.
#[derive(Debug, Default)]
pub struct SourceRead {
    pub records: Vec<SourceRecord>,
    /// Records that expired from the stream before they were read (memory stream only; Kinesis
    /// does not say how many it trimmed).
    pub expired: u64,
}

/// Kinesis sequence numbers are decimal strings of up to 128 bits: compare them as numbers.
pub fn compare_sequences(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[async_trait]
pub trait ShardSource: Send + Sync {
    fn stream_name(&self) -> &str;
    fn shard_ids(&self) -> &[String];
    /// Records of `shard` after sequence `after` (from the oldest kept when `None`), at most
    /// `max`, waiting up to `wait` for the first to arrive.
    async fn read(
        &self,
        shard: usize,
        after: Option<&str>,
        max: usize,
        wait: Duration,
    ) -> Result<SourceRead, String>;
    /// How many records `shard` holds after `after`, when the source can tell.
    fn backlog(&self, shard: usize, after: Option<&str>) -> Option<u64>;
}

/// The embedded backend's in-memory stream.
pub struct MemorySource {
    stream: Arc<MemoryStream>,
    shard_ids: Vec<String>,
}

impl MemorySource {
    pub fn new(stream: Arc<MemoryStream>) -> Self {
        let shard_ids = (0..stream.shard_count())
            .map(MemoryStream::shard_id)
            .collect();
        MemorySource { stream, shard_ids }
    }

    fn next_sequence(after: Option<&str>) -> u64 {
        after.and_then(parse_sequence).map_or(1, |s| s + 1)
    }
}

#[async_trait]
impl ShardSource for MemorySource {
    fn stream_name(&self) -> &str {
        self.stream.name()
    }

    fn shard_ids(&self) -> &[String] {
        &self.shard_ids
    }

    async fn read(
        &self,
        shard: usize,
        after: Option<&str>,
        max: usize,
        wait: Duration,
    ) -> Result<SourceRead, String> {
        let next = Self::next_sequence(after);
        let mut tip = self
            .stream
            .subscribe(shard)
            .ok_or_else(|| format!("no shard {shard}"))?;
        if *tip.borrow_and_update() < next && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, tip.wait_for(|newest| *newest >= next)).await;
        }
        let read = self.stream.read(shard, next, max);
        Ok(SourceRead {
            records: read
                .records
                .into_iter()
                .map(|r| SourceRecord {
                    sequence: format_sequence(r.sequence),
                    partition_key: r.partition_key,
                    data: r.data,
                    arrival: r.arrival,
                })
                .collect(),
            expired: read.expired,
        })
    }

    fn backlog(&self, shard: usize, after: Option<&str>) -> Option<u64> {
        let tip = *self.stream.tips().get(shard)?;
        Some((tip + 1).saturating_sub(Self::next_sequence(after)))
    }
}

/// Per-shard reading position on Kinesis: the iterator continues from `after`.
#[derive(Default)]
struct KinesisCursor {
    after: Option<String>,
    iterator: Option<String>,
    millis_behind_latest: Option<i64>,
}

/// A Kinesis stream read with GetShardIterator and GetRecords, as Lambda's poller does
/// (without enhanced fan-out). Idle shards are polled every 250 ms, under Kinesis's five
/// GetRecords calls per second and shard.
pub struct KinesisSource {
    client: aws_sdk_kinesis::Client,
    stream: String,
    shard_ids: Vec<String>,
    cursors: Vec<Mutex<KinesisCursor>>,
}

const IDLE_POLL: Duration = Duration::from_millis(250);

impl KinesisSource {
    /// Lists the stream's shards (the shard set is taken as fixed while the runner lives).
    pub async fn new(
        client: aws_sdk_kinesis::Client,
        stream: impl Into<String>,
    ) -> Result<Self, String> {
        let stream = stream.into();
        let mut shard_ids = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let mut request = client.list_shards();
            request = match next_token.take() {
                Some(token) => request.next_token(token),
                None => request.stream_name(&stream),
            };
            let output = request.send().await.map_err(|e| {
                format!(
                    "ListShards {stream}: {}",
                    aws_sdk_kinesis::error::DisplayErrorContext(&e)
                )
            })?;
            shard_ids.extend(output.shards().iter().map(|s| s.shard_id().to_string()));
            match output.next_token() {
                Some(token) => next_token = Some(token.to_string()),
                None => break,
            }
        }
        let cursors = shard_ids
            .iter()
            .map(|_| Mutex::new(KinesisCursor::default()))
            .collect();
        Ok(KinesisSource {
            client,
            stream,
            shard_ids,
            cursors,
        })
    }

    async fn iterator(&self, shard: usize, after: Option<&str>) -> Result<String, String> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard_ids[shard]);
        let request = match after {
            Some(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let output = request.send().await.map_err(|e| {
            format!(
                "GetShardIterator {}: {}",
                self.stream,
                aws_sdk_kinesis::error::DisplayErrorContext(&e)
            )
        })?;
        output.shard_iterator().map(str::to_string).ok_or_else(|| {
            format!(
                "GetShardIterator {}: no iterator (shard closed?)",
                self.stream
            )
        })
    }
}

#[async_trait]
impl ShardSource for KinesisSource {
    fn stream_name(&self) -> &str {
        &self.stream
    }

    fn shard_ids(&self) -> &[String] {
        &self.shard_ids
    }

    async fn read(
        &self,
        shard: usize,
        after: Option<&str>,
        max: usize,
        wait: Duration,
    ) -> Result<SourceRead, String> {
        let cursor = self
            .cursors
            .get(shard)
            .ok_or_else(|| format!("no shard {shard}"))?;
        let stored = {
            let cursor = cursor.lock().unwrap_or_else(|p| p.into_inner());
            (cursor.after.as_deref() == after)
                .then(|| cursor.iterator.clone())
                .flatten()
        };
        let mut iterator = match stored {
            Some(iterator) => iterator,
            None => self.iterator(shard, after).await?,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let output = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(max.clamp(1, 10_000) as i32)
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "GetRecords {}: {}",
                        self.stream,
                        aws_sdk_kinesis::error::DisplayErrorContext(&e)
                    )
                })?;
            let records: Vec<SourceRecord> = output
                .records()
                .iter()
                .map(|r| SourceRecord {
                    sequence: r.sequence_number().to_string(),
                    partition_key: r.partition_key().unwrap_or_default().to_string(),
                    data: r.data().as_ref().to_vec(),
                    arrival: r
                        .approximate_arrival_timestamp()
                        .map_or(0, |t| t.to_millis().unwrap_or(0)),
                })
                .collect();
            let next = output.next_shard_iterator().map(str::to_string);
            {
                let mut cursor = cursor.lock().unwrap_or_else(|p| p.into_inner());
                cursor.after = records
                    .last()
                    .map(|r| r.sequence.clone())
                    .or_else(|| after.map(str::to_string));
                cursor.iterator = next.clone();
                cursor.millis_behind_latest = output.millis_behind_latest();
            }
            if !records.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(SourceRead {
                    records,
                    expired: 0,
                });
            }
            let Some(next) = next else {
                return Ok(SourceRead::default());
            };
            iterator = next;
            tokio::time::sleep(
                IDLE_POLL.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
        }
    }

    /// Kinesis tells how far behind (in time) a reader is, not how many records: zero when the
    /// last read reached the tip and everything read was delivered, unknown otherwise.
    fn backlog(&self, shard: usize, after: Option<&str>) -> Option<u64> {
        let cursor = self
            .cursors
            .get(shard)?
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (cursor.after.as_deref() == after && cursor.millis_behind_latest == Some(0)).then_some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_compare_as_numbers() {
        assert_eq!(compare_sequences("9", "10"), Ordering::Less);
        assert_eq!(
            compare_sequences("00000000000000000010", "10"),
            Ordering::Equal
        );
        assert_eq!(
            compare_sequences(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692538361571095921575989136588899"
            ),
            Ordering::Less
        );
    }
}
