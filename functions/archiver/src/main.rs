//! The archiver Lambda: the telemetry bus (Kinesis or Kafka) -> Timestream or S3.

use geostream_archiver::Archiver;
use geostream_aws::lambda;
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let clients = lambda::clients().await;
    let archive = lambda::archive(&clients)?;
    let dead_letters = lambda::dead_letters(&clients)?;
    let handler = Archiver::new(archive, dead_letters);
    let metrics = lambda::metrics(geostream_archiver::FUNCTION_NAME);
    lambda::run_stream_function(&handler, &metrics).await
}
