//! The geo-update Lambda: Kinesis -> DynamoDB positions.

use std::sync::Arc;

use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_aws::dynamodb::DynamoPositions;
use geostream_aws::lambda;
use geostream_geo_update::GeoUpdate;
use geostream_shared::stream::StreamFunction;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

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
    let handler = &handler;
    let metrics = &lambda::metrics(geostream_geo_update::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<KinesisEvent>| async move {
            Ok::<_, Error>(handler.handle(event.payload, metrics).await)
        },
    ))
    .await
}
