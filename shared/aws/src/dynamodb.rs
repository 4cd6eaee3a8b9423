//! Positions and alerts on DynamoDB.
//!
//! Tables (on-demand):
//! - positions: key `device_id`; GSI [`GEO_INDEX`] with hash key `geo_pk` =
//!   `"{geohash3}#{shard:02}"` and range key `geohash` (9 characters). Hot-spot arithmetic in
//!   `geostream_shared::geo::INDEX_SHARDS`: no index key takes more than ~700 writes/s with
//!   10,000 position writes/s in one index cell. A radius query covers the circle with geohash
//!   prefixes, groups them by 3-character cell, and reads each cell's 16 shards with one Query
//!   each (`geohash BETWEEN` the cell's lowest and highest prefix), in parallel: 16 to 64 Query
//!   calls for a city radius, up to 144 for 100 km below 60 degrees of latitude. A circle that
//!   spans more than [`MAX_QUERY_CELLS`] cells (near a pole) is answered by a parallel Scan.
//! - alert state: key `device_id`; `version` (number) and `rule_states_z` (JSON, deflated;
//!   `rule_states`, plain JSON, as written before, is still read).
//! - alerts: key `alert_id`; GSIs [`ALERTS_BY_STATE_INDEX`] (`state`, `started_at`) and
//!   [`ALERTS_BY_DEVICE_INDEX`] (`device_id`, `started_at`).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, Delete, KeysAndAttributes, Put, ReturnValue, TransactWriteItem, Update,
};
use geostream_shared::geo::{index_partition_key, INDEX_PARTITION_GEOHASH_LEN, INDEX_SHARDS};
use geostream_shared::model::{Alert, AlertState, GeoPoint, Position, Severity};
use geostream_shared::ports::{
    nearest, with_geohash, AlertChanges, AlertFilter, AlertStore, NearbyVehicle, PositionStore,
    SilentCandidates, StoreError, UpsertOutcome, MAX_ALERTS_PER_COMMIT,
};
use geostream_shared::rules::DeviceRuleStates;
use geostream_shared::EpochMillis;

use crate::capacity::{self, CapacityMeter, Unit};
use crate::errors::store_error;

pub const GEO_INDEX: &str = "geo-index";
pub const ALERTS_BY_STATE_INDEX: &str = "by-state";
pub const ALERTS_BY_DEVICE_INDEX: &str = "by-device";
/// A radius query reads at most this many index cells (each is 16 Query calls); beyond, a Scan.
pub const MAX_QUERY_CELLS: usize = 16;
/// Parallel segments of the Scan that answers the rare circle beyond [`MAX_QUERY_CELLS`].
const SCAN_SEGMENTS: i32 = 4;
/// Geohash alphabet, in order; `~` sorts after all of it.
const GEOHASH_ALPHABET: &str = "0123456789bcdefghjkmnpqrstuvwxyz";

type Item = HashMap<String, AttributeValue>;

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn get_s(item: &Item, name: &str) -> Result<String, String> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value.clone()),
        other => Err(format!("attribute {name} is not a string: {other:?}")),
    }
}

fn get_n<T: std::str::FromStr>(item: &Item, name: &str) -> Result<T, String> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value
            .parse()
            .map_err(|_| format!("attribute {name} is not a number: {value}")),
        other => Err(format!("attribute {name} is not a number: {other:?}")),
    }
}

/// Latest positions with the sharded geohash index.
#[derive(Clone)]
pub struct DynamoPositions {
    client: aws_sdk_dynamodb::Client,
    table: String,
    meter: CapacityMeter,
    /// Each position item's `expires_at` (DynamoDB's TTL) is this long after its reading, so
    /// the position of a vehicle gone silent goes; a newer position pushes it on.
    retention_days: Option<u32>,
}

/// `expires_at` (epoch seconds, DynamoDB's TTL attribute) `days` after `ts` (epoch ms).
pub(crate) fn expires_at(ts: EpochMillis, days: u32) -> AttributeValue {
    n(ts.div_euclid(1000) + i64::from(days) * 86_400)
}

impl DynamoPositions {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoPositions {
            client,
            table: table.into(),
            meter: CapacityMeter::default(),
            retention_days: None,
        }
    }

    /// Positions expire `days` after their reading unless a newer one replaces them.
    pub fn with_retention_days(mut self, days: u32) -> Self {
        self.retention_days = Some(days);
        self
    }

    /// Counts the capacity units this store consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    /// The write units of an upsert: the table item (the larger of old and new), and the geo
    /// index (projection ALL): a changed index key is a delete and a put, any other change of
    /// the item one put, an unchanged item none.
    fn upsert_write_units(new: &Item, old: Option<&Item>) -> f64 {
        let new_size = capacity::item_size(new);
        let old_size = old.map_or(0, capacity::item_size);
        let table = capacity::write_units(new_size.max(old_size));
        let index_key = |item: &Item| (item.get("geo_pk").cloned(), item.get("geohash").cloned());
        let index = match old {
            None => capacity::write_units(capacity::index_entry_size(new_size)),
            Some(old) if index_key(old) != index_key(new) => {
                capacity::write_units(capacity::index_entry_size(old_size))
                    + capacity::write_units(capacity::index_entry_size(new_size))
            }
            Some(old) if old == new => 0.0,
            Some(_) => capacity::write_units(capacity::index_entry_size(new_size)),
        };
        table + index
    }

    /// The position's attributes as `Position` serializes them, plus the index's partition key.
    fn to_item(&self, position: &Position) -> Result<Item, StoreError> {
        let mut item: Item = serde_dynamo::to_item(position)
            .map_err(|e| StoreError::permanent("PutItem positions", e.to_string()))?;
        item.insert(
            "geo_pk".to_string(),
            s(index_partition_key(&position.geohash, &position.device_id)),
        );
        if let Some(days) = self.retention_days {
            item.insert("expires_at".to_string(), expires_at(position.ts, days));
        }
        Ok(item)
    }

    fn from_item(item: &Item) -> Result<Position, String> {
        serde_dynamo::from_item(item.clone()).map_err(|e| format!("position item: {e}"))
    }

    /// The index reads for a covering: per index cell, the lowest and highest geohash to read.
    /// Shorter prefixes expand to their cells. `None` when the covering spans more than
    /// [`MAX_QUERY_CELLS`] cells.
    fn cell_ranges(prefixes: &[String]) -> Option<BTreeMap<String, (String, String)>> {
        let mut cells: BTreeMap<String, (String, String)> = BTreeMap::new();
        for prefix in prefixes {
            let mut expanded = vec![prefix.clone()];
            while expanded[0].len() < INDEX_PARTITION_GEOHASH_LEN {
                expanded = expanded
                    .iter()
                    .flat_map(|p| GEOHASH_ALPHABET.chars().map(move |c| format!("{p}{c}")))
                    .collect();
                if expanded.len() > MAX_QUERY_CELLS * 32 {
                    break;
                }
            }
            for cell_prefix in expanded {
                let cell =
                    cell_prefix[..INDEX_PARTITION_GEOHASH_LEN.min(cell_prefix.len())].to_string();
                let high = format!("{cell_prefix}~");
                let range = cells
                    .entry(cell)
                    .or_insert_with(|| (cell_prefix.clone(), high.clone()));
                if cell_prefix < range.0 {
                    range.0 = cell_prefix.clone();
                }
                if high > range.1 {
                    range.1 = high;
                }
            }
        }
        (cells.len() <= MAX_QUERY_CELLS).then_some(cells)
    }
}

/// The offline check's candidates: a parallel Scan of the table, billed by the bytes read
/// (about 3,100 read units for 100,000 vehicles; docs/fleet-events.md has the costing).
#[async_trait]
impl SilentCandidates for DynamoPositions {
    async fn heard_from_before(&self, before: EpochMillis) -> Result<Vec<String>, StoreError> {
        Ok(self
            .scan_all()
            .await?
            .into_iter()
            .filter(|p| p.received_at < before)
            .map(|p| p.device_id)
            .collect())
    }
}

#[async_trait]
impl PositionStore for DynamoPositions {
    async fn upsert_if_newer(&self, position: Position) -> Result<UpsertOutcome, StoreError> {
        let position = with_geohash(position, "PutItem")?;
        let item = self.to_item(&position)?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item.clone()))
            // The old item costs nothing more and tells which index writes the put made.
            .return_values(ReturnValue::AllOld)
            .condition_expression(
                "attribute_not_exists(device_id) OR #ts < :ts OR (#ts = :ts AND #eid < :eid)",
            )
            .expression_attribute_names("#ts", "ts")
            .expression_attribute_names("#eid", "event_id")
            .expression_attribute_values(":ts", n(position.ts))
            .expression_attribute_values(":eid", s(&position.event_id))
            .send()
            .await;
        match result {
            Ok(output) => {
                self.meter.add(
                    Unit::DynamoWriteUnits,
                    Self::upsert_write_units(&item, output.attributes()),
                );
                Ok(UpsertOutcome::Applied)
            }
            Err(SdkError::ServiceError(service))
                if matches!(
                    service.err(),
                    PutItemError::ConditionalCheckFailedException(_)
                ) =>
            {
                // A failed condition still consumes the write.
                self.meter.add(
                    Unit::DynamoWriteUnits,
                    capacity::write_units(capacity::item_size(&item)),
                );
                Ok(UpsertOutcome::Stale)
            }
            Err(error) => Err(store_error("PutItem positions", error)),
        }
    }

    async fn get(&self, device_id: &str) -> Result<Option<Position>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("device_id", s(device_id))
            .send()
            .await
            .map_err(|e| store_error("GetItem positions", e))?;
        self.meter.add(
            Unit::DynamoReadUnits,
            capacity::read_units(output.item().map_or(0, capacity::item_size), false),
        );
        output
            .item()
            .map(Self::from_item)
            .transpose()
            .map_err(|e| StoreError::permanent("GetItem positions", e))
    }

    async fn near(
        &self,
        center: GeoPoint,
        radius_m: f64,
        limit: usize,
    ) -> Result<Vec<NearbyVehicle>, StoreError> {
        let covering = geostream_shared::geo::cover_circle(center, radius_m);
        let candidates = match Self::cell_ranges(&covering) {
            Some(cells) => self.query_cells(cells).await?,
            None => self.scan_all().await?,
        };
        Ok(nearest(center, radius_m, limit, &candidates))
    }
}

impl DynamoPositions {
    /// Every position of the index cells' ranges, read from the geo index.
    async fn query_cells(
        &self,
        cells: BTreeMap<String, (String, String)>,
    ) -> Result<Vec<Position>, StoreError> {
        let mut queries = tokio::task::JoinSet::new();
        for (cell, (low, high)) in cells {
            for shard in 0..INDEX_SHARDS {
                let (client, table, meter) =
                    (self.client.clone(), self.table.clone(), self.meter.clone());
                let (partition, low, high) =
                    (format!("{cell}#{shard:02}"), low.clone(), high.clone());
                queries.spawn(async move {
                    let mut found = Vec::new();
                    let mut start: Option<Item> = None;
                    loop {
                        let output = client
                            .query()
                            .table_name(&table)
                            .index_name(GEO_INDEX)
                            .key_condition_expression(
                                "geo_pk = :pk AND geohash BETWEEN :low AND :high",
                            )
                            .expression_attribute_values(":pk", s(&partition))
                            .expression_attribute_values(":low", s(&low))
                            .expression_attribute_values(":high", s(&high))
                            .set_exclusive_start_key(start.take())
                            .send()
                            .await
                            .map_err(|e| store_error("Query geo-index", e))?;
                        // A query reads the sum of its items' sizes, eventually consistent.
                        let bytes = output.items().iter().map(capacity::item_size).sum();
                        meter.add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
                        for item in output.items() {
                            found.push(
                                Self::from_item(item)
                                    .map_err(|e| StoreError::permanent("Query geo-index", e))?,
                            );
                        }
                        match output.last_evaluated_key() {
                            Some(key) => start = Some(key.clone()),
                            None => return Ok::<_, StoreError>(found),
                        }
                    }
                });
            }
        }
        let mut positions = Vec::new();
        while let Some(joined) = queries.join_next().await {
            let found =
                joined.map_err(|e| StoreError::transient("Query geo-index", e.to_string()))??;
            positions.extend(found);
        }
        Ok(positions)
    }

    /// Every position, by a parallel Scan of the table: for the rare circle that spans more
    /// index cells than a query reads (near a pole), so that every valid query is answered.
    async fn scan_all(&self) -> Result<Vec<Position>, StoreError> {
        let mut scans = tokio::task::JoinSet::new();
        for segment in 0..SCAN_SEGMENTS {
            let (client, table, meter) =
                (self.client.clone(), self.table.clone(), self.meter.clone());
            scans.spawn(async move {
                let mut found = Vec::new();
                let mut start: Option<Item> = None;
                loop {
                    let output = client
                        .scan()
                        .table_name(&table)
                        .segment(segment)
                        .total_segments(SCAN_SEGMENTS)
                        .set_exclusive_start_key(start.take())
                        .send()
                        .await
                        .map_err(|e| store_error("Scan positions", e))?;
                    let bytes = output.items().iter().map(capacity::item_size).sum();
                    meter.add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
                    for item in output.items() {
                        found.push(
                            Self::from_item(item)
                                .map_err(|e| StoreError::permanent("Scan positions", e))?,
                        );
                    }
                    match output.last_evaluated_key() {
                        Some(key) => start = Some(key.clone()),
                        None => return Ok::<_, StoreError>(found),
                    }
                }
            });
        }
        let mut positions = Vec::new();
        while let Some(joined) = scans.join_next().await {
            positions.extend(
                joined.map_err(|e| StoreError::transient("Scan positions", e.to_string()))??,
            );
        }
        Ok(positions)
    }
}

/// Rule state and alerts.
#[derive(Clone)]
pub struct DynamoAlerts {
    client: aws_sdk_dynamodb::Client,
    state_table: String,
    alerts_table: String,
    meter: CapacityMeter,
    /// A cleared alert's record expires (DynamoDB's TTL) this long after its clear.
    retention_days: Option<u32>,
}

impl DynamoAlerts {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        state_table: impl Into<String>,
        alerts_table: impl Into<String>,
    ) -> Self {
        DynamoAlerts {
            client,
            state_table: state_table.into(),
            alerts_table: alerts_table.into(),
            meter: CapacityMeter::default(),
            retention_days: None,
        }
    }

    /// Cleared alerts' records expire `days` after their clear; active ones never.
    pub fn with_retention_days(mut self, days: u32) -> Self {
        self.retention_days = Some(days);
        self
    }

    /// Counts the capacity units this store consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    /// The write units of an alert record's update: the item, and its two keys-only indexes,
    /// written only when the record is new (a raise) or its state key changes (a clear: a
    /// delete and a put on by-state); count, peak and last value change no index.
    fn alert_write_units(alert: &Alert, transactional: bool) -> f64 {
        let size = serde_dynamo::to_item::<_, Item>(alert)
            .map(|item| capacity::item_size(&item))
            .unwrap_or(0);
        let table = capacity::write_units(size) * if transactional { 2.0 } else { 1.0 };
        let raised = alert.state == AlertState::Active && alert.count == 1;
        let cleared = alert.state == AlertState::Cleared;
        let index_writes = if raised || cleared { 2.0 } else { 0.0 };
        table + index_writes * capacity::write_units(capacity::index_entry_size(0))
    }

    /// The update of an alert record: every field the inspector owns; acknowledgement fields are
    /// only initialised, never overwritten.
    fn alert_update(&self, alert: &Alert) -> Result<Update, StoreError> {
        let mut values: Item = HashMap::from([
            (":device_id".to_string(), s(&alert.device_id)),
            (":rule".to_string(), s(&alert.rule)),
            (":severity".to_string(), s(severity_name(alert.severity))),
            (":state".to_string(), s(state_name(alert.state))),
            (":started_at".to_string(), n(alert.started_at)),
            (":peak".to_string(), n(alert.peak_value)),
            (":last".to_string(), n(alert.last_value)),
            (":count".to_string(), n(alert.count)),
            (":false".to_string(), AttributeValue::Bool(false)),
        ]);
        let mut expression = "SET device_id = :device_id, #rule = :rule, severity = :severity, #state = :state, started_at = :started_at, peak_value = :peak, last_value = :last, #count = :count, acknowledged = if_not_exists(acknowledged, :false)".to_string();
        match alert.cleared_at {
            Some(cleared_at) => {
                values.insert(":cleared_at".into(), n(cleared_at));
                expression.push_str(", cleared_at = :cleared_at");
                if let Some(days) = self.retention_days {
                    values.insert(":expires_at".into(), expires_at(cleared_at, days));
                    expression.push_str(", expires_at = :expires_at");
                }
            }
            // A clear a late reading retracted: the alert is active again, and stays.
            None if alert.state == AlertState::Active => {
                expression.push_str(" REMOVE cleared_at, expires_at")
            }
            None => {}
        }
        Update::builder()
            .table_name(&self.alerts_table)
            .key("alert_id", s(&alert.alert_id))
            .update_expression(expression)
            .expression_attribute_names("#rule", "rule")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#count", "count")
            .set_expression_attribute_values(Some(values))
            .build()
            .map_err(|e| StoreError::permanent("TransactWriteItems", e.to_string()))
    }

    /// Upserts alert records one by one (keyed by alert id; acknowledgements kept), for a rule
    /// state kept elsewhere, as of that state's `version`: a record already written by a later
    /// version is left alone, so a late or repeated write of older changes cannot undo newer
    /// ones.
    pub async fn write_alerts(&self, alerts: &[Alert], version: u64) -> Result<(), StoreError> {
        for alert in alerts {
            let update = self.alert_update(alert)?;
            let mut values = update
                .expression_attribute_values()
                .cloned()
                .unwrap_or_default();
            values.insert(":version".into(), n(version));
            let mut call = self
                .client
                .update_item()
                .table_name(update.table_name())
                .set_key(Some(update.key().clone()))
                .update_expression(versioned_update(update.update_expression()))
                .condition_expression(NOT_NEWER)
                .set_expression_attribute_values(Some(values));
            for (name, value) in update.expression_attribute_names().into_iter().flatten() {
                call = call.expression_attribute_names(name, value);
            }
            match call.send().await {
                Ok(_) => {}
                Err(e) if is_conditional_failure(&e) => {}
                Err(e) => return Err(store_error("UpdateItem alerts", e)),
            }
            self.meter.add(
                Unit::DynamoWriteUnits,
                Self::alert_write_units(alert, false),
            );
        }
        Ok(())
    }

    /// Deletes alert records one by one, for a rule state kept elsewhere, as of that state's
    /// `version` (a record a later version wrote is kept).
    pub async fn remove_alerts(
        &self,
        alert_ids: &[String],
        version: u64,
    ) -> Result<(), StoreError> {
        for alert_id in alert_ids {
            let deleted = self
                .client
                .delete_item()
                .table_name(&self.alerts_table)
                .key("alert_id", s(alert_id))
                .condition_expression(NOT_NEWER)
                .expression_attribute_values(":version", n(version))
                .send()
                .await;
            match deleted {
                Ok(_) => {}
                Err(e) if is_conditional_failure(&e) => {}
                Err(e) => return Err(store_error("DeleteItem alerts", e)),
            }
            self.meter.add(
                Unit::DynamoWriteUnits,
                1.0 + 2.0 * capacity::write_units(capacity::index_entry_size(0)),
            );
        }
        Ok(())
    }

    fn state_put(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
    ) -> Result<Put, StoreError> {
        let json = serde_json::to_vec(states)
            .map_err(|e| StoreError::permanent("alert state", e.to_string()))?;
        let builder = Put::builder()
            .table_name(&self.state_table)
            .item("device_id", s(device_id))
            .item("version", n(expected_version + 1))
            .item(
                COMPRESSED_RULE_STATES,
                AttributeValue::B(Blob::new(compress(&json))),
            );
        let builder = if expected_version == 0 {
            builder.condition_expression("attribute_not_exists(device_id)")
        } else {
            builder
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", n(expected_version))
        };
        builder
            .build()
            .map_err(|e| StoreError::permanent("TransactWriteItems", e.to_string()))
    }

    /// Newest first from an alerts index (keys only), the records fetched by key, at most
    /// `limit`; `state` filters a device's alerts.
    async fn query_alerts(
        &self,
        index: &str,
        key: &str,
        value: AttributeValue,
        state: Option<AlertState>,
        limit: usize,
    ) -> Result<Vec<Alert>, StoreError> {
        let mut alerts = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.alerts_table)
                .index_name(index)
                .key_condition_expression("#key = :value")
                .expression_attribute_names("#key", key)
                .expression_attribute_values(":value", value.clone())
                .scan_index_forward(false)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("Query alerts", e))?;
            let bytes = output.items().iter().map(capacity::item_size).sum();
            self.meter
                .add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
            let ids: Vec<String> = output
                .items()
                .iter()
                .map(|item| get_s(item, "alert_id"))
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::permanent("Query alerts", e))?;
            for alert in self.alerts_by_id(&ids).await? {
                if state.is_none_or(|wanted| alert.state == wanted) {
                    alerts.push(alert);
                    if alerts.len() >= limit {
                        return Ok(alerts);
                    }
                }
            }
            match output.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(alerts),
            }
        }
    }

    /// The alert records of `ids`, in that order (BatchGetItem, 100 keys a call, unprocessed
    /// keys asked again); ids without a record are left out.
    async fn alerts_by_id(&self, ids: &[String]) -> Result<Vec<Alert>, StoreError> {
        let mut found: HashMap<String, Alert> = HashMap::new();
        for chunk in ids.chunks(100) {
            let mut keys: Vec<Item> = chunk
                .iter()
                .map(|id| HashMap::from([("alert_id".to_string(), s(id))]))
                .collect();
            let mut attempt = 0;
            while !keys.is_empty() {
                attempt += 1;
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut keys)))
                    .build()
                    .map_err(|e| StoreError::permanent("BatchGetItem alerts", e.to_string()))?;
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(&self.alerts_table, request)
                    .send()
                    .await
                    .map_err(|e| store_error("BatchGetItem alerts", e))?;
                let items = output
                    .responses()
                    .and_then(|r| r.get(&self.alerts_table))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                for item in items {
                    self.meter.add(
                        Unit::DynamoReadUnits,
                        capacity::read_units(capacity::item_size(item), false),
                    );
                    let alert = alert_from_item(item)
                        .map_err(|e| StoreError::permanent("BatchGetItem alerts", e))?;
                    found.insert(alert.alert_id.clone(), alert);
                }
                if let Some(unprocessed) = output
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.alerts_table))
                {
                    if attempt >= crate::retry::PARTIAL_FAILURE_ATTEMPTS {
                        return Err(StoreError::transient(
                            "BatchGetItem alerts",
                            format!("{} keys still unprocessed", unprocessed.keys().len()),
                        ));
                    }
                    keys = unprocessed.keys().to_vec();
                    tokio::time::sleep(crate::retry::backoff(attempt)).await;
                }
            }
        }
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }
}

fn severity_name(severity: Severity) -> &'static str {
    match severity {
        Severity::Info => "info",
        Severity::Warning => "warning",
        Severity::Major => "major",
        Severity::Critical => "critical",
    }
}

fn state_name(state: AlertState) -> &'static str {
    match state {
        AlertState::Active => "active",
        AlertState::Cleared => "cleared",
    }
}

fn alert_from_item(item: &Item) -> Result<Alert, String> {
    serde_dynamo::from_item(item.clone()).map_err(|e| format!("alert item: {e}"))
}

#[async_trait]
impl AlertStore for DynamoAlerts {
    async fn load_rule_states(&self, device_id: &str) -> Result<DeviceRuleStates, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.state_table)
            .key("device_id", s(device_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("GetItem alert state", e))?;
        self.meter.add(
            Unit::DynamoReadUnits,
            capacity::read_units(output.item().map_or(0, capacity::item_size), true),
        );
        let Some(item) = output.item() else {
            return Ok(DeviceRuleStates::default());
        };
        let unreadable = |e: String| {
            StoreError::permanent("GetItem alert state", format!("device {device_id}: {e}"))
        };
        let json = match item.get(COMPRESSED_RULE_STATES) {
            Some(AttributeValue::B(blob)) => {
                decompress(blob.as_ref()).map_err(|e| unreadable(e.to_string()))?
            }
            // Written before the state was compressed.
            _ => get_s(item, "rule_states").map_err(unreadable)?.into_bytes(),
        };
        let mut states: DeviceRuleStates =
            serde_json::from_slice(&json).map_err(|e| unreadable(e.to_string()))?;
        states.version =
            get_n(item, "version").map_err(|e| StoreError::permanent("GetItem alert state", e))?;
        Ok(states)
    }

    async fn commit_changes(
        &self,
        device_id: &str,
        expected_version: u64,
        states: &DeviceRuleStates,
        changes: AlertChanges<'_>,
    ) -> Result<(), StoreError> {
        let alerts = changes.touched;
        let state = self.state_put(device_id, expected_version, states)?;
        let state_size = capacity::item_size(state.item());
        let conflict = |operation: &'static str| {
            StoreError::conflict(
                operation,
                format!(
                    "device {device_id}: rule state is no longer at version {expected_version}"
                ),
            )
        };
        if changes.is_empty() {
            // Nothing else to write: a plain conditional put, half a transaction's units.
            let result = self
                .client
                .put_item()
                .table_name(state.table_name())
                .set_item(Some(state.item().clone()))
                .set_condition_expression(state.condition_expression().map(str::to_string))
                .set_expression_attribute_values(state.expression_attribute_values().cloned())
                .send()
                .await;
            // A failed condition still consumes the write.
            self.meter
                .add(Unit::DynamoWriteUnits, capacity::write_units(state_size));
            return match result {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(service))
                    if matches!(
                        service.err(),
                        PutItemError::ConditionalCheckFailedException(_)
                    ) =>
                {
                    Err(conflict("PutItem alert state"))
                }
                Err(error) => Err(store_error("PutItem alert state", error)),
            };
        }
        if changes.len() > MAX_ALERTS_PER_COMMIT {
            // Written outside the transaction, a discarded evaluation's alerts would stay.
            return Err(StoreError::invalid(
                "TransactWriteItems",
                format!(
                    "device {device_id}: {} alerts in one commit; a transaction takes {MAX_ALERTS_PER_COMMIT} beside the state",
                    changes.len()
                ),
            ));
        }
        let updates = alerts
            .iter()
            .map(|a| self.alert_update(a).map(|update| (a, update)))
            .collect::<Result<Vec<_>, _>>()?;
        // Transactional writes cost twice a standard write.
        let removals = changes
            .removed
            .iter()
            .map(|alert_id| {
                Delete::builder()
                    .table_name(&self.alerts_table)
                    .key("alert_id", s(alert_id))
                    .build()
                    .map_err(|e| StoreError::permanent("TransactWriteItems", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Transactional writes cost twice a standard write; a delete is charged as the item
        // (taken as 1 KB) and its two index entries.
        let units = 2.0 * capacity::write_units(state_size)
            + updates
                .iter()
                .map(|(alert, _)| Self::alert_write_units(alert, true))
                .sum::<f64>()
            + removals.len() as f64
                * (2.0 + 2.0 * capacity::write_units(capacity::index_entry_size(0)));
        let mut items = vec![TransactWriteItem::builder().put(state).build()];
        items.extend(
            updates
                .into_iter()
                .map(|(_, u)| TransactWriteItem::builder().update(u).build()),
        );
        items.extend(
            removals
                .into_iter()
                .map(|d| TransactWriteItem::builder().delete(d).build()),
        );
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        self.meter.add(Unit::DynamoWriteUnits, units);
        match result {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(service)) if failed_a_condition(service.err()) => {
                Err(conflict("TransactWriteItems"))
            }
            Err(error) => {
                let cancelled_for_now = matches!(&error, SdkError::ServiceError(service) if cancelled_for_now(service.err()));
                let error = store_error("TransactWriteItems", error);
                Err(if cancelled_for_now {
                    StoreError::transient(error.operation, error.message)
                } else {
                    error
                })
            }
        }
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        let mut alerts = match (&filter.device_id, filter.state) {
            (Some(device), state) => {
                self.query_alerts(
                    ALERTS_BY_DEVICE_INDEX,
                    "device_id",
                    s(device),
                    state,
                    filter.limit,
                )
                .await?
            }
            (None, Some(state)) => {
                self.query_alerts(
                    ALERTS_BY_STATE_INDEX,
                    "state",
                    s(state_name(state)),
                    None,
                    filter.limit,
                )
                .await?
            }
            (None, None) => {
                let mut both = self
                    .query_alerts(
                        ALERTS_BY_STATE_INDEX,
                        "state",
                        s("active"),
                        None,
                        filter.limit,
                    )
                    .await?;
                both.extend(
                    self.query_alerts(
                        ALERTS_BY_STATE_INDEX,
                        "state",
                        s("cleared"),
                        None,
                        filter.limit,
                    )
                    .await?,
                );
                both
            }
        };
        alerts.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then_with(|| a.alert_id.cmp(&b.alert_id))
        });
        alerts.truncate(filter.limit);
        Ok(alerts)
    }

    async fn get_alert(&self, alert_id: &str) -> Result<Option<Alert>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.alerts_table)
            .key("alert_id", s(alert_id))
            .send()
            .await
            .map_err(|e| store_error("GetItem alerts", e))?;
        output
            .item()
            .map(alert_from_item)
            .transpose()
            .map_err(|e| StoreError::permanent("GetItem alerts", e))
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        by: &str,
        at: EpochMillis,
    ) -> Result<Option<Alert>, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.alerts_table)
            .key("alert_id", s(alert_id))
            .condition_expression("attribute_exists(alert_id)")
            .update_expression("SET acknowledged = :true, acknowledged_by = if_not_exists(acknowledged_by, :by), acknowledged_at = if_not_exists(acknowledged_at, :at)")
            .expression_attribute_values(":true", AttributeValue::Bool(true))
            .expression_attribute_values(":by", s(by))
            .expression_attribute_values(":at", n(at))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(output) => output
                .attributes()
                .map(alert_from_item)
                .transpose()
                .map_err(|e| StoreError::permanent("UpdateItem alerts", e)),
            Err(SdkError::ServiceError(service))
                if service.err().is_conditional_check_failed_exception() =>
            {
                Ok(None)
            }
            Err(error) => Err(store_error("UpdateItem alerts", error)),
        }
    }
}

/// The condition on an alert record written from a rule state kept outside DynamoDB: the
/// record carries the version of the state that wrote it, and only that version or a later one
/// may write it again.
const NOT_NEWER: &str = "attribute_not_exists(state_version) OR state_version <= :version";

/// An alert update that also records the writing state's version (`:version`).
fn versioned_update(expression: &str) -> String {
    match expression.strip_prefix("SET ") {
        Some(rest) => format!("SET state_version = :version, {rest}"),
        None => format!("SET state_version = :version {expression}"),
    }
}

/// Whether a call failed only its condition (DynamoDB's ConditionalCheckFailedException).
pub(crate) fn is_conditional_failure<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException")
}

/// Whether a transaction was cancelled because one of its conditions failed (DynamoDB names
/// the reason per item), as opposed to a conflict with another transaction or throttling.
pub(crate) fn failed_a_condition(error: &TransactWriteItemsError) -> bool {
    match error {
        TransactWriteItemsError::TransactionCanceledException(cancelled) => cancelled
            .cancellation_reasons()
            .iter()
            .any(|reason| reason.code() == Some("ConditionalCheckFailed")),
        _ => false,
    }
}

/// The rule-state attribute: its JSON, deflated. The state carries the readings kept for late
/// ones (bounded lateness), a few kilobytes of JSON that repeats itself (times, event ids,
/// metric values), and DynamoDB bills every write by the item's size in 1 KB units: deflated,
/// a typical state fits one unit instead of three.
const COMPRESSED_RULE_STATES: &str = "rule_states_z";

fn compress(json: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(json);
    encoder.finish().unwrap_or_default()
}

fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut json = Vec::new();
    flate2::read::DeflateDecoder::new(data).read_to_end(&mut json)?;
    Ok(json)
}

/// Whether a transaction was cancelled only for reasons that pass: another transaction on one
/// of its items (`TransactionConflict`), throttling, or none given for an item. DynamoDB
/// answers 400 for these, so the SDK's classifier takes them as refusals; retried, the
/// transaction goes through.
fn cancelled_for_now(error: &TransactWriteItemsError) -> bool {
    match error {
        TransactWriteItemsError::TransactionCanceledException(cancelled) => {
            let reasons = cancelled.cancellation_reasons();
            !reasons.is_empty()
                && reasons.iter().all(|reason| {
                    matches!(
                        reason.code(),
                        None | Some(
                            "None"
                                | "TransactionConflict"
                                | "ThrottlingError"
                                | "ProvisionedThroughputExceeded"
                        )
                    )
                })
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_client() -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
                .build(),
        )
    }

    /// Retention: a position expires its days after its reading (a newer one moves it on); a
    /// cleared alert its days after the clear; an alert a late reading made active again loses
    /// its expiry; without a retention nothing expires.
    #[test]
    fn positions_and_cleared_alerts_carry_their_expiry() {
        let position = Position {
            device_id: "truck-1".into(),
            ts: 1_796_000_000_500,
            event_id: "truck-1@1796000000500".into(),
            lat: 52.5,
            lon: 13.4,
            geohash: "u33dc0cpw".into(),
            speed_kmh: None,
            heading_deg: None,
            received_at: 1_796_000_001_000,
        };
        let store = DynamoPositions::new(offline_client(), "positions");
        assert!(!store.to_item(&position).unwrap().contains_key("expires_at"));
        let item = store.with_retention_days(30).to_item(&position).unwrap();
        assert_eq!(
            item.get("expires_at"),
            Some(&AttributeValue::N(
                (1_796_000_000 + 30 * 86_400).to_string()
            ))
        );

        let alerts = DynamoAlerts::new(offline_client(), "state", "alerts").with_retention_days(7);
        let mut alert = Alert {
            alert_id: "truck-1|engine_overheat|1796000000000".into(),
            device_id: "truck-1".into(),
            rule: "engine_overheat".into(),
            severity: Severity::Critical,
            state: AlertState::Active,
            acknowledged: false,
            acknowledged_by: None,
            acknowledged_at: None,
            started_at: 1_796_000_000_000,
            cleared_at: None,
            peak_value: 104.0,
            last_value: 104.0,
            count: 3,
        };
        let active = alerts.alert_update(&alert).unwrap();
        assert!(active
            .update_expression()
            .ends_with(" REMOVE cleared_at, expires_at"));
        alert.state = AlertState::Cleared;
        alert.cleared_at = Some(1_796_000_060_000);
        let cleared = alerts.alert_update(&alert).unwrap();
        assert!(cleared
            .update_expression()
            .contains("expires_at = :expires_at"));
        assert_eq!(
            cleared
                .expression_attribute_values()
                .unwrap()
                .get(":expires_at"),
            Some(&AttributeValue::N((1_796_000_060 + 7 * 86_400).to_string()))
        );
    }

    /// Issue #12: a transaction cancelled for a conflict with another transaction was taken as
    /// a permanent refusal and its records dead-lettered; it is retried.
    #[test]
    fn a_transaction_conflict_passes_and_a_failed_condition_is_a_conflict() {
        use aws_sdk_dynamodb::types::error::TransactionCanceledException;
        use aws_sdk_dynamodb::types::CancellationReason;
        let cancelled = |codes: &[&str]| {
            TransactWriteItemsError::TransactionCanceledException(
                TransactionCanceledException::builder()
                    .set_cancellation_reasons(Some(
                        codes
                            .iter()
                            .map(|c| CancellationReason::builder().code(*c).build())
                            .collect(),
                    ))
                    .build(),
            )
        };
        assert!(cancelled_for_now(&cancelled(&[
            "None",
            "TransactionConflict"
        ])));
        assert!(cancelled_for_now(&cancelled(&["ThrottlingError"])));
        assert!(!failed_a_condition(&cancelled(&["TransactionConflict"])));
        assert!(!cancelled_for_now(&cancelled(&["None", "ValidationError"])));
        assert!(!cancelled_for_now(&cancelled(&["ConditionalCheckFailed"])));
        assert!(failed_a_condition(&cancelled(&[
            "None",
            "ConditionalCheckFailed"
        ])));
    }

    /// A minute of readings at one every 2 s kept for late ones fits one write unit deflated.
    #[test]
    fn a_rule_state_with_its_lateness_window_fits_a_write_unit() {
        use geostream_shared::model::Reading;
        use geostream_shared::rules::RuleSet;
        let readings: Vec<Reading> = (0..30)
            .map(|i| Reading {
                device_id: "truck-0042".into(),
                ts: 1_796_503_530_753 + i * 2_000,
                event_id: format!("truck-0042-{i:06}"),
                engine_temp_c: Some(88.0 + (i % 7) as f64 * 0.7),
                battery_temp_c: Some(31.5 + (i % 3) as f64),
                ..Default::default()
            })
            .collect();
        let mut states = DeviceRuleStates::default();
        RuleSet::default_rules().evaluate("truck-0042", &mut states, &readings);
        let json = serde_json::to_vec(&states).unwrap();
        let stored = compress(&json);
        assert!(json.len() > 2_000, "{}", json.len());
        assert!(stored.len() < 1_000, "{} bytes deflated", stored.len());
        assert_eq!(decompress(&stored).unwrap(), json);
    }

    #[test]
    fn covering_prefixes_become_one_range_per_index_cell() {
        let prefixes: Vec<String> = ["u33db", "u33dc1", "u33dc4", "u34a"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let cells = DynamoPositions::cell_ranges(&prefixes).unwrap();
        assert_eq!(cells.len(), 2);
        assert_eq!(cells["u33"], ("u33db".to_string(), "u33dc4~".to_string()));
        assert_eq!(cells["u34"], ("u34a".to_string(), "u34a~".to_string()));
        // A 1-character prefix spans 1,024 cells, a 2-character one 32: both are scanned.
        assert!(DynamoPositions::cell_ranges(&["u".to_string()]).is_none());
        assert!(DynamoPositions::cell_ranges(&["u3".to_string()]).is_none());
    }
}
