//! Latest positions in Valkey (Amazon ElastiCache Serverless for Valkey) or Redis 7: the
//! position store that keeps positions fresh at a fraction of DynamoDB's cost per write
//! (docs/cost.md), with radius queries answered by GEOSEARCH at every radius.
//!
//! Keys, all under one hash tag so that the upsert script's keys share a cluster slot:
//! - `{PREFIX}:position:DEVICE`: a hash with `ts`, `event_id` and `position` (the JSON of
//!   [`Position`]).
//! - `{PREFIX}:geo`: the geo set of every indexed vehicle (member = device id).
//! - `{PREFIX}:polar`: vehicles beyond the latitudes a geo set takes (±85.05112878°), found by
//!   a scan of that (small) set instead.
//!
//! With `RULE_STATE_STORE=valkey` the anomaly-inspector's rule state lives here too
//! (`{PREFIX}:rules:DEVICE`: `version` and `states`), see [`ValkeyStateAlerts`].
//!
//! An upsert is one script ([`UPSERT_SCRIPT`]): it compares `(ts, event_id)` with the stored
//! one and writes the hash and the geo set only if the new position is later, atomically, so a
//! position never goes back in time and a replay changes nothing.
//!
//! A radius query asks GEOSEARCH for the nearest members within a slightly larger radius
//! (Valkey measures on a sphere of 6,372,797.56 m and stores coordinates to about 0.6 m; GeoStream
//! on 6,371,008.8 m), reads their positions, and keeps those within the radius by GeoStream's
//! own haversine: equal to a brute-force scan. When GEOSEARCH's COUNT cut the candidates short of
//! what could still be nearer, it asks again for more.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use geostream_shared::geo::{haversine_m, EARTH_RADIUS_M};
use geostream_shared::model::{Alert, GeoPoint, Position, Reading};
use geostream_shared::ports::{
    nearest, with_geohash, AlertChanges, AlertFilter, AlertStore, Archive, NearbyVehicle,
    PositionStore, RejectedReading, StoreError, UpsertOutcome,
};
use geostream_shared::rules::DeviceRuleStates;
use geostream_shared::{now_millis, EpochMillis};
use redis::aio::ConnectionManager;
use redis::{RedisError, RetryMethod, Script};
use serde::{Deserialize, Serialize};

use crate::capacity::{CapacityMeter, Unit};
use crate::dynamodb::DynamoAlerts;

/// The latitudes a geo set can index.
const GEO_MAX_LAT: f64 = 85.051_128_78;
/// Valkey's Earth radius for geo distances.
const VALKEY_EARTH_RADIUS_M: f64 = 6_372_797.560_856;
/// A GeoStream distance in Valkey's measure: the ratio of the spheres' radii, and a margin.
const SEARCH_SCALE: f64 = VALKEY_EARTH_RADIUS_M / EARTH_RADIUS_M * 1.000_1;
/// Slack on top of the scale: coordinates are stored to about 0.6 m.
const SEARCH_SLACK_M: f64 = 2.0;
/// Candidates asked for beyond the limit on the first try.
const EXTRA_CANDIDATES: usize = 16;

/// Stores the position if it is later than the stored one, in `(ts, event_id)` order.
/// KEYS: position hash, geo set, polar set. ARGV: ts, event_id, position JSON, lon, lat,
/// device id, "1" when the latitude is beyond the geo set's range.
pub const UPSERT_SCRIPT: &str = r#"
local stored = redis.call('HMGET', KEYS[1], 'ts', 'event_id')
if stored[1] then
  local stored_ts = tonumber(stored[1])
  local ts = tonumber(ARGV[1])
  if stored_ts > ts or (stored_ts == ts and stored[2] >= ARGV[2]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'ts', ARGV[1], 'event_id', ARGV[2], 'position', ARGV[3])
if ARGV[7] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[6])
  redis.call('SADD', KEYS[3], ARGV[6])
else
  redis.call('GEOADD', KEYS[2], ARGV[4], ARGV[5], ARGV[6])
  redis.call('SREM', KEYS[3], ARGV[6])
end
return 1
"#;

/// Latest positions in Valkey or Redis.
#[derive(Clone)]
pub struct ValkeyPositions {
    connection: ConnectionManager,
    prefix: String,
    upsert: Script,
    usage: Usage,
}

/// Transient or permanent as the client itself would retry it (`RedisError::retry_method`).
fn store_error(operation: &'static str, error: RedisError) -> StoreError {
    let message = error.to_string();
    match error.retry_method() {
        RetryMethod::NoRetry => StoreError::permanent(operation, message),
        _ => StoreError::transient(operation, message),
    }
}

/// Opens a self-reconnecting connection to `url` (`redis://HOST:PORT`, or `rediss://` for
/// ElastiCache's encryption in transit).
async fn connect(url: &str) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url).map_err(|e| store_error("connect to Valkey", e))?;
    ConnectionManager::new(client)
        .await
        .map_err(|e| store_error("connect to Valkey", e))
}

/// What a store has asked of Valkey: round trips, and ECPUs on a meter. ElastiCache Serverless
/// bills about one ECPU per KB a simple command transfers; a command that works more (a
/// script's several commands, a search) counts one per command.
#[derive(Clone, Default)]
struct Usage {
    meter: CapacityMeter,
    round_trips: std::sync::Arc<AtomicU64>,
}

impl Usage {
    /// One round trip carrying `commands` commands and `bytes` bytes of data.
    fn charge(&self, commands: usize, bytes: usize) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.meter.add(
            Unit::ValkeyEcpus,
            commands.max(1) as f64 + bytes.div_ceil(1024) as f64,
        );
    }
}

impl ValkeyPositions {
    /// Connects to `url` (`redis://HOST:PORT` or, for ElastiCache's encryption in transit,
    /// `rediss://HOST:PORT`); keys start with `{prefix}`. The connection reconnects by itself.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, StoreError> {
        Ok(ValkeyPositions {
            connection: connect(url).await?,
            prefix: prefix.into(),
            upsert: Script::new(UPSERT_SCRIPT),
            usage: Usage::default(),
        })
    }

    /// Counts the ECPUs this store consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.usage.meter = meter;
        self
    }

    /// Round trips to the server so far (a pipeline of commands is one).
    pub fn round_trips(&self) -> u64 {
        self.usage.round_trips.load(Ordering::Relaxed)
    }

    fn position_key(&self, device_id: &str) -> String {
        format!("{{{}}}:position:{device_id}", self.prefix)
    }

    fn geo_key(&self) -> String {
        format!("{{{}}}:geo", self.prefix)
    }

    fn polar_key(&self) -> String {
        format!("{{{}}}:polar", self.prefix)
    }

    async fn positions_of(&self, device_ids: &[String]) -> Result<Vec<Position>, StoreError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipeline = redis::pipe();
        for device in device_ids {
            pipeline.hget(self.position_key(device), "position");
        }
        let found: Vec<Option<String>> = pipeline
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("HGET positions", e))?;
        let bytes = found.iter().flatten().map(String::len).sum();
        self.usage.charge(device_ids.len(), bytes);
        found
            .into_iter()
            .flatten()
            .map(|json| {
                serde_json::from_str(&json).map_err(|e| {
                    StoreError::permanent("HGET positions", format!("stored position: {e}"))
                })
            })
            .collect()
    }

    /// Up to `count` members within `radius_m` (Valkey's measure) of `center`, nearest first.
    async fn geosearch(
        &self,
        center: GeoPoint,
        radius_m: f64,
        count: usize,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let found: Vec<(String, f64)> = redis::cmd("GEOSEARCH")
            .arg(self.geo_key())
            .arg("FROMLONLAT")
            .arg(center.lon)
            .arg(center.lat)
            .arg("BYRADIUS")
            .arg(radius_m)
            .arg("m")
            .arg("ASC")
            .arg("COUNT")
            .arg(count)
            .arg("WITHDIST")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("GEOSEARCH", e))?;
        self.usage.charge(
            1 + found.len() / 10,
            found.iter().map(|f| f.0.len() + 8).sum(),
        );
        Ok(found)
    }
}

#[async_trait]
impl PositionStore for ValkeyPositions {
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
        let position = with_geohash(position, "upsert")?;
        let json = serde_json::to_string(&position)
            .map_err(|e| StoreError::permanent("upsert", e.to_string()))?;
        let polar = position.lat.abs() > GEO_MAX_LAT;
        let bytes = json.len() + position.event_id.len() + position.device_id.len();
        let applied: i64 = self
            .upsert
            .key(self.position_key(&position.device_id))
            .key(self.geo_key())
            .key(self.polar_key())
            .arg(position.ts)
            .arg(&position.event_id)
            .arg(json)
            .arg(position.lon)
            .arg(position.lat)
            .arg(&position.device_id)
            .arg(if polar { "1" } else { "0" })
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("upsert script", e))?;
        // The script runs three commands when it writes, one when the stored one is newer.
        self.usage.charge(if applied == 1 { 3 } else { 1 }, bytes);
        Ok(if applied == 1 {
            UpsertOutcome::Applied
        } else {
            UpsertOutcome::Stale
        })
    }

    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError> {
        Ok(self
            .positions_of(&[device_id.to_string()])
            .await?
            .into_iter()
            .next())
    }

    async fn near(
        &self,
        center: GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<NearbyVehicle>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A center beyond the geo set's latitudes searches from the nearest latitude it takes,
        // that much further (every point within the radius of the center is within the radius
        // plus that distance of the clamped point).
        let searched_from = GeoPoint {
            lat: center.lat.clamp(-GEO_MAX_LAT, GEO_MAX_LAT),
            lon: center.lon,
        };
        let offset_m = haversine_m(center, searched_from);
        let search_radius = (radius_m + offset_m) * SEARCH_SCALE + SEARCH_SLACK_M;
        // Vehicles beyond the geo set's latitudes are few: all of them are candidates.
        let polar: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.polar_key())
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("SMEMBERS", e))?;
        self.usage.charge(1, polar.iter().map(String::len).sum());
        let mut candidates = self.positions_of(&polar).await?;
        let mut read = 0;
        let mut count = limit.saturating_add(EXTRA_CANDIDATES);
        loop {
            let found = self.geosearch(searched_from, search_radius, count).await?;
            let complete = found.len() < count;
            let farthest_searched = found.last().map_or(0.0, |f| f.1);
            // A wider search returns the nearer members again: read only the new ones.
            let new: Vec<String> = found.into_iter().skip(read).map(|f| f.0).collect();
            read += new.len();
            candidates.extend(self.positions_of(&new).await?);
            let answer = nearest(center, radius_m, limit, &candidates);
            // Members left out are at least as far as the last returned one by Valkey's measure,
            // so at least this far by GeoStream's.
            let left_out_at_least =
                ((farthest_searched - SEARCH_SLACK_M) / SEARCH_SCALE - offset_m).max(0.0);
            let kth = answer.last().map(|v| v.distance_m);
            let settled = answer.len() == limit && kth.is_some_and(|d| d < left_out_at_least);
            if complete || settled || count >= usize::MAX / 4 {
                return Ok(answer);
            }
            count = count.saturating_mul(4);
        }
    }
}

/// Replaces a device's rule state if it is still at the expected version, with the alert
/// changes the new state made as its outbox (`pending`, none when ARGV[4] is empty).
/// KEYS: the state hash. ARGV: expected version, new version, state JSON, pending JSON.
pub const COMMIT_STATE_SCRIPT: &str = r#"
local version = redis.call('HGET', KEYS[1], 'version') or '0'
if version ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'states', ARGV[3])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'pending')
else
  redis.call('HSET', KEYS[1], 'pending', ARGV[4])
end
return 1
"#;

/// Empties the outbox once its changes are written, unless a later commit replaced it.
/// KEYS: the state hash. ARGV: the version whose changes were written.
pub const FLUSHED_SCRIPT: &str = r#"
if (redis.call('HGET', KEYS[1], 'version') or '0') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'pending')
end
return 1
"#;

/// The alert changes a committed rule state made, kept beside it until they are written.
#[derive(Debug, Serialize, Deserialize)]
struct PendingChanges {
    version: u64,
    touched: Vec<Alert>,
    removed: Vec<String>,
}

/// Rule state in Valkey, alert records in DynamoDB: the anomaly-inspector's per-reading state
/// write costs a few ECPUs instead of DynamoDB write units, while the alerts (written only on
/// breaching readings) keep their table, indexes and acknowledgements.
///
/// The two stores share no transaction, so the alert changes go through an outbox: the
/// version-checked commit stores the new state with its changes (`pending`); then the changes
/// are written to DynamoDB and the outbox emptied. A discarded evaluation (a version conflict)
/// writes nothing. A crash after the commit leaves the outbox full, and whoever loads the state
/// next writes it before evaluating anything. Each alert record carries the version that wrote
/// it and refuses an older one, so a slow writer of old changes cannot undo newer ones.
pub struct ValkeyStateAlerts {
    connection: ConnectionManager,
    prefix: String,
    commit: Script,
    flushed: Script,
    alerts: DynamoAlerts,
    usage: Usage,
}

impl ValkeyStateAlerts {
    /// `prefix` names the keys (`{PREFIX}:rules:DEVICE`); `alerts` keeps the alert records.
    pub async fn connect(
        url: &str,
        prefix: impl Into<String>,
        alerts: DynamoAlerts,
    ) -> Result<Self, StoreError> {
        Ok(ValkeyStateAlerts {
            connection: connect(url).await?,
            prefix: prefix.into(),
            commit: Script::new(COMMIT_STATE_SCRIPT),
            flushed: Script::new(FLUSHED_SCRIPT),
            alerts,
            usage: Usage::default(),
        })
    }

    /// Counts the ECPUs this store consumes on `meter` (the alerts' units are the alert
    /// store's own).
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.usage.meter = meter;
        self
    }

    fn state_key(&self, device_id: &str) -> String {
        format!("{{{}}}:rules:{device_id}", self.prefix)
    }

    /// Writes a committed state's alert changes to DynamoDB, then empties the outbox.
    async fn flush(&self, device_id: &str, pending: &PendingChanges) -> Result<(), StoreError> {
        self.alerts
            .write_alerts(&pending.touched, pending.version)
            .await?;
        self.alerts
            .remove_alerts(&pending.removed, pending.version)
            .await?;
        self.flushed
            .key(self.state_key(device_id))
            .arg(pending.version)
            .invoke_async::<i64>(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("empty the alert outbox", e))?;
        self.usage.charge(1, 0);
        Ok(())
    }
}

#[async_trait]
impl AlertStore for ValkeyStateAlerts {
    async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError> {
        let (version, states, pending): (Option<u64>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.state_key(device_id))
                .arg("version")
                .arg("states")
                .arg("pending")
                .query_async(&mut self.connection.clone())
                .await
                .map_err(|e| store_error("HMGET rule state", e))?;
        self.usage.charge(
            1,
            states.as_ref().map_or(0, String::len) + pending.as_ref().map_or(0, String::len),
        );
        if let Some(pending) = pending {
            // A commit whose alert changes were not all written (its writer stopped): they go
            // first, so nothing evaluated from this state is published before its alerts exist.
            let pending: PendingChanges = serde_json::from_str(&pending).map_err(|e| {
                StoreError::permanent(
                    "HMGET rule state",
                    format!("device {device_id} outbox: {e}"),
                )
            })?;
            self.flush(device_id, &pending).await?;
        }
        let Some(json) = states else {
            return Ok(Default::default());
        };
        let mut states: DeviceRuleStates = serde_json::from_str(&json).map_err(|e| {
            StoreError::permanent("HMGET rule state", format!("device {device_id}: {e}"))
        })?;
        states.version = version.unwrap_or(0);
        Ok(states)
    }

    async fn commit_changes(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        changes: AlertChanges<'_>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(states)
            .map_err(|e| StoreError::permanent("commit rule state", e.to_string()))?;
        let version = expected_version + 1;
        let pending =
            (!changes.touched.is_empty() || !changes.removed.is_empty()).then(|| PendingChanges {
                version,
                touched: changes.touched.to_vec(),
                removed: changes.removed.to_vec(),
            });
        let pending_json = match &pending {
            Some(pending) => serde_json::to_string(pending)
                .map_err(|e| StoreError::permanent("commit rule state", e.to_string()))?,
            None => String::new(),
        };
        let bytes = json.len() + pending_json.len();
        let committed: i64 = self
            .commit
            .key(self.state_key(device_id))
            .arg(expected_version)
            .arg(version)
            .arg(json)
            .arg(pending_json)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("commit rule state", e))?;
        self.usage.charge(if committed == 1 { 2 } else { 1 }, bytes);
        if committed != 1 {
            return Err(StoreError::conflict(
                "commit rule state",
                format!(
                    "device {device_id}: rule state is no longer at version {expected_version}"
                ),
            ));
        }
        match pending {
            Some(pending) => self.flush(device_id, &pending).await,
            None => Ok(()),
        }
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        self.alerts.list_alerts(filter).await
    }

    async fn get_alert(&self, alert_id: &str) -> Result<Option<Alert>, StoreError> {
        self.alerts.get_alert(alert_id).await
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        at: EpochMillis,
    ) -> Result<Option<Alert>, StoreError> {
        self.alerts.acknowledge(alert_id, by, at).await
    }
}

/// How long the recent-track cache keeps a vehicle's readings: the API's default track span
/// (the last hour), with a margin for late readings.
pub const RECENT_TRACK_MS: i64 = 65 * 60 * 1000;

/// The last hour of every vehicle's readings in Valkey, in front of the archive: a track read
/// within that hour reads only the vehicle's own readings (one sorted set, `{PREFIX}:track:DEVICE`,
/// scored by event time) instead of every archive object of the hour. Older ranges go to the
/// archive.
///
/// A write goes to the archive first, then to the cache; a reading's member is its JSON, so a
/// replayed reading changes nothing. A vehicle's set is trimmed to the window on every write
/// and expires when the vehicle falls silent.
pub struct ValkeyRecentTracks {
    connection: ConnectionManager,
    prefix: String,
    archive: std::sync::Arc<dyn Archive>,
    usage: Usage,
}

impl ValkeyRecentTracks {
    pub async fn connect(
        url: &str,
        prefix: impl Into<String>,
        archive: std::sync::Arc<dyn Archive>,
    ) -> Result<Self, StoreError> {
        Ok(ValkeyRecentTracks {
            connection: connect(url).await?,
            prefix: prefix.into(),
            archive,
            usage: Usage::default(),
        })
    }

    /// Counts the ECPUs the cache consumes on `meter` (the archive's units are its own).
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.usage.meter = meter;
        self
    }

    /// Round trips to Valkey so far.
    pub fn round_trips(&self) -> u64 {
        self.usage.round_trips.load(Ordering::Relaxed)
    }

    fn track_key(&self, device_id: &str) -> String {
        format!("{{{}}}:track:{device_id}", self.prefix)
    }
}

#[async_trait]
impl Archive for ValkeyRecentTracks {
    async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
        let rejected = self.archive.write(readings).await?;
        let refused: std::collections::HashSet<usize> = rejected.iter().map(|r| r.index).collect();
        let oldest_kept = now_millis() - RECENT_TRACK_MS;
        let mut pipeline = redis::pipe();
        let mut devices = std::collections::BTreeSet::new();
        let (mut commands, mut bytes) = (0, 0);
        for (index, reading) in readings.iter().enumerate() {
            if refused.contains(&index) || reading.ts < oldest_kept {
                continue;
            }
            let json = serde_json::to_string(reading)
                .map_err(|e| StoreError::permanent("ZADD track", e.to_string()))?;
            bytes += json.len();
            commands += 1;
            pipeline
                .zadd(self.track_key(&reading.device_id), json, reading.ts)
                .ignore();
            devices.insert(reading.device_id.as_str());
        }
        if commands == 0 {
            return Ok(rejected);
        }
        for device in devices {
            let key = self.track_key(device);
            pipeline
                .zrembyscore(&key, "-inf", format!("({oldest_kept}"))
                .ignore()
                .pexpire(&key, RECENT_TRACK_MS)
                .ignore();
            commands += 2;
        }
        let () = pipeline
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("ZADD track", e))?;
        self.usage.charge(commands, bytes);
        self.usage.meter.add(Unit::ValkeyTrackBytes, bytes as f64);
        Ok(rejected)
    }

    async fn track(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        // The cache holds the window up to now; a range reaching further back is the archive's.
        if from < now_millis() - RECENT_TRACK_MS + 60_000 {
            return self.archive.track(device_id, from, to, limit).await;
        }
        let found: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.track_key(device_id))
            .arg(from)
            .arg(format!("({to}"))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|e| store_error("ZRANGE track", e))?;
        self.usage.charge(1, found.iter().map(String::len).sum());
        let mut readings = found
            .iter()
            .map(|json| {
                serde_json::from_str::<Reading>(json).map_err(|e| {
                    StoreError::permanent("ZRANGE track", format!("stored reading: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Equal event times order by event id, as the archive does.
        readings.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        Ok(readings)
    }
}
