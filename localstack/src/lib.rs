//! `geostream-local`: the whole GeoStream pipeline in one process.
//!
//! The gateway turns each HTTP request into a real API Gateway v2 event for the ingest and
//! query-api handlers; event-source-mapping loops hand real `KinesisEvent` batches from the
//! telemetry stream to geo-update, archiver and anomaly-inspector. On the embedded backend the
//! stream, stores and dead letters are the in-memory adapters of `geostream-shared`; on the AWS
//! backend they are Kinesis, DynamoDB, Timestream and SQS through the AWS SDK (real AWS, or an
//! emulator). A small status page lives at `/`, counters at `/local/stats`, dead letters at
//! `/local/dead-letters`.

pub mod dashboard;
pub mod esm;
pub mod functions;
pub mod gateway;
pub mod kafka_esm;
pub mod live;
pub mod metrics;
pub mod source;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use geostream_anomaly_inspector::AnomalyInspector;
use geostream_archiver::Archiver;
use geostream_aws::compose::{self, Composition, Port, SettingMap};
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::counting::CallCounter;
use geostream_aws::provision::{create_resources, queue_url, ResourceNames};
use geostream_geo_update::GeoUpdate;
use geostream_ingest::Ingest;
use geostream_kafka::KafkaSettings;
use geostream_query_api::QueryApi;
use geostream_shared::memory::{
    MemoryAlertStore, MemoryArchive, MemoryDeadLetters, MemoryPositionStore, MemoryStream,
};
use geostream_shared::model::Position;
use geostream_shared::now_millis;
use geostream_shared::ports::{
    AlertStore, Archive, DeadLetterSink, EventBus, PositionStore, StoreError, UpsertOutcome,
};
use geostream_shared::rules::RuleSet;
use geostream_shared::stream::StreamFunction;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use esm::{start_mapping, MappingConfig, MappingSnapshot, MappingStats};
use metrics::LocalMetrics;
use source::{KinesisSource, MemorySource, ShardSource};

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
}

/// Which archive the archiver writes and the query API reads, as `ARCHIVE` names it on Lambda.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ArchiveKind {
    #[default]
    Timestream,
    /// Hour-partitioned JSON Lines in S3 (the default on AWS, queried with Athena).
    S3,
}

impl ArchiveKind {
    fn setting(self) -> &'static str {
        match self {
            ArchiveKind::Timestream => "timestream",
            ArchiveKind::S3 => "s3",
        }
    }
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
    pub backend: Backend,
    pub bus: Bus,
    /// Shards of the telemetry stream, or partitions of the Kafka topics.
    pub shards: usize,
    pub retention_per_shard: usize,
    pub archive_per_device: usize,
    pub dead_letter_capacity: usize,
    pub mapping: MappingConfig,
    pub rules: RuleSet,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            backend: Backend::Embedded,
            bus: Bus::Backend,
            shards: 4,
            retention_per_shard: 250_000,
            archive_per_device: 2_000,
            dead_letter_capacity: 10_000,
            mapping: MappingConfig::default(),
            rules: RuleSet::default_rules(),
        }
    }
}

/// The position store, measuring for each applied position how long ago the gateway received
/// the request that carried it: the POST-to-position latency.
pub struct MeasuredPositions {
    inner: Arc<dyn PositionStore>,
    latency_ms: Mutex<Histogram<u64>>,
    latest: Option<Mutex<HashMap<String, Position>>>,
}

impl MeasuredPositions {
    /// `keep_latest`: also keep each vehicle's latest applied position, for the live page where
    /// the store itself cannot list them cheaply (DynamoDB).
    fn new(inner: Arc<dyn PositionStore>, keep_latest: bool) -> Self {
        MeasuredPositions {
            inner,
            latency_ms: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
            ),
            latest: keep_latest.then(|| Mutex::new(HashMap::new())),
        }
    }

    /// The latest position of every vehicle this runner has written, when kept.
    pub fn latest(&self) -> Option<Vec<Position>> {
        self.latest.as_ref().map(|latest| {
            latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect()
        })
    }

    pub fn latency(&self) -> LatencySnapshot {
        let histogram = self.latency_ms.lock().unwrap_or_else(|p| p.into_inner());
        LatencySnapshot {
            samples: histogram.len(),
            p50_ms: histogram.value_at_quantile(0.5),
            p90_ms: histogram.value_at_quantile(0.9),
            p99_ms: histogram.value_at_quantile(0.99),
            max_ms: histogram.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    pub samples: u64,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

#[async_trait]
impl PositionStore for MeasuredPositions {
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
        let received_at = position.received_at;
        let kept = self.latest.as_ref().map(|_| position.clone());
        let outcome = self.inner.upsert_if_newer(position).await?;
        if outcome == UpsertOutcome::Applied {
            if let (Some(latest), Some(position)) = (&self.latest, kept) {
                latest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(position.device_id.clone(), position);
            }
            let elapsed = (now_millis() - received_at).max(1) as u64;
            let _ = self
                .latency_ms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(elapsed);
        }
        Ok(outcome)
    }
    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError> {
        self.inner.get(device_id).await
    }
    async fn query_prefixes(&self, prefixes: &[String]) -> Result<Vec<Position>, StoreError> {
        self.inner.query_prefixes(prefixes).await
    }
}

/// The in-memory parts of the embedded backend, for counters and the status page.
pub struct MemoryParts {
    pub telemetry: Arc<MemoryStream>,
    pub alert_stream: Arc<MemoryStream>,
    pub positions: Arc<MemoryPositionStore>,
    pub archive: Arc<MemoryArchive>,
    pub alerts: Arc<MemoryAlertStore>,
    pub dead_letters: Arc<MemoryDeadLetters>,
}

/// The handlers of one local stack and what they run on.
pub struct Stack {
    pub ingest: Ingest,
    pub query_api: QueryApi,
    pub positions: Arc<MeasuredPositions>,
    /// The telemetry stream the mappings read; none on the Kafka bus.
    pub telemetry_source: Option<Arc<dyn ShardSource>>,
    pub mappings: Vec<(String, Arc<MappingStats>)>,
    /// Set on the embedded backend.
    pub memory: Option<MemoryParts>,
    /// Set on the AWS backend: API calls made so far, per operation.
    pub aws_calls: Option<CallCounter>,
    /// Which bus the stack runs on: memory, kinesis or kafka.
    pub bus: &'static str,
    /// What the functions measured, as short series.
    pub metrics: Arc<LocalMetrics>,
    /// The alert store, for the live page's alerts feed.
    pub alerts: Arc<dyn AlertStore>,
    /// Turns true when the stack stops (the live page's streams end then).
    pub shutdown: watch::Receiver<bool>,
    pub started: Instant,
}

#[derive(Debug, Serialize)]
pub struct StackStats {
    pub uptime_s: f64,
    pub backend: &'static str,
    pub bus: &'static str,
    pub telemetry_records: Option<u64>,
    pub alert_transitions: Option<u64>,
    pub positions: Option<usize>,
    pub archived_readings: Option<usize>,
    pub dead_letters: Option<u64>,
    pub mappings: Vec<MappingSnapshot>,
    pub post_to_position: LatencySnapshot,
    pub aws_calls: Option<BTreeMap<String, u64>>,
}

impl Stack {
    pub fn stats(&self) -> StackStats {
        let memory = self.memory.as_ref();
        StackStats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            backend: if memory.is_some() { "embedded" } else { "aws" },
            bus: self.bus,
            // Counted on the in-memory streams only.
            telemetry_records: memory
                .filter(|_| self.bus == "memory")
                .map(|m| m.telemetry.tips().iter().sum()),
            alert_transitions: memory
                .filter(|_| self.bus == "memory")
                .map(|m| m.alert_stream.tips().iter().sum()),
            positions: memory.map(|m| m.positions.len()),
            archived_readings: memory.map(|m| m.archive.len()),
            dead_letters: memory.map(|m| m.dead_letters.snapshot().1),
            mappings: self
                .mappings
                .iter()
                .map(|(name, stats)| stats.snapshot(name, self.telemetry_source.as_deref()))
                .collect(),
            post_to_position: self.positions.latency(),
            aws_calls: self.aws_calls.as_ref().map(CallCounter::snapshot),
        }
    }

    /// Whether the runner sees the end of the stream it reads (not on the Kafka bus, where the
    /// broker's own tools report consumer lag).
    pub fn measures_lag(&self) -> bool {
        self.telemetry_source.is_some()
    }

    /// True when every stream function has processed every record on the stream.
    pub fn drained(&self) -> bool {
        self.mappings.iter().all(|(name, stats)| {
            stats.snapshot(name, self.telemetry_source.as_deref()).lag == Some(0)
        })
    }
}

/// On the Kafka bus, how long the stream functions must go without records to count as caught
/// up (see [`RunningStack::wait_drained`]).
pub const KAFKA_QUIET: Duration = Duration::from_secs(2);

/// A started stack: its address, its parts, and the handle to stop it.
pub struct RunningStack {
    pub addr: SocketAddr,
    pub stack: Arc<Stack>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningStack {
    /// Waits until every stream function has caught up, at most `timeout`; false on time-out.
    /// On the Kafka bus the runner cannot see the end of the topic (the broker's own tools
    /// report consumer lag), so there "caught up" means: no stream function has been handed a
    /// record for [`KAFKA_QUIET`].
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let processed = || -> u64 {
            self.stack
                .mappings
                .iter()
                .map(|(_, stats)| stats.records.load(std::sync::atomic::Ordering::Relaxed))
                .sum()
        };
        let (mut last_count, mut last_change) = (processed(), Instant::now());
        while Instant::now() < deadline {
            if self.stack.measures_lag() {
                if self.stack.drained() {
                    return true;
                }
            } else {
                let count = processed();
                if count != last_count {
                    (last_count, last_change) = (count, Instant::now());
                } else if last_change.elapsed() >= KAFKA_QUIET {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Stops the gateway and the mapping loops (each finishes its batch in flight).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The ports a stack runs on.
struct Ports {
    bus: Arc<dyn EventBus>,
    alert_bus: Arc<dyn EventBus>,
    positions: Arc<dyn PositionStore>,
    archive: Arc<dyn Archive>,
    alerts: Arc<dyn AlertStore>,
    dead_letters: Arc<dyn DeadLetterSink>,
    telemetry_source: Option<Arc<dyn ShardSource>>,
    memory: Option<MemoryParts>,
    aws_calls: Option<CallCounter>,
}

fn embedded_ports(config: &LocalConfig) -> Ports {
    let memory = MemoryParts {
        telemetry: Arc::new(MemoryStream::new(
            "geostream-telemetry",
            config.shards,
            config.retention_per_shard,
        )),
        alert_stream: Arc::new(MemoryStream::new(
            "geostream-alerts",
            config.shards,
            config.retention_per_shard,
        )),
        positions: Arc::new(MemoryPositionStore::new()),
        archive: Arc::new(MemoryArchive::new(config.archive_per_device)),
        alerts: Arc::new(MemoryAlertStore::new()),
        dead_letters: Arc::new(MemoryDeadLetters::new(config.dead_letter_capacity)),
    };
    Ports {
        bus: memory.telemetry.clone(),
        alert_bus: memory.alert_stream.clone(),
        positions: memory.positions.clone(),
        archive: memory.archive.clone(),
        alerts: memory.alerts.clone(),
        dead_letters: memory.dead_letters.clone(),
        telemetry_source: Some(Arc::new(MemorySource::new(memory.telemetry.clone()))),
        memory: Some(memory),
        aws_calls: None,
    }
}

/// Every port the local stack builds through the composition root: all functions' together.
const STACK_PORTS: &[Port] = &[
    Port::TelemetryBus,
    Port::AlertsBus,
    Port::TelemetryEvents,
    Port::Positions,
    Port::Alerts,
    Port::Archive,
    Port::DeadLetters,
];

/// With `--bus kafka`: the bus settings a Lambda function on Kafka finds in its environment.
fn kafka_settings(settings: SettingMap, kafka: &KafkaBusConfig) -> SettingMap {
    settings
        .set(compose::settings::BUS, "kafka")
        .set(
            compose::settings::KAFKA_BOOTSTRAP_SERVERS,
            &kafka.settings.bootstrap_servers,
        )
        .set(compose::settings::TELEMETRY_TOPIC, &kafka.telemetry_topic)
        .set(compose::settings::ALERTS_TOPIC, &kafka.alerts_topic)
}

/// The AWS backend: every adapter built by the composition root the Lambda mains use, from
/// the settings Terraform would give them.
async fn aws_ports(aws: &AwsBackend, bus: &Bus, shards: usize) -> Result<Ports, String> {
    let sdk = sdk_config(aws.endpoint_url.as_deref()).await;
    let clients = Clients::new(&sdk);
    let names = &aws.names;
    let queue_url = if aws.create_resources {
        create_resources(&clients, names, shards.clamp(1, 64) as i32).await?
    } else {
        queue_url(&clients, &names.dead_letter_queue).await?
    };
    let settings = names.settings(aws.archive.setting(), &queue_url);
    let settings = match bus {
        Bus::Kafka(kafka) => kafka_settings(settings, kafka),
        Bus::Backend => settings,
    };
    let ports = Composition::new(
        "geostream-local",
        STACK_PORTS,
        Box::new(settings),
        clients.clone(),
    );
    let error = |e: compose::ComposeError| e.to_string();
    Ok(Ports {
        bus: ports.telemetry_bus().await.map_err(error)?,
        alert_bus: ports.alerts_bus().await.map_err(error)?,
        positions: ports.positions().map_err(error)?,
        archive: ports.archive().map_err(error)?,
        alerts: ports.alerts().map_err(error)?,
        dead_letters: ports.dead_letters().map_err(error)?,
        telemetry_source: match bus {
            Bus::Backend => Some(Arc::new(
                KinesisSource::new(clients.kinesis.clone(), &names.telemetry_stream).await?,
            )),
            Bus::Kafka(_) => None,
        },
        memory: None,
        aws_calls: Some(clients.calls.clone()),
    })
}

/// The embedded backend's stores with a Kafka bus: the buses from the composition root (no
/// AWS service is called).
async fn kafka_buses(ports: &mut Ports, kafka: &KafkaBusConfig) -> Result<(), String> {
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let composition = Composition::new(
        "geostream-local",
        STACK_PORTS,
        Box::new(kafka_settings(SettingMap::new(), kafka)),
        Clients::new(&sdk),
    );
    let error = |e: compose::ComposeError| e.to_string();
    ports.bus = composition.telemetry_bus().await.map_err(error)?;
    ports.alert_bus = composition.alerts_bus().await.map_err(error)?;
    ports.telemetry_source = None;
    Ok(())
}

/// Builds the stack on its backend and starts serving on `config.listen` (port 0 picks a free
/// port).
pub async fn start(config: LocalConfig) -> Result<RunningStack, String> {
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
    let ports = match &config.backend {
        Backend::Embedded => {
            let mut ports = embedded_ports(&config);
            if let Bus::Kafka(kafka) = &config.bus {
                kafka_buses(&mut ports, kafka).await?;
            }
            ports
        }
        Backend::Aws(aws) => aws_ports(aws, &config.bus, config.shards).await?,
    };
    let positions = Arc::new(MeasuredPositions::new(
        ports.positions.clone(),
        ports.memory.is_none(),
    ));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(LocalMetrics::new());

    let stream_functions: Vec<Arc<dyn StreamFunction>> = vec![
        Arc::new(GeoUpdate::new(
            positions.clone(),
            ports.dead_letters.clone(),
        )),
        Arc::new(Archiver::new(
            ports.archive.clone(),
            ports.dead_letters.clone(),
        )),
        Arc::new(AnomalyInspector::new(
            Arc::new(config.rules.clone()),
            ports.alerts.clone(),
            ports.alert_bus.clone(),
            ports.dead_letters.clone(),
        )),
    ];
    let mut tasks = Vec::new();
    let mut mappings = Vec::new();
    for function in stream_functions {
        let name = function.name().to_string();
        let (stats, loops) = match (&config.bus, &ports.telemetry_source) {
            (Bus::Kafka(kafka), _) => {
                let (stats, task) = kafka_esm::start_kafka_mapping(
                    function,
                    metrics.clone(),
                    &kafka.settings,
                    &kafka.telemetry_topic,
                    &format!("{}-{name}", kafka.group_prefix),
                    config.mapping.clone(),
                    ports.dead_letters.clone(),
                    shutdown_rx.clone(),
                )?;
                (stats, vec![task])
            }
            (Bus::Backend, Some(source)) => start_mapping(
                Arc::new(functions::Invoked {
                    function,
                    metrics: metrics.clone(),
                }),
                source.clone(),
                config.mapping.clone(),
                ports.dead_letters.clone(),
                shutdown_rx.clone(),
            ),
            (Bus::Backend, None) => {
                return Err("the backend has no telemetry stream to read".into())
            }
        };
        mappings.push((name, stats));
        tasks.extend(loops);
    }

    let stack = Arc::new(Stack {
        ingest: Ingest::new(ports.bus.clone()),
        query_api: QueryApi::new(
            positions.clone(),
            ports.archive.clone(),
            ports.alerts.clone(),
        ),
        positions,
        telemetry_source: ports.telemetry_source.clone(),
        mappings,
        memory: ports.memory,
        aws_calls: ports.aws_calls,
        bus: match &config.bus {
            Bus::Kafka(_) => "kafka",
            Bus::Backend if matches!(config.backend, Backend::Embedded) => "memory",
            Bus::Backend => "kinesis",
        },
        metrics,
        alerts: ports.alerts.clone(),
        shutdown: shutdown_rx.clone(),
        started: Instant::now(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = gateway::router(stack.clone());
    let mut server_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let serve = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = server_shutdown.wait_for(|stop| *stop).await;
        });
        if let Err(error) = serve.await {
            tracing::error!(%error, "gateway stopped with an error");
        }
    }));
    tracing::info!(%addr, "geostream-local serving");
    Ok(RunningStack {
        addr,
        stack,
        shutdown,
        tasks,
    })
}
