//! What the functions measure (docs/architecture.md, "Observability"): counters and timings per invocation,
//! published by a [`MetricsSink`]. On Lambda the sink writes CloudWatch Embedded Metric Format
//! log lines ([`EmfLog`]: CloudWatch Logs turns them into metrics, no PutMetricData on the hot
//! path); the local runner keeps short time series of the same values.
//!
//! EMF is a JSON document per log line; it is written here with serde_json rather than a
//! `metrics`-facade exporter because the local runner hosts every function in one process and
//! must tell their metrics apart per invocation, which a process-global recorder cannot.

use std::io::Write;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{now_millis, EpochMillis};

/// The CloudWatch namespace of every GeoStream metric.
pub const NAMESPACE: &str = "GeoStream";
/// The one dimension of every GeoStream metric: the (deployed) function name, as AWS/Lambda's
/// own metrics name it.
pub const FUNCTION_DIMENSION: &str = "FunctionName";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Unit {
    Count,
    Milliseconds,
}

macro_rules! metric_names {
    ($($name:ident: $unit:ident, $doc:literal;)*) => {
        /// Every metric a GeoStream function emits.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum MetricName {
            $(#[doc = $doc] $name,)*
        }

        impl MetricName {
            pub const ALL: &'static [MetricName] = &[$(MetricName::$name,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(MetricName::$name => stringify!($name),)*
                }
            }

            pub fn unit(self) -> Unit {
                match self {
                    $(MetricName::$name => Unit::$unit,)*
                }
            }
        }
    };
}

metric_names! {
    EventsAccepted: Count, "Readings the ingest function validated and the bus took.";
    EventsRejected: Count, "Readings refused by validation (answered 207/400 with the reasons).";
    EventsFailed: Count, "Valid readings the bus did not take (answered 207/503: retry them).";
    RequestDuration: Milliseconds, "Time to answer one HTTP request.";
    Requests: Count, "HTTP requests answered.";
    ClientErrors: Count, "HTTP requests answered 4xx.";
    DevicesThrottled: Count, "Requests of a device over its limit (a device's 429, or a gateway's items of that device), one per device per request.";
    DevicesRefused: Count, "Tracker app requests refused for their device's secret (none, a wrong one: 401; a revoked device: 403).";
    RecordsIn: Count, "Stream records handed to a stream function.";
    RecordsRetried: Count, "Stream records answered as batch item failures (to be retried).";
    IteratorAge: Milliseconds, "Age of the oldest record of a batch when its handling began.";
    BatchDuration: Milliseconds, "Time to handle one stream batch.";
    DeadLetters: Count, "Records sent to the dead-letter sink with their reason.";
    PositionsUpdated: Count, "Vehicle positions written (newer than what the store held).";
    PositionsStale: Count, "Position writes the store refused as older than what it holds.";
    ReadingsArchived: Count, "Readings the archive took.";
    ArchiveRejects: Count, "Readings the archive refused (sent to dead letters).";
    AlertsRaised: Count, "Alerts raised by the rules.";
    AlertsCleared: Count, "Alerts cleared by the rules.";
    AlertsRetracted: Count, "Published raises and clears retracted: a late reading, evaluated in its place, undid them.";
    ReadingsTooLate: Count, "Readings behind the rules' lateness bound: archived, not evaluated by the rules.";
}

impl std::str::FromStr for MetricName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        MetricName::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| format!("{name} is not a GeoStream metric"))
    }
}

/// The values one invocation measured, in the order they were recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurements {
    values: Vec<(MetricName, f64)>,
}

impl Measurements {
    pub fn count(&mut self, name: MetricName, count: usize) {
        self.values.push((name, count as f64));
    }

    pub fn millis(&mut self, name: MetricName, millis: f64) {
        self.values.push((name, millis));
    }

    pub fn extend(&mut self, other: Measurements) {
        self.values.extend(other.values);
    }

    pub fn values(&self) -> &[(MetricName, f64)] {
        &self.values
    }

    /// The value recorded under `name` (summed when recorded more than once).
    pub fn get(&self, name: MetricName) -> Option<f64> {
        self.values
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .reduce(|a, b| a + b)
    }
}

/// Where a function's measurements go.
pub trait MetricsSink: Send + Sync {
    /// `function` is the logical function name (`ingest`, `geo-update`, ...).
    fn publish(&self, function: &str, measurements: &Measurements);
}

/// Writes each invocation's measurements as one CloudWatch Embedded Metric Format line.
pub struct EmfLog {
    /// The `FunctionName` dimension: the deployed name (`AWS_LAMBDA_FUNCTION_NAME` on Lambda).
    function_name: String,
    out: Mutex<Box<dyn Write + Send>>,
}

impl EmfLog {
    /// EMF lines to standard output, which Lambda sends to the function's log group.
    pub fn stdout(function_name: impl Into<String>) -> Self {
        Self::to_writer(function_name, Box::new(std::io::stdout()))
    }

    pub fn to_writer(function_name: impl Into<String>, out: Box<dyn Write + Send>) -> Self {
        EmfLog {
            function_name: function_name.into(),
            out: Mutex::new(out),
        }
    }
}

/// The EMF document of one invocation's measurements. Values recorded more than once are
/// written as an array, which EMF takes as several samples of the metric.
pub fn emf_document(
    function_name: &str,
    measurements: &Measurements,
    timestamp: EpochMillis,
) -> Value {
    let mut values: Map<String, Value> = Map::new();
    let mut definitions = Vec::new();
    for (name, value) in measurements.values() {
        match values.get_mut(name.as_str()) {
            None => {
                values.insert(name.as_str().to_string(), json!(value));
                definitions.push(json!({"Name": name.as_str(), "Unit": name.unit()}));
            }
            Some(Value::Array(samples)) => samples.push(json!(value)),
            Some(first) => *first = json!([first.take(), value]),
        }
    }
    values.insert(FUNCTION_DIMENSION.to_string(), json!(function_name));
    values.insert(
        "_aws".to_string(),
        json!({
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[FUNCTION_DIMENSION]],
                "Metrics": definitions,
            }],
        }),
    );
    Value::Object(values)
}

impl MetricsSink for EmfLog {
    fn publish(&self, _function: &str, measurements: &Measurements) {
        if measurements.values().is_empty() {
            return;
        }
        let line = emf_document(&self.function_name, measurements, now_millis()).to_string();
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // One write per line so that concurrent log output cannot split an EMF document.
        if let Err(error) = out.write_all(format!("{line}\n").as_bytes()) {
            tracing::warn!(%error, "could not write metrics");
        }
    }
}

/// Keeps every publication (tests read them back).
#[derive(Default)]
pub struct RecordedMetrics {
    published: Mutex<Vec<(String, Measurements)>>,
}

impl RecordedMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sum of `name` over every publication by `function`.
    pub fn total(&self, function: &str, name: MetricName) -> f64 {
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|(f, _)| f == function)
            .filter_map(|(_, m)| m.get(name))
            .sum()
    }
}

impl MetricsSink for RecordedMetrics {
    fn publish(&self, function: &str, measurements: &Measurements) {
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((function.to_string(), measurements.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_emf_document_cloudwatch_accepts() {
        let mut m = Measurements::default();
        m.count(MetricName::EventsAccepted, 498);
        m.count(MetricName::EventsRejected, 2);
        m.millis(MetricName::RequestDuration, 3.5);
        m.millis(MetricName::RequestDuration, 4.0);
        let doc = emf_document("geostream-ingest", &m, 1_763_900_000_000);
        assert_eq!(
            doc,
            json!({
                "_aws": {
                    "Timestamp": 1_763_900_000_000i64,
                    "CloudWatchMetrics": [{
                        "Namespace": "GeoStream",
                        "Dimensions": [["FunctionName"]],
                        "Metrics": [
                            {"Name": "EventsAccepted", "Unit": "Count"},
                            {"Name": "EventsRejected", "Unit": "Count"},
                            {"Name": "RequestDuration", "Unit": "Milliseconds"},
                        ],
                    }],
                },
                "FunctionName": "geostream-ingest",
                "EventsAccepted": 498.0,
                "EventsRejected": 2.0,
                "RequestDuration": [3.5, 4.0],
            })
        );
    }

    #[test]
    fn emf_lines_are_whole_json_documents() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Shared::default();
        let sink = EmfLog::to_writer("geostream-archiver", Box::new(buffer.clone()));
        let mut m = Measurements::default();
        m.count(MetricName::ReadingsArchived, 10);
        sink.publish("archiver", &m);
        sink.publish("archiver", &Measurements::default());
        sink.publish("archiver", &m);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "empty measurements write nothing");
        assert_eq!(lines[1]["ReadingsArchived"], json!(10.0));
        assert_eq!(lines[1]["FunctionName"], json!("geostream-archiver"));
    }

    #[test]
    fn metric_names_round_trip() {
        for name in MetricName::ALL {
            assert_eq!(name.as_str().parse::<MetricName>(), Ok(*name));
        }
        assert!("Bogus".parse::<MetricName>().is_err());
    }
}
