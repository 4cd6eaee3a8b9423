//! A Kinesis stream read shard by shard with GetShardIterator and GetRecords, as Lambda's
//! poller does without enhanced fan-out. Idle shards are polled every 250 ms, under Kinesis's
//! five GetRecords calls per second and shard. After a reshard, a child shard is read only once
//! its parents are read to their end and done with, as Lambda does, so a device's records
//! (which move to a child with their hash key) keep their order across the split or merge.

use std::collections::HashSet;
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
    /// A read found nothing after `last_read` on a closed shard (or Kinesis ended the shard's
    /// iterators): nothing more will come.
    read_to_end: bool,
}

/// One shard of a Kinesis stream.
pub struct KinesisShard {
    client: aws_sdk_kinesis::Client,
    stream: String,
    shard_id: String,
    describe: String,
    event_source: EventSource,
    cursor: Mutex<Cursor>,
    /// The shard was closed by a split or merge when it was listed: it has an end.
    closed: bool,
    /// The shards this one was split or merged from, among those listed.
    parents: Vec<String>,
    /// The shards of the stream read to their end and done with.
    finished: Arc<Mutex<HashSet<String>>>,
}

/// A source per shard of `stream`. The shard set is taken as it is listed at start: a reshard
/// while the runner lives is read from when it starts again (records stay on the stream for
/// its retention).
pub async fn shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<Arc<dyn Source>>, String> {
    let mut listed = Vec::new();
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
        listed.extend(output.shards().iter().map(|shard| {
            let parents: Vec<String> = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect();
            let closed = shard
                .sequence_number_range()
                .is_some_and(|range| range.ending_sequence_number().is_some());
            (shard.shard_id().to_string(), parents, closed)
        }));
        match output.next_token() {
            Some(token) => next_token = Some(token.to_string()),
            None => break,
        }
    }
    let stream_arn = format!("arn:aws:kinesis:local:000000000000:stream/{stream}");
    let ids: HashSet<String> = listed.iter().map(|(id, _, _)| id.clone()).collect();
    let finished = Arc::new(Mutex::new(HashSet::new()));
    Ok(listed
        .into_iter()
        .map(|(shard_id, parents, closed)| {
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
                closed,
                // A parent past the stream's retention is no longer listed: nothing to wait for.
                parents: parents.into_iter().filter(|p| ids.contains(p)).collect(),
                finished: finished.clone(),
            }) as Arc<dyn Source>
        })
        .collect())
}

impl KinesisShard {
    fn cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finished(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.finished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this shard may be read: every parent read to its end and done with.
    fn parents_finished(&self) -> bool {
        let finished = self.finished();
        self.parents.iter().all(|parent| finished.contains(parent))
    }

    /// Whether this shard is read to its end and everything read is done with; the first time
    /// it is, its children may start.
    fn finish_if_done(&self) -> bool {
        let cursor = self.cursor();
        let done = cursor.read_to_end && cursor.checkpoint == cursor.last_read;
        if done {
            self.finished().insert(self.shard_id.clone());
        }
        done
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
        if !self.parents_finished() || self.finish_if_done() {
            tokio::time::sleep(wait).await;
            return Ok(SourceRead::default());
        }
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
            let mut records: Vec<SourceRecord> = output
                .records()
                .iter()
                .map(|r| SourceRecord {
                    id: RecordId::kinesis(r.sequence_number()),
                    partition: self.shard_id.clone(),
                    partition_key: r.partition_key().unwrap_or_default().to_string(),
                    data: r.data().as_ref().to_vec().into(),
                    arrival: r
                        .approximate_arrival_timestamp()
                        .map_or(0, |t| t.to_millis().unwrap_or(0)),
                    decoded: None,
                })
                .collect();
            let next = output.next_shard_iterator().map(str::to_string);
            {
                let mut cursor = self.cursor();
                // Kinesis never returns a record twice along a chain of iterators; kinesis-mock
                // (LocalStack) at times hands out a next iterator that starts before what it
                // just returned, again and again. A record at or before the last one read is
                // such a repeat: delivering it would invoke every function again.
                if let Some(last) = &cursor.last_read {
                    let before = records.len();
                    records.retain(|r| matches!(&r.id, RecordId::Kinesis(s) if s > last));
                    if records.len() < before {
                        tracing::debug!(source = %self.describe, repeated = before - records.len(), "the stream returned records already read; skipped");
                    }
                }
                if let Some(RecordId::Kinesis(last)) = records.last().map(|r| &r.id) {
                    cursor.last_read = Some(last.clone());
                }
                cursor.iterator = next.clone();
                cursor.millis_behind_latest = output.millis_behind_latest();
                // Kinesis ends a closed shard's iterators after its last record; an emulator
                // may not, and a closed shard with nothing more, not behind, is at its end too.
                cursor.read_to_end |= next.is_none()
                    || (self.closed
                        && records.is_empty()
                        && cursor.millis_behind_latest == Some(0));
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
        (cursor.checkpoint == cursor.last_read
            && (cursor.read_to_end || cursor.millis_behind_latest == Some(0)))
        .then_some(0)
    }

    fn sees_stream_end(&self) -> bool {
        true
    }
}
