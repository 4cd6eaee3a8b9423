//! The cost bench's request counts (`scripts/cost-bench`, docs/cost.md) on both AWS-API
//! emulators: the real `geostream-local --backend aws --cost-report`, its simulator in the
//! regime a real fleet produces (each vehicle once per batch, one reading per POST), the event
//! source mappings as Terraform deploys them. What each function asks of AWS per reading does
//! not depend on the emulator; what the emulator answers does not change it either.

mod common;

use std::collections::BTreeMap;

use common::emulator;

/// `(function, operation) -> requests per reading`, and the data-plane total, from the report.
fn requests_per_reading(report: &str) -> (BTreeMap<(String, String), f64>, f64) {
    let section = report
        .split("Requests per reading (measured):")
        .nth(1)
        .unwrap_or_else(|| panic!("no requests section in the report:\n{report}"));
    let mut per_operation = BTreeMap::new();
    let mut total = None;
    for line in section.lines().skip(2) {
        if line.trim().is_empty() {
            break;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let value: f64 = words
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("not a figure at the end of {line:?}"));
        if line.contains("data-plane requests per reading") {
            total = Some(value);
        } else if let [function, operation, _] = words[..] {
            per_operation.insert((function.to_string(), operation.to_string()), value);
        }
    }
    (per_operation, total.expect("a data-plane total"))
}

fn cost_bench(endpoint: &str, emulator: &str) {
    let prefix = format!("cost-{emulator}-{}", std::process::id());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_geostream-local"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "aws",
            "--endpoint-url",
            endpoint,
            "--create-resources",
            "--resource-prefix",
            &prefix,
            "--archive",
            "s3",
            "--simulate",
            "--vehicles",
            "30",
            "--interval-ms",
            "2000",
            "--batch-size",
            "1",
            "--duration-s",
            "12",
            "--quiet",
            "--cost-report",
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("geostream-local runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "geostream-local failed on {emulator}: {}\n{report}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (per_operation, total) = requests_per_reading(&report);
    println!("{emulator}: data-plane requests per reading {total:.3}: {per_operation:?}");
    let of = |function: &str, operation: &str| {
        per_operation
            .get(&(function.to_string(), operation.to_string()))
            .copied()
            .unwrap_or(0.0)
    };
    // One PutRecords per POST of one reading.
    assert_eq!(of("ingest", "PutRecords"), 1.0, "{report}");
    // At most one conditional PutItem per vehicle and batch: one per reading while each vehicle
    // is once per batch, fewer when POSTs bunch so that two of a vehicle's readings share a
    // batch (the first batches of a short run, a busy machine: 0.85-0.97 seen). The bounds are
    // the cost's: never more than these per reading.
    let geo_update = of("geo-update", "PutItem");
    assert!(
        (0.5..=1.0).contains(&geo_update),
        "geo-update {geo_update}: {report}"
    );
    // A rule-state read per vehicle and batch, and a write when the state changed (a
    // transaction only with an alert record).
    let inspector = of("anomaly-inspector", "GetItem")
        + of("anomaly-inspector", "PutItem")
        + of("anomaly-inspector", "TransactWriteItems");
    assert!(
        (1.0..=2.05).contains(&inspector),
        "anomaly-inspector {inspector}: {report}"
    );
    // One object per archiver batch (up to 1,000 readings or 5 s).
    assert!(of("archiver", "PutObject") < 0.2, "{report}");
    // Trips, stops and minute summaries: one BatchWriteItem (up to 25 items) per inspector batch
    // whose history changed. A per-batch cost: this short run's batches hold 4-6 readings (15
    // readings/s over 4 shards and a 1 s window), so up to about 0.2 per reading here (0.168 seen),
    // about 0.01 with full batches of 100.
    let history = of("anomaly-inspector", "BatchWriteItem");
    assert!(history <= 0.25, "history {history}: {report}");
    // The sum of the bounds above and the inspector's one Scan at start (0.006 here): 4.09-4.25
    // seen.
    assert!((2.5..=4.55).contains(&total), "{total}: {report}");
}

#[test]
fn requests_per_reading_on_moto() {
    if let Some(endpoint) = emulator("GEOSTREAM_AWS_ENDPOINT") {
        cost_bench(&endpoint, "moto");
    }
}

#[test]
fn requests_per_reading_on_localstack() {
    if let Some(endpoint) = emulator("GEOSTREAM_LOCALSTACK_ENDPOINT") {
        cost_bench(&endpoint, "localstack");
    }
}
