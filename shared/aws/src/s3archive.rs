//! The archive as time-partitioned objects on S3, for accounts without Timestream (closed to
//! new customers since 2025-06-20), queryable with Athena.
//!
//! Layout: `s3://BUCKET/readings/date=YYYY-MM-DD/hour=HH/<digest>.jsonl.gz`, gzip-compressed,
//! one JSON object per line (the same fields as the API's readings), partitioned by the reading's
//! event time (UTC). Compression cuts what the archive stores (and what S3 bills per GB-month)
//! about eightfold; Athena reads `.gz` objects as they are. Objects written before compression
//! (`.jsonl`) are still read.
//! Each stream batch writes one object per hour it touches, named by a digest of its readings'
//! keys: a retried batch overwrites the same object. A reading replayed in a different batch
//! lands in a second object; track reads here deduplicate by (ts, event_id), and Athena queries
//! should too (`SELECT DISTINCT` or `GROUP BY event_id`).
//!
//! Track reads list and read the hour partitions of the range, so they are meant for short
//! ranges (at most [`MAX_TRACK_HOURS`]); longer analyses belong in Athena over the same objects.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Duration, Timelike, Utc};
use geostream_shared::model::Reading;
use geostream_shared::ports::{Archive, RejectedReading, StoreError};
use geostream_shared::EpochMillis;

use crate::capacity::{CapacityMeter, Unit};
use crate::errors::store_error;

/// The longest range a track read lists partitions for.
pub const MAX_TRACK_HOURS: i64 = 48;

pub struct S3Archive {
    client: aws_sdk_s3::Client,
    bucket: String,
    meter: CapacityMeter,
}

fn hour_of(ts: EpochMillis) -> Option<DateTime<Utc>> {
    let time = DateTime::from_timestamp_millis(ts)?;
    time.with_minute(0)?.with_second(0)?.with_nanosecond(0)
}

/// The key prefix of an hour partition.
pub fn partition_prefix(hour: DateTime<Utc>) -> String {
    format!(
        "readings/date={}/hour={:02}/",
        hour.format("%Y-%m-%d"),
        hour.hour()
    )
}

impl S3Archive {
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> Self {
        S3Archive {
            client,
            bucket: bucket.into(),
            meter: CapacityMeter::default(),
        }
    }

    /// Counts the bytes this archive writes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let output = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| store_error("ListObjectsV2", e))?;
            keys.extend(
                output
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
            match output.next_continuation_token() {
                Some(next) => token = Some(next.to_string()),
                None => return Ok(keys),
            }
        }
    }
}

#[async_trait]
impl Archive for S3Archive {
    async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
        let mut rejected = Vec::new();
        let mut partitions: BTreeMap<DateTime<Utc>, Vec<&Reading>> = BTreeMap::new();
        for (index, reading) in readings.iter().enumerate() {
            match hour_of(reading.ts) {
                Some(hour) => partitions.entry(hour).or_default().push(reading),
                None => rejected.push(RejectedReading {
                    index,
                    reason: format!("ts {} is not a representable time", reading.ts),
                }),
            }
        }
        for (hour, mut group) in partitions {
            group.sort_by(|a, b| {
                (a.device_id.as_str(), a.order_key()).cmp(&(b.device_id.as_str(), b.order_key()))
            });
            let mut body = Vec::new();
            for reading in &group {
                serde_json::to_writer(&mut body, reading)
                    .map_err(|e| StoreError::permanent("PutObject", e.to_string()))?;
                body.push(b'\n');
            }
            let key = format!(
                "{}{}.jsonl.gz",
                partition_prefix(hour),
                batch_digest(&group)
            );
            let body = gzip(&body).map_err(|e| StoreError::permanent("PutObject", e))?;
            let bytes = body.len();
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type("application/x-ndjson")
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| store_error("PutObject", e))?;
            self.meter.add(Unit::S3BytesWritten, bytes as f64);
        }
        Ok(rejected)
    }

    async fn track(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let (Some(first), Some(last)) = (hour_of(from), hour_of(to - 1)) else {
            return Err(StoreError::invalid(
                "track",
                format!("{from}..{to} is not a representable time range"),
            ));
        };
        let hours = (last - first).num_hours() + 1;
        if hours > MAX_TRACK_HOURS {
            return Err(StoreError::invalid(
                "track",
                format!("the range spans {hours} hours; the S3 archive reads at most {MAX_TRACK_HOURS} (query longer ranges with Athena)"),
            ));
        }
        let mut found: BTreeMap<(EpochMillis, String), Reading> = BTreeMap::new();
        for step in 0..hours {
            let prefix = partition_prefix(first + Duration::hours(step));
            for key in self.keys_under(&prefix).await? {
                let object = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| store_error("GetObject", e))?;
                let bytes = object
                    .body
                    .collect()
                    .await
                    .map_err(|e| StoreError::transient("GetObject", format!("{key}: {e}")))?
                    .into_bytes();
                let bytes = if key.ends_with(".gz") {
                    gunzip(&bytes).map_err(|e| {
                        StoreError::permanent("GetObject", format!("{key}: not gzip: {e}"))
                    })?
                } else {
                    bytes.to_vec()
                };
                for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let reading: Reading = serde_json::from_slice(line)
                        .map_err(|e| StoreError::permanent("GetObject", format!("{key}: {e}")))?;
                    if reading.device_id == device_id && reading.ts >= from && reading.ts < to {
                        found.insert((reading.ts, reading.event_id.clone()), reading);
                    }
                }
            }
        }
        Ok(found.into_values().take(limit).collect())
    }
}

/// The name of a batch's object: a digest of its readings' keys (device, time, event id), each
/// variable-length field prefixed with its length, so that two different batches cannot run
/// together into the same bytes (and one object overwrite the other).
fn batch_digest(readings: &[&Reading]) -> String {
    let mut digest = md5::Context::new();
    for reading in readings {
        for field in [reading.device_id.as_bytes(), reading.event_id.as_bytes()] {
            digest.consume((field.len() as u32).to_be_bytes());
            digest.consume(field);
        }
        digest.consume(reading.ts.to_be_bytes());
    }
    format!("{:x}", digest.finalize())
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).map_err(|e| e.to_string())?;
    encoder.finish().map_err(|e| e.to_string())
}

fn gunzip(data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_whose_fields_run_together_get_different_objects() {
        let reading = |device: &str, event: &str| Reading {
            device_id: device.into(),
            ts: 1,
            event_id: event.into(),
            ..Default::default()
        };
        // "x" "a" | "bc" "d"  against  "x" "ab" | "c" "d": the same bytes without framing.
        let (one, two) = (reading("x", "a"), reading("bc", "d"));
        let (three, four) = (reading("x", "ab"), reading("c", "d"));
        assert_ne!(batch_digest(&[&one, &two]), batch_digest(&[&three, &four]));
        assert_eq!(batch_digest(&[&one, &two]), batch_digest(&[&one, &two]));
    }

    #[test]
    fn objects_round_trip_through_gzip() {
        let lines = b"{\"device_id\":\"a\"}\n{\"device_id\":\"b\"}\n".repeat(50);
        let packed = gzip(&lines).unwrap();
        assert!(
            packed.len() * 5 < lines.len(),
            "{} of {}",
            packed.len(),
            lines.len()
        );
        assert_eq!(gunzip(&packed).unwrap(), lines);
        assert!(gunzip(b"not gzip").is_err());
    }

    #[test]
    fn partitions_are_hours_of_event_time() {
        let hour = hour_of(1_763_900_000_123).unwrap();
        assert_eq!(partition_prefix(hour), "readings/date=2025-11-23/hour=12/");
        assert_eq!(hour_of(1_763_902_799_999), Some(hour));
    }
}
