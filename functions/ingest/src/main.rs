//! The ingest Lambda: API Gateway HTTP API (payload v2) -> Kinesis.

use std::sync::Arc;

use aws_lambda_events::event::apigw::ApiGatewayV2httpRequest;
use geostream_aws::kinesis::KinesisBus;
use geostream_aws::lambda;
use geostream_ingest::Ingest;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let stream = lambda::env(
        "TELEMETRY_STREAM",
        "the Kinesis stream telemetry is published to",
    )?;
    let clients = lambda::clients().await;
    let ingest = Ingest::new(Arc::new(KinesisBus::new(clients.kinesis, stream)));
    let ingest = &ingest;
    let metrics = &lambda::metrics(geostream_ingest::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayV2httpRequest>| async move {
            Ok::<_, Error>(ingest.handle(event.payload, metrics).await)
        },
    ))
    .await
}
