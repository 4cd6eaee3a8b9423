//! A running local stack: its handlers, what they run on, and the counters `/local/stats` and
//! the live page show.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use geostream_ingest::Ingest;
use geostream_lambda::jwt::JwtVerifier;
use geostream_query_api::QueryApi;
use geostream_shared::model::Position;
use geostream_shared::ports::AlertStore;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::MemoryBudget;
use crate::esm::{Mapping, MappingSnapshot};
use crate::metrics::LocalMetrics;
use crate::positions::{LatencySnapshot, LatestPositions, SinceReading};
use crate::wiring::{AwsUsage, MemoryParts};

/// The handlers of one local stack and what they run on.
pub struct Stack {
    pub ingest: Ingest,
    pub query_api: QueryApi,
    /// Verifies bearer tokens before a request reaches a handler (`--jwks`).
    pub tokens: Option<JwtVerifier>,
    pub post_to_position: Arc<SinceReading>,
    /// From a reading's event time to the alert transition it made, published.
    pub post_to_alert: Arc<SinceReading>,
    /// Kept where the position store cannot list vehicles cheaply (DynamoDB).
    pub latest_positions: Option<Arc<LatestPositions>>,
    /// One event source mapping per stream function.
    pub mappings: Vec<Mapping>,
    /// Set on the embedded backend.
    pub memory: Option<MemoryParts>,
    pub memory_budget: MemoryBudget,
    /// What the embedded backend's retention removed.
    pub expired: Arc<crate::retention::Expired>,
    /// Set on the AWS backend: each function's API calls and capacity units so far.
    pub aws_usage: Option<AwsUsage>,
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
    /// The embedded backend's memory: its budget, what each bounded part holds, what was
    /// evicted or trimmed to stay within it.
    pub memory: Option<MemoryStats>,
    pub dead_letters: Option<u64>,
    pub mappings: Vec<MappingSnapshot>,
    pub post_to_position: LatencySnapshot,
    pub post_to_alert: LatencySnapshot,
    pub aws_calls: Option<BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct MemoryStats {
    pub budget_bytes: usize,
    /// The process's resident memory, as the operating system counts it.
    pub resident_bytes: Option<u64>,
    pub archive_bytes: usize,
    pub archive_max_bytes: usize,
    /// The archive's bytes per reading held (readings, eviction queue and per-vehicle tracks).
    pub archive_bytes_per_reading: Option<f64>,
    /// Readings evicted, oldest first, to keep the archive within its part of the budget.
    pub evicted_readings: u64,
    pub telemetry_stream_bytes: usize,
    pub alert_stream_bytes: usize,
    /// Stream records trimmed by retention (records or bytes), read or not; a reader that had
    /// not read them counts them as expired in its mapping's read errors.
    pub trimmed_stream_records: u64,
    /// Publishes to the telemetry stream that waited for its slowest function (its backlog on
    /// a shard at the runner's bound, [`crate::MemoryBudget::telemetry_backlog`]), and of them
    /// those that waited the longest allowed and went ahead: the gateway slows its clients
    /// rather than trim unread records.
    pub held_back_publishes: u64,
    pub publishes_waited_out: u64,
    /// Trips, stops and minute summaries, and how many were evicted (first written first) to
    /// keep them within their part.
    pub history_bytes: usize,
    pub evicted_history_items: u64,
    /// What retention by age removed, per kind (`--retention`).
    pub expired: crate::retention::ExpiredCounts,
}

impl MemoryStats {
    fn of(
        memory: &MemoryParts,
        budget: MemoryBudget,
        expired: crate::retention::ExpiredCounts,
    ) -> MemoryStats {
        let (held_back_publishes, publishes_waited_out) = memory.telemetry.held_back();
        let archived = memory.archive.len();
        let archive_bytes = memory.archive.bytes();
        MemoryStats {
            budget_bytes: budget.bytes,
            resident_bytes: resident_bytes(),
            archive_bytes,
            archive_max_bytes: memory.archive.max_bytes(),
            archive_bytes_per_reading: (archived > 0)
                .then(|| ((archive_bytes as f64 / archived as f64) * 10.0).round() / 10.0),
            evicted_readings: memory.archive.evicted(),
            telemetry_stream_bytes: memory.telemetry.bytes(),
            alert_stream_bytes: memory.alert_stream.bytes(),
            trimmed_stream_records: memory.telemetry.trimmed() + memory.alert_stream.trimmed(),
            held_back_publishes,
            publishes_waited_out,
            history_bytes: memory.history.bytes(),
            evicted_history_items: memory.history.evicted(),
            expired,
        }
    }
}

/// This process's resident set size.
pub fn resident_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut system = sysinfo::System::new();
    system.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[pid]),
        false,
        sysinfo::ProcessRefreshKind::nothing().with_memory(),
    );
    system.process(pid).map(sysinfo::Process::memory)
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
            memory: memory.map(|m| MemoryStats::of(m, self.memory_budget, self.expired.counts())),
            dead_letters: memory.map(|m| m.dead_letters.snapshot().1),
            mappings: self.mappings.iter().map(Mapping::snapshot).collect(),
            post_to_position: self.post_to_position.snapshot(),
            post_to_alert: self.post_to_alert.snapshot(),
            aws_calls: self.aws_usage.as_ref().map(AwsUsage::calls),
        }
    }

    /// Every vehicle's latest position: the in-memory store's, or (on the AWS backend) the
    /// ones this runner has written.
    pub fn vehicles(&self) -> Vec<Position> {
        match (&self.memory, &self.latest_positions) {
            (Some(memory), _) => memory.positions.all(),
            (None, Some(latest)) => latest.all(),
            (None, None) => Vec::new(),
        }
    }
}

/// A started stack: its address, its parts, and the handle to stop it.
pub struct RunningStack {
    pub addr: SocketAddr,
    pub stack: Arc<Stack>,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningStack {
    /// Waits until every stream function has caught up, at most `timeout`; false on time-out
    /// (see [`crate::drain`]).
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        crate::drain::wait_drained(&self.stack, timeout).await
    }

    /// Stops the gateway and the mapping loops (each finishes its batch in flight).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
