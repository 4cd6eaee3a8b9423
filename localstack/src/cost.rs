//! The cost report: what a run through the AWS adapters consumed, per function and per AWS
//! operation, turned into dollars per million readings and per vehicle per month for the two
//! reference fleets (docs/cost.md).
//!
//! What is measured and what is modelled:
//! - Measured in the run: each function's requests per operation and the capacity units its
//!   adapters consumed ([`geostream_aws::capacity`]), its invocations, the bytes of its EMF lines,
//!   its processing time per record, and the readings ingested.
//! - Modelled for a fleet: how full the event source mappings' batches are (the fleet's records
//!   per shard and second, the batch size and the batching window), and from that the stream
//!   functions' invocations per reading. The archiver writes per batch, so its requests are
//!   scaled per invocation; the other functions write per vehicle and batch, which in the
//!   realistic regime (each vehicle once per batch) is per reading, so theirs are taken as
//!   measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use geostream_aws::capacity::Unit;
use geostream_shared::metrics::MetricName;
use serde::Deserialize;

use crate::metrics::Invocations;
use crate::wiring::{AwsUsage, EVENT_SOURCE_MAPPINGS};

/// The bundled price table.
pub const BUNDLED_PRICES: &str = include_str!("../aws-prices.toml");

const HOURS_PER_MONTH: f64 = 730.0;
const GB: f64 = 1024.0 * 1024.0 * 1024.0;
/// Records per second a Kinesis shard takes; fleets are sized with a quarter of headroom.
const SHARD_RECORDS_PER_SECOND: f64 = 1000.0;
const SHARD_HEADROOM: f64 = 1.25;
/// Every function's memory in Terraform (`infra/modules/function`, `memory_mb`).
pub const LAMBDA_MEMORY_MB: f64 = 256.0;
/// The stream functions, in pipeline order.
const STREAM_FUNCTIONS: [&str; 3] = ["geo-update", "archiver", "anomaly-inspector"];
/// What a vehicle keeps in Valkey: its position hash, its geo set member and its rule state.
const VALKEY_BYTES_PER_VEHICLE: f64 = 1536.0;
/// The function whose writes are per batch rather than per vehicle.
const PER_BATCH_FUNCTION: &str = "archiver";

#[derive(Debug, Clone, Deserialize)]
pub struct PriceTable {
    pub date: String,
    pub region: String,
    pub prices: BTreeMap<String, Price>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Price {
    pub usd: f64,
    pub per: f64,
    pub source: String,
}

impl PriceTable {
    pub fn parse(text: &str) -> Result<PriceTable, String> {
        let table: PriceTable = toml::from_str(text).map_err(|e| e.to_string())?;
        for name in REQUIRED_PRICES {
            if !table.prices.contains_key(*name) {
                return Err(format!("no price named {name}"));
            }
        }
        Ok(table)
    }

    /// The price of one unit of `name`.
    fn unit(&self, name: &str) -> f64 {
        self.prices
            .get(name)
            .map_or(0.0, |price| price.usd / price.per.max(1e-12))
    }
}

const REQUIRED_PRICES: &[&str] = &[
    "api_gateway_http_request",
    "lambda_request",
    "lambda_arm64_gb_second",
    "kinesis_shard_hour",
    "kinesis_put_payload_unit",
    "kinesis_on_demand_stream_hour",
    "kinesis_on_demand_gb_in",
    "kinesis_on_demand_gb_out",
    "dynamodb_write_request_unit",
    "dynamodb_read_request_unit",
    "s3_put_request",
    "s3_get_request",
    "s3_gb_month",
    "timestream_write_unit",
    "cloudwatch_logs_gb",
    "cloudwatch_metric_month",
    "sqs_request",
    "elasticache_serverless_valkey_ecpu",
    "elasticache_serverless_valkey_gb_hour",
    "vpc_interface_endpoint_hour",
];

/// A reference fleet: how many vehicles, how often each reports.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    pub name: &'static str,
    pub vehicles: f64,
    pub interval_s: f64,
}

pub const FLEETS: [Fleet; 2] = [
    Fleet {
        name: "A",
        vehicles: 10_000.0,
        interval_s: 2.0,
    },
    Fleet {
        name: "B",
        vehicles: 100_000.0,
        interval_s: 10.0,
    },
];

impl Fleet {
    fn readings_per_second(&self) -> f64 {
        self.vehicles / self.interval_s
    }

    fn readings_per_month(&self) -> f64 {
        self.readings_per_second() * 3600.0 * HOURS_PER_MONTH
    }

    fn shards(&self) -> f64 {
        (self.readings_per_second() * SHARD_HEADROOM / SHARD_RECORDS_PER_SECOND)
            .ceil()
            .max(1.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KinesisMode {
    OnDemand,
    Provisioned,
}

/// What the report assumes about the deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub batch_size: usize,
    pub batching_window_s: f64,
    pub archiver_batch_size: usize,
    pub archiver_batching_window_s: f64,
    pub kinesis: KinesisMode,
    /// Bytes of Lambda's own START/END/REPORT lines per invocation (0 at system log level WARN).
    pub platform_log_bytes: f64,
    /// Months the archive keeps a reading (its S3 lifecycle).
    pub archive_months: f64,
}

/// One run's measurements.
pub struct Measured {
    pub usage: AwsUsage,
    pub invocations: BTreeMap<String, Invocations>,
}

impl Measured {
    fn readings(&self) -> f64 {
        self.sum("ingest", MetricName::EventsAccepted)
    }

    fn sum(&self, function: &str, metric: MetricName) -> f64 {
        self.invocations
            .get(function)
            .and_then(|i| i.sums.get(&metric))
            .copied()
            .unwrap_or(0.0)
    }

    fn invocations_of(&self, function: &str) -> f64 {
        self.invocations
            .get(function)
            .map_or(0.0, |i| i.count as f64)
    }

    fn calls(&self, function: &str) -> BTreeMap<String, u64> {
        self.usage
            .functions
            .iter()
            .find(|u| u.function == function)
            .map(|u| u.calls.snapshot())
            .unwrap_or_default()
    }

    fn units(&self, function: &str) -> BTreeMap<Unit, f64> {
        self.usage
            .functions
            .iter()
            .find(|u| u.function == function)
            .map(|u| u.capacity.snapshot())
            .unwrap_or_default()
    }
}

/// One line of the dollar table: a component's cost per million readings for each fleet.
#[derive(Debug, Clone)]
pub struct CostLine {
    pub component: String,
    pub after_ingress: bool,
    /// Per fleet, in [`FLEETS`] order.
    pub usd_per_million: Vec<f64>,
}

/// Everything the report prints, for tests and the bench to read.
#[derive(Debug, Clone)]
pub struct CostReport {
    pub readings: f64,
    pub readings_per_post: f64,
    /// (function, operation) -> requests per reading, as measured.
    pub requests_per_reading: BTreeMap<(String, String), f64>,
    /// (function, unit) -> units per reading, as measured.
    pub units_per_reading: BTreeMap<(String, &'static str), f64>,
    pub lines: Vec<CostLine>,
    /// Ingress per POST (API Gateway and the ingest invocation): what devices that send several
    /// readings per POST divide.
    pub ingress_per_post_usd: f64,
}

impl CostReport {
    pub fn total_after_ingress(&self, fleet: usize) -> f64 {
        self.lines
            .iter()
            .filter(|l| l.after_ingress)
            .map(|l| l.usd_per_million[fleet])
            .sum()
    }

    pub fn total_ingress(&self, fleet: usize) -> f64 {
        self.lines
            .iter()
            .filter(|l| !l.after_ingress)
            .map(|l| l.usd_per_million[fleet])
            .sum()
    }
}

/// Builds the report; `None` when the run ingested nothing.
pub fn report(
    measured: &Measured,
    deployment: &Deployment,
    prices: &PriceTable,
) -> Option<CostReport> {
    let readings = measured.readings();
    if readings <= 0.0 {
        return None;
    }
    let posts = measured.invocations_of("ingest").max(1.0);
    let mut requests_per_reading = BTreeMap::new();
    let mut units_per_reading = BTreeMap::new();
    for usage in &measured.usage.functions {
        for (operation, count) in usage.calls.snapshot() {
            requests_per_reading.insert(
                (usage.function.to_string(), operation),
                count as f64 / readings,
            );
        }
        for (unit, amount) in usage.capacity.snapshot() {
            units_per_reading.insert(
                (usage.function.to_string(), unit.as_str()),
                amount / readings,
            );
        }
    }

    let mut lines = Vec::new();
    let mut line = |component: &str, after_ingress: bool, per_fleet: &dyn Fn(&Fleet) -> f64| {
        lines.push(CostLine {
            component: component.to_string(),
            after_ingress,
            usd_per_million: FLEETS.iter().map(|f| per_fleet(f) * 1e6).collect(),
        });
    };
    let price = |name: &str| prices.unit(name);
    let per_reading = |function: &str, unit: Unit| {
        measured.units(function).get(&unit).copied().unwrap_or(0.0) / readings
    };
    let memory_gb = LAMBDA_MEMORY_MB / 1024.0;
    let log_gb_per_invocation = |function: &str| {
        let emf = measured
            .invocations
            .get(function)
            .map_or(0.0, |i| i.emf_bytes as f64 / (i.count as f64).max(1.0));
        (emf + deployment.platform_log_bytes) / GB
    };

    // Ingress: one API Gateway request and one ingest invocation per POST.
    let readings_per_post = readings / posts;
    line("ingress: API Gateway HTTP API", false, &|_| {
        price("api_gateway_http_request") / readings_per_post
    });
    let ingest_ms = measured.sum("ingest", MetricName::RequestDuration) / posts;
    let ingest_per_post = price("lambda_request")
        + billed_ms(ingest_ms) / 1000.0 * memory_gb * price("lambda_arm64_gb_second")
        + log_gb_per_invocation("ingest") * price("cloudwatch_logs_gb");
    line(
        "ingress: ingest Lambda (requests, duration, logs)",
        false,
        &|_| ingest_per_post / readings_per_post,
    );
    let ingress_per_post_usd = price("api_gateway_http_request") + ingest_per_post;

    // The bus: the telemetry records ingest put, the alert transitions, three consumers.
    let telemetry_kib = per_reading("ingest", Unit::KinesisIngressKib);
    let telemetry_units = per_reading("ingest", Unit::KinesisPutPayloadUnits);
    let alerts_kib = per_reading("anomaly-inspector", Unit::KinesisIngressKib);
    let alerts_units = per_reading("anomaly-inspector", Unit::KinesisPutPayloadUnits);
    let kinesis = deployment.kinesis;
    line(
        "bus: Kinesis (telemetry and alerts streams)",
        true,
        &|fleet| {
            let monthly_readings = fleet.readings_per_month();
            match kinesis {
                KinesisMode::OnDemand => {
                    let gb_in = (telemetry_kib + alerts_kib) * 1024.0 / GB;
                    let gb_out = telemetry_kib * 1024.0 / GB * STREAM_FUNCTIONS.len() as f64;
                    gb_in * price("kinesis_on_demand_gb_in")
                        + gb_out * price("kinesis_on_demand_gb_out")
                        + 2.0 * HOURS_PER_MONTH * price("kinesis_on_demand_stream_hour")
                            / monthly_readings
                }
                KinesisMode::Provisioned => {
                    (telemetry_units + alerts_units) * price("kinesis_put_payload_unit")
                        + (fleet.shards() + 1.0) * HOURS_PER_MONTH * price("kinesis_shard_hour")
                            / monthly_readings
                }
            }
        },
    );

    for function in STREAM_FUNCTIONS {
        let invocations = measured.invocations_of(function).max(1.0);
        let records = measured.sum(function, MetricName::RecordsIn).max(1.0);
        let ms_per_record = measured.sum(function, MetricName::BatchDuration) / records;
        let measured_fill = records / invocations;
        let calls = measured.calls(function);
        let (batch_size, window) = if function == PER_BATCH_FUNCTION {
            (
                deployment.archiver_batch_size as f64,
                deployment.archiver_batching_window_s,
            )
        } else {
            (deployment.batch_size as f64, deployment.batching_window_s)
        };
        // Requests of a per-batch writer scale with invocations, the others' with readings.
        let request_cost = |fleet: &Fleet| -> f64 {
            let fill = batch_fill(fleet, batch_size, window);
            let scale = if function == PER_BATCH_FUNCTION {
                measured_fill / fill
            } else {
                1.0
            };
            calls
                .iter()
                .map(|(operation, count)| {
                    *count as f64 / readings * scale * request_price(prices, operation)
                })
                .sum()
        };
        let units_cost = per_reading(function, Unit::DynamoWriteUnits)
            * price("dynamodb_write_request_unit")
            + per_reading(function, Unit::DynamoReadUnits) * price("dynamodb_read_request_unit")
            + per_reading(function, Unit::TimestreamWriteUnits) * price("timestream_write_unit")
            + per_reading(function, Unit::ValkeyEcpus)
                * price("elasticache_serverless_valkey_ecpu");
        line(
            &format!("{function}: AWS requests and capacity"),
            true,
            &|fleet| request_cost(fleet) + units_cost,
        );
        line(
            &format!("{function}: Lambda (invocations, duration, logs)"),
            true,
            &|fleet| {
                let fill = batch_fill(fleet, batch_size, window);
                let per_invocation = price("lambda_request")
                    + log_gb_per_invocation(function) * price("cloudwatch_logs_gb");
                per_invocation / fill
                    + ms_per_record / 1000.0 * memory_gb * price("lambda_arm64_gb_second")
            },
        );
    }
    let archive_bytes = per_reading("archiver", Unit::S3BytesWritten);
    if archive_bytes > 0.0 {
        let months = deployment.archive_months;
        line(
            &format!("archive: S3 storage for {months} months"),
            true,
            &|_| archive_bytes / GB * price("s3_gb_month") * months,
        );
    }
    // A Valkey store: the cache's minimum storage, and the interface endpoints (SQS, Kinesis)
    // in two availability zones that the functions in the VPC reach AWS through.
    let valkey_ecpus: f64 = measured
        .usage
        .functions
        .iter()
        .filter_map(|u| u.capacity.snapshot().get(&Unit::ValkeyEcpus).copied())
        .sum();
    let track_bytes_per_reading = per_reading("archiver", Unit::ValkeyTrackBytes);
    if valkey_ecpus > 0.0 {
        line(
            "valkey: cache storage (0.1 GB minimum) and VPC interface endpoints",
            true,
            &|fleet| {
                // Recent tracks keep each reading for their window; positions and rule state
                // a few hundred bytes per vehicle.
                let track_gb = track_bytes_per_reading
                    * fleet.readings_per_second()
                    * geostream_aws::valkey::RECENT_TRACK_MS as f64
                    / 1000.0
                    / GB;
                let storage_gb =
                    (fleet.vehicles * VALKEY_BYTES_PER_VEHICLE / GB + track_gb).max(0.1);
                let monthly =
                    storage_gb * HOURS_PER_MONTH * price("elasticache_serverless_valkey_gb_hour")
                        + 2.0 * 2.0 * HOURS_PER_MONTH * price("vpc_interface_endpoint_hour");
                monthly / fleet.readings_per_month()
            },
        );
    }
    let dead_letter_requests: f64 = measured.calls("dead-letters").values().sum::<u64>() as f64;
    line("dead letters: SQS", true, &|_| {
        dead_letter_requests / readings * price("sqs_request")
    });
    // Custom metrics are billed per metric and month, whatever the traffic.
    let metrics: f64 = measured
        .invocations
        .values()
        .map(|i| i.sums.len() as f64)
        .sum();
    line("metrics: CloudWatch custom metrics", true, &|fleet| {
        metrics * price("cloudwatch_metric_month") / fleet.readings_per_month()
    });

    Some(CostReport {
        readings,
        readings_per_post,
        requests_per_reading,
        units_per_reading,
        lines,
        ingress_per_post_usd,
    })
}

/// Lambda bills duration per started millisecond.
fn billed_ms(ms: f64) -> f64 {
    ms.ceil().max(1.0)
}

/// Records per invocation at a fleet's rate: a mapping sends a batch when it is full or when
/// the batching window closes (Lambda polls a shard about once a second without one).
fn batch_fill(fleet: &Fleet, batch_size: f64, window_s: f64) -> f64 {
    let per_shard = fleet.readings_per_second() / fleet.shards();
    (per_shard * window_s.max(1.0)).min(batch_size).max(1.0)
}

/// The price of one request of `operation` where requests are what is billed (S3, SQS);
/// DynamoDB, Kinesis and Timestream bill the units counted apart.
fn request_price(prices: &PriceTable, operation: &str) -> f64 {
    match operation {
        "PutObject" | "ListObjectsV2" | "CopyObject" => prices.unit("s3_put_request"),
        "GetObject" | "HeadObject" => prices.unit("s3_get_request"),
        "SendMessageBatch" | "SendMessage" => prices.unit("sqs_request"),
        _ => 0.0,
    }
}

/// The report as the bench prints it.
pub fn render(report: &CostReport, deployment: &Deployment, prices: &PriceTable) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Cost report: {} readings ingested, {:.2} readings per POST; prices {} ({}), \
         batch size {}, batching window {} s (archiver {}, {} s), Kinesis {:?}, Lambda {} MB arm64",
        report.readings,
        report.readings_per_post,
        prices.region,
        prices.date,
        deployment.batch_size,
        deployment.batching_window_s,
        deployment.archiver_batch_size,
        deployment.archiver_batching_window_s,
        deployment.kinesis,
        LAMBDA_MEMORY_MB
    );
    let _ = writeln!(out, "\nRequests per reading (measured):");
    let _ = writeln!(
        out,
        "  {:<24} {:<22} {:>10}",
        "function", "operation", "per reading"
    );
    let mut data_plane = 0.0;
    for ((function, operation), per) in &report.requests_per_reading {
        let _ = writeln!(out, "  {function:<24} {operation:<22} {per:>10.3}");
        if function != EVENT_SOURCE_MAPPINGS {
            data_plane += per;
        }
    }
    let _ = writeln!(
        out,
        "  {:<47} {data_plane:>10.3}",
        "data-plane requests per reading (without the mappings' reads)"
    );
    let _ = writeln!(out, "\nCapacity per reading (measured):");
    for ((function, unit), per) in &report.units_per_reading {
        let _ = writeln!(out, "  {function:<24} {unit:<28} {per:>10.3}");
    }
    let _ = writeln!(out, "\nDollars per million readings:");
    let header: Vec<String> = FLEETS
        .iter()
        .map(|f| {
            format!(
                "{} ({}k veh / {} s)",
                f.name,
                f.vehicles / 1000.0,
                f.interval_s
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "  {:<52} {:>20} {:>20}",
        "component", header[0], header[1]
    );
    for line in &report.lines {
        let _ = writeln!(
            out,
            "  {:<52} {:>20.4} {:>20.4}",
            line.component, line.usd_per_million[0], line.usd_per_million[1]
        );
    }
    let totals = |f: &dyn Fn(usize) -> f64| -> Vec<f64> { (0..FLEETS.len()).map(f).collect() };
    let after = totals(&|i| report.total_after_ingress(i));
    let ingress = totals(&|i| report.total_ingress(i));
    let _ = writeln!(
        out,
        "  {:<52} {:>20.4} {:>20.4}",
        "TOTAL after ingress", after[0], after[1]
    );
    let _ = writeln!(
        out,
        "  {:<52} {:>20.4} {:>20.4}",
        "TOTAL ingress (API Gateway + ingest)", ingress[0], ingress[1]
    );
    let _ = writeln!(
        out,
        "  {:<52} {}",
        "ingress when devices batch readings per POST",
        [1.0, 10.0, 50.0]
            .iter()
            .map(|n| format!("{n}/POST ${:.3}", report.ingress_per_post_usd * 1e6 / n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(out, "\nPer month:");
    for (i, fleet) in FLEETS.iter().enumerate() {
        let millions = fleet.readings_per_month() / 1e6;
        let _ = writeln!(
            out,
            "  fleet {}: {:.0} M readings; after ingress ${:.0} (${:.4} per vehicle), ingress ${:.0} (${:.4} per vehicle)",
            fleet.name,
            millions,
            after[i] * millions,
            after[i] * millions / fleet.vehicles,
            ingress[i] * millions,
            ingress[i] * millions / fleet.vehicles,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_price_table_has_every_price_with_a_source() {
        let table = PriceTable::parse(BUNDLED_PRICES).unwrap();
        for (name, price) in &table.prices {
            assert!(!price.source.is_empty(), "{name} has no source");
            assert!(price.usd > 0.0 && price.per >= 1.0, "{name}: {price:?}");
        }
        assert!((table.unit("dynamodb_write_request_unit") - 0.625e-6).abs() < 1e-15);
        assert!(PriceTable::parse("date = \"x\"\nregion = \"y\"\n[prices]\n").is_err());
    }

    #[test]
    fn batches_fill_with_the_fleet_rate_up_to_the_batch_size() {
        let fleet_a = FLEETS[0];
        assert_eq!(fleet_a.shards(), 7.0);
        // 5,000 readings/s on 7 shards: ~714 per shard and second.
        assert_eq!(batch_fill(&fleet_a, 100.0, 1.0), 100.0);
        assert!((batch_fill(&fleet_a, 10_000.0, 1.0) - 714.28).abs() < 0.01);
        assert_eq!(batch_fill(&fleet_a, 10_000.0, 20.0), 10_000.0);
    }
}
