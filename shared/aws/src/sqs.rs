//! The dead-letter queue on SQS: what a stream function gives up on, whole, with the reason.
//! A letter too large for an SQS message is put in the dead-letter bucket on S3 and the message
//! points to it, so nothing is cut.

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use geostream_shared::ports::{DeadLetter, DeadLetterSink, ErrorKind, StoreError};
use serde::{Deserialize, Serialize};

use crate::errors::store_error;
use crate::retry::{backoff, PARTIAL_FAILURE_ATTEMPTS};

/// SendMessageBatch takes 10 messages of at most 256 KiB together.
const MAX_ENTRIES: usize = 10;
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// A letter whose message would be larger goes to S3 (a margin under 256 KiB for the
/// request's own framing).
const MAX_MESSAGE_BYTES: usize = 250 * 1024;

/// A dead-letter message: the letter itself, or, for one too large for SQS, where it was put
/// with what an operator needs to see without fetching it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeadLetterMessage {
    Spilled(SpilledLetter),
    Letter(DeadLetter),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpilledLetter {
    /// `s3://BUCKET/KEY` of the whole letter (its JSON).
    pub spilled_to: String,
    pub function: String,
    pub record_id: String,
    pub partition_key: String,
    pub error_kind: ErrorKind,
    pub reason: String,
    /// The size of the letter's JSON on S3.
    pub bytes: usize,
}

#[derive(Clone)]
pub struct SqsDeadLetters {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    s3: aws_sdk_s3::Client,
    bucket: String,
}

impl SqsDeadLetters {
    /// Letters on the queue at `queue_url`; those too large for it in `bucket`.
    pub fn new(
        client: aws_sdk_sqs::Client,
        queue_url: impl Into<String>,
        s3: aws_sdk_s3::Client,
        bucket: impl Into<String>,
    ) -> Self {
        SqsDeadLetters {
            client,
            queue_url: queue_url.into(),
            s3,
            bucket: bucket.into(),
        }
    }

    /// The message for a letter: its JSON, or when that is too large, a pointer to where it
    /// was put on S3 (under `dead-letters/FUNCTION/`, named by the digest of its content, so
    /// a letter sent twice is put once).
    async fn message(&self, letter: &DeadLetter) -> Result<String, StoreError> {
        let json = serde_json::to_string(letter)
            .map_err(|e| StoreError::permanent("dead letter", e.to_string()))?;
        if json.len() <= MAX_MESSAGE_BYTES {
            return Ok(json);
        }
        let key = format!(
            "dead-letters/{}/{:x}.json",
            letter.function,
            md5::compute(json.as_bytes())
        );
        let bytes = json.len();
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(json.into_bytes().into())
            .send()
            .await
            .map_err(|e| store_error("PutObject dead letter", e))?;
        let pointer = DeadLetterMessage::Spilled(SpilledLetter {
            spilled_to: format!("s3://{}/{key}", self.bucket),
            function: letter.function.clone(),
            record_id: letter.record_id.clone(),
            partition_key: letter.partition_key.clone(),
            error_kind: letter.error_kind,
            reason: letter.reason.clone(),
            bytes,
        });
        serde_json::to_string(&pointer)
            .map_err(|e| StoreError::permanent("dead letter", e.to_string()))
    }

    /// Sends messages in one SendMessageBatch, retrying the entries SQS failed.
    async fn send_batch(&self, messages: Vec<String>) -> Result<(), StoreError> {
        let mut pending: Vec<(String, String)> = messages
            .into_iter()
            .enumerate()
            .map(|(i, body)| (i.to_string(), body))
            .collect();
        for attempt in 1..=PARTIAL_FAILURE_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|(id, body)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(id)
                        .message_body(body)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::permanent("SendMessageBatch", e.to_string()))?;
            let output = self
                .client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| store_error("SendMessageBatch", e))?;
            let failed = output.failed();
            if failed.is_empty() {
                return Ok(());
            }
            let reasons: Vec<String> = failed
                .iter()
                .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or_default()))
                .collect();
            if failed.iter().any(|f| f.sender_fault()) {
                return Err(StoreError::permanent(
                    "SendMessageBatch",
                    reasons.join("; "),
                ));
            }
            if attempt == PARTIAL_FAILURE_ATTEMPTS {
                return Err(StoreError::transient(
                    "SendMessageBatch",
                    reasons.join("; "),
                ));
            }
            let failed_ids: Vec<&str> = failed.iter().map(|f| f.id()).collect();
            pending.retain(|(id, _)| failed_ids.contains(&id.as_str()));
            tokio::time::sleep(backoff(attempt)).await;
        }
        Ok(())
    }
}

/// Messages in batches SendMessageBatch takes: at most 10, at most 256 KiB together.
fn batches(messages: Vec<String>) -> Vec<Vec<String>> {
    let mut batches: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0;
    for message in messages {
        let full = batches
            .last()
            .is_none_or(|b| b.len() == MAX_ENTRIES || bytes + message.len() > MAX_BATCH_BYTES);
        if full {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += message.len();
        if let Some(batch) = batches.last_mut() {
            batch.push(message);
        }
    }
    batches
}

#[async_trait]
impl DeadLetterSink for SqsDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError> {
        let mut messages = Vec::with_capacity(letters.len());
        for letter in &letters {
            messages.push(self.message(letter).await?);
        }
        for batch in batches(messages) {
            self.send_batch(batch).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_to_ten_messages_and_256_kib() {
        let sizes =
            |batches: Vec<Vec<String>>| -> Vec<usize> { batches.iter().map(Vec::len).collect() };
        assert_eq!(sizes(batches(vec!["x".into(); 23])), [10, 10, 3]);
        let large = "y".repeat(100 * 1024);
        assert_eq!(sizes(batches(vec![large; 5])), [2, 2, 1]);
        assert!(batches(Vec::new()).is_empty());
    }

    #[test]
    fn a_message_reads_back_as_a_letter_or_a_pointer() {
        let letter = DeadLetter::new(
            "archiver",
            "42",
            "truck-1",
            vec![0, 159, 146, 150],
            &StoreError::permanent("decode", "not an envelope"),
        );
        let json = serde_json::to_string(&letter).unwrap();
        assert!(json.contains(r#""data_base64":"AJ+Slg==""#), "{json}");
        assert_eq!(
            serde_json::from_str::<DeadLetterMessage>(&json).unwrap(),
            DeadLetterMessage::Letter(letter.clone())
        );
        let pointer = SpilledLetter {
            spilled_to: "s3://b/dead-letters/archiver/ab.json".into(),
            function: letter.function,
            record_id: letter.record_id,
            partition_key: letter.partition_key,
            error_kind: letter.error_kind,
            reason: letter.reason,
            bytes: 300_000,
        };
        let json = serde_json::to_string(&DeadLetterMessage::Spilled(pointer.clone())).unwrap();
        assert_eq!(
            serde_json::from_str::<DeadLetterMessage>(&json).unwrap(),
            DeadLetterMessage::Spilled(pointer)
        );
    }
}
