//! The offline-check Lambda: an EventBridge schedule -> a Scan of the positions table ->
//! `device_offline` in the rule state, the fleet-event table and on the alerts bus.

use geostream_anomaly_inspector::{AnomalyInspector, GEOFENCE_REFRESH};
use geostream_aws::compose::Composition;
use geostream_offline_check::{OfflineCheck, FUNCTION_NAME};

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    let rules = ports.rules()?;
    let offline_after_ms = rules.fleet.offline_after_ms;
    let inspector = AnomalyInspector::new(
        rules,
        ports.alerts().await?,
        ports.alerts_bus().await?,
        ports.dead_letters()?,
    )
    .with_fleet(ports.geofences()?, ports.fleet_events()?, GEOFENCE_REFRESH);
    let check = OfflineCheck::new(inspector, ports.silent_candidates()?, offline_after_ms);
    geostream_lambda::run_scheduled_function(|| async {
        check
            .run(geostream_shared::now_millis())
            .await
            .map_err(|error| error.to_string())
    })
    .await
}
