//! The composition root: settings in, ports out. Every Lambda `main` and `geostream-local`'s
//! AWS backend build their adapters here, so the two cannot disagree on how a port is made.
//!
//! A function declares the [`Port`]s it uses (in [`crate::manifest::FUNCTIONS`]); each port
//! names the [`Setting`]s it reads. That declaration is the one list of environment variables:
//! the infrastructure consistency check compares it with Terraform, and a [`Composition`]
//! refuses to read a setting its function did not declare, so the list cannot go stale.
//! On Lambda the settings come from the process environment ([`ProcessEnv`]); the local runner
//! gives the same names from its flags ([`SettingMap`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use geostream_shared::device_secret::DeviceSecrets;
use geostream_shared::limits::{DeviceLimits, DeviceRateLimit, LocalDeviceLimits};
use geostream_shared::metrics::EmfLog;
use geostream_shared::ports::{
    AlertStore, Archive, DeadLetterSink, EventBus, FleetEventStore, GeofenceStore, HistoryStore,
    MetricNameRegistry, PositionStore, SilentCandidates, DEFAULT_MAX_METRIC_NAMES,
};
use geostream_shared::rules::RuleSet;
use geostream_shared::stream::{RetryBudget, WithRetryBudget};

use geostream_lambda::identity::{AccessPolicy, ScopeNames};
use geostream_lambda::jwt::{JwtVerifier, KeySource};

use crate::config::Clients;
use crate::dynamodb::{DynamoAlerts, DynamoPositions};
use crate::fleet::{DynamoFleetEvents, DynamoGeofences};
use crate::history::DynamoHistory;
use crate::kinesis::KinesisBus;
use crate::metric_names::DynamoMetricNames;
use crate::s3archive::S3Archive;
use crate::sqs::SqsDeadLetters;
use crate::timestream::TimestreamArchive;

/// One named setting (an environment variable on Lambda).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Setting {
    pub name: &'static str,
    pub purpose: &'static str,
    /// An optional setting has a default; a deployment need not set it.
    pub optional: bool,
}

const fn setting(name: &'static str, purpose: &'static str) -> Setting {
    Setting {
        name,
        purpose,
        optional: false,
    }
}

/// Every setting GeoStream's functions read.
pub mod settings {
    use super::{setting, Setting};

    pub const BUS: Setting = setting("BUS", "the bus: kinesis or kafka");
    pub const TELEMETRY_STREAM: Setting = setting(
        "TELEMETRY_STREAM",
        "the Kinesis stream telemetry is published to (BUS=kinesis)",
    );
    pub const TELEMETRY_TOPIC: Setting = setting(
        "TELEMETRY_TOPIC",
        "the Kafka topic telemetry is published to (BUS=kafka)",
    );
    pub const ALERTS_STREAM: Setting = setting(
        "ALERTS_STREAM",
        "the Kinesis stream alert transitions are published to (BUS=kinesis)",
    );
    pub const ALERTS_TOPIC: Setting = setting(
        "ALERTS_TOPIC",
        "the Kafka topic alert transitions are published to (BUS=kafka)",
    );
    pub const KAFKA_BOOTSTRAP_SERVERS: Setting = setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        "the Kafka brokers, host:port[,host:port...] (BUS=kafka)",
    );
    pub const KAFKA_SECRET_ARN: Setting = setting(
        "KAFKA_SECRET_ARN",
        "the Secrets Manager secret with the brokers' SASL/SCRAM credentials; empty for none",
    );
    pub const KAFKA_LINGER_MS: Setting = Setting {
        name: "KAFKA_LINGER_MS",
        purpose: "how long the Kafka producer gathers records into one produce request, in milliseconds (default 0: a Lambda invocation sends its records at once; the local runner, whose requests share one producer, sets 20)",
        optional: true,
    };
    pub const POSITION_STORE: Setting = setting(
        "POSITION_STORE",
        "where latest positions live: dynamodb or valkey",
    );
    pub const POSITIONS_TABLE: Setting = setting(
        "POSITIONS_TABLE",
        "the DynamoDB table of latest positions (POSITION_STORE=dynamodb); with valkey, the prefix of its keys",
    );
    pub const VALKEY_URL: Setting = setting(
        "VALKEY_URL",
        "the Valkey (ElastiCache) or Redis URL of the position store, rediss://HOST:PORT with TLS (POSITION_STORE=valkey)",
    );
    pub const ALERT_STATE_TABLE: Setting = setting(
        "ALERT_STATE_TABLE",
        "the DynamoDB table of per-device rule state",
    );
    pub const ALERTS_TABLE: Setting = setting("ALERTS_TABLE", "the DynamoDB table of alerts");
    pub const RULE_STATE_STORE: Setting = setting(
        "RULE_STATE_STORE",
        "where the anomaly-inspector keeps rule state: dynamodb (ALERT_STATE_TABLE) or valkey (VALKEY_URL, keys prefixed with ALERT_STATE_TABLE)",
    );
    pub const ARCHIVE: Setting = setting("ARCHIVE", "which archive to use: timestream or s3");
    pub const RECENT_TRACKS: Setting = setting(
        "RECENT_TRACKS",
        "none, or valkey: the last hour of every vehicle's readings in Valkey (VALKEY_URL), so that a recent track reads only that vehicle's readings",
    );
    pub const ARCHIVE_BUCKET: Setting = setting(
        "ARCHIVE_BUCKET",
        "the S3 bucket of the archive (ARCHIVE=s3)",
    );
    pub const TIMESTREAM_DATABASE: Setting = setting(
        "TIMESTREAM_DATABASE",
        "the Timestream database of the archive (ARCHIVE=timestream)",
    );
    pub const TIMESTREAM_TABLE: Setting = setting(
        "TIMESTREAM_TABLE",
        "the Timestream table of the archive (ARCHIVE=timestream)",
    );
    pub const DEAD_LETTER_QUEUE_URL: Setting = setting(
        "DEAD_LETTER_QUEUE_URL",
        "the SQS queue URL for records a function gives up on",
    );
    pub const DEAD_LETTER_BUCKET: Setting = setting(
        "DEAD_LETTER_BUCKET",
        "the S3 bucket for dead letters too large for an SQS message (the message points to them)",
    );
    pub const STREAM_MAX_RETRIES: Setting = Setting {
        name: "STREAM_MAX_RETRIES",
        purpose: "the event source mapping's maximum_retry_attempts: a stream function dead-letters a record itself on the last attempt (default 5)",
        optional: true,
    };
    pub const STREAM_MAX_RECORD_AGE_SECONDS: Setting = Setting {
        name: "STREAM_MAX_RECORD_AGE_SECONDS",
        purpose: "the event source mapping's maximum_record_age_in_seconds: a stream function dead-letters a failing record itself at nine tenths of it (default 21600)",
        optional: true,
    };
    pub const METRIC_NAMES_TABLE: Setting = setting(
        "METRIC_NAMES_TABLE",
        "the DynamoDB table of the deployment's free metric names (bounded by MAX_METRIC_NAMES)",
    );
    pub const MAX_METRIC_NAMES: Setting = Setting {
        name: "MAX_METRIC_NAMES",
        purpose: "how many distinct free metric names the deployment takes; a reading with a new name past it is refused (default 8000: Timestream holds 8,192 measure names per table)",
        optional: true,
    };
    pub const AUTHORIZATION: Setting = setting(
        "AUTHORIZATION",
        "jwt: every request must carry the claims of a token API Gateway's JWT authorizer verified (401 otherwise); jwt_in_function: the function verifies the bearer token itself (behind a Lambda Function URL; JWT_ISSUER, JWT_AUDIENCES); none: open, for a runner without token verification",
    );
    pub const JWT_ISSUER: Setting = Setting {
        name: "JWT_ISSUER",
        purpose: "with AUTHORIZATION=jwt_in_function: the issuer (iss) tokens must name; its OpenID Connect discovery document names the signing keys unless JWKS_URL does",
        optional: true,
    };
    pub const JWT_AUDIENCES: Setting = Setting {
        name: "JWT_AUDIENCES",
        purpose: "with AUTHORIZATION=jwt_in_function: the accepted audiences, comma-separated (aud, or client_id in a token without aud)",
        optional: true,
    };
    pub const JWKS_URL: Setting = Setting {
        name: "JWKS_URL",
        purpose: "with AUTHORIZATION=jwt_in_function: where the issuer's signing keys (a JWKS) are, when not where its discovery document says",
        optional: true,
    };
    pub const DEVICE_CLAIM: Setting = Setting {
        name: "DEVICE_CLAIM",
        purpose: "the token claim that names a device token's vehicle (default sub)",
        optional: true,
    };
    pub const SCOPE_TELEMETRY_WRITE: Setting = Setting {
        name: "SCOPE_TELEMETRY_WRITE",
        purpose: "the scope a device token needs to post its own vehicle's readings (default telemetry:write)",
        optional: true,
    };
    pub const SCOPE_TELEMETRY_WRITE_ANY: Setting = Setting {
        name: "SCOPE_TELEMETRY_WRITE_ANY",
        purpose: "the scope of a gateway token, which may post readings of any vehicle (default telemetry:write:any)",
        optional: true,
    };
    pub const SCOPE_FLEET_READ: Setting = Setting {
        name: "SCOPE_FLEET_READ",
        purpose:
            "the scope that reads vehicles, radius queries, tracks and alerts (default fleet:read)",
        optional: true,
    };
    pub const SCOPE_ALERTS_ACK: Setting = Setting {
        name: "SCOPE_ALERTS_ACK",
        purpose: "the scope that acknowledges alerts (default alerts:ack)",
        optional: true,
    };
    pub const SCOPE_GEOFENCES_WRITE: Setting = Setting {
        name: "SCOPE_GEOFENCES_WRITE",
        purpose: "the scope that writes and deletes geofences (default geofences:write)",
        optional: true,
    };
    pub const GEOFENCES_TABLE: Setting =
        setting("GEOFENCES_TABLE", "the DynamoDB table of geofences");
    pub const FLEET_EVENTS_TABLE: Setting = setting(
        "FLEET_EVENTS_TABLE",
        "the DynamoDB table of fleet events (geofence enters and exits, overspeed, offline)",
    );
    pub const GEOFENCE_OCCUPANTS_TABLE: Setting = setting(
        "GEOFENCE_OCCUPANTS_TABLE",
        "the DynamoDB table of who is inside each geofence",
    );
    pub const FLEET_EVENT_RETENTION_DAYS: Setting = Setting {
        name: "FLEET_EVENT_RETENTION_DAYS",
        purpose: "how many days fleet events are kept (DynamoDB TTL; default 30)",
        optional: true,
    };
    pub const POSITION_RETENTION_DAYS: Setting = Setting {
        name: "POSITION_RETENTION_DAYS",
        purpose: "how many days the position of a vehicle gone silent is kept (DynamoDB TTL from its reading; default 90)",
        optional: true,
    };
    pub const ALERT_RETENTION_DAYS: Setting = Setting {
        name: "ALERT_RETENTION_DAYS",
        purpose: "how many days a cleared alert's record is kept (DynamoDB TTL from its clear; default 90)",
        optional: true,
    };
    pub const HISTORY_TABLE: Setting = setting(
        "HISTORY_TABLE",
        "the DynamoDB table of trips, stops and minute summaries",
    );
    pub const HISTORY_RETENTION_DAYS: Setting = Setting {
        name: "HISTORY_RETENTION_DAYS",
        purpose: "how many days trips, stops and summaries are kept (DynamoDB TTL; default 90)",
        optional: true,
    };
    pub const DEVICE_RATE_PER_SECOND: Setting = Setting {
        name: "DEVICE_RATE_PER_SECOND",
        purpose: "requests a second one device may post on average (default 2; fractions allowed); past it and its burst it is answered 429 with Retry-After",
        optional: true,
    };
    pub const DEVICE_RATE_BURST: Setting = Setting {
        name: "DEVICE_RATE_BURST",
        purpose: "requests one device may post at once above its average rate (default 20)",
        optional: true,
    };
    pub const DEVICE_SECRET_KEY: Setting = Setting {
        name: "DEVICE_SECRET_KEY",
        purpose: "the key tracker apps' device secrets are derived from (32 bytes or more, e.g. `openssl rand -base64 32`); without it the tracker routes are closed where tokens are verified",
        optional: true,
    };
    pub const REVOKED_DEVICES: Setting = Setting {
        name: "REVOKED_DEVICES",
        purpose: "device ids whose secrets are refused (403), separated by commas",
        optional: true,
    };
    pub const RULES_FILE: Setting = Setting {
        name: "RULES_FILE",
        purpose: "a rules file (TOML) in place of the bundled default rules",
        optional: true,
    };
}

/// Who verifies the tokens of HTTP requests (`AUTHORIZATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Authorization {
    /// API Gateway's JWT authorizer; the function reads the claims it put in the event.
    ApiGateway,
    /// The function itself (behind a Lambda Function URL).
    InFunction,
    /// Nobody: every caller may do everything.
    Open,
}

/// How many days silent vehicles' positions and cleared alerts are kept when the deployment
/// says nothing.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;

/// What a function is built from. Each port names the settings it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Publishes telemetry (Kinesis or Kafka).
    TelemetryBus,
    /// Publishes alert transitions (Kinesis or Kafka).
    AlertsBus,
    /// Is invoked with the telemetry bus's events (a stream function).
    TelemetryEvents,
    Positions,
    /// Rule state and alert records (the anomaly-inspector).
    Alerts,
    /// Alert records only: listed, read and acknowledged (the query API).
    AlertRecords,
    Archive,
    DeadLetters,
    Rules,
    /// The bounded registry of free metric names (ingest).
    MetricNames,
    /// Who may do what: the token's claims and scopes (the HTTP functions).
    Access,
    /// Per-device request limits (ingest).
    DeviceLimits,
    /// Tracker apps' per-device secrets (ingest).
    DeviceSecrets,
    /// Geofences: written and read (the query API), cached (the anomaly-inspector).
    Geofences,
    /// Fleet events and geofence occupants.
    FleetEvents,
    /// Trips, stops and minute summaries.
    History,
}

impl Port {
    pub const fn settings(self) -> &'static [Setting] {
        use settings::*;
        match self {
            Port::TelemetryBus => &[
                BUS,
                TELEMETRY_STREAM,
                TELEMETRY_TOPIC,
                KAFKA_BOOTSTRAP_SERVERS,
                KAFKA_SECRET_ARN,
                KAFKA_LINGER_MS,
            ],
            Port::AlertsBus => &[
                BUS,
                ALERTS_STREAM,
                ALERTS_TOPIC,
                KAFKA_BOOTSTRAP_SERVERS,
                KAFKA_SECRET_ARN,
                KAFKA_LINGER_MS,
            ],
            Port::TelemetryEvents => &[BUS, STREAM_MAX_RETRIES, STREAM_MAX_RECORD_AGE_SECONDS],
            Port::Positions => &[
                POSITION_STORE,
                POSITIONS_TABLE,
                POSITION_RETENTION_DAYS,
                VALKEY_URL,
            ],
            Port::Alerts => &[
                ALERT_STATE_TABLE,
                ALERTS_TABLE,
                ALERT_RETENTION_DAYS,
                RULE_STATE_STORE,
                VALKEY_URL,
            ],
            Port::AlertRecords => &[ALERT_STATE_TABLE, ALERTS_TABLE],
            Port::Archive => &[
                ARCHIVE,
                ARCHIVE_BUCKET,
                TIMESTREAM_DATABASE,
                TIMESTREAM_TABLE,
                RECENT_TRACKS,
                VALKEY_URL,
            ],
            Port::DeadLetters => &[DEAD_LETTER_QUEUE_URL, DEAD_LETTER_BUCKET],
            Port::Rules => &[RULES_FILE],
            Port::MetricNames => &[METRIC_NAMES_TABLE, MAX_METRIC_NAMES],
            Port::DeviceLimits => &[DEVICE_RATE_PER_SECOND, DEVICE_RATE_BURST],
            Port::DeviceSecrets => &[DEVICE_SECRET_KEY, REVOKED_DEVICES],
            Port::Geofences => &[GEOFENCES_TABLE],
            Port::FleetEvents => &[
                FLEET_EVENTS_TABLE,
                GEOFENCE_OCCUPANTS_TABLE,
                FLEET_EVENT_RETENTION_DAYS,
            ],
            Port::History => &[HISTORY_TABLE, HISTORY_RETENTION_DAYS],
            Port::Access => &[
                AUTHORIZATION,
                JWT_ISSUER,
                JWT_AUDIENCES,
                JWKS_URL,
                DEVICE_CLAIM,
                SCOPE_TELEMETRY_WRITE,
                SCOPE_TELEMETRY_WRITE_ANY,
                SCOPE_FLEET_READ,
                SCOPE_ALERTS_ACK,
                SCOPE_GEOFENCES_WRITE,
            ],
        }
    }
}

/// The settings a set of ports reads, each once, by name.
pub fn settings_of(ports: &[Port]) -> Vec<Setting> {
    let mut all: Vec<Setting> = ports.iter().flat_map(|p| p.settings()).copied().collect();
    all.sort_by_key(|s| s.name);
    all.dedup_by_key(|s| s.name);
    all
}

/// Why a port could not be built. `Debug` prints the sentence: a Lambda `main` returns this
/// as its init error, and CloudWatch should show what is wrong.
#[derive(Clone, PartialEq, thiserror::Error)]
pub enum ComposeError {
    #[error("environment variable {name} is not set: {purpose}")]
    Missing {
        name: &'static str,
        purpose: &'static str,
    },
    #[error("{function} reads {name}, which none of its declared ports names (geostream-aws manifest.rs)")]
    Undeclared {
        function: &'static str,
        name: &'static str,
    },
    #[error("{name}={value:?}: expected {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("no function named {0:?} in the manifest")]
    UnknownFunction(String),
    #[error("{0}")]
    Unavailable(String),
}

impl std::fmt::Debug for ComposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Where settings are read from.
pub trait SettingSource: Send + Sync {
    fn value(&self, name: &str) -> Option<String>;
}

/// The process environment (Lambda).
pub struct ProcessEnv;

impl SettingSource for ProcessEnv {
    fn value(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Settings given by name (the local runner's flags, tests).
#[derive(Debug, Clone, Default)]
pub struct SettingMap(BTreeMap<&'static str, String>);

impl SettingMap {
    pub fn new() -> Self {
        SettingMap::default()
    }

    pub fn set(mut self, setting: Setting, value: impl Into<String>) -> Self {
        self.0.insert(setting.name, value.into());
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0.iter().map(|(name, value)| (*name, value.as_str()))
    }
}

impl SettingSource for SettingMap {
    fn value(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// The bus a deployment runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Kinesis,
    Kafka,
}

/// Builds the ports of one function (or of the whole local stack) from its settings.
pub struct Composition {
    function: &'static str,
    declared: Vec<Setting>,
    source: Box<dyn SettingSource>,
    clients: Clients,
}

impl Composition {
    /// For a Lambda function: its ports from the manifest, settings from the environment, SDK
    /// clients from the default provider chain (`AWS_ENDPOINT_URL` points them at an emulator).
    /// No network call is made here: cold starts stay short.
    pub async fn for_lambda(function: &'static str) -> Result<Composition, ComposeError> {
        let manifest = crate::manifest::function(function)
            .ok_or_else(|| ComposeError::UnknownFunction(function.to_string()))?;
        let clients = Clients::new(&crate::config::sdk_config(None).await);
        Ok(Composition::new(
            manifest.name,
            manifest.ports,
            Box::new(ProcessEnv),
            clients,
        ))
    }

    pub fn new(
        function: &'static str,
        ports: &[Port],
        source: Box<dyn SettingSource>,
        clients: Clients,
    ) -> Composition {
        Composition {
            function,
            declared: settings_of(ports),
            source,
            clients,
        }
    }

    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// A declared setting's value; empty counts as unset.
    fn optional(&self, setting: Setting) -> Result<Option<String>, ComposeError> {
        if !self.declared.iter().any(|d| d.name == setting.name) {
            return Err(ComposeError::Undeclared {
                function: self.function,
                name: setting.name,
            });
        }
        Ok(self
            .source
            .value(setting.name)
            .filter(|v| !v.trim().is_empty()))
    }

    fn required(&self, setting: Setting) -> Result<String, ComposeError> {
        self.optional(setting)?.ok_or(ComposeError::Missing {
            name: setting.name,
            purpose: setting.purpose,
        })
    }

    /// `BUS`: `kinesis` (the default) or `kafka`.
    pub fn bus_kind(&self) -> Result<BusKind, ComposeError> {
        match self.optional(settings::BUS)?.as_deref() {
            None | Some("kinesis") => Ok(BusKind::Kinesis),
            Some("kafka") => Ok(BusKind::Kafka),
            Some(other) => Err(ComposeError::Invalid {
                name: settings::BUS.name,
                value: other.to_string(),
                expected: "kinesis or kafka",
            }),
        }
    }

    /// The event a stream function is invoked with, from `BUS`.
    pub fn telemetry_events(&self) -> Result<geostream_lambda::StreamEvents, ComposeError> {
        Ok(match self.bus_kind()? {
            BusKind::Kinesis => geostream_lambda::StreamEvents::Kinesis,
            BusKind::Kafka => geostream_lambda::StreamEvents::Kafka,
        })
    }

    /// The telemetry bus: the Kinesis stream `TELEMETRY_STREAM`, or with `BUS=kafka` the topic
    /// `TELEMETRY_TOPIC` on `KAFKA_BOOTSTRAP_SERVERS`.
    pub async fn telemetry_bus(&self) -> Result<Arc<dyn EventBus>, ComposeError> {
        self.bus(settings::TELEMETRY_STREAM, settings::TELEMETRY_TOPIC)
            .await
    }

    /// The alerts bus: the Kinesis stream `ALERTS_STREAM`, or with `BUS=kafka` the topic
    /// `ALERTS_TOPIC`.
    pub async fn alerts_bus(&self) -> Result<Arc<dyn EventBus>, ComposeError> {
        self.bus(settings::ALERTS_STREAM, settings::ALERTS_TOPIC)
            .await
    }

    async fn bus(
        &self,
        stream: Setting,
        topic: Setting,
    ) -> Result<Arc<dyn EventBus>, ComposeError> {
        match self.bus_kind()? {
            BusKind::Kinesis => Ok(Arc::new(
                KinesisBus::new(self.clients.kinesis.clone(), self.required(stream)?)
                    .metered(self.clients.capacity.clone()),
            )),
            BusKind::Kafka => self.kafka_bus(topic).await,
        }
    }

    #[cfg(feature = "kafka")]
    async fn kafka_bus(&self, topic: Setting) -> Result<Arc<dyn EventBus>, ComposeError> {
        let kafka = self.kafka_settings().await?;
        let linger = self.whole_number(
            settings::KAFKA_LINGER_MS,
            0,
            0..=5_000,
            "a whole number of milliseconds from 0 to 5000",
        )?;
        let bus = geostream_kafka::KafkaBus::new(
            &kafka,
            self.required(topic)?,
            std::time::Duration::from_millis(linger),
        )
        .map_err(ComposeError::Unavailable)?;
        Ok(Arc::new(bus))
    }

    #[cfg(not(feature = "kafka"))]
    async fn kafka_bus(&self, _topic: Setting) -> Result<Arc<dyn EventBus>, ComposeError> {
        Err(ComposeError::Unavailable(format!(
            "BUS=kafka, but {} was built without the Kafka client: build it with --features kafka",
            self.function
        )))
    }

    /// How to reach the Kafka brokers: `KAFKA_BOOTSTRAP_SERVERS`, with SASL/SCRAM credentials
    /// from the secret in `KAFKA_SECRET_ARN` when it is set.
    #[cfg(feature = "kafka")]
    pub async fn kafka_settings(&self) -> Result<geostream_kafka::KafkaSettings, ComposeError> {
        let brokers = self.required(settings::KAFKA_BOOTSTRAP_SERVERS)?;
        let credentials = match self.optional(settings::KAFKA_SECRET_ARN)? {
            Some(arn) => Some(self.kafka_credentials(&arn).await?),
            None => None,
        };
        Ok(geostream_kafka::KafkaSettings::with_credentials(
            brokers,
            credentials,
        ))
    }

    /// `{"username": ..., "password": ...}` from Secrets Manager: the same secret Lambda's
    /// Kafka event source mappings authenticate with.
    #[cfg(feature = "kafka")]
    async fn kafka_credentials(&self, arn: &str) -> Result<(String, String), ComposeError> {
        let failed =
            |why: String| ComposeError::Unavailable(format!("KAFKA_SECRET_ARN {arn}: {why}"));
        let secret = self
            .clients
            .secrets
            .get_secret_value()
            .secret_id(arn)
            .send()
            .await
            .map_err(|e| {
                failed(aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string())
            })?;
        let text = secret
            .secret_string()
            .ok_or_else(|| failed("the secret has no string value".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| failed(format!("not JSON: {e}")))?;
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| failed(format!("no string field {name:?}")))
        };
        Ok((field("username")?, field("password")?))
    }

    /// The position store named by `POSITION_STORE`: `dynamodb` (the default;
    /// `POSITIONS_TABLE`) or `valkey` (`VALKEY_URL`, keys prefixed with `POSITIONS_TABLE`).
    pub async fn positions(&self) -> Result<Arc<dyn PositionStore>, ComposeError> {
        let table = self.required(settings::POSITIONS_TABLE)?;
        match self.optional(settings::POSITION_STORE)?.as_deref() {
            None | Some("dynamodb") => Ok(Arc::new(
                DynamoPositions::new(self.clients.dynamodb.clone(), table)
                    .with_retention_days(self.retention_days(
                        settings::POSITION_RETENTION_DAYS,
                        DEFAULT_RETENTION_DAYS,
                    )?)
                    .metered(self.clients.capacity.clone()),
            )),
            Some("valkey") => {
                #[cfg(feature = "valkey")]
                return self.valkey_positions(table).await;
                #[cfg(not(feature = "valkey"))]
                return Err(self.built_without_valkey(settings::POSITION_STORE));
            }
            Some(other) => Err(ComposeError::Invalid {
                name: settings::POSITION_STORE.name,
                value: other.to_string(),
                expected: "dynamodb or valkey",
            }),
        }
    }

    /// A setting chose Valkey in a build without the Valkey client.
    #[cfg(not(feature = "valkey"))]
    fn built_without_valkey(&self, choice: Setting) -> ComposeError {
        ComposeError::Unavailable(format!(
            "{}=valkey, but {} was built without the Valkey client: build it with --features valkey",
            choice.name, self.function
        ))
    }

    #[cfg(feature = "valkey")]
    async fn valkey_positions(
        &self,
        prefix: String,
    ) -> Result<Arc<dyn PositionStore>, ComposeError> {
        let url = self.required(settings::VALKEY_URL)?;
        let store = crate::valkey::ValkeyPositions::connect(&url, prefix)
            .await
            .map_err(|e| ComposeError::Unavailable(format!("VALKEY_URL: {e}")))?;
        Ok(Arc::new(store.metered(self.clients.capacity.clone())))
    }

    /// Rule state and alert records: rule state where `RULE_STATE_STORE` says (`dynamodb`, the
    /// default, or `valkey`), alert records in DynamoDB.
    pub async fn alerts(&self) -> Result<Arc<dyn AlertStore>, ComposeError> {
        let records = self.dynamo_alerts()?.with_retention_days(
            self.retention_days(settings::ALERT_RETENTION_DAYS, DEFAULT_RETENTION_DAYS)?,
        );
        match self.optional(settings::RULE_STATE_STORE)?.as_deref() {
            None | Some("dynamodb") => Ok(Arc::new(records)),
            Some("valkey") => {
                #[cfg(feature = "valkey")]
                return self.valkey_state_alerts(records).await;
                #[cfg(not(feature = "valkey"))]
                return Err(self.built_without_valkey(settings::RULE_STATE_STORE));
            }
            Some(other) => Err(ComposeError::Invalid {
                name: settings::RULE_STATE_STORE.name,
                value: other.to_string(),
                expected: "dynamodb or valkey",
            }),
        }
    }

    /// The vehicles the offline check looks at: a Scan of the DynamoDB positions table. With
    /// positions in Valkey there is no such table to scan: the offline check is not deployed.
    pub fn silent_candidates(&self) -> Result<Arc<dyn SilentCandidates>, ComposeError> {
        match self.optional(settings::POSITION_STORE)?.as_deref() {
            None | Some("dynamodb") => Ok(Arc::new(
                DynamoPositions::new(
                    self.clients.dynamodb.clone(),
                    self.required(settings::POSITIONS_TABLE)?,
                )
                .metered(self.clients.capacity.clone()),
            )),
            Some(other) => Err(ComposeError::Invalid {
                name: settings::POSITION_STORE.name,
                value: other.to_string(),
                expected: "dynamodb: the offline check scans the DynamoDB positions table",
            }),
        }
    }

    /// Geofences in DynamoDB (`GEOFENCES_TABLE`).
    pub fn geofences(&self) -> Result<Arc<dyn GeofenceStore>, ComposeError> {
        Ok(Arc::new(
            DynamoGeofences::new(
                self.clients.dynamodb.clone(),
                self.required(settings::GEOFENCES_TABLE)?,
            )
            .metered(self.clients.capacity.clone()),
        ))
    }

    /// Fleet events and geofence occupants in DynamoDB (`FLEET_EVENTS_TABLE`,
    /// `GEOFENCE_OCCUPANTS_TABLE`), kept `FLEET_EVENT_RETENTION_DAYS`.
    pub fn fleet_events(&self) -> Result<Arc<dyn FleetEventStore>, ComposeError> {
        let retention_days = self.retention_days(
            settings::FLEET_EVENT_RETENTION_DAYS,
            crate::fleet::DEFAULT_EVENT_RETENTION_DAYS,
        )?;
        Ok(Arc::new(
            DynamoFleetEvents::new(
                self.clients.dynamodb.clone(),
                self.required(settings::FLEET_EVENTS_TABLE)?,
                self.required(settings::GEOFENCE_OCCUPANTS_TABLE)?,
                retention_days,
            )
            .metered(self.clients.capacity.clone()),
        ))
    }

    /// Trips, stops and summaries in DynamoDB (`HISTORY_TABLE`), kept `HISTORY_RETENTION_DAYS`.
    pub fn history(&self) -> Result<Arc<dyn HistoryStore>, ComposeError> {
        let retention_days = self.retention_days(
            settings::HISTORY_RETENTION_DAYS,
            crate::history::DEFAULT_HISTORY_RETENTION_DAYS,
        )?;
        Ok(Arc::new(
            DynamoHistory::new(
                self.clients.dynamodb.clone(),
                self.required(settings::HISTORY_TABLE)?,
                retention_days,
            )
            .metered(self.clients.capacity.clone()),
        ))
    }

    /// An optional whole-number setting (spaces around it ignored): `default` when unset, refused
    /// with `expected` when it is not a whole number within `allowed`.
    fn whole_number(
        &self,
        setting: Setting,
        default: u64,
        allowed: std::ops::RangeInclusive<u64>,
        expected: &'static str,
    ) -> Result<u64, ComposeError> {
        match self.optional(setting)? {
            None => Ok(default),
            Some(text) => text
                .trim()
                .parse()
                .ok()
                .filter(|n| allowed.contains(n))
                .ok_or(ComposeError::Invalid {
                    name: setting.name,
                    value: text,
                    expected,
                }),
        }
    }

    /// A retention setting: whole days from 1 to 3650, `default` when unset.
    fn retention_days(&self, setting: Setting, default: u32) -> Result<u32, ComposeError> {
        match self.optional(setting)? {
            None => Ok(default),
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|days| (1..=3_650).contains(days))
                .ok_or(ComposeError::Invalid {
                    name: setting.name,
                    value: text,
                    expected: "a whole number of days from 1 to 3650",
                }),
        }
    }

    /// Alert records for listing, reading and acknowledging (the rule state is not touched).
    pub fn alert_records(&self) -> Result<Arc<dyn AlertStore>, ComposeError> {
        Ok(Arc::new(self.dynamo_alerts()?))
    }

    fn dynamo_alerts(&self) -> Result<DynamoAlerts, ComposeError> {
        Ok(DynamoAlerts::new(
            self.clients.dynamodb.clone(),
            self.required(settings::ALERT_STATE_TABLE)?,
            self.required(settings::ALERTS_TABLE)?,
        )
        .metered(self.clients.capacity.clone()))
    }

    #[cfg(feature = "valkey")]
    async fn valkey_state_alerts(
        &self,
        records: DynamoAlerts,
    ) -> Result<Arc<dyn AlertStore>, ComposeError> {
        let url = self.required(settings::VALKEY_URL)?;
        let prefix = self.required(settings::ALERT_STATE_TABLE)?;
        let store = crate::valkey::ValkeyStateAlerts::connect(&url, prefix, records)
            .await
            .map_err(|e| ComposeError::Unavailable(format!("VALKEY_URL: {e}")))?;
        Ok(Arc::new(store.metered(self.clients.capacity.clone())))
    }

    /// The archive named by `ARCHIVE`: `timestream` (`TIMESTREAM_DATABASE`, `TIMESTREAM_TABLE`)
    /// or `s3` (`ARCHIVE_BUCKET`); with `RECENT_TRACKS=valkey`, behind the last hour of every
    /// vehicle's readings in Valkey (`VALKEY_URL`).
    pub async fn archive(&self) -> Result<Arc<dyn Archive>, ComposeError> {
        let archive = self.archive_store()?;
        match self.optional(settings::RECENT_TRACKS)?.as_deref() {
            None | Some("none") => Ok(archive),
            Some("valkey") => {
                #[cfg(feature = "valkey")]
                return self.recent_tracks(archive).await;
                #[cfg(not(feature = "valkey"))]
                return Err(self.built_without_valkey(settings::RECENT_TRACKS));
            }
            Some(other) => Err(ComposeError::Invalid {
                name: settings::RECENT_TRACKS.name,
                value: other.to_string(),
                expected: "none or valkey",
            }),
        }
    }

    #[cfg(feature = "valkey")]
    async fn recent_tracks(
        &self,
        archive: Arc<dyn Archive>,
    ) -> Result<Arc<dyn Archive>, ComposeError> {
        let url = self.required(settings::VALKEY_URL)?;
        // The archive's own name keeps two stacks sharing a cache apart.
        let prefix = match self.optional(settings::ARCHIVE_BUCKET)? {
            Some(bucket) => bucket,
            None => self.required(settings::TIMESTREAM_TABLE)?,
        };
        let store = crate::valkey::ValkeyRecentTracks::connect(&url, prefix, archive)
            .await
            .map_err(|e| ComposeError::Unavailable(format!("VALKEY_URL: {e}")))?;
        Ok(Arc::new(store.metered(self.clients.capacity.clone())))
    }

    fn archive_store(&self) -> Result<Arc<dyn Archive>, ComposeError> {
        match self.required(settings::ARCHIVE)?.as_str() {
            "timestream" => Ok(Arc::new(
                TimestreamArchive::new(
                    self.clients.timestream_write.clone(),
                    self.clients.timestream_query.clone(),
                    self.clients.timestream_discovery,
                    self.required(settings::TIMESTREAM_DATABASE)?,
                    self.required(settings::TIMESTREAM_TABLE)?,
                )
                .metered(self.clients.capacity.clone()),
            )),
            "s3" => Ok(Arc::new(
                S3Archive::new(
                    self.clients.s3.clone(),
                    self.required(settings::ARCHIVE_BUCKET)?,
                )
                .metered(self.clients.capacity.clone()),
            )),
            other => Err(ComposeError::Invalid {
                name: settings::ARCHIVE.name,
                value: other.to_string(),
                expected: "timestream or s3",
            }),
        }
    }

    /// The SQS dead-letter sink named by `DEAD_LETTER_QUEUE_URL`, spilling to
    /// `DEAD_LETTER_BUCKET`.
    pub fn dead_letters(&self) -> Result<Arc<dyn DeadLetterSink>, ComposeError> {
        Ok(Arc::new(SqsDeadLetters::new(
            self.clients.sqs.clone(),
            self.required(settings::DEAD_LETTER_QUEUE_URL)?,
            self.clients.s3.clone(),
            self.required(settings::DEAD_LETTER_BUCKET)?,
        )))
    }

    /// The registry of free metric names: the table `METRIC_NAMES_TABLE`, bounded by
    /// `MAX_METRIC_NAMES` (default [`DEFAULT_MAX_METRIC_NAMES`]).
    pub fn metric_names(&self) -> Result<Arc<dyn MetricNameRegistry>, ComposeError> {
        let limit = self.whole_number(
            settings::MAX_METRIC_NAMES,
            DEFAULT_MAX_METRIC_NAMES as u64,
            1..=u64::MAX,
            "a whole number above 0",
        )?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(Arc::new(
            DynamoMetricNames::new(
                self.clients.dynamodb.clone(),
                self.required(settings::METRIC_NAMES_TABLE)?,
                limit,
            )
            .metered(self.clients.capacity.clone()),
        ))
    }

    /// Tracker apps' device secrets: the key `DEVICE_SECRET_KEY` and the deny-list
    /// `REVOKED_DEVICES`; `None` without a key.
    pub fn device_secrets(&self) -> Result<Option<DeviceSecrets>, ComposeError> {
        let Some(key) = self.optional(settings::DEVICE_SECRET_KEY)? else {
            return Ok(None);
        };
        let revoked = self
            .optional(settings::REVOKED_DEVICES)?
            .map(|list| DeviceSecrets::parse_revoked(&list))
            .unwrap_or_default();
        DeviceSecrets::new(key.as_bytes(), revoked)
            .map(Some)
            .map_err(|too_short| ComposeError::Invalid {
                name: settings::DEVICE_SECRET_KEY.name,
                value: format!("({} bytes, not shown)", too_short.0),
                expected:
                    "a key of 32 bytes or more, such as the output of `openssl rand -base64 32`",
            })
    }

    /// Per-device request limits: `DEVICE_RATE_PER_SECOND` and `DEVICE_RATE_BURST` (each with
    /// its default when unset), kept per execution environment.
    pub fn device_limits(&self) -> Result<Arc<dyn DeviceLimits>, ComposeError> {
        let defaults = DeviceRateLimit::default();
        let invalid = |setting: Setting, value: String, expected| ComposeError::Invalid {
            name: setting.name,
            value,
            expected,
        };
        let rate_expected =
            "a number of requests a second between 0.001 and 1000000, such as 2 or 0.5";
        let per_second = match self.optional(settings::DEVICE_RATE_PER_SECOND)? {
            None => defaults.per_second,
            Some(text) => text
                .parse()
                .map_err(|_| invalid(settings::DEVICE_RATE_PER_SECOND, text, rate_expected))?,
        };
        let burst_expected = "a whole number of requests, 1 or more";
        let burst = match self.optional(settings::DEVICE_RATE_BURST)? {
            None => defaults.burst,
            Some(text) => text
                .parse()
                .map_err(|_| invalid(settings::DEVICE_RATE_BURST, text, burst_expected))?,
        };
        let limit = DeviceRateLimit::new(per_second, burst).map_err(|_| {
            if burst == 0 {
                invalid(settings::DEVICE_RATE_BURST, "0".into(), burst_expected)
            } else {
                invalid(
                    settings::DEVICE_RATE_PER_SECOND,
                    per_second.to_string(),
                    rate_expected,
                )
            }
        })?;
        Ok(Arc::new(LocalDeviceLimits::new(limit)))
    }

    /// `AUTHORIZATION`: who verifies tokens, if anyone.
    fn authorization(&self) -> Result<Authorization, ComposeError> {
        match self.required(settings::AUTHORIZATION)?.as_str() {
            "jwt" => Ok(Authorization::ApiGateway),
            "jwt_in_function" => Ok(Authorization::InFunction),
            "none" => Ok(Authorization::Open),
            other => Err(ComposeError::Invalid {
                name: settings::AUTHORIZATION.name,
                value: other.to_string(),
                expected: "jwt, jwt_in_function or none",
            }),
        }
    }

    /// What verifies bearer tokens in the function itself: with
    /// `AUTHORIZATION=jwt_in_function` (behind a Lambda Function URL), a verifier for
    /// `JWT_ISSUER` and `JWT_AUDIENCES` with the keys at `JWKS_URL` or where the issuer's
    /// discovery document says; otherwise none (API Gateway verified them, or nobody does).
    pub fn token_verifier(&self) -> Result<Option<JwtVerifier>, ComposeError> {
        if self.authorization()? != Authorization::InFunction {
            return Ok(None);
        }
        let issuer = self.required(settings::JWT_ISSUER)?;
        let listed = self.required(settings::JWT_AUDIENCES)?;
        let audiences: Vec<String> = listed
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if audiences.is_empty() {
            return Err(ComposeError::Invalid {
                name: settings::JWT_AUDIENCES.name,
                value: listed,
                expected: "one audience or more, comma-separated",
            });
        }
        let keys = match self.optional(settings::JWKS_URL)? {
            Some(url) => KeySource::Url(url),
            None => KeySource::Discovery,
        };
        Ok(Some(JwtVerifier::new(issuer, audiences, keys)))
    }

    /// Who may do what: `AUTHORIZATION`, the device claim and the scope names (each with its
    /// default when unset).
    pub fn access(&self) -> Result<AccessPolicy, ComposeError> {
        let require_token = self.authorization()? != Authorization::Open;
        let defaults = AccessPolicy::open();
        let or = |setting: Setting, default: String| -> Result<String, ComposeError> {
            Ok(self.optional(setting)?.unwrap_or(default))
        };
        Ok(AccessPolicy {
            require_token,
            device_claim: or(settings::DEVICE_CLAIM, defaults.device_claim)?,
            scopes: ScopeNames {
                telemetry_write: or(
                    settings::SCOPE_TELEMETRY_WRITE,
                    defaults.scopes.telemetry_write,
                )?,
                telemetry_write_any: or(
                    settings::SCOPE_TELEMETRY_WRITE_ANY,
                    defaults.scopes.telemetry_write_any,
                )?,
                fleet_read: or(settings::SCOPE_FLEET_READ, defaults.scopes.fleet_read)?,
                alerts_ack: or(settings::SCOPE_ALERTS_ACK, defaults.scopes.alerts_ack)?,
                geofences_write: or(
                    settings::SCOPE_GEOFENCES_WRITE,
                    defaults.scopes.geofences_write,
                )?,
            },
        })
    }

    /// The rules: the file named by `RULES_FILE`, else the bundled defaults.
    pub fn rules(&self) -> Result<Arc<RuleSet>, ComposeError> {
        let Some(path) = self.optional(settings::RULES_FILE)? else {
            return Ok(Arc::new(RuleSet::default_rules()));
        };
        let failed = |why: String| ComposeError::Unavailable(format!("RULES_FILE {path}: {why}"));
        let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
        RuleSet::from_toml(&text)
            .map(Arc::new)
            .map_err(|e| failed(e.to_string()))
    }

    /// Metrics as CloudWatch Embedded Metric Format lines on stdout, dimensioned by the
    /// deployed function name Lambda sets (this function's own name where it is not set).
    pub fn metrics(&self) -> EmfLog {
        EmfLog::stdout(
            std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| self.function.into()),
        )
    }

    /// Runs a stream function on the Lambda runtime, taking the event its bus's event source
    /// mapping sends.
    pub async fn run_stream_function(
        &self,
        function: impl geostream_shared::stream::StreamFunction + 'static,
    ) -> Result<(), geostream_lambda::Error> {
        let events = self.telemetry_events()?;
        let metrics = self.metrics();
        let function = WithRetryBudget::new(function, self.retry_budget()?, self.dead_letters()?);
        geostream_lambda::run_stream_function(&function, events, &metrics).await
    }

    /// When a stream function dead-letters a failing record itself: on the last attempt the
    /// mapping makes (`STREAM_MAX_RETRIES`), or near the record's maximum age
    /// (`STREAM_MAX_RECORD_AGE_SECONDS`), as Terraform configures the mapping.
    pub fn retry_budget(&self) -> Result<RetryBudget, ComposeError> {
        let number = |setting: Setting, default: u64| {
            self.whole_number(setting, default, 0..=u64::MAX, "a whole number")
        };
        let defaults = crate::manifest::MAPPING_DEFAULTS;
        let retries = number(
            settings::STREAM_MAX_RETRIES,
            u64::from(defaults.max_retries),
        )?;
        let max_age = number(
            settings::STREAM_MAX_RECORD_AGE_SECONDS,
            defaults.max_record_age_seconds,
        )?;
        Ok(RetryBudget::within_mapping(
            u32::try_from(retries).unwrap_or(u32::MAX),
            Some(max_age),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn composition(ports: &[Port], settings: SettingMap) -> Composition {
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        Composition::new("test", ports, Box::new(settings), Clients::new(&sdk))
    }

    #[tokio::test]
    async fn a_missing_setting_is_named_with_its_purpose() {
        let error = composition(&[Port::Positions], SettingMap::new())
            .positions()
            .await
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "environment variable POSITIONS_TABLE is not set: the DynamoDB table of latest positions (POSITION_STORE=dynamodb); with valkey, the prefix of its keys"
        );
    }

    #[tokio::test]
    async fn a_setting_the_function_did_not_declare_is_refused() {
        let settings = SettingMap::new().set(settings::POSITIONS_TABLE, "p");
        let error = composition(&[Port::DeadLetters], settings)
            .positions()
            .await
            .err()
            .unwrap();
        assert_eq!(
            error,
            ComposeError::Undeclared {
                function: "test",
                name: "POSITIONS_TABLE"
            }
        );
    }

    #[tokio::test]
    async fn the_archive_and_bus_are_chosen_by_their_settings() {
        let settings = SettingMap::new()
            .set(settings::ARCHIVE, "parquet")
            .set(settings::BUS, "kafka");
        let c = composition(&[Port::Archive, Port::TelemetryEvents], settings);
        assert_eq!(
            c.archive().await.err().unwrap().to_string(),
            "ARCHIVE=\"parquet\": expected timestream or s3"
        );
        assert_eq!(
            c.telemetry_events().unwrap(),
            geostream_lambda::StreamEvents::Kafka
        );
        let s3 = composition(
            &[Port::Archive],
            SettingMap::new()
                .set(settings::ARCHIVE, "s3")
                .set(settings::ARCHIVE_BUCKET, "b"),
        );
        assert!(s3.archive().await.is_ok());
    }

    /// The producer's linger: absent is 0 (Lambda), a number of milliseconds is taken, anything
    /// else stops init with the setting named. No broker is needed: the producer connects lazily.
    #[cfg(feature = "kafka")]
    #[tokio::test]
    async fn the_kafka_producers_linger_is_read_from_its_setting() {
        let kafka = |linger: Option<&str>| {
            let settings = SettingMap::new()
                .set(settings::BUS, "kafka")
                .set(settings::KAFKA_BOOTSTRAP_SERVERS, "127.0.0.1:9")
                .set(settings::TELEMETRY_TOPIC, "telemetry");
            let settings = match linger {
                Some(value) => settings.set(settings::KAFKA_LINGER_MS, value),
                None => settings,
            };
            composition(&[Port::TelemetryBus], settings)
        };
        assert!(kafka(None).telemetry_bus().await.is_ok());
        assert!(kafka(Some("20")).telemetry_bus().await.is_ok());
        for bad in ["soon", "-1", "60000"] {
            assert_eq!(
                kafka(Some(bad)).telemetry_bus().await.err().unwrap().to_string(),
                format!(
                    "KAFKA_LINGER_MS={bad:?}: expected a whole number of milliseconds from 0 to 5000"
                )
            );
        }
    }

    #[test]
    fn settings_are_listed_once_by_name() {
        let names: Vec<&str> = settings_of(&[Port::TelemetryBus, Port::AlertsBus])
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "ALERTS_STREAM",
                "ALERTS_TOPIC",
                "BUS",
                "KAFKA_BOOTSTRAP_SERVERS",
                "KAFKA_LINGER_MS",
                "KAFKA_SECRET_ARN",
                "TELEMETRY_STREAM",
                "TELEMETRY_TOPIC"
            ]
        );
    }
}
