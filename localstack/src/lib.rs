//! `geostream-local`: the whole GeoStream pipeline in one process.
//!
//! The gateway turns each HTTP request into a real API Gateway v2 event for the ingest and
//! query-api handlers; event source mappings hand real `KinesisEvent` (or, on the Kafka bus,
//! `KafkaEvent`) batches to geo-update, archiver and anomaly-inspector. On the embedded
//! backend the stream, stores and dead letters are the in-memory adapters of
//! `geostream-shared`; on the AWS backend they are the AWS adapters, built by the composition
//! root the Lambda mains use (real AWS, or an emulator). The live page lives at `/`, counters
//! at `/local/stats`, dead letters at `/local/dead-letters`.
//!
//! - [`config`]: what the stack is tuned with;
//! - [`wiring`]: the ports it runs on and what the mappings read;
//! - [`esm`]: the event source mappings;
//! - [`stack`]: the running stack and its stats; [`drain`]: when it has caught up;
//! - [`positions`]: POST-to-position latency and the latest-positions cache;
//! - [`gateway`], [`live`], [`dashboard`], [`metrics`]: HTTP, the live page and its series;
//! - [`fault_proxy`]: AWS's failure modes injected in front of an emulator.

pub mod config;
pub mod cost;
pub mod dashboard;
pub mod drain;
pub mod esm;
pub mod fault_proxy;
pub mod gateway;
pub mod host_guard;
pub mod live;
pub mod metrics;
pub mod positions;
pub mod retention;
pub mod stack;
pub mod wiring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use geostream_anomaly_inspector::AnomalyInspector;
use geostream_archiver::Archiver;
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::provision::queue_url;
use geostream_aws::redrive::{Redrive, RedriveReport};
use geostream_geo_update::GeoUpdate;
use geostream_ingest::{Ingest, TrackerAuth};
use geostream_lambda::identity::AccessPolicy;
use geostream_lambda::jwt::{JwtVerifier, KeySource};
use geostream_query_api::QueryApi;
use geostream_shared::limits::LocalDeviceLimits;
use geostream_shared::ports::{EventBus, PositionStore};
use geostream_shared::stream::{RetryBudget, StreamFunction, WithRetryBudget};
use tokio::sync::watch;

pub use config::{
    ArchiveKind, AwsBackend, Backend, Bus, KafkaBusConfig, LocalConfig, MemoryBudget, StoreKind,
    TokenVerification,
};
pub use drain::KAFKA_QUIET;
pub use stack::{RunningStack, Stack, StackStats};

use esm::event::{InProcess, Invoke};
use esm::{start_mapping, start_mapping_on_own_thread};
use metrics::LocalMetrics;
use positions::{LatestPositions, ObservedAlerts, ObservedPositions, SinceReading};

/// How long the runner waits for its Kafka consumer groups' joins before serving anyway.
const KAFKA_JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The three stream functions on a stack's ports (positions and the alerts bus as given, for
/// the runner's observing wrappers).
fn stream_functions(
    ports: &wiring::Ports,
    positions: Arc<dyn PositionStore>,
    alert_bus: Arc<dyn EventBus>,
    config: &LocalConfig,
) -> Vec<Arc<dyn StreamFunction>> {
    vec![
        Arc::new(GeoUpdate::new(positions, ports.dead_letters.clone())),
        Arc::new(Archiver::new(
            ports.archive.clone(),
            ports.dead_letters.clone(),
        )),
        Arc::new(inspector(ports, alert_bus, config)),
    ]
}

/// The anomaly-inspector on a stack's ports, making fleet events where they have stores.
fn inspector(
    ports: &wiring::Ports,
    alert_bus: Arc<dyn EventBus>,
    config: &LocalConfig,
) -> AnomalyInspector {
    let inspector = AnomalyInspector::new(
        Arc::new(config.rules.clone()),
        ports.alerts.clone(),
        alert_bus,
        ports.dead_letters.clone(),
    );
    let inspector = match &ports.fleet {
        Some(fleet) => inspector.with_fleet(
            fleet.geofences.clone(),
            fleet.events.clone(),
            ports.geofence_refresh,
        ),
        None => inspector,
    };
    match &ports.history {
        Some(history) => inspector.with_history(history.clone()),
        None => inspector,
    }
}

/// How often the embedded runner looks for vehicles gone silent: a tenth of the fleet rules'
/// `offline_after_s`, between 1 and 30 s.
fn offline_check_period(config: &LocalConfig) -> std::time::Duration {
    std::time::Duration::from_millis(
        (config.rules.fleet.offline_after_ms / 10).clamp(1_000, 30_000) as u64,
    )
}

/// Replays what the stream functions gave up on, on the AWS backend: every letter on the
/// dead-letter queue, then every batch Lambda's event source mappings reported to the
/// stream-failures queue (read again from the stream), through the same handlers
/// ([`geostream_aws::redrive`]).
pub async fn redrive(config: &LocalConfig) -> Result<RedriveReport, String> {
    let Backend::Aws(aws) = &config.backend else {
        return Err("redrive reads the dead-letter and stream-failures queues of an AWS deployment (or an emulator): use --backend aws; the embedded runner keeps its dead letters in memory (/local/dead-letters)".into());
    };
    let ports = wiring::ports(config).await?;
    let functions = stream_functions(
        &ports,
        ports.positions.clone(),
        ports.alert_bus.clone(),
        config,
    );
    let functions: Vec<&dyn StreamFunction> = functions.iter().map(|f| f.as_ref()).collect();
    let sdk = sdk_config(aws.endpoint_url.as_deref()).await;
    let clients = Clients::new(&sdk);
    let redrive = Redrive {
        functions: &functions,
        sqs: clients.sqs.clone(),
        s3: clients.s3.clone(),
        kinesis: clients.kinesis.clone(),
    };
    let dead_letters = queue_url(&clients, &aws.names.dead_letter_queue).await?;
    let mut report = redrive.dead_letters(&dead_letters).await?;
    match queue_url(&clients, &aws.names.stream_failures_queue).await {
        Ok(stream_failures) => report.add(redrive.stream_failures(&stream_failures).await?),
        Err(error) => report
            .not_replayable
            .push(format!("no stream-failures queue to read: {error}")),
    }
    Ok(report)
}

/// Builds the stack on its backend and starts serving on `config.listen` (port 0 picks a free
/// port; [`RunningStack::addr`] tells which).
pub async fn start(config: LocalConfig) -> Result<RunningStack, String> {
    let ports = wiring::ports(&config).await?;
    let post_to_position = Arc::new(SinceReading::default());
    let post_to_alert = Arc::new(SinceReading::default());
    let alert_bus = Arc::new(ObservedAlerts {
        inner: ports.alert_bus.clone(),
        latency: post_to_alert.clone(),
    });
    let latest_positions = ports
        .memory
        .is_none()
        .then(|| Arc::new(LatestPositions::default()));
    let positions = Arc::new(ObservedPositions {
        inner: ports.positions.clone(),
        latency: post_to_position.clone(),
        latest: latest_positions.clone(),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    // What each function's invocations add up to is the cost report's, on the AWS backend.
    let metrics = Arc::new(if ports.aws_usage.is_some() {
        LocalMetrics::counting_invocations()
    } else {
        LocalMetrics::new()
    });

    let stream_functions = stream_functions(&ports, positions.clone(), alert_bus.clone(), &config);
    let mut tasks = Vec::new();
    let mut mappings = Vec::new();
    for function in stream_functions {
        let sources = ports.telemetry.for_function(function.name()).await?;
        let mapping_config = match &config.archiver_mapping {
            Some(archiver) if function.name() == geostream_archiver::FUNCTION_NAME => {
                archiver.clone()
            }
            _ => config.mapping.clone(),
        };
        // The function dead-letters, whole, what fails on the mapping's last attempt, as it
        // does on Lambda; the mapping's own dead letters then only follow a failed send.
        let budget = RetryBudget::within_mapping(mapping_config.max_retries, None);
        let function = Arc::new(WithRetryBudget::new(
            function,
            budget,
            ports.dead_letters.clone(),
        ));
        let function = Arc::new(InProcess {
            function,
            metrics: metrics.clone(),
        });
        let (mapping, loops) = if function.name() == geostream_geo_update::FUNCTION_NAME {
            // Positions are what users watch: geo-update's batches (about 3 µs a reading) do
            // not wait behind the inspector's (about 10 µs a reading, a 500-record batch
            // polled in one go) and the gateway's requests. Sharing one run queue, its
            // records waited 9-10 ms (p50) to be read in the burst bench; on its own thread,
            // POST-to-position p50 went from 12-14 to 4-5 ms, p99 from 44-50 to 15-18 ms
            // while the inspector keeps up (docs/performance.md).
            let (mapping, task) = start_mapping_on_own_thread(
                function,
                sources,
                mapping_config,
                ports.dead_letters.clone(),
                shutdown_rx.clone(),
            )?;
            (mapping, vec![task])
        } else {
            start_mapping(
                function,
                sources,
                mapping_config,
                ports.dead_letters.clone(),
                shutdown_rx.clone(),
            )
        };
        mappings.push(mapping);
        tasks.extend(loops);
    }

    // On Kafka, a consumer group's join takes seconds (half the session timeout on Tansu):
    // the runner serves once every group has its partitions, so the first readings do not
    // wait out the join (as a Lambda mapping is enabled before traffic is sent to it). The
    // mapping loops' reads drive the joins.
    let joined_by = Instant::now() + KAFKA_JOIN_TIMEOUT;
    while !mappings.iter().all(|m| m.ready()) {
        if Instant::now() >= joined_by {
            tracing::warn!(
                "not every Kafka consumer group had its partitions after {} s; serving anyway",
                KAFKA_JOIN_TIMEOUT.as_secs()
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // device_offline for vehicles gone silent: the embedded stores are looked through in
    // memory (on AWS this is a scheduled function's job).
    if let Some(memory) = &ports.memory {
        let alerts = memory.alerts.clone();
        let inspector = inspector(&ports, alert_bus.clone(), &config);
        let offline_after = config.rules.fleet.offline_after_ms;
        let period = offline_check_period(&config);
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                let now = geostream_shared::now_millis();
                let silent = alerts.silent_devices(now - offline_after);
                inspector.check_offline(&silent, now).await;
            }
        }));
    }

    // Retention by age, on the embedded stores (on AWS the stores' own TTLs and lifecycles).
    let expired = Arc::new(retention::Expired::default());
    if let Some(memory) = ports.memory.clone() {
        let (expired, retention) = (expired.clone(), config.retention);
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(retention.sweep_every) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                expired.sweep(&memory, &retention, geostream_shared::now_millis());
            }
        }));
    }

    // With token verification, the handlers require a verified token's claims, as on AWS.
    let access = match config.tokens {
        Some(_) => AccessPolicy::jwt(),
        None => AccessPolicy::open(),
    };
    let mut ingest = Ingest::new(ports.bus.clone(), ports.metric_names.clone())
        .with_access(access.clone())
        .with_tracker_auth(TrackerAuth::new(
            config.device_secrets.clone(),
            config.tokens.is_some(),
        ));
    if let Some(limit) = config.device_limit {
        ingest = ingest.with_device_limits(Arc::new(LocalDeviceLimits::new(limit)));
    }
    let mut query_api = QueryApi::new(
        ports.query.positions.clone(),
        ports.query.archive.clone(),
        ports.query.alerts.clone(),
    )
    .with_access(access);
    if let Some(fleet) = &ports.query.fleet {
        query_api = query_api.with_fleet(fleet.geofences.clone(), fleet.events.clone());
    }
    if let Some(history) = &ports.query.history {
        query_api = query_api.with_history(history.clone());
    }
    let stack = Arc::new(Stack {
        ingest,
        query_api,
        tokens: config.tokens.as_ref().map(|tokens| {
            JwtVerifier::new(
                tokens.issuer.clone(),
                tokens.audiences.clone(),
                KeySource::File(tokens.jwks.clone()),
            )
        }),
        post_to_position,
        post_to_alert,
        latest_positions,
        mappings,
        bus: ports.telemetry.bus_name(),
        memory: ports.memory,
        memory_budget: config.memory_budget,
        expired,
        aws_usage: ports.aws_usage,
        metrics,
        alerts: ports.alerts.clone(),
        shutdown: shutdown_rx.clone(),
        started: Instant::now(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = gateway::router(
        stack.clone(),
        host_guard::HostGuard::new(&config.allowed_hosts),
    );
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
