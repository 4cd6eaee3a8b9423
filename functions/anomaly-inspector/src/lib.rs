//! The anomaly-inspector function: evaluates every device's readings against the rules, keeps
//! per (device, rule) state in the alert store, and publishes raise/clear transitions on the
//! alerts bus.
//!
//! Per device and batch: load the state, evaluate, publish the transitions, then commit state
//! and alert records with a version check. Publishing before the commit makes a crash between
//! the two redeliver (at least once, deduplicated by `transition_id`) rather than lose a
//! transition; the watermark in the committed state makes a replayed batch a no-op.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use geostream_shared::metrics::{Measurements, MetricName};
use geostream_shared::model::{Reading, TransitionKind};
use geostream_shared::ports::{
    AlertStore, BusRecord, DeadLetterSink, ErrorKind, EventBus, StoreError,
};
use geostream_shared::rules::RuleSet;
use geostream_shared::stream::{
    decode_batch, group_by_device, BatchOutcome, StreamBatch, StreamFunction, DEVICE_CONCURRENCY,
};

pub const FUNCTION_NAME: &str = "anomaly-inspector";
/// Commits that lose a version race are retried this many times before the records fail.
const COMMIT_ATTEMPTS: usize = 5;

/// The alert transitions a device's committed evaluation made.
#[derive(Debug, Default)]
struct Transitions {
    raised: usize,
    cleared: usize,
}

pub struct AnomalyInspector {
    rules: Arc<RuleSet>,
    alerts: Arc<dyn AlertStore>,
    alert_bus: Arc<dyn EventBus>,
    dead_letters: Arc<dyn DeadLetterSink>,
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
        }
    }

    async fn inspect_device(
        &self,
        device_id: &str,
        readings: &[Reading],
    ) -> Result<Transitions, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut state = self.alerts.load_rule_states(device_id).await?;
            let expected_version = state.version;
            let evaluation = self.rules.evaluate(device_id, &mut state, readings);
            if evaluation.readings_evaluated == 0 {
                return Ok(Transitions::default());
            }
            if !evaluation.transitions.is_empty() {
                let records = evaluation
                    .transitions
                    .iter()
                    .map(|t| BusRecord {
                        partition_key: device_id.to_string(),
                        data: serde_json::to_vec(t).unwrap_or_default(),
                    })
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
                for t in &evaluation.transitions {
                    tracing::info!(function = FUNCTION_NAME, device_id, alert_id = %t.alert.alert_id, kind = ?t.kind, rule = %t.alert.rule, "alert transition");
                }
            }
            match self
                .alerts
                .commit(
                    device_id,
                    expected_version,
                    &state,
                    &evaluation.touched_alerts,
                )
                .await
            {
                Ok(()) => {
                    let raised = evaluation
                        .transitions
                        .iter()
                        .filter(|t| t.kind == TransitionKind::Raised)
                        .count();
                    return Ok(Transitions {
                        raised,
                        cleared: evaluation.transitions.len() - raised,
                    });
                }
                Err(error) if error.kind == ErrorKind::Conflict && attempt < COMMIT_ATTEMPTS => {
                    continue
                }
                Err(error) => return Err(error),
            }
        }
    }
}

#[async_trait]
impl StreamFunction for AnomalyInspector {
    fn name(&self) -> &'static str {
        FUNCTION_NAME
    }

    async fn process(&self, batch: StreamBatch) -> BatchOutcome {
        let decoded = decode_batch(FUNCTION_NAME, batch, self.dead_letters.as_ref()).await;
        let mut failed = decoded.retry;
        let jobs = group_by_device(decoded.records).into_iter().map(|group| {
            let readings: Vec<Reading> = group
                .envelopes
                .into_iter()
                .flat_map(|envelope| envelope.readings)
                .collect();
            (group.device_id, group.record_ids, readings)
        });
        let mut results = stream::iter(jobs.map(|(device, record_ids, readings)| async move {
            let result = self.inspect_device(&device, &readings).await;
            (device, record_ids, result)
        }))
        .buffer_unordered(DEVICE_CONCURRENCY);
        let mut committed = Transitions::default();
        while let Some((device, record_ids, result)) = results.next().await {
            match result {
                Ok(transitions) => {
                    committed.raised += transitions.raised;
                    committed.cleared += transitions.cleared;
                }
                Err(error) => {
                    tracing::warn!(function = FUNCTION_NAME, device_id = %device, %error, "inspection failed; records will be retried");
                    failed.extend(record_ids);
                }
            }
        }
        let mut measurements = Measurements::default();
        measurements.count(MetricName::AlertsRaised, committed.raised);
        measurements.count(MetricName::AlertsCleared, committed.cleared);
        measurements.count(MetricName::DeadLetters, decoded.dead_lettered);
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
                    data: e.encode(),
                    arrived_at: None,
                })
                .collect(),
        }
    }

    fn transitions(bus: &MemoryStream) -> Vec<AlertTransition> {
        (0..bus.shard_count())
            .flat_map(|s| bus.read(s, 1, 100).records)
            .map(|r| serde_json::from_slice(&r.data).unwrap())
            .collect()
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
        let first = inspector.process(hot.clone()).await;
        assert!(first.failed.is_empty());
        assert_eq!(first.measurements.get(MetricName::AlertsRaised), Some(1.0));
        let replay = inspector.process(hot).await;
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

        let cool = batch(vec![(4_000, 90.0)], 2);
        let cleared = inspector.process(cool.clone()).await;
        assert_eq!(
            cleared.measurements.get(MetricName::AlertsCleared),
            Some(1.0)
        );
        inspector.process(cool).await;
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
        assert_eq!(all[0].cleared_at, Some(4_000));
    }
}
