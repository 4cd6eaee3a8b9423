//! The ports a local stack runs on: the in-memory adapters (embedded backend), or the AWS
//! adapters built by the same composition root as the Lambda mains (AWS backend), with the
//! Kafka bus in place of the backend's stream when asked; and what each stream function's
//! event source mapping reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use geostream_aws::capacity::CapacityMeter;
use geostream_aws::compose::{self, ComposeError, Composition, Port, SettingMap};
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::counting::CallCounter;
use geostream_aws::manifest;
use geostream_aws::provision::{create_resources, queue_url};
use geostream_shared::memory::{
    Backpressure, MemoryAlertStore, MemoryArchive, MemoryDeadLetters, MemoryFleetEvents,
    MemoryGeofences, MemoryHistory, MemoryMetricNames, MemoryPositionStore, MemoryStream,
};
use geostream_shared::ports::{
    AlertStore, Archive, DeadLetterSink, EventBus, FleetEventStore, GeofenceStore, HistoryStore,
    MetricNameRegistry, PositionStore, DEFAULT_MAX_METRIC_NAMES,
};

use crate::config::{AwsBackend, Backend, Bus, KafkaBusConfig, LocalConfig, StoreKind};
use crate::esm::kafka::KafkaTopic;
use crate::esm::memory::MemoryShard;
use crate::esm::{kinesis, Source};

/// The in-memory parts of the embedded backend, for counters, the status page and retention.
#[derive(Clone)]
pub struct MemoryParts {
    pub telemetry: Arc<MemoryStream>,
    pub alert_stream: Arc<MemoryStream>,
    pub positions: Arc<MemoryPositionStore>,
    pub archive: Arc<MemoryArchive>,
    pub alerts: Arc<MemoryAlertStore>,
    pub dead_letters: Arc<MemoryDeadLetters>,
    pub geofences: Arc<MemoryGeofences>,
    pub fleet_events: Arc<MemoryFleetEvents>,
    pub history: Arc<MemoryHistory>,
}

/// The stores of fleet events: geofences, and the events made.
#[derive(Clone)]
pub struct FleetPorts {
    pub geofences: Arc<dyn GeofenceStore>,
    pub events: Arc<dyn FleetEventStore>,
}

/// Where the stream functions' event source mappings read telemetry from.
pub enum TelemetrySource {
    Memory(Arc<MemoryStream>),
    Kinesis {
        client: aws_sdk_kinesis::Client,
        stream: String,
    },
    Kafka(KafkaBusConfig),
}

impl TelemetrySource {
    /// The sources of one function's mapping: its own readers (each mapping keeps its own
    /// checkpoints, as each Lambda event source mapping does).
    pub async fn for_function(&self, function: &str) -> Result<Vec<Arc<dyn Source>>, String> {
        match self {
            TelemetrySource::Memory(stream) => Ok(MemoryShard::all(stream)),
            TelemetrySource::Kinesis { client, stream } => kinesis::shards(client, stream).await,
            TelemetrySource::Kafka(kafka) => {
                let group = format!("{}-{function}", kafka.group_prefix);
                let partitions =
                    KafkaTopic::partition_count(&kafka.settings, &kafka.telemetry_topic).await?;
                (0..partitions)
                    .map(|_| {
                        KafkaTopic::subscribe(&kafka.settings, &kafka.telemetry_topic, &group)
                            .map(|topic| Arc::new(topic) as Arc<dyn Source>)
                    })
                    .collect()
            }
        }
    }

    /// Which bus the stack runs on, as the stats name it.
    pub fn bus_name(&self) -> &'static str {
        match self {
            TelemetrySource::Memory(_) => "memory",
            TelemetrySource::Kinesis { .. } => "kinesis",
            TelemetrySource::Kafka(_) => "kafka",
        }
    }
}

/// The ports a stack runs on.
pub struct Ports {
    pub bus: Arc<dyn EventBus>,
    /// Ingest's registry of free metric names.
    pub metric_names: Arc<dyn MetricNameRegistry>,
    pub alert_bus: Arc<dyn EventBus>,
    pub positions: Arc<dyn PositionStore>,
    pub archive: Arc<dyn Archive>,
    pub alerts: Arc<dyn AlertStore>,
    pub dead_letters: Arc<dyn DeadLetterSink>,
    /// The query API's stores: on the AWS backend built on its own clients (as its Lambda has),
    /// so that what it costs is counted apart; the same stores otherwise.
    pub query: QueryPorts,
    pub telemetry: TelemetrySource,
    /// The anomaly-inspector's fleet-event stores.
    pub fleet: Option<FleetPorts>,
    /// Where the anomaly-inspector writes trips, stops and summaries.
    pub history: Option<Arc<dyn HistoryStore>>,
    /// How often the inspector looks whether the geofences changed.
    pub geofence_refresh: std::time::Duration,
    /// Set on the embedded backend.
    pub memory: Option<MemoryParts>,
    /// Set on the AWS backend: what each function's clients have called and consumed.
    pub aws_usage: Option<AwsUsage>,
}

pub struct QueryPorts {
    pub positions: Arc<dyn PositionStore>,
    pub archive: Arc<dyn Archive>,
    pub alerts: Arc<dyn AlertStore>,
    pub fleet: Option<FleetPorts>,
    pub history: Option<Arc<dyn HistoryStore>>,
}

/// What one function's AWS clients did: requests per operation and capacity units.
#[derive(Clone)]
pub struct FunctionUsage {
    pub function: &'static str,
    pub calls: CallCounter,
    pub capacity: CapacityMeter,
}

/// The name the event source mappings' reads are counted under.
pub const EVENT_SOURCE_MAPPINGS: &str = "event-source-mappings";

/// Per function (as each Lambda has its own clients), plus the dead-letter sink the event
/// source mappings and functions share, and the mappings' own reads of the stream.
#[derive(Clone, Default)]
pub struct AwsUsage {
    pub functions: Vec<FunctionUsage>,
}

impl AwsUsage {
    fn track(&mut self, function: &'static str, clients: &Clients) {
        self.functions.push(FunctionUsage {
            function,
            calls: clients.calls.clone(),
            capacity: clients.capacity.clone(),
        });
    }

    /// Requests per operation, all functions together.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for usage in &self.functions {
            for (operation, count) in usage.calls.snapshot() {
                *total.entry(operation).or_default() += count;
            }
        }
        total
    }
}

/// The ports of `config`'s backend and bus.
pub async fn ports(config: &LocalConfig) -> Result<Ports, String> {
    if let Bus::Kafka(kafka) = &config.bus {
        let partitions = i32::try_from(config.shards.clamp(1, 1024)).unwrap_or(4);
        geostream_kafka::ensure_topics(
            &kafka.settings,
            &[
                (kafka.telemetry_topic.as_str(), partitions),
                (kafka.alerts_topic.as_str(), partitions),
            ],
        )
        .await?;
    }
    match &config.backend {
        Backend::Embedded => {
            let mut ports = embedded_ports(config);
            if let Bus::Kafka(kafka) = &config.bus {
                use_kafka_buses(&mut ports, kafka).await?;
            }
            Ok(ports)
        }
        Backend::Aws(aws) => aws_ports(aws, &config.bus, config.shards).await,
    }
}

/// The longest a publish waits for a slow function: one that is stuck (retrying a batch) must
/// not stop ingest; past it, retention trims and counts, as without a bound.
const STREAM_BACKLOG_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The fleet events the embedded backend keeps (the oldest dropped beyond).
const FLEET_EVENT_CAPACITY: usize = 100_000;

fn embedded_ports(config: &LocalConfig) -> Ports {
    let memory = MemoryParts {
        telemetry: Arc::new(
            MemoryStream::with_byte_limit(
                "geostream-telemetry",
                config.shards,
                config.retention_per_shard,
                config.memory_budget.telemetry_stream(),
            )
            .with_backpressure(Backpressure {
                // A quarter of a shard's retention in records, as in bytes.
                unprocessed_per_shard: (config.retention_per_shard / 4).max(1) as u64,
                unprocessed_bytes_per_shard: config.memory_budget.telemetry_backlog()
                    / config.shards.max(1),
                max_wait: STREAM_BACKLOG_MAX_WAIT,
            }),
        ),
        alert_stream: Arc::new(MemoryStream::with_byte_limit(
            "geostream-alerts",
            config.shards,
            config.retention_per_shard,
            config.memory_budget.alert_stream(),
        )),
        positions: Arc::new(MemoryPositionStore::new()),
        archive: Arc::new(MemoryArchive::with_byte_limit(
            config.archive_per_device,
            config.memory_budget.archive(),
        )),
        alerts: Arc::new(MemoryAlertStore::new()),
        dead_letters: Arc::new(MemoryDeadLetters::new(config.dead_letter_capacity)),
        geofences: Arc::new(MemoryGeofences::new()),
        fleet_events: Arc::new(MemoryFleetEvents::new(FLEET_EVENT_CAPACITY)),
        history: Arc::new(MemoryHistory::with_byte_limit(
            config.memory_budget.history(),
        )),
    };
    Ports {
        bus: memory.telemetry.clone(),
        metric_names: Arc::new(MemoryMetricNames::new(DEFAULT_MAX_METRIC_NAMES)),
        alert_bus: memory.alert_stream.clone(),
        positions: memory.positions.clone(),
        archive: memory.archive.clone(),
        alerts: memory.alerts.clone(),
        dead_letters: memory.dead_letters.clone(),
        query: QueryPorts {
            positions: memory.positions.clone(),
            archive: memory.archive.clone(),
            alerts: memory.alerts.clone(),
            fleet: Some(FleetPorts {
                geofences: memory.geofences.clone(),
                events: memory.fleet_events.clone(),
            }),
            history: Some(memory.history.clone()),
        },
        telemetry: TelemetrySource::Memory(memory.telemetry.clone()),
        fleet: Some(FleetPorts {
            geofences: memory.geofences.clone(),
            events: memory.fleet_events.clone(),
        }),
        history: Some(memory.history.clone()),
        // The embedded store answers its version from memory: looked at on every batch.
        geofence_refresh: std::time::Duration::ZERO,
        memory: Some(memory),
        aws_usage: None,
    }
}

/// Every port the local stack builds through the composition root: all functions' together.
const STACK_PORTS: &[Port] = &[
    Port::TelemetryBus,
    Port::AlertsBus,
    Port::TelemetryEvents,
    Port::Positions,
    Port::Alerts,
    Port::AlertRecords,
    Port::Archive,
    Port::DeadLetters,
];

/// With `--bus kafka`: the bus settings a Lambda function on Kafka finds in its environment,
/// but for the producer's linger: every request the runner takes shares one producer, and
/// gathering 20 ms of them into a produce request (rather than sending each at once, as a
/// Lambda invocation does) cut the broker's CPU per reading by 40-45% at 30,000 readings/s
/// and the POST-to-position p99 with it (docs/performance.md, "The Kafka bus: fewer,
/// compressed produce requests").
fn kafka_settings(settings: SettingMap, kafka: &KafkaBusConfig) -> SettingMap {
    settings
        .set(compose::settings::BUS, "kafka")
        .set(compose::settings::KAFKA_LINGER_MS, RUNNER_KAFKA_LINGER_MS)
        .set(
            compose::settings::KAFKA_BOOTSTRAP_SERVERS,
            &kafka.settings.bootstrap_servers,
        )
        .set(compose::settings::TELEMETRY_TOPIC, &kafka.telemetry_topic)
        .set(compose::settings::ALERTS_TOPIC, &kafka.alerts_topic)
}

const RUNNER_KAFKA_LINGER_MS: &str = "20";

fn composed(error: ComposeError) -> String {
    error.to_string()
}

/// The AWS backend: every function's adapters built by the composition root the Lambda mains
/// use, from the settings Terraform would give them, each function on its own clients (as each
/// Lambda has), so that what each costs is counted apart.
async fn aws_ports(aws: &AwsBackend, bus: &Bus, shards: usize) -> Result<Ports, String> {
    let sdk = sdk_config(aws.endpoint_url.as_deref()).await;
    let setup = Clients::new(&sdk);
    let names = &aws.names;
    let queue_url = if aws.create_resources {
        create_resources(&setup, names, shards.clamp(1, 64) as i32, aws.archive).await?
    } else {
        queue_url(&setup, &names.dead_letter_queue).await?
    };
    let settings = names.settings(aws.archive, &queue_url);
    let settings = match &aws.position_store {
        StoreKind::DynamoDb => settings,
        StoreKind::Valkey { url } => settings
            .set(compose::settings::POSITION_STORE, "valkey")
            .set(compose::settings::VALKEY_URL, url),
    };
    let settings = match &aws.recent_tracks {
        None => settings,
        Some(url) => settings
            .set(compose::settings::RECENT_TRACKS, "valkey")
            .set(compose::settings::VALKEY_URL, url),
    };
    let settings = match &aws.rule_state_store {
        StoreKind::DynamoDb => settings,
        StoreKind::Valkey { url } => settings
            .set(compose::settings::RULE_STATE_STORE, "valkey")
            .set(compose::settings::VALKEY_URL, url),
    };
    let mut usage = AwsUsage::default();
    // Lambda's pollers read the stream, not the functions: their reads are counted apart.
    let pollers = Clients::new(&sdk);
    usage.track(EVENT_SOURCE_MAPPINGS, &pollers);
    let (settings, telemetry) = match bus {
        Bus::Kafka(kafka) => (
            kafka_settings(settings, kafka),
            TelemetrySource::Kafka(kafka.clone()),
        ),
        Bus::Backend => (
            settings,
            TelemetrySource::Kinesis {
                client: pollers.kinesis.clone(),
                stream: names.telemetry_stream.clone(),
            },
        ),
    };
    let mut compose = |function: &'static str| {
        let ports = manifest::function(function).map_or(STACK_PORTS, |f| f.ports);
        let clients = Clients::new(&sdk);
        usage.track(function, &clients);
        Composition::new(function, ports, Box::new(settings.clone()), clients)
    };
    let ingest = compose(geostream_ingest::FUNCTION_NAME);
    let geo_update = compose(geostream_geo_update::FUNCTION_NAME);
    let archiver = compose(geostream_archiver::FUNCTION_NAME);
    let inspector = compose(geostream_anomaly_inspector::FUNCTION_NAME);
    let query_api = compose(geostream_query_api::FUNCTION_NAME);
    // The dead-letter queue is shared by the functions and their mappings' on-failure sends.
    let dead_letters = compose("dead-letters");
    Ok(Ports {
        bus: ingest.telemetry_bus().await.map_err(composed)?,
        metric_names: ingest.metric_names().map_err(composed)?,
        alert_bus: inspector.alerts_bus().await.map_err(composed)?,
        positions: geo_update.positions().await.map_err(composed)?,
        archive: archiver.archive().await.map_err(composed)?,
        alerts: inspector.alerts().await.map_err(composed)?,
        dead_letters: dead_letters.dead_letters().map_err(composed)?,
        query: QueryPorts {
            positions: query_api.positions().await.map_err(composed)?,
            archive: query_api.archive().await.map_err(composed)?,
            alerts: query_api.alert_records().map_err(composed)?,
            fleet: Some(FleetPorts {
                geofences: query_api.geofences().map_err(composed)?,
                events: query_api.fleet_events().map_err(composed)?,
            }),
            history: Some(query_api.history().map_err(composed)?),
        },
        telemetry,
        fleet: Some(FleetPorts {
            geofences: inspector.geofences().map_err(composed)?,
            events: inspector.fleet_events().map_err(composed)?,
        }),
        history: Some(inspector.history().map_err(composed)?),
        geofence_refresh: geostream_anomaly_inspector::GEOFENCE_REFRESH,
        memory: None,
        aws_usage: Some(usage),
    })
}

/// The embedded backend's stores with a Kafka bus: the buses from the composition root (no
/// AWS service is called).
async fn use_kafka_buses(ports: &mut Ports, kafka: &KafkaBusConfig) -> Result<(), String> {
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let composition = Composition::new(
        "geostream-local",
        STACK_PORTS,
        Box::new(kafka_settings(SettingMap::new(), kafka)),
        Clients::new(&sdk),
    );
    ports.bus = composition.telemetry_bus().await.map_err(composed)?;
    ports.alert_bus = composition.alerts_bus().await.map_err(composed)?;
    ports.telemetry = TelemetrySource::Kafka(kafka.clone());
    Ok(())
}
