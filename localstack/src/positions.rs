//! What the runner observes of the position store: the POST-to-position latency of every
//! applied position, and (on the AWS backend, where the store cannot list vehicles cheaply)
//! the latest position of each vehicle for the live page. Two jobs, two types; one decorator
//! feeds both. And of the alerts bus: the POST-to-alert latency of every transition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use geostream_shared::model::{AlertTransition, GeoPoint, Position};
use geostream_shared::ports::{
    BusRecord, EventBus, NearbyVehicle, PositionStore, Published, StoreError, UpsertOutcome,
};
use geostream_shared::{now_millis, EpochMillis};
use hdrhistogram::Histogram;
use serde::Serialize;

/// How long after a reading something it caused happened: its position applied (since the
/// gateway received it), an alert transition published (since the reading's event time), a
/// record read by a mapping (since it was written to the stream).
#[derive(Debug)]
pub struct SinceReading {
    millis: Mutex<Histogram<u64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    pub samples: u64,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl Default for SinceReading {
    fn default() -> Self {
        SinceReading {
            millis: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

impl SinceReading {
    pub(crate) fn record(&self, since: EpochMillis) {
        self.record_all([since]);
    }

    /// Records each of `times` (one lock for all).
    pub(crate) fn record_all(&self, times: impl IntoIterator<Item = EpochMillis>) {
        let now = now_millis();
        let mut histogram = self.millis.lock().unwrap_or_else(|p| p.into_inner());
        for since in times {
            // Beyond the histogram's hour the value is clamped by `saturating_record`.
            histogram.saturating_record((now - since).max(1) as u64);
        }
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let histogram = self.millis.lock().unwrap_or_else(|p| p.into_inner());
        LatencySnapshot {
            samples: histogram.len(),
            p50_ms: histogram.value_at_quantile(0.5),
            p90_ms: histogram.value_at_quantile(0.9),
            p99_ms: histogram.value_at_quantile(0.99),
            max_ms: histogram.max(),
        }
    }
}

/// The latest position of every vehicle this runner has written.
#[derive(Default)]
pub struct LatestPositions {
    by_device: Mutex<HashMap<String, Position>>,
}

impl LatestPositions {
    fn keep(&self, position: Position) {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(position.device_id.clone(), position);
    }

    pub fn all(&self) -> Vec<Position> {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The position store, with every applied position reported to the latency histogram and,
/// when kept, to the latest-positions cache.
pub struct ObservedPositions {
    pub inner: Arc<dyn PositionStore>,
    pub latency: Arc<SinceReading>,
    pub latest: Option<Arc<LatestPositions>>,
}

#[async_trait]
impl PositionStore for ObservedPositions {
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
        let received_at = position.received_at;
        let kept = self.latest.as_ref().map(|_| position.clone());
        let outcome = self.inner.upsert_if_newer(position).await?;
        if outcome == UpsertOutcome::Applied {
            if let (Some(latest), Some(position)) = (&self.latest, kept) {
                latest.keep(position);
            }
            self.latency.record(received_at);
        }
        Ok(outcome)
    }
    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError> {
        self.inner.get(device_id).await
    }
    async fn near(
        &self,
        center: GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<NearbyVehicle>, StoreError> {
        self.inner.near(center, radius_m, limit).await
    }
}

/// The alerts bus, with every published transition's latency since the reading that made it
/// (the simulator stamps readings with the time it posts them, so this is POST-to-alert).
pub struct ObservedAlerts {
    pub inner: Arc<dyn EventBus>,
    pub latency: Arc<SinceReading>,
}

#[async_trait]
impl EventBus for ObservedAlerts {
    async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>> {
        let made_at: Vec<Option<EpochMillis>> = records
            .iter()
            .map(|r| {
                serde_json::from_slice::<AlertTransition>(&r.data)
                    .ok()
                    .map(|t| t.at)
            })
            .collect();
        let results = self.inner.publish(records).await;
        for (result, at) in results.iter().zip(made_at) {
            if let (Ok(_), Some(at)) = (result, at) {
                self.latency.record(at);
            }
        }
        results
    }
}
