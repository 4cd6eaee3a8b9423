//! The telemetry and alerts buses on Kinesis Data Streams.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use geostream_shared::ports::{BusRecord, EventBus, Published, StoreError};

use crate::capacity::{self, CapacityMeter, Unit};
use crate::errors::store_error_about;
use crate::retry::{backoff, PARTIAL_FAILURE_ATTEMPTS};

/// PutRecords limits: 500 records and 5 MiB per call, 1 MiB per record (data + key).
const MAX_RECORDS_PER_CALL: usize = 500;
const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
const MAX_BYTES_PER_RECORD: usize = 1024 * 1024;

/// An [`EventBus`] over one Kinesis stream.
#[derive(Clone)]
pub struct KinesisBus {
    client: aws_sdk_kinesis::Client,
    stream_name: String,
    meter: CapacityMeter,
}

impl KinesisBus {
    pub fn new(client: aws_sdk_kinesis::Client, stream_name: impl Into<String>) -> Self {
        KinesisBus {
            client,
            stream_name: stream_name.into(),
            meter: CapacityMeter::default(),
        }
    }

    /// Counts the PUT payload units (and on-demand KiB) this bus consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    /// Record indices in rounds: round n holds the n-th record of every partition key, in
    /// order. A key's record is put only once the ones before it were, so an entry that failed
    /// and is retried alone can never land after a later record of its key (a device's raise
    /// and clear reaching consumers as clear-then-raise). One record per key, as ingest sends,
    /// is one round.
    fn rounds(records: &[BusRecord], indices: &[usize]) -> Vec<Vec<usize>> {
        let mut next_round: HashMap<&str, usize> = HashMap::new();
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        for &index in indices {
            let round = next_round
                .entry(records[index].partition_key.as_str())
                .or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(index);
            *round += 1;
        }
        rounds
    }

    /// Splits record indices into PutRecords calls within the count and size limits.
    fn chunks(records: &[BusRecord], indices: &[usize]) -> Vec<Vec<usize>> {
        let mut chunks = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut bytes = 0;
        for &index in indices {
            let record = &records[index];
            let size = record.data.len() + record.partition_key.len();
            if !current.is_empty()
                && (current.len() == MAX_RECORDS_PER_CALL || bytes + size > MAX_BYTES_PER_CALL)
            {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push(index);
            bytes += size;
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        chunks
    }

    /// Puts one chunk, retrying the entries that failed (throttled or internal errors) with
    /// backoff and jitter; fills in the result of every index.
    async fn put_chunk(
        &self,
        records: &[BusRecord],
        chunk: Vec<usize>,
        results: &mut [Option<Result<Published, StoreError>>],
    ) {
        let mut pending = chunk;
        for attempt in 1..=PARTIAL_FAILURE_ATTEMPTS {
            let entries: Result<Vec<PutRecordsRequestEntry>, _> = pending
                .iter()
                .map(|&i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&records[i].partition_key)
                        .data(Blob::new(records[i].data.clone()))
                        .build()
                })
                .collect();
            let entries = match entries {
                Ok(entries) => entries,
                Err(error) => {
                    for &i in &pending {
                        results[i] =
                            Some(Err(StoreError::permanent("PutRecords", error.to_string())));
                    }
                    return;
                }
            };
            let output = self
                .client
                .put_records()
                .stream_name(&self.stream_name)
                .set_records(Some(entries))
                .send()
                .await;
            let output = match output {
                Ok(output) => output,
                Err(error) => {
                    // The SDK already retried throttling and 5xx for the call as a whole.
                    let about = format!("stream {}", self.stream_name);
                    let error = store_error_about("PutRecords", &about, error);
                    for &i in &pending {
                        results[i] = Some(Err(error.clone()));
                    }
                    return;
                }
            };
            let mut still_failing = Vec::new();
            for (&i, entry) in pending.iter().zip(output.records()) {
                match (
                    entry.error_code(),
                    entry.shard_id(),
                    entry.sequence_number(),
                ) {
                    (None, Some(shard_id), Some(sequence_number)) => {
                        // Only records put are billed: the key and the data.
                        let bytes = records[i].data.len() + records[i].partition_key.len();
                        self.meter.add(
                            Unit::KinesisPutPayloadUnits,
                            capacity::kinesis_payload_units(bytes),
                        );
                        self.meter.add(
                            Unit::KinesisIngressKib,
                            capacity::kinesis_ingress_kib(bytes),
                        );
                        results[i] = Some(Ok(Published {
                            shard_id: shard_id.to_string(),
                            sequence_number: sequence_number.to_string(),
                        }))
                    }
                    (code, _, _) => {
                        let message = format!(
                            "{}: {}",
                            code.unwrap_or("missing sequence number"),
                            entry.error_message().unwrap_or_default()
                        );
                        results[i] = Some(Err(StoreError::transient("PutRecords", message)));
                        still_failing.push(i);
                    }
                }
            }
            if still_failing.is_empty() {
                return;
            }
            tracing::warn!(stream = %self.stream_name, failed = still_failing.len(), attempt, "PutRecords partially failed; retrying the failed entries");
            pending = still_failing;
            if attempt < PARTIAL_FAILURE_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }
}

#[async_trait]
impl EventBus for KinesisBus {
    async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>> {
        let mut results: Vec<Option<Result<Published, StoreError>>> = vec![None; records.len()];
        let mut sendable = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            if record.data.len() + record.partition_key.len() > MAX_BYTES_PER_RECORD {
                results[i] = Some(Err(StoreError::permanent(
                    "PutRecords",
                    format!(
                        "record of {} bytes exceeds Kinesis's 1 MiB limit",
                        record.data.len()
                    ),
                )));
            } else {
                sendable.push(i);
            }
        }
        let mut failed_keys: HashSet<&str> = HashSet::new();
        for round in Self::rounds(&records, &sendable) {
            let (blocked, ready): (Vec<usize>, Vec<usize>) = round
                .into_iter()
                .partition(|&i| failed_keys.contains(records[i].partition_key.as_str()));
            for i in blocked {
                results[i] = Some(Err(StoreError::transient(
                    "PutRecords",
                    "not sent: an earlier record of the same partition key failed",
                )));
            }
            for chunk in Self::chunks(&records, &ready) {
                self.put_chunk(&records, chunk, &mut results).await;
            }
            for i in ready {
                if !matches!(results[i], Some(Ok(_))) {
                    failed_keys.insert(records[i].partition_key.as_str());
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(StoreError::transient("PutRecords", "no result for record"))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_records_go_in_successive_rounds_in_order() {
        let records: Vec<BusRecord> = ["a", "b", "a", "c", "a", "b"]
            .iter()
            .map(|key| BusRecord {
                partition_key: key.to_string(),
                data: vec![1],
                decoded: None,
            })
            .collect();
        let all: Vec<usize> = (0..records.len()).collect();
        assert_eq!(
            KinesisBus::rounds(&records, &all),
            [vec![0, 1, 3], vec![2, 5], vec![4]]
        );
        // One record per key (what ingest publishes): one round, one call.
        let one_each: Vec<BusRecord> = (0..10)
            .map(|n| BusRecord {
                partition_key: format!("d{n}"),
                data: vec![1],
                decoded: None,
            })
            .collect();
        assert_eq!(KinesisBus::rounds(&one_each, &all_of(&one_each)).len(), 1);
    }

    fn all_of(records: &[BusRecord]) -> Vec<usize> {
        (0..records.len()).collect()
    }

    #[test]
    fn chunks_respect_count_and_size_limits() {
        let small: Vec<BusRecord> = (0..1_201)
            .map(|n| BusRecord {
                partition_key: format!("d{n}"),
                data: vec![0; 10],
                decoded: None,
            })
            .collect();
        let sizes: Vec<usize> = KinesisBus::chunks(&small, &(0..small.len()).collect::<Vec<_>>())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [500, 500, 201]);
        let big: Vec<BusRecord> = (0..12)
            .map(|_| BusRecord {
                partition_key: "k".into(),
                data: vec![0; 1_000_000],
                decoded: None,
            })
            .collect();
        let sizes: Vec<usize> = KinesisBus::chunks(&big, &(0..big.len()).collect::<Vec<_>>())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [5, 5, 2]);
    }
}
