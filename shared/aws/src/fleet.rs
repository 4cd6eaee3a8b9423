//! Geofences, fleet events and geofence occupants on DynamoDB.
//!
//! Tables (on-demand):
//! - geofences: key `geofence_id`, the geofence as JSON in `geofence`; an item
//!   [`VERSION_ITEM`] (an id no geofence can have) holds `version`, bumped in the same
//!   transaction as every write and delete: the stream functions' caches read it, not the
//!   table, to learn of a change.
//! - fleet events: key `event_id` (a replay puts the same item again), the event as JSON in
//!   `event`, `expires_at` (epoch seconds, DynamoDB's TTL: the retention); GSIs
//!   [`EVENTS_BY_DEVICE_INDEX`] (`device_id`, `ts`), [`EVENTS_BY_DAY_INDEX`] (`day`, `ts`) for
//!   fleet-wide listing newest first, and [`EVENTS_BY_GEOFENCE_INDEX`] (`geofence_id`, `ts`,
//!   sparse: geofence events only). Events are written once and never changed, so their
//!   indexes project everything at no later cost.
//! - geofence occupants: key `occupant_id` (`{geofence_id}|{device_id}`), `since`; GSI
//!   [`OCCUPANTS_BY_GEOFENCE_INDEX`] (`geofence_id`, `device_id`). Put by an enter, deleted by
//!   an exit, each only if not older than what is stored.
//!
//! Nothing here is on the hot path: the inspector reads the version at most once per refresh
//! interval and writes only when an event is made.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use geostream_shared::fleet::{FleetEvent, FleetEventType, Geofence};
use geostream_shared::ports::{EventFilter, FleetEventStore, GeofenceStore, Occupant, StoreError};
use geostream_shared::EpochMillis;

use crate::capacity::{self, CapacityMeter, Unit};
use crate::dynamodb::{expires_at, failed_a_condition, is_conditional_failure, n, s};
use crate::errors::store_error;

/// The geofences table's item that holds the version (`~` is not allowed in a geofence id).
pub const VERSION_ITEM: &str = "~version";
pub const EVENTS_BY_DEVICE_INDEX: &str = "by-device";
pub const EVENTS_BY_DAY_INDEX: &str = "by-day";
pub const EVENTS_BY_GEOFENCE_INDEX: &str = "by-geofence";
pub const OCCUPANTS_BY_GEOFENCE_INDEX: &str = "by-geofence";
/// How long events are kept when the deployment says nothing (`FLEET_EVENT_RETENTION_DAYS`).
pub const DEFAULT_EVENT_RETENTION_DAYS: u32 = 30;
const DAY_MS: EpochMillis = 86_400_000;

type Item = HashMap<String, AttributeValue>;

/// Geofences in DynamoDB.
#[derive(Clone)]
pub struct DynamoGeofences {
    client: aws_sdk_dynamodb::Client,
    table: String,
    meter: CapacityMeter,
}

impl DynamoGeofences {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoGeofences {
            client,
            table: table.into(),
            meter: CapacityMeter::default(),
        }
    }

    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    fn bump_version(&self) -> Result<TransactWriteItem, StoreError> {
        let update = Update::builder()
            .table_name(&self.table)
            .key("geofence_id", s(VERSION_ITEM))
            .update_expression("ADD version :one")
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(|e| StoreError::permanent("TransactWriteItems geofences", e.to_string()))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

#[async_trait]
impl GeofenceStore for DynamoGeofences {
    async fn put(&self, geofence: &Geofence) -> Result<(), StoreError> {
        let json = serde_json::to_string(geofence)
            .map_err(|e| StoreError::permanent("PutItem geofences", e.to_string()))?;
        let item: Item = [
            ("geofence_id".to_string(), s(&geofence.geofence_id)),
            ("geofence".to_string(), s(json)),
        ]
        .into();
        let size = capacity::item_size(&item);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| StoreError::permanent("TransactWriteItems geofences", e.to_string()))?;
        self.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(self.bump_version()?)
            .send()
            .await
            .map_err(|e| store_error("TransactWriteItems geofences", e))?;
        // Transactional writes cost twice.
        self.meter.add(
            Unit::DynamoWriteUnits,
            2.0 * (capacity::write_units(size) + 1.0),
        );
        Ok(())
    }

    async fn get(&self, geofence_id: &str) -> Result<Option<Geofence>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("geofence_id", s(geofence_id))
            .send()
            .await
            .map_err(|e| store_error("GetItem geofences", e))?;
        self.meter.add(
            Unit::DynamoReadUnits,
            capacity::read_units(output.item().map_or(0, capacity::item_size), false),
        );
        output.item().map(geofence_from_item).transpose()
    }

    async fn list(&self) -> Result<Vec<Geofence>, StoreError> {
        let mut geofences = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let output = self
                .client
                .scan()
                .table_name(&self.table)
                // Read after the version that told of the change: the change must be in it.
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("Scan geofences", e))?;
            let bytes: usize = output.items().iter().map(capacity::item_size).sum();
            self.meter
                .add(Unit::DynamoReadUnits, capacity::read_units(bytes, true));
            for item in output.items() {
                if item.get("geofence_id") != Some(&s(VERSION_ITEM)) {
                    geofences.push(geofence_from_item(item)?);
                }
            }
            match output.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        geofences.sort_by(|a, b| a.geofence_id.cmp(&b.geofence_id));
        Ok(geofences)
    }

    async fn delete(&self, geofence_id: &str) -> Result<bool, StoreError> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .key("geofence_id", s(geofence_id))
            .condition_expression("attribute_exists(geofence_id)")
            .build()
            .map_err(|e| StoreError::permanent("TransactWriteItems geofences", e.to_string()))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .transact_items(self.bump_version()?)
            .send()
            .await;
        self.meter.add(Unit::DynamoWriteUnits, 4.0);
        match result {
            Ok(_) => Ok(true),
            // Cancelled because the condition failed: there was none.
            Err(SdkError::ServiceError(service)) if failed_a_condition(service.err()) => Ok(false),
            Err(error) => Err(store_error("TransactWriteItems geofences", error)),
        }
    }

    async fn version(&self) -> Result<u64, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("geofence_id", s(VERSION_ITEM))
            // A replica behind the write would tell the old version: the change would go
            // unseen until the next one.
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| store_error("GetItem geofences", e))?;
        self.meter
            .add(Unit::DynamoReadUnits, capacity::read_units(0, true));
        Ok(output
            .item()
            .and_then(|item| item.get("version"))
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }
}

fn geofence_from_item(item: &Item) -> Result<Geofence, StoreError> {
    let json = item
        .get("geofence")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::permanent("geofences", "an item without its geofence"))?;
    serde_json::from_str(json)
        .map_err(|e| StoreError::permanent("geofences", format!("a stored geofence: {e}")))
}

/// Fleet events and geofence occupants in DynamoDB.
#[derive(Clone)]
pub struct DynamoFleetEvents {
    client: aws_sdk_dynamodb::Client,
    events_table: String,
    occupants_table: String,
    retention_days: u32,
    meter: CapacityMeter,
}

/// `YYYY-MM-DD` (UTC) of an event time: the by-day index's partition.
fn day_of(ts: EpochMillis) -> String {
    chrono::DateTime::from_timestamp_millis(ts)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "0000-00-00".into())
}

impl DynamoFleetEvents {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        events_table: impl Into<String>,
        occupants_table: impl Into<String>,
        retention_days: u32,
    ) -> Self {
        DynamoFleetEvents {
            client,
            events_table: events_table.into(),
            occupants_table: occupants_table.into(),
            retention_days,
            meter: CapacityMeter::default(),
        }
    }

    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    /// Events of one index partition, newest first, `from <= ts < to`, until `filter.limit`
    /// of them match.
    async fn query(
        &self,
        index: &str,
        partition: (&str, &str),
        filter: &EventFilter,
        found: &mut Vec<FleetEvent>,
    ) -> Result<(), StoreError> {
        let from = filter.from.unwrap_or(0);
        let to = filter.to.unwrap_or(i64::MAX);
        let mut start: Option<Item> = None;
        while found.len() < filter.limit {
            let output = self
                .client
                .query()
                .table_name(&self.events_table)
                .index_name(index)
                .key_condition_expression("#p = :p AND #ts BETWEEN :from AND :last")
                .expression_attribute_names("#p", partition.0)
                .expression_attribute_names("#ts", "ts")
                .expression_attribute_values(":p", s(partition.1))
                .expression_attribute_values(":from", n(from))
                .expression_attribute_values(":last", n(to.saturating_sub(1)))
                .scan_index_forward(false)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("Query fleet events", e))?;
            let bytes: usize = output.items().iter().map(capacity::item_size).sum();
            self.meter
                .add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
            for item in output.items() {
                let event = event_from_item(item)?;
                if filter.matches(&event) && found.len() < filter.limit {
                    found.push(event);
                }
            }
            match output.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(())
    }
}

fn event_from_item(item: &Item) -> Result<FleetEvent, StoreError> {
    let json = item
        .get("event")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| StoreError::permanent("fleet events", "an item without its event"))?;
    serde_json::from_str(json)
        .map_err(|e| StoreError::permanent("fleet events", format!("a stored event: {e}")))
}

#[async_trait]
impl FleetEventStore for DynamoFleetEvents {
    async fn record(&self, events: &[FleetEvent]) -> Result<(), StoreError> {
        for event in events {
            let json = serde_json::to_string(event)
                .map_err(|e| StoreError::permanent("PutItem fleet events", e.to_string()))?;
            let mut item: Item = [
                ("event_id".to_string(), s(&event.event_id)),
                ("device_id".to_string(), s(&event.device_id)),
                ("ts".to_string(), n(event.ts)),
                ("day".to_string(), s(day_of(event.ts))),
                ("event".to_string(), s(json)),
                (
                    "expires_at".to_string(),
                    expires_at(event.ts, self.retention_days),
                ),
            ]
            .into();
            if let Some(geofence_id) = &event.geofence_id {
                item.insert("geofence_id".into(), s(geofence_id));
            }
            let size = capacity::item_size(&item);
            self.client
                .put_item()
                .table_name(&self.events_table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| store_error("PutItem fleet events", e))?;
            // The table and the indexes the item is in (by-geofence only for geofence events).
            let indexes = if event.geofence_id.is_some() {
                3.0
            } else {
                2.0
            };
            self.meter.add(
                Unit::DynamoWriteUnits,
                (1.0 + indexes) * capacity::write_units(size),
            );
            let Some(geofence_id) = &event.geofence_id else {
                continue;
            };
            let occupant_id = format!("{geofence_id}|{}", event.device_id);
            let result = match event.kind {
                FleetEventType::GeofenceEnter => self
                    .client
                    .put_item()
                    .table_name(&self.occupants_table)
                    .item("occupant_id", s(&occupant_id))
                    .item("geofence_id", s(geofence_id))
                    .item("device_id", s(&event.device_id))
                    .item("since", n(event.ts))
                    .condition_expression("attribute_not_exists(occupant_id) OR since <= :ts")
                    .expression_attribute_values(":ts", n(event.ts))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            is_conditional_failure(&e),
                            store_error("PutItem occupants", e),
                        )
                    }),
                // An exit ends the stay it follows, not a later one.
                FleetEventType::GeofenceExit => self
                    .client
                    .delete_item()
                    .table_name(&self.occupants_table)
                    .key("occupant_id", s(&occupant_id))
                    .condition_expression("since <= :ts")
                    .expression_attribute_values(":ts", n(event.ts))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            is_conditional_failure(&e),
                            store_error("DeleteItem occupants", e),
                        )
                    }),
                _ => Ok(()),
            };
            self.meter.add(Unit::DynamoWriteUnits, 2.0);
            match result {
                Ok(()) | Err((true, _)) => {}
                Err((false, error)) => return Err(error),
            }
        }
        Ok(())
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<FleetEvent>, StoreError> {
        let mut found = Vec::new();
        if let Some(device_id) = &filter.device_id {
            self.query(
                EVENTS_BY_DEVICE_INDEX,
                ("device_id", device_id),
                filter,
                &mut found,
            )
            .await?;
        } else if let Some(geofence_id) = &filter.geofence_id {
            self.query(
                EVENTS_BY_GEOFENCE_INDEX,
                ("geofence_id", geofence_id),
                filter,
                &mut found,
            )
            .await?;
        } else {
            // Day by day, newest first, back to `from` or the retention.
            let now = geostream_shared::now_millis();
            let last = filter
                .to
                .map_or(now, |to| to.saturating_sub(1))
                .min(now + DAY_MS);
            let oldest = filter
                .from
                .unwrap_or(0)
                .max(now - i64::from(self.retention_days + 1) * DAY_MS);
            let mut day = last;
            while day >= oldest - DAY_MS && found.len() < filter.limit {
                let partition = day_of(day);
                self.query(EVENTS_BY_DAY_INDEX, ("day", &partition), filter, &mut found)
                    .await?;
                day -= DAY_MS;
            }
        }
        found.sort_by(|a, b| b.ts.cmp(&a.ts).then_with(|| a.event_id.cmp(&b.event_id)));
        found.truncate(filter.limit);
        Ok(found)
    }

    async fn clear_occupants(&self, geofence_id: &str) -> Result<(), StoreError> {
        for occupant in self.occupants(geofence_id).await? {
            self.client
                .delete_item()
                .table_name(&self.occupants_table)
                .key(
                    "occupant_id",
                    s(format!("{geofence_id}|{}", occupant.device_id)),
                )
                .send()
                .await
                .map_err(|e| store_error("DeleteItem occupants", e))?;
            self.meter.add(Unit::DynamoWriteUnits, 2.0);
        }
        Ok(())
    }

    async fn occupants(&self, geofence_id: &str) -> Result<Vec<Occupant>, StoreError> {
        let mut occupants = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.occupants_table)
                .index_name(OCCUPANTS_BY_GEOFENCE_INDEX)
                .key_condition_expression("geofence_id = :g")
                .expression_attribute_values(":g", s(geofence_id))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| store_error("Query occupants", e))?;
            let bytes: usize = output.items().iter().map(capacity::item_size).sum();
            self.meter
                .add(Unit::DynamoReadUnits, capacity::read_units(bytes, false));
            for item in output.items() {
                let device_id = item.get("device_id").and_then(|v| v.as_s().ok());
                let since = item
                    .get("since")
                    .and_then(|v| v.as_n().ok())
                    .and_then(|v| v.parse().ok());
                if let (Some(device_id), Some(since)) = (device_id, since) {
                    occupants.push(Occupant {
                        device_id: device_id.clone(),
                        since,
                    });
                }
            }
            match output.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(occupants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_765_065_599_999), "2025-12-06");
        assert_eq!(day_of(1_765_065_600_000), "2025-12-07");
    }
}
