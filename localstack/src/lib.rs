//! `geostream-local`: the whole GeoStream pipeline in one process.
//!
//! The gateway turns each HTTP request into a real API Gateway v2 event for the ingest and
//! query-api handlers; event-source-mapping loops hand real `KinesisEvent` batches from the
//! in-memory telemetry stream to geo-update, archiver and anomaly-inspector; stores, buses and
//! dead letters are the in-memory adapters of `geostream-shared`. A small status page lives at
//! `/`, counters at `/local/stats`, dead letters at `/local/dead-letters`.

pub mod esm;
pub mod functions;
pub mod gateway;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use geostream_anomaly_inspector::AnomalyInspector;
use geostream_archiver::Archiver;
use geostream_geo_update::GeoUpdate;
use geostream_ingest::Ingest;
use geostream_query_api::QueryApi;
use geostream_shared::memory::{
    MemoryAlertStore, MemoryArchive, MemoryDeadLetters, MemoryPositionStore, MemoryStream,
};
use geostream_shared::model::Position;
use geostream_shared::now_millis;
use geostream_shared::ports::{PositionStore, StoreError, UpsertOutcome};
use geostream_shared::rules::RuleSet;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use esm::{start_mapping, MappingConfig, MappingSnapshot, MappingStats};

/// Everything the embedded stack can be tuned with.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub listen: SocketAddr,
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
    inner: Arc<MemoryPositionStore>,
    latency_ms: Mutex<Histogram<u64>>,
}

impl MeasuredPositions {
    fn new(inner: Arc<MemoryPositionStore>) -> Self {
        MeasuredPositions {
            inner,
            latency_ms: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
            ),
        }
    }

    pub fn store(&self) -> &MemoryPositionStore {
        &self.inner
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
        let outcome = self.inner.upsert_if_newer(position).await?;
        if outcome == UpsertOutcome::Applied {
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

/// The handlers and in-memory adapters of one embedded stack.
pub struct Stack {
    pub ingest: Ingest,
    pub query_api: QueryApi,
    pub positions: Arc<MeasuredPositions>,
    pub archive: Arc<MemoryArchive>,
    pub alerts: Arc<MemoryAlertStore>,
    pub telemetry: Arc<MemoryStream>,
    pub alert_stream: Arc<MemoryStream>,
    pub dead_letters: Arc<MemoryDeadLetters>,
    pub mappings: Vec<(String, Arc<MappingStats>)>,
    pub started: Instant,
}

#[derive(Debug, Serialize)]
pub struct StackStats {
    pub uptime_s: f64,
    pub telemetry_records: u64,
    pub alert_transitions: u64,
    pub positions: usize,
    pub archived_readings: usize,
    pub dead_letters: u64,
    pub mappings: Vec<MappingSnapshot>,
    pub post_to_position: LatencySnapshot,
}

impl Stack {
    pub fn stats(&self) -> StackStats {
        StackStats {
            uptime_s: self.started.elapsed().as_secs_f64(),
            telemetry_records: self.telemetry.tips().iter().sum(),
            alert_transitions: self.alert_stream.tips().iter().sum(),
            positions: self.positions.store().len(),
            archived_readings: self.archive.len(),
            dead_letters: self.dead_letters.snapshot().1,
            mappings: self
                .mappings
                .iter()
                .map(|(name, stats)| stats.snapshot(name, &self.telemetry))
                .collect(),
            post_to_position: self.positions.latency(),
        }
    }

    /// True when every stream function has processed every record on the stream.
    pub fn drained(&self) -> bool {
        self.mappings
            .iter()
            .all(|(name, stats)| stats.snapshot(name, &self.telemetry).lag == 0)
    }
}

/// A started stack: its address, its parts, and the handle to stop it.
pub struct RunningStack {
    pub addr: SocketAddr,
    pub stack: Arc<Stack>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningStack {
    /// Waits until every stream function has caught up, at most `timeout`; false on time-out.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stack.drained() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.stack.drained()
    }

    /// Stops the gateway and the mapping loops (each finishes its batch in flight).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Builds the embedded stack and starts serving on `config.listen` (port 0 picks a free port).
pub async fn start(config: LocalConfig) -> std::io::Result<RunningStack> {
    let telemetry = Arc::new(MemoryStream::new(
        "geostream-telemetry",
        config.shards,
        config.retention_per_shard,
    ));
    let alert_stream = Arc::new(MemoryStream::new(
        "geostream-alerts",
        config.shards,
        config.retention_per_shard,
    ));
    let positions = Arc::new(MeasuredPositions::new(Arc::new(MemoryPositionStore::new())));
    let archive = Arc::new(MemoryArchive::new(config.archive_per_device));
    let alerts = Arc::new(MemoryAlertStore::new());
    let dead_letters = Arc::new(MemoryDeadLetters::new(config.dead_letter_capacity));
    let (shutdown, shutdown_rx) = watch::channel(false);

    let stream_functions: Vec<Arc<dyn esm::KinesisFunction>> = vec![
        Arc::new(functions::GeoUpdateFunction(GeoUpdate::new(
            positions.clone(),
            dead_letters.clone(),
        ))),
        Arc::new(functions::ArchiverFunction(Archiver::new(
            archive.clone(),
            dead_letters.clone(),
        ))),
        Arc::new(functions::AnomalyInspectorFunction(AnomalyInspector::new(
            Arc::new(config.rules.clone()),
            alerts.clone(),
            alert_stream.clone(),
            dead_letters.clone(),
        ))),
    ];
    let mut tasks = Vec::new();
    let mut mappings = Vec::new();
    for function in stream_functions {
        let name = function.name().to_string();
        let (stats, loops) = start_mapping(
            function,
            telemetry.clone(),
            config.mapping.clone(),
            dead_letters.clone(),
            shutdown_rx.clone(),
        );
        mappings.push((name, stats));
        tasks.extend(loops);
    }

    let stack = Arc::new(Stack {
        ingest: Ingest::new(telemetry.clone()),
        query_api: QueryApi::new(positions.clone(), archive.clone(), alerts.clone()),
        positions,
        archive,
        alerts,
        telemetry,
        alert_stream,
        dead_letters,
        mappings,
        started: Instant::now(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
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
