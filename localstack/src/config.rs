//! What the local stack can be tuned with: where the bus and stores live, which bus, which
//! archive, and the event source mappings' settings.

use std::net::SocketAddr;

pub use geostream_aws::provision::ArchiveKind;
use geostream_aws::provision::ResourceNames;
use geostream_kafka::KafkaSettings;
use geostream_shared::limits::DeviceRateLimit;
use geostream_shared::rules::RuleSet;

use crate::esm::MappingConfig;

/// Where the bus and the stores live.
// Built once at start-up: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Backend {
    /// In this process: nothing else needed.
    Embedded,
    /// Through the AWS SDK: real AWS, or an emulator.
    Aws(AwsBackend),
}

#[derive(Debug, Clone)]
pub struct AwsBackend {
    /// An emulator's endpoint; none for real AWS.
    pub endpoint_url: Option<String>,
    pub names: ResourceNames,
    /// Create the streams, tables, bucket and queue first (for a fresh emulator).
    pub create_resources: bool,
    pub archive: ArchiveKind,
    /// Where latest positions live, as `POSITION_STORE` names it on Lambda.
    pub position_store: StoreKind,
    /// Where the anomaly-inspector keeps rule state, as `RULE_STATE_STORE` names it.
    pub rule_state_store: StoreKind,
    /// With a Valkey URL: the last hour of every vehicle's readings there, in front of the
    /// archive (`RECENT_TRACKS=valkey`).
    pub recent_tracks: Option<String>,
}

/// Where a hot store (positions, rule state) lives: DynamoDB or Valkey.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreKind {
    #[default]
    DynamoDb,
    /// Valkey (ElastiCache Serverless) or Redis at this URL.
    Valkey { url: String },
}

/// Which bus the pipeline runs on.
#[derive(Debug, Clone, Default)]
pub enum Bus {
    /// The backend's own stream: in memory (embedded) or Kinesis (AWS).
    #[default]
    Backend,
    /// A Kafka-compatible broker (Kafka, Redpanda, MSK), with the backend's stores.
    Kafka(KafkaBusConfig),
}

#[derive(Debug, Clone)]
pub struct KafkaBusConfig {
    pub settings: KafkaSettings,
    pub telemetry_topic: String,
    pub alerts_topic: String,
    /// Each stream function consumes as group `PREFIX-FUNCTION`.
    pub group_prefix: String,
}

impl KafkaBusConfig {
    pub fn local(bootstrap_servers: impl Into<String>) -> Self {
        KafkaBusConfig {
            settings: KafkaSettings::plaintext(bootstrap_servers),
            telemetry_topic: "geostream-telemetry".into(),
            alerts_topic: "geostream-alerts".into(),
            group_prefix: "geostream".into(),
        }
    }
}

/// Everything the local stack can be tuned with.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub listen: SocketAddr,
    /// Host names the gateway answers to besides IP addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    pub backend: Backend,
    pub bus: Bus,
    /// Shards of the telemetry stream, or partitions of the Kafka topics.
    pub shards: usize,
    pub retention_per_shard: usize,
    pub archive_per_device: usize,
    /// What the embedded stores and bus may hold (the embedded backend only).
    pub memory_budget: MemoryBudget,
    pub dead_letter_capacity: usize,
    pub mapping: MappingConfig,
    /// The archiver's mapping where it differs from `mapping` (on Lambda it takes larger
    /// batches: it writes one object per batch).
    pub archiver_mapping: Option<MappingConfig>,
    pub rules: RuleSet,
    /// Bearer tokens verified as API Gateway's JWT authorizer does (`--jwks`); without it the
    /// gateway is open: every caller may do everything.
    pub tokens: Option<TokenVerification>,
    /// Per-device request limits (`--device-rate`); none by default, so the simulator's
    /// bench mode is not throttled.
    pub device_limit: Option<DeviceRateLimit>,
    /// Tracker apps' device secrets (`--device-secret-key`); without them the tracker routes
    /// are open, or closed when tokens are verified.
    pub device_secrets: Option<geostream_shared::device_secret::DeviceSecrets>,
    /// How long the embedded backend keeps each kind of data (`--retention KIND=DAYS`).
    pub retention: crate::retention::Retention,
}

/// What the embedded backend's stores and bus may hold in memory, shared out as fixed parts:
/// fifteen thirty-seconds to the archive, an eighth to the telemetry stream, a thirty-second to
/// the alert stream, a sixteenth to trips, stops and summaries. The rest (about 31%) is left for
/// what is not evicted (latest positions, rule states, fleet events, dead letters, the live
/// page) and for the process itself. The archive and the history evict what they took first
/// and the streams trim their oldest records (a reader that had not read them is told how many
/// it missed) to stay within their parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: usize,
}

impl MemoryBudget {
    pub fn from_mib(mib: usize) -> Self {
        MemoryBudget {
            bytes: mib.saturating_mul(1 << 20),
        }
    }

    /// A quarter of the machine's physical memory, at least 256 MiB (2 GiB when the machine
    /// does not say).
    pub fn for_this_machine() -> Self {
        let system = sysinfo::System::new_with_specifics(
            sysinfo::RefreshKind::nothing()
                .with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram()),
        );
        let total = usize::try_from(system.total_memory()).unwrap_or(usize::MAX);
        let bytes = if total == 0 { 2 << 30 } else { total / 4 };
        MemoryBudget {
            bytes: bytes.max(256 << 20),
        }
    }

    pub fn archive(&self) -> usize {
        self.bytes / 32 * 15
    }

    pub fn telemetry_stream(&self) -> usize {
        self.bytes / 8
    }

    /// The bytes of telemetry records the slowest stream function may leave unread before the
    /// gateway's publishes wait for it: a quarter of the stream's part. The stream absorbs a
    /// burst that the anomaly-inspector works off afterwards, as a Kinesis stream does; a
    /// sustained overload reaches the bound long before retention would trim records a function
    /// has not read (docs/performance.md).
    pub fn telemetry_backlog(&self) -> usize {
        self.telemetry_stream() / 4
    }

    pub fn alert_stream(&self) -> usize {
        self.bytes / 32
    }

    pub fn history(&self) -> usize {
        self.bytes / 16
    }
}

/// What verifies the bearer tokens of requests to the local gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenVerification {
    /// A JWKS document with the issuer's signing keys.
    pub jwks: std::path::PathBuf,
    pub issuer: String,
    pub audiences: Vec<String>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allowed_hosts: Vec::new(),
            backend: Backend::Embedded,
            bus: Bus::Backend,
            shards: 4,
            retention_per_shard: 250_000,
            archive_per_device: 2_000,
            memory_budget: MemoryBudget::for_this_machine(),
            dead_letter_capacity: 10_000,
            mapping: MappingConfig::default(),
            archiver_mapping: None,
            rules: RuleSet::default_rules(),
            tokens: None,
            device_limit: None,
            device_secrets: None,
            retention: crate::retention::Retention::default(),
        }
    }
}
