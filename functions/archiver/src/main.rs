//! The archiver Lambda: the telemetry bus (Kinesis or Kafka) -> Timestream or S3.

use geostream_archiver::{Archiver, FUNCTION_NAME};
use geostream_aws::compose::Composition;

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    let handler = Archiver::new(ports.archive().await?, ports.dead_letters()?);
    ports.run_stream_function(handler).await
}
