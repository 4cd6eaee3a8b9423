//! A Kinesis stream read shard by shard with GetShardIterator and GetRecords, as Lambda's
//! poller does without enhanced fan-out. Idle shards are polled every 250 ms, under Kinesis's
//! five GetRecords calls per second and shard.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::types::ShardIteratorType;
use geostream_shared::stream::{RecordId, SequenceNumber};

use super::event::EventSource;
use super::{Source, SourceRead, SourceRecord};

const IDLE_POLL: Duration = Duration::from_millis(250);

/// Where a shard reader is.
#[derive(Default)]
struct Cursor {
    /// The last record returned by a read.
    last_read: Option<SequenceNumber>,
    /// The iterator that continues after `last_read`; none until the first read, or after an
    /// error (a fresh one is asked for then).
    iterator: Option<String>,
    /// The last record done with.
    checkpoint: Option<SequenceNumber>,
    millis_behind_latest: Option<i64>,
}

/// One shard of a Kinesis stream.
pub struct KinesisShard {
    client: aws_sdk_kinesis::Client,
    stream: String,
    shard_id: String,
    describe: String,
    event_source: EventSource,
    cursor: Mutex<Cursor>,
}

/// A source per shard of `stream` (the shard set is taken as fixed while the runner lives).
pub async fn shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<Arc<dyn Source>>, String> {
    let mut shard_ids = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let request = match next_token.take() {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
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
    let stream_arn = format!("arn:aws:kinesis:local:000000000000:stream/{stream}");
    Ok(shard_ids
        .into_iter()
        .map(|shard_id| {
            Arc::new(KinesisShard {
                client: client.clone(),
                stream: stream.to_string(),
                describe: format!("{stream}/{shard_id}"),
                event_source: EventSource::Kinesis {
                    stream_arn: stream_arn.clone(),
                    shard_id: shard_id.clone(),
                },
                shard_id,
                cursor: Mutex::new(Cursor::default()),
            }) as Arc<dyn Source>
        })
        .collect())
}

impl KinesisShard {
    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn iterator(&self, after: Option<&SequenceNumber>) -> Result<String, String> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(&self.shard_id);
        let request = match after {
            Some(sequence) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence.as_str()),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let output = request.send().await.map_err(|e| {
            format!(
                "GetShardIterator {}: {}",
                self.describe,
                aws_sdk_kinesis::error::DisplayErrorContext(&e)
            )
        })?;
        output.shard_iterator().map(str::to_string).ok_or_else(|| {
            format!(
                "GetShardIterator {}: no iterator (shard closed?)",
                self.describe
            )
        })
    }
}

#[async_trait]
impl Source for KinesisShard {
    fn describe(&self) -> &str {
        &self.describe
    }

    fn event_source(&self) -> &EventSource {
        &self.event_source
    }

    async fn read(&self, max: usize, wait: Duration) -> Result<SourceRead, String> {
        let (stored, last_read) = {
            let cursor = self.cursor();
            (cursor.iterator.clone(), cursor.last_read.clone())
        };
        let mut iterator = match stored {
            Some(iterator) => iterator,
            None => self.iterator(last_read.as_ref()).await?,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let output = self
                .client
                .get_records()
                .shard_iterator(&iterator)
                .limit(max.clamp(1, 10_000) as i32)
                .send()
                .await;
            let output = match output {
                Ok(output) => output,
                Err(error) => {
                    // An expired or rejected iterator: the next read asks for a fresh one.
                    self.cursor().iterator = None;
                    return Err(format!(
                        "GetRecords {}: {}",
                        self.describe,
                        aws_sdk_kinesis::error::DisplayErrorContext(&error)
                    ));
                }
            };
            let records: Vec<SourceRecord> = output
                .records()
                .iter()
                .map(|r| SourceRecord {
                    id: RecordId::kinesis(r.sequence_number()),
                    partition: self.shard_id.clone(),
                    partition_key: r.partition_key().unwrap_or_default().to_string(),
                    data: r.data().as_ref().to_vec(),
                    arrival: r
                        .approximate_arrival_timestamp()
                        .map_or(0, |t| t.to_millis().unwrap_or(0)),
                })
                .collect();
            let next = output.next_shard_iterator().map(str::to_string);
            {
                let mut cursor = self.cursor();
                if let Some(RecordId::Kinesis(last)) = records.last().map(|r| &r.id) {
                    cursor.last_read = Some(last.clone());
                }
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

    async fn checkpoint(&self, through: &[RecordId]) -> Result<(), String> {
        let mut cursor = self.cursor();
        for id in through {
            let RecordId::Kinesis(sequence) = id else {
                return Err(format!("{id} is not a record of {}", self.describe));
            };
            if cursor.checkpoint.as_ref().is_none_or(|c| sequence > c) {
                cursor.checkpoint = Some(sequence.clone());
            }
        }
        Ok(())
    }

    /// Kinesis tells how far behind (in time) a reader is, not how many records: zero when the
    /// last read reached the tip and everything read was done with, unknown otherwise.
    fn backlog(&self) -> Option<u64> {
        let cursor = self.cursor();
        (cursor.checkpoint == cursor.last_read && cursor.millis_behind_latest == Some(0))
            .then_some(0)
    }

    fn sees_stream_end(&self) -> bool {
        true
    }
}
