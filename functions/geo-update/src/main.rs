//! The geo-update Lambda: the telemetry bus (Kinesis or Kafka) -> DynamoDB positions.

use geostream_aws::compose::Composition;
use geostream_geo_update::{GeoUpdate, FUNCTION_NAME};

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    let handler = GeoUpdate::new(ports.positions().await?, ports.dead_letters()?);
    ports.run_stream_function(handler).await
}
