//! The anomaly-inspector Lambda: Kinesis -> rules -> DynamoDB alerts + alerts stream.

use std::sync::Arc;

use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_anomaly_inspector::AnomalyInspector;
use geostream_aws::dynamodb::DynamoAlerts;
use geostream_aws::kinesis::KinesisBus;
use geostream_aws::lambda;
use geostream_shared::stream::StreamFunction;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let state_table = lambda::env(
        "ALERT_STATE_TABLE",
        "the DynamoDB table of per-device rule state",
    )?;
    let alerts_table = lambda::env("ALERTS_TABLE", "the DynamoDB table of alerts")?;
    let alerts_stream = lambda::env(
        "ALERTS_STREAM",
        "the Kinesis stream alert transitions are published to",
    )?;
    let rules = lambda::rules()?;
    let clients = lambda::clients().await;
    let dead_letters = lambda::dead_letters(&clients)?;
    let handler = AnomalyInspector::new(
        Arc::new(rules),
        Arc::new(DynamoAlerts::new(
            clients.dynamodb.clone(),
            state_table,
            alerts_table,
        )),
        Arc::new(KinesisBus::new(clients.kinesis, alerts_stream)),
        dead_letters,
    );
    let handler = &handler;
    let metrics = &lambda::metrics(geostream_anomaly_inspector::FUNCTION_NAME);
    run(service_fn(
        move |event: LambdaEvent<KinesisEvent>| async move {
            Ok::<_, Error>(handler.handle(event.payload, metrics).await)
        },
    ))
    .await
}
