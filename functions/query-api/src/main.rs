//! The query-api Lambda: API Gateway HTTP API (payload v2) -> DynamoDB and archive reads.

use std::sync::Arc;

use aws_lambda_events::event::apigw::ApiGatewayV2httpRequest;
use geostream_aws::dynamodb::{DynamoAlerts, DynamoPositions};
use geostream_aws::lambda;
use geostream_query_api::QueryApi;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let positions_table = lambda::env("POSITIONS_TABLE", "the DynamoDB table of latest positions")?;
    let state_table = lambda::env(
        "ALERT_STATE_TABLE",
        "the DynamoDB table of per-device rule state",
    )?;
    let alerts_table = lambda::env("ALERTS_TABLE", "the DynamoDB table of alerts")?;
    let clients = lambda::clients().await;
    let archive = lambda::archive(&clients)?;
    let handler = QueryApi::new(
        Arc::new(DynamoPositions::new(
            clients.dynamodb.clone(),
            positions_table,
        )),
        archive,
        Arc::new(DynamoAlerts::new(
            clients.dynamodb,
            state_table,
            alerts_table,
        )),
    );
    let handler = &handler;
    let metrics = &lambda::metrics(geostream_query_api::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayV2httpRequest>| async move {
            Ok::<_, Error>(handler.handle(event.payload, metrics).await)
        },
    ))
    .await
}
