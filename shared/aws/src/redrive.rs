//! Redrive: puts what the stream functions gave up on back through the same handlers.
//!
//! Two queues hold it. The dead-letter queue holds whole records (letters, or pointers to
//! letters too large for SQS on S3), sent by the functions themselves; the stream-failures queue
//! holds what Lambda's event source mapping sends its on-failure destination once it gives up
//! on a batch: only the shard and the sequence range, so those records are read again from the
//! stream while it retains them. Either way the records go through the function they failed
//! in, grouped by function and in stream order, and a message is deleted only once every
//! record it stands for was processed (or dead-lettered anew). Every handler is idempotent, so
//! a redrive run twice changes nothing the second time.

use std::collections::BTreeMap;

use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use geostream_shared::ports::DeadLetter;
use geostream_shared::stream::{RecordId, StreamBatch, StreamFunction, StreamRecord};
use serde::{Deserialize, Serialize};

use crate::sqs::DeadLetterMessage;

/// Messages received per round: each round is sorted into stream order before it is replayed.
const ROUND_MESSAGES: usize = 10_000;
/// Records per invocation of a function during a redrive, as a mapping's batch.
const BATCH_RECORDS: usize = 100;
/// How long a received message stays hidden; one that is not deleted shows again after it.
const VISIBILITY_SECONDS: i32 = 120;

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RedriveReport {
    /// Messages read from the queues.
    pub messages: usize,
    /// Records replayed and done with, per function.
    pub replayed: BTreeMap<String, usize>,
    /// Records that failed again: their messages stay on the queue.
    pub failed_again: usize,
    /// Messages that cannot be replayed (no record in them, a function this build does not
    /// have, records gone from the stream), with why; they stay on the queue.
    pub not_replayable: Vec<String>,
    /// Messages deleted after their records were done with.
    pub deleted: usize,
    /// Letters written after the redrive started (a record refused again): left on the queue
    /// for the next redrive, so that one redrive ends.
    pub newer: usize,
}

impl RedriveReport {
    /// Adds another run's (or queue's) figures.
    pub fn add(&mut self, other: RedriveReport) {
        self.messages += other.messages;
        for (function, count) in other.replayed {
            *self.replayed.entry(function).or_default() += count;
        }
        self.failed_again += other.failed_again;
        self.not_replayable.extend(other.not_replayable);
        self.deleted += other.deleted;
        self.newer += other.newer;
    }
}

impl std::fmt::Display for RedriveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let replayed: Vec<String> = self
            .replayed
            .iter()
            .map(|(function, count)| format!("{function} {count}"))
            .collect();
        write!(
            f,
            "{} messages read, records replayed: {}, {} failed again, {} not replayable, {} messages deleted, {} newer letters left for the next redrive",
            self.messages,
            if replayed.is_empty() {
                "none".to_string()
            } else {
                replayed.join(", ")
            },
            self.failed_again,
            self.not_replayable.len(),
            self.deleted,
            self.newer
        )
    }
}

/// Lambda's on-failure record for a Kinesis event source mapping (what it sends the
/// destination when it gives up on a batch).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OnFailureRecord {
    #[serde(rename = "requestContext")]
    pub request_context: OnFailureContext,
    #[serde(rename = "KinesisBatchInfo")]
    pub kinesis_batch_info: Option<KinesisBatchInfo>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnFailureContext {
    pub function_arn: String,
    #[serde(default)]
    pub condition: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisBatchInfo {
    pub shard_id: String,
    pub start_sequence_number: String,
    pub end_sequence_number: String,
    pub stream_arn: String,
    #[serde(default)]
    pub batch_size: usize,
}

/// A message received, with what it stands for.
struct Received {
    receipt_handle: String,
    records: Vec<StreamRecord>,
}

/// Replays dead letters and on-failure batches through `functions`.
pub struct Redrive<'a> {
    pub functions: &'a [&'a dyn StreamFunction],
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub kinesis: aws_sdk_kinesis::Client,
}

impl Redrive<'_> {
    fn function(&self, name: &str) -> Option<&dyn StreamFunction> {
        self.functions.iter().copied().find(|f| f.name() == name)
    }

    /// The function an on-failure record names by ARN (`...:function:PREFIX-NAME[:qualifier]`).
    fn function_of_arn(&self, arn: &str) -> Option<&dyn StreamFunction> {
        let name = arn.split(":function:").nth(1)?.split(':').next()?;
        self.functions
            .iter()
            .copied()
            .find(|f| name == f.name() || name.ends_with(&format!("-{}", f.name())))
    }

    /// Replays every letter on the dead-letter queue at `queue_url`.
    pub async fn dead_letters(&self, queue_url: &str) -> Result<RedriveReport, String> {
        let started = geostream_shared::now_millis();
        let mut report = RedriveReport::default();
        loop {
            let messages = self.receive(queue_url).await?;
            if messages.is_empty() {
                return Ok(report);
            }
            let mut round = RedriveReport {
                messages: messages.len(),
                ..Default::default()
            };
            let mut by_function: BTreeMap<String, Vec<Received>> = BTreeMap::new();
            for (receipt_handle, body) in messages {
                match self.letter(&body).await {
                    Ok(letter) if letter.failed_at >= started => round.newer += 1,
                    Ok(letter) if letter.data.is_empty() => round.not_replayable.push(format!(
                        "{}: no record in it ({})",
                        letter.function, letter.reason
                    )),
                    Ok(letter) => by_function
                        .entry(letter.function.clone())
                        .or_default()
                        .push(Received {
                            receipt_handle,
                            records: vec![StreamRecord {
                                id: RecordId::parse(&letter.record_id),
                                partition_key: letter.partition_key,
                                data: letter.data.into(),
                                arrived_at: letter.arrived_at,
                                decoded: None,
                            }],
                        }),
                    Err(error) => round.not_replayable.push(error),
                }
            }
            for (name, received) in by_function {
                let Some(function) = self.function(&name) else {
                    round
                        .not_replayable
                        .push(format!("{name}: no such stream function"));
                    continue;
                };
                round.add(self.replay(queue_url, function, received).await?);
            }
            report.add(round);
        }
    }

    /// Replays every batch Lambda's event source mappings reported to the on-failure queue at
    /// `queue_url`, reading the records again from the stream.
    pub async fn stream_failures(&self, queue_url: &str) -> Result<RedriveReport, String> {
        let mut report = RedriveReport::default();
        loop {
            let messages = self.receive(queue_url).await?;
            if messages.is_empty() {
                return Ok(report);
            }
            let mut round = RedriveReport {
                messages: messages.len(),
                ..Default::default()
            };
            for (receipt_handle, body) in messages {
                let record: OnFailureRecord = match serde_json::from_str(&body) {
                    Ok(record) => record,
                    Err(error) => {
                        round
                            .not_replayable
                            .push(format!("not an on-failure record: {error}"));
                        continue;
                    }
                };
                let Some(function) = self.function_of_arn(&record.request_context.function_arn)
                else {
                    round.not_replayable.push(format!(
                        "{}: no such stream function",
                        record.request_context.function_arn
                    ));
                    continue;
                };
                let Some(batch) = record.kinesis_batch_info else {
                    round.not_replayable.push(format!(
                        "{}: only Kinesis batches can be read again by position (a Kafka record the function gave up on is on the dead-letter queue whole)",
                        record.request_context.function_arn
                    ));
                    continue;
                };
                match self.read_range(&batch).await {
                    Ok(records) => {
                        let received = vec![Received {
                            receipt_handle,
                            records,
                        }];
                        round.add(self.replay(queue_url, function, received).await?);
                    }
                    Err(error) => round.not_replayable.push(error),
                }
            }
            report.add(round);
        }
    }

    /// Up to a round's messages: (receipt handle, body).
    async fn receive(&self, queue_url: &str) -> Result<Vec<(String, String)>, String> {
        let mut messages = Vec::new();
        while messages.len() < ROUND_MESSAGES {
            let output = self
                .sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .visibility_timeout(VISIBILITY_SECONDS)
                .wait_time_seconds(1)
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "ReceiveMessage {queue_url}: {}",
                        aws_sdk_sqs::error::DisplayErrorContext(&e)
                    )
                })?;
            let received = output.messages();
            if received.is_empty() {
                break;
            }
            messages.extend(
                received
                    .iter()
                    .filter_map(|m| Some((m.receipt_handle()?.to_string(), m.body()?.to_string()))),
            );
        }
        Ok(messages)
    }

    /// The letter a message holds, fetched from S3 when it was spilled there.
    async fn letter(&self, body: &str) -> Result<DeadLetter, String> {
        match serde_json::from_str::<DeadLetterMessage>(body) {
            Ok(DeadLetterMessage::Letter(letter)) => Ok(letter),
            Ok(DeadLetterMessage::Spilled(pointer)) => {
                let (bucket, key) = pointer
                    .spilled_to
                    .strip_prefix("s3://")
                    .and_then(|rest| rest.split_once('/'))
                    .ok_or_else(|| format!("not an S3 location: {}", pointer.spilled_to))?;
                let object = self
                    .s3
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| {
                        format!(
                            "GetObject {}: {}",
                            pointer.spilled_to,
                            aws_sdk_s3::error::DisplayErrorContext(&e)
                        )
                    })?;
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| format!("reading {}: {e}", pointer.spilled_to))?
                    .into_bytes();
                serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{} is not a dead letter: {e}", pointer.spilled_to))
            }
            Err(error) => Err(format!("not a dead-letter message: {error}")),
        }
    }

    /// The records of a shard from `start` through `end`, read again from the stream.
    async fn read_range(&self, batch: &KinesisBatchInfo) -> Result<Vec<StreamRecord>, String> {
        let end = geostream_shared::stream::SequenceNumber::new(&batch.end_sequence_number);
        let context = |e: &dyn std::fmt::Display| {
            format!(
                "{} {} from {}: {e}",
                batch.stream_arn, batch.shard_id, batch.start_sequence_number
            )
        };
        let mut iterator = self
            .kinesis
            .get_shard_iterator()
            // By name (the ARN's last part): emulators lose an ARN-only stream in the iterator.
            .stream_name(
                batch
                    .stream_arn
                    .rsplit_once(":stream/")
                    .map_or(batch.stream_arn.as_str(), |(_, name)| name),
            )
            .shard_id(&batch.shard_id)
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(&batch.start_sequence_number)
            .send()
            .await
            .map_err(|e| context(&aws_sdk_kinesis::error::DisplayErrorContext(&e)))?
            .shard_iterator
            .ok_or_else(|| context(&"GetShardIterator answered no iterator"))?;
        let mut records = Vec::new();
        // A range is at most a batch (10,000 records); empty reads end it at the shard's tip.
        for _ in 0..1_000 {
            let output = self
                .kinesis
                .get_records()
                .shard_iterator(&iterator)
                .limit(1_000)
                .send()
                .await
                .map_err(|e| context(&aws_sdk_kinesis::error::DisplayErrorContext(&e)))?;
            let read = output.records();
            for record in read {
                let sequence =
                    geostream_shared::stream::SequenceNumber::new(record.sequence_number());
                if sequence > end {
                    return Ok(records);
                }
                let id = RecordId::Kinesis(sequence);
                // A chain of Kinesis iterators never returns a record twice; kinesis-mock
                // (LocalStack) at times does: a record at or before the last one is a repeat.
                if records
                    .last()
                    .is_some_and(|last: &StreamRecord| last.id >= id)
                {
                    continue;
                }
                records.push(StreamRecord {
                    id,
                    partition_key: record.partition_key().unwrap_or_default().to_string(),
                    data: record.data().as_ref().to_vec().into(),
                    arrived_at: record
                        .approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok()),
                    decoded: None,
                });
            }
            let caught_up = read.is_empty() && output.millis_behind_latest() == Some(0);
            match output.next_shard_iterator {
                Some(next) if !caught_up => iterator = next,
                _ => break,
            }
        }
        let start = RecordId::kinesis(&batch.start_sequence_number);
        if records.first().map(|r| &r.id) != Some(&start) {
            return Err(context(
                &"the batch's first record is no longer in the stream (past its retention?)",
            ));
        }
        Ok(records)
    }

    /// Runs the messages' records through `function` in stream order, then deletes the messages
    /// whose records all passed.
    async fn replay(
        &self,
        queue_url: &str,
        function: &dyn StreamFunction,
        received: Vec<Received>,
    ) -> Result<RedriveReport, String> {
        let mut report = RedriveReport::default();
        let mut records: Vec<(usize, StreamRecord)> = received
            .iter()
            .enumerate()
            .flat_map(|(message, r)| {
                r.records
                    .iter()
                    .cloned()
                    .map(move |record| (message, record))
            })
            .collect();
        records.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let mut failed_messages = vec![false; received.len()];
        for chunk in unique_id_chunks(&records) {
            let batch = StreamBatch {
                records: chunk.iter().map(|(_, record)| record.clone()).collect(),
            };
            let outcome = function.process(&batch).await;
            let failed = outcome.failed_ids();
            for (message, record) in chunk {
                if failed.contains(&record.id) {
                    failed_messages[*message] = true;
                    report.failed_again += 1;
                } else {
                    *report
                        .replayed
                        .entry(function.name().to_string())
                        .or_default() += 1;
                }
            }
        }
        let done: Vec<&str> = received
            .iter()
            .zip(&failed_messages)
            .filter(|(_, failed)| !**failed)
            .map(|(r, _)| r.receipt_handle.as_str())
            .collect();
        report.deleted = self.delete(queue_url, &done).await?;
        Ok(report)
    }

    async fn delete(&self, queue_url: &str, receipt_handles: &[&str]) -> Result<usize, String> {
        let mut deleted = 0;
        for chunk in receipt_handles.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, handle)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(*handle)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let output = self
                .sqs
                .delete_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "DeleteMessageBatch {queue_url}: {}",
                        aws_sdk_sqs::error::DisplayErrorContext(&e)
                    )
                })?;
            deleted += output.successful().len();
        }
        Ok(deleted)
    }
}

/// Consecutive batches of at most [`BATCH_RECORDS`] in which no two records share an id (a
/// failure names its record by id; Kinesis numbers records per shard, so two shards' letters
/// can share one).
fn unique_id_chunks<T>(records: &[(T, StreamRecord)]) -> Vec<&[(T, StreamRecord)]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut ids = std::collections::HashSet::new();
    for (index, (_, record)) in records.iter().enumerate() {
        if index - start == BATCH_RECORDS || !ids.insert(&record.id) {
            chunks.push(&records[start..index]);
            start = index;
            ids.clear();
            ids.insert(&record.id);
        }
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_batch_never_holds_two_records_of_one_id() {
        let record = |id: &str| {
            (
                (),
                StreamRecord {
                    id: RecordId::kinesis(id),
                    partition_key: String::new(),
                    data: Vec::new().into(),
                    arrived_at: None,
                    decoded: None,
                },
            )
        };
        let records: Vec<_> = ["1", "1", "2", "3", "3", "3"].map(record).into();
        let sizes: Vec<usize> = unique_id_chunks(&records).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [1, 3, 1, 1]);
        let many: Vec<_> = (0..250).map(|n| record(&n.to_string())).collect();
        let sizes: Vec<usize> = unique_id_chunks(&many).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
    }

    #[test]
    fn reads_lambdas_on_failure_record_for_kinesis() {
        // As documented for Kinesis event source mappings' on-failure destinations.
        let body = r#"{
            "requestContext": {
                "requestId": "c9b8fa9f-5a7f-xmpl-af9c-0c604cde93a5",
                "functionArn": "arn:aws:lambda:us-east-2:123456789012:function:geostream-geo-update",
                "condition": "RetryAttemptsExhausted",
                "approximateInvokeCount": 1
            },
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled"
            },
            "version": "1.0",
            "timestamp": "2019-11-14T00:38:06.021Z",
            "KinesisBatchInfo": {
                "shardId": "shardId-000000000001",
                "startSequenceNumber": "49601189658422359378836298521827638475320189012309704722",
                "endSequenceNumber": "49601189658422359378836298522902373528957594348623495186",
                "approximateArrivalOfFirstRecord": "2019-11-14T00:38:04.835Z",
                "approximateArrivalOfLastRecord": "2019-11-14T00:38:05.580Z",
                "batchSize": 500,
                "streamArn": "arn:aws:kinesis:us-east-2:123456789012:stream/mystream"
            }
        }"#;
        let record: OnFailureRecord = serde_json::from_str(body).unwrap();
        let batch = record.kinesis_batch_info.unwrap();
        assert_eq!(batch.shard_id, "shardId-000000000001");
        assert_eq!(batch.batch_size, 500);
        assert_eq!(record.request_context.condition, "RetryAttemptsExhausted");
    }
}
