//! What every Lambda `main` does before `lambda_runtime::run`: JSON logs, configuration from
//! the environment, and SDK clients (constructed only: no network call at init).

use std::sync::Arc;

use geostream_shared::metrics::EmfLog;
use geostream_shared::ports::{Archive, DeadLetterSink};
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
