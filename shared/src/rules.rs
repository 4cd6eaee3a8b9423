//! The rules engine: rules are data (a TOML file), evaluated per device with hysteresis and
//! minimum durations. Per (device, rule) state is passed in and out so it can live in a store
//! (Lambda is stateless), and evaluation is idempotent: readings at or before the state's
//! watermark are skipped, so a replayed batch changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use rpds::QueueSync;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::model::{
    Alert, AlertState, AlertTransition, Reading, Severity, TransitionKind, READING_FIELDS,
};
use crate::EpochMillis;

/// The rules GeoStream ships with (`shared/rules/default.toml`).
pub const DEFAULT_RULES_TOML: &str = include_str!("../rules/default.toml");

/// One rule as written in the file. Every field is optional here so that a missing or
/// conflicting one can be reported by name when the rule is compiled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    metric: Option<String>,
    severity: Option<Severity>,
    above: Option<f64>,
    clear_below: Option<f64>,
    below: Option<f64>,
    clear_above: Option<f64>,
    zscore_above: Option<f64>,
    clear_zscore_below: Option<f64>,
    min_samples: Option<u64>,
    window: Option<u64>,
    min_std: Option<f64>,
    min_duration_s: Option<f64>,
    clear_duration_s: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuleFile {
    /// How late (event time, behind the newest reading of the device) a reading may come and
    /// still be evaluated in its place.
    lateness_s: Option<f64>,
    /// Fleet events' settings (overspeed, offline, geofence defaults).
    fleet: Option<crate::fleet::RawFleetRules>,
    /// How trips and stops are told apart.
    trips: Option<crate::history::RawTripRules>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

/// The lateness bound when the rules file sets none (see [`RuleSet::lateness_ms`]).
pub const DEFAULT_LATENESS_MS: EpochMillis = 60_000;
/// At most this many readings are kept for late ones to be evaluated among: a device that
/// reports faster than this many per lateness bound gets a shorter bound, so the rule state
/// stays a few kilobytes (it is written on every batch).
pub const MAX_WINDOW_READINGS: usize = 64;

/// When a rule breaches and when it clears.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Above {
        threshold: f64,
        clear_below: f64,
    },
    Below {
        threshold: f64,
        clear_above: f64,
    },
    ZScore {
        z_threshold: f64,
        clear_z: f64,
        min_samples: u64,
        window: u64,
        min_std: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Also the key of the rule's state in every device's rule map. Names of up to 23 bytes
    /// are inline (`SmolStr`): a device's map is copied on every evaluation (twice with the
    /// lateness window), and copying inline keys touches no reference count; `Arc<str>` keys
    /// made per device cost a cache miss each (7.3% of the embedded burst's samples in the
    /// map copy, 4.9% with the keys shared, docs/performance.md).
    pub name: SmolStr,
    pub metric: String,
    pub severity: Severity,
    pub condition: Condition,
    pub min_duration_ms: EpochMillis,
    pub clear_duration_ms: EpochMillis,
}

/// A compiled set of rules.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Bounded lateness: a reading up to this far behind the device's newest evaluated reading
    /// (and among its last [`MAX_WINDOW_READINGS`]) is evaluated in event-time order, as if it
    /// had come in order; an older one is reported in [`Evaluation::too_late`]. 0 turns it off.
    pub lateness_ms: EpochMillis,
    /// The `[fleet]` table: fleet events' limits and durations.
    pub fleet: crate::fleet::FleetRules,
    /// The `[trips]` table: how trips and stops are told apart.
    pub trips: crate::history::TripRules,
    /// The metrics the rules read, each once, in rule order (found once, not per evaluation;
    /// shared with the lateness windows made from it).
    metrics: Arc<[String]>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("rules file is not valid TOML for rules: {0}")]
    Syntax(String),
    #[error("rule #{index} ({name}): {message}")]
    Invalid {
        index: usize,
        name: String,
        message: String,
    },
}

impl RuleSet {
    pub fn default_rules() -> RuleSet {
        RuleSet::from_toml(DEFAULT_RULES_TOML).expect("the bundled default rules are valid")
    }

    pub fn from_toml(text: &str) -> Result<RuleSet, RuleError> {
        let raw: RawRuleFile =
            toml::from_str(text).map_err(|e| RuleError::Syntax(e.to_string()))?;
        let lateness_ms = match raw.lateness_s {
            None => DEFAULT_LATENESS_MS,
            Some(s) if s.is_finite() && (0.0..=3_600.0).contains(&s) => {
                (s * 1000.0).round() as EpochMillis
            }
            Some(s) => {
                return Err(RuleError::Syntax(format!(
                    "lateness_s {s} must be between 0 and 3600 seconds"
                )))
            }
        };
        let fleet = raw
            .fleet
            .unwrap_or_default()
            .compile()
            .map_err(RuleError::Syntax)?;
        let trips = raw
            .trips
            .unwrap_or_default()
            .compile()
            .map_err(RuleError::Syntax)?;
        let mut rules: Vec<Rule> = Vec::new();
        for (index, raw) in raw.rules.into_iter().enumerate() {
            let index = index + 1;
            let name = raw.name.clone().unwrap_or_default();
            let invalid = |message: String| RuleError::Invalid {
                index,
                name: if name.is_empty() {
                    "unnamed".into()
                } else {
                    name.clone()
                },
                message,
            };
            let rule = compile(raw).map_err(invalid)?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(invalid(
                    "a rule of this name comes earlier in the file".into(),
                ));
            }
            rules.push(rule);
        }
        let mut metrics: Vec<String> = Vec::new();
        for rule in &rules {
            if !metrics.contains(&rule.metric) {
                metrics.push(rule.metric.clone());
            }
        }
        Ok(RuleSet {
            rules,
            lateness_ms,
            fleet,
            trips,
            metrics: metrics.into(),
        })
    }

    /// Evaluates a device's readings against every rule, updating `state`, as if every
    /// reading the device's state has seen had come in event-time order:
    /// - readings after the state's watermark are evaluated in order;
    /// - a late one (at or before the watermark, within the lateness bound) is put in its
    ///   place among the readings of the window and the window evaluated again from the state
    ///   before it; what that changes comes out as new transitions, retractions of transitions
    ///   that in-order delivery would not have made, rewritten and removed alert records;
    /// - readings seen before are skipped (a replayed batch changes nothing), and those behind
    ///   the lateness bound are listed in [`Evaluation::too_late`], not evaluated.
    pub fn evaluate<R: std::borrow::Borrow<Reading>>(
        &self,
        device_id: &str,
        state: &mut DeviceRuleStates,
        readings: &[R],
    ) -> Evaluation {
        let metrics = &self.metrics;
        // A shared window (the store keeps the state it handed out) is copied here; its
        // readings are a persistent queue, so the copy does not copy them.
        let mut window = state
            .window
            .take()
            .map(Arc::unwrap_or_clone)
            .unwrap_or_else(|| LatenessWindow {
                base: state.rules.clone(),
                base_mark: state.watermark.clone(),
                metrics: metrics.clone(),
                readings: QueueSync::new_sync(),
            });
        window.align(metrics);
        let after = |mark: &Option<Watermark>, key: (EpochMillis, &str)| match mark {
            Some(mark) => key > (mark.ts, mark.event_id.as_str()),
            None => true,
        };
        let mut evaluation = Evaluation::default();
        let mut fresh: Vec<WindowReading> = Vec::new();
        let mut late: Vec<WindowReading> = Vec::new();
        for reading in readings.iter().map(R::borrow) {
            let key = reading.order_key();
            if after(&state.watermark, key) {
                fresh.push(WindowReading::of(reading, metrics));
            } else if !after(&window.base_mark, key) {
                let at_mark = window
                    .base_mark
                    .as_ref()
                    .is_some_and(|m| key == (m.ts, m.event_id.as_str()));
                if !at_mark {
                    evaluation
                        .too_late
                        .push((reading.ts, reading.event_id.clone()));
                }
            } else if !window.holds(key) {
                late.push(WindowReading::of(reading, metrics));
            }
        }
        sort_dedup(&mut fresh);
        sort_dedup(&mut late);
        evaluation.readings_evaluated = fresh.len() + late.len();
        let newest = if late.is_empty() {
            let mut touched = BTreeMap::new();
            evaluation.transitions = self.run(
                device_id,
                Arc::make_mut(&mut state.rules),
                &fresh,
                metrics,
                &mut touched,
            );
            evaluation.touched_alerts = touched.into_values().collect();
            let newest = fresh.last().map(WindowReading::watermark);
            for reading in fresh {
                window.readings.enqueue_mut(reading);
            }
            newest
        } else {
            self.evaluate_again(device_id, state, &mut window, late, fresh, &mut evaluation)
        };
        if let Some(newest) = newest {
            state.watermark = Some(newest);
        }
        if let Some(newest) = &state.watermark {
            self.fold_old_readings(device_id, &mut window, newest.ts, metrics);
        }
        if !window.readings.is_empty() {
            state.window = Some(Arc::new(window));
        }
        evaluation
    }

    /// Puts `late` readings in their place in the window and evaluates it again from its base
    /// state, then tells what differs from the evaluation that was made (and published). The
    /// newest reading of the window is returned.
    fn evaluate_again(
        &self,
        device_id: &str,
        state: &mut DeviceRuleStates,
        window: &mut LatenessWindow,
        late: Vec<WindowReading>,
        fresh: Vec<WindowReading>,
        evaluation: &mut Evaluation,
    ) -> Option<Watermark> {
        let metrics = &self.metrics;
        let retracted_at = late[0].0;
        let mut readings: Vec<WindowReading> = window.readings.iter().cloned().collect();
        let mut made_rules = BTreeMap::clone(&window.base);
        let mut made_touched = BTreeMap::new();
        let made = self.run(
            device_id,
            &mut made_rules,
            &readings,
            metrics,
            &mut made_touched,
        );
        readings.extend(late);
        readings.extend(fresh);
        sort_dedup(&mut readings);
        let mut rules = BTreeMap::clone(&window.base);
        let mut touched = BTreeMap::new();
        let now = self.run(device_id, &mut rules, &readings, metrics, &mut touched);
        state.rules = Arc::new(rules);
        let newest = readings.last().map(WindowReading::watermark);
        window.readings = readings.into_iter().collect();

        // Undo first (newest first), then what in-order delivery makes, in order. A transition
        // that in-order delivery makes differently (a clear that counts one more reading) is
        // retracted and published again, under the same id.
        for transition in made.iter().rev() {
            if !now.contains(transition) {
                evaluation
                    .transitions
                    .push(transition.retraction(retracted_at));
            }
        }
        evaluation
            .transitions
            .extend(now.iter().filter(|t| !made.contains(t)).cloned());
        evaluation.removed_alerts = made_touched
            .keys()
            .filter(|id| !touched.contains_key(*id))
            .cloned()
            .collect();
        evaluation.touched_alerts = touched
            .into_iter()
            .filter(|(id, alert)| made_touched.get(id) != Some(alert))
            .map(|(_, alert)| alert)
            .collect();
        newest
    }

    /// Moves readings out of the window into its base state once they are behind the lateness
    /// bound from the `newest` reading (or beyond the window's size).
    fn fold_old_readings(
        &self,
        device_id: &str,
        window: &mut LatenessWindow,
        newest: EpochMillis,
        metrics: &[String],
    ) {
        let beyond_size = window.readings.len().saturating_sub(MAX_WINDOW_READINGS);
        let mut folded = Vec::new();
        while let Some(oldest) = window.readings.peek() {
            if folded.len() >= beyond_size && oldest.0 > newest - self.lateness_ms {
                break;
            }
            folded.push(oldest.clone());
            window.readings.dequeue_mut();
        }
        if folded.is_empty() || window.readings.is_empty() {
            // Nothing behind the bound; or all of it: then the window goes, and its base is the
            // device's rule state.
            return;
        }
        self.run(
            device_id,
            Arc::make_mut(&mut window.base),
            &folded,
            metrics,
            &mut BTreeMap::new(),
        );
        window.base_mark = folded.last().map(WindowReading::watermark);
    }

    /// Steps every rule through `readings` (in order), from `rules`; the transitions made,
    /// and the latest record of every alert touched into `touched`.
    fn run(
        &self,
        device_id: &str,
        rules: &mut BTreeMap<SmolStr, RuleState>,
        readings: &[WindowReading],
        metrics: &[String],
        touched: &mut BTreeMap<String, Alert>,
    ) -> Vec<AlertTransition> {
        let mut transitions = Vec::new();
        // Each rule's place among the metrics, found once rather than per reading.
        let slots: Vec<Option<usize>> = self
            .rules
            .iter()
            .map(|rule| metrics.iter().position(|m| *m == rule.metric))
            .collect();
        for reading in readings {
            for (rule, slot) in self.rules.iter().zip(&slots) {
                let Some(value) = slot.and_then(|i| reading.2.get(i).copied().flatten()) else {
                    continue;
                };
                if !rules.contains_key(rule.name.as_str()) {
                    rules.insert(rule.name.clone(), RuleState::default());
                }
                let Some(rule_state) = rules.get_mut(rule.name.as_str()) else {
                    continue;
                };
                if let Some(transition) =
                    step(rule, device_id, rule_state, reading.0, value, touched)
                {
                    transitions.push(transition);
                }
            }
        }
        transitions
    }
}

fn sort_dedup(readings: &mut Vec<WindowReading>) {
    readings.sort_by(|a, b| a.key().cmp(&b.key()));
    readings.dedup_by(|a, b| a.key() == b.key());
}

/// The readings a device's rules evaluated within the lateness bound, and the rule state before
/// the oldest of them: a late reading is put in its place and the window evaluated again.
/// Stored with the rule state; none when the bound is 0 or no reading is within it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatenessWindow {
    /// The rule state after every reading up to `base_mark` and before the window's (shared
    /// with the copies of the window until one of them folds readings into it).
    pub base: Arc<BTreeMap<SmolStr, RuleState>>,
    /// The last reading folded into `base`: a reading at or before it is too late.
    pub base_mark: Option<Watermark>,
    /// What each value of a window reading is (the rules' metrics when it was stored).
    pub metrics: Arc<[String]>,
    /// In [`Reading::order_key`] order, oldest first. A persistent queue: a copy of the window
    /// shares its readings, and an evaluation adds the newest and drops the oldest without
    /// copying the rest (a copied list of 64 readings was an eighth of the embedded pipeline's
    /// time). Serialized as a plain list.
    #[serde(with = "reading_queue")]
    pub readings: QueueSync<WindowReading>,
}

/// A window's readings (de)serialized as the list they were stored as before they were a queue.
mod reading_queue {
    use rpds::QueueSync;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::WindowReading;

    pub fn serialize<S: Serializer>(
        readings: &QueueSync<WindowReading>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(readings.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<QueueSync<WindowReading>, D::Error> {
        Ok(Vec::<WindowReading>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

impl LatenessWindow {
    /// Re-lays the stored values out for `metrics` (the rules file may have changed).
    fn align(&mut self, metrics: &Arc<[String]>) {
        if self.metrics == *metrics {
            return;
        }
        let realigned = self
            .readings
            .iter()
            .map(|reading| {
                let values = metrics
                    .iter()
                    .map(|m| {
                        self.metrics
                            .iter()
                            .position(|stored| stored == m)
                            .and_then(|i| reading.2.get(i).copied().flatten())
                    })
                    .collect();
                WindowReading(reading.0, reading.1.clone(), values)
            })
            .collect();
        self.readings = realigned;
        self.metrics = metrics.clone();
    }

    /// Whether a reading of this key is in the window.
    fn holds(&self, key: (EpochMillis, &str)) -> bool {
        self.readings.iter().any(|r| r.key() == key)
    }
}

/// One evaluated reading, as kept for late ones: event time, event id, and the value of each
/// of the window's metrics (a tuple, so the stored state stays small). Id and values are shared,
/// not copied, when a rule state is cloned: a store hands out and takes a copy of the whole
/// state for every batch, and a full window of owned strings and vectors made those copies
/// most of the embedded pipeline's time (the burst bench fell from ~118,000 to 31,000
/// readings/s). Serialized as a plain string and list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowReading(pub EpochMillis, pub SmolStr, pub Arc<[Option<f64>]>);

impl WindowReading {
    fn of(reading: &Reading, metrics: &[String]) -> Self {
        WindowReading(
            reading.ts,
            SmolStr::from(reading.event_id.as_str()),
            metrics.iter().map(|m| reading.value(m)).collect(),
        )
    }

    fn key(&self) -> (EpochMillis, &str) {
        (self.0, &self.1)
    }

    fn watermark(&self) -> Watermark {
        Watermark {
            ts: self.0,
            event_id: self.1.clone(),
        }
    }
}

fn compile(raw: RawRule) -> Result<Rule, String> {
    let name = raw.name.ok_or("name is required")?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("name must be 1-64 characters of A-Z a-z 0-9 _ -".into());
    }
    let metric = raw.metric.ok_or("metric is required")?;
    let known = READING_FIELDS.iter().any(|(field, _, _)| *field == metric)
        || metric
            .strip_prefix("metrics.")
            .is_some_and(crate::validation::is_valid_device_id);
    if !known {
        return Err(format!(
            "metric {metric:?} is neither a named reading ({}) nor metrics.<name>",
            READING_FIELDS
                .iter()
                .map(|f| f.0)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let severity = raw
        .severity
        .ok_or("severity is required (info, warning, major, critical)")?;
    let finite = |field: &str, value: Option<f64>| -> Result<f64, String> {
        match value {
            None => Err(format!("{field} is required with this condition")),
            Some(v) if !v.is_finite() => Err(format!("{field} must be a finite number")),
            Some(v) => Ok(v),
        }
    };
    let condition = match (
        raw.above.is_some(),
        raw.below.is_some(),
        raw.zscore_above.is_some(),
    ) {
        (true, false, false) => {
            let threshold = finite("above", raw.above)?;
            let clear_below = finite("clear_below", raw.clear_below.or(raw.above))?;
            if clear_below > threshold {
                return Err(format!(
                    "clear_below {clear_below} must not exceed above {threshold}"
                ));
            }
            Condition::Above {
                threshold,
                clear_below,
            }
        }
        (false, true, false) => {
            let threshold = finite("below", raw.below)?;
            let clear_above = finite("clear_above", raw.clear_above.or(raw.below))?;
            if clear_above < threshold {
                return Err(format!(
                    "clear_above {clear_above} must not be under below {threshold}"
                ));
            }
            Condition::Below {
                threshold,
                clear_above,
            }
        }
        (false, false, true) => {
            let z_threshold = finite("zscore_above", raw.zscore_above)?;
            let clear_z = finite(
                "clear_zscore_below",
                raw.clear_zscore_below.or(raw.zscore_above),
            )?;
            if z_threshold <= 0.0 || clear_z <= 0.0 || clear_z > z_threshold {
                return Err(format!(
                    "need 0 < clear_zscore_below ({clear_z}) <= zscore_above ({z_threshold})"
                ));
            }
            let window = raw.window.unwrap_or(100).max(2);
            Condition::ZScore {
                z_threshold,
                clear_z,
                min_samples: raw.min_samples.unwrap_or(30).max(2),
                window,
                min_std: finite("min_std", Some(raw.min_std.unwrap_or(1e-3)))?.max(1e-9),
            }
        }
        _ => return Err("exactly one of above, below or zscore_above is required".into()),
    };
    let duration = |field: &str, seconds: Option<f64>| -> Result<EpochMillis, String> {
        match seconds.unwrap_or(0.0) {
            s if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
                Ok((s * 1000.0).round() as EpochMillis)
            }
            s => Err(format!("{field} {s} must be between 0 and 86400 seconds")),
        }
    };
    Ok(Rule {
        name: SmolStr::new(name),
        metric,
        severity,
        condition,
        min_duration_ms: duration("min_duration_s", raw.min_duration_s)?,
        clear_duration_ms: duration("clear_duration_s", raw.clear_duration_s)?,
    })
}

/// The last reading a device's rules have seen, in [`Reading::order_key`] order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watermark {
    pub ts: EpochMillis,
    pub event_id: SmolStr,
}

/// All rule state of one device: one entry per (device, rule), stored as one item so a batch
/// costs one read and one conditional write per device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRuleStates {
    /// Optimistic-concurrency version; the store bumps it on every commit.
    pub version: u64,
    pub watermark: Option<Watermark>,
    /// Shared between copies of the state (a store's load and commit) until one changes it.
    pub rules: Arc<BTreeMap<SmolStr, RuleState>>,
    /// Transitions committed with this state but not yet known to be on the alerts bus (an
    /// outbox): the anomaly-inspector publishes them before anything newer, then empties it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<AlertTransition>,
    /// For late readings (bounded lateness). Shared: a copy of the state (a store's load and
    /// commit) does not copy the window; an evaluation copies it once, if it is shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Arc<LatenessWindow>>,
    /// The newest bus record (its id as written) whose readings these rules took: a reading
    /// behind the lateness bound in a record at or before it is a replay, not a late reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated_through: Option<SmolStr>,
    /// Fleet events' state (geofences, overspeed, offline).
    #[serde(default, skip_serializing_if = "is_default")]
    pub fleet: crate::fleet::FleetState,
    /// Fleet events committed with this state, not yet known to be stored and published (an
    /// outbox, as `outbox` is for alert transitions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet_outbox: Vec<crate::fleet::FleetEvent>,
    /// Trips, stops and the minute under way (history items are written as they complete).
    #[serde(default, skip_serializing_if = "is_default")]
    /// Shared between copies of the state until one changes it, as `rules`.
    pub history: Arc<crate::history::HistoryState>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub phase: Phase,
    /// Running statistics, for z-score rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<RunningStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Normal,
    /// Breaching, but not yet for the rule's minimum duration.
    Pending {
        since: EpochMillis,
        peak_value: f64,
        peak_score: f64,
        count: u64,
    },
    /// The alert is boxed so that a rule state, copied with the device's whole rule map on
    /// every evaluation, stays small (72 bytes, not 216) for the phases most rules are in.
    Active { alert: Box<Alert>, peak_score: f64 },
    /// Clear condition holds, but not yet for the rule's clear duration.
    Clearing {
        since: EpochMillis,
        alert: Box<Alert>,
        peak_score: f64,
    },
}

/// Exponentially weighted running mean and variance: an exact cumulative mean and variance for
/// the first `window` readings, then a moving one with weight 1/window, so the baseline follows
/// slow drift.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    pub count: u64,
    pub mean: f64,
    pub variance: f64,
}

impl RunningStats {
    pub fn update(&mut self, value: f64, window: u64) {
        self.count += 1;
        let weight = 1.0 / self.count.min(window) as f64;
        let diff = value - self.mean;
        let increment = weight * diff;
        self.mean += increment;
        self.variance = (1.0 - weight) * (self.variance + diff * increment);
    }

    pub fn z_score(&self, value: f64, min_std: f64) -> f64 {
        (value - self.mean) / self.variance.sqrt().max(min_std)
    }
}

/// What one evaluation produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub transitions: Vec<AlertTransition>,
    /// The latest record of every alert this evaluation raised, updated or cleared.
    pub touched_alerts: Vec<Alert>,
    /// Alerts that in-order delivery would not have made (a late reading showed it): their
    /// records go; their transitions are retracted in `transitions`.
    pub removed_alerts: Vec<String>,
    /// Readings new to the rules, in order or late; zero means nothing changed and nothing
    /// needs storing.
    pub readings_evaluated: usize,
    /// Readings behind the lateness bound, not evaluated: (event time, event id). Some may be
    /// replays of readings evaluated long ago; the caller tells them apart.
    pub too_late: Vec<(EpochMillis, String)>,
}

/// Whether a value breaches the rule, whether it is on the clear side, and how bad it is (a
/// score that grows with severity, to track the peak).
fn classify(rule: &Rule, rule_state: &mut RuleState, value: f64) -> (bool, bool, f64) {
    match &rule.condition {
        Condition::Above {
            threshold,
            clear_below,
        } => (value > *threshold, value < *clear_below, value),
        Condition::Below {
            threshold,
            clear_above,
        } => (value < *threshold, value > *clear_above, -value),
        Condition::ZScore {
            z_threshold,
            clear_z,
            min_samples,
            window,
            min_std,
        } => {
            let stats = rule_state.stats.get_or_insert_with(RunningStats::default);
            let verdict = if stats.count >= *min_samples {
                let z = stats.z_score(value, *min_std).abs();
                (z > *z_threshold, z < *clear_z, z)
            } else {
                (false, true, 0.0)
            };
            stats.update(value, *window);
            verdict
        }
    }
}

fn step(
    rule: &Rule,
    device_id: &str,
    rule_state: &mut RuleState,
    ts: EpochMillis,
    value: f64,
    touched: &mut BTreeMap<String, Alert>,
) -> Option<AlertTransition> {
    let (breach, clear, score) = classify(rule, rule_state, value);
    let raise = |since: EpochMillis, peak_value: f64, count: u64| Alert {
        alert_id: Alert::make_id(device_id, &rule.name, since),
        device_id: device_id.to_string(),
        rule: rule.name.to_string(),
        severity: rule.severity,
        state: AlertState::Active,
        acknowledged: false,
        acknowledged_by: None,
        acknowledged_at: None,
        started_at: since,
        cleared_at: None,
        peak_value,
        last_value: value,
        count,
    };
    let phase = std::mem::take(&mut rule_state.phase);
    let (next, transition) = match phase {
        Phase::Normal if breach && rule.min_duration_ms == 0 => {
            let alert = raise(ts, value, 1);
            (
                Phase::Active {
                    alert: Box::new(alert.clone()),
                    peak_score: score,
                },
                Some(AlertTransition::new(TransitionKind::Raised, ts, alert)),
            )
        }
        Phase::Normal if breach => (
            Phase::Pending {
                since: ts,
                peak_value: value,
                peak_score: score,
                count: 1,
            },
            None,
        ),
        Phase::Normal => (Phase::Normal, None),
        Phase::Pending {
            since,
            mut peak_value,
            mut peak_score,
            count,
        } if breach => {
            if score > peak_score {
                peak_value = value;
                peak_score = score;
            }
            if ts - since >= rule.min_duration_ms {
                let alert = raise(since, peak_value, count + 1);
                (
                    Phase::Active {
                        alert: Box::new(alert.clone()),
                        peak_score,
                    },
                    Some(AlertTransition::new(TransitionKind::Raised, ts, alert)),
                )
            } else {
                (
                    Phase::Pending {
                        since,
                        peak_value,
                        peak_score,
                        count: count + 1,
                    },
                    None,
                )
            }
        }
        Phase::Pending { .. } => (Phase::Normal, None),
        Phase::Active {
            mut alert,
            mut peak_score,
        }
        | Phase::Clearing {
            mut alert,
            mut peak_score,
            ..
        } if !clear => {
            alert.last_value = value;
            if breach {
                alert.count += 1;
                if score > peak_score {
                    alert.peak_value = value;
                    peak_score = score;
                }
            }
            (Phase::Active { alert, peak_score }, None)
        }
        Phase::Active { mut alert, .. } | Phase::Clearing { mut alert, .. }
            if rule.clear_duration_ms == 0 =>
        {
            alert.last_value = value;
            alert.state = AlertState::Cleared;
            alert.cleared_at = Some(ts);
            (
                Phase::Normal,
                Some(AlertTransition::new(TransitionKind::Cleared, ts, *alert)),
            )
        }
        Phase::Active {
            mut alert,
            peak_score,
        } => {
            alert.last_value = value;
            (
                Phase::Clearing {
                    since: ts,
                    alert,
                    peak_score,
                },
                None,
            )
        }
        Phase::Clearing {
            since,
            mut alert,
            peak_score,
        } => {
            alert.last_value = value;
            if ts - since >= rule.clear_duration_ms {
                alert.state = AlertState::Cleared;
                alert.cleared_at = Some(ts);
                (
                    Phase::Normal,
                    Some(AlertTransition::new(TransitionKind::Cleared, ts, *alert)),
                )
            } else {
                (
                    Phase::Clearing {
                        since,
                        alert,
                        peak_score,
                    },
                    None,
                )
            }
        }
    };
    match (&next, &transition) {
        (_, Some(transition)) => {
            touched.insert(transition.alert.alert_id.clone(), transition.alert.clone());
        }
        (Phase::Active { alert, .. } | Phase::Clearing { alert, .. }, None) => {
            touched.insert(alert.alert_id.clone(), Alert::clone(alert));
        }
        _ => {}
    }
    rule_state.phase = next;
    transition
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn engine(ts: EpochMillis, temp: f64) -> Reading {
        Reading {
            device_id: "truck-1".into(),
            ts,
            event_id: format!("truck-1@{ts}"),
            engine_temp_c: Some(temp),
            ..Default::default()
        }
    }

    fn one_rule(text: &str) -> RuleSet {
        RuleSet::from_toml(text).unwrap()
    }

    const OVERHEAT: &str = r#"
        [[rule]]
        name = "engine_overheat"
        metric = "engine_temp_c"
        above = 100.0
        clear_below = 95.0
        severity = "critical"
    "#;

    #[test]
    fn default_rules_load() {
        let rules = RuleSet::default_rules();
        let names: Vec<&str> = rules.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "engine_overheat",
                "battery_overheat",
                "low_tire_pressure",
                "cargo_overheat",
                "low_humidity",
                "engine_temp_anomaly"
            ]
        );
    }

    #[test]
    fn bad_rule_files_say_which_rule_and_why() {
        let err = RuleSet::from_toml("[[rule]]\nname = \"x\"\nmetric = \"engine_temp_c\"\nseverity = \"major\"\nabove = 10\nclear_below = 20\n")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rule #1 (x): clear_below 20 must not exceed above 10"
        );
        let err = RuleSet::from_toml(
            "[[rule]]\nname = \"x\"\nmetric = \"warp_factor\"\nseverity = \"major\"\nabove = 1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("warp_factor"), "{err}");
        assert!(matches!(
            RuleSet::from_toml("[[rule]]\nnmae = \"x\"\n"),
            Err(RuleError::Syntax(_))
        ));
        let twice = format!("{OVERHEAT}{OVERHEAT}");
        assert!(RuleSet::from_toml(&twice)
            .unwrap_err()
            .to_string()
            .contains("earlier"));
    }

    #[test]
    fn raises_once_updates_then_clears_with_hysteresis() {
        let rules = one_rule(OVERHEAT);
        let mut state = DeviceRuleStates::default();
        let ev = rules.evaluate(
            "truck-1",
            &mut state,
            &[
                engine(1_000, 90.0),
                engine(2_000, 105.0),
                engine(3_000, 110.0),
            ],
        );
        assert_eq!(ev.transitions.len(), 1);
        assert_eq!(ev.transitions[0].kind, TransitionKind::Raised);
        let alert = &ev.touched_alerts[0];
        assert_eq!(
            (
                alert.count,
                alert.peak_value,
                alert.last_value,
                alert.started_at
            ),
            (2, 110.0, 110.0, 2_000)
        );
        // Inside the hysteresis band: still active.
        let ev = rules.evaluate("truck-1", &mut state, &[engine(4_000, 97.0)]);
        assert!(ev.transitions.is_empty());
        assert_eq!(ev.touched_alerts[0].state, AlertState::Active);
        let ev = rules.evaluate("truck-1", &mut state, &[engine(5_000, 90.0)]);
        assert_eq!(ev.transitions[0].kind, TransitionKind::Cleared);
        assert_eq!(ev.transitions[0].alert.cleared_at, Some(5_000));
        assert_eq!(ev.transitions[0].at, 5_000);
        assert_eq!(
            ev.transitions[0].transition_id,
            "truck-1|engine_overheat|2000|cleared"
        );
    }

    #[test]
    fn minimum_duration_holds_back_short_breaches() {
        let rules = one_rule(&OVERHEAT.replace("severity", "min_duration_s = 5\nseverity"));
        let mut state = DeviceRuleStates::default();
        let ev = rules.evaluate(
            "truck-1",
            &mut state,
            &[engine(0, 105.0), engine(3_000, 106.0), engine(4_000, 90.0)],
        );
        assert!(ev.transitions.is_empty());
        let ev = rules.evaluate(
            "truck-1",
            &mut state,
            &[engine(10_000, 105.0), engine(15_000, 104.0)],
        );
        assert_eq!(ev.transitions.len(), 1);
        assert_eq!(ev.transitions[0].alert.started_at, 10_000);
        assert_eq!(ev.transitions[0].alert.count, 2);
        // Raised by the reading that completed the minimum duration.
        assert_eq!(ev.transitions[0].at, 15_000);
    }

    #[test]
    fn zscore_rule_learns_the_device_baseline() {
        let rules = one_rule(
            "[[rule]]\nname = \"z\"\nmetric = \"engine_temp_c\"\nzscore_above = 4\nclear_zscore_below = 2\nmin_samples = 20\nwindow = 50\nseverity = \"warning\"\n",
        );
        let mut state = DeviceRuleStates::default();
        let normal: Vec<Reading> = (0..40)
            .map(|i| engine(i * 1000, 88.0 + (i % 5) as f64 * 0.5))
            .collect();
        assert!(rules
            .evaluate("truck-1", &mut state, &normal)
            .transitions
            .is_empty());
        let ev = rules.evaluate("truck-1", &mut state, &[engine(41_000, 97.0)]);
        assert_eq!(ev.transitions.len(), 1, "{state:?}");
    }

    /// Issue #12, defect 9: a temperature hovering at the threshold made an alert per pair of
    /// readings; the shipped rules keep one open until 30 s of normal readings.
    #[test]
    fn default_rules_damp_a_value_flapping_at_the_threshold() {
        let rules = RuleSet::default_rules();
        let mut state = DeviceRuleStates::default();
        let flapping: Vec<Reading> = (0..60)
            .map(|i| engine(i * 2_000, if i % 2 == 0 { 101.0 } else { 94.0 }))
            .collect();
        let ev = rules.evaluate("truck-1", &mut state, &flapping);
        let kinds: Vec<(&str, TransitionKind)> = ev
            .transitions
            .iter()
            .map(|t| (t.alert.rule.as_str(), t.kind))
            .collect();
        assert_eq!(kinds, [("engine_overheat", TransitionKind::Raised)]);
        assert_eq!(ev.transitions[0].alert.started_at, 0);
        // Clear since the last 94 °C at 118 s: still open at 146 s, cleared by the reading at
        // 148 s.
        let calm: Vec<Reading> = (60..76).map(|i| engine(i * 2_000, 90.0)).collect();
        let ev = rules.evaluate("truck-1", &mut state, &calm[..14]);
        assert!(ev.transitions.is_empty(), "{:?}", ev.transitions);
        let ev = rules.evaluate("truck-1", &mut state, &calm[14..]);
        assert_eq!(ev.transitions.len(), 1);
        let cleared = &ev.transitions[0].alert;
        assert_eq!(ev.transitions[0].kind, TransitionKind::Cleared);
        assert_eq!(
            (cleared.count, cleared.cleared_at, cleared.peak_value),
            (30, Some(148_000), 101.0)
        );
    }

    #[test]
    fn readings_without_the_metric_leave_a_rule_alone() {
        let rules = one_rule(OVERHEAT);
        let mut state = DeviceRuleStates::default();
        let mut no_engine = engine(1_000, 0.0);
        no_engine.engine_temp_c = None;
        let ev = rules.evaluate("truck-1", &mut state, &[no_engine]);
        assert!(ev.transitions.is_empty() && ev.touched_alerts.is_empty());
        assert_eq!(ev.readings_evaluated, 1);
        assert!(state.rules.is_empty());
    }

    /// Issue #12, defect 6: late readings were skipped by the rules. A normal reading at t, then
    /// twenty hot ones dated t-60 s .. t-41 s: they are evaluated in their place, as in-order
    /// delivery would have.
    #[test]
    fn late_readings_within_the_bound_are_evaluated_in_their_place() {
        let rules = RuleSet::default_rules();
        let t = 1_000_000;
        let normal = engine(t, 90.0);
        let hot: Vec<Reading> = (0..20)
            .map(|i| engine(t - 60_000 + i * 1_000, 125.0))
            .collect();
        let mut state = DeviceRuleStates::default();
        rules.evaluate("truck-1", &mut state, std::slice::from_ref(&normal));
        let late = rules.evaluate("truck-1", &mut state, &hot);
        assert_eq!(late.readings_evaluated, 20);
        assert!(late.too_late.is_empty());
        assert_eq!(late.transitions.len(), 1, "{:?}", late.transitions);
        let raise = &late.transitions[0];
        assert_eq!(raise.kind, TransitionKind::Raised);
        assert_eq!((raise.at, raise.alert.started_at), (t - 60_000, t - 60_000));

        let mut in_order_state = DeviceRuleStates::default();
        let mut all = hot.clone();
        all.push(normal);
        let in_order = rules.evaluate("truck-1", &mut in_order_state, &all);
        assert_eq!(late.touched_alerts, in_order.touched_alerts);
        assert_eq!(late.touched_alerts[0].count, 20);
        assert_eq!(state.rules, in_order_state.rules);
        assert_eq!(state.watermark, in_order_state.watermark);
    }

    /// A state's window is stored as a plain list of `[ts, event id, values]`, oldest first,
    /// and read back equal (stores keep rule states as JSON).
    #[test]
    fn a_window_is_stored_as_a_list_and_read_back_equal() {
        let rules = RuleSet::default_rules();
        let mut state = DeviceRuleStates::default();
        let readings: Vec<Reading> = (0..3).map(|i| engine(i * 1_000, 90.0)).collect();
        rules.evaluate("truck-1", &mut state, &readings);
        let stored = serde_json::to_value(&state).unwrap();
        let listed = &stored["window"]["readings"];
        assert_eq!(listed.as_array().map(Vec::len), Some(3), "{stored}");
        assert_eq!(listed[0][0], 0);
        assert_eq!(listed[0][1], "truck-1@0");
        assert_eq!(listed[2][0], 2_000);
        let read_back: DeviceRuleStates = serde_json::from_value(stored).unwrap();
        assert_eq!(read_back, state);
    }

    /// Behind the bound, a reading is reported, not evaluated; a replay of one seen is neither.
    #[test]
    fn readings_behind_the_bound_are_reported() {
        let rules = RuleSet::default_rules();
        let mut state = DeviceRuleStates::default();
        let readings: Vec<Reading> = (0..100).map(|i| engine(i * 1_000, 90.0)).collect();
        rules.evaluate("truck-1", &mut state, &readings);
        // The window holds the last 60 s: 40 s .. 99 s.
        let window = state.window.as_ref().unwrap();
        assert_eq!(window.readings.peek().map(|r| r.0), Some(40_000));
        let stale = engine(10_500, 130.0);
        let ev = rules.evaluate("truck-1", &mut state, &[stale, readings[39].clone()]);
        assert_eq!(ev.too_late, [(10_500, "truck-1@10500".to_string())]);
        assert_eq!(ev.readings_evaluated, 0);
        assert!(ev.transitions.is_empty());
        let again = rules.evaluate("truck-1", &mut state, &readings[40..]);
        assert!(again.too_late.is_empty() && again.readings_evaluated == 0);
    }

    /// A late reading that splits an alert in two: the clear and the new raise are published,
    /// the old record rewritten and the second alert's record made; a late reading that shows
    /// an alert began earlier retracts its raise and removes its record.
    #[test]
    fn a_late_reading_can_undo_what_was_published() {
        let rules = one_rule(OVERHEAT);
        let mut state = DeviceRuleStates::default();
        let first = rules.evaluate(
            "truck-1",
            &mut state,
            &[
                engine(1_000, 90.0),
                engine(3_000, 105.0),
                engine(4_000, 106.0),
            ],
        );
        assert_eq!(first.transitions.len(), 1);
        let raised_at_3 = first.transitions[0].clone();
        // A hot reading at 2 s: the alert began at 2 s, not 3 s.
        let ev = rules.evaluate("truck-1", &mut state, &[engine(2_000, 104.0)]);
        let kinds: Vec<(TransitionKind, &str)> = ev
            .transitions
            .iter()
            .map(|t| (t.kind, t.transition_id.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    TransitionKind::Retracted,
                    "truck-1|engine_overheat|3000|raised|retracted"
                ),
                (
                    TransitionKind::Raised,
                    "truck-1|engine_overheat|2000|raised"
                ),
            ]
        );
        assert_eq!(ev.transitions[0].alert, raised_at_3.alert);
        assert_eq!(ev.removed_alerts, ["truck-1|engine_overheat|3000"]);
        assert_eq!(ev.touched_alerts.len(), 1);
        assert_eq!(
            (ev.touched_alerts[0].started_at, ev.touched_alerts[0].count),
            (2_000, 3)
        );
    }

    fn arb_readings() -> impl Strategy<Value = Vec<Reading>> {
        proptest::collection::vec(
            (
                0..600i64,
                prop_oneof![80.0..99.0f64, 94.0..101.0f64, 100.5..130.0f64],
            ),
            0..80,
        )
        .prop_map(|steps| {
            steps
                .into_iter()
                .map(|(second, temp)| engine(second * 1000, temp))
                .collect()
        })
    }

    fn rules_with_durations() -> RuleSet {
        one_rule(&format!(
            "{}\n{}",
            OVERHEAT.replace("severity", "min_duration_s = 3\nclear_duration_s = 2\nseverity"),
            "[[rule]]\nname = \"z\"\nmetric = \"engine_temp_c\"\nzscore_above = 3\nclear_zscore_below = 1\nmin_samples = 5\nwindow = 20\nseverity = \"warning\"\n"
        ))
    }

    proptest! {
        /// Evaluating the same readings again changes nothing and emits nothing.
        #[test]
        fn replay_is_a_no_op(readings in arb_readings()) {
            let rules = rules_with_durations();
            let mut state = DeviceRuleStates::default();
            rules.evaluate("truck-1", &mut state, &readings);
            let before = state.clone();
            let again = rules.evaluate("truck-1", &mut state, &readings);
            prop_assert!(again.transitions.is_empty());
            prop_assert!(again.touched_alerts.is_empty());
            prop_assert_eq!(again.readings_evaluated, 0);
            prop_assert_eq!(state, before);
        }

        /// However the readings are split into batches, the transitions and final state are the
        /// same as evaluating them at once.
        #[test]
        fn batching_does_not_change_the_outcome(readings in arb_readings(), cuts in proptest::collection::vec(0usize..80, 0..6)) {
            let rules = rules_with_durations();
            let mut sorted = readings.clone();
            sorted.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            let mut whole_state = DeviceRuleStates::default();
            let whole = rules.evaluate("truck-1", &mut whole_state, &sorted);

            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(sorted.len())).collect();
            cuts.push(0);
            cuts.push(sorted.len());
            cuts.sort_unstable();
            let mut split_state = DeviceRuleStates::default();
            let mut transitions = Vec::new();
            for pair in cuts.windows(2) {
                transitions.extend(rules.evaluate("truck-1", &mut split_state, &sorted[pair[0]..pair[1]]).transitions);
            }
            prop_assert_eq!(transitions, whole.transitions);
            prop_assert_eq!(split_state, whole_state);
        }

        /// Readings delivered late (each at most 50 s behind the newest delivered, in batches
        /// of any size) end as in-order delivery ends: the same rule state, the same alert
        /// records once removals and writes are applied, and the same transitions for a
        /// consumer that applies retractions.
        #[test]
        fn late_delivery_within_the_bound_equals_in_order_delivery(
            readings in arb_readings(),
            delays in proptest::collection::vec(0i64..50_000, 80),
            cuts in proptest::collection::vec(0usize..80, 0..8),
        ) {
            let rules = rules_with_durations();
            let mut sorted = readings.clone();
            sorted.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            // One reading per event id (the generator may make two at one time).
            sorted.dedup_by(|a, b| a.order_key() == b.order_key());
            let mut in_order_state = DeviceRuleStates::default();
            let in_order = rules.evaluate("truck-1", &mut in_order_state, &sorted);
            let mut expected_alerts: BTreeMap<String, Alert> = BTreeMap::new();
            for alert in in_order.touched_alerts {
                expected_alerts.insert(alert.alert_id.clone(), alert);
            }
            let expected: BTreeMap<String, AlertTransition> = in_order
                .transitions
                .into_iter()
                .map(|t| (t.transition_id.clone(), t))
                .collect();

            // Delivered in order of event time plus a delay under the bound.
            let mut delivered: Vec<(i64, Reading)> = sorted
                .iter()
                .zip(&delays)
                .map(|(r, delay)| (r.ts + delay, r.clone()))
                .collect();
            delivered.sort_by_key(|(arrival, _)| *arrival);
            let delivered: Vec<Reading> = delivered.into_iter().map(|(_, r)| r).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(delivered.len())).collect();
            cuts.push(0);
            cuts.push(delivered.len());
            cuts.sort_unstable();
            let mut state = DeviceRuleStates::default();
            let mut alerts: BTreeMap<String, Alert> = BTreeMap::new();
            let mut consumer: BTreeMap<String, AlertTransition> = BTreeMap::new();
            for pair in cuts.windows(2) {
                let ev = rules.evaluate("truck-1", &mut state, &delivered[pair[0]..pair[1]]);
                prop_assert!(ev.too_late.is_empty());
                for id in &ev.removed_alerts {
                    alerts.remove(id);
                }
                for alert in ev.touched_alerts {
                    alerts.insert(alert.alert_id.clone(), alert);
                }
                for t in ev.transitions {
                    match t.kind {
                        TransitionKind::Retracted => {
                            let retracted = t.transition_id.strip_suffix("|retracted").unwrap();
                            prop_assert!(consumer.remove(retracted).is_some());
                        }
                        _ => {
                            consumer.insert(t.transition_id.clone(), t);
                        }
                    }
                }
            }
            prop_assert_eq!(&state.rules, &in_order_state.rules);
            prop_assert_eq!(&state.watermark, &in_order_state.watermark);
            prop_assert_eq!(alerts, expected_alerts);
            prop_assert_eq!(consumer, expected);
        }

        /// Per rule, transitions alternate raise/clear on the same alert; a raise follows at
        /// least the minimum duration of breaching readings and a clear comes on a reading below
        /// the clear threshold.
        #[test]
        fn transitions_alternate_and_respect_thresholds(readings in arb_readings()) {
            let rules = rules_with_durations();
            let mut sorted = readings.clone();
            sorted.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
            sorted.dedup_by(|a, b| a.ts == b.ts);
            let mut state = DeviceRuleStates::default();
            let ev = rules.evaluate("truck-1", &mut state, &sorted);
            let mut open: BTreeMap<String, String> = BTreeMap::new();
            for t in &ev.transitions {
                match t.kind {
                    TransitionKind::Raised => {
                        prop_assert!(open.insert(t.alert.rule.clone(), t.alert.alert_id.clone()).is_none());
                        if t.alert.rule == "engine_overheat" {
                            // The raise comes on the first reading 3 s after the breach began,
                            // and every reading from the start up to it breached.
                            let raised_at = sorted.iter().find(|r| r.ts >= t.alert.started_at + 3_000).map(|r| r.ts);
                            prop_assert!(raised_at.is_some());
                            for r in sorted.iter().filter(|r| r.ts >= t.alert.started_at && Some(r.ts) <= raised_at) {
                                prop_assert!(r.engine_temp_c.unwrap() > 100.0);
                            }
                        }
                    }
                    TransitionKind::Cleared => {
                        prop_assert_eq!(open.remove(&t.alert.rule), Some(t.alert.alert_id.clone()));
                        if t.alert.rule == "engine_overheat" {
                            prop_assert!(t.alert.last_value < 95.0);
                        }
                    }
                    TransitionKind::Retracted => prop_assert!(false, "in order, nothing is retracted"),
                }
            }
        }
    }
}
