//! The ports (docs/architecture.md, "Ports and adapters"): the small traits the handlers talk to. Each has an
//! in-memory adapter in [`crate::memory`]; the AWS and Kafka adapters implement the same traits.

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::fleet::{FleetEvent, FleetEventType, Geofence};
use crate::history::{HistoryItem, HistoryKind};
use crate::model::{Alert, AlertState, Position, Reading};
use crate::rules::DeviceRuleStates;
use crate::EpochMillis;

/// Whether retrying the failed operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The envelope `data` encodes, when the publisher has it. The in-process bus hands it to
    /// its readers so that they need not parse `data` again; Kinesis and Kafka send `data` only.
    pub decoded: Option<std::sync::Arc<crate::envelope::Envelope>>,
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

/// The most alerts one [`AlertStore::commit`] takes: DynamoDB's transactions hold 100 items,
/// one of them the rule state. The anomaly-inspector commits a device's readings in as many
/// steps as keep every step within it.
pub const MAX_ALERTS_PER_COMMIT: usize = 99;

/// What one rule-state commit changes among the alert records.
#[derive(Debug, Clone, Copy)]
pub struct AlertChanges<'a> {
    /// Records written whole (stored acknowledgements kept).
    pub touched: &'a [Alert],
    /// Records removed: alerts a late reading showed in-order delivery would not have made.
    pub removed: &'a [String],
}

impl AlertChanges<'_> {
    pub const NONE: AlertChanges<'static> = AlertChanges {
        touched: &[],
        removed: &[],
    };

    pub fn len(&self) -> usize {
        self.touched.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
pub trait AlertStore: Send + Sync {
    /// The rule state of a device; a device never seen has the default (version 0).
    async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError>;
    /// Saves the new rule state and the alert records it changed (at most
    /// [`MAX_ALERTS_PER_COMMIT`] written and removed), atomically, only if the stored state
    /// still has `expected_version` (else an [`ErrorKind::Conflict`] error). Alert
    /// acknowledgements already stored are kept.
    async fn commit_changes(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        changes: AlertChanges<'_>,
    ) -> Result<(), StoreError>;

    /// [`AlertStore::commit_changes`] that writes `alerts` and removes none.
    async fn commit(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        alerts: &[Alert],
    ) -> Result<(), StoreError> {
        let changes = AlertChanges {
            touched: alerts,
            removed: &[],
        };
        self.commit_changes(device_id, expected_version, states, changes)
            .await
    }
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

/// Geofences, as `PUT`, `GET` and `DELETE /v1/geofences/{geofence_id}` write and read them.
#[async_trait]
pub trait GeofenceStore: Send + Sync {
    /// Writes the geofence whole (a PUT replaces it).
    async fn put(&self, geofence: &Geofence) -> Result<(), StoreError>;
    async fn get(&self, geofence_id: &str) -> Result<Option<Geofence>, StoreError>;
    /// Every geofence, by id.
    async fn list(&self) -> Result<Vec<Geofence>, StoreError>;
    /// Whether there was one to delete.
    async fn delete(&self, geofence_id: &str) -> Result<bool, StoreError>;
    /// A number that changes with every write and delete: the stream functions' cached
    /// geofences are built again when it does.
    async fn version(&self) -> Result<u64, StoreError>;
}

/// Where the offline check finds the vehicles that may have gone silent: those whose newest
/// position arrived before a time. A superset: each is checked against its own state, which
/// knows when a reading of it was last evaluated.
#[async_trait]
pub trait SilentCandidates: Send + Sync {
    async fn heard_from_before(&self, before: EpochMillis) -> Result<Vec<String>, StoreError>;
}

/// Which fleet events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub device_id: Option<String>,
    pub kind: Option<FleetEventType>,
    pub geofence_id: Option<String>,
    /// `from <= ts < to`.
    pub from: Option<EpochMillis>,
    pub to: Option<EpochMillis>,
    pub limit: usize,
}

impl EventFilter {
    pub fn matches(&self, event: &FleetEvent) -> bool {
        self.device_id
            .as_deref()
            .is_none_or(|d| event.device_id == d)
            && self.kind.is_none_or(|k| event.kind == k)
            && self
                .geofence_id
                .as_deref()
                .is_none_or(|g| event.geofence_id.as_deref() == Some(g))
            && self.from.is_none_or(|from| event.ts >= from)
            && self.to.is_none_or(|to| event.ts < to)
    }
}

/// A vehicle inside a geofence, since its enter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Occupant {
    pub device_id: String,
    pub since: EpochMillis,
}

/// Fleet events, as the anomaly-inspector records them and `GET /v1/events` lists them, and
/// who is inside each geofence, as their enters and exits tell.
#[async_trait]
pub trait FleetEventStore: Send + Sync {
    /// Stores events, in the order made (idempotent: an event id stored before changes
    /// nothing).
    async fn record(&self, events: &[FleetEvent]) -> Result<(), StoreError>;
    /// Newest first (ties by event id), at most `filter.limit`.
    async fn list(&self, filter: &EventFilter) -> Result<Vec<FleetEvent>, StoreError>;
    /// The vehicles inside a geofence now (entered, not exited), by device id.
    async fn occupants(&self, geofence_id: &str) -> Result<Vec<Occupant>, StoreError>;
    /// Forgets who is inside a geofence (it was deleted: its memberships end without exits).
    async fn clear_occupants(&self, geofence_id: &str) -> Result<(), StoreError>;
}

/// Trips, stops and minute summaries of each vehicle, as the anomaly-inspector completes them
/// and the history routes read them.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// Stores a vehicle's complete items, keyed by (device, kind, start): an item written again
    /// (a retried batch makes the same one) replaces the one stored.
    async fn write(&self, device_id: &str, items: &[HistoryItem]) -> Result<(), StoreError>;
    /// A vehicle's items of one kind that start in `from..to`, oldest first, at most `limit`.
    async fn read(
        &self,
        device_id: &str,
        kind: HistoryKind,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError>;
}

/// A record a stream function gave up on, whole, with where it sat and why: what a redrive
/// puts back through the same handler. Serialized as the dead-letter message (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The function that gave up (`geo-update`, `archiver`, `anomaly-inspector`).
    pub function: String,
    /// The record's place on the bus: a Kinesis sequence number or Kafka `topic-partition@offset`.
    pub record_id: String,
    pub partition_key: String,
    /// The record's bytes as the bus carried them (for a refusal of some of a record's
    /// readings, an envelope of just those), base64 in the message: nothing is cut or
    /// re-encoded, so a redrive replays exactly what failed.
    #[serde(rename = "data_base64", with = "base64_bytes")]
    pub data: Vec<u8>,
    /// When the bus took the record, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrived_at: Option<EpochMillis>,
    /// Whether retrying could have helped: `permanent` (undecodable, refused by a store) or
    /// `transient` (failed until the retry budget ran out), `conflict`, `invalid`.
    pub error_kind: ErrorKind,
    pub reason: String,
    /// How often the function failed the record before it gave up.
    pub attempts: u32,
    pub failed_at: EpochMillis,
}

impl DeadLetter {
    /// A letter for `data`, failed once, now.
    pub fn new(
        function: &str,
        record_id: impl ToString,
        partition_key: impl Into<String>,
        data: Vec<u8>,
        error: &StoreError,
    ) -> Self {
        DeadLetter {
            function: function.to_string(),
            record_id: record_id.to_string(),
            partition_key: partition_key.into(),
            data,
            arrived_at: None,
            error_kind: error.kind,
            reason: error.to_string(),
            attempts: 1,
            failed_at: crate::now_millis(),
        }
    }
}

/// Bytes as standard base64 text in JSON.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[async_trait]
pub trait DeadLetterSink: Send + Sync {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError>;
}

/// How many distinct free metric names a deployment takes by default. The Timestream archive
/// stores each as a measure, and a Timestream table holds at most 8,192 measure names: this
/// leaves room for the fixed fields and a margin.
pub const DEFAULT_MAX_METRIC_NAMES: usize = 8_000;

/// The free metric names a deployment has taken, bounded: ingest admits a reading's metric
/// names here before publishing it, so a stream of ever new names is refused at the door (a
/// 400 for that reading) instead of exhausting the archive's schema downstream.
#[async_trait]
pub trait MetricNameRegistry: Send + Sync {
    /// Registers the names not yet known while there is room; answers the names refused
    /// because the deployment already holds its limit of distinct names.
    async fn admit(&self, names: &BTreeSet<String>) -> Result<BTreeSet<String>, StoreError>;
    /// The limit of distinct names.
    fn limit(&self) -> usize;
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
