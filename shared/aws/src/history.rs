//! Trips, stops and minute summaries on DynamoDB.
//!
//! Table (on-demand): key `device_id` and `item_key` (`{kind}#{start}`, the start in epoch
//! milliseconds zero-padded to 15 digits, so that a vehicle's items of one kind sort by start
//! and a time range is one key range); the item as JSON in `item`; `expires_at` (epoch seconds,
//! DynamoDB's TTL: the retention). A retried batch puts the same items under the same keys.
//!
//! The anomaly-inspector writes a vehicle's complete items of a batch in one BatchWriteItem
//! (usually one item: a minute that ended); the query API reads one key range per request.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use geostream_shared::history::{HistoryItem, HistoryKind};
use geostream_shared::ports::{HistoryStore, StoreError};
use geostream_shared::EpochMillis;

use crate::capacity::{self, CapacityMeter, Unit};
use crate::dynamodb::{expires_at, s};
use crate::errors::store_error;

/// How long history is kept when the deployment says nothing (`HISTORY_RETENTION_DAYS`).
pub const DEFAULT_HISTORY_RETENTION_DAYS: u32 = 90;
/// BatchWriteItem takes at most this many requests.
const BATCH_WRITE_LIMIT: usize = 25;
/// Tries of a batch DynamoDB left items of (throttled) before the records fail and are retried.
const UNPROCESSED_ATTEMPTS: u32 = 5;

type Item = HashMap<String, AttributeValue>;

pub struct DynamoHistory {
    client: aws_sdk_dynamodb::Client,
    table: String,
    retention_days: u32,
    meter: CapacityMeter,
}

/// An item's sort key: its kind and start.
pub fn item_key(kind: HistoryKind, start: EpochMillis) -> String {
    format!("{}#{:015}", kind.as_str(), start.max(0))
}

impl DynamoHistory {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        retention_days: u32,
    ) -> Self {
        DynamoHistory {
            client,
            table: table.into(),
            retention_days,
            meter: CapacityMeter::default(),
        }
    }

    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    fn item(&self, device_id: &str, history: &HistoryItem) -> Result<Item, StoreError> {
        let json = serde_json::to_string(history)
            .map_err(|e| StoreError::permanent("BatchWriteItem history", e.to_string()))?;
        let end = history.end();
        Ok([
            ("device_id".to_string(), s(device_id)),
            (
                "item_key".to_string(),
                s(item_key(history.kind(), history.start())),
            ),
            ("item".to_string(), s(json)),
            (
                "expires_at".to_string(),
                expires_at(end, self.retention_days),
            ),
        ]
        .into())
    }
}

#[async_trait]
impl HistoryStore for DynamoHistory {
    async fn write(&self, device_id: &str, items: &[HistoryItem]) -> Result<(), StoreError> {
        for chunk in items.chunks(BATCH_WRITE_LIMIT) {
            let mut requests = Vec::with_capacity(chunk.len());
            for history in chunk {
                let item = self.item(device_id, history)?;
                self.meter.add(
                    Unit::DynamoWriteUnits,
                    capacity::write_units(capacity::item_size(&item)),
                );
                let put = PutRequest::builder()
                    .set_item(Some(item))
                    .build()
                    .map_err(|e| StoreError::permanent("BatchWriteItem history", e.to_string()))?;
                requests.push(WriteRequest::builder().put_request(put).build());
            }
            let mut attempt = 0;
            while !requests.is_empty() {
                if attempt > 0 {
                    tokio::time::sleep(crate::retry::backoff(attempt)).await;
                }
                attempt += 1;
                let output = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, requests)
                    .send()
                    .await
                    .map_err(|e| store_error("BatchWriteItem history", e))?;
                requests = output
                    .unprocessed_items
                    .and_then(|mut left| left.remove(&self.table))
                    .unwrap_or_default();
                if !requests.is_empty() && attempt >= UNPROCESSED_ATTEMPTS {
                    return Err(StoreError::transient(
                        "BatchWriteItem history",
                        format!(
                            "{} items of {device_id} left unprocessed after {attempt} tries",
                            requests.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn read(
        &self,
        device_id: &str,
        kind: HistoryKind,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        let mut found = Vec::new();
        if from >= to || limit == 0 {
            return Ok(found);
        }
        let mut start: Option<Item> = None;
        while found.len() < limit {
            let output = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("device_id = :d AND item_key BETWEEN :from AND :last")
                .expression_attribute_values(":d", s(device_id))
                .expression_attribute_values(":from", s(item_key(kind, from)))
                .expression_attribute_values(":last", s(item_key(kind, to - 1)))
                .limit(i32::try_from(limit - found.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("Query history", e))?;
            let bytes: usize = output.items().iter().map(capacity::item_size).sum();
            self.meter
                .add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
            for item in output.items() {
                let json = item
                    .get("item")
                    .and_then(|v| v.as_s().ok())
                    .ok_or_else(|| StoreError::permanent("Query history", "an item without it"))?;
                let history: HistoryItem = serde_json::from_str(json).map_err(|e| {
                    StoreError::permanent("Query history", format!("a stored item: {e}"))
                })?;
                found.push(history);
            }
            match output.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        found.truncate(limit);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_kind_then_start() {
        let mut keys = vec![
            item_key(HistoryKind::Trip, 1_700_000_000_000),
            item_key(HistoryKind::Minute, 999_999_999_999),
            item_key(HistoryKind::Minute, 1_700_000_060_000),
            item_key(HistoryKind::Minute, 1_700_000_000_000),
        ];
        keys.sort();
        assert_eq!(
            keys,
            [
                "minute#000999999999999",
                "minute#001700000000000",
                "minute#001700000060000",
                "trip#001700000000000"
            ]
        );
    }
}
