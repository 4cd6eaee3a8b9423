use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use geostream_aws::provision::ResourceNames;
use geostream_local::cost::{self, Deployment, KinesisMode, Measured, PriceTable};
use geostream_local::esm::MappingConfig;
use geostream_local::retention::Retention;
use geostream_local::{
    start, ArchiveKind, AwsBackend, Backend, Bus, KafkaBusConfig, LocalConfig, MemoryBudget,
    StoreKind, TokenVerification, KAFKA_QUIET,
};
use geostream_shared::device_secret::DeviceSecrets;
use geostream_shared::limits::DeviceRateLimit;
use geostream_shared::rules::RuleSet;
use geostream_shared::validation::is_valid_device_id;
use geostream_sim::SimOptions;

// The pipeline allocates many small strings and maps across threads; mimalloc keeps that off
// the critical path (glibc malloc took about 40% of CPU time in a profile of the bench run).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the GeoStream pipeline in one process: API gateway, stream functions, stores, and
/// optionally a simulated fleet.
#[derive(Parser)]
#[command(name = "geostream-local", version)]
struct Cli {
    /// Address to serve the API and status page on. Port 0 picks a free port; once serving,
    /// the first line on stdout is `listening on http://ADDR` with the address actually bound,
    /// for the scripts and tests that start the runner as a child process.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A host name the runner answers to (repeatable). Besides these it answers only requests
    /// addressed to an IP address or `localhost`, so a web page cannot reach it through a name
    /// of its own (DNS rebinding); state-changing requests from another web origin are refused.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// Verify bearer tokens as API Gateway's JWT authorizer does: RS256 signatures by the keys
    /// of this JWKS file (by `kid`; the file is read again for a `kid` it did not hold), with
    /// --jwt-issuer and --jwt-audience. A request without a valid token is answered 401, and the
    /// token's claims and scopes decide what it may do, as on AWS.
    #[arg(long, value_name = "FILE", requires_all = ["jwt_issuer", "jwt_audience"])]
    jwks: Option<PathBuf>,
    /// Limit each device (vehicle) to this many requests a second on average (fractions
    /// allowed), with --device-burst more at once: past it a device is answered 429 with
    /// Retry-After, and a gateway's items of that vehicle come back as failed, to retry. Off by
    /// default (the simulator's bench mode posts each vehicle far faster); deployments on AWS
    /// have it on (2 a second, burst 20).
    #[arg(long, value_name = "PER_SECOND")]
    device_rate: Option<f64>,
    /// A device whose secret the tracker routes refuse (403), repeatable or comma-separated
    /// (with --device-secret-key).
    #[arg(
        long = "revoked-device",
        value_name = "DEVICE_ID",
        value_delimiter = ','
    )]
    revoked_devices: Vec<String>,
    /// Requests a device may post at once above --device-rate.
    #[arg(long, value_name = "N", default_value_t = 20, requires = "device_rate")]
    device_burst: u32,
    /// The issuer (`iss`) tokens must name (with --jwks).
    #[arg(long, value_name = "ISS", requires = "jwks")]
    jwt_issuer: Option<String>,
    /// An audience tokens may name in `aud` (or, without `aud`, in `client_id`); repeatable.
    #[arg(long, value_name = "AUD", requires = "jwks")]
    jwt_audience: Vec<String>,
    /// Where the bus and stores live: in this process, or AWS services through the AWS SDK.
    #[arg(long, value_enum, default_value_t = BackendKind::Embedded)]
    backend: BackendKind,
    /// The bus: the backend's native stream (in memory, or Kinesis with --backend aws), or a
    /// Kafka-compatible broker (Kafka, Redpanda, MSK) with the backend's stores.
    #[arg(long, value_enum, default_value_t = BusKind::Native)]
    bus: BusKind,
    /// With --bus kafka: the brokers, `host:port[,host:port...]`. Topics `PREFIX-telemetry`
    /// and `PREFIX-alerts` are created if missing; each stream function consumes as group
    /// `PREFIX-FUNCTION` (PREFIX: --resource-prefix).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", required_if_eq("bus", "kafka"))]
    brokers: Option<String>,
    /// With --backend aws: the AWS-API endpoint (an emulator such as moto or LocalStack);
    /// without it, real AWS from the default credential chain.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    endpoint_url: Option<String>,
    /// The prefix of every resource name (`PREFIX-telemetry`, ...): AWS resources with
    /// --backend aws, topics and consumer groups with --bus kafka.
    #[arg(long, default_value = "geostream")]
    resource_prefix: String,
    /// With --backend aws: create the streams, tables, Timestream database, archive bucket
    /// and queue first.
    #[arg(long)]
    create_resources: bool,
    /// With --backend aws: the archive the archiver writes and the query API reads, as
    /// `ARCHIVE` chooses it on Lambda: Timestream, or hour-partitioned JSON Lines in the S3
    /// bucket `PREFIX-archive`.
    #[arg(long, value_enum, default_value_t = ArchiveChoice::Timestream)]
    archive: ArchiveChoice,
    /// With --backend aws: where latest positions live, as `POSITION_STORE` chooses it on
    /// Lambda: the DynamoDB table `PREFIX-positions`, or Valkey/Redis at --valkey-url.
    #[arg(long, value_enum, default_value_t = StoreChoice::Dynamodb)]
    position_store: StoreChoice,
    /// With --backend aws: where the anomaly-inspector keeps rule state, as `RULE_STATE_STORE`
    /// chooses it on Lambda: the DynamoDB table `PREFIX-alert-state`, or Valkey/Redis at
    /// --valkey-url (alert records stay in DynamoDB).
    #[arg(long, value_enum, default_value_t = StoreChoice::Dynamodb)]
    rule_state_store: StoreChoice,
    /// With --backend aws: keep the last hour of every vehicle's readings in Valkey/Redis at
    /// --valkey-url, in front of the archive, as `RECENT_TRACKS=valkey` does on Lambda (a recent
    /// track then reads only that vehicle's readings).
    #[arg(long)]
    recent_tracks_in_valkey: bool,
    /// With a store on valkey: the server, `redis://HOST:PORT` (`rediss://` with TLS).
    #[arg(long, env = "VALKEY_URL", required_if_eq_any([("position_store", "valkey"), ("rule_state_store", "valkey"), ("recent_tracks_in_valkey", "true")]))]
    valkey_url: Option<String>,
    /// Shards of the telemetry stream (partitions of new topics with --bus kafka).
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Records kept per shard; older ones are trimmed (and reported if unprocessed).
    #[arg(long, default_value_t = 250_000)]
    retention_per_shard: usize,
    /// Readings kept per vehicle in the in-memory archive.
    #[arg(long, default_value_t = 2_000)]
    archive_per_device: usize,
    /// MiB the embedded stores and bus may hold: 15/32 for the archive (oldest readings evicted
    /// first), an eighth for the telemetry stream, a thirty-second for the alert stream (oldest
    /// records trimmed), a sixteenth for trips, stops and summaries, the rest left for
    /// positions, rule states and the process [default: a quarter of the machine's memory].
    #[arg(long)]
    memory_budget_mb: Option<usize>,
    /// How long the embedded backend keeps a kind of data, `KIND=DAYS` (repeatable; fractions
    /// allowed): `readings` (default 365, from their time), `history` (trips, stops and
    /// summaries: 90, from their end), `fleet-events` (30), `alerts` (cleared ones: 90, from the
    /// clear) and `positions` (of vehicles gone silent: 90). Swept once a minute; the AWS
    /// deployment has a Terraform variable for each.
    #[arg(long, value_name = "KIND=DAYS")]
    retention: Vec<String>,
    /// Event source mapping: records per invocation [default: 100].
    #[arg(long)]
    esm_batch_size: Option<usize>,
    /// Event source mapping: how long to wait to fill a batch, milliseconds [default: 0
    /// embedded; with --backend aws, Terraform's stream_batching_window_seconds, 1 s].
    #[arg(long)]
    esm_batching_window_ms: Option<u64>,
    /// Event source mapping: retries of a failed batch before its records are dead-lettered
    /// [default: 3 embedded; with --backend aws, Terraform's stream_max_retries, 5].
    #[arg(long)]
    esm_max_retries: Option<u32>,
    /// The archiver's event source mapping: records per invocation [default: as
    /// --esm-batch-size; with --backend aws, Terraform's archiver_batch_size, 1000].
    #[arg(long)]
    archiver_batch_size: Option<usize>,
    /// The archiver's batching window, milliseconds [default: as --esm-batching-window-ms;
    /// with --backend aws, Terraform's archiver_batching_window_seconds, 5 s].
    #[arg(long)]
    archiver_batching_window_ms: Option<u64>,
    /// With --backend aws and a bounded --simulate run: print what the run consumed per
    /// function and AWS operation, and what it costs per million readings and per vehicle
    /// for the reference fleets (docs/cost.md).
    #[arg(long)]
    cost_report: bool,
    /// The price table for --cost-report (TOML, as localstack/aws-prices.toml); default: the
    /// bundled one.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// The Kinesis capacity mode --cost-report prices (Terraform's default: provisioned).
    #[arg(long, value_enum, default_value_t = KinesisModeChoice::Provisioned)]
    kinesis_mode: KinesisModeChoice,
    /// Rules file (TOML); default: the bundled rules (shared/rules/default.toml).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Start a simulated fleet against this stack.
    #[arg(long)]
    simulate: bool,
    #[command(flatten)]
    sim: SimOptions,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Prints the secret of each device named, derived from --device-secret-key (or
    /// GEOSTREAM_DEVICE_SECRET_KEY): the deployment's key, as the ingest function holds it in
    /// DEVICE_SECRET_KEY. A phone running Traccar Client posts to
    /// `https://API/v1/ingest/osmand?secret=SECRET`; OwnTracks posts to
    /// `https://API/v1/ingest/owntracks` with the secret as its password.
    DeviceSecret {
        /// The devices (as their apps name them; OwnTracks: `USER` or `USER:DEVICE`).
        #[arg(required = true, value_name = "DEVICE_ID")]
        device_ids: Vec<String>,
    },
    /// Replays what the stream functions gave up on, with --backend aws (the options before
    /// `redrive` name the deployment as for a run): every letter on the queue
    /// `PREFIX-dead-letters` (whole records; large ones from the bucket `PREFIX-dead-letters`),
    /// then every batch Lambda's event source mappings reported to `PREFIX-stream-failures`
    /// (read again from the stream while it retains them), through the same handlers, in stream
    /// order. A message is deleted once its records are done with; what fails again stays.
    /// Idempotent: a second redrive changes nothing. Exits 1 if anything was left.
    Redrive,
    /// Serves a proxy in front of an AWS-API emulator that fails a share of the data-plane calls
    /// the way AWS does (throttling, 500/503, partial PutRecords failures, cancelled
    /// transactions, answers held past the client's timeout, dropped connections): point
    /// --endpoint-url of a run at it to see GeoStream under faults. Prints `listening on
    /// http://ADDR` first, and what it injected when stopped (Ctrl-C).
    FaultProxy {
        /// The emulator, `http://HOST:PORT`.
        #[arg(long)]
        upstream: String,
        /// Where to listen (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        proxy_listen: SocketAddr,
        /// The share of data-plane calls that fail, 0 to 1.
        #[arg(long, default_value_t = 0.1)]
        rate: f64,
        /// The faults, taken in turn, comma-separated [default: all of them].
        #[arg(long, value_delimiter = ',')]
        faults: Vec<geostream_local::fault_proxy::Fault>,
        /// How long a `timeout` fault holds the answer before dropping the connection, ms.
        #[arg(long, default_value_t = 10_000)]
        hold_ms: u64,
    },
}

/// Runs the fault proxy until Ctrl-C.
async fn fault_proxy(
    upstream: &str,
    listen: SocketAddr,
    plan: geostream_local::fault_proxy::FaultPlan,
) -> ExitCode {
    let proxy =
        match geostream_local::fault_proxy::FaultProxy::start_on(listen, upstream, plan).await {
            Ok(proxy) => proxy,
            Err(error) => {
                eprintln!("geostream-local: fault proxy on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
    println!("listening on {}", proxy.url);
    let _ = tokio::signal::ctrl_c().await;
    let stats = proxy.stats();
    println!(
        "fault proxy: {} calls forwarded, {} faults injected",
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        stats.total_injected()
    );
    for ((operation, fault), count) in stats.injected() {
        println!("  {operation} {fault:?}: {count}");
    }
    ExitCode::SUCCESS
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BusKind {
    Native,
    Kafka,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StoreChoice {
    Dynamodb,
    Valkey,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KinesisModeChoice {
    OnDemand,
    Provisioned,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ArchiveChoice {
    Timestream,
    S3,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendKind {
    Embedded,
    Aws,
}

fn store_kind(choice: StoreChoice, valkey_url: &Option<String>) -> StoreKind {
    match (choice, valkey_url) {
        (StoreChoice::Valkey, Some(url)) => StoreKind::Valkey { url: url.clone() },
        _ => StoreKind::DynamoDb,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // --quiet: the report only; the runner's own lines (an alert transition each, the serving
    // address) give way to warnings and errors, unless RUST_LOG asks for them.
    let default_level = if cli.sim.quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let device_secrets = match cli
        .sim
        .device_secret_key
        .as_deref()
        .map(|key| DeviceSecrets::new(key.as_bytes(), cli.revoked_devices.clone()))
        .transpose()
    {
        Ok(secrets) => secrets,
        Err(error) => {
            eprintln!("geostream-local: --device-secret-key: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::DeviceSecret { device_ids }) = &cli.command {
        let Some(secrets) = &device_secrets else {
            eprintln!("geostream-local: device-secret needs the deployment's key: --device-secret-key or GEOSTREAM_DEVICE_SECRET_KEY");
            return ExitCode::FAILURE;
        };
        for device_id in device_ids {
            if !is_valid_device_id(device_id) {
                eprintln!("geostream-local: {device_id:?} is not a device id: 1-64 characters of A-Z a-z 0-9 _ . : -");
                return ExitCode::FAILURE;
            }
            println!("{device_id}\t{}", secrets.issue(device_id));
        }
        return ExitCode::SUCCESS;
    }
    if let Some(Command::FaultProxy {
        upstream,
        proxy_listen,
        rate,
        faults,
        hold_ms,
    }) = &cli.command
    {
        let mut plan = geostream_local::fault_proxy::FaultPlan::every_kind(*rate);
        if !faults.is_empty() {
            plan.faults = faults.clone();
        }
        plan.hold = Duration::from_millis(*hold_ms);
        return fault_proxy(upstream, *proxy_listen, plan).await;
    }
    let rules = match &cli.rules {
        None => RuleSet::default_rules(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| RuleSet::from_toml(&text).map_err(|e| e.to_string()))
        {
            Ok(rules) => rules,
            Err(error) => {
                eprintln!("geostream-local: rules file {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let backend = match cli.backend {
        BackendKind::Embedded => Backend::Embedded,
        BackendKind::Aws => Backend::Aws(AwsBackend {
            endpoint_url: cli.endpoint_url.clone(),
            names: ResourceNames::with_prefix(&cli.resource_prefix),
            create_resources: cli.create_resources,
            archive: match cli.archive {
                ArchiveChoice::Timestream => ArchiveKind::Timestream,
                ArchiveChoice::S3 => ArchiveKind::S3,
            },
            position_store: store_kind(cli.position_store, &cli.valkey_url),
            rule_state_store: store_kind(cli.rule_state_store, &cli.valkey_url),
            recent_tracks: cli
                .valkey_url
                .clone()
                .filter(|_| cli.recent_tracks_in_valkey),
        }),
    };
    let bus = match (cli.bus, &cli.brokers) {
        (BusKind::Native, _) => Bus::Backend,
        (BusKind::Kafka, Some(brokers)) => Bus::Kafka(KafkaBusConfig {
            telemetry_topic: format!("{}-telemetry", cli.resource_prefix),
            alerts_topic: format!("{}-alerts", cli.resource_prefix),
            group_prefix: cli.resource_prefix.clone(),
            ..KafkaBusConfig::local(brokers.as_str())
        }),
        (BusKind::Kafka, None) => {
            eprintln!("geostream-local: --bus kafka needs --brokers HOST:PORT");
            return ExitCode::FAILURE;
        }
    };
    let defaults = match cli.backend {
        BackendKind::Embedded => MappingConfig::default(),
        BackendKind::Aws => MappingConfig::as_deployed(),
    };
    let mapping = MappingConfig {
        batch_size: cli
            .esm_batch_size
            .unwrap_or(defaults.batch_size)
            .clamp(1, 10_000),
        batching_window: cli
            .esm_batching_window_ms
            .map_or(defaults.batching_window, Duration::from_millis),
        max_retries: cli.esm_max_retries.unwrap_or(defaults.max_retries),
        ..defaults
    };
    let archiver_defaults = match cli.backend {
        BackendKind::Embedded => mapping.clone(),
        BackendKind::Aws => MappingConfig {
            max_retries: mapping.max_retries,
            ..MappingConfig::archiver_as_deployed()
        },
    };
    let archiver_mapping = MappingConfig {
        batch_size: cli
            .archiver_batch_size
            .unwrap_or(archiver_defaults.batch_size)
            .clamp(1, 10_000),
        batching_window: cli
            .archiver_batching_window_ms
            .map_or(archiver_defaults.batching_window, Duration::from_millis),
        ..archiver_defaults
    };
    let prices = match (&cli.prices, cli.cost_report) {
        (_, false) => None,
        (None, true) => Some(PriceTable::parse(cost::BUNDLED_PRICES)),
        (Some(path), true) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| PriceTable::parse(&text)),
        ),
    };
    let prices = match prices.transpose() {
        Ok(prices) => prices,
        Err(error) => {
            eprintln!("geostream-local: price table: {error}");
            return ExitCode::FAILURE;
        }
    };
    let tokens = cli.jwks.clone().map(|jwks| TokenVerification {
        jwks,
        issuer: cli.jwt_issuer.clone().unwrap_or_default(),
        audiences: cli.jwt_audience.clone(),
    });
    let device_limit = match cli
        .device_rate
        .map(|rate| DeviceRateLimit::new(rate, cli.device_burst))
        .transpose()
    {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("geostream-local: --device-rate/--device-burst: {error}");
            return ExitCode::FAILURE;
        }
    };
    if !cli.listen.ip().is_loopback() && tokens.is_none() {
        eprintln!(
            "geostream-local: WARNING: listening on {}, beyond this machine, and this runner verifies no tokens (see --jwks): anyone who can reach it can post telemetry as any vehicle, read the fleet and acknowledge alerts",
            cli.listen
        );
    }
    let mut retention = Retention::default();
    for setting in &cli.retention {
        if let Err(error) = retention.set(setting) {
            eprintln!("geostream-local: --retention {error}");
            return ExitCode::FAILURE;
        }
    }
    let config = LocalConfig {
        listen: cli.listen,
        allowed_hosts: cli.allowed_hosts.clone(),
        backend,
        bus,
        shards: cli.shards,
        retention_per_shard: cli.retention_per_shard,
        archive_per_device: cli.archive_per_device,
        memory_budget: cli
            .memory_budget_mb
            .map_or_else(MemoryBudget::for_this_machine, MemoryBudget::from_mib),
        mapping: mapping.clone(),
        archiver_mapping: Some(archiver_mapping.clone()),
        rules,
        tokens,
        device_limit,
        device_secrets,
        retention,
        ..LocalConfig::default()
    };
    if let Some(Command::Redrive) = cli.command {
        return match geostream_local::redrive(&config).await {
            Ok(report) => {
                println!("redrive: {report}");
                for reason in &report.not_replayable {
                    println!("  not replayable: {reason}");
                }
                if report.failed_again == 0 && report.not_replayable.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => {
                eprintln!("geostream-local: redrive: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let running = match start(config).await {
        Ok(running) => running,
        Err(error) => {
            eprintln!("geostream-local: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let base = format!("http://{}", running.addr);
    // Machine-readable, and printed before anything else on stdout (see --listen): a parent
    // that passed port 0 learns the port from it, with no race over a port chosen beforehand.
    println!("listening on {base}");
    if !cli.sim.quiet {
        eprintln!("geostream-local: API and status page at {base}/  (Ctrl-C stops)");
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let bounded_run =
        cli.simulate && (cli.sim.duration_s.is_some() || cli.sim.max_events.is_some());
    let simulation = cli.simulate.then(|| {
        let (options, base) = (cli.sim.clone(), base.clone());
        tokio::spawn(async move { geostream_sim::run(options, &base, stop_rx).await })
    });
    let started = Instant::now();
    let mut code = ExitCode::SUCCESS;
    match simulation {
        Some(simulation) if bounded_run => {
            // Bench mode: run the fleet, wait for the pipeline to drain, report, exit.
            let ctrl_c = tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    let _ = stop_tx.send(true);
                }
            });
            match simulation.await {
                Ok(Ok(report)) => {
                    let drained = running.wait_drained(Duration::from_secs(120)).await;
                    // On Kafka, the quiet period that marks "caught up" is not processing time.
                    let quiet = if geostream_local::drain::measures_lag(&running.stack) {
                        Duration::ZERO
                    } else {
                        KAFKA_QUIET
                    };
                    let elapsed = started.elapsed().saturating_sub(quiet).as_secs_f64();
                    println!("{report}");
                    let stats = running.stack.stats();
                    println!(
                        "pipeline   {} readings accepted, all stream functions caught up after {:.2} s{}: {:.0} events/s end to end",
                        report.accepted,
                        elapsed,
                        if drained { "" } else { " (NOT drained)" },
                        report.accepted as f64 / elapsed
                    );
                    if let Some(calls) = &stats.aws_calls {
                        println!(
                            "aws calls  {} in all: {calls:?}",
                            calls.values().sum::<u64>()
                        );
                    }
                    println!(
                        "position   POST-to-position latency p50 {} ms   p90 {} ms   p99 {} ms   max {} ms ({} positions applied)",
                        stats.post_to_position.p50_ms, stats.post_to_position.p90_ms, stats.post_to_position.p99_ms, stats.post_to_position.max_ms, stats.post_to_position.samples
                    );
                    println!(
                        "alert      POST-to-alert latency p50 {} ms   p90 {} ms   p99 {} ms   max {} ms ({} transitions published)",
                        stats.post_to_alert.p50_ms, stats.post_to_alert.p90_ms, stats.post_to_alert.p99_ms, stats.post_to_alert.max_ms, stats.post_to_alert.samples
                    );
                    for mapping in &stats.mappings {
                        println!(
                            "function   {:<18} {} invocations, {} records, {} retried, {} dead-lettered",
                            mapping.function, mapping.invocations, mapping.records, mapping.retried_records, mapping.dead_lettered
                        );
                        let (age, wait, invocation) = (
                            &mapping.record_age_at_read,
                            &mapping.read_to_invoke,
                            &mapping.invocation,
                        );
                        println!(
                            "           {:<18} record age at read p50 {} ms p99 {} ms; read to invocation p50 {} ms p99 {} ms; invocation p50 {} ms p99 {} ms",
                            "", age.p50_ms, age.p99_ms, wait.p50_ms, wait.p99_ms, invocation.p50_ms, invocation.p99_ms
                        );
                    }
                    if let (Some(prices), Some(usage)) = (&prices, &running.stack.aws_usage) {
                        let deployment = Deployment {
                            batch_size: mapping.batch_size,
                            batching_window_s: mapping.batching_window.as_secs_f64(),
                            archiver_batch_size: archiver_mapping.batch_size,
                            archiver_batching_window_s: archiver_mapping
                                .batching_window
                                .as_secs_f64(),
                            kinesis: match cli.kinesis_mode {
                                KinesisModeChoice::OnDemand => KinesisMode::OnDemand,
                                KinesisModeChoice::Provisioned => KinesisMode::Provisioned,
                            },
                            platform_log_bytes: 0.0,
                            archive_months: 12.0,
                        };
                        let measured = Measured {
                            usage: usage.clone(),
                            invocations: running.stack.metrics.invocations(),
                        };
                        match cost::report(&measured, &deployment, prices) {
                            Some(report) => {
                                println!("\n{}", cost::render(&report, &deployment, prices))
                            }
                            None => eprintln!("geostream-local: no readings, no cost report"),
                        }
                    }
                    if !drained {
                        code = ExitCode::FAILURE;
                    }
                }
                Ok(Err(error)) => {
                    eprintln!("geostream-local: simulator: {error}");
                    code = ExitCode::FAILURE;
                }
                Err(error) => {
                    eprintln!("geostream-local: simulator task: {error}");
                    code = ExitCode::FAILURE;
                }
            }
            ctrl_c.abort();
        }
        simulation => {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("geostream-local: shutting down");
            let _ = stop_tx.send(true);
            if let Some(simulation) = simulation {
                if let Ok(Ok(report)) = simulation.await {
                    println!("{report}");
                }
            }
        }
    }
    running.shutdown().await;
    code
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
