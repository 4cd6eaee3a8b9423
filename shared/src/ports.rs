//! The ports (docs/architecture.md, "Ports and adapters"): the small traits the handlers talk to. Each has an
//! in-memory adapter in [`crate::memory`]; the AWS and Kafka adapters implement the same traits.

use async_trait::async_trait;
use serde::Serialize;

use crate::model::{Alert, AlertState, Position, Reading};
use crate::rules::DeviceRuleStates;
use crate::EpochMillis;

/// Whether retrying the failed operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling, timeouts, 5xx: try again later.
    Transient,
    /// The request itself is wrong; retrying will fail the same way.
    Permanent,
    /// An optimistic-concurrency check failed: reload and try again.
    Conflict,
    /// The store cannot answer the request as asked (a time range longer than it reads, an id
    /// it cannot hold): the caller must ask differently.
    Invalid,
}

/// An error from a store or bus adapter, saying what failed and whether to retry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct StoreError {
    pub kind: ErrorKind,
    pub operation: &'static str,
    pub message: String,
}

impl StoreError {
    pub fn transient(operation: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Transient,
            operation,
            message: message.into(),
        }
    }
    pub fn permanent(operation: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Permanent,
            operation,
            message: message.into(),
        }
    }
    pub fn invalid(operation: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Invalid,
            operation,
            message: message.into(),
        }
    }
    pub fn conflict(operation: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::Conflict,
            operation,
            message: message.into(),
        }
    }
}

/// One record to publish on a bus, keyed by device so per-device order is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct BusRecord {
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// Where a published record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub shard_id: String,
    pub sequence_number: String,
}

#[async_trait]
pub trait EventBus: Send + Sync {
    /// Publishes a batch; the result has one entry per record, in order. A failed entry was not
    /// published (after the adapter's own retries) and says why.
    async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>>;
}

/// Whether an upsert moved the vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    Applied,
    /// The store already holds a newer (or the same) reading: positions never go back in time.
    Stale,
}

#[async_trait]
pub trait PositionStore: Send + Sync {
    /// Stores the position unless the store holds one with a later or equal `(ts, event_id)`.
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError>;
    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError>;
    /// The vehicles within `radius_m` of `center`, nearest first (ties by device id), at most
    /// `limit`: exactly what a brute-force scan with [`crate::geo::haversine_m`] would answer.
    async fn near(
        &self,
        center: crate::model::GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<NearbyVehicle>, StoreError>;
}

/// A reading the archive refused for good (retrying cannot help), with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedReading {
    /// Index into the slice given to [`Archive::write`].
    pub index: usize,
    pub reason: String,
}

#[async_trait]
pub trait Archive: Send + Sync {
    /// Upserts readings keyed by (device, ts, event_id): a retried write changes nothing.
    /// Readings the archive refuses for good are returned with the reason; an `Err` means
    /// nothing can be said about the batch and all of it should be retried.
    async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError>;
    /// A device's readings with `from <= ts < to`, oldest first, at most `limit`.
    async fn track(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError>;
}

/// Which alerts to list.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub state: Option<AlertState>,
    pub device_id: Option<String>,
    pub limit: usize,
}

#[async_trait]
pub trait AlertStore: Send + Sync {
    /// The rule state of a device; a device never seen has the default (version 0).
    async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError>;
    /// Saves the new rule state and the alerts it touched, atomically, only if the stored
    /// state still has `expected_version` (else an [`ErrorKind::Conflict`] error). Alert
    /// acknowledgements already stored are kept.
    async fn commit(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        alerts: &[Alert],
    ) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError>;
    async fn get_alert(&self, alert_id: &str) -> Result<Option<Alert>, StoreError>;
    /// Acknowledges an alert (idempotent: the first acknowledgement is kept). `None` if there
    /// is no such alert.
    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        at: EpochMillis,
    ) -> Result<Option<Alert>, StoreError>;
}

/// A record a stream function gave up on, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The function that gave up.
    pub function: String,
    /// The record's id on the bus (Kinesis sequence number or Kafka offset).
    pub record_id: String,
    pub partition_key: String,
    /// The record's data, lossy UTF-8 (it is JSON when it came from ingest).
    pub data: String,
    pub reason: String,
    pub attempts: u32,
    pub failed_at: EpochMillis,
}

#[async_trait]
pub trait DeadLetterSink: Send + Sync {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError>;
}

/// A vehicle found by a radius query, with its distance from the query point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NearbyVehicle {
    #[serde(flatten)]
    pub position: Position,
    pub distance_m: f64,
}

/// The position with its geohash filled in when the caller left it empty (every store indexes
/// by it); an error naming `operation` when the point has none (out of range).
pub fn with_geohash(
    mut position: Position,
    operation: &'static str,
) -> Result<Position, StoreError> {
    if position.geohash.is_empty() {
        position.geohash = crate::geo::geohash_of(position.point()).ok_or_else(|| {
            StoreError::permanent(operation, format!("position out of range: {position:?}"))
        })?;
    }
    Ok(position)
}

/// Of `candidates` (a superset of the answer, in any order, possibly with repeats), the ones
/// within `radius_m` of `center` by exact haversine distance, nearest first (ties by device
/// id), at most `limit`: what every store's [`PositionStore::near`] answers. Only the answer
/// is cloned.
pub fn nearest<'a>(
    center: crate::model::GeoPoint,
    radius_m: f64,
    limit: usize,
    candidates: impl IntoIterator<Item = &'a Position>,
) -> Vec<NearbyVehicle> {
    let within = candidates
        .into_iter()
        .map(|position| (crate::geo::haversine_m(center, position.point()), position))
        .filter(|(distance_m, _)| *distance_m <= radius_m)
        .collect();
    nearest_of(within, limit)
}

/// [`nearest`] for candidates whose distances are known and within the radius.
pub fn nearest_of(mut within: Vec<(f64, &Position)>, limit: usize) -> Vec<NearbyVehicle> {
    within.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then_with(|| a.1.device_id.cmp(&b.1.device_id))
    });
    within.dedup_by(|a, b| a.1.device_id == b.1.device_id);
    within.truncate(limit);
    within
        .into_iter()
        .map(|(distance_m, position)| NearbyVehicle {
            position: position.clone(),
            distance_m,
        })
        .collect()
}
