//! The anomaly-inspector function: evaluates every device's readings against the rules, keeps
//! per (device, rule) state in the alert store, and publishes raise/clear transitions on the
//! alerts bus.
//!
//! Per device and batch: load the state, evaluate, commit the state, the alerts it touched and
//! its transitions (an outbox in the state) with a version check, then publish the outbox and
//! empty it. A transition is published only once the state that made it is committed; a crash
//! or a bus failure after the commit leaves it in the outbox, published before anything newer
//! on the next attempt (at least once, deduplicated by `transition_id`). The watermark in the
//! committed state makes a replayed batch a no-op.
//!
//! With geofence and event stores ([`AnomalyInspector::with_fleet`]) it also makes fleet
//! events (geofence enters and exits, overspeed, online again) from the same readings, kept
//! in the same state and committed in the same write: no store request per reading more. The
//! events go out through an outbox as transitions do: recorded in the event store, then
//! published on the alerts bus. [`AnomalyInspector::check_offline`] makes `device_offline`.
//!
//! With a history store ([`AnomalyInspector::with_history`]) it keeps each vehicle's trips,
//! stops and minute summaries in the same state and writes them as they complete
//! (`geostream_shared::history`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use geostream_shared::fleet::{FleetEvent, FleetTransition, GeofenceCache, GeofenceIndex};
use geostream_shared::metrics::{Measurements, MetricName};
use geostream_shared::model::{AlertTransition, Reading, TransitionKind};
use geostream_shared::ports::{
    AlertChanges, AlertStore, BusRecord, DeadLetterSink, ErrorKind, EventBus, FleetEventStore,
    GeofenceStore, HistoryStore, StoreError, MAX_ALERTS_PER_COMMIT,
};
use geostream_shared::rules::{DeviceRuleStates, Evaluation, RuleSet};
use geostream_shared::stream::{
    dead_letter_refused, decode_batch, group_by_device, BatchOutcome, DeviceRecords, RecordId,
    Retry, StreamBatch, StreamFunction, DEVICE_CONCURRENCY,
};

pub const FUNCTION_NAME: &str = "anomaly-inspector";
/// How often a Lambda execution environment looks whether the geofences changed (one read of
/// the store's version): a geofence written takes effect within this and one batch.
pub const GEOFENCE_REFRESH: Duration = Duration::from_secs(30);
/// Commits that lose a version race are retried this many times before the records fail.
const COMMIT_ATTEMPTS: usize = 5;

/// What a device's committed evaluations made.
#[derive(Debug, Default)]
struct Inspected {
    raised: usize,
    cleared: usize,
    retracted: usize,
    /// Readings behind the lateness bound that were news (not replays).
    too_late: usize,
}

impl Inspected {
    fn add(&mut self, other: &Inspected) {
        self.raised += other.raised;
        self.cleared += other.cleared;
        self.retracted += other.retracted;
        self.too_late += other.too_late;
    }

    fn count(&mut self, transitions: &[AlertTransition]) {
        for transition in transitions {
            match transition.kind {
                TransitionKind::Raised => self.raised += 1,
                TransitionKind::Cleared => self.cleared += 1,
                TransitionKind::Retracted => self.retracted += 1,
            }
        }
    }
}

pub struct AnomalyInspector {
    rules: Arc<RuleSet>,
    alerts: Arc<dyn AlertStore>,
    alert_bus: Arc<dyn EventBus>,
    dead_letters: Arc<dyn DeadLetterSink>,
    fleet: Option<Fleet>,
    history: Option<Arc<dyn HistoryStore>>,
}

/// Where fleet events come from and go.
struct Fleet {
    geofences: GeofenceCache,
    events: Arc<dyn FleetEventStore>,
}

impl AnomalyInspector {
    pub fn new(
        rules: Arc<RuleSet>,
        alerts: Arc<dyn AlertStore>,
        alert_bus: Arc<dyn EventBus>,
        dead_letters: Arc<dyn DeadLetterSink>,
    ) -> Self {
        AnomalyInspector {
            rules,
            alerts,
            alert_bus,
            dead_letters,
            fleet: None,
            history: None,
        }
    }

    /// Keeps each vehicle's trips, stops and minute summaries too (state in the same rule-state
    /// item, so no store read more), writing them to `history` as they complete.
    pub fn with_history(mut self, history: Arc<dyn HistoryStore>) -> Self {
        self.history = Some(history);
        self
    }

    /// Makes fleet events too, against the geofences of `geofences` (looked at again every
    /// `refresh`), recording them in `events`.
    pub fn with_fleet(
        mut self,
        geofences: Arc<dyn GeofenceStore>,
        events: Arc<dyn FleetEventStore>,
        refresh: Duration,
    ) -> Self {
        self.fleet = Some(Fleet {
            geofences: GeofenceCache::new(geofences, self.rules.fleet.clone(), refresh),
            events,
        });
        self
    }

    /// `device_offline` for each of `device_ids` last heard from longer ago than the fleet
    /// rules' `offline_after_s` at `now` (once; a state that moved on in the meantime is left
    /// to the next check), and the fleet events of any of them committed but not yet out;
    /// answers how many went offline. A device that fails is logged and left to the next
    /// check. Without fleet stores, nothing.
    pub async fn check_offline(
        &self,
        device_ids: &[String],
        now: geostream_shared::EpochMillis,
    ) -> usize {
        if self.fleet.is_none() {
            return 0;
        }
        let mut offline = 0;
        for device_id in device_ids {
            match self.check_device_offline(device_id, now).await {
                Ok(went) => offline += usize::from(went),
                Err(error) => {
                    tracing::warn!(function = FUNCTION_NAME, device_id, %error, "the offline check failed for this device; the next one tries again");
                }
            }
        }
        offline
    }

    async fn check_device_offline(
        &self,
        device_id: &str,
        now: geostream_shared::EpochMillis,
    ) -> Result<bool, StoreError> {
        let mut state = self.alerts.load_rule_states(device_id).await?;
        let version = state.version;
        let Some(event) = self
            .rules
            .fleet
            .check_offline(device_id, &mut state.fleet, now)
        else {
            // Events committed earlier whose publishing failed go out now.
            self.publish_outbox(device_id, version, state).await?;
            return Ok(false);
        };
        state.fleet_outbox.push(event);
        match self
            .alerts
            .commit_changes(device_id, version, &state, AlertChanges::NONE)
            .await
        {
            Ok(()) => {}
            // A batch of the device's committed meanwhile: it is not silent.
            Err(error) if error.kind == ErrorKind::Conflict => return Ok(false),
            Err(error) => return Err(error),
        }
        self.publish_outbox(device_id, version + 1, state).await?;
        Ok(true)
    }

    /// Evaluates the longest prefix of `readings` (in event-time order) whose touched alerts
    /// fit one commit; answers the evaluation, the state after it and the readings it took.
    fn evaluate_fitting(
        &self,
        device_id: &str,
        state: &DeviceRuleStates,
        readings: &[&Reading],
    ) -> Result<(Evaluation, DeviceRuleStates, usize), StoreError> {
        let mut take = readings.len();
        loop {
            let mut next = state.clone();
            let evaluation = self.rules.evaluate(device_id, &mut next, &readings[..take]);
            if evaluation.touched_alerts.len() + evaluation.removed_alerts.len()
                <= MAX_ALERTS_PER_COMMIT
            {
                return Ok((evaluation, next, take));
            }
            if take == 1 {
                return Err(StoreError::permanent(
                    "evaluate",
                    format!(
                        "one reading of {device_id} touches {} alerts; a commit takes {MAX_ALERTS_PER_COMMIT}",
                        evaluation.touched_alerts.len()
                    ),
                ));
            }
            take /= 2;
        }
    }

    async fn inspect_device(
        &self,
        group: &DeviceRecords,
        geofences: Option<&GeofenceIndex>,
    ) -> Result<Inspected, StoreError> {
        let device_id = group.device_id.as_str();
        // Each reading with the record that carried it; a client's retry sends one again in a
        // later record, and the newest of those counts (`carried_by`).
        let mut carried: Vec<(&Reading, &RecordId)> = group
            .record_ids
            .iter()
            .zip(&group.envelopes)
            .flat_map(|(id, envelope)| envelope.readings.iter().map(move |r| (r, id)))
            .collect();
        carried.sort_by(|a, b| (a.0.order_key(), a.1).cmp(&(b.0.order_key(), b.1)));
        let newest_record = group.record_ids.iter().max();
        // Looked up only for readings behind the lateness bound, which are rare: no map is
        // built for every batch.
        let carried_by = |event_id: &str| {
            carried
                .iter()
                .filter(|(reading, _)| reading.event_id == event_id)
                .map(|(_, id)| *id)
                .max()
        };
        let readings: Vec<&Reading> = carried.iter().map(|(r, _)| *r).collect();
        let mut made = Inspected::default();
        let mut start = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.alerts.load_rule_states(device_id).await?;
            let expected_version = loaded.version;
            let (evaluation, mut state, taken) =
                self.evaluate_fitting(device_id, &loaded, &readings[start..])?;
            let fleet_events: Vec<FleetEvent> = match geofences {
                Some(index) => self.rules.fleet.evaluate(
                    index,
                    device_id,
                    &mut state.fleet,
                    &readings[start..start + taken],
                    geostream_shared::now_millis(),
                ),
                None => Vec::new(),
            };
            let fleet_moved = state.fleet != loaded.fleet;
            let history = match &self.history {
                Some(store) => {
                    let update = self.rules.trips.advance(
                        Arc::make_mut(&mut state.history),
                        &readings[start..start + taken],
                    );
                    Some((store, update))
                }
                None => None,
            };
            let history_moved = history
                .as_ref()
                .is_some_and(|(_, update)| update.skipped < taken);
            let evaluated_through = loaded.evaluated_through.as_deref().map(RecordId::parse);
            let too_late: Vec<&(i64, String)> = evaluation
                .too_late
                .iter()
                .filter(|(_, event_id)| carried_by(event_id) > evaluated_through.as_ref())
                .collect();
            if !too_late.is_empty() {
                tracing::warn!(
                    function = FUNCTION_NAME,
                    device_id,
                    readings = too_late.len(),
                    oldest_ts = too_late[0].0,
                    lateness_ms = self.rules.lateness_ms,
                    "readings behind the lateness bound: archived, not evaluated by the rules"
                );
            }
            let too_late = too_late.len();
            if newest_record > evaluated_through.as_ref() {
                state.evaluated_through = newest_record.map(|id| id.to_string().into());
            }
            if evaluation.readings_evaluated == 0 && too_late == 0 && !fleet_moved && !history_moved
            {
                // Nothing new; what an earlier attempt committed may still wait to go out.
                self.publish_outbox(device_id, expected_version, state)
                    .await?;
                return Ok(made);
            }
            // Complete history items go to their store before the state that made them is
            // committed, keyed by what they are: a retry (after a conflict or a crash) makes and
            // writes the same items again.
            if let Some((store, update)) = &history {
                if !update.items.is_empty() {
                    store.write(device_id, &update.items).await?;
                }
            }
            state.outbox.extend(evaluation.transitions.iter().cloned());
            state.fleet_outbox.extend(fleet_events);
            match self
                .alerts
                .commit_changes(
                    device_id,
                    expected_version,
                    &state,
                    AlertChanges {
                        touched: &evaluation.touched_alerts,
                        removed: &evaluation.removed_alerts,
                    },
                )
                .await
            {
                Ok(()) => {}
                Err(error) if error.kind == ErrorKind::Conflict && attempt < COMMIT_ATTEMPTS => {
                    continue
                }
                Err(error) => return Err(error),
            }
            made.count(&evaluation.transitions);
            made.too_late += too_late;
            self.publish_outbox(device_id, expected_version + 1, state)
                .await?;
            start += taken;
            attempt = 0;
            if start >= readings.len() {
                return Ok(made);
            }
        }
    }

    /// Publishes the committed outbox, in order, then empties it (a version-checked write of
    /// the state alone). An empty that fails is no loss: the next evaluation publishes the
    /// outbox again, and consumers deduplicate on `transition_id`. Fleet events are recorded
    /// in the event store (idempotent by `event_id`) before they are published.
    async fn publish_outbox(
        &self,
        device_id: &str,
        version: u64,
        mut state: DeviceRuleStates,
    ) -> Result<(), StoreError> {
        if state.outbox.is_empty() && state.fleet_outbox.is_empty() {
            return Ok(());
        }
        if !state.fleet_outbox.is_empty() {
            if let Some(fleet) = &self.fleet {
                fleet.events.record(&state.fleet_outbox).await?;
            }
        }
        let record = |data: Vec<u8>| BusRecord {
            partition_key: device_id.to_string(),
            data,
            decoded: None,
        };
        let records =
            state
                .outbox
                .iter()
                .map(|t| record(serde_json::to_vec(t).unwrap_or_default()))
                .chain(state.fleet_outbox.iter().map(|e| {
                    record(serde_json::to_vec(&FleetTransition::from(e)).unwrap_or_default())
                }))
                .collect();
        if let Some(Err(error)) = self
            .alert_bus
            .publish(records)
            .await
            .into_iter()
            .find(Result::is_err)
        {
            return Err(error);
        }
        for t in &state.outbox {
            tracing::info!(function = FUNCTION_NAME, device_id, alert_id = %t.alert.alert_id, kind = ?t.kind, rule = %t.alert.rule, "alert transition");
        }
        for event in &state.fleet_outbox {
            tracing::debug!(function = FUNCTION_NAME, device_id, event_id = %event.event_id, "fleet event");
        }
        let published: Vec<AlertTransition> = std::mem::take(&mut state.outbox);
        state.fleet_outbox.clear();
        if let Err(error) = self
            .alerts
            .commit_changes(device_id, version, &state, AlertChanges::NONE)
            .await
        {
            tracing::warn!(function = FUNCTION_NAME, device_id, %error, transitions = published.len(), "published transitions stay in the outbox; they will be published again");
        }
        Ok(())
    }
}

#[async_trait]
impl StreamFunction for AnomalyInspector {
    fn name(&self) -> &'static str {
        FUNCTION_NAME
    }

    async fn process(&self, batch: &StreamBatch) -> BatchOutcome {
        let decoded = decode_batch(FUNCTION_NAME, batch, self.dead_letters.as_ref()).await;
        let mut failed = decoded.retry;
        let mut dead_lettered = decoded.dead_lettered;
        let groups = group_by_device(decoded.records);
        // The geofences once per batch, not per device; a failure to have them fails every
        // device's records as a store failure does.
        let geofences = match &self.fleet {
            Some(fleet) => fleet.geofences.index().await.map(Some),
            None => Ok(None),
        };
        let geofences = &geofences;
        let mut results = stream::iter(groups.into_iter().map(|group| async move {
            let result = match geofences {
                Ok(index) => self.inspect_device(&group, index.as_deref()).await,
                Err(error) => Err(error.clone()),
            };
            (group, result)
        }))
        .buffer_unordered(DEVICE_CONCURRENCY);
        let mut committed = Inspected::default();
        while let Some((group, result)) = results.next().await {
            match result {
                Ok(inspected) => committed.add(&inspected),
                // Retrying cannot help: dead letters now, not a stalled shard.
                Err(error) if error.kind == ErrorKind::Permanent => {
                    dead_lettered += dead_letter_refused(
                        FUNCTION_NAME,
                        &group.record_ids,
                        &group.envelopes,
                        &error,
                        self.dead_letters.as_ref(),
                        &mut failed,
                    )
                    .await;
                }
                Err(error) => {
                    tracing::warn!(function = FUNCTION_NAME, device_id = %group.device_id, %error, "inspection failed; records will be retried");
                    failed.extend(Retry::all(group.record_ids, &error));
                }
            }
        }
        let mut measurements = Measurements::default();
        measurements.count(MetricName::AlertsRaised, committed.raised);
        measurements.count(MetricName::AlertsCleared, committed.cleared);
        measurements.count(MetricName::AlertsRetracted, committed.retracted);
        measurements.count(MetricName::ReadingsTooLate, committed.too_late);
        measurements.count(MetricName::DeadLetters, dead_lettered);
        BatchOutcome {
            failed,
            measurements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geostream_shared::envelope::{envelopes_by_device, Envelope};
    use geostream_shared::memory::{MemoryAlertStore, MemoryDeadLetters, MemoryStream};
    use geostream_shared::model::{AlertState, AlertTransition, TransitionKind};
    use geostream_shared::ports::AlertFilter;
    use geostream_shared::rules::DeviceRuleStates;
    use geostream_shared::stream::{RecordId, StreamRecord};

    fn batch(readings: Vec<(i64, f64)>, first_id: u64) -> StreamBatch {
        let readings = readings
            .into_iter()
            .map(|(ts, temp)| Reading {
                device_id: "truck-1".into(),
                ts,
                event_id: format!("truck-1@{ts}"),
                engine_temp_c: Some(temp),
                ..Default::default()
            })
            .collect();
        let envelopes: Vec<Envelope> = envelopes_by_device(readings, 0);
        StreamBatch {
            records: envelopes
                .into_iter()
                .enumerate()
                .map(|(n, e)| StreamRecord {
                    id: RecordId::kinesis((first_id + n as u64).to_string()),
                    partition_key: e.device_id.clone(),
                    data: e.encode().into(),
                    arrived_at: None,
                    decoded: None,
                })
                .collect(),
        }
    }

    fn transitions(bus: &MemoryStream) -> Vec<AlertTransition> {
        (0..bus.shard_count())
            .flat_map(|s| bus.read(s, 1, 10_000).records)
            .map(|r| serde_json::from_slice(&r.data).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_reading_behind_the_bound_is_counted_too_late_per_record_that_brings_it_anew() {
        let inspector = AnomalyInspector::new(
            Arc::new(RuleSet::default_rules()),
            Arc::new(MemoryAlertStore::new()),
            Arc::new(MemoryStream::new("alerts", 1, 100)),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let too_late =
            |outcome: BatchOutcome| outcome.measurements.get(MetricName::ReadingsTooLate);
        let on_time = batch((0..5).map(|i| (100_000 + i * 20_000, 90.0)).collect(), 1);
        assert_eq!(too_late(inspector.process(&on_time).await), Some(0.0));
        // At 1 s, far behind the 60 s bound from the newest (180 s), in a new record.
        let late = batch(vec![(1_000, 90.0)], 2);
        assert_eq!(too_late(inspector.process(&late).await), Some(1.0));
        // The same record delivered again: a replay, not counted again.
        assert_eq!(too_late(inspector.process(&late).await), Some(0.0));
        // The device sending it again, in a newer record: counted.
        let sent_again = batch(vec![(1_000, 90.0)], 3);
        assert_eq!(too_late(inspector.process(&sent_again).await), Some(1.0));
    }

    #[tokio::test]
    async fn raises_once_clears_once_and_replays_change_nothing() {
        let store = Arc::new(MemoryAlertStore::new());
        let bus = Arc::new(MemoryStream::new("alerts", 1, 100));
        let inspector = AnomalyInspector::new(
            Arc::new(RuleSet::default_rules()),
            store.clone(),
            bus.clone(),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let hot = batch(vec![(1_000, 90.0), (2_000, 104.0), (3_000, 107.0)], 1);
        let first = inspector.process(&hot).await;
        assert!(first.failed.is_empty());
        assert_eq!(first.measurements.get(MetricName::AlertsRaised), Some(1.0));
        let replay = inspector.process(&hot).await;
        assert!(replay.failed.is_empty());
        assert_eq!(replay.measurements.get(MetricName::AlertsRaised), Some(0.0));
        let active = store
            .list_alerts(&AlertFilter {
                state: Some(AlertState::Active),
                device_id: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(
            (
                active[0].rule.as_str(),
                active[0].count,
                active[0].peak_value
            ),
            ("engine_overheat", 2, 107.0)
        );
        assert_eq!(transitions(&bus).len(), 1);

        // Cleared once normal for the rules' 30 s.
        let cool = batch(vec![(4_000, 90.0), (34_000, 90.0)], 2);
        let cleared = inspector.process(&cool).await;
        assert_eq!(
            cleared.measurements.get(MetricName::AlertsCleared),
            Some(1.0)
        );
        inspector.process(&cool).await;
        let kinds: Vec<TransitionKind> = transitions(&bus).into_iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TransitionKind::Raised, TransitionKind::Cleared]);
        let all = store
            .list_alerts(&AlertFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, AlertState::Cleared);
        assert_eq!(all[0].cleared_at, Some(34_000));
    }

    /// A bus that refuses every publish while `down` is set.
    struct SwitchedBus {
        inner: Arc<MemoryStream>,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl EventBus for SwitchedBus {
        async fn publish(
            &self,
            records: Vec<BusRecord>,
        ) -> Vec<Result<geostream_shared::ports::Published, StoreError>> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return records
                    .iter()
                    .map(|_| Err(StoreError::transient("PutRecords", "unavailable")))
                    .collect();
            }
            self.inner.publish(records).await
        }
    }

    /// An alert store whose commits fail for the moment.
    struct CommitsFail(MemoryAlertStore);

    #[async_trait]
    impl AlertStore for CommitsFail {
        async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError> {
            self.0.load_rule_states(device_id).await
        }
        async fn commit_changes(
            &self,
            _: &str,
            _: u64,
            _: &DeviceRuleStates,
            _: AlertChanges<'_>,
        ) -> Result<(), StoreError> {
            Err(StoreError::transient("TransactWriteItems", "throttled"))
        }
        async fn list_alerts(
            &self,
            filter: &AlertFilter,
        ) -> Result<Vec<geostream_shared::model::Alert>, StoreError> {
            self.0.list_alerts(filter).await
        }
        async fn get_alert(
            &self,
            id: &str,
        ) -> Result<Option<geostream_shared::model::Alert>, StoreError> {
            self.0.get_alert(id).await
        }
        async fn acknowledge(
            &self,
            id: &str,
            by: &str,
            at: i64,
        ) -> Result<Option<geostream_shared::model::Alert>, StoreError> {
            self.0.acknowledge(id, by, at).await
        }
    }

    #[tokio::test]
    async fn nothing_is_published_while_the_state_that_made_it_is_not_committed() {
        let bus = Arc::new(MemoryStream::new("alerts", 1, 100));
        let inspector = AnomalyInspector::new(
            Arc::new(RuleSet::default_rules()),
            Arc::new(CommitsFail(MemoryAlertStore::new())),
            bus.clone(),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let outcome = inspector.process(&batch(vec![(1_000, 104.0)], 1)).await;
        assert_eq!(outcome.failed.len(), 1, "retried");
        assert!(
            transitions(&bus).is_empty(),
            "no raise without its stored alert"
        );
    }

    #[tokio::test]
    async fn a_transition_committed_while_the_bus_is_down_is_published_once_it_is_back() {
        let store = Arc::new(MemoryAlertStore::new());
        let bus = Arc::new(SwitchedBus {
            inner: Arc::new(MemoryStream::new("alerts", 1, 100)),
            down: true.into(),
        });
        let inspector = AnomalyInspector::new(
            Arc::new(RuleSet::default_rules()),
            store.clone(),
            bus.clone(),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        let hot = batch(vec![(1_000, 104.0)], 1);
        assert_eq!(inspector.process(&hot).await.failed.len(), 1);
        assert_eq!(
            store
                .load_rule_states("truck-1")
                .await
                .unwrap()
                .outbox
                .len(),
            1
        );
        bus.down.store(false, std::sync::atomic::Ordering::SeqCst);
        // The retry evaluates nothing new, and publishes what the first attempt committed.
        assert!(inspector.process(&hot).await.failed.is_empty());
        inspector.process(&hot).await;
        let published = transitions(&bus.inner);
        assert_eq!(published.len(), 1, "{published:?}");
        assert_eq!(published[0].kind, TransitionKind::Raised);
        assert!(store
            .load_rule_states("truck-1")
            .await
            .unwrap()
            .outbox
            .is_empty());
    }

    #[tokio::test]
    async fn a_batch_touching_more_alerts_than_a_commit_takes_is_committed_in_steps() {
        let store = Arc::new(MemoryAlertStore::new());
        let bus = Arc::new(MemoryStream::new("alerts", 1, 1_000));
        let inspector = AnomalyInspector::new(
            Arc::new(RuleSet::default_rules()),
            store.clone(),
            bus.clone(),
            Arc::new(MemoryDeadLetters::new(1)),
        );
        // 150 overheats, each followed by 30 s of cool readings: 150 alerts raised and cleared.
        let readings = (0..150)
            .flat_map(|n| {
                let start = 1_000 + n * 40_000;
                [
                    (start, 101.0),
                    (start + 1_000, 94.0),
                    (start + 31_000, 94.0),
                ]
            })
            .collect();
        let outcome = inspector.process(&batch(readings, 1)).await;
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        assert_eq!(
            outcome.measurements.get(MetricName::AlertsRaised),
            Some(150.0)
        );
        let all = store
            .list_alerts(&AlertFilter {
                limit: 1_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 150);
        assert!(all.iter().all(|a| a.state == AlertState::Cleared));
        let kinds: Vec<TransitionKind> = transitions(&bus).into_iter().map(|t| t.kind).collect();
        assert_eq!(kinds.len(), 300);
        assert!(kinds
            .chunks(2)
            .all(|pair| pair == [TransitionKind::Raised, TransitionKind::Cleared]));
    }
}
