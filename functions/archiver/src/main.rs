//! The archiver Lambda: Kinesis -> Timestream or S3.

use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_archiver::Archiver;
use geostream_aws::lambda;
use geostream_shared::stream::StreamFunction;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let clients = lambda::clients().await;
    let archive = lambda::archive(&clients)?;
    let dead_letters = lambda::dead_letters(&clients)?;
    let handler = Archiver::new(archive, dead_letters);
    let handler = &handler;
    let metrics = &lambda::metrics(geostream_archiver::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<KinesisEvent>| async move {
            Ok::<_, Error>(handler.handle(event.payload, metrics).await)
        },
    ))
    .await
}
