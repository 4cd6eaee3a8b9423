//! What a vehicle did, for looking back: trips, stops and per-minute summaries, computed as its
//! readings arrive (a small state kept with its rule state, so no store read more per reading)
//! and written as history items once they are complete.
//!
//! # Trips and stops
//! Over a vehicle's readings with a position, in event-time order:
//! - A reading is *moving* when its speed is at least [`TripRules::moving_speed_kmh`]: the
//!   `speed_kmh` it sent, or else the speed implied by the distance from the previous position.
//! - Between two consecutive positions lies an *interval*; it is *still* when its second reading
//!   is not moving, and a *gap* when the two are [`TripRules::max_gap_ms`] or more apart (a gap
//!   is still: the vehicle was not seen moving).
//! - A run of still intervals is a *stop* once it lasts [`TripRules::min_stop_duration_ms`] or
//!   holds a gap. The stop is placed where the run began (its first reading).
//! - What lies between two stops (or from the first reading to the first stop) is a *trip*
//!   when it lasted [`TripRules::min_trip_duration_ms`] or covered
//!   [`TripRules::min_trip_distance_m`] (the haversine distance between its consecutive
//!   positions; odometer fields are not used). A shorter one (a car moved across a yard) is no
//!   trip, and the stops on either side of it are one stop.
//! - A trip is reported once the stop after it begins; a stop once the trip after it is a trip.
//!   The trip or stop under way is not reported yet.
//!
//! # Summaries
//! Each reading counts in the minute of its event time: how many readings, the distance of the
//! intervals ending in it (gaps excluded), the highest speed (sent, or implied as above), and
//! the minimum, sum and maximum of every numeric field and metric present. A minute is written
//! once a reading of a later minute arrives; hours and days are minutes combined at read time.
//!
//! Readings are taken once each in event-time order: one at or before the newest a vehicle's
//! history has taken (a late or replayed reading) is archived and evaluated by the rules, but
//! not counted here again.

use smol_str::SmolStr;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::geo::haversine_m;
use crate::model::{GeoPoint, Reading, READING_FIELDS};
use crate::EpochMillis;

const MINUTE_MS: EpochMillis = 60_000;
/// The longest of the settings, seconds.
const MAX_SETTING_S: f64 = 86_400.0;

/// How trips and stops are told apart: the `[trips]` table of the rules file. The defaults
/// follow Traccar's report settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TripRules {
    pub moving_speed_kmh: f64,
    pub min_trip_duration_ms: EpochMillis,
    pub min_trip_distance_m: f64,
    pub min_stop_duration_ms: EpochMillis,
    pub max_gap_ms: EpochMillis,
}

impl Default for TripRules {
    fn default() -> Self {
        TripRules {
            moving_speed_kmh: 5.0,
            min_trip_duration_ms: 300_000,
            min_trip_distance_m: 500.0,
            min_stop_duration_ms: 300_000,
            max_gap_ms: 3_600_000,
        }
    }
}

/// The `[trips]` table as written; every field optional, checked by name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTripRules {
    moving_speed_kmh: Option<f64>,
    min_trip_duration_s: Option<f64>,
    min_trip_distance_m: Option<f64>,
    min_stop_duration_s: Option<f64>,
    max_gap_s: Option<f64>,
}

impl RawTripRules {
    pub(crate) fn compile(self) -> Result<TripRules, String> {
        let defaults = TripRules::default();
        let within = |name: &str, value: Option<f64>, default: f64, max: f64| match value {
            None => Ok(default),
            Some(v) if v.is_finite() && v > 0.0 && v <= max => Ok(v),
            Some(v) => Err(format!(
                "[trips] {name} = {v} must be above 0 and at most {max}"
            )),
        };
        let ms = |name: &str, value: Option<f64>, default_ms: EpochMillis| {
            within(name, value, default_ms as f64 / 1000.0, MAX_SETTING_S)
                .map(|s| (s * 1000.0).round() as EpochMillis)
        };
        Ok(TripRules {
            moving_speed_kmh: within(
                "moving_speed_kmh",
                self.moving_speed_kmh,
                defaults.moving_speed_kmh,
                100.0,
            )?,
            min_trip_duration_ms: ms(
                "min_trip_duration_s",
                self.min_trip_duration_s,
                defaults.min_trip_duration_ms,
            )?,
            min_trip_distance_m: within(
                "min_trip_distance_m",
                self.min_trip_distance_m,
                defaults.min_trip_distance_m,
                1_000_000.0,
            )?,
            min_stop_duration_ms: ms(
                "min_stop_duration_s",
                self.min_stop_duration_s,
                defaults.min_stop_duration_ms,
            )?,
            max_gap_ms: ms("max_gap_s", self.max_gap_s, defaults.max_gap_ms)?,
        })
    }
}

/// A trip, as `GET /v1/vehicles/{id}/trips` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub start_ts: EpochMillis,
    pub end_ts: EpochMillis,
    pub start: GeoPoint,
    pub end: GeoPoint,
    pub distance_m: f64,
    pub duration_s: f64,
    pub max_speed_kmh: f64,
    /// Distance over duration.
    pub avg_speed_kmh: f64,
}

/// A stop, as `GET /v1/vehicles/{id}/stops` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stop {
    pub start_ts: EpochMillis,
    pub end_ts: EpochMillis,
    pub lat: f64,
    pub lon: f64,
    pub duration_s: f64,
}

/// One field's values within a summary bucket, as stored: combinable with another's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FieldRollup {
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: u64,
}

impl FieldRollup {
    fn of(value: f64) -> Self {
        FieldRollup {
            min: value,
            max: value,
            sum: value,
            count: 1,
        }
    }

    fn combine(&mut self, other: &FieldRollup) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// A minute of one vehicle's readings (or, combined, an hour or a day).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    /// The bucket's first millisecond.
    pub start: EpochMillis,
    pub count: u64,
    pub distance_m: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_speed_kmh: Option<f64>,
    /// Every numeric reading field and metric (`metrics.<name>`) present. Names of up to 23
    /// bytes are kept inline (`SmolStr`): the minute under way is copied with the vehicle's
    /// state on every batch, and a copy of inline names touches no shared reference count.
    #[serde(default)]
    pub fields: BTreeMap<SmolStr, FieldRollup>,
}

impl Rollup {
    fn empty(start: EpochMillis) -> Self {
        Rollup {
            start,
            count: 0,
            distance_m: 0.0,
            max_speed_kmh: None,
            fields: BTreeMap::new(),
        }
    }

    fn add_field(&mut self, name: &str, value: f64) {
        match self.fields.get_mut(name) {
            Some(field) => field.combine(&FieldRollup::of(value)),
            None => {
                self.fields
                    .insert(SmolStr::new(name), FieldRollup::of(value));
            }
        }
    }

    fn combine(&mut self, other: &Rollup) {
        self.count += other.count;
        self.distance_m += other.distance_m;
        self.max_speed_kmh = max_of(self.max_speed_kmh, other.max_speed_kmh);
        for (name, field) in &other.fields {
            match self.fields.get_mut(name) {
                Some(mine) => mine.combine(field),
                None => {
                    self.fields.insert(name.clone(), *field);
                }
            }
        }
    }
}

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// How long the buckets of a summary are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryInterval {
    Minute,
    Hour,
    Day,
}

impl SummaryInterval {
    /// `1m`, `1h` or `1d`, as the API takes it.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "1m" => Some(SummaryInterval::Minute),
            "1h" => Some(SummaryInterval::Hour),
            "1d" => Some(SummaryInterval::Day),
            _ => None,
        }
    }

    pub fn millis(self) -> EpochMillis {
        match self {
            SummaryInterval::Minute => MINUTE_MS,
            SummaryInterval::Hour => 60 * MINUTE_MS,
            SummaryInterval::Day => 24 * 60 * MINUTE_MS,
        }
    }
}

/// A field's values in a summary bucket, as the API answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldSummary {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// One bucket of `GET /v1/vehicles/{id}/summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryBucket {
    pub start: EpochMillis,
    pub count: u64,
    pub distance_m: f64,
    pub max_speed_kmh: Option<f64>,
    pub fields: BTreeMap<String, FieldSummary>,
}

/// Minute rollups combined into buckets of `interval` (UTC-aligned), oldest first. Minutes
/// stored more than once for the same start (none are, but a store may hold a replay's copy
/// under the same key only) are combined too.
pub fn summarize(minutes: &[Rollup], interval: SummaryInterval) -> Vec<SummaryBucket> {
    let width = interval.millis();
    let mut buckets: BTreeMap<EpochMillis, Rollup> = BTreeMap::new();
    for minute in minutes {
        let start = minute.start.div_euclid(width) * width;
        buckets
            .entry(start)
            .or_insert_with(|| Rollup::empty(start))
            .combine(minute);
    }
    buckets
        .into_values()
        .map(|bucket| SummaryBucket {
            start: bucket.start,
            count: bucket.count,
            distance_m: bucket.distance_m,
            max_speed_kmh: bucket.max_speed_kmh,
            fields: bucket
                .fields
                .into_iter()
                .map(|(name, f)| {
                    let avg = f.sum / f.count.max(1) as f64;
                    (
                        name.to_string(),
                        FieldSummary {
                            min: f.min,
                            avg,
                            max: f.max,
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

/// A complete piece of a vehicle's history, written once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HistoryItem {
    Trip(Trip),
    Stop(Stop),
    Minute(Rollup),
}

impl HistoryItem {
    /// Where the item ends (a minute summary: where its minute begins): what retention
    /// counts from.
    pub fn end(&self) -> EpochMillis {
        match self {
            HistoryItem::Trip(trip) => trip.end_ts,
            HistoryItem::Stop(stop) => stop.end_ts,
            HistoryItem::Minute(minute) => minute.start,
        }
    }

    /// Where the item begins: with the kind, its key in a vehicle's history (a retried write
    /// of the same item overwrites it).
    pub fn start(&self) -> EpochMillis {
        match self {
            HistoryItem::Trip(trip) => trip.start_ts,
            HistoryItem::Stop(stop) => stop.start_ts,
            HistoryItem::Minute(minute) => minute.start,
        }
    }

    pub fn kind(&self) -> HistoryKind {
        match self {
            HistoryItem::Trip(_) => HistoryKind::Trip,
            HistoryItem::Stop(_) => HistoryKind::Stop,
            HistoryItem::Minute(_) => HistoryKind::Minute,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HistoryKind {
    Trip,
    Stop,
    Minute,
}

impl HistoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryKind::Trip => "trip",
            HistoryKind::Stop => "stop",
            HistoryKind::Minute => "minute",
        }
    }
}

/// A position at a time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fix {
    pub ts: EpochMillis,
    pub lat: f64,
    pub lon: f64,
}

impl Fix {
    fn point(self) -> GeoPoint {
        GeoPoint {
            lat: self.lat,
            lon: self.lon,
        }
    }
}

/// A run of still intervals inside a trip that is not (yet) long enough to be a stop; what the
/// trip was at the run's first reading, which is where the trip ends if the run becomes one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StillRun {
    pub start: Fix,
    pub distance_m: f64,
    pub max_speed_kmh: f64,
}

/// What a vehicle is doing between its stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Segment {
    /// Stopped since `since` (a stop: the run of still intervals is long enough).
    Stopped { since: Fix },
    /// Moving from `start`; a trip once `confirmed` (long or far enough). `stop_before` is the
    /// stop it left, reported when the trip is confirmed (if it is not, that stop goes on).
    Moving {
        start: Fix,
        distance_m: f64,
        max_speed_kmh: f64,
        confirmed: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_before: Option<Fix>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        still: Option<StillRun>,
    },
}

/// A vehicle's history state, kept with its rule state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryState {
    /// The newest reading taken, in [`Reading::order_key`] order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<(EpochMillis, SmolStr)>,
    /// The newest position taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Fix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    /// The minute under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minute: Option<Rollup>,
}

/// What taking readings into a history made.
#[derive(Debug, Default, PartialEq)]
pub struct HistoryUpdate {
    /// Complete trips, stops and minutes, in the order they completed.
    pub items: Vec<HistoryItem>,
    /// Readings at or before the newest already taken: not counted again.
    pub skipped: usize,
}

impl TripRules {
    /// Takes `readings` (in event-time order) into `state`; what they completed comes out.
    pub fn advance<R: std::borrow::Borrow<Reading>>(
        &self,
        state: &mut HistoryState,
        readings: &[R],
    ) -> HistoryUpdate {
        let mut update = HistoryUpdate::default();
        for reading in readings.iter().map(R::borrow) {
            let key = reading.order_key();
            if state
                .through
                .as_ref()
                .is_some_and(|(ts, id)| key <= (*ts, id.as_str()))
            {
                update.skipped += 1;
                continue;
            }
            state.through = Some((reading.ts, SmolStr::from(reading.event_id.as_str())));
            self.take(state, reading, &mut update.items);
        }
        update
    }

    fn take(&self, state: &mut HistoryState, reading: &Reading, items: &mut Vec<HistoryItem>) {
        let minute_start = reading.ts.div_euclid(MINUTE_MS) * MINUTE_MS;
        let minute = match state.minute.take() {
            Some(open) if open.start == minute_start => open,
            Some(done) => {
                items.push(HistoryItem::Minute(done));
                Rollup::empty(minute_start)
            }
            None => Rollup::empty(minute_start),
        };
        let minute = state.minute.insert(minute);
        minute.count += 1;
        for (name, _, _) in READING_FIELDS {
            if let Some(value) = reading.value(name) {
                minute.add_field(name, value);
            }
        }
        for (name, value) in &reading.metrics {
            minute.add_field(&format!("metrics.{name}"), *value);
        }
        let Some(position) = reading.position() else {
            return;
        };
        let fix = Fix {
            ts: reading.ts,
            lat: position.lat,
            lon: position.lon,
        };
        let Some(last) = state.last.replace(fix) else {
            // The first position: a trip may begin here (its speeds are those of the intervals
            // after it).
            minute.max_speed_kmh = max_of(minute.max_speed_kmh, reading.speed_kmh);
            state.segment = Some(Segment::Moving {
                start: fix,
                distance_m: 0.0,
                max_speed_kmh: 0.0,
                confirmed: false,
                stop_before: None,
                still: None,
            });
            return;
        };
        let elapsed = fix.ts - last.ts;
        let distance = haversine_m(last.point(), fix.point());
        let speed = reading
            .speed_kmh
            .or_else(|| (elapsed > 0).then(|| distance / (elapsed as f64 / 1000.0) * 3.6));
        let gap = elapsed >= self.max_gap_ms;
        let moving = !gap && speed.is_some_and(|s| s >= self.moving_speed_kmh);
        minute.max_speed_kmh = max_of(minute.max_speed_kmh, speed);
        if !gap {
            minute.distance_m += distance;
        }
        let segment = state
            .segment
            .take()
            .unwrap_or(Segment::Stopped { since: last });
        state.segment = Some(self.step(segment, last, fix, distance, speed, moving, gap, items));
    }

    /// One interval, from `last` to `fix`, of a vehicle's segment.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        segment: Segment,
        last: Fix,
        fix: Fix,
        distance: f64,
        speed: Option<f64>,
        moving: bool,
        gap: bool,
        items: &mut Vec<HistoryItem>,
    ) -> Segment {
        match segment {
            Segment::Stopped { since } if moving => {
                let mut next = Segment::Moving {
                    start: last,
                    distance_m: distance,
                    max_speed_kmh: speed.unwrap_or(0.0),
                    confirmed: false,
                    stop_before: Some(since),
                    still: None,
                };
                self.confirm(&mut next, fix, items);
                next
            }
            stopped @ Segment::Stopped { .. } => stopped,
            Segment::Moving {
                start,
                mut distance_m,
                mut max_speed_kmh,
                confirmed,
                stop_before,
                mut still,
            } => {
                if moving {
                    distance_m += distance;
                    max_speed_kmh = max_speed_kmh.max(speed.unwrap_or(0.0));
                    let mut next = Segment::Moving {
                        start,
                        distance_m,
                        max_speed_kmh,
                        confirmed,
                        stop_before,
                        still: None,
                    };
                    self.confirm(&mut next, fix, items);
                    return next;
                }
                let run = still.get_or_insert(StillRun {
                    start: last,
                    distance_m,
                    max_speed_kmh,
                });
                if !(gap || fix.ts - run.start.ts >= self.min_stop_duration_ms) {
                    // (A still reading's speed is below any moving one: the maximum stays.)
                    if !gap {
                        distance_m += distance;
                    }
                    return Segment::Moving {
                        start,
                        distance_m,
                        max_speed_kmh,
                        confirmed,
                        stop_before,
                        still,
                    };
                }
                // The run is a stop: the trip ended where it began.
                let end = run.start;
                if confirmed {
                    let duration_s = (end.ts - start.ts) as f64 / 1000.0;
                    items.push(HistoryItem::Trip(Trip {
                        start_ts: start.ts,
                        end_ts: end.ts,
                        start: start.point(),
                        end: end.point(),
                        distance_m: run.distance_m,
                        duration_s,
                        max_speed_kmh: run.max_speed_kmh,
                        avg_speed_kmh: if duration_s > 0.0 {
                            run.distance_m / duration_s * 3.6
                        } else {
                            0.0
                        },
                    }));
                    Segment::Stopped { since: end }
                } else {
                    // Not a trip: the stop it left goes on (or, first of all, one begins).
                    Segment::Stopped {
                        since: stop_before.unwrap_or(end),
                    }
                }
            }
        }
    }

    /// A trip under way becomes one once it has lasted or covered enough by `fix`, the end
    /// of a moving interval; the stop it left is then complete.
    fn confirm(&self, segment: &mut Segment, fix: Fix, items: &mut Vec<HistoryItem>) {
        if let Segment::Moving {
            start,
            distance_m,
            confirmed,
            stop_before,
            ..
        } = segment
        {
            if *confirmed
                || (fix.ts - start.ts < self.min_trip_duration_ms
                    && *distance_m < self.min_trip_distance_m)
            {
                return;
            }
            *confirmed = true;
            if let Some(since) = stop_before.take() {
                items.push(HistoryItem::Stop(Stop {
                    start_ts: since.ts,
                    end_ts: start.ts,
                    lat: since.lat,
                    lon: since.lon,
                    duration_s: (start.ts - since.ts) as f64 / 1000.0,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests;
