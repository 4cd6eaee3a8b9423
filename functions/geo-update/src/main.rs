//! The geo-update Lambda: the telemetry bus (Kinesis or Kafka) -> DynamoDB positions.

use std::sync::Arc;

use geostream_aws::dynamodb::DynamoPositions;
use geostream_aws::lambda;
use geostream_geo_update::GeoUpdate;
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let table = lambda::env("POSITIONS_TABLE", "the DynamoDB table of latest positions")?;
    let clients = lambda::clients().await;
    let dead_letters = lambda::dead_letters(&clients)?;
    let handler = GeoUpdate::new(
        Arc::new(DynamoPositions::new(clients.dynamodb, table)),
        dead_letters,
    );
    let metrics = lambda::metrics(geostream_geo_update::FUNCTION_NAME);
    lambda::run_stream_function(&handler, &metrics).await
}
