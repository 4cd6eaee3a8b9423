//! The dead-letter queue on SQS: what a stream function gives up on, with the reason.

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use geostream_shared::ports::{DeadLetter, DeadLetterSink, StoreError};

use crate::errors::store_error;
use crate::retry::{backoff, PARTIAL_FAILURE_ATTEMPTS};

/// SendMessageBatch takes 10 messages; a message is at most 256 KiB, so a letter's data is
/// cut to this many bytes (the reason and ids are always kept).
const MAX_ENTRIES: usize = 10;
const MAX_DATA_BYTES: usize = 200 * 1024;

#[derive(Clone)]
pub struct SqsDeadLetters {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsDeadLetters {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        SqsDeadLetters {
            client,
            queue_url: queue_url.into(),
        }
    }
}

/// The message body of a letter: its JSON, with oversized data cut on a character boundary.
pub fn message_body(letter: &DeadLetter) -> String {
    let mut letter = letter.clone();
    if letter.data.len() > MAX_DATA_BYTES {
        let mut cut = MAX_DATA_BYTES;
        while !letter.data.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = letter.data.len();
        letter.data.truncate(cut);
        letter.reason = format!("{} (data cut from {total} to {cut} bytes)", letter.reason);
    }
    serde_json::to_string(&letter).unwrap_or_default()
}

#[async_trait]
impl DeadLetterSink for SqsDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError> {
        for chunk in letters.chunks(MAX_ENTRIES) {
            let mut pending: Vec<(String, String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, letter)| (i.to_string(), message_body(letter)))
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
                    break;
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
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_data_is_cut_and_said_so() {
        let letter = DeadLetter {
            function: "archiver".into(),
            record_id: "1".into(),
            partition_key: "d".into(),
            data: "é".repeat(150_000),
            reason: "refused".into(),
            attempts: 1,
            failed_at: 0,
        };
        let body = message_body(&letter);
        assert!(body.len() < 256 * 1024);
        let back: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(back["reason"].as_str().unwrap().contains("cut from 300000"));
    }
}
