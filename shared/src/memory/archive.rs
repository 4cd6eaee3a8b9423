//! The embedded runner's archive: every vehicle's recent readings, stored compactly and bounded
//! in bytes as well as per vehicle.
//!
//! A reading as the stream functions see it ([`Reading`]) is about 450 bytes in memory here: the
//! device id twice (the reading's and the track's key), the event id twice, eleven optional
//! numbers of 16 bytes whether sent or not, a map for metrics. A [`StoredReading`] keeps what
//! was sent and nothing twice: the device id once per track (interned), the event id only where
//! it is not derived from the device id, the numbers that are present (a bit mask says which),
//! metric names interned. `bytes_per_reading` in `/local/stats` says what that comes to.
//!
//! Eviction is oldest first across the whole archive, in the order readings were archived: a
//! queue of (track, ordinal) entries, 8 bytes per reading, names which track to shorten next.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::model::{Reading, READING_FIELDS};
use crate::ports::{Archive, RejectedReading, StoreError};
use crate::EpochMillis;

/// The numbers a reading may carry, in the order of the bit mask: position, then
/// [`READING_FIELDS`].
const VALUE_COUNT: usize = 2 + READING_FIELDS.len();
/// The event id is the device id followed by the stored suffix (`veh-1-42` stores `-42`).
const EVENT_ID_AFTER_DEVICE: u16 = 1 << 14;
/// The event id is the one the gateway derives, `{device_id}@{ts}`; nothing is stored.
const EVENT_ID_DERIVED: u16 = 1 << 15;

/// One archived reading, without its device id (its track has it).
#[derive(Debug, Clone)]
struct StoredReading {
    ts: EpochMillis,
    /// Bit i set: value i of the value order is present, in `values`. Bits 14 and 15: how the
    /// event id is stored.
    flags: u16,
    values: Box<[f64]>,
    /// The event id, or its part after the device id; `None` when derived.
    event_id: Option<Box<str>>,
    metrics: Option<Box<[Metric]>>,
}

/// A free metric: its interned name and its value.
type Metric = (Arc<str>, f64);

/// The bytes a heap allocation of `len` bytes takes, rounded as small-object allocators do.
fn allocation(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.div_ceil(16) * 16
    }
}

impl StoredReading {
    /// `reading` without its device id; a metric name not seen before is interned in `names`
    /// and its bytes added to `name_bytes`.
    fn compact(
        reading: &Reading,
        names: &mut HashSet<Arc<str>>,
        name_bytes: &mut usize,
    ) -> StoredReading {
        let mut flags = 0u16;
        let mut values = Vec::with_capacity(VALUE_COUNT);
        let all = [reading.lat, reading.lon].into_iter().chain(
            READING_FIELDS
                .iter()
                .map(|(name, _, _)| reading.value(name)),
        );
        for (bit, value) in all.enumerate() {
            if let Some(value) = value {
                flags |= 1 << bit;
                values.push(value);
            }
        }
        let derived = reading
            .event_id
            .strip_prefix(reading.device_id.as_str())
            .and_then(|rest| rest.strip_prefix('@'))
            .is_some_and(|ts| ts == itoa::Buffer::new().format(reading.ts));
        let event_id = if derived {
            flags |= EVENT_ID_DERIVED;
            None
        } else if let Some(suffix) = reading.event_id.strip_prefix(reading.device_id.as_str()) {
            flags |= EVENT_ID_AFTER_DEVICE;
            Some(suffix.into())
        } else {
            Some(reading.event_id.as_str().into())
        };
        let metrics = (!reading.metrics.is_empty()).then(|| {
            reading
                .metrics
                .iter()
                .map(|(name, value)| {
                    let name = match names.get(name.as_str()) {
                        Some(interned) => interned.clone(),
                        None => {
                            let interned: Arc<str> = name.as_str().into();
                            *name_bytes += allocation(name.len() + 16) + 16;
                            names.insert(interned.clone());
                            interned
                        }
                    };
                    (name, *value)
                })
                .collect()
        });
        StoredReading {
            ts: reading.ts,
            flags,
            values: values.into_boxed_slice(),
            event_id,
            metrics,
        }
    }

    fn event_id(&self, device_id: &str) -> String {
        match &self.event_id {
            None => format!("{device_id}@{}", self.ts),
            Some(suffix) if self.flags & EVENT_ID_AFTER_DEVICE != 0 => {
                format!("{device_id}{suffix}")
            }
            Some(event_id) => event_id.to_string(),
        }
    }

    fn expand(&self, device_id: &str) -> Reading {
        let mut reading = Reading {
            device_id: device_id.to_string(),
            ts: self.ts,
            event_id: self.event_id(device_id),
            ..Reading::default()
        };
        let mut values = self.values.iter().copied();
        for bit in 0..VALUE_COUNT {
            if self.flags & (1 << bit) == 0 {
                continue;
            }
            let Some(value) = values.next() else { break };
            match bit {
                0 => reading.lat = Some(value),
                1 => reading.lon = Some(value),
                field => {
                    reading.set_value(READING_FIELDS[field - 2].0, value);
                }
            }
        }
        if let Some(metrics) = &self.metrics {
            reading.metrics = metrics
                .iter()
                .map(|(name, value)| (name.to_string(), *value))
                .collect();
        }
        reading
    }

    /// What this reading takes in memory, its eviction queue entry included (metric names are
    /// shared, counted once when first seen).
    fn bytes(&self) -> usize {
        std::mem::size_of::<StoredReading>()
            + std::mem::size_of::<QueueEntry>()
            + allocation(self.values.len() * 8)
            + self.event_id.as_ref().map_or(0, |id| allocation(id.len()))
            + self
                .metrics
                .as_ref()
                .map_or(0, |m| allocation(m.len() * std::mem::size_of::<Metric>()))
    }

    /// Orders readings of one device as [`Reading::order_key`] does.
    fn cmp_key(&self, device_id: &str, ts: EpochMillis, event_id: &str) -> std::cmp::Ordering {
        self.ts
            .cmp(&ts)
            .then_with(|| self.event_id(device_id).as_str().cmp(event_id))
    }
}

/// One device's readings, oldest first.
struct Track {
    device_id: Arc<str>,
    readings: VecDeque<StoredReading>,
    /// Readings ever appended (not counting replacements), wrapping: the newest reading's
    /// ordinal is `appended - 1`, the oldest's `appended - len`.
    appended: u32,
}

impl Track {
    fn front_ordinal(&self) -> u32 {
        self.appended.wrapping_sub(self.readings.len() as u32)
    }

    /// Whether a queue entry of this track still stands for one of its readings.
    fn holds(&self, ordinal: u32) -> bool {
        (ordinal.wrapping_sub(self.front_ordinal()) as usize) < self.readings.len()
    }
}

/// (track index, ordinal) of an archived reading, in the order readings were archived.
type QueueEntry = (u32, u32);

#[derive(Default)]
struct Tracks {
    index: HashMap<Arc<str>, u32>,
    tracks: Vec<Track>,
    queue: VecDeque<QueueEntry>,
    /// Queue entries whose reading the per-vehicle limit already removed.
    stale_entries: usize,
    metric_names: HashSet<Arc<str>>,
    readings: usize,
    bytes: usize,
}

impl Tracks {
    fn track_of(&mut self, device_id: &str) -> u32 {
        if let Some(&index) = self.index.get(device_id) {
            return index;
        }
        let device_id: Arc<str> = device_id.into();
        let index = self.tracks.len() as u32;
        self.tracks.push(Track {
            device_id: device_id.clone(),
            readings: VecDeque::new(),
            appended: 0,
        });
        self.bytes += std::mem::size_of::<Track>() + allocation(device_id.len()) + 32;
        self.index.insert(device_id, index);
        index
    }

    fn remove_oldest_of(&mut self, track: u32) {
        if let Some(removed) = self.tracks[track as usize].readings.pop_front() {
            self.readings -= 1;
            self.bytes -= removed.bytes();
        }
    }

    /// Removes the oldest archived reading; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((track, ordinal)) = self.queue.pop_front() {
            if self.tracks[track as usize].holds(ordinal) {
                self.remove_oldest_of(track);
                return true;
            }
            self.stale_entries -= 1;
        }
        false
    }

    /// Drops queue entries of readings already gone, once they are half the queue.
    fn compact_queue(&mut self) {
        if self.stale_entries * 2 <= self.queue.len() {
            return;
        }
        let tracks = &self.tracks;
        self.queue
            .retain(|&(track, ordinal)| tracks[track as usize].holds(ordinal));
        self.stale_entries = 0;
    }
}

/// Every reading, per device ordered by (time, event id), keeping at most `max_per_device`
/// readings of each device and at most `max_bytes` in all, the oldest archived evicted first
/// (the in-memory stand-in for Timestream's retention and S3's lifecycle).
pub struct MemoryArchive {
    inner: RwLock<Tracks>,
    max_per_device: usize,
    max_bytes: usize,
    evicted: AtomicU64,
}

impl MemoryArchive {
    /// An archive bounded per device only.
    pub fn new(max_per_device: usize) -> Self {
        Self::with_byte_limit(max_per_device, usize::MAX)
    }

    /// An archive bounded per device and in bytes.
    pub fn with_byte_limit(max_per_device: usize, max_bytes: usize) -> Self {
        MemoryArchive {
            inner: RwLock::new(Tracks::default()),
            max_per_device: max_per_device.max(1),
            max_bytes,
            evicted: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tracks> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of readings held.
    pub fn len(&self) -> usize {
        self.read().readings
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the archive takes by its own count (readings, eviction queue, tracks).
    pub fn bytes(&self) -> usize {
        self.read().bytes
    }

    /// The most bytes it may take.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Readings evicted to stay within the byte limit (not those beyond a vehicle's own limit).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Removes the readings older than `before` (retention); how many.
    pub fn expire(&self, before: EpochMillis) -> usize {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mut expired = 0;
        for track in 0..inner.tracks.len() {
            // Each track is oldest first; a removed reading's eviction entry goes stale.
            while inner.tracks[track]
                .readings
                .front()
                .is_some_and(|oldest| oldest.ts < before)
            {
                inner.remove_oldest_of(track as u32);
                inner.stale_entries += 1;
                expired += 1;
            }
        }
        inner.compact_queue();
        expired
    }
}

#[async_trait]
impl Archive for MemoryArchive {
    async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        let mut evicted = 0u64;
        for reading in readings {
            let track_index = inner.track_of(&reading.device_id);
            let stored = StoredReading::compact(reading, &mut inner.metric_names, &mut inner.bytes);
            let added = stored.bytes();
            let track = &mut inner.tracks[track_index as usize];
            let device_id = track.device_id.clone();
            let after_newest = track.readings.back().is_none_or(|newest| {
                newest
                    .cmp_key(&device_id, reading.ts, &reading.event_id)
                    .is_lt()
            });
            if after_newest {
                track.readings.push_back(stored);
            } else {
                let at = track.readings.partition_point(|r| {
                    r.cmp_key(&device_id, reading.ts, &reading.event_id).is_lt()
                });
                let same = track
                    .readings
                    .get(at)
                    .is_some_and(|r| r.cmp_key(&device_id, reading.ts, &reading.event_id).is_eq());
                if same {
                    // The same reading again (a retried batch): kept once, the newer copy.
                    let replaced = std::mem::replace(&mut track.readings[at], stored);
                    inner.bytes = inner.bytes - replaced.bytes() + added;
                    continue;
                }
                track.readings.insert(at, stored);
            }
            let ordinal = track.appended;
            track.appended = track.appended.wrapping_add(1);
            inner.queue.push_back((track_index, ordinal));
            inner.readings += 1;
            inner.bytes += added;
            if inner.tracks[track_index as usize].readings.len() > self.max_per_device {
                inner.remove_oldest_of(track_index);
                inner.stale_entries += 1;
                inner.compact_queue();
            }
            while inner.bytes > self.max_bytes && inner.evict_oldest() {
                evicted += 1;
            }
        }
        if evicted > 0 {
            self.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
        Ok(Vec::new())
    }

    async fn track(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        let inner = self.read();
        let Some(&index) = inner.index.get(device_id) else {
            return Ok(Vec::new());
        };
        if from >= to {
            return Ok(Vec::new());
        }
        let track = &inner.tracks[index as usize];
        let start = track.readings.partition_point(|r| r.ts < from);
        Ok(track
            .readings
            .range(start..)
            .take_while(|r| r.ts < to)
            .take(limit)
            .map(|r| r.expand(&track.device_id))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(device: &str, ts: EpochMillis, event_id: &str) -> Reading {
        Reading {
            device_id: device.into(),
            ts,
            event_id: event_id.into(),
            lat: Some(52.5 + ts as f64 * 1e-9),
            lon: Some(13.4),
            speed_kmh: Some(42.25),
            ..Reading::default()
        }
    }

    fn full(device: &str, ts: EpochMillis) -> Reading {
        let mut r = reading(device, ts, &format!("{device}@{ts}"));
        for (i, (name, low, _)) in READING_FIELDS.iter().enumerate() {
            r.set_value(name, low + i as f64 + 0.125);
        }
        r.metrics.insert("rpm".into(), 2150.5);
        r.metrics.insert("odometer_km".into(), 123_456.7);
        r
    }

    async fn all(archive: &MemoryArchive, device: &str) -> Vec<Reading> {
        archive
            .track(device, EpochMillis::MIN, EpochMillis::MAX, usize::MAX)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn retention_removes_the_older_readings_and_their_bytes() {
        let archive = MemoryArchive::with_byte_limit(100, usize::MAX);
        let readings: Vec<Reading> = (1..=6)
            .flat_map(|i| {
                [
                    full("veh-1", i * 1_000),
                    reading("veh-2", i * 1_000 + 500, "x"),
                ]
            })
            .map(|mut r| {
                r.event_id = format!("{}@{}", r.device_id, r.ts);
                r
            })
            .collect();
        archive.write(&readings).await.unwrap();
        let bytes = archive.bytes();
        assert_eq!(
            archive.expire(3_000),
            4,
            "veh-1 at 1 and 2 s, veh-2 at 1.5 and 2.5 s"
        );
        assert_eq!(archive.len(), 8);
        assert!(archive.bytes() < bytes);
        let kept: Vec<EpochMillis> = all(&archive, "veh-1").await.iter().map(|r| r.ts).collect();
        assert_eq!(kept, [3_000, 4_000, 5_000, 6_000]);
        assert_eq!(all(&archive, "veh-2").await.len(), 4);
        // Eviction still takes the oldest left.
        let small = archive.bytes() - 1;
        let bounded = MemoryArchive::with_byte_limit(100, small);
        bounded.write(&readings).await.unwrap();
        bounded.expire(3_000);
        assert!(bounded.bytes() <= small);
        let left = bounded.len();
        assert_eq!(bounded.expire(EpochMillis::MAX), left);
        assert!(bounded.is_empty());
    }

    #[tokio::test]
    async fn a_reading_comes_back_exactly_as_written() {
        let archive = MemoryArchive::new(100);
        let written = vec![
            full("veh-1", 1_000),
            reading("veh-1", 2_000, "veh-1-7"),
            reading("veh-1", 3_000, "client-chosen-id"),
            reading("veh-1", 4_000, "veh-1@0004000"),
            Reading {
                device_id: "veh-1".into(),
                ts: 5_000,
                event_id: "veh-1@5000".into(),
                ..Reading::default()
            },
        ];
        archive.write(&written).await.unwrap();
        assert_eq!(all(&archive, "veh-1").await, written);
    }

    #[tokio::test]
    async fn readings_are_ordered_by_time_then_event_id_and_kept_once() {
        let archive = MemoryArchive::new(100);
        let late = reading("veh-1", 1_000, "b");
        let first = reading("veh-1", 1_000, "a");
        let newest = reading("veh-1", 3_000, "c");
        archive
            .write(&[newest.clone(), late.clone(), first.clone(), late.clone()])
            .await
            .unwrap();
        assert_eq!(all(&archive, "veh-1").await, vec![first, late, newest]);
        assert_eq!(archive.len(), 3);
    }

    #[tokio::test]
    async fn the_track_is_cut_by_time_and_limit() {
        let archive = MemoryArchive::new(100);
        let readings: Vec<Reading> = (0..10).map(|i| full("veh-1", i * 1_000)).collect();
        archive.write(&readings).await.unwrap();
        let cut = archive.track("veh-1", 2_000, 6_000, 3).await.unwrap();
        assert_eq!(cut, readings[2..5].to_vec());
        assert!(archive
            .track("veh-2", 0, 10_000, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(archive
            .track("veh-1", 5_000, 5_000, 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_vehicle_keeps_its_newest_readings_up_to_its_limit() {
        let archive = MemoryArchive::new(3);
        let readings: Vec<Reading> = (0..5).map(|i| full("veh-1", i * 1_000)).collect();
        archive.write(&readings).await.unwrap();
        assert_eq!(all(&archive, "veh-1").await, readings[2..].to_vec());
        assert_eq!(
            archive.evicted(),
            0,
            "the per-vehicle limit is not an eviction"
        );
    }

    #[tokio::test]
    async fn over_its_byte_limit_it_evicts_the_oldest_archived_first() {
        let one = StoredReading::compact(&full("veh-0", 0), &mut HashSet::new(), &mut 0).bytes();
        // Room for about ten readings besides three tracks.
        let archive = MemoryArchive::with_byte_limit(1_000, one * 10 + 3 * 200);
        for round in 0..6 {
            let batch: Vec<Reading> = (0..3).map(|v| full(&format!("veh-{v}"), round)).collect();
            archive.write(&batch).await.unwrap();
        }
        assert!(archive.bytes() <= archive.max_bytes());
        assert_eq!(archive.evicted(), 18 - archive.len() as u64);
        // The newest of every vehicle are kept; the rounds evicted are the oldest ones.
        let mut kept_rounds: Vec<Vec<EpochMillis>> = Vec::new();
        for vehicle in 0..3 {
            let track = all(&archive, &format!("veh-{vehicle}")).await;
            kept_rounds.push(track.iter().map(|r| r.ts).collect());
        }
        for rounds in &kept_rounds {
            assert_eq!(rounds.last(), Some(&5));
        }
        let oldest_kept = kept_rounds.iter().filter_map(|r| r.first()).min().unwrap();
        let newest_dropped = *oldest_kept - 1;
        assert!(kept_rounds
            .iter()
            .all(|r| r.first().unwrap() >= &newest_dropped));
    }

    #[tokio::test]
    async fn stale_queue_entries_are_dropped_and_eviction_still_counts_right() {
        let archive = MemoryArchive::with_byte_limit(2, usize::MAX);
        let readings: Vec<Reading> = (0..1_000).map(|i| full("veh-1", i)).collect();
        archive.write(&readings).await.unwrap();
        let inner = archive.read();
        assert_eq!(inner.readings, 2);
        assert!(
            inner.queue.len() <= 5,
            "queue of {} entries",
            inner.queue.len()
        );
    }

    proptest! {
        /// Whatever is written, in whatever order, with whatever limits: each vehicle's track
        /// is in order, within its limit, made only of readings written (each once), and is
        /// what a plain ordered map with the per-vehicle limit holds when nothing was evicted;
        /// the counts and bytes add up.
        #[test]
        fn matches_a_plain_ordered_map(
            writes in proptest::collection::vec((0u8..4, 0i64..40, 0u8..3), 1..200),
            per_device in 1usize..30,
            byte_limit in 2_000usize..20_000,
        ) {
            type Model = HashMap<String, std::collections::BTreeMap<(EpochMillis, String), Reading>>;
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let archive = MemoryArchive::with_byte_limit(per_device, byte_limit);
            let (mut capped, mut everything): (Model, Model) = Default::default();
            for (device, ts, id) in writes {
                let device = format!("veh-{device}");
                let event_id = match id { 0 => format!("{device}@{ts}"), 1 => format!("{device}-x"), _ => "other".into() };
                let r = reading(&device, ts, &event_id);
                runtime.block_on(archive.write(std::slice::from_ref(&r))).unwrap();
                everything.entry(device.clone()).or_default().insert((r.ts, r.event_id.clone()), r.clone());
                let track = capped.entry(device).or_default();
                track.insert((r.ts, r.event_id.clone()), r);
                while track.len() > per_device { track.pop_first(); }
            }
            let mut total = 0;
            for (device, written) in &everything {
                let got = runtime.block_on(all(&archive, device));
                total += got.len();
                prop_assert!(got.len() <= per_device);
                if archive.evicted() == 0 {
                    let expected: Vec<Reading> = capped[device].values().cloned().collect();
                    prop_assert_eq!(&got, &expected);
                } else {
                    let mut rest = written.values();
                    prop_assert!(got.iter().all(|r| rest.any(|e| e == r)), "{got:?} not in order within {written:?}");
                }
            }
            let inner = archive.read();
            prop_assert!(inner.bytes <= byte_limit || inner.readings == 0);
            prop_assert_eq!(total, inner.readings);
            let bytes: usize = inner.tracks.iter().flat_map(|t| t.readings.iter()).map(StoredReading::bytes).sum();
            let track_bytes: usize = inner.tracks.iter().map(|t| std::mem::size_of::<Track>() + allocation(t.device_id.len()) + 32).sum();
            prop_assert_eq!(inner.bytes, bytes + track_bytes);
        }
    }
}
