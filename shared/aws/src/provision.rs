//! Resource names from the environment, and creation of the resources for emulators and
//! tests (on AWS, Terraform creates them).

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use aws_sdk_kinesis::types::{StreamMode, StreamModeDetails};

use crate::compose::{settings, SettingMap};
use crate::config::Clients;
use crate::manifest::{self, MAPPING_DEFAULTS, TABLES};

/// Which archive the archiver writes and the query API reads, as `ARCHIVE` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ArchiveKind {
    #[default]
    Timestream,
    /// Hour-partitioned JSON Lines in S3 (the default on AWS, queried with Athena).
    S3,
}

impl ArchiveKind {
    /// As `ARCHIVE` names it.
    pub fn setting(self) -> &'static str {
        match self {
            ArchiveKind::Timestream => "timestream",
            ArchiveKind::S3 => "s3",
        }
    }
}

/// The names of every resource GeoStream uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceNames {
    pub telemetry_stream: String,
    pub alerts_stream: String,
    pub positions_table: String,
    pub alert_state_table: String,
    pub alerts_table: String,
    pub metric_names_table: String,
    pub geofences_table: String,
    pub fleet_events_table: String,
    pub geofence_occupants_table: String,
    pub history_table: String,
    pub timestream_database: String,
    pub timestream_table: String,
    pub archive_bucket: String,
    pub dead_letter_queue: String,
    pub dead_letter_bucket: String,
    /// Lambda's on-failure destination of the event source mappings (shard and sequence range
    /// of the batches they gave up on).
    pub stream_failures_queue: String,
}

impl ResourceNames {
    /// Names with a common prefix, e.g. `geostream-dev` (tests use a fresh prefix each run).
    pub fn with_prefix(prefix: &str) -> ResourceNames {
        ResourceNames {
            telemetry_stream: format!("{prefix}-telemetry"),
            alerts_stream: format!("{prefix}-alerts"),
            positions_table: format!("{prefix}-positions"),
            alert_state_table: format!("{prefix}-alert-state"),
            alerts_table: format!("{prefix}-alerts"),
            metric_names_table: format!("{prefix}-metric-names"),
            geofences_table: format!("{prefix}-geofences"),
            fleet_events_table: format!("{prefix}-fleet-events"),
            geofence_occupants_table: format!("{prefix}-geofence-occupants"),
            history_table: format!("{prefix}-history"),
            timestream_database: format!("{prefix}-archive"),
            timestream_table: "readings".to_string(),
            archive_bucket: format!("{prefix}-archive"),
            dead_letter_queue: format!("{prefix}-dead-letters"),
            dead_letter_bucket: format!("{prefix}-dead-letters"),
            stream_failures_queue: format!("{prefix}-stream-failures"),
        }
    }
}

impl ResourceNames {
    /// The settings Terraform gives the functions for these resources, on the Kinesis bus
    /// with the archive `archive`: the unused archive's settings empty, as there.
    pub fn settings(&self, archive: ArchiveKind, dead_letter_queue_url: &str) -> SettingMap {
        let if_archive = |kind: ArchiveKind, value: &str| {
            if archive == kind {
                value.to_string()
            } else {
                String::new()
            }
        };
        SettingMap::new()
            .set(settings::BUS, "kinesis")
            .set(settings::TELEMETRY_STREAM, &self.telemetry_stream)
            .set(settings::TELEMETRY_TOPIC, "")
            .set(settings::ALERTS_STREAM, &self.alerts_stream)
            .set(settings::ALERTS_TOPIC, "")
            .set(settings::KAFKA_BOOTSTRAP_SERVERS, "")
            .set(settings::KAFKA_SECRET_ARN, "")
            .set(settings::POSITION_STORE, "dynamodb")
            .set(settings::POSITIONS_TABLE, &self.positions_table)
            .set(settings::VALKEY_URL, "")
            .set(settings::ALERT_STATE_TABLE, &self.alert_state_table)
            .set(settings::ALERTS_TABLE, &self.alerts_table)
            .set(settings::RULE_STATE_STORE, "dynamodb")
            .set(settings::METRIC_NAMES_TABLE, &self.metric_names_table)
            .set(
                settings::MAX_METRIC_NAMES,
                geostream_shared::ports::DEFAULT_MAX_METRIC_NAMES.to_string(),
            )
            // Terraform says jwt; the runner's gateway verifies tokens itself (--jwks) and sets
            // its handlers' policy, and the tests of the Lambda binaries set jwt themselves.
            .set(settings::AUTHORIZATION, "none")
            .set(settings::JWT_ISSUER, "")
            .set(settings::JWT_AUDIENCES, "")
            .set(settings::JWKS_URL, "")
            .set(settings::DEVICE_CLAIM, "sub")
            .set(settings::DEVICE_RATE_PER_SECOND, "2")
            .set(settings::DEVICE_RATE_BURST, "20")
            // Terraform's default: no tracker apps (no key, nobody revoked).
            .set(settings::DEVICE_SECRET_KEY, "")
            .set(settings::REVOKED_DEVICES, "")
            .set(settings::SCOPE_TELEMETRY_WRITE, "telemetry:write")
            .set(settings::SCOPE_TELEMETRY_WRITE_ANY, "telemetry:write:any")
            .set(settings::SCOPE_FLEET_READ, "fleet:read")
            .set(settings::SCOPE_ALERTS_ACK, "alerts:ack")
            .set(settings::SCOPE_GEOFENCES_WRITE, "geofences:write")
            .set(settings::GEOFENCES_TABLE, &self.geofences_table)
            .set(settings::FLEET_EVENTS_TABLE, &self.fleet_events_table)
            .set(
                settings::GEOFENCE_OCCUPANTS_TABLE,
                &self.geofence_occupants_table,
            )
            .set(
                settings::FLEET_EVENT_RETENTION_DAYS,
                crate::fleet::DEFAULT_EVENT_RETENTION_DAYS.to_string(),
            )
            .set(settings::HISTORY_TABLE, &self.history_table)
            .set(
                settings::POSITION_RETENTION_DAYS,
                crate::compose::DEFAULT_RETENTION_DAYS.to_string(),
            )
            .set(
                settings::ALERT_RETENTION_DAYS,
                crate::compose::DEFAULT_RETENTION_DAYS.to_string(),
            )
            .set(
                settings::HISTORY_RETENTION_DAYS,
                crate::history::DEFAULT_HISTORY_RETENTION_DAYS.to_string(),
            )
            .set(settings::ARCHIVE, archive.setting())
            .set(settings::RECENT_TRACKS, "none")
            .set(
                settings::ARCHIVE_BUCKET,
                if_archive(ArchiveKind::S3, &self.archive_bucket),
            )
            .set(
                settings::TIMESTREAM_DATABASE,
                if_archive(ArchiveKind::Timestream, &self.timestream_database),
            )
            .set(
                settings::TIMESTREAM_TABLE,
                if_archive(ArchiveKind::Timestream, &self.timestream_table),
            )
            .set(settings::DEAD_LETTER_QUEUE_URL, dead_letter_queue_url)
            .set(settings::DEAD_LETTER_BUCKET, &self.dead_letter_bucket)
            .set(
                settings::STREAM_MAX_RETRIES,
                MAPPING_DEFAULTS.max_retries.to_string(),
            )
            .set(
                settings::STREAM_MAX_RECORD_AGE_SECONDS,
                MAPPING_DEFAULTS.max_record_age_seconds.to_string(),
            )
    }
}

/// Waits until the streams are ACTIVE (seconds on AWS, at once on emulators), at most 120 s.
async fn wait_for_streams(clients: &Clients, streams: &[&String]) -> Result<(), String> {
    for stream in streams {
        for _ in 0..240 {
            let summary = clients
                .kinesis
                .describe_stream_summary()
                .stream_name(stream.as_str())
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "describing {stream}: {}",
                        aws_sdk_kinesis::error::DisplayErrorContext(&e)
                    )
                })?;
            let status = summary
                .stream_description_summary()
                .map(|d| d.stream_status().clone());
            if status == Some(aws_sdk_kinesis::types::StreamStatus::Active) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

fn key(name: &str, key_type: KeyType) -> Result<KeySchemaElement, String> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .map_err(|e| e.to_string())
}

fn attribute((name, kind): (&str, manifest::KeyType)) -> Result<AttributeDefinition, String> {
    let kind = match kind {
        manifest::KeyType::String => ScalarAttributeType::S,
        manifest::KeyType::Number => ScalarAttributeType::N,
    };
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| e.to_string())
}

fn index(schema: &manifest::IndexSchema) -> Result<GlobalSecondaryIndex, String> {
    let projection = match schema.projection {
        manifest::IndexProjection::All => ProjectionType::All,
        manifest::IndexProjection::KeysOnly => ProjectionType::KeysOnly,
    };
    GlobalSecondaryIndex::builder()
        .index_name(schema.name)
        .key_schema(key(schema.hash_key.0, KeyType::Hash)?)
        .key_schema(key(schema.range_key.0, KeyType::Range)?)
        .projection(Projection::builder().projection_type(projection).build())
        .build()
        .map_err(|e| e.to_string())
}

/// Creates the streams, tables, the archive (a Timestream database and table, or the bucket),
/// the dead-letter bucket and the dead-letter and stream-failures queues; returns the
/// dead-letter queue URL. For emulators and tests. The Timestream resources are made only for
/// that archive: LocalStack's community tier has no Timestream.
pub async fn create_resources(
    clients: &Clients,
    names: &ResourceNames,
    shards: i32,
    archive: ArchiveKind,
) -> Result<String, String> {
    let context = |what: &str, e: &dyn std::fmt::Display| format!("creating {what}: {e}");
    for stream in [&names.telemetry_stream, &names.alerts_stream] {
        clients
            .kinesis
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .stream_mode_details(
                StreamModeDetails::builder()
                    .stream_mode(StreamMode::Provisioned)
                    .build()
                    .map_err(|e| e.to_string())?,
            )
            .send()
            .await
            .map_err(|e| context(stream, &aws_sdk_kinesis::error::DisplayErrorContext(&e)))?;
    }
    wait_for_streams(clients, &[&names.telemetry_stream, &names.alerts_stream]).await?;
    let table_names = [
        &names.positions_table,
        &names.metric_names_table,
        &names.alert_state_table,
        &names.alerts_table,
        &names.geofences_table,
        &names.fleet_events_table,
        &names.history_table,
        &names.geofence_occupants_table,
    ];
    for (schema, table) in TABLES.iter().zip(table_names) {
        let mut attributes = vec![attribute(schema.hash_key)?];
        if let Some(range_key) = schema.range_key {
            attributes.push(attribute(range_key)?);
        }
        let mut indexes = Vec::new();
        for index_schema in schema.indexes {
            for key in [index_schema.hash_key, index_schema.range_key] {
                if !attributes.iter().any(|a| a.attribute_name() == key.0) {
                    attributes.push(attribute(key)?);
                }
            }
            indexes.push(index(index_schema)?);
        }
        clients
            .dynamodb
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(match schema.range_key {
                Some(range_key) => Some(vec![
                    key(schema.hash_key.0, KeyType::Hash)?,
                    key(range_key.0, KeyType::Range)?,
                ]),
                None => Some(vec![key(schema.hash_key.0, KeyType::Hash)?]),
            })
            .set_attribute_definitions(Some(attributes))
            .set_global_secondary_indexes((!indexes.is_empty()).then_some(indexes))
            .send()
            .await
            .map_err(|e| context(table, &aws_sdk_dynamodb::error::DisplayErrorContext(&e)))?;
    }
    if archive == ArchiveKind::Timestream {
        create_timestream_table(clients, names).await?;
    }
    let buckets = match archive {
        ArchiveKind::Timestream => vec![&names.dead_letter_bucket],
        ArchiveKind::S3 => vec![&names.archive_bucket, &names.dead_letter_bucket],
    };
    for bucket in buckets {
        clients
            .s3
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| context(bucket, &aws_sdk_s3::error::DisplayErrorContext(&e)))?;
    }
    clients
        .sqs
        .create_queue()
        .queue_name(&names.stream_failures_queue)
        .send()
        .await
        .map_err(|e| {
            context(
                &names.stream_failures_queue,
                &aws_sdk_sqs::error::DisplayErrorContext(&e),
            )
        })?;
    let queue = clients
        .sqs
        .create_queue()
        .queue_name(&names.dead_letter_queue)
        .send()
        .await
        .map_err(|e| {
            context(
                &names.dead_letter_queue,
                &aws_sdk_sqs::error::DisplayErrorContext(&e),
            )
        })?;
    queue
        .queue_url()
        .map(str::to_string)
        .ok_or_else(|| "CreateQueue answered without a queue URL".to_string())
}

async fn create_timestream_table(clients: &Clients, names: &ResourceNames) -> Result<(), String> {
    let context = |what: &str, e: &dyn std::fmt::Display| format!("creating {what}: {e}");
    clients
        .timestream_write
        .create_database()
        .database_name(&names.timestream_database)
        .send()
        .await
        .map_err(|e| {
            context(
                &names.timestream_database,
                &aws_sdk_timestreamwrite::error::DisplayErrorContext(&e),
            )
        })?;
    clients
        .timestream_write
        .create_table()
        .database_name(&names.timestream_database)
        .table_name(&names.timestream_table)
        .send()
        .await
        .map_err(|e| {
            context(
                &names.timestream_table,
                &aws_sdk_timestreamwrite::error::DisplayErrorContext(&e),
            )
        })?;
    Ok(())
}

/// The URL of an existing queue, by name.
pub async fn queue_url(clients: &Clients, queue: &str) -> Result<String, String> {
    let output = clients
        .sqs
        .get_queue_url()
        .queue_name(queue)
        .send()
        .await
        .map_err(|e| {
            format!(
                "GetQueueUrl {queue}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })?;
    output
        .queue_url()
        .map(str::to_string)
        .ok_or_else(|| format!("GetQueueUrl {queue} answered without a URL"))
}
