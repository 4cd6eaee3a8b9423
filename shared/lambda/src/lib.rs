//! GeoStream's entry points on Lambda. The domain core (`geostream-shared`) knows readings,
//! envelopes, stream batches and ports; this crate knows Lambda: API Gateway v2 requests and
//! responses ([`http`]), Kinesis and Kafka events and their partial batch responses
//! ([`stream`]), and the runtime loop a function's `main` ends in ([`run_http_function`],
//! [`run_stream_function`]).

pub mod http;
pub mod identity;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod stream;

/// Real Lambda events, recorded as Lambda sends them, for the handlers' tests.
#[cfg(feature = "fixtures")]
pub mod fixtures {
    /// A Kinesis event source mapping's event: one telemetry envelope.
    pub const KINESIS_EVENT: &str = include_str!("../tests/fixtures/kinesis-event.json");
    /// An API Gateway HTTP API request through its JWT authorizer: a device token of
    /// `truck-7` (`sub`) with the scope `telemetry:write`, posting one reading.
    pub const APIGW_JWT: &str = include_str!("../tests/fixtures/apigw-jwt.json");
    /// A self-managed Kafka event source mapping's event: three envelopes on two partitions.
    pub const KAFKA_EVENT: &str = include_str!("../tests/fixtures/kafka-event.json");
}

use std::future::Future;

use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use geostream_shared::metrics::MetricsSink;
use geostream_shared::stream::StreamFunction;
use lambda_runtime::{run, service_fn, LambdaEvent};

use crate::stream::{KafkaEvent, KinesisEvent};

pub use lambda_runtime::Error;

/// Structured JSON logs on stdout (CloudWatch Logs), level from `RUST_LOG` (default info).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_current_span(false)
        .with_target(false)
        .without_time()
        .init();
}

/// Which event a stream function's event source mapping sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvents {
    /// `KinesisEvent`, answered with the failed records' sequence numbers.
    Kinesis,
    /// `KafkaEvent` (self-managed Kafka or MSK), answered with the offset to resume from per
    /// partition.
    Kafka,
}

/// Runs a stream function on the Lambda runtime until the runtime stops it.
pub async fn run_stream_function(
    function: &dyn StreamFunction,
    events: StreamEvents,
    metrics: &dyn MetricsSink,
) -> Result<(), Error> {
    match events {
        StreamEvents::Kinesis => {
            run(service_fn(
                move |event: LambdaEvent<KinesisEvent>| async move {
                    Ok::<_, Error>(stream::handle_kinesis(function, event.payload, metrics).await)
                },
            ))
            .await
        }
        StreamEvents::Kafka => {
            run(service_fn(
                move |event: LambdaEvent<KafkaEvent>| async move {
                    Ok::<_, Error>(stream::handle_kafka(function, event.payload, metrics).await)
                },
            ))
            .await
        }
    }
}

/// Runs a scheduled function (an EventBridge rule's invocation, whatever its event) on the
/// Lambda runtime: the handler's report is the answer, its error the invocation's error.
pub async fn run_scheduled_function<F, Fut>(handler: F) -> Result<(), Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<serde_json::Value, String>>,
{
    let handler = &handler;
    run(service_fn(
        move |_: LambdaEvent<serde_json::Value>| async move { handler().await.map_err(Error::from) },
    ))
    .await
}

/// Runs an HTTP function (API Gateway HTTP API, payload v2) on the Lambda runtime.
pub async fn run_http_function<F, Fut>(handler: F) -> Result<(), Error>
where
    F: Fn(ApiGatewayV2httpRequest) -> Fut,
    Fut: Future<Output = ApiGatewayV2httpResponse>,
{
    let handler = &handler;
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayV2httpRequest>| async move {
            Ok::<_, Error>(handler(event.payload).await)
        },
    ))
    .await
}
