//! In-memory adapters of every port: the embedded runner's bus and stores, and the tests'.
//! Each keeps the semantics the AWS adapters promise (conditional writes, upserts, per-shard
//! order) and bounds its memory, saying what it drops.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::envelope::Envelope;
use crate::fleet::{FleetEvent, FleetEventType, Geofence};
use crate::model::{Alert, GeoPoint, Position};
use crate::ports::{nearest_of, with_geohash, NearbyVehicle};
use crate::ports::{
    AlertChanges, AlertFilter, AlertStore, BusRecord, DeadLetter, DeadLetterSink, EventBus,
    EventFilter, FleetEventStore, GeofenceStore, MetricNameRegistry, Occupant, PositionStore,
    Published, StoreError, UpsertOutcome,
};
use crate::rules::DeviceRuleStates;
use crate::{now_millis, EpochMillis};

mod archive;
mod history;
pub use archive::MemoryArchive;
pub use history::MemoryHistory;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every writer here
/// leaves the data consistent before anything that could panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record as a shard keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub sequence: u64,
    pub partition_key: String,
    /// Shared by every reader's copy of the record.
    pub data: bytes::Bytes,
    /// The envelope `data` encodes, as the publisher handed it over.
    pub decoded: Option<Arc<Envelope>>,
    pub arrival: EpochMillis,
}

impl StoredRecord {
    /// What the record takes in memory, by the stream's count: a decoded envelope is counted
    /// as the size of its encoding again (its readings' fields and strings take about as much).
    fn bytes(&self) -> usize {
        let decoded = self.decoded.as_ref().map_or(0, |_| self.data.len());
        std::mem::size_of::<StoredRecord>() + self.partition_key.len() + self.data.len() + decoded
    }
}

#[derive(Default)]
struct ShardRecords {
    records: VecDeque<StoredRecord>,
    bytes: usize,
    /// The newest record's sequence number (kept when every record is gone).
    last_sequence: u64,
}

struct Shard {
    /// Kinesis's shard id (`shardId-000000000000`), made once: every record published names it.
    id: String,
    records: Mutex<ShardRecords>,
    /// Each registered reader's first sequence number not yet done with: records before all of
    /// them are done with and dropped (nothing in this process reads a record again).
    readers: Mutex<Vec<Arc<AtomicU64>>>,
    /// The sequence number of the newest record; readers wait on it.
    tip: watch::Sender<u64>,
}

/// What a read of a shard returned.
#[derive(Debug, Default)]
pub struct ShardRead {
    pub records: Vec<StoredRecord>,
    /// Records the reader asked for that had already been trimmed by retention.
    pub expired: u64,
}

/// An in-memory stream with Kinesis semantics: records are routed to shards by the MD5 of
/// their partition key (so one device always lands on one shard, in order), and each shard
/// keeps at most `retention` records and its share of `max_bytes`, oldest trimmed first (a
/// reader asking for a trimmed record is told how many it missed).
pub struct MemoryStream {
    name: String,
    shards: Vec<Shard>,
    retention: usize,
    max_bytes_per_shard: usize,
    trimmed: AtomicU64,
    backpressure: Option<Backpressure>,
    /// Publishes that waited for a slow reader, and those that gave up waiting.
    held_back: AtomicU64,
    waited_out: AtomicU64,
}

/// How far the slowest registered reader of a shard may fall behind before a publish waits for
/// it: a bounded queue, so that a function slower than the gateway under sustained load slows
/// the gateway's clients instead of its unread records being trimmed. The bound is in records
/// and in bytes, whichever is reached first; set well below retention, it lets the stream absorb
/// a burst that a slower function works off afterwards (as a Kinesis stream does), while a
/// sustained overload reaches it. A publish waits at most `max_wait` (a reader that is stuck,
/// not slow, must not stop ingest); then it goes ahead and retention trims, and counts, as
/// without a bound.
#[derive(Debug, Clone, Copy)]
pub struct Backpressure {
    pub unprocessed_per_shard: u64,
    pub unprocessed_bytes_per_shard: usize,
    pub max_wait: std::time::Duration,
}

impl MemoryStream {
    /// A stream bounded in records per shard only.
    pub fn new(name: impl Into<String>, shard_count: usize, retention_per_shard: usize) -> Self {
        Self::with_byte_limit(name, shard_count, retention_per_shard, usize::MAX)
    }

    /// A stream bounded in records per shard and in bytes (split evenly between the shards).
    pub fn with_byte_limit(
        name: impl Into<String>,
        shard_count: usize,
        retention_per_shard: usize,
        max_bytes: usize,
    ) -> Self {
        let shard_count = shard_count.max(1);
        let shards = (0..shard_count)
            .map(|shard| Shard {
                id: Self::shard_id(shard),
                records: Mutex::new(ShardRecords::default()),
                readers: Mutex::new(Vec::new()),
                tip: watch::channel(0).0,
            })
            .collect();
        MemoryStream {
            name: name.into(),
            shards,
            retention: retention_per_shard.max(1),
            max_bytes_per_shard: max_bytes / shard_count,
            trimmed: AtomicU64::new(0),
            backpressure: None,
            held_back: AtomicU64::new(0),
            waited_out: AtomicU64::new(0),
        }
    }

    /// The stream with a bound on its readers' backlog (see [`Backpressure`]).
    pub fn with_backpressure(mut self, backpressure: Backpressure) -> Self {
        self.backpressure = Some(backpressure);
        self
    }

    /// Publishes that waited for a slow reader so far, and of them those that waited the
    /// longest allowed and went ahead anyway.
    pub fn held_back(&self) -> (u64, u64) {
        (
            self.held_back.load(Ordering::Relaxed),
            self.waited_out.load(Ordering::Relaxed),
        )
    }

    /// Records of the shard its slowest registered reader is not done with, and their bytes
    /// (none without registered readers).
    fn unprocessed(shard: &Shard) -> (u64, usize) {
        let mut stored = lock(&shard.records);
        if !Self::drop_done_with(shard, &mut stored) {
            return (0, 0);
        }
        (stored.records.len() as u64, stored.bytes)
    }

    /// Drops the records every registered reader of the shard is done with (they are not
    /// counted as trimmed); whether the shard has registered readers.
    fn drop_done_with(shard: &Shard, stored: &mut ShardRecords) -> bool {
        let Some(done_with) = lock(&shard.readers)
            .iter()
            .map(|cursor| cursor.load(Ordering::Acquire))
            .min()
        else {
            return false;
        };
        while stored
            .records
            .front()
            .is_some_and(|r| r.sequence < done_with)
        {
            if let Some(done) = stored.records.pop_front() {
                stored.bytes -= done.bytes();
            }
        }
        true
    }

    /// Waits while a shard's slowest reader is behind by [`Backpressure::unprocessed_per_shard`]
    /// records or [`Backpressure::unprocessed_bytes_per_shard`] bytes or more, at most
    /// [`Backpressure::max_wait`].
    async fn wait_for_readers(&self) {
        let Some(bound) = self.backpressure else {
            return;
        };
        let behind = || {
            self.shards.iter().any(|shard| {
                let (records, bytes) = Self::unprocessed(shard);
                records >= bound.unprocessed_per_shard || bytes >= bound.unprocessed_bytes_per_shard
            })
        };
        if !behind() {
            return;
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + bound.max_wait;
        while behind() {
            if tokio::time::Instant::now() >= deadline {
                self.waited_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
            // Readers move their cursors without telling the stream; a millisecond is the
            // timer's resolution and short beside a batch's processing.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Registers a reader of `shard`: it stores there the first sequence number it is not done
    /// with (starting at 1), and once every registered reader of the shard is done with a
    /// record, the record is dropped rather than kept until retention trims it.
    pub fn register_reader(&self, shard: usize) -> Arc<AtomicU64> {
        let cursor = Arc::new(AtomicU64::new(1));
        if let Some(shard) = self.shards.get(shard) {
            lock(&shard.readers).push(cursor.clone());
        }
        cursor
    }

    /// The bytes its records take, by its own count.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.records).bytes).sum()
    }

    /// Records trimmed by retention so far, read or not.
    pub fn trimmed(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Kinesis's shard id format.
    pub fn shard_id(shard: usize) -> String {
        format!("shardId-{shard:012}")
    }

    /// The shard of a partition key: the key's 128-bit MD5 hash split evenly across shards,
    /// as Kinesis splits its hash key range.
    pub fn shard_of(&self, partition_key: &str) -> usize {
        let hash = u128::from_be_bytes(md5::compute(partition_key.as_bytes()).0);
        (((hash >> 64) * self.shards.len() as u128) >> 64) as usize
    }

    /// Records of `shard` with a sequence number of at least `from`, at most `max` of them.
    pub fn read(&self, shard: usize, from: u64, max: usize) -> ShardRead {
        let Some(shard) = self.shards.get(shard) else {
            return ShardRead::default();
        };
        let shard = lock(&shard.records);
        let records = &shard.records;
        let Some(first) = records.front().map(|r| r.sequence) else {
            return ShardRead::default();
        };
        let expired = first.saturating_sub(from);
        let start = from.saturating_sub(first) as usize;
        ShardRead {
            records: records.iter().skip(start).take(max).cloned().collect(),
            expired,
        }
    }

    /// A receiver of the shard's newest sequence number, to wait for new records.
    pub fn subscribe(&self, shard: usize) -> Option<watch::Receiver<u64>> {
        self.shards.get(shard).map(|s| s.tip.subscribe())
    }

    /// The newest sequence number of each shard.
    pub fn tips(&self) -> Vec<u64> {
        self.shards.iter().map(|s| *s.tip.borrow()).collect()
    }

    fn append(&self, record: BusRecord) -> Published {
        let shard_index = self.shard_of(&record.partition_key);
        let shard = &self.shards[shard_index];
        let mut stored = lock(&shard.records);
        stored.last_sequence += 1;
        let sequence = stored.last_sequence;
        let record = StoredRecord {
            sequence,
            partition_key: record.partition_key,
            data: record.data.into(),
            decoded: record.decoded,
            arrival: now_millis(),
        };
        stored.bytes += record.bytes();
        stored.records.push_back(record);
        // Records every registered reader is done with go first; then retention trims.
        Self::drop_done_with(shard, &mut stored);
        let mut trimmed = 0;
        while stored.records.len() > self.retention
            || (stored.bytes > self.max_bytes_per_shard && stored.records.len() > 1)
        {
            if let Some(oldest) = stored.records.pop_front() {
                stored.bytes -= oldest.bytes();
                trimmed += 1;
            }
        }
        if trimmed > 0 {
            self.trimmed.fetch_add(trimmed, Ordering::Relaxed);
        }
        shard.tip.send_replace(sequence);
        Published {
            shard_id: shard.id.clone(),
            sequence_number: format_sequence(sequence),
        }
    }
}

/// Sequence numbers as zero-padded decimal strings, so that text order is numeric order. Made
/// for every record published and again for each function reading it: `itoa` and the padding
/// by hand, as `format!("{sequence:020}")` took 4% of the embedded burst's CPU.
pub fn format_sequence(sequence: u64) -> String {
    const WIDTH: usize = 20; // u64::MAX has 20 digits
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(sequence);
    let mut text = String::with_capacity(WIDTH);
    text.extend(std::iter::repeat_n('0', WIDTH.saturating_sub(digits.len())));
    text.push_str(digits);
    text
}

pub fn parse_sequence(text: &str) -> Option<u64> {
    text.parse().ok()
}

#[async_trait]
impl EventBus for MemoryStream {
    async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>> {
        self.wait_for_readers().await;
        records
            .into_iter()
            .map(|record| Ok(self.append(record)))
            .collect()
    }
}

#[derive(Default)]
struct PositionIndex {
    by_device: HashMap<String, Position>,
    /// (geohash, device id): positions in a cell are a prefix range.
    by_cell: BTreeSet<(String, String)>,
}

/// Latest positions with a geohash index.
#[derive(Default)]
pub struct MemoryPositionStore {
    inner: RwLock<PositionIndex>,
}

impl MemoryPositionStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_device
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every stored position (for the dashboard and brute-force checks).
    pub fn all(&self) -> Vec<Position> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_device.values().cloned().collect()
    }

    /// Removes the positions of vehicles last heard from before `before` (retention); how
    /// many.
    pub fn expire(&self, before: EpochMillis) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        let by_cell = &mut inner.by_cell;
        let count = inner.by_device.len();
        inner.by_device.retain(|device_id, position| {
            let keep = position.ts >= before;
            if !keep {
                by_cell.remove(&(position.geohash.clone(), device_id.clone()));
            }
            keep
        });
        count - inner.by_device.len()
    }
}

#[async_trait]
impl PositionStore for MemoryPositionStore {
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
        let position = with_geohash(position, "position upsert")?;
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        match inner.by_device.get_mut(&position.device_id) {
            Some(current) => {
                if (current.ts, current.event_id.as_str())
                    >= (position.ts, position.event_id.as_str())
                {
                    return Ok(UpsertOutcome::Stale);
                }
                let moved = current.geohash != position.geohash;
                let replaced = std::mem::replace(current, position);
                // A vehicle still in its cell keeps its index entry; one that moved is found
                // by the replaced position's own strings, nothing copied to look it up.
                if moved {
                    inner
                        .by_cell
                        .remove(&(replaced.geohash, replaced.device_id));
                    inner
                        .by_cell
                        .insert((current.geohash.clone(), current.device_id.clone()));
                }
            }
            None => {
                inner
                    .by_cell
                    .insert((position.geohash.clone(), position.device_id.clone()));
                inner.by_device.insert(position.device_id.clone(), position);
            }
        }
        Ok(UpsertOutcome::Applied)
    }

    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError> {
        Ok(self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_device
            .get(device_id)
            .cloned())
    }

    /// Nearest first, searching outwards: rings of growing radius up to `radius_m`, stopping
    /// as soon as one holds `limit` vehicles. Exact: every vehicle beyond a ring is farther than
    /// all `limit` found inside it, so they are the nearest within `radius_m` too. A ring that
    /// falls short grows by what its density says the next needs.
    async fn near(
        &self,
        center: GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<NearbyVehicle>, StoreError> {
        let mut ring_m = radius_m.min(FIRST_RING_M);
        loop {
            let (found, within) = self.nearest_within(center, ring_m, limit);
            if found.len() >= limit || ring_m >= radius_m {
                return Ok(found);
            }
            let density_guess = (limit as f64 / within.max(1) as f64).sqrt() * 1.25;
            ring_m = (ring_m * density_guess.clamp(1.5, 8.0)).min(radius_m);
        }
    }
}

/// The first ring a nearest search reads.
const FIRST_RING_M: f64 = 1_000.0;

impl MemoryPositionStore {
    /// The `limit` nearest vehicles within `radius_m`, and how many were within it. Distances
    /// are taken under the read lock and only the answer is cloned.
    fn nearest_within(
        &self,
        center: GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> (Vec<NearbyVehicle>, usize) {
        let cells = crate::geo::cover_circle(center, radius_m);
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut hits: Vec<(f64, &Position)> = Vec::new();
        for prefix in &cells {
            let start = (prefix.clone(), String::new());
            for (hash, device) in inner.by_cell.range(start..) {
                if !hash.starts_with(prefix.as_str()) {
                    break;
                }
                if let Some(position) = inner.by_device.get(device) {
                    let distance_m = crate::geo::haversine_m(center, position.point());
                    if distance_m <= radius_m {
                        hits.push((distance_m, position));
                    }
                }
            }
        }
        let within = hits.len();
        (nearest_of(hits, limit), within)
    }

    /// Every position whose geohash starts with one of `prefixes`.
    pub fn query_prefixes(&self, prefixes: &[String]) -> Vec<Position> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut found = Vec::new();
        for prefix in prefixes {
            let start = (prefix.clone(), String::new());
            for (hash, device) in inner.by_cell.range(start..) {
                if !hash.starts_with(prefix.as_str()) {
                    break;
                }
                if let Some(position) = inner.by_device.get(device) {
                    found.push(position.clone());
                }
            }
        }
        found
    }
}

#[derive(Default)]
struct AlertTables {
    /// Shared, so that a load copies the state outside the lock.
    states: HashMap<String, Arc<DeviceRuleStates>>,
    alerts: HashMap<String, Alert>,
}

/// Rule state and alert records, with the conditional commit the DynamoDB adapter does with a
/// transaction.
#[derive(Default)]
pub struct MemoryAlertStore {
    inner: Mutex<AlertTables>,
}

impl MemoryAlertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes the alerts cleared before `before` (retention; active alerts stay); how many.
    pub fn expire_cleared(&self, before: EpochMillis) -> usize {
        let mut inner = lock(&self.inner);
        let count = inner.alerts.len();
        inner
            .alerts
            .retain(|_, alert| alert.cleared_at.is_none_or(|cleared| cleared >= before));
        count - inner.alerts.len()
    }

    /// What the offline check looks at: the devices last heard from before `before` and not
    /// offline yet, and those with fleet events committed but not yet known to be out.
    pub fn silent_devices(&self, before: EpochMillis) -> Vec<String> {
        lock(&self.inner)
            .states
            .iter()
            .filter(|(_, state)| {
                let fleet = &state.fleet;
                let seen = fleet.seen_at.or(fleet.mark.as_ref().map(|(ts, _)| *ts));
                (fleet.offline_since.is_none() && seen.is_some_and(|seen| seen < before))
                    || !state.fleet_outbox.is_empty()
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// Geofences in memory, versioned.
#[derive(Default)]
pub struct MemoryGeofences {
    inner: RwLock<(u64, BTreeMap<String, Geofence>)>,
}

impl MemoryGeofences {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl GeofenceStore for MemoryGeofences {
    async fn put(&self, geofence: &Geofence) -> Result<(), StoreError> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.0 += 1;
        inner
            .1
            .insert(geofence.geofence_id.clone(), geofence.clone());
        Ok(())
    }

    async fn get(&self, geofence_id: &str) -> Result<Option<Geofence>, StoreError> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        Ok(inner.1.get(geofence_id).cloned())
    }

    async fn list(&self) -> Result<Vec<Geofence>, StoreError> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        Ok(inner.1.values().cloned().collect())
    }

    async fn delete(&self, geofence_id: &str) -> Result<bool, StoreError> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let existed = inner.1.remove(geofence_id).is_some();
        if existed {
            inner.0 += 1;
        }
        Ok(existed)
    }

    async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.inner.read().unwrap_or_else(|p| p.into_inner()).0)
    }
}

#[derive(Default)]
struct FleetEventTables {
    /// In the order recorded, oldest dropped first beyond the capacity.
    events: VecDeque<FleetEvent>,
    ids: HashSet<String>,
    /// Per geofence, the devices inside and since when.
    occupants: HashMap<String, BTreeMap<String, EpochMillis>>,
}

/// Fleet events in memory: the newest `capacity` kept (the oldest dropped first), and who is
/// inside each geofence.
pub struct MemoryFleetEvents {
    inner: Mutex<FleetEventTables>,
    capacity: usize,
}

impl MemoryFleetEvents {
    pub fn new(capacity: usize) -> Self {
        MemoryFleetEvents {
            inner: Mutex::new(FleetEventTables::default()),
            capacity: capacity.max(1),
        }
    }

    /// Removes the events that happened before `before` (retention; who is inside a geofence
    /// stays); how many.
    pub fn expire(&self, before: EpochMillis) -> usize {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let ids = &mut inner.ids;
        let count = inner.events.len();
        inner.events.retain(|event| {
            let keep = event.ts >= before;
            if !keep {
                ids.remove(&event.event_id);
            }
            keep
        });
        count - inner.events.len()
    }
}

#[async_trait]
impl FleetEventStore for MemoryFleetEvents {
    async fn record(&self, events: &[FleetEvent]) -> Result<(), StoreError> {
        let mut inner = lock(&self.inner);
        for event in events {
            if !inner.ids.insert(event.event_id.clone()) {
                continue;
            }
            if let Some(geofence_id) = &event.geofence_id {
                let occupants = inner.occupants.entry(geofence_id.clone()).or_default();
                match event.kind {
                    FleetEventType::GeofenceEnter => {
                        occupants.insert(event.device_id.clone(), event.ts);
                    }
                    // An exit ends the stay it follows, not a later one.
                    FleetEventType::GeofenceExit
                        if occupants
                            .get(&event.device_id)
                            .is_some_and(|since| *since <= event.ts) =>
                    {
                        occupants.remove(&event.device_id);
                    }
                    _ => {}
                }
            }
            inner.events.push_back(event.clone());
            if inner.events.len() > self.capacity {
                if let Some(oldest) = inner.events.pop_front() {
                    inner.ids.remove(&oldest.event_id);
                }
            }
        }
        Ok(())
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<FleetEvent>, StoreError> {
        let inner = lock(&self.inner);
        let mut events: Vec<&FleetEvent> =
            inner.events.iter().filter(|e| filter.matches(e)).collect();
        events.sort_by(|a, b| b.ts.cmp(&a.ts).then_with(|| a.event_id.cmp(&b.event_id)));
        Ok(events.into_iter().take(filter.limit).cloned().collect())
    }

    async fn clear_occupants(&self, geofence_id: &str) -> Result<(), StoreError> {
        lock(&self.inner).occupants.remove(geofence_id);
        Ok(())
    }

    async fn occupants(&self, geofence_id: &str) -> Result<Vec<Occupant>, StoreError> {
        let inner = lock(&self.inner);
        Ok(inner
            .occupants
            .get(geofence_id)
            .map(|devices| {
                devices
                    .iter()
                    .map(|(device_id, since)| Occupant {
                        device_id: device_id.clone(),
                        since: *since,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[async_trait]
impl AlertStore for MemoryAlertStore {
    async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError> {
        // The copy is made outside the store's one lock, which every device's batch takes.
        let stored = lock(&self.inner).states.get(device_id).cloned();
        Ok(stored
            .map(|state| DeviceRuleStates::clone(&state))
            .unwrap_or_default())
    }

    async fn commit_changes(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        changes: AlertChanges<'_>,
    ) -> Result<(), StoreError> {
        if changes.len() > crate::ports::MAX_ALERTS_PER_COMMIT {
            return Err(StoreError::invalid(
                "alert state commit",
                format!(
                    "device {device_id}: {} alerts in one commit; the limit is {}",
                    changes.len(),
                    crate::ports::MAX_ALERTS_PER_COMMIT
                ),
            ));
        }
        let mut stored = states.clone();
        stored.version = expected_version + 1;
        let stored = Arc::new(stored);
        let mut inner = lock(&self.inner);
        // One lookup for the version check and the write; the state replaced is dropped after
        // the lock is let go, and a device's key is made once, not on every commit.
        let slot = inner.states.get_mut(device_id);
        let current = slot.as_ref().map_or(0, |s| s.version);
        if current != expected_version {
            return Err(StoreError::conflict(
                "alert state commit",
                format!(
                    "device {device_id}: expected version {expected_version}, store has {current}"
                ),
            ));
        }
        let replaced = match slot {
            Some(slot) => Some(std::mem::replace(slot, stored)),
            None => {
                inner.states.insert(device_id.to_string(), stored);
                None
            }
        };
        for alert_id in changes.removed {
            inner.alerts.remove(alert_id);
        }
        for alert in changes.touched {
            let mut alert = alert.clone();
            if let Some(existing) = inner.alerts.get(&alert.alert_id) {
                alert.acknowledged = existing.acknowledged;
                alert.acknowledged_by.clone_from(&existing.acknowledged_by);
                alert.acknowledged_at = existing.acknowledged_at;
            }
            inner.alerts.insert(alert.alert_id.clone(), alert);
        }
        drop(inner);
        drop(replaced);
        Ok(())
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        let inner = lock(&self.inner);
        let mut alerts: Vec<&Alert> = inner
            .alerts
            .values()
            .filter(|a| filter.state.is_none_or(|s| a.state == s))
            .filter(|a| filter.device_id.as_deref().is_none_or(|d| a.device_id == d))
            .collect();
        alerts.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then_with(|| a.alert_id.cmp(&b.alert_id))
        });
        Ok(alerts.into_iter().take(filter.limit).cloned().collect())
    }

    async fn get_alert(&self, alert_id: &str) -> Result<Option<Alert>, StoreError> {
        Ok(lock(&self.inner).alerts.get(alert_id).cloned())
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        at: EpochMillis,
    ) -> Result<Option<Alert>, StoreError> {
        let mut inner = lock(&self.inner);
        let Some(alert) = inner.alerts.get_mut(alert_id) else {
            return Ok(None);
        };
        if !alert.acknowledged {
            alert.acknowledged = true;
            alert.acknowledged_by = Some(by.to_string());
            alert.acknowledged_at = Some(at);
        }
        Ok(Some(alert.clone()))
    }
}

/// The metric-name registry of one process (the embedded runner, tests).
pub struct MemoryMetricNames {
    names: Mutex<BTreeSet<String>>,
    limit: usize,
}

impl MemoryMetricNames {
    pub fn new(limit: usize) -> Self {
        MemoryMetricNames {
            names: Mutex::new(BTreeSet::new()),
            limit,
        }
    }
}

#[async_trait]
impl MetricNameRegistry for MemoryMetricNames {
    async fn admit(&self, names: &BTreeSet<String>) -> Result<BTreeSet<String>, StoreError> {
        let mut known = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let mut refused = BTreeSet::new();
        for name in names {
            if !known.contains(name) {
                if known.len() < self.limit {
                    known.insert(name.clone());
                } else {
                    refused.insert(name.clone());
                }
            }
        }
        Ok(refused)
    }

    fn limit(&self) -> usize {
        self.limit
    }
}

/// Dead letters kept in memory, newest `capacity` of them, with a count of all ever received.
pub struct MemoryDeadLetters {
    inner: Mutex<(VecDeque<DeadLetter>, u64)>,
    capacity: usize,
}

impl MemoryDeadLetters {
    pub fn new(capacity: usize) -> Self {
        MemoryDeadLetters {
            inner: Mutex::new((VecDeque::new(), 0)),
            capacity: capacity.max(1),
        }
    }

    /// The kept letters, oldest first, and the number ever received.
    pub fn snapshot(&self) -> (Vec<DeadLetter>, u64) {
        let inner = lock(&self.inner);
        (inner.0.iter().cloned().collect(), inner.1)
    }
}

#[async_trait]
impl DeadLetterSink for MemoryDeadLetters {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError> {
        let mut inner = lock(&self.inner);
        for letter in letters {
            inner.1 += 1;
            inner.0.push_back(letter);
            if inner.0.len() > self.capacity {
                inner.0.pop_front();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::geohash_of;
    use crate::geo::haversine_m;
    use crate::model::GeoPoint;
    use proptest::prelude::*;
    use std::time::Duration;

    fn position(device: &str, ts: EpochMillis, lat: f64, lon: f64) -> Position {
        Position {
            device_id: device.into(),
            ts,
            event_id: format!("{device}@{ts}"),
            lat,
            lon,
            geohash: String::new(),
            speed_kmh: None,
            heading_deg: None,
            received_at: ts,
        }
    }

    #[tokio::test]
    async fn positions_never_go_back_in_time() {
        let store = MemoryPositionStore::new();
        assert_eq!(
            store.upsert_if_newer(position("a", 2_000, 1.0, 1.0)).await,
            Ok(UpsertOutcome::Applied)
        );
        assert_eq!(
            store.upsert_if_newer(position("a", 1_000, 2.0, 2.0)).await,
            Ok(UpsertOutcome::Stale)
        );
        assert_eq!(
            store.upsert_if_newer(position("a", 2_000, 2.0, 2.0)).await,
            Ok(UpsertOutcome::Stale)
        );
        assert_eq!(store.get("a").await.unwrap().unwrap().lat, 1.0);
        assert_eq!(
            store.upsert_if_newer(position("a", 3_000, 3.0, 3.0)).await,
            Ok(UpsertOutcome::Applied)
        );
        // The old cell no longer lists the vehicle.
        let old_cell = geohash_of(GeoPoint { lat: 1.0, lon: 1.0 }).unwrap();
        assert!(store.query_prefixes(&[old_cell]).is_empty());
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn a_vehicle_that_stays_in_its_cell_is_listed_once_with_its_newest_position() {
        let store = MemoryPositionStore::new();
        for ts in [1_000, 2_000, 3_000] {
            assert_eq!(
                store
                    .upsert_if_newer(position("parked", ts, 52.5, 13.4))
                    .await,
                Ok(UpsertOutcome::Applied)
            );
        }
        let cell = geohash_of(GeoPoint {
            lat: 52.5,
            lon: 13.4,
        })
        .unwrap();
        let listed = store.query_prefixes(std::slice::from_ref(&cell));
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].ts, 3_000);
        // Moving on from there leaves nothing behind in the cell.
        store
            .upsert_if_newer(position("parked", 4_000, 48.1, 11.6))
            .await
            .unwrap();
        assert!(store.query_prefixes(&[cell]).is_empty());
        assert_eq!(store.all().len(), 1);
    }

    fn truck_record(n: u8) -> BusRecord {
        BusRecord {
            partition_key: "truck-1".into(),
            data: vec![n],
            decoded: None,
        }
    }

    /// A record of 1,000 bytes of data, each `n`.
    fn kilobyte_truck_record(n: u8) -> BusRecord {
        BusRecord {
            data: vec![n; 1_000],
            ..truck_record(n)
        }
    }

    /// A one-shard stream whose publishes wait for its readers ([`Backpressure`]).
    fn bounded_stream(records: u64, bytes: usize, max_wait: Duration) -> MemoryStream {
        MemoryStream::new("t", 1, 1_000).with_backpressure(Backpressure {
            unprocessed_per_shard: records,
            unprocessed_bytes_per_shard: bytes,
            max_wait,
        })
    }

    /// A publish of `record` started in the background and given 50 ms, long enough to have
    /// finished unless it waits.
    async fn publish_in_background(
        stream: &Arc<MemoryStream>,
        record: BusRecord,
    ) -> tokio::task::JoinHandle<Vec<Result<Published, StoreError>>> {
        let publishing = tokio::spawn({
            let stream = stream.clone();
            async move { stream.publish(vec![record]).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        publishing
    }

    #[tokio::test]
    async fn a_publish_waits_while_the_slowest_reader_is_too_far_behind() {
        let stream = Arc::new(bounded_stream(3, usize::MAX, Duration::from_secs(30)));
        let fast = stream.register_reader(0);
        let slow = stream.register_reader(0);
        let first = stream.publish((0..3).map(truck_record).collect()).await;
        assert!(first.iter().all(Result::is_ok), "under the bound: no wait");
        assert_eq!(stream.held_back(), (0, 0));
        fast.store(4, Ordering::Release);
        let publishing = publish_in_background(&stream, truck_record(3)).await;
        assert!(
            !publishing.is_finished(),
            "3 records unprocessed by the slowest reader: the publish waits"
        );
        slow.store(2, Ordering::Release);
        let published = tokio::time::timeout(Duration::from_secs(10), publishing)
            .await
            .expect("the publish goes on once the reader caught up")
            .unwrap();
        assert!(published[0].is_ok());
        assert_eq!(stream.tips(), [4]);
        assert_eq!(stream.held_back(), (1, 0));
        assert_eq!(stream.trimmed(), 0);
    }

    #[tokio::test]
    async fn a_publish_waits_while_the_slowest_readers_backlog_is_too_many_bytes() {
        let stream = Arc::new(bounded_stream(1_000, 2_500, Duration::from_secs(30)));
        let reader = stream.register_reader(0);
        stream
            .publish((0..2).map(kilobyte_truck_record).collect())
            .await;
        stream.publish(vec![kilobyte_truck_record(2)]).await;
        assert_eq!(
            stream.held_back(),
            (0, 0),
            "two records unread before it, under 2,500 bytes: no wait"
        );
        let publishing = publish_in_background(&stream, kilobyte_truck_record(3)).await;
        assert!(
            !publishing.is_finished(),
            "three records of over 1,000 bytes unread: the publish waits"
        );
        // The reader is done with two of them: dropped while the publish waits, not at the
        // next append.
        reader.store(3, Ordering::Release);
        tokio::time::timeout(Duration::from_secs(10), publishing)
            .await
            .expect("the publish goes on once the reader is done with enough bytes")
            .unwrap();
        assert_eq!(stream.held_back(), (1, 0));
        assert_eq!(stream.trimmed(), 0);
    }

    #[tokio::test]
    async fn a_publish_behind_a_stuck_reader_goes_ahead_after_the_longest_wait() {
        let stream = bounded_stream(2, usize::MAX, Duration::from_millis(30));
        let _stuck = stream.register_reader(0);
        stream.publish((0..2).map(truck_record).collect()).await;
        let published = tokio::time::timeout(
            Duration::from_secs(10),
            stream.publish(vec![truck_record(2)]),
        )
        .await
        .expect("a stuck reader does not stop ingest");
        assert!(published[0].is_ok());
        assert_eq!(stream.tips(), [3]);
        assert_eq!(stream.held_back(), (1, 1));
    }

    #[tokio::test]
    async fn without_a_bound_or_readers_a_publish_never_waits() {
        let unbounded = MemoryStream::new("t", 1, 1_000);
        let _reader = unbounded.register_reader(0);
        let bounded = bounded_stream(1, usize::MAX, Duration::from_secs(30));
        for stream in [&unbounded, &bounded] {
            for n in 0..5 {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    stream.publish(vec![truck_record(n)]),
                )
                .await
                .expect("no wait");
            }
            assert_eq!(stream.held_back(), (0, 0));
        }
    }

    #[tokio::test]
    async fn stream_routes_a_key_to_one_shard_in_order_and_trims() {
        let stream = MemoryStream::new("t", 4, 3);
        let records: Vec<BusRecord> = (0..5)
            .map(|n| BusRecord {
                partition_key: "truck-1".into(),
                data: vec![n],
                decoded: None,
            })
            .collect();
        let published = stream.publish(records).await;
        let shard = stream.shard_of("truck-1");
        assert!(published
            .iter()
            .all(|p| p.as_ref().unwrap().shard_id == MemoryStream::shard_id(shard)));
        let read = stream.read(shard, 1, 10);
        assert_eq!(read.expired, 2);
        assert_eq!(
            read.records.iter().map(|r| r.data[0]).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(stream.read(shard, 5, 10).records.len(), 1);
        assert!(stream.read(shard, 6, 10).records.is_empty());
        assert_eq!(stream.trimmed(), 2);
    }

    #[tokio::test]
    async fn stream_drops_what_every_reader_is_done_with_and_keeps_numbering() {
        let record = |n: u8| BusRecord {
            partition_key: "truck-1".into(),
            data: vec![n],
            decoded: None,
        };
        let stream = MemoryStream::new("t", 1, 1_000);
        let (first, second) = (stream.register_reader(0), stream.register_reader(0));
        stream.publish((1..=4).map(record).collect()).await;
        // The first reader is done with 1-3, the second with 1 only: 2-4 stay.
        first.store(4, Ordering::Release);
        second.store(2, Ordering::Release);
        stream.publish(vec![record(5)]).await;
        let read = stream.read(0, 2, 10);
        assert_eq!(read.expired, 0);
        assert_eq!(
            read.records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            [2, 3, 4, 5]
        );
        // Both done with everything: nothing is kept, and numbering goes on.
        first.store(6, Ordering::Release);
        second.store(6, Ordering::Release);
        let published = stream.publish(vec![record(6)]).await;
        assert_eq!(
            published[0].as_ref().unwrap().sequence_number,
            format_sequence(6)
        );
        assert_eq!(
            stream
                .read(0, 6, 10)
                .records
                .iter()
                .map(|r| r.data[0])
                .collect::<Vec<_>>(),
            [6]
        );
        assert_eq!(
            stream.trimmed(),
            0,
            "records done with are not trimmed by retention"
        );
        assert_eq!(stream.tips(), [6]);
    }

    #[tokio::test]
    async fn stream_over_its_bytes_trims_the_oldest_and_says_so() {
        let one = StoredRecord {
            sequence: 1,
            partition_key: "truck-1".into(),
            data: vec![0; 1_000].into(),
            decoded: None,
            arrival: 0,
        }
        .bytes();
        // Two shards, room for three records in each.
        let stream = MemoryStream::with_byte_limit("t", 2, 1_000, one * 3 * 2 + 1);
        stream
            .publish((0..5).map(kilobyte_truck_record).collect())
            .await;
        let shard = stream.shard_of("truck-1");
        let read = stream.read(shard, 1, 10);
        assert_eq!(read.expired, 2, "the reader is told what it missed");
        assert_eq!(
            read.records.iter().map(|r| r.data[0]).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(stream.trimmed(), 2);
        assert_eq!(stream.bytes(), one * 3);
        // A record larger than the whole share is still kept, alone.
        let big = BusRecord {
            partition_key: "truck-1".into(),
            data: vec![9; one * 10],
            decoded: None,
        };
        stream.publish(vec![big]).await;
        assert_eq!(stream.read(shard, 1, 10).records.len(), 1);
    }

    /// Retention by age, store by store: what is older than the cut goes, the rest stays and
    /// is still found.
    #[tokio::test]
    async fn each_store_expires_what_is_older_than_its_retention() {
        let cut = 10_000;
        let positions = MemoryPositionStore::new();
        positions
            .upsert_if_newer(position("silent", 5_000, 52.5, 13.4))
            .await
            .unwrap();
        positions
            .upsert_if_newer(position("heard", 15_000, 52.5, 13.4))
            .await
            .unwrap();
        assert_eq!(positions.expire(cut), 1);
        assert_eq!(positions.get("silent").await.unwrap(), None);
        let near = positions
            .near(
                GeoPoint {
                    lat: 52.5,
                    lon: 13.4,
                },
                100.0,
                10,
            )
            .await
            .unwrap();
        assert_eq!(
            near.iter()
                .map(|v| v.position.device_id.as_str())
                .collect::<Vec<_>>(),
            ["heard"]
        );

        let alerts = MemoryAlertStore::new();
        let alert = |id: &str, cleared_at: Option<EpochMillis>| Alert {
            alert_id: id.into(),
            device_id: "a".into(),
            rule: "r".into(),
            severity: crate::model::Severity::Major,
            state: if cleared_at.is_some() {
                crate::model::AlertState::Cleared
            } else {
                crate::model::AlertState::Active
            },
            acknowledged: false,
            acknowledged_by: None,
            acknowledged_at: None,
            started_at: 1,
            cleared_at,
            peak_value: 1.0,
            last_value: 1.0,
            count: 1,
        };
        let all = [
            alert("old", Some(9_000)),
            alert("recent", Some(11_000)),
            alert("active", None),
        ];
        alerts
            .commit("a", 0, &DeviceRuleStates::default(), &all)
            .await
            .unwrap();
        assert_eq!(alerts.expire_cleared(cut), 1);
        assert!(alerts.get_alert("old").await.unwrap().is_none());
        assert!(alerts.get_alert("recent").await.unwrap().is_some());
        assert!(alerts.get_alert("active").await.unwrap().is_some());

        let events = MemoryFleetEvents::new(100);
        let event = |id: &str, ts: EpochMillis| FleetEvent {
            event_id: id.into(),
            device_id: "a".into(),
            kind: FleetEventType::DeviceOffline,
            ts,
            geofence_id: None,
            value: None,
            limit: None,
            lat: None,
            lon: None,
        };
        events
            .record(&[event("e1", 9_999), event("e2", 10_000)])
            .await
            .unwrap();
        assert_eq!(events.expire(cut), 1);
        let everything = EventFilter {
            limit: 100,
            ..EventFilter::default()
        };
        let kept = events.list(&everything).await.unwrap();
        assert_eq!(
            kept.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
            ["e2"]
        );
    }

    #[tokio::test]
    async fn alert_commit_is_conditional_and_keeps_acknowledgements() {
        let store = MemoryAlertStore::new();
        let states = DeviceRuleStates::default();
        let alert = Alert {
            alert_id: "a|r|1".into(),
            device_id: "a".into(),
            rule: "r".into(),
            severity: crate::model::Severity::Major,
            state: crate::model::AlertState::Active,
            acknowledged: false,
            acknowledged_by: None,
            acknowledged_at: None,
            started_at: 1,
            cleared_at: None,
            peak_value: 1.0,
            last_value: 1.0,
            count: 1,
        };
        store
            .commit("a", 0, &states, std::slice::from_ref(&alert))
            .await
            .unwrap();
        let conflict = store.commit("a", 0, &states, &[]).await.unwrap_err();
        assert_eq!(conflict.kind, crate::ports::ErrorKind::Conflict);
        store.acknowledge("a|r|1", "ops", 5).await.unwrap();
        let mut update = alert.clone();
        update.count = 2;
        store.commit("a", 1, &states, &[update]).await.unwrap();
        let stored = store.get_alert("a|r|1").await.unwrap().unwrap();
        assert_eq!(
            (
                stored.count,
                stored.acknowledged,
                stored.acknowledged_by.as_deref()
            ),
            (2, true, Some("ops"))
        );
        assert_eq!(store.load_rule_states("a").await.unwrap().version, 2);
        assert!(store.acknowledge("nope", "ops", 5).await.unwrap().is_none());
    }

    fn arb_fleet() -> impl Strategy<Value = (Vec<(f64, f64)>, GeoPoint, f64)> {
        let city = (52.3..52.7f64, 13.1..13.7f64);
        let antimeridian = (
            -0.5..0.5f64,
            prop_oneof![179.5..=180.0f64, -180.0..-179.5f64],
        );
        let polar = (89.5..=90.0f64, -180.0..=180.0f64);
        prop_oneof![
            (
                proptest::collection::vec(city.clone(), 0..300),
                city,
                10.0..30_000.0f64
            ),
            (
                proptest::collection::vec(antimeridian.clone(), 0..200),
                antimeridian,
                10.0..60_000.0f64
            ),
            (
                proptest::collection::vec(polar.clone(), 0..200),
                polar,
                10.0..60_000.0f64
            ),
            (
                proptest::collection::vec((-90.0..=90.0f64, -180.0..=180.0f64), 0..200),
                (-90.0..=90.0f64, -180.0..=180.0f64),
                10.0..100_000.0f64
            ),
        ]
        .prop_map(|(points, (lat, lon), radius)| (points, GeoPoint { lat, lon }, radius))
    }

    #[test]
    fn sequence_numbers_are_twenty_digits_zero_padded() {
        assert_eq!(format_sequence(0), "00000000000000000000");
        assert_eq!(format_sequence(6), "00000000000000000006");
        assert_eq!(format_sequence(u64::MAX), "18446744073709551615");
    }

    proptest! {
        /// Text order is numeric order, and the text reads back as the number.
        #[test]
        fn sequence_text_orders_and_parses_as_the_number(a in any::<u64>(), b in any::<u64>()) {
            let (text_a, text_b) = (format_sequence(a), format_sequence(b));
            prop_assert_eq!(text_a.len(), 20);
            prop_assert_eq!(text_a.cmp(&text_b), a.cmp(&b));
            prop_assert_eq!(parse_sequence(&text_a), Some(a));
        }
    }

    proptest! {
        /// A radius query returns exactly what a brute-force scan of every vehicle returns.
        #[test]
        fn radius_query_equals_brute_force(
            (points, center, radius) in arb_fleet(),
            limit in prop_oneof![Just(usize::MAX), 1..30usize],
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let store = MemoryPositionStore::new();
            runtime.block_on(async {
                for (n, (lat, lon)) in points.iter().enumerate() {
                    store.upsert_if_newer(position(&format!("v{n}"), 1, *lat, *lon)).await.unwrap();
                }
            });
            let found = runtime.block_on(store.near(center, radius, limit)).unwrap();
            let mut expected: Vec<(String, f64)> = store
                .all()
                .into_iter()
                .map(|p| (p.device_id.clone(), haversine_m(center, p.point())))
                .filter(|(_, d)| *d <= radius)
                .collect();
            expected.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            expected.truncate(limit);
            let got: Vec<(String, f64)> = found.into_iter().map(|v| (v.position.device_id, v.distance_m)).collect();
            prop_assert_eq!(got, expected);
        }
    }
}
