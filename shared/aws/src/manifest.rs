//! What each function needs from its environment and from IAM, and the DynamoDB schema the
//! adapters rely on: the code's side of the contract with `infra/`.
//!
//! Kept honest from both ends: the emulator tests check that every AWS operation a function is
//! seen to call is listed here, and the infrastructure consistency test checks that Terraform
//! sets every variable, grants every permission and declares every key and index listed here.

/// One IAM permission: an action on a resource, named as Terraform references it
/// (`aws_kinesis_stream.telemetry`, `aws_dynamodb_table.positions/index/geo-index`, or `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    pub action: &'static str,
    pub resource: &'static str,
}

use crate::compose::{settings_of, Port, Setting};

const fn allow(action: &'static str, resource: &'static str) -> Permission {
    Permission { action, resource }
}

#[derive(Debug, Clone, Copy)]
pub struct FunctionManifest {
    /// The function's name: `functions/<name>/`, Terraform `module "<name with _>"`.
    pub name: &'static str,
    /// The ports its `main` builds; they name the environment variables it reads
    /// ([`FunctionManifest::settings`]).
    pub ports: &'static [Port],
    /// AWS operations its adapters send (as counted by [`crate::counting::CallCounter`]).
    pub operations: &'static [&'static str],
    /// What its role must allow for those operations.
    pub permissions: &'static [Permission],
    /// Whether a Kinesis event source mapping on the telemetry stream invokes it (its role then
    /// also needs to read the stream and report failed batches).
    pub reads_telemetry: bool,
}

impl FunctionManifest {
    /// The settings (environment variables) the function reads.
    pub fn settings(&self) -> Vec<Setting> {
        settings_of(self.ports)
    }
}

/// The event source mapping settings Terraform deploys by default (`infra/variables.tf`:
/// `stream_batch_size`, `stream_batching_window_seconds`, `stream_max_retries`,
/// `stream_max_record_age_seconds`, and the
/// archiver's own `archiver_batch_size`, `archiver_batching_window_seconds`); the local runner's
/// AWS backend uses the same, and the consistency check fails when they drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingDefaults {
    pub batch_size: usize,
    pub batching_window_seconds: u64,
    pub max_retries: u32,
    pub max_record_age_seconds: u64,
    /// The archiver writes one object per batch: it takes larger batches.
    pub archiver_batch_size: usize,
    pub archiver_batching_window_seconds: u64,
}

pub const MAPPING_DEFAULTS: MappingDefaults = MappingDefaults {
    batch_size: 100,
    batching_window_seconds: 1,
    max_retries: 5,
    max_record_age_seconds: 21_600,
    archiver_batch_size: 1000,
    archiver_batching_window_seconds: 5,
};

/// The manifest of the function named `name`.
pub fn function(name: &str) -> Option<&'static FunctionManifest> {
    FUNCTIONS.iter().find(|f| f.name == name)
}

pub const FUNCTIONS: &[FunctionManifest] = &[
    FunctionManifest {
        name: "ingest",
        ports: &[
            Port::TelemetryBus,
            Port::MetricNames,
            Port::Access,
            Port::DeviceLimits,
            Port::DeviceSecrets,
        ],
        operations: &[
            "PutRecords",
            "GetSecretValue",
            "BatchGetItem",
            "TransactWriteItems",
        ],
        // Kinesis or Kafka, whichever the deployment's `bus` variable chose.
        permissions: &[
            allow("kinesis:PutRecords", "aws_kinesis_stream.telemetry"),
            allow("secretsmanager:GetSecretValue", "var.kafka_secret_arn"),
            allow("kms:Decrypt", "var.kafka_secret_kms_key_arn"),
            allow("dynamodb:BatchGetItem", "aws_dynamodb_table.metric_names"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.metric_names"),
            allow("dynamodb:UpdateItem", "aws_dynamodb_table.metric_names"),
        ],
        reads_telemetry: false,
    },
    FunctionManifest {
        name: "geo-update",
        ports: &[Port::TelemetryEvents, Port::Positions, Port::DeadLetters],
        operations: &["PutItem", "SendMessageBatch", "PutObject"],
        permissions: &[
            allow("dynamodb:PutItem", "aws_dynamodb_table.positions"),
            allow("sqs:SendMessage", "aws_sqs_queue.dead_letters"),
            allow("s3:PutObject", "aws_s3_bucket.dead_letters/dead-letters/*"),
        ],
        reads_telemetry: true,
    },
    FunctionManifest {
        name: "archiver",
        ports: &[Port::TelemetryEvents, Port::Archive, Port::DeadLetters],
        operations: &[
            "WriteRecords",
            "DescribeEndpoints",
            "PutObject",
            "SendMessageBatch",
        ],
        // Timestream or S3, whichever the deployment's `archive` variable chose.
        permissions: &[
            allow("s3:PutObject", "aws_s3_bucket.archive/readings/*"),
            allow(
                "timestream:WriteRecords",
                "aws_timestreamwrite_table.readings",
            ),
            allow("timestream:DescribeEndpoints", "*"),
            allow("sqs:SendMessage", "aws_sqs_queue.dead_letters"),
            allow("s3:PutObject", "aws_s3_bucket.dead_letters/dead-letters/*"),
        ],
        reads_telemetry: true,
    },
    FunctionManifest {
        name: "anomaly-inspector",
        ports: &[
            Port::TelemetryEvents,
            Port::Rules,
            Port::Alerts,
            Port::AlertsBus,
            Port::DeadLetters,
            Port::Geofences,
            Port::FleetEvents,
            Port::History,
        ],
        operations: &[
            "GetItem",
            "PutItem",
            "BatchWriteItem",
            "TransactWriteItems",
            "UpdateItem",
            "DeleteItem",
            "Scan",
            "PutRecords",
            "GetSecretValue",
            "SendMessageBatch",
            "PutObject",
        ],
        permissions: &[
            allow("dynamodb:GetItem", "aws_dynamodb_table.alert_state"),
            // A state change alone is a conditional PutItem; with alerts, a TransactWriteItems,
            // authorised as the PutItem, UpdateItem and DeleteItem inside it (a delete: an
            // alert a late reading undid).
            allow("dynamodb:PutItem", "aws_dynamodb_table.alert_state"),
            allow("dynamodb:UpdateItem", "aws_dynamodb_table.alerts"),
            allow("dynamodb:DeleteItem", "aws_dynamodb_table.alerts"),
            // The geofence cache: the version item, and the table when it changed.
            allow("dynamodb:GetItem", "aws_dynamodb_table.geofences"),
            allow("dynamodb:Scan", "aws_dynamodb_table.geofences"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.fleet_events"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.geofence_occupants"),
            allow(
                "dynamodb:DeleteItem",
                "aws_dynamodb_table.geofence_occupants",
            ),
            // Trips, stops and minutes as they complete.
            allow("dynamodb:BatchWriteItem", "aws_dynamodb_table.history"),
            allow("kinesis:PutRecords", "aws_kinesis_stream.alerts"),
            allow("secretsmanager:GetSecretValue", "var.kafka_secret_arn"),
            allow("kms:Decrypt", "var.kafka_secret_kms_key_arn"),
            allow("sqs:SendMessage", "aws_sqs_queue.dead_letters"),
            allow("s3:PutObject", "aws_s3_bucket.dead_letters/dead-letters/*"),
        ],
        reads_telemetry: true,
    },
    FunctionManifest {
        name: "query-api",
        ports: &[
            Port::Positions,
            Port::AlertRecords,
            Port::Archive,
            Port::Access,
            Port::Geofences,
            Port::FleetEvents,
            Port::History,
        ],
        operations: &[
            "GetItem",
            "Query",
            "Scan",
            "BatchGetItem",
            "UpdateItem",
            "TransactWriteItems",
            "DeleteItem",
            "DescribeEndpoints",
            "ListObjectsV2",
            "GetObject",
        ],
        permissions: &[
            allow("dynamodb:GetItem", "aws_dynamodb_table.positions"),
            // A circle spanning more index cells than a query reads (near a pole) is scanned.
            allow("dynamodb:Scan", "aws_dynamodb_table.positions"),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.positions/index/geo-index",
            ),
            allow("dynamodb:GetItem", "aws_dynamodb_table.alerts"),
            // The alerts indexes hold keys only: listed alerts are fetched by key.
            allow("dynamodb:BatchGetItem", "aws_dynamodb_table.alerts"),
            allow("dynamodb:UpdateItem", "aws_dynamodb_table.alerts"),
            allow("dynamodb:Query", "aws_dynamodb_table.alerts/index/by-state"),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.alerts/index/by-device",
            ),
            // A geofence written or deleted is one TransactWriteItems with the version item's
            // UpdateItem, authorised as the PutItem or DeleteItem and the UpdateItem inside it.
            allow("dynamodb:GetItem", "aws_dynamodb_table.geofences"),
            allow("dynamodb:Scan", "aws_dynamodb_table.geofences"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.geofences"),
            allow("dynamodb:DeleteItem", "aws_dynamodb_table.geofences"),
            allow("dynamodb:UpdateItem", "aws_dynamodb_table.geofences"),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.fleet_events/index/by-device",
            ),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.fleet_events/index/by-day",
            ),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.fleet_events/index/by-geofence",
            ),
            allow(
                "dynamodb:Query",
                "aws_dynamodb_table.geofence_occupants/index/by-geofence",
            ),
            // A deleted geofence's occupants are forgotten.
            allow(
                "dynamodb:DeleteItem",
                "aws_dynamodb_table.geofence_occupants",
            ),
            allow("dynamodb:Query", "aws_dynamodb_table.history"),
            allow("timestream:Select", "aws_timestreamwrite_table.readings"),
            allow("timestream:DescribeEndpoints", "*"),
            allow("s3:ListBucket", "aws_s3_bucket.archive"),
            allow("s3:GetObject", "aws_s3_bucket.archive/readings/*"),
        ],
        reads_telemetry: false,
    },
    FunctionManifest {
        name: "offline-check",
        ports: &[
            Port::Rules,
            Port::Alerts,
            Port::AlertsBus,
            Port::DeadLetters,
            Port::Geofences,
            Port::FleetEvents,
            Port::Positions,
        ],
        operations: &[
            "Scan",
            "GetItem",
            "PutItem",
            "DeleteItem",
            "PutRecords",
            "GetSecretValue",
            "SendMessageBatch",
            "PutObject",
        ],
        permissions: &[
            // The candidates: a parallel Scan of the positions.
            allow("dynamodb:Scan", "aws_dynamodb_table.positions"),
            // device_offline committed to the rule state alone: a conditional PutItem.
            allow("dynamodb:GetItem", "aws_dynamodb_table.alert_state"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.alert_state"),
            allow("dynamodb:PutItem", "aws_dynamodb_table.fleet_events"),
            // A state's outbox may still hold an enter or exit a failed store left behind.
            allow("dynamodb:PutItem", "aws_dynamodb_table.geofence_occupants"),
            allow(
                "dynamodb:DeleteItem",
                "aws_dynamodb_table.geofence_occupants",
            ),
            allow("kinesis:PutRecords", "aws_kinesis_stream.alerts"),
            allow("secretsmanager:GetSecretValue", "var.kafka_secret_arn"),
            allow("kms:Decrypt", "var.kafka_secret_kms_key_arn"),
            allow("sqs:SendMessage", "aws_sqs_queue.dead_letters"),
            allow("s3:PutObject", "aws_s3_bucket.dead_letters/dead-letters/*"),
        ],
        reads_telemetry: false,
    },
];

/// What an event source mapping needs from the role of a function it invokes: to read the
/// Kinesis stream, or the Kafka brokers' SASL secret, and to report failed batches.
pub const TELEMETRY_READER_PERMISSIONS: &[Permission] = &[
    allow("secretsmanager:GetSecretValue", "var.kafka_secret_arn"),
    allow("kms:Decrypt", "var.kafka_secret_kms_key_arn"),
    allow("kinesis:GetRecords", "aws_kinesis_stream.telemetry"),
    allow("kinesis:GetShardIterator", "aws_kinesis_stream.telemetry"),
    allow("kinesis:DescribeStream", "aws_kinesis_stream.telemetry"),
    allow(
        "kinesis:DescribeStreamSummary",
        "aws_kinesis_stream.telemetry",
    ),
    allow("kinesis:ListShards", "aws_kinesis_stream.telemetry"),
    allow("sqs:SendMessage", "aws_sqs_queue.stream_failures"),
];

/// Attribute type of a key attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    String,
    Number,
}

#[derive(Debug, Clone, Copy)]
pub struct IndexSchema {
    pub name: &'static str,
    pub hash_key: (&'static str, KeyType),
    pub range_key: (&'static str, KeyType),
    pub projection: IndexProjection,
}

/// Which attributes an index copies, as Terraform's `projection_type` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexProjection {
    /// Every attribute: queries answer whole items, and every change of the item is an index
    /// write.
    All,
    /// The keys only: a change of other attributes costs no index write; queries fetch the
    /// items by key.
    KeysOnly,
}

impl IndexProjection {
    pub fn terraform_name(self) -> &'static str {
        match self {
            IndexProjection::All => "ALL",
            IndexProjection::KeysOnly => "KEYS_ONLY",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TableSchema {
    /// Terraform resource label, and the suffix of the table's name after the prefix (with `_`
    /// as `-`).
    pub label: &'static str,
    pub hash_key: (&'static str, KeyType),
    pub range_key: Option<(&'static str, KeyType)>,
    pub indexes: &'static [IndexSchema],
}

impl TableSchema {
    /// The table's name under a prefix, as `ResourceNames::with_prefix` and Terraform name it.
    pub fn name(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.label.replace('_', "-"))
    }
}

pub const TABLES: &[TableSchema] = &[
    TableSchema {
        label: "positions",
        hash_key: ("device_id", KeyType::String),
        range_key: None,
        indexes: &[IndexSchema {
            name: crate::dynamodb::GEO_INDEX,
            hash_key: ("geo_pk", KeyType::String),
            range_key: ("geohash", KeyType::String),
            projection: IndexProjection::All,
        }],
    },
    TableSchema {
        label: "metric_names",
        hash_key: ("name", KeyType::String),
        range_key: None,
        indexes: &[],
    },
    TableSchema {
        label: "alert_state",
        hash_key: ("device_id", KeyType::String),
        range_key: None,
        indexes: &[],
    },
    TableSchema {
        label: "alerts",
        hash_key: ("alert_id", KeyType::String),
        range_key: None,
        indexes: &[
            IndexSchema {
                name: crate::dynamodb::ALERTS_BY_STATE_INDEX,
                hash_key: ("state", KeyType::String),
                range_key: ("started_at", KeyType::Number),
                // An active alert's record changes with every breaching reading: keys only,
                // so that those updates cost one write unit, not three.
                projection: IndexProjection::KeysOnly,
            },
            IndexSchema {
                name: crate::dynamodb::ALERTS_BY_DEVICE_INDEX,
                hash_key: ("device_id", KeyType::String),
                range_key: ("started_at", KeyType::Number),
                projection: IndexProjection::KeysOnly,
            },
        ],
    },
    TableSchema {
        label: "geofences",
        hash_key: ("geofence_id", KeyType::String),
        range_key: None,
        indexes: &[],
    },
    TableSchema {
        label: "fleet_events",
        hash_key: ("event_id", KeyType::String),
        range_key: None,
        // Events are written once and never changed: whole items in every index cost no
        // later write, and a listing needs no second read.
        indexes: &[
            IndexSchema {
                name: crate::fleet::EVENTS_BY_DEVICE_INDEX,
                hash_key: ("device_id", KeyType::String),
                range_key: ("ts", KeyType::Number),
                projection: IndexProjection::All,
            },
            IndexSchema {
                name: crate::fleet::EVENTS_BY_DAY_INDEX,
                hash_key: ("day", KeyType::String),
                range_key: ("ts", KeyType::Number),
                projection: IndexProjection::All,
            },
            IndexSchema {
                name: crate::fleet::EVENTS_BY_GEOFENCE_INDEX,
                hash_key: ("geofence_id", KeyType::String),
                range_key: ("ts", KeyType::Number),
                projection: IndexProjection::All,
            },
        ],
    },
    TableSchema {
        label: "history",
        hash_key: ("device_id", KeyType::String),
        // `{kind}#{start}`: a vehicle's trips, stops or minutes of a time range are one key range.
        range_key: Some(("item_key", KeyType::String)),
        indexes: &[],
    },
    TableSchema {
        label: "geofence_occupants",
        hash_key: ("occupant_id", KeyType::String),
        range_key: None,
        indexes: &[IndexSchema {
            name: crate::fleet::OCCUPANTS_BY_GEOFENCE_INDEX,
            hash_key: ("geofence_id", KeyType::String),
            range_key: ("device_id", KeyType::String),
            projection: IndexProjection::All,
        }],
    },
];
