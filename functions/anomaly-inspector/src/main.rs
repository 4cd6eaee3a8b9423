//! The anomaly-inspector Lambda: the telemetry bus (Kinesis or Kafka) -> rules -> DynamoDB
//! alerts + the alerts bus (Kafka with `BUS=kafka` in a build with `--features kafka`), and
//! fleet events against the geofences, trips, stops and minute summaries to DynamoDB.

use geostream_anomaly_inspector::{AnomalyInspector, FUNCTION_NAME, GEOFENCE_REFRESH};
use geostream_aws::compose::Composition;

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    let handler = AnomalyInspector::new(
        ports.rules()?,
        ports.alerts().await?,
        ports.alerts_bus().await?,
        ports.dead_letters()?,
    )
    .with_fleet(ports.geofences()?, ports.fleet_events()?, GEOFENCE_REFRESH)
    .with_history(ports.history()?);
    ports.run_stream_function(handler).await
}
