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
use geostream_shared::ports::{DeadLetterSink, PositionStore, UpsertOutcome};
use geostream_shared::stream::{
    decode_batch, group_by_device, BatchOutcome, StreamBatch, StreamFunction, DEVICE_CONCURRENCY,
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

    async fn process(&self, batch: StreamBatch) -> BatchOutcome {
        let decoded = decode_batch(FUNCTION_NAME, batch, self.dead_letters.as_ref()).await;
        let mut failed = decoded.retry;
        let (mut applied, mut stale) = (0usize, 0usize);
        let upserts = group_by_device(decoded.records)
            .into_iter()
            .filter_map(|group| {
                let (reading, received_at) = newest_positioned(group.envelopes)?;
                Some((
                    group.device_id,
                    group.record_ids,
                    to_position(reading, received_at)?,
                ))
            });
        let mut outcomes = stream::iter(upserts.map(|(device, record_ids, position)| async move {
            let outcome = self.positions.upsert_if_newer(position).await;
            (device, record_ids, outcome)
        }))
        .buffer_unordered(DEVICE_CONCURRENCY);
        while let Some((device, record_ids, outcome)) = outcomes.next().await {
            match outcome {
                Ok(UpsertOutcome::Applied) => applied += 1,
                Ok(UpsertOutcome::Stale) => stale += 1,
                Err(error) => {
                    tracing::warn!(function = FUNCTION_NAME, device_id = %device, %error, "position upsert failed; records will be retried");
                    failed.extend(record_ids);
                }
            }
        }
        let mut measurements = Measurements::default();
        measurements.count(MetricName::PositionsUpdated, applied);
        measurements.count(MetricName::PositionsStale, stale);
        measurements.count(MetricName::DeadLetters, decoded.dead_lettered);
        BatchOutcome {
            failed,
            measurements,
        }
    }
}

/// A device's newest reading with a position, and when the gateway received it (the first of
/// equals wins).
fn newest_positioned(envelopes: Vec<Envelope>) -> Option<(Reading, i64)> {
    let mut newest: Option<(Reading, i64)> = None;
    for envelope in envelopes {
        for reading in envelope.readings {
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
    newest
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
    use aws_lambda_events::event::kinesis::KinesisEvent;
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
        let event: aws_lambda_events::event::kafka::KafkaEvent =
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
