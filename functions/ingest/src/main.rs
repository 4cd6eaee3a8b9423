//! The ingest Lambda: API Gateway HTTP API (payload v2) -> the telemetry bus (Kinesis, or Kafka
//! with `BUS=kafka`).

use aws_lambda_events::event::apigw::ApiGatewayV2httpRequest;
use geostream_aws::lambda;
use geostream_ingest::Ingest;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let clients = lambda::clients().await;
    let ingest = Ingest::new(lambda::telemetry_bus(&clients).await?);
    let ingest = &ingest;
    let metrics = &lambda::metrics(geostream_ingest::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayV2httpRequest>| async move {
            Ok::<_, Error>(ingest.handle(event.payload, metrics).await)
        },
    ))
    .await
}
