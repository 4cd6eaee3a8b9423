//! The embedded runner's history store: each vehicle's trips, stops and minute summaries,
//! bounded in bytes; the items written first are evicted first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use super::lock;
use crate::history::{HistoryItem, HistoryKind};
use crate::ports::{HistoryStore, StoreError};
use crate::EpochMillis;

type Key = (HistoryKind, EpochMillis);

#[derive(Default)]
struct Tables {
    by_device: HashMap<String, BTreeMap<Key, (HistoryItem, usize)>>,
    /// In the order first written: which item to evict next (an entry whose item was
    /// evicted or replaced since is skipped by its size check).
    written: VecDeque<(String, Key)>,
    bytes: usize,
    evicted: u64,
}

pub struct MemoryHistory {
    tables: Mutex<Tables>,
    max_bytes: usize,
}

/// What an item takes here, by its own count: the item, its key, and each summarized field.
fn bytes_of(device_id: &str, item: &HistoryItem) -> usize {
    let fields = match item {
        HistoryItem::Minute(minute) => minute
            .fields
            .keys()
            .map(|name| name.len() + 24 + std::mem::size_of::<crate::history::FieldRollup>() + 16)
            .sum(),
        _ => 0,
    };
    std::mem::size_of::<HistoryItem>() + std::mem::size_of::<Key>() + 32 + device_id.len() + fields
}

impl MemoryHistory {
    /// A store of at most `max_bytes` (by its own count).
    pub fn with_byte_limit(max_bytes: usize) -> Self {
        MemoryHistory {
            tables: Mutex::new(Tables::default()),
            max_bytes,
        }
    }

    pub fn bytes(&self) -> usize {
        lock(&self.tables).bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Items evicted to stay within the limit.
    pub fn evicted(&self) -> u64 {
        lock(&self.tables).evicted
    }

    /// Removes the items that ended before `before` (retention); how many.
    pub fn expire(&self, before: EpochMillis) -> usize {
        let mut tables = lock(&self.tables);
        let tables = &mut *tables;
        let mut expired = 0;
        tables.by_device.retain(|_, track| {
            track.retain(|_, (item, size)| {
                let keep = item.end() >= before;
                if !keep {
                    tables.bytes -= *size;
                    expired += 1;
                }
                keep
            });
            !track.is_empty()
        });
        if expired > 0 {
            let by_device = &tables.by_device;
            tables
                .written
                .retain(|(device, key)| by_device.get(device).is_some_and(|t| t.contains_key(key)));
        }
        expired
    }
}

#[async_trait]
impl HistoryStore for MemoryHistory {
    async fn write(&self, device_id: &str, items: &[HistoryItem]) -> Result<(), StoreError> {
        let mut tables = lock(&self.tables);
        let tables = &mut *tables;
        for item in items {
            let key = (item.kind(), item.start());
            let size = bytes_of(device_id, item);
            let track = tables.by_device.entry(device_id.to_string()).or_default();
            match track.insert(key, (item.clone(), size)) {
                Some((_, replaced)) => tables.bytes -= replaced,
                None => tables.written.push_back((device_id.to_string(), key)),
            }
            tables.bytes += size;
        }
        while tables.bytes > self.max_bytes {
            let Some((device, key)) = tables.written.pop_front() else {
                break;
            };
            if let Some(track) = tables.by_device.get_mut(&device) {
                if let Some((_, size)) = track.remove(&key) {
                    tables.bytes -= size;
                    tables.evicted += 1;
                }
                if track.is_empty() {
                    tables.by_device.remove(&device);
                }
            }
        }
        Ok(())
    }

    async fn read(
        &self,
        device_id: &str,
        kind: HistoryKind,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        let tables = lock(&self.tables);
        let Some(track) = tables.by_device.get(device_id) else {
            return Ok(Vec::new());
        };
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(track
            .range((kind, from)..(kind, to))
            .take(limit)
            .map(|(_, (item, _))| item.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Rollup, Stop};

    fn stop(start_ts: EpochMillis, duration_s: f64) -> HistoryItem {
        HistoryItem::Stop(Stop {
            start_ts,
            end_ts: start_ts + (duration_s * 1000.0) as EpochMillis,
            lat: 48.1,
            lon: 11.5,
            duration_s,
        })
    }

    fn minute(start: EpochMillis) -> HistoryItem {
        HistoryItem::Minute(Rollup {
            start,
            count: 1,
            distance_m: 0.0,
            max_speed_kmh: None,
            fields: BTreeMap::new(),
        })
    }

    #[tokio::test]
    async fn items_are_read_by_kind_and_start_and_a_rewrite_replaces() {
        let store = MemoryHistory::with_byte_limit(1 << 20);
        store
            .write("truck-1", &[stop(1_000, 300.0), minute(0), minute(60_000)])
            .await
            .unwrap();
        let bytes = store.bytes();
        store.write("truck-1", &[stop(1_000, 400.0)]).await.unwrap();
        assert_eq!(store.bytes(), bytes, "a rewrite replaces, it does not add");
        let stops = store
            .read("truck-1", HistoryKind::Stop, 0, 10_000, 10)
            .await
            .unwrap();
        assert_eq!(stops, [stop(1_000, 400.0)]);
        let minutes = store
            .read("truck-1", HistoryKind::Minute, 30_000, 120_000, 10)
            .await
            .unwrap();
        assert_eq!(minutes, [minute(60_000)]);
        assert!(store
            .read("truck-2", HistoryKind::Stop, 0, 10_000, 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn retention_removes_what_ended_before_the_cut() {
        let store = MemoryHistory::with_byte_limit(1 << 20);
        // A stop from 1 s to 301 s, minutes at 0 and 60 s.
        store
            .write("truck-1", &[stop(1_000, 300.0), minute(0), minute(60_000)])
            .await
            .unwrap();
        store.write("truck-2", &[minute(0)]).await.unwrap();
        assert_eq!(store.expire(60_000), 2, "the two minutes at 0");
        let minutes = store
            .read("truck-1", HistoryKind::Minute, 0, 120_000, 10)
            .await
            .unwrap();
        assert_eq!(minutes, [minute(60_000)]);
        assert_eq!(
            store
                .read("truck-1", HistoryKind::Stop, 0, 10_000, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.expire(400_000), 2);
        assert_eq!(store.bytes(), 0);
    }

    #[tokio::test]
    async fn over_its_bytes_the_first_written_go_first() {
        let one = bytes_of("truck-1", &minute(0));
        let store = MemoryHistory::with_byte_limit(one * 3);
        for m in 0..5 {
            store.write("truck-1", &[minute(m * 60_000)]).await.unwrap();
        }
        assert_eq!(store.evicted(), 2);
        assert!(store.bytes() <= store.max_bytes());
        let kept = store
            .read("truck-1", HistoryKind::Minute, 0, i64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(
            kept.iter().map(HistoryItem::start).collect::<Vec<_>>(),
            [120_000, 180_000, 240_000]
        );
    }
}
