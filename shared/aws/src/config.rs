//! Configuration from environment variables, and SDK clients built from it.
//!
//! The standard AWS variables apply (region, credentials, `AWS_ENDPOINT_URL` for an emulator);
//! GeoStream's own settings are read in [`crate::compose`].

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;

use crate::capacity::CapacityMeter;
use crate::counting::CallCounter;

/// The SDK configuration every client starts from: the default provider chain, the standard
/// retry mode with short backoffs and timeouts, and `endpoint_url` when talking to an emulator.
///
/// Freshness over persistence: a data-plane call (a Kinesis put, a DynamoDB item, an SQS
/// batch) is tried at most [`MAX_ATTEMPTS`] times, 25-500 ms apart, each attempt given
/// [`ATTEMPT_TIMEOUT`]; what still fails goes back to the function, which reports the records
/// for the event source mapping to retry. The adaptive mode was the default before: on every
/// throttling error it slowed the whole client down, and with 10% of calls throttled the
/// fleet's delivered rate fell from 30 to 9 readings/s and POST-to-position p99 rose to 26 s.
/// The standard mode's retry quota still stops retry storms when a service is down.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let attempt_timeout = attempt_timeout();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(25))
                .with_max_backoff(Duration::from_millis(500)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(attempt_timeout)
                .operation_timeout(attempt_timeout * MAX_ATTEMPTS + Duration::from_secs(1))
                .build(),
        );
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Tries of one data-plane call (the first and two retries).
pub const MAX_ATTEMPTS: u32 = 3;
/// How long one try of a data-plane call may take: DynamoDB, Kinesis and SQS answer in
/// milliseconds; a try this slow is lost, and another is quicker than waiting on it.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Overrides [`ATTEMPT_TIMEOUT`], in milliseconds: for an emulator, whose scans of a large
/// table take seconds where DynamoDB takes milliseconds (`scripts/test` sets it).
pub const ATTEMPT_TIMEOUT_VARIABLE: &str = "GEOSTREAM_AWS_ATTEMPT_TIMEOUT_MS";

fn attempt_timeout() -> Duration {
    std::env::var(ATTEMPT_TIMEOUT_VARIABLE)
        .ok()
        .and_then(|ms| ms.trim().parse().ok())
        .map_or(ATTEMPT_TIMEOUT, Duration::from_millis)
}

/// Reads that scan more (a Timestream track query, an S3 archive object) get longer, within
/// API Gateway's 30 s.
const READ_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

fn read_timeouts() -> TimeoutConfig {
    let attempt = READ_ATTEMPT_TIMEOUT.max(attempt_timeout());
    TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(attempt)
        .operation_timeout(attempt * MAX_ATTEMPTS)
        .build()
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
                .timeout_config(read_timeouts())
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
                .timeout_config(read_timeouts())
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
