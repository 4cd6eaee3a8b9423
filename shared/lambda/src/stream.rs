//! Stream events as Lambda's event source mappings send them, turned into the core's
//! [`StreamBatch`], and the partial batch responses Lambda reads back.

use std::collections::BTreeMap;

use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use base64::Engine;
use geostream_shared::metrics::MetricsSink;
use geostream_shared::stream::{
    process_measured, RecordId, StreamBatch, StreamFunction, StreamRecord,
};
use serde::{Deserialize, Deserializer, Serialize};

/// The event a Kinesis event source mapping sends: one shard's records, in sequence order.
///
/// GeoStream's own type rather than `aws_lambda_events`' `KinesisEvent`, whose timestamp
/// deserializer overflows (a panic with overflow checks, a wrong time without) on a
/// fractional part with many digits (found by `scripts/fuzz`, inputs in
/// `fuzz/crashes/kinesis_event`). A record's data that is not base64 is kept as its text, so
/// the function dead-letters that record, not the batch; an arrival time that is not a number
/// of seconds is unknown (it feeds the freshness metric only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KinesisEvent {
    #[serde(rename = "Records", default)]
    pub records: Vec<KinesisEventRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisEventRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_region: Option<String>,
    #[serde(rename = "eventID", default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source: Option<String>,
    #[serde(
        rename = "eventSourceARN",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub event_source_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_identity_arn: Option<String>,
    pub kinesis: KinesisRecord,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinesis_schema_version: Option<String>,
    pub partition_key: String,
    pub sequence_number: String,
    pub data: RecordData,
    /// Seconds since the epoch, with milliseconds as the fraction.
    #[serde(
        default,
        deserialize_with = "seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub approximate_arrival_timestamp: Option<f64>,
}

/// A record's bytes, base64 in the event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordData(pub Vec<u8>);

impl Serialize for RecordData {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for RecordData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(RecordData(
            base64::engine::general_purpose::STANDARD
                .decode(&text)
                .unwrap_or_else(|_| text.into_bytes()),
        ))
    }
}

/// A number of seconds, as a JSON number or a string of one; anything else is unknown.
fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    Ok(
        match Option::<serde_json::Value>::deserialize(deserializer)? {
            Some(serde_json::Value::Number(number)) => number.as_f64(),
            Some(serde_json::Value::String(text)) => text.parse().ok(),
            _ => None,
        }
        .filter(|s| s.is_finite()),
    )
}

/// The records of a Kinesis event, in the event's order (one shard, sequence order).
pub fn batch_from_kinesis(event: KinesisEvent) -> StreamBatch {
    StreamBatch {
        records: event
            .records
            .into_iter()
            .map(|record| StreamRecord {
                id: RecordId::kinesis(record.kinesis.sequence_number),
                partition_key: record.kinesis.partition_key,
                data: record.kinesis.data.0.into(),
                arrived_at: record
                    .kinesis
                    .approximate_arrival_timestamp
                    .map(|seconds| (seconds * 1000.0).round())
                    // Before 2001 or past year 5000: not a time Kinesis stamps.
                    .filter(|millis| (1e12..1e14).contains(millis))
                    .map(|millis| millis as i64),
                decoded: None,
            })
            .collect(),
    }
}

/// The event a (self-managed or MSK) Kafka event source mapping sends: records grouped by
/// `topic-partition`, base64 keys and values.
///
/// GeoStream's own type rather than `aws_lambda_events`' `KafkaEvent`: that one's timestamp
/// deserializer asserts and so panics on a fractional timestamp (found by `scripts/fuzz`,
/// inputs in `fuzz/crashes/kafka_event`). Here an event that is not what Lambda sends is
/// refused with serde's reason, and a record's timestamp that is not whole milliseconds is
/// only unknown: it feeds the freshness metric, nothing a record's fate depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    #[serde(default)]
    pub records: BTreeMap<String, Vec<KafkaRecord>>,
}

/// One Kafka record of a [`KafkaEvent`]. Headers are not read (GeoStream's records carry
/// everything in their value) and are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch as the producer or broker stamped it (`timestampType`).
    #[serde(
        default,
        deserialize_with = "whole_millis",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Whole milliseconds, as a JSON integer or a string of one; anything else is unknown.
fn whole_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    Ok(
        match Option::<serde_json::Value>::deserialize(deserializer)? {
            Some(serde_json::Value::Number(number)) => number.as_i64(),
            Some(serde_json::Value::String(text)) => text.parse().ok(),
            _ => None,
        },
    )
}

/// The records of a Kafka event, in order within a partition (partitions in name order).
pub fn batch_from_kafka(event: KafkaEvent) -> StreamBatch {
    let decode =
        |text: Option<String>| text.map(|t| base64::engine::general_purpose::STANDARD.decode(t));
    let mut records = Vec::new();
    for (topic_partition, mut messages) in event.records {
        messages.sort_by_key(|m| m.offset);
        for message in messages {
            let partition = message.partition;
            // Lambda names the topic in every record; the group key is the fallback.
            let topic = message.topic.clone().unwrap_or_else(|| {
                topic_partition
                    .strip_suffix(&format!("-{partition}"))
                    .unwrap_or(&topic_partition)
                    .to_string()
            });
            // An undecodable value is kept as its text, for the dead-letter sink to show.
            let data = match decode(message.value.clone()) {
                Some(Ok(bytes)) => bytes,
                Some(Err(_)) | None => message.value.unwrap_or_default().into_bytes(),
            };
            let partition_key = match decode(message.key) {
                Some(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => String::new(),
            };
            records.push(StreamRecord {
                id: RecordId::kafka(topic, partition, message.offset),
                partition_key,
                data: data.into(),
                arrived_at: message.timestamp.filter(|millis| *millis > 0),
                decoded: None,
            });
        }
    }
    StreamBatch { records }
}

/// Lambda's partial batch response for Kinesis: the sequence number of every failed record
/// (Lambda resumes from the lowest). A failed record of another bus cannot be named in it, so
/// it is answered as a failure of the whole batch (an identifier Lambda cannot match).
pub fn kinesis_response(failed: Vec<RecordId>) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    response.batch_item_failures = failed
        .into_iter()
        .map(|id| {
            let mut failure = KinesisBatchItemFailure::default();
            failure.item_identifier = Some(match id {
                RecordId::Kinesis(sequence) => sequence.as_str().to_string(),
                other => other.to_string(),
            });
            failure
        })
        .collect();
    response
}

/// Lambda's partial batch response for Kafka event source mappings: per failed
/// topic-partition, the offset to resume from. (aws_lambda_events has no type for it.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchResponse {
    pub batch_item_failures: Vec<KafkaBatchItemFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KafkaBatchItemFailure {
    pub item_identifier: KafkaItemIdentifier,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaItemIdentifier {
    /// `topic-partition`, as the event's record groups are keyed.
    pub partition: String,
    pub offset: i64,
}

/// The lowest failed offset of each partition, from which Lambda redelivers it. A failed
/// record that is not a Kafka record cannot be placed, so it fails the whole batch: offset 0
/// of its own name, which matches no record of the event.
pub fn kafka_response(failed: Vec<RecordId>) -> KafkaBatchResponse {
    let mut resume: BTreeMap<String, i64> = BTreeMap::new();
    for id in failed {
        let (partition, offset) = match id {
            RecordId::Kafka {
                topic,
                partition,
                offset,
            } => (format!("{topic}-{partition}"), offset),
            other => (other.to_string(), 0),
        };
        resume
            .entry(partition)
            .and_modify(|lowest| *lowest = (*lowest).min(offset))
            .or_insert(offset);
    }
    KafkaBatchResponse {
        batch_item_failures: resume
            .into_iter()
            .map(|(partition, offset)| KafkaBatchItemFailure {
                item_identifier: KafkaItemIdentifier { partition, offset },
            })
            .collect(),
    }
}

/// A stream function as Lambda invokes it from a Kinesis event source mapping.
pub async fn handle_kinesis(
    function: &dyn StreamFunction,
    event: KinesisEvent,
    metrics: &dyn MetricsSink,
) -> KinesisEventResponse {
    let failed = process_measured(function, batch_from_kinesis(event), metrics).await;
    kinesis_response(failed)
}

/// A stream function as Lambda invokes it from a (self-managed or MSK) Kafka event source
/// mapping.
pub async fn handle_kafka(
    function: &dyn StreamFunction,
    event: KafkaEvent,
    metrics: &dyn MetricsSink,
) -> KafkaBatchResponse {
    let failed = process_measured(function, batch_from_kafka(event), metrics).await;
    kafka_response(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use geostream_shared::envelope::Envelope;

    #[test]
    fn builds_from_a_real_kafka_event_fixture_and_answers_per_partition() {
        let event: KafkaEvent =
            serde_json::from_str(include_str!("../tests/fixtures/kafka-event.json")).unwrap();
        let batch = batch_from_kafka(event);
        let ids: Vec<String> = batch.records.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(
            ids,
            ["telemetry-0@15", "telemetry-0@16", "telemetry-1@7"],
            "ordered by partition, then offset"
        );
        assert_eq!(batch.records[0].id, RecordId::kafka("telemetry", 0, 15));
        assert_eq!(batch.records[0].partition_key, "truck-7");
        assert_eq!(batch.records[0].arrived_at, Some(1_763_900_000_125));
        let envelope = Envelope::decode(&batch.records[0].data).unwrap();
        assert_eq!(envelope.readings[0].engine_temp_c, Some(104.5));

        let failed: Vec<RecordId> = batch.records.iter().rev().map(|r| r.id.clone()).collect();
        assert_eq!(
            serde_json::to_value(kafka_response(failed)).unwrap(),
            serde_json::json!({"batchItemFailures": [
                {"itemIdentifier": {"partition": "telemetry-0", "offset": 15}},
                {"itemIdentifier": {"partition": "telemetry-1", "offset": 7}},
            ]})
        );
    }

    /// The inputs on which `aws_lambda_events`' Kafka event panicked (a fractional timestamp
    /// ahead of bytes that are not JSON, found by `scripts/fuzz`) are refused with a reason.
    #[test]
    fn fuzzed_kafka_events_that_panicked_are_refused_with_a_reason() {
        for crash in [
            &include_bytes!("../../../fuzz/crashes/kafka_event/crash-0")[..],
            &include_bytes!("../../../fuzz/crashes/kafka_event/crash-1")[..],
        ] {
            let error = serde_json::from_slice::<KafkaEvent>(crash).unwrap_err();
            assert!(error.line() > 1, "refused where it went wrong: {error}");
        }
    }

    /// The inputs on which `aws_lambda_events`' Kinesis event panicked (a timestamp with a
    /// long fraction: an overflow, found by `scripts/fuzz`) are refused with a reason.
    #[test]
    fn fuzzed_kinesis_events_that_panicked_are_refused_with_a_reason() {
        for crash in [
            &include_bytes!("../../../fuzz/crashes/kinesis_event/crash-0")[..],
            &include_bytes!("../../../fuzz/crashes/kinesis_event/crash-1")[..],
            &include_bytes!("../../../fuzz/crashes/kinesis_event/crash-2")[..],
        ] {
            let error = serde_json::from_slice::<KinesisEvent>(crash).unwrap_err();
            assert!(error.line() > 1, "refused where it went wrong: {error}");
        }
    }

    /// Arrival times Kinesis does not send are unknown; the record is kept, and data that is
    /// not base64 is kept as its text for the dead letter.
    #[test]
    fn an_odd_kinesis_arrival_time_is_unknown_and_its_record_kept() {
        let fixture = include_str!("../tests/fixtures/kinesis-event.json");
        for (odd, expected) in [
            ("\"0.1566085596925383615710959\"", None),
            ("1e300", None),
            ("\"1763900000.5\"", Some(1_763_900_000_500)),
            ("[]", None),
        ] {
            let event = fixture.replace("1763900000.123", odd);
            let batch = batch_from_kinesis(serde_json::from_str(&event).unwrap());
            assert_eq!(batch.records[0].arrived_at, expected, "{odd}");
            assert_eq!(batch.records[0].partition_key, "truck-7");
        }
        let event = fixture.replace("\"data\": \"eyJ2", "\"data\": \"not base64 eyJ2");
        let batch = batch_from_kinesis(serde_json::from_str(&event).unwrap());
        assert!(batch.records[0].data.starts_with(b"not base64 eyJ2"));
    }

    /// A well-formed event with a fractional timestamp loses only that timestamp.
    #[test]
    fn a_fractional_kafka_timestamp_is_unknown_and_its_record_kept() {
        let fixture = include_str!("../tests/fixtures/kafka-event.json")
            .replace("1763900000250", "1763900000.25");
        let batch = batch_from_kafka(serde_json::from_str(&fixture).unwrap());
        let arrivals: Vec<Option<i64>> = batch.records.iter().map(|r| r.arrived_at).collect();
        assert_eq!(
            arrivals,
            [Some(1_763_900_000_125), None, Some(1_763_900_000_750)]
        );
    }

    #[test]
    fn a_kafka_timestamp_is_whole_milliseconds_as_a_number_or_a_string() {
        let record = |timestamp: &str| {
            serde_json::from_str::<KafkaRecord>(&format!(
                r#"{{"partition": 0, "offset": 1, "timestamp": {timestamp}}}"#
            ))
            .unwrap()
            .timestamp
        };
        assert_eq!(record("1763900000250"), Some(1_763_900_000_250));
        assert_eq!(record("\"1763900000250\""), Some(1_763_900_000_250));
        assert_eq!(record("1763.5"), None);
        assert_eq!(record("null"), None);
        assert_eq!(record("[1]"), None);
        let no_offset = serde_json::from_str::<KafkaRecord>(r#"{"partition": 0}"#);
        assert!(no_offset.unwrap_err().to_string().contains("offset"));
    }

    #[test]
    fn a_topic_with_dashes_is_answered_under_its_own_partition_key() {
        let response = kafka_response(vec![RecordId::kafka("geostream-telemetry", 12, 4)]);
        assert_eq!(
            response.batch_item_failures[0].item_identifier,
            KafkaItemIdentifier {
                partition: "geostream-telemetry-12".into(),
                offset: 4
            }
        );
    }

    #[test]
    fn builds_from_a_real_kinesis_event_fixture() {
        let event: KinesisEvent =
            serde_json::from_str(include_str!("../tests/fixtures/kinesis-event.json")).unwrap();
        let batch = batch_from_kinesis(event);
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.records[0].partition_key, "truck-7");
        let envelope = Envelope::decode(&batch.records[0].data).unwrap();
        assert_eq!(envelope.readings[0].engine_temp_c, Some(104.5));
        assert_eq!(batch.records[0].arrived_at, Some(1_763_900_000_123));
        let response = kinesis_response(vec![batch.records[0].id.clone()]);
        let json = serde_json::to_value(response).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "49590338271490256608559692538361571095921575989136588898"}]})
        );
    }
}
