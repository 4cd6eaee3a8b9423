//! The geo-update function: keeps the latest position of every vehicle.
//!
//! For each device in a stream batch only its newest positioned reading is written (coalescing:
//! one conditional write per device per batch), and the store refuses anything older than what
//! it holds, so replays and out-of-order batches never move a vehicle back in time.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use geostream_shared::envelope::Envelope;
use geostream_shared::geo::geohash_of;
use geostream_shared::metrics::{Measurements, MetricName};
use geostream_shared::model::{Position, Reading};
use geostream_shared::ports::{DeadLetterSink, ErrorKind, PositionStore, UpsertOutcome};
use geostream_shared::stream::{
    dead_letter_refused, decode_batch, group_by_device, BatchOutcome, Retry, StreamBatch,
    StreamFunction, DEVICE_CONCURRENCY,
};

pub const FUNCTION_NAME: &str = "geo-update";

pub struct GeoUpdate {
    positions: Arc<dyn PositionStore>,
    dead_letters: Arc<dyn DeadLetterSink>,
}

impl GeoUpdate {
    pub fn new(positions: Arc<dyn PositionStore>, dead_letters: Arc<dyn DeadLetterSink>) -> Self {
        GeoUpdate {
            positions,
            dead_letters,
        }
    }
}

#[async_trait]
impl StreamFunction for GeoUpdate {
    fn name(&self) -> &'static str {
        FUNCTION_NAME
    }

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
        let decoded = decode_batch(FUNCTION_NAME, batch, self.dead_letters.as_ref()).await;
        let mut failed = decoded.retry;
        let (mut applied, mut stale) = (0usize, 0usize);
        let mut dead_lettered = decoded.dead_lettered;
        let upserts = group_by_device(decoded.records)
            .into_iter()
            .filter_map(|group| {
                let (reading, received_at) = newest_positioned(&group.envelopes)?;
                let position = to_position(reading, received_at)?;
                Some((group, position))
            });
        let mut outcomes = stream::iter(upserts.map(|(group, position)| async move {
            let outcome = self.positions.upsert_if_newer(position).await;
            (group, outcome)
        }))
        .buffer_unordered(DEVICE_CONCURRENCY);
        while let Some((group, outcome)) = outcomes.next().await {
            match outcome {
                Ok(UpsertOutcome::Applied) => applied += 1,
                Ok(UpsertOutcome::Stale) => stale += 1,
                // Retrying cannot help: dead letters now, not a stalled shard.
                Err(error) if error.kind == ErrorKind::Permanent => {
                    dead_lettered += dead_letter_refused(
                        FUNCTION_NAME,
                        &group.record_ids,
                        &group.envelopes,
                        &error,
                        self.dead_letters.as_ref(),
                        &mut failed,
                    )
                    .await;
                }
                Err(error) => {
                    tracing::warn!(function = FUNCTION_NAME, device_id = %group.device_id, %error, "position upsert failed; records will be retried");
                    failed.extend(Retry::all(group.record_ids, &error));
                }
            }
        }
        let mut measurements = Measurements::default();
        measurements.count(MetricName::PositionsUpdated, applied);
        measurements.count(MetricName::PositionsStale, stale);
        measurements.count(MetricName::DeadLetters, dead_lettered);
        BatchOutcome {
            failed,
            measurements,
        }
    }
}

/// A device's newest reading with a position, and when the gateway received it (the first of
/// equals wins).
fn newest_positioned(envelopes: &[Arc<Envelope>]) -> Option<(Reading, i64)> {
    let mut newest: Option<(&Reading, i64)> = None;
    for envelope in envelopes {
        for reading in &envelope.readings {
            if reading.position().is_none() {
                continue;
            }
            let newer = newest
                .as_ref()
                .is_none_or(|(current, _)| reading.order_key() > current.order_key());
            if newer {
                newest = Some((reading, envelope.received_at));
            }
        }
    }
    newest.map(|(reading, received_at)| (reading.clone(), received_at))
}

fn to_position(reading: Reading, received_at: i64) -> Option<Position> {
    let point = reading.position()?;
    Some(Position {
        geohash: geohash_of(point)?,
        device_id: reading.device_id,
        ts: reading.ts,
        event_id: reading.event_id,
        lat: point.lat,
        lon: point.lon,
        speed_kmh: reading.speed_kmh,
        heading_deg: reading.heading_deg,
        received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use geostream_lambda::stream::KinesisEvent;
    use geostream_lambda::stream::{handle_kafka, handle_kinesis};
    use geostream_shared::memory::{MemoryDeadLetters, MemoryPositionStore};
    use geostream_shared::metrics::RecordedMetrics;

    fn event() -> KinesisEvent {
        serde_json::from_str(geostream_lambda::fixtures::KINESIS_EVENT).unwrap()
    }

    #[tokio::test]
    async fn stores_the_position_from_a_real_kinesis_event_and_ignores_replays() {
        let positions = Arc::new(MemoryPositionStore::new());
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let handler = GeoUpdate::new(positions.clone(), dead.clone());
        let response = handle_kinesis(&handler, event(), &RecordedMetrics::new()).await;
        assert!(response.batch_item_failures.is_empty());
        let stored = positions.get("truck-7").await.unwrap().unwrap();
        assert_eq!(
            (stored.lat, stored.lon, stored.received_at),
            (52.52, 13.405, 1_763_900_000_000)
        );
        assert_eq!(
            stored.geohash.len(),
            geostream_shared::geo::POSITION_GEOHASH_LEN
        );
        let metrics = RecordedMetrics::new();
        let response = handle_kinesis(&handler, event(), &metrics).await;
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(positions.get("truck-7").await.unwrap().unwrap(), stored);
        assert_eq!(
            [
                MetricName::RecordsIn,
                MetricName::PositionsUpdated,
                MetricName::PositionsStale,
                MetricName::RecordsRetried,
            ]
            .map(|name| metrics.total(FUNCTION_NAME, name)),
            [1.0, 0.0, 1.0, 0.0],
            "the replay is refused as stale"
        );
        assert!(metrics.total(FUNCTION_NAME, MetricName::IteratorAge) > 0.0);
    }

    #[tokio::test]
    async fn poison_records_go_to_dead_letters_not_retries() {
        let positions = Arc::new(MemoryPositionStore::new());
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let handler = GeoUpdate::new(positions, dead.clone());
        let mut event = event();
        event.records[0].kinesis.data.0 = b"{\"v\":1,\"oops\":true}".to_vec();
        let response = handle_kinesis(&handler, event, &RecordedMetrics::new()).await;
        assert!(response.batch_item_failures.is_empty());
        let (letters, total) = dead.snapshot();
        assert_eq!(total, 1);
        assert_eq!(letters[0].function, FUNCTION_NAME);
        assert!(
            letters[0].reason.contains("not a GeoStream envelope"),
            "{}",
            letters[0].reason
        );
    }

    #[tokio::test]
    async fn stores_the_position_from_a_real_kafka_event() {
        let event: geostream_lambda::stream::KafkaEvent =
            serde_json::from_str(geostream_lambda::fixtures::KAFKA_EVENT).unwrap();
        let positions = Arc::new(MemoryPositionStore::new());
        let handler = GeoUpdate::new(positions.clone(), Arc::new(MemoryDeadLetters::new(10)));
        let metrics = RecordedMetrics::new();
        let response = handle_kafka(&handler, event, &metrics).await;
        assert!(response.batch_item_failures.is_empty());
        let stored = positions.get("truck-7").await.unwrap().unwrap();
        assert_eq!((stored.lat, stored.lon), (52.52, 13.405));
        assert_eq!(metrics.total(FUNCTION_NAME, MetricName::RecordsIn), 3.0);
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use geostream_shared::memory::MemoryDeadLetters;
    use geostream_shared::model::GeoPoint;
    use geostream_shared::ports::{DeadLetter, NearbyVehicle, StoreError};
    use geostream_shared::stream::{RecordId, StreamRecord};

    /// Refuses `truck-bad` for good, fails `truck-flaky` for the moment, takes the rest.
    struct PickyStore;

    #[async_trait]
    impl PositionStore for PickyStore {
        async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
            match position.device_id.as_str() {
                "truck-bad" => Err(StoreError::permanent("PutItem", "item too large")),
                "truck-flaky" => Err(StoreError::transient("PutItem", "throttled")),
                _ => Ok(UpsertOutcome::Applied),
            }
        }
        async fn get(&self, _: &str) -> Result<Option<Position>, StoreError> {
            Ok(None)
        }
        async fn near(
            &self,
            _: GeoPoint,
            _: f64,
            _: usize,
        ) -> Result<Vec<NearbyVehicle>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// A sink that is down.
    struct DownSink;

    #[async_trait]
    impl DeadLetterSink for DownSink {
        async fn send(&self, _: Vec<DeadLetter>) -> Result<(), StoreError> {
            Err(StoreError::transient("SendMessageBatch", "unavailable"))
        }
    }

    fn batch() -> StreamBatch {
        let records = ["truck-ok", "truck-bad", "truck-flaky", "truck-bad"]
            .iter()
            .enumerate()
            .map(|(n, device)| {
                let envelope = Envelope {
                    v: geostream_shared::envelope::ENVELOPE_VERSION,
                    device_id: device.to_string(),
                    received_at: 1_000,
                    readings: vec![Reading {
                        device_id: device.to_string(),
                        ts: 1_000 + n as i64,
                        event_id: format!("{device}@{n}"),
                        lat: Some(52.5),
                        lon: Some(13.4),
                        ..Default::default()
                    }],
                };
                StreamRecord {
                    id: RecordId::kinesis((10 + n).to_string()),
                    partition_key: device.to_string(),
                    data: envelope.encode().into(),
                    arrived_at: None,
                    decoded: None,
                }
            })
            .collect();
        StreamBatch { records }
    }

    #[tokio::test]
    async fn a_refusal_for_good_is_dead_lettered_at_once_and_only_the_transient_is_retried() {
        let dead = Arc::new(MemoryDeadLetters::new(10));
        let handler = GeoUpdate::new(Arc::new(PickyStore), dead.clone());
        let outcome = handler.process(&batch()).await;
        assert_eq!(outcome.failed_ids(), [RecordId::kinesis("12")]);
        let (letters, total) = dead.snapshot();
        assert_eq!(total, 2);
        assert!(letters.iter().all(|l| l.partition_key == "truck-bad"
            && l.reason.contains("item too large")
            && l.error_kind == ErrorKind::Permanent
            && Envelope::decode(&l.data).unwrap().device_id == "truck-bad"));
        assert_eq!(outcome.measurements.get(MetricName::DeadLetters), Some(2.0));
    }

    #[tokio::test]
    async fn a_refusal_is_retried_while_the_dead_letter_sink_is_down() {
        let handler = GeoUpdate::new(Arc::new(PickyStore), Arc::new(DownSink));
        assert_eq!(
            handler.process(&batch()).await.failed_ids(),
            [
                RecordId::kinesis("11"),
                RecordId::kinesis("12"),
                RecordId::kinesis("13")
            ]
        );
    }
}
