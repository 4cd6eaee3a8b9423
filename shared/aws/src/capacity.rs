//! The capacity each request consumes, in the units AWS bills: DynamoDB read and write request
//! units, Kinesis PUT payload units (and the KiB on-demand streams bill), Timestream write units
//! and S3 bytes written.
//!
//! The adapters compute it from what they send and receive, by each service's published sizing
//! rules, instead of asking the service (`ReturnConsumedCapacity`): an emulator answers that
//! with canned figures, and the cost bench must count the same units against the emulator as on
//! AWS. The sizing rules are hand-written because no SDK crate exposes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::AttributeValue;

/// A billed unit the adapters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Unit {
    /// DynamoDB write request units, table and index writes together.
    DynamoWriteUnits,
    /// DynamoDB read request units (strongly consistent reads count 1 per 4 KB, eventually
    /// consistent 0.5).
    DynamoReadUnits,
    /// Kinesis provisioned-mode PUT payload units: 25 KB of a record each.
    KinesisPutPayloadUnits,
    /// Kinesis on-demand ingress: each record rounded up to 1 KiB.
    KinesisIngressKib,
    /// Timestream writes: 1 KB of a record each.
    TimestreamWriteUnits,
    /// Bytes of S3 objects written.
    S3BytesWritten,
    /// ElastiCache Serverless ECPUs (an estimate: about one per KB a simple command transfers,
    /// more for commands that work more).
    ValkeyEcpus,
    /// Bytes the recent-track cache keeps per reading (for as long as its window).
    ValkeyTrackBytes,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::DynamoWriteUnits => "dynamodb_write_units",
            Unit::DynamoReadUnits => "dynamodb_read_units",
            Unit::KinesisPutPayloadUnits => "kinesis_put_payload_units",
            Unit::KinesisIngressKib => "kinesis_ingress_kib",
            Unit::TimestreamWriteUnits => "timestream_write_units",
            Unit::S3BytesWritten => "s3_bytes_written",
            Unit::ValkeyEcpus => "valkey_ecpus",
            Unit::ValkeyTrackBytes => "valkey_track_bytes",
        }
    }
}

/// Sums the units the adapters of one set of clients consumed.
#[derive(Debug, Clone, Default)]
pub struct CapacityMeter {
    totals: Arc<Mutex<BTreeMap<Unit, f64>>>,
}

impl CapacityMeter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, unit: Unit, amount: f64) {
        *self
            .totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(unit)
            .or_default() += amount;
    }

    pub fn snapshot(&self) -> BTreeMap<Unit, f64> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

const KB: usize = 1024;

/// DynamoDB's size of an item: each attribute's name plus its value, by the rules of "Item
/// sizes and formats" in the DynamoDB developer guide.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter()
        .map(|(name, value)| name.len() + value_size(value))
        .sum()
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(text) => text.len(),
        AttributeValue::N(number) => number_size(number),
        AttributeValue::B(bytes) => bytes.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(texts) => texts.iter().map(String::len).sum(),
        AttributeValue::Ns(numbers) => numbers.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(blobs) => blobs.iter().map(|b| b.as_ref().len()).sum(),
        // Lists and maps: 3 bytes, plus 1 byte and the size of each element.
        AttributeValue::L(values) => 3 + values.iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AttributeValue::M(entries) => {
            3 + entries
                .iter()
                .map(|(name, v)| 1 + name.len() + value_size(v))
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// A number is stored in up to 21 bytes: about one byte per two significant digits, plus one.
fn number_size(text: &str) -> usize {
    let digits = text
        .trim_start_matches('-')
        .split(['e', 'E'])
        .next()
        .unwrap_or_default()
        .replace('.', "");
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    (significant.max(1).div_ceil(2) + 1).min(21)
}

/// Write request units of a standard write of `bytes` (1 per started KB; at least 1).
pub fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(KB).max(1) as f64
}

/// Read request units of a read of `bytes`: 1 per started 4 KB strongly consistent, half that
/// eventually consistent (at least one unit's worth).
pub fn read_units(bytes: usize, consistent: bool) -> f64 {
    let units = bytes.div_ceil(4 * KB).max(1) as f64;
    if consistent {
        units
    } else {
        units / 2.0
    }
}

/// A global secondary index entry is the projected attributes plus 100 bytes of overhead.
pub fn index_entry_size(projected_bytes: usize) -> usize {
    projected_bytes + 100
}

/// Kinesis PUT payload units of one record (25 KB each, at least one).
pub fn kinesis_payload_units(bytes: usize) -> f64 {
    bytes.div_ceil(25 * KB).max(1) as f64
}

/// On-demand Kinesis bills each record rounded up to 1 KiB.
pub fn kinesis_ingress_kib(bytes: usize) -> f64 {
    bytes.div_ceil(KB).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_sizes_follow_dynamodb_rules() {
        let item = HashMap::from([
            ("device_id".to_string(), AttributeValue::S("truck-7".into())),
            ("ts".to_string(), AttributeValue::N("1700000000000".into())),
            ("on".to_string(), AttributeValue::Bool(true)),
        ]);
        // 9 + 7; 2 + (2 significant digits: 1 + 1); 2 + 1.
        assert_eq!(item_size(&item), 16 + 4 + 3);
        let list = AttributeValue::L(vec![AttributeValue::S("ab".into())]);
        assert_eq!(value_size(&list), 3 + 1 + 2);
        assert_eq!(number_size("-12.5"), 3);
        assert_eq!(number_size("0"), 2);
    }

    #[test]
    fn units_round_up_per_started_unit() {
        assert_eq!(write_units(1), 1.0);
        assert_eq!(write_units(1024), 1.0);
        assert_eq!(write_units(1025), 2.0);
        assert_eq!(read_units(4096, true), 1.0);
        assert_eq!(read_units(4097, true), 2.0);
        assert_eq!(read_units(100, false), 0.5);
        assert_eq!(kinesis_payload_units(25 * 1024 + 1), 2.0);
        assert_eq!(kinesis_ingress_kib(300), 1.0);
    }

    #[test]
    fn the_meter_sums_per_unit() {
        let meter = CapacityMeter::new();
        meter.add(Unit::DynamoWriteUnits, 3.0);
        meter.add(Unit::DynamoWriteUnits, 1.0);
        meter.add(Unit::DynamoReadUnits, 0.5);
        let totals = meter.snapshot();
        assert_eq!(totals[&Unit::DynamoWriteUnits], 4.0);
        assert_eq!(totals[&Unit::DynamoReadUnits], 0.5);
    }
}
