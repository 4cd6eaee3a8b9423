//! What every Lambda `main` does before `lambda_runtime::run`: JSON logs, configuration from
//! the environment, and SDK clients (constructed only: no network call at init).

use std::sync::Arc;

use aws_lambda_events::event::kafka::KafkaEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use geostream_kafka::{KafkaBus, KafkaSettings};
use geostream_shared::metrics::EmfLog;
use geostream_shared::ports::{Archive, DeadLetterSink, EventBus};
use geostream_shared::stream::StreamFunction;
use lambda_runtime::{run, service_fn, LambdaEvent};

use crate::kinesis::KinesisBus;
use geostream_shared::rules::RuleSet;

use crate::config::{required_env, sdk_config, Clients, MissingEnv};
use crate::s3archive::S3Archive;
use crate::sqs::SqsDeadLetters;
use crate::timestream::TimestreamArchive;

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

/// Metrics as CloudWatch Embedded Metric Format lines on stdout, dimensioned by the deployed
/// function name Lambda sets (`function` where it is not set, as under an emulator).
pub fn metrics(function: &str) -> EmfLog {
    EmfLog::stdout(std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| function.into()))
}

/// SDK clients from the default provider chain; `AWS_ENDPOINT_URL` points them at an emulator.
pub async fn clients() -> Clients {
    Clients::new(&sdk_config(None).await)
}

/// A required setting, as an init error that names the variable.
pub fn env(name: &'static str, purpose: &'static str) -> Result<String, MissingEnv> {
    required_env(name, purpose)
}

/// The SQS dead-letter sink named by `DEAD_LETTER_QUEUE_URL`.
pub fn dead_letters(clients: &Clients) -> Result<Arc<dyn DeadLetterSink>, MissingEnv> {
    let url = required_env(
        "DEAD_LETTER_QUEUE_URL",
        "the SQS queue URL for records a function gives up on",
    )?;
    Ok(Arc::new(SqsDeadLetters::new(clients.sqs.clone(), url)))
}

/// The rules: the file named by `RULES_FILE`, else the bundled defaults.
pub fn rules() -> Result<RuleSet, String> {
    match std::env::var("RULES_FILE") {
        Ok(path) if !path.is_empty() => {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("RULES_FILE {path}: {e}"))?;
            RuleSet::from_toml(&text).map_err(|e| format!("RULES_FILE {path}: {e}"))
        }
        _ => Ok(RuleSet::default_rules()),
    }
}

/// The archive named by `ARCHIVE`: `timestream` (`TIMESTREAM_DATABASE`, `TIMESTREAM_TABLE`) or
/// `s3` (`ARCHIVE_BUCKET`).
pub fn archive(clients: &Clients) -> Result<Arc<dyn Archive>, String> {
    let kind = required_env("ARCHIVE", "which archive to use: timestream or s3")
        .map_err(|e| e.to_string())?;
    match kind.as_str() {
        "timestream" => {
            let database = required_env(
                "TIMESTREAM_DATABASE",
                "the Timestream database of the archive",
            )
            .map_err(|e| e.to_string())?;
            let table = required_env("TIMESTREAM_TABLE", "the Timestream table of the archive")
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(TimestreamArchive::new(
                clients.timestream_write.clone(),
                clients.timestream_query.clone(),
                clients.timestream_discovery,
                database,
                table,
            )))
        }
        "s3" => {
            let bucket = required_env("ARCHIVE_BUCKET", "the S3 bucket of the archive")
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(S3Archive::new(clients.s3.clone(), bucket)))
        }
        other => Err(format!("ARCHIVE={other:?}: expected timestream or s3")),
    }
}

/// The bus a deployment runs on, from `BUS`: `kinesis` (the default) or `kafka` (a
/// self-managed Kafka, Redpanda or MSK cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Kinesis,
    Kafka,
}

pub fn bus_kind() -> Result<BusKind, String> {
    match std::env::var("BUS").as_deref() {
        Err(_) | Ok("") | Ok("kinesis") => Ok(BusKind::Kinesis),
        Ok("kafka") => Ok(BusKind::Kafka),
        Ok(other) => Err(format!("BUS={other:?}: expected kinesis or kafka")),
    }
}

/// SASL/SCRAM credentials for the Kafka brokers: the Secrets Manager secret named by
/// `KAFKA_SECRET_ARN`, `{"username": ..., "password": ...}`, the same secret Lambda's Kafka
/// event source mappings authenticate with. None when the variable is empty (a broker without
/// authentication).
pub async fn kafka_credentials(clients: &Clients) -> Result<Option<(String, String)>, String> {
    let arn = match std::env::var("KAFKA_SECRET_ARN") {
        Ok(arn) if !arn.trim().is_empty() => arn,
        _ => return Ok(None),
    };
    let secret = clients
        .secrets
        .get_secret_value()
        .secret_id(&arn)
        .send()
        .await
        .map_err(|e| {
            format!(
                "KAFKA_SECRET_ARN {arn}: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            )
        })?;
    let text = secret
        .secret_string()
        .ok_or_else(|| format!("KAFKA_SECRET_ARN {arn}: the secret has no string value"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("KAFKA_SECRET_ARN {arn}: not JSON: {e}"))?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("KAFKA_SECRET_ARN {arn}: no string field {name:?}"))
    };
    Ok(Some((field("username")?, field("password")?)))
}

/// The telemetry bus: the Kinesis stream `TELEMETRY_STREAM`, or with `BUS=kafka` the topic
/// `TELEMETRY_TOPIC` on `KAFKA_BOOTSTRAP_SERVERS` (credentials from `KAFKA_SECRET_ARN`).
pub async fn telemetry_bus(clients: &Clients) -> Result<Arc<dyn EventBus>, String> {
    bus(
        clients,
        (
            "TELEMETRY_STREAM",
            "the Kinesis stream telemetry is published to",
        ),
        (
            "TELEMETRY_TOPIC",
            "the Kafka topic telemetry is published to",
        ),
    )
    .await
}

/// The alerts bus: the Kinesis stream `ALERTS_STREAM`, or with `BUS=kafka` the topic
/// `ALERTS_TOPIC`.
pub async fn alerts_bus(clients: &Clients) -> Result<Arc<dyn EventBus>, String> {
    bus(
        clients,
        (
            "ALERTS_STREAM",
            "the Kinesis stream alert transitions are published to",
        ),
        (
            "ALERTS_TOPIC",
            "the Kafka topic alert transitions are published to",
        ),
    )
    .await
}

async fn bus(
    clients: &Clients,
    (stream, stream_purpose): (&'static str, &'static str),
    (topic, topic_purpose): (&'static str, &'static str),
) -> Result<Arc<dyn EventBus>, String> {
    let setting = |name, purpose| required_env(name, purpose).map_err(|e| e.to_string());
    match bus_kind()? {
        BusKind::Kinesis => Ok(Arc::new(KinesisBus::new(
            clients.kinesis.clone(),
            setting(stream, stream_purpose)?,
        ))),
        BusKind::Kafka => {
            let brokers = setting(
                "KAFKA_BOOTSTRAP_SERVERS",
                "the Kafka brokers, host:port[,host:port...]",
            )?;
            let settings =
                KafkaSettings::with_credentials(brokers, kafka_credentials(clients).await?);
            Ok(Arc::new(KafkaBus::new(
                &settings,
                setting(topic, topic_purpose)?,
            )?))
        }
    }
}

/// Runs a stream function on the Lambda runtime, taking the event its bus's event source
/// mapping sends: `KinesisEvent` answered with sequence numbers, or (with `BUS=kafka`)
/// `KafkaEvent` answered with the offset to resume from per partition.
pub async fn run_stream_function(
    function: &dyn StreamFunction,
    metrics: &EmfLog,
) -> Result<(), lambda_runtime::Error> {
    match bus_kind()? {
        BusKind::Kinesis => {
            run(service_fn(
                move |event: LambdaEvent<KinesisEvent>| async move {
                    Ok::<_, lambda_runtime::Error>(function.handle(event.payload, metrics).await)
                },
            ))
            .await
        }
        BusKind::Kafka => {
            run(service_fn(
                move |event: LambdaEvent<KafkaEvent>| async move {
                    Ok::<_, lambda_runtime::Error>(
                        function.handle_kafka(event.payload, metrics).await,
                    )
                },
            ))
            .await
        }
    }
}
