//! Configuration from environment variables, and SDK clients built from it.
//!
//! The standard AWS variables apply (region, credentials, `AWS_ENDPOINT_URL` for an emulator);
//! GeoStream's own settings are read in [`crate::compose`].

use aws_config::retry::RetryConfig;
use aws_config::SdkConfig;

use crate::capacity::CapacityMeter;
use crate::counting::CallCounter;

/// The SDK configuration every client starts from: the default provider chain, the adaptive
/// retry mode (throttling and 5xx are retried with backoff and jitter, and the client slows
/// down when throttled), and `endpoint_url` when talking to an emulator.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::adaptive().with_max_attempts(5));
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// SDK clients for every service GeoStream uses, each counting its calls.
#[derive(Clone)]
pub struct Clients {
    pub kinesis: aws_sdk_kinesis::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub timestream_write: aws_sdk_timestreamwrite::Client,
    pub timestream_query: aws_sdk_timestreamquery::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    /// Kafka's SASL credentials (only builds with the Kafka bus read them).
    #[cfg(feature = "kafka")]
    pub secrets: aws_sdk_secretsmanager::Client,
    /// Timestream on AWS needs endpoint discovery; against an emulator (`endpoint_url` set) it
    /// would send the client to the real AWS hosts, so it is off there.
    pub timestream_discovery: bool,
    pub calls: CallCounter,
    /// The capacity units the adapters built on these clients consume.
    pub capacity: CapacityMeter,
}

impl Clients {
    /// Builds the clients without any network call (cold starts stay short).
    pub fn new(sdk: &SdkConfig) -> Clients {
        let calls = CallCounter::new();
        let kinesis = aws_sdk_kinesis::Client::from_conf(
            aws_sdk_kinesis::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        let dynamodb = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        // Emulators serve buckets on their own host: path-style addressing.
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(sdk.endpoint_url().is_some())
                .interceptor(calls.clone())
                .build(),
        );
        let timestream_write = aws_sdk_timestreamwrite::Client::from_conf(
            aws_sdk_timestreamwrite::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        let timestream_query = aws_sdk_timestreamquery::Client::from_conf(
            aws_sdk_timestreamquery::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        #[cfg(feature = "kafka")]
        let secrets = aws_sdk_secretsmanager::Client::from_conf(
            aws_sdk_secretsmanager::config::Builder::from(sdk)
                .interceptor(calls.clone())
                .build(),
        );
        Clients {
            kinesis,
            dynamodb,
            timestream_write,
            timestream_query,
            sqs,
            s3,
            #[cfg(feature = "kafka")]
            secrets,
            timestream_discovery: sdk.endpoint_url().is_none(),
            calls,
            capacity: CapacityMeter::new(),
        }
    }
}
