//! The anomaly-inspector Lambda: the telemetry bus (Kinesis or Kafka) -> rules -> DynamoDB
//! alerts + the alerts bus.

use std::sync::Arc;

use geostream_anomaly_inspector::AnomalyInspector;
use geostream_aws::dynamodb::DynamoAlerts;
use geostream_aws::lambda;
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda::init_tracing();
    let state_table = lambda::env(
        "ALERT_STATE_TABLE",
        "the DynamoDB table of per-device rule state",
    )?;
    let alerts_table = lambda::env("ALERTS_TABLE", "the DynamoDB table of alerts")?;
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
        lambda::alerts_bus(&clients).await?,
        dead_letters,
    );
    let metrics = lambda::metrics(geostream_anomaly_inspector::FUNCTION_NAME);
    lambda::run_stream_function(&handler, &metrics).await
}
