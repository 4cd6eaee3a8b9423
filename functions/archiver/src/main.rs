//! The archiver Lambda: Kinesis -> Timestream.

use std::sync::Arc;

use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_archiver::Archiver;
use geostream_aws::lambda;
use geostream_aws::timestream::TimestreamArchive;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let database = lambda::env(
        "TIMESTREAM_DATABASE",
        "the Timestream database of the archive",
    )?;
    let table = lambda::env("TIMESTREAM_TABLE", "the Timestream table of the archive")?;
    let clients = lambda::clients().await;
    let dead_letters = lambda::dead_letters(&clients)?;
    let archive = TimestreamArchive::new(
        clients.timestream_write,
        clients.timestream_query,
        clients.timestream_discovery,
        database,
        table,
    );
    let handler = Archiver::new(Arc::new(archive), dead_letters);
    let handler = &handler;
    run(service_fn(
        move |event: LambdaEvent<KinesisEvent>| async move {
            Ok::<_, Error>(handler.handle(event.payload).await)
        },
    ))
    .await
}
