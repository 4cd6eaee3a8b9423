//! The local runner's view of the functions' metrics: what each invocation measured (the same
//! values the Lambda functions write as EMF lines), kept as per-second series over a short
//! window for the live page's charts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use geostream_shared::metrics::{emf_document, Measurements, MetricName, MetricsSink, Unit};
use geostream_shared::{now_millis, EpochMillis};
use serde::Serialize;

/// How much history the local series keep.
pub const WINDOW_SECONDS: i64 = 900;

/// One second of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bucket {
    /// Epoch seconds.
    pub t: i64,
    pub sum: f64,
    pub count: u64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub function: String,
    pub metric: MetricName,
    pub unit: Unit,
    pub points: Vec<Bucket>,
}

#[derive(Default)]
pub struct LocalMetrics {
    series: Mutex<BTreeMap<(String, MetricName), VecDeque<Bucket>>>,
    /// Kept only when asked for (the cost report): rendering each invocation's EMF line to
    /// count its bytes is work the embedded pipeline's hot path has no use for.
    invocations: Option<Mutex<BTreeMap<String, Invocations>>>,
}

/// What a function's invocations added up to since the stack started (the cost report's input).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invocations {
    pub count: u64,
    /// The bytes of the EMF lines the function would have written to its log group.
    pub emf_bytes: u64,
    /// Each metric's sum over all invocations.
    pub sums: BTreeMap<MetricName, f64>,
}

impl LocalMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also adds up every function's invocations, EMF bytes and metric sums
    /// ([`LocalMetrics::invocations`]).
    pub fn counting_invocations() -> Self {
        LocalMetrics {
            invocations: Some(Mutex::default()),
            ..Self::default()
        }
    }

    fn record_at(&self, function: &str, measurements: &Measurements, now: EpochMillis) {
        let second = now.div_euclid(1000);
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for &(name, value) in measurements.values() {
            let buckets = series.entry((function.to_string(), name)).or_default();
            match buckets.back_mut() {
                Some(last) if last.t == second => {
                    last.sum += value;
                    last.count += 1;
                    last.max = last.max.max(value);
                }
                _ => buckets.push_back(Bucket {
                    t: second,
                    sum: value,
                    count: 1,
                    max: value,
                }),
            }
            while buckets
                .front()
                .is_some_and(|b| b.t <= second - WINDOW_SECONDS)
            {
                buckets.pop_front();
            }
        }
    }

    /// Every series, with the buckets after `since` (epoch seconds).
    pub fn series_since(&self, since: i64) -> Vec<Series> {
        let series = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        series
            .iter()
            .map(|((function, metric), buckets)| Series {
                function: function.clone(),
                metric: *metric,
                unit: metric.unit(),
                points: buckets.iter().filter(|b| b.t > since).copied().collect(),
            })
            .collect()
    }
}

impl LocalMetrics {
    /// Every function's invocations so far (empty unless built [`counting_invocations`]).
    ///
    /// [`counting_invocations`]: LocalMetrics::counting_invocations
    pub fn invocations(&self) -> BTreeMap<String, Invocations> {
        self.invocations
            .as_ref()
            .map_or_else(BTreeMap::new, |tally| {
                tally
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone()
            })
    }

    fn tally(&self, function: &str, measurements: &Measurements, now: EpochMillis) {
        let Some(tally) = &self.invocations else {
            return;
        };
        // The line the Lambda function writes, under its deployed name.
        let line = emf_document(&format!("geostream-{function}"), measurements, now).to_string();
        let mut invocations = tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tally = invocations.entry(function.to_string()).or_default();
        tally.count += 1;
        tally.emf_bytes += line.len() as u64 + 1;
        for &(name, value) in measurements.values() {
            *tally.sums.entry(name).or_default() += value;
        }
    }
}

impl MetricsSink for LocalMetrics {
    fn publish(&self, function: &str, measurements: &Measurements) {
        let now = now_millis();
        self.record_at(function, measurements, now);
        self.tally(function, measurements, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sum of a metric over the whole window.
    fn total(metrics: &LocalMetrics, function: &str, metric: MetricName) -> f64 {
        metrics
            .series_since(i64::MIN)
            .iter()
            .filter(|s| s.function == function && s.metric == metric)
            .flat_map(|s| s.points.iter().map(|b| b.sum))
            .sum()
    }

    #[test]
    fn buckets_per_second_and_forgets_past_the_window() {
        let metrics = LocalMetrics::new();
        let mut m = Measurements::default();
        m.count(MetricName::EventsAccepted, 10);
        m.millis(MetricName::RequestDuration, 4.0);
        metrics.record_at("ingest", &m, 1_000_000);
        metrics.record_at("ingest", &m, 1_000_900);
        metrics.record_at("ingest", &m, 1_001_100);
        let series = metrics.series_since(0);
        let accepted = series
            .iter()
            .find(|s| s.metric == MetricName::EventsAccepted)
            .unwrap();
        assert_eq!(
            accepted.points,
            [
                Bucket {
                    t: 1000,
                    sum: 20.0,
                    count: 2,
                    max: 10.0
                },
                Bucket {
                    t: 1001,
                    sum: 10.0,
                    count: 1,
                    max: 10.0
                },
            ]
        );
        assert_eq!(total(&metrics, "ingest", MetricName::EventsAccepted), 30.0);
        metrics.record_at("ingest", &m, (1001 + WINDOW_SECONDS) * 1000);
        assert_eq!(total(&metrics, "ingest", MetricName::EventsAccepted), 10.0);
        assert_eq!(
            metrics.series_since(1000 + WINDOW_SECONDS)[0].points.len(),
            1
        );
    }
}
