//! What every Lambda `main` does before `lambda_runtime::run`: JSON logs, configuration from
//! the environment, and SDK clients (constructed only: no network call at init).

use std::sync::Arc;

use geostream_shared::ports::DeadLetterSink;
use geostream_shared::rules::RuleSet;

use crate::config::{required_env, sdk_config, Clients, MissingEnv};
use crate::sqs::SqsDeadLetters;

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
