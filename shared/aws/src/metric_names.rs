//! The deployment's registry of free metric names on DynamoDB (table `metric_names`, key
//! `name`): one item per admitted name, and a counter item ([`COUNT_KEY`]) that a new name's
//! transaction increments only while it is below the limit. The two writes share a
//! transaction, so concurrent ingest instances can never admit more names than the limit.
//!
//! What it costs: every instance remembers the names it has seen admitted, so a reading whose
//! names are known costs no request at all. A name an instance has not seen costs one
//! BatchGetItem (it may be known to the table already), and a name new to the deployment one
//! TransactWriteItems of two writes, once for the deployment's lifetime.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, Put, TransactWriteItem, Update};
use geostream_shared::now_millis;
use geostream_shared::ports::{MetricNameRegistry, StoreError};

use crate::capacity::{CapacityMeter, Unit};
use crate::errors::store_error;

/// The counter's key: `#` is not a character metric names may have.
pub const COUNT_KEY: &str = "#count";

/// BatchGetItem takes at most 100 keys.
const BATCH_GET_KEYS: usize = 100;

pub struct DynamoMetricNames {
    client: aws_sdk_dynamodb::Client,
    table: String,
    limit: usize,
    /// Names this instance knows to be admitted.
    known: Mutex<HashSet<String>>,
    meter: CapacityMeter,
}

impl DynamoMetricNames {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>, limit: usize) -> Self {
        DynamoMetricNames {
            client,
            table: table.into(),
            limit,
            known: Mutex::new(HashSet::new()),
            meter: CapacityMeter::default(),
        }
    }

    /// Counts the capacity units this registry consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which of `names` the table already holds (consistent reads: a name admitted a moment
    /// ago by another instance is seen).
    async fn stored(&self, names: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut stored = HashSet::new();
        for chunk in names.chunks(BATCH_GET_KEYS) {
            let mut keys = KeysAndAttributes::builder().consistent_read(true);
            for name in chunk {
                keys = keys.keys(
                    [("name".to_string(), AttributeValue::S(name.clone()))]
                        .into_iter()
                        .collect(),
                );
            }
            let mut request =
                Some(keys.build().map_err(|e| {
                    StoreError::permanent("BatchGetItem metric names", e.to_string())
                })?);
            // Keys DynamoDB leaves unprocessed (throttling) are asked again.
            while let Some(keys) = request.take() {
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, keys)
                    .send()
                    .await
                    .map_err(|e| store_error("BatchGetItem metric names", e))?;
                let found = output
                    .responses()
                    .and_then(|r| r.get(&self.table))
                    .map_or(&[][..], Vec::as_slice);
                self.meter
                    .add(Unit::DynamoReadUnits, found.len().max(1) as f64);
                stored.extend(
                    found
                        .iter()
                        .filter_map(|item| item.get("name")?.as_s().ok().cloned()),
                );
                request = output
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .filter(|k| !k.keys().is_empty())
                    .cloned();
            }
        }
        Ok(stored)
    }

    /// Admits one name new to the table: its item and the counter's increment together, the
    /// increment only below the limit. Whether it was admitted (or another instance admitted
    /// it first).
    async fn register(&self, name: &str) -> Result<bool, StoreError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| {
            StoreError::permanent("TransactWriteItems metric names", e.to_string())
        };
        let item = Put::builder()
            .table_name(&self.table)
            .item("name", AttributeValue::S(name.to_string()))
            .item("admitted_at", AttributeValue::N(now_millis().to_string()))
            .condition_expression("attribute_not_exists(#name)")
            .expression_attribute_names("#name", "name")
            .build()
            .map_err(build)?;
        let count = Update::builder()
            .table_name(&self.table)
            .key("name", AttributeValue::S(COUNT_KEY.to_string()))
            .update_expression("SET name_count = if_not_exists(name_count, :zero) + :one")
            .condition_expression("attribute_not_exists(name_count) OR name_count < :limit")
            .expression_attribute_values(":zero", AttributeValue::N("0".into()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":limit", AttributeValue::N(self.limit.to_string()))
            .build()
            .map_err(build)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(item).build())
            .transact_items(TransactWriteItem::builder().update(count).build())
            .send()
            .await;
        // Two writes of small items, doubled by the transaction.
        self.meter.add(Unit::DynamoWriteUnits, 4.0);
        match result {
            Ok(_) => Ok(true),
            Err(error) => {
                let reasons: Vec<Option<String>> = match error.as_service_error() {
                    Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) => {
                        cancelled
                            .cancellation_reasons()
                            .iter()
                            .map(|r| r.code().map(str::to_string))
                            .collect()
                    }
                    _ => Vec::new(),
                };
                let failed = |i: usize| {
                    reasons.get(i).and_then(Option::as_deref) == Some("ConditionalCheckFailed")
                };
                if failed(0) {
                    Ok(true)
                } else if failed(1) {
                    Ok(false)
                } else {
                    Err(store_error("TransactWriteItems metric names", error))
                }
            }
        }
    }
}

#[async_trait]
impl MetricNameRegistry for DynamoMetricNames {
    async fn admit(&self, names: &BTreeSet<String>) -> Result<BTreeSet<String>, StoreError> {
        let unknown: Vec<String> = {
            let known = self.known();
            names
                .iter()
                .filter(|n| !known.contains(*n))
                .cloned()
                .collect()
        };
        if unknown.is_empty() {
            return Ok(BTreeSet::new());
        }
        let stored = self.stored(&unknown).await?;
        let new: Vec<String> = unknown
            .into_iter()
            .filter(|n| !stored.contains(n))
            .collect();
        self.known().extend(stored);
        let mut refused = BTreeSet::new();
        for name in new {
            if self.register(&name).await? {
                self.known().insert(name);
            } else {
                refused.insert(name);
            }
        }
        Ok(refused)
    }

    fn limit(&self) -> usize {
        self.limit
    }
}
