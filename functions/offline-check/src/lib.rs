//! The offline-check function: run every minute by an EventBridge rule, it makes
//! `device_offline` for the vehicles no reading has come from for the fleet rules'
//! `offline_after_s` (docs/fleet-events.md). The candidates come from a Scan of the positions
//! table (a vehicle whose newest position arrived before then); each is then checked against
//! its own rule state, which knows when a reading of it was last evaluated, and committed
//! with the same version check and outbox as the anomaly-inspector's batches: a vehicle whose
//! batch commits meanwhile is not silent, and a check that runs twice makes one event.

use std::sync::Arc;

use geostream_anomaly_inspector::AnomalyInspector;
use geostream_shared::ports::{SilentCandidates, StoreError};
use geostream_shared::EpochMillis;
use serde_json::{json, Value};

pub const FUNCTION_NAME: &str = "offline-check";

pub struct OfflineCheck {
    inspector: AnomalyInspector,
    candidates: Arc<dyn SilentCandidates>,
    offline_after_ms: EpochMillis,
}

impl OfflineCheck {
    /// `inspector` with fleet stores ([`AnomalyInspector::with_fleet`]); `offline_after_ms`
    /// from the same rules.
    pub fn new(
        inspector: AnomalyInspector,
        candidates: Arc<dyn SilentCandidates>,
        offline_after_ms: EpochMillis,
    ) -> Self {
        OfflineCheck {
            inspector,
            candidates,
            offline_after_ms,
        }
    }

    /// One check at `now`: what it looked at and how many vehicles went offline.
    pub async fn run(&self, now: EpochMillis) -> Result<Value, StoreError> {
        let candidates = self
            .candidates
            .heard_from_before(now - self.offline_after_ms)
            .await?;
        let offline = self.inspector.check_offline(&candidates, now).await;
        tracing::info!(
            function = FUNCTION_NAME,
            candidates = candidates.len(),
            offline,
            "offline check"
        );
        Ok(json!({ "candidates": candidates.len(), "offline": offline }))
    }
}
