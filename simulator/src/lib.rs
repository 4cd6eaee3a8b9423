//! `geostream-sim`: a fleet simulator and load generator for any GeoStream endpoint.
//!
//! N vehicles drive around a city and report on a schedule (or as fast as the endpoint takes
//! them, in bench mode); readings are POSTed in batches over HTTP by concurrent senders;
//! anomalies are injected and logged as ground truth; a closing report gives counts, events/s
//! and request latency percentiles.

pub mod fleet;
pub mod geofence_routes;
pub mod trackers;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use fleet::{Fleet, FleetSpec, GroundTruth, Item};
use geostream_shared::device_secret::DeviceSecrets;
use trackers::{app_request, AppRequest, Protocol};

/// How the simulated fleet behaves and how hard it pushes.
#[derive(Debug, Clone, clap::Args)]
pub struct SimOptions {
    /// Number of vehicles.
    #[arg(long, default_value_t = 1000)]
    pub vehicles: usize,
    /// Reporting interval of each vehicle, in milliseconds; 0 sends as fast as the endpoint
    /// takes them (bench mode).
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Readings per POST (at most 500).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=500))]
    pub batch_size: u64,
    /// Concurrent HTTP requests.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Stop after this many readings.
    #[arg(long)]
    pub max_events: Option<u64>,
    /// Chance per reading that a vehicle starts an anomaly (overheating, low tire pressure, ...).
    #[arg(long, default_value_t = 0.002)]
    pub anomaly_rate: f64,
    /// Share of readings sent deliberately invalid (to exercise validation).
    #[arg(long, default_value_t = 0.0)]
    pub bad_item_ratio: f64,
    /// City centre latitude.
    #[arg(long, default_value_t = 52.52)]
    pub center_lat: f64,
    /// City centre longitude.
    #[arg(long, default_value_t = 13.405)]
    pub center_lon: f64,
    /// Radius of the area the fleet drives in, km.
    #[arg(long, default_value_t = 15.0)]
    pub radius_km: f64,
    /// Random seed (the same seed drives the same routes and anomalies).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prefix of every device id.
    #[arg(long, default_value = "veh-")]
    pub id_prefix: String,
    /// Write the ground truth of injected anomalies here, one JSON object per line.
    #[arg(long)]
    pub ground_truth: Option<PathBuf>,
    /// No progress bar; with geostream-local, no log lines below warnings either (RUST_LOG
    /// still chooses): the closing report only.
    #[arg(long)]
    pub quiet: bool,
    /// What the devices speak: GeoStream's batches, or a tracker app's protocol (one reading
    /// per request, as the apps send them; --batch-size is not used; OwnTracks sends whole
    /// seconds, so it needs --interval-ms 1000 or more).
    #[arg(long, value_enum, default_value_t = Protocol::Telemetry)]
    pub protocol: Protocol,
    /// The key device secrets are derived from: tracker-protocol devices present their
    /// secrets, and geostream-local verifies them with the same key (the tracker routes are
    /// open without one, unless tokens are verified).
    #[arg(
        long,
        env = "GEOSTREAM_DEVICE_SECRET_KEY",
        hide_env_values = true,
        global = true
    )]
    pub device_secret_key: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            vehicles: 1000,
            interval_ms: 1000,
            batch_size: 100,
            concurrency: 8,
            duration_s: None,
            max_events: None,
            anomaly_rate: 0.002,
            bad_item_ratio: 0.0,
            center_lat: 52.52,
            center_lon: 13.405,
            radius_km: 15.0,
            seed: 42,
            id_prefix: "veh-".into(),
            ground_truth: None,
            quiet: true,
            protocol: Protocol::Telemetry,
            device_secret_key: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("cannot write ground truth to {path}: {source}")]
    GroundTruth {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Request latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The closing report of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimReport {
    pub duration_s: f64,
    pub requests: u64,
    /// Requests that got no answer or a 5xx.
    pub request_errors: u64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Items the endpoint answered as failed (valid but not taken).
    pub failed: u64,
    /// Items the simulator made invalid on purpose; `rejected` should equal it.
    pub sent_invalid: u64,
    pub events_per_s: f64,
    pub latency: Latency,
    pub anomalies_injected: u64,
    /// The first few error messages seen, for diagnosis.
    pub errors: Vec<String>,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sent       {} readings in {} requests over {:.1} s",
            self.sent, self.requests, self.duration_s
        )?;
        writeln!(
            f,
            "accepted   {}   rejected {} (sent invalid on purpose: {})   failed {}   request errors {}",
            self.accepted, self.rejected, self.sent_invalid, self.failed, self.request_errors
        )?;
        writeln!(f, "throughput {:.0} events/s accepted", self.events_per_s)?;
        writeln!(
            f,
            "latency    p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms (per request)",
            self.latency.p50_ms, self.latency.p90_ms, self.latency.p99_ms, self.latency.max_ms
        )?;
        write!(f, "anomalies  {} injected", self.anomalies_injected)?;
        for error in &self.errors {
            write!(f, "\nerror      {error}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    request_errors: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

/// Runs the simulation against `base_url` (e.g. `http://127.0.0.1:8080`) until the duration
/// or event limit is reached or `stop` turns true.
pub async fn run(
    options: SimOptions,
    base_url: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<SimReport, SimError> {
    if options.vehicles == 0 || options.concurrency == 0 {
        return Err(SimError::Options(
            "vehicles and concurrency must be at least 1".into(),
        ));
    }
    if !(0.0..=1.0).contains(&options.anomaly_rate)
        || !(0.0..=1.0).contains(&options.bad_item_ratio)
    {
        return Err(SimError::Options(
            "anomaly-rate and bad-item-ratio must be between 0 and 1".into(),
        ));
    }
    if options.protocol != Protocol::Telemetry && options.bad_item_ratio > 0.0 {
        return Err(SimError::Options(
            "bad-item-ratio is for --protocol telemetry: a tracker app sends only what it reads"
                .into(),
        ));
    }
    if options.protocol == Protocol::Owntracks && options.interval_ms < 1000 {
        return Err(SimError::Options(
            "OwnTracks sends whole seconds: --protocol owntracks needs --interval-ms 1000 or more"
                .into(),
        ));
    }
    let secrets = options
        .device_secret_key
        .as_deref()
        .map(|key| DeviceSecrets::new(key.as_bytes(), []))
        .transpose()
        .map_err(|error| SimError::Options(error.to_string()))?;
    let mut ground_truth = match &options.ground_truth {
        Some(path) => {
            Some(
                std::fs::File::create(path).map_err(|source| SimError::GroundTruth {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| SimError::Client(e.to_string()))?;
    let base_url = base_url.trim_end_matches('/').to_string();

    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
    ));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (batches_tx, batches_rx) = mpsc::channel::<(u64, AppRequest)>(options.concurrency * 2);
    let batches_rx = Arc::new(tokio::sync::Mutex::new(batches_rx));

    let mut senders = Vec::new();
    for _ in 0..options.concurrency {
        let (client, base_url, counters, latencies, errors, batches_rx) = (
            client.clone(),
            base_url.clone(),
            counters.clone(),
            latencies.clone(),
            errors.clone(),
            batches_rx.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let next = batches_rx.lock().await.recv().await;
                let Some((items, request)) = next else { break };
                send_batch(
                    &client, &base_url, items, request, &counters, &latencies, &errors,
                )
                .await;
            }
        }));
    }

    let progress = if options.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(
            options.duration_s.map(|s| (s * 1000.0) as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };

    let mut fleet = Fleet::new(FleetSpec {
        vehicles: options.vehicles,
        center: (options.center_lat, options.center_lon),
        radius_m: options.radius_km * 1000.0,
        anomaly_rate: options.anomaly_rate,
        bad_item_ratio: options.bad_item_ratio,
        seed: options.seed,
        id_prefix: options.id_prefix.clone(),
    });
    let started = Instant::now();
    let deadline = options
        .duration_s
        .map(|s| started + Duration::from_secs_f64(s.max(0.0)));
    // Readings per second the schedule asks for; unlimited in bench mode.
    let rate = (options.interval_ms > 0)
        .then(|| options.vehicles as f64 * 1000.0 / options.interval_ms as f64);
    let mut generated: u64 = 0;
    let mut last_progress = Instant::now();
    'produce: loop {
        if *stop.borrow()
            || deadline.is_some_and(|d| Instant::now() >= d)
            || options.max_events.is_some_and(|m| generated >= m)
        {
            break;
        }
        if let Some(rate) = rate {
            // Pace the schedule: never ahead of vehicles x (1 / interval).
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            if generated >= due {
                let wait = Duration::from_secs_f64(
                    ((generated + 1) as f64 / rate - started.elapsed().as_secs_f64()).max(0.0),
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait.min(Duration::from_millis(50))) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        }
        let now = chrono::Utc::now().timestamp_millis();
        let (items, request) = if options.protocol != Protocol::Telemetry {
            // A tracker app's request: one reading.
            generated += 1;
            match fleet.next_item(now) {
                Item::Valid(reading) => {
                    (1, app_request(options.protocol, &reading, secrets.as_ref()))
                }
                Item::Invalid(_) => (0, None),
            }
        } else {
            let mut batch = Vec::with_capacity(options.batch_size as usize * 330 + 2);
            batch.push(b'[');
            let mut items = 0u64;
            while items < options.batch_size && options.max_events.is_none_or(|m| generated < m) {
                if items > 0 {
                    batch.push(b',');
                }
                let written = match fleet.next_item(now) {
                    Item::Valid(reading) => serde_json::to_writer(&mut batch, &reading),
                    Item::Invalid(value) => serde_json::to_writer(&mut batch, &value),
                };
                if written.is_err() {
                    break 'produce;
                }
                items += 1;
                generated += 1;
            }
            batch.push(b']');
            let request = AppRequest {
                path_and_query: "/v1/telemetry".into(),
                body: batch,
                content_type: Some("application/json"),
                basic: None,
                headers: Vec::new(),
            };
            (items, Some(request))
        };
        if let (Some(file), finished) = (ground_truth.as_mut(), fleet.take_finished()) {
            write_truth(file, &finished);
        }
        if let Some(request) = request {
            tokio::select! {
                sent = batches_tx.send((items, request)) => if sent.is_err() { break },
                _ = stop.changed() => {}
            }
        }
        if last_progress.elapsed() > Duration::from_millis(250) {
            last_progress = Instant::now();
            progress.set_position(started.elapsed().as_millis() as u64);
            let accepted = counters.accepted.load(Ordering::Relaxed);
            progress.set_message(format!(
                "{} sent, {} accepted, {:.0} events/s",
                counters.sent.load(Ordering::Relaxed),
                accepted,
                accepted as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
    drop(batches_tx);
    for sender in senders {
        let _ = sender.await;
    }
    progress.finish_and_clear();
    if let Some(file) = ground_truth.as_mut() {
        write_truth(file, &fleet.take_finished());
        write_truth(file, &fleet.running());
    }

    let duration_s = started.elapsed().as_secs_f64();
    let histogram = latencies.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    let accepted = counters.accepted.load(Ordering::Relaxed);
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(SimReport {
        duration_s,
        requests: counters.requests.load(Ordering::Relaxed),
        request_errors: counters.request_errors.load(Ordering::Relaxed),
        sent: counters.sent.load(Ordering::Relaxed),
        accepted,
        rejected: counters.rejected.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        sent_invalid: fleet.bad_items,
        events_per_s: accepted as f64 / duration_s.max(1e-9),
        latency: Latency {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: histogram.max() as f64 / 1000.0,
        },
        anomalies_injected: fleet.injected,
        errors,
    })
}

fn write_truth(file: &mut std::fs::File, truths: &[GroundTruth]) {
    for truth in truths {
        if let Ok(line) = serde_json::to_string(truth) {
            if let Err(error) = writeln!(file, "{line}") {
                tracing::warn!(%error, "ground truth write failed");
            }
        }
    }
}

async fn send_batch(
    client: &reqwest::Client,
    base_url: &str,
    items: u64,
    request: AppRequest,
    counters: &Counters,
    latencies: &Mutex<Histogram<u64>>,
    errors: &Mutex<Vec<String>>,
) {
    let note = |message: String| {
        let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 5 {
            errors.push(message);
        }
    };
    let telemetry = request.path_and_query == "/v1/telemetry";
    let url = format!("{base_url}{}", request.path_and_query);
    let mut builder = client.post(&url).body(request.body);
    if let Some(content_type) = request.content_type {
        builder = builder.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    if let Some((user, password)) = &request.basic {
        builder = builder.basic_auth(user, Some(password));
    }
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let started = Instant::now();
    let result = builder.send().await;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    counters.sent.fetch_add(items, Ordering::Relaxed);
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            counters.request_errors.fetch_add(1, Ordering::Relaxed);
            counters.failed.fetch_add(items, Ordering::Relaxed);
            note(format!("POST {url}: {error}"));
            return;
        }
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let elapsed_us = started.elapsed().as_micros() as u64;
    let _ = latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(elapsed_us.max(1));
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let count = |field: &str| parsed.get(field).and_then(serde_json::Value::as_u64);
    let counted = if telemetry || !status.is_success() {
        (count("accepted"), count("rejected"), count("failed"))
    } else {
        // A tracker app's request is answered 200 when its reading was taken.
        (Some(items), Some(0), Some(0))
    };
    match counted {
        (Some(accepted), Some(rejected), Some(failed)) => {
            counters.accepted.fetch_add(accepted, Ordering::Relaxed);
            counters.rejected.fetch_add(rejected, Ordering::Relaxed);
            counters.failed.fetch_add(failed, Ordering::Relaxed);
            if status.is_server_error() {
                counters.request_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            counters.request_errors.fetch_add(1, Ordering::Relaxed);
            counters.failed.fetch_add(items, Ordering::Relaxed);
            note(format!(
                "POST {url}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
    }
}
