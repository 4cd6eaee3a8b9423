//! The ingest Lambda: API Gateway HTTP API (payload v2) -> the telemetry bus (Kinesis, or Kafka
//! with `BUS=kafka` in a build with `--features kafka`).

use geostream_aws::compose::Composition;
use geostream_ingest::{Ingest, TrackerAuth, FUNCTION_NAME};

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    let access = ports.access()?;
    let trackers = TrackerAuth::new(ports.device_secrets()?, access.require_token);
    let ingest = Ingest::new(ports.telemetry_bus().await?, ports.metric_names()?)
        .with_access(access)
        .with_tracker_auth(trackers)
        .with_token_verifier(ports.token_verifier()?)
        .with_device_limits(ports.device_limits()?);
    let metrics = ports.metrics();
    geostream_lambda::run_http_function(|request| ingest.handle(request, &metrics)).await
}
