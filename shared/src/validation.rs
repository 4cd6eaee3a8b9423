//! Validation of device payloads (`POST /v1/telemetry`, docs/architecture.md, "Contracts").
//!
//! Every item is checked on its own: a bad item is reported by index and field, and its valid
//! neighbours are kept. An array body is split into its items' raw JSON first; an item made of
//! the contract's fields only is read straight into them ([`ItemFields`], no map of keys
//! built), any other item into a JSON value whose every key is looked at. Both are checked by
//! the same code, so they answer alike.

use std::collections::BTreeMap;

use chrono::DateTime;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::model::{Reading, READING_FIELDS};
use crate::EpochMillis;

/// Limits applied to a request. The defaults are the platform's contract.
#[derive(Debug, Clone)]
pub struct ValidationPolicy {
    pub max_body_bytes: usize,
    pub max_items: usize,
    /// How far in the past an event time may be.
    pub max_age_ms: i64,
    /// How far ahead of the receiver's clock an event time may be (device clock skew). Small on
    /// purpose: positions keep the newest reading, so a reading from the future would hold a
    /// vehicle's position until its time comes; 10 s bounds that to 10 s, while GPS- or
    /// NTP-set device clocks are within a second. (Rules are not blinded by it: readings that
    /// then look late are within the rules' lateness bound and evaluated in their place.)
    pub max_future_ms: i64,
    pub max_metrics: usize,
    /// How many bytes a reading's free metrics may take in the archive together: each name
    /// with its `metrics.` prefix, plus 8 bytes per value. It keeps every reading within a
    /// Timestream record (2 KB with the named readings and ids).
    pub max_metric_bytes: usize,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            max_body_bytes: 1024 * 1024,
            max_items: 500,
            max_age_ms: 7 * 24 * 3600 * 1000,
            max_future_ms: 10_000,
            max_metrics: 64,
            max_metric_bytes: 1024,
        }
    }
}

/// A problem with one field of one item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An item that was rejected, with every problem found in it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemRejection {
    pub index: usize,
    pub errors: Vec<FieldError>,
}

/// A problem with the request as a whole: nothing in it could be read as items.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("request body is empty")]
    Empty,
    #[error("request body is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    #[error("request body must be a JSON object or an array of objects, found {0}")]
    WrongShape(&'static str),
    #[error("request body holds {count} items; the limit is {limit}")]
    TooManyItems { count: usize, limit: usize },
    #[error("request body is an empty array")]
    NoItems,
}

/// The outcome of validating one request: the valid readings with their item index, and the
/// rejected items.
#[derive(Debug, Clone, Default)]
pub struct ValidatedBatch {
    pub accepted: Vec<(usize, Reading)>,
    pub rejected: Vec<ItemRejection>,
}

impl ValidatedBatch {
    pub fn item_count(&self) -> usize {
        self.accepted.len() + self.rejected.len()
    }
}

/// Validates a request body received at `now`.
pub fn validate_body(
    body: &[u8],
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<ValidatedBatch, BodyError> {
    if body.len() > policy.max_body_bytes {
        return Err(BodyError::TooLarge {
            size: body.len(),
            limit: policy.max_body_bytes,
        });
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(BodyError::Empty);
    }
    if let Ok(items) = serde_json::from_slice::<Vec<&RawValue>>(body) {
        return validate_raw_items(&items, now, policy);
    }
    let parsed: Value =
        serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let items = match parsed {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(BodyError::NoItems);
            }
            if items.len() > policy.max_items {
                return Err(BodyError::TooManyItems {
                    count: items.len(),
                    limit: policy.max_items,
                });
            }
            items
        }
        Value::Object(_) => vec![parsed],
        other => return Err(BodyError::WrongShape(json_kind(&other))),
    };
    let mut batch = ValidatedBatch::default();
    for (index, item) in items.into_iter().enumerate() {
        match validate_item(&item, now, policy) {
            Ok(reading) => batch.accepted.push((index, reading)),
            Err(errors) => batch.rejected.push(ItemRejection { index, errors }),
        }
    }
    Ok(batch)
}

/// The items of an array body, each read into [`ItemFields`] when it is made of the contract's
/// fields only (the common case: no map of keys is built), else into a JSON value.
fn validate_raw_items(
    items: &[&RawValue],
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<ValidatedBatch, BodyError> {
    if items.is_empty() {
        return Err(BodyError::NoItems);
    }
    if items.len() > policy.max_items {
        return Err(BodyError::TooManyItems {
            count: items.len(),
            limit: policy.max_items,
        });
    }
    let mut batch = ValidatedBatch::default();
    for (index, item) in items.iter().enumerate() {
        let checked = match serde_json::from_str::<ItemFields>(item.get()) {
            Ok(fields) => check_fields(&fields, now, policy),
            // Unknown or repeated keys, or not an object: the value says which.
            Err(_) => match serde_json::from_str::<Value>(item.get()) {
                Ok(value) => validate_item(&value, now, policy),
                // The whole body parsed as JSON, so each of its items does.
                Err(error) => Err(vec![FieldError {
                    field: String::new(),
                    message: format!("item is not valid JSON: {error}"),
                }]),
            },
        };
        match checked {
            Ok(reading) => batch.accepted.push((index, reading)),
            Err(errors) => batch.rejected.push(ItemRejection { index, errors }),
        }
    }
    Ok(batch)
}

/// An item's fields as the contract names them, each the JSON value sent (a `null` sent is
/// kept as a value, as a map of the item would keep it). Refuses any other key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemFields {
    #[serde(default, deserialize_with = "sent")]
    device_id: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    ts: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    event_id: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    lat: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    lon: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    speed_kmh: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    heading_deg: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    engine_temp_c: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    battery_temp_c: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    battery_soc_pct: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    tire_pressure_psi: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    fuel_pct: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    temperature_c: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    humidity_pct: Option<Value>,
    #[serde(default, deserialize_with = "sent")]
    metrics: Option<Value>,
}

fn sent<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// An item's fields by name, however the item was read.
trait Fields {
    fn field(&self, name: &str) -> Option<&Value>;
}

impl Fields for Map<String, Value> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

impl Fields for ItemFields {
    fn field(&self, name: &str) -> Option<&Value> {
        match name {
            "device_id" => self.device_id.as_ref(),
            "ts" => self.ts.as_ref(),
            "event_id" => self.event_id.as_ref(),
            "lat" => self.lat.as_ref(),
            "lon" => self.lon.as_ref(),
            "speed_kmh" => self.speed_kmh.as_ref(),
            "heading_deg" => self.heading_deg.as_ref(),
            "engine_temp_c" => self.engine_temp_c.as_ref(),
            "battery_temp_c" => self.battery_temp_c.as_ref(),
            "battery_soc_pct" => self.battery_soc_pct.as_ref(),
            "tire_pressure_psi" => self.tire_pressure_psi.as_ref(),
            "fuel_pct" => self.fuel_pct.as_ref(),
            "temperature_c" => self.temperature_c.as_ref(),
            "humidity_pct" => self.humidity_pct.as_ref(),
            "metrics" => self.metrics.as_ref(),
            _ => None,
        }
    }
}

pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `id` is a valid device id: 1 to 64 of `[A-Za-z0-9_.:-]`.
pub fn is_valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Validates one item; on failure returns every problem found, not just the first.
pub fn validate_item(
    item: &Value,
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<Reading, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.to_string(),
            message,
        })
    };
    let Some(object) = item.as_object() else {
        err(
            "",
            format!("item must be a JSON object, found {}", json_kind(item)),
        );
        return Err(errors);
    };

    for key in object.keys() {
        let known = matches!(
            key.as_str(),
            "device_id" | "ts" | "event_id" | "lat" | "lon" | "metrics"
        ) || READING_FIELDS.iter().any(|(name, _, _)| name == key);
        if !known {
            err(key, "unknown field".to_string());
        }
    }
    match check_fields(object, now, policy) {
        Ok(reading) if errors.is_empty() => Ok(reading),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// Checks an item's fields; on failure returns every problem found.
fn check_fields(
    object: &impl Fields,
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<Reading, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut err = |field: &str, message: String| {
        errors.push(FieldError {
            field: field.to_string(),
            message,
        })
    };
    let device_id = match object.field("device_id") {
        None => {
            err("device_id", "is required".to_string());
            None
        }
        Some(Value::String(id)) if is_valid_device_id(id) => Some(id.clone()),
        Some(Value::String(_)) => {
            err(
                "device_id",
                "must be 1-64 characters of A-Z a-z 0-9 _ . : -".to_string(),
            );
            None
        }
        Some(other) => {
            err(
                "device_id",
                format!("must be a string, found {}", json_kind(other)),
            );
            None
        }
    };

    let ts = match object.field("ts") {
        None => {
            err(
                "ts",
                "is required (RFC 3339 or epoch milliseconds)".to_string(),
            );
            None
        }
        Some(value) => match parse_timestamp(value) {
            Err(message) => {
                err("ts", message);
                None
            }
            Ok(ts) if ts > now + policy.max_future_ms => {
                err(
                    "ts",
                    format!(
                        "is {:.1} s ahead of the receiver's clock; at most {} s of clock skew are allowed",
                        (ts - now) as f64 / 1000.0,
                        policy.max_future_ms / 1000
                    ),
                );
                None
            }
            Ok(ts) if ts < now - policy.max_age_ms => {
                err(
                    "ts",
                    format!(
                        "is {} s in the past; at most {} s are allowed",
                        (now - ts) / 1000,
                        policy.max_age_ms / 1000
                    ),
                );
                None
            }
            Ok(ts) => Some(ts),
        },
    };

    let event_id = match object.field("event_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id))
            if (1..=128).contains(&id.len()) && !id.chars().any(char::is_control) =>
        {
            Some(id.clone())
        }
        Some(Value::String(_)) => {
            err(
                "event_id",
                "must be 1-128 characters without control characters".to_string(),
            );
            None
        }
        Some(other) => {
            err(
                "event_id",
                format!("must be a string, found {}", json_kind(other)),
            );
            None
        }
    };

    let mut reading = Reading::default();
    let lat = number_in_range(object, "lat", -90.0, 90.0, &mut err);
    let lon = number_in_range(object, "lon", -180.0, 180.0, &mut err);
    match (object.field("lat").is_some(), object.field("lon").is_some()) {
        (true, false) => err("lon", "is required when lat is given".to_string()),
        (false, true) => err("lat", "is required when lon is given".to_string()),
        _ => {}
    }
    reading.lat = lat;
    reading.lon = lon;
    for (name, min, max) in READING_FIELDS {
        if let Some(value) = number_in_range(object, name, *min, *max, &mut err) {
            reading.set_value(name, value);
        }
    }
    reading.metrics = validate_metrics(object.field("metrics"), policy, &mut err);

    match (device_id, ts) {
        (Some(device_id), Some(ts)) if errors.is_empty() => {
            reading.event_id = event_id.unwrap_or_else(|| format!("{device_id}@{ts}"));
            reading.device_id = device_id;
            reading.ts = ts;
            Ok(reading)
        }
        _ => Err(errors),
    }
}

fn number_in_range(
    object: &impl Fields,
    field: &str,
    min: f64,
    max: f64,
    err: &mut impl FnMut(&str, String),
) -> Option<f64> {
    let value = object.field(field)?;
    match value.as_f64() {
        None => {
            err(
                field,
                format!("must be a number, found {}", json_kind(value)),
            );
            None
        }
        Some(number) if !number.is_finite() => {
            err(field, "must be a finite number".to_string());
            None
        }
        Some(number) if number < min || number > max => {
            err(field, format!("{number} is out of range [{min}, {max}]"));
            None
        }
        Some(number) => Some(number),
    }
}

fn validate_metrics(
    value: Option<&Value>,
    policy: &ValidationPolicy,
    err: &mut impl FnMut(&str, String),
) -> BTreeMap<String, f64> {
    let mut metrics = BTreeMap::new();
    let Some(value) = value else {
        return metrics;
    };
    let Some(object) = value.as_object() else {
        err(
            "metrics",
            format!(
                "must be an object of name -> number, found {}",
                json_kind(value)
            ),
        );
        return metrics;
    };
    if object.len() > policy.max_metrics {
        err(
            "metrics",
            format!(
                "holds {} metrics; the limit is {}",
                object.len(),
                policy.max_metrics
            ),
        );
        return metrics;
    }
    let archived_bytes: usize = object
        .keys()
        .map(|name| "metrics.".len() + name.len() + 8)
        .sum();
    if archived_bytes > policy.max_metric_bytes {
        err(
            "metrics",
            format!(
                "take {archived_bytes} bytes in the archive (each name with its \"metrics.\" prefix, plus 8 per value); the limit is {}",
                policy.max_metric_bytes
            ),
        );
        return metrics;
    }
    for (name, value) in object {
        let field = format!("metrics.{name}");
        if !is_valid_device_id(name) {
            err(
                &field,
                "metric names must be 1-64 characters of A-Z a-z 0-9 _ . : -".to_string(),
            );
            continue;
        }
        match value.as_f64() {
            Some(number) if number.is_finite() => {
                metrics.insert(name.clone(), number);
            }
            Some(_) => err(&field, "must be a finite number".to_string()),
            None => err(
                &field,
                format!("must be a number, found {}", json_kind(value)),
            ),
        }
    }
    metrics
}

/// Parses an event time: an RFC 3339 string, or an integer number of epoch milliseconds.
pub fn parse_timestamp(value: &Value) -> Result<EpochMillis, String> {
    match value {
        Value::String(text) => DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|e| format!("{text:?} is not an RFC 3339 timestamp: {e}")),
        Value::Number(number) => match number.as_i64() {
            Some(ms) => Ok(ms),
            None => Err(format!(
                "{number} is not a whole number of epoch milliseconds"
            )),
        },
        other => Err(format!(
            "must be an RFC 3339 string or epoch milliseconds, found {}",
            json_kind(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: EpochMillis = 1_763_900_000_000;

    fn validate(value: Value) -> Result<ValidatedBatch, BodyError> {
        validate_body(
            value.to_string().as_bytes(),
            NOW,
            &ValidationPolicy::default(),
        )
    }

    #[test]
    fn accepts_a_full_item_and_derives_the_event_id() {
        let batch = validate(json!({
            "device_id": "truck-7", "ts": "2025-11-23T12:13:20Z", "lat": 52.5, "lon": 13.4,
            "speed_kmh": 50.5, "engine_temp_c": 90, "metrics": {"door_open": 1}
        }))
        .unwrap();
        assert!(batch.rejected.is_empty());
        let reading = &batch.accepted[0].1;
        assert_eq!(reading.ts, NOW);
        assert_eq!(reading.event_id, format!("truck-7@{NOW}"));
        assert_eq!(reading.engine_temp_c, Some(90.0));
        assert_eq!(reading.metrics["door_open"], 1.0);
    }

    #[test]
    fn metrics_that_would_outgrow_an_archive_record_are_refused_by_name() {
        let metrics = |count: usize, name_len: usize| -> Value {
            (0..count)
                .map(|i| (format!("{i:0name_len$}"), json!(1.0)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let batch = validate(json!([
            {"device_id": "a", "ts": NOW, "metrics": metrics(40, 20)},
            {"device_id": "b", "ts": NOW, "metrics": metrics(30, 10)},
        ]))
        .unwrap();
        assert_eq!(batch.accepted.len(), 1);
        assert_eq!(batch.accepted[0].1.metrics.len(), 30);
        let refusal = &batch.rejected[0].errors[0];
        assert_eq!(refusal.field, "metrics");
        assert!(
            refusal.message.contains("take 1440 bytes"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn mixed_batch_keeps_valid_items_and_names_each_bad_field() {
        let batch = validate(json!([
            {"device_id": "a", "ts": NOW},
            {"device_id": "b c", "ts": NOW, "lat": 91, "bogus": true},
            {"device_id": "d", "ts": NOW, "lat": 10},
            {"device_id": "e", "ts": NOW + 3_600_000},
            {"device_id": "f", "ts": NOW, "metrics": {"x": "high"}},
            "not an object",
        ]))
        .unwrap();
        assert_eq!(batch.accepted.len(), 1);
        assert_eq!(batch.accepted[0].0, 0);
        let fields = |index: usize| -> Vec<String> {
            let rejection = batch.rejected.iter().find(|r| r.index == index).unwrap();
            rejection.errors.iter().map(|e| e.field.clone()).collect()
        };
        assert_eq!(fields(1), ["bogus", "device_id", "lat", "lon"]);
        assert_eq!(fields(2), ["lon"]);
        assert_eq!(fields(3), ["ts"]);
        assert_eq!(fields(4), ["metrics.x"]);
        assert_eq!(fields(5), [""]);
    }

    #[test]
    fn body_level_errors() {
        let policy = ValidationPolicy::default();
        assert_eq!(
            validate_body(b" ", NOW, &policy).unwrap_err(),
            BodyError::Empty
        );
        assert!(matches!(
            validate_body(b"{", NOW, &policy),
            Err(BodyError::NotJson(_))
        ));
        assert_eq!(
            validate_body(b"[]", NOW, &policy).unwrap_err(),
            BodyError::NoItems
        );
        assert_eq!(
            validate_body(b"3", NOW, &policy).unwrap_err(),
            BodyError::WrongShape("a number")
        );
        let many = Value::Array(vec![json!({"device_id": "a", "ts": NOW}); 501]).to_string();
        assert_eq!(
            validate_body(many.as_bytes(), NOW, &policy).unwrap_err(),
            BodyError::TooManyItems {
                count: 501,
                limit: 500
            }
        );
        let big = vec![b' '; policy.max_body_bytes + 1];
        assert!(matches!(
            validate_body(&big, NOW, &policy),
            Err(BodyError::TooLarge { .. })
        ));
    }

    #[test]
    fn huge_numbers_are_rejected_not_accepted_as_infinity() {
        let body = format!(r#"{{"device_id":"a","ts":{NOW},"speed_kmh":1e999}}"#);
        let outcome = validate_body(body.as_bytes(), NOW, &ValidationPolicy::default());
        match outcome {
            Err(BodyError::NotJson(_)) => {}
            Ok(batch) => assert_eq!(batch.rejected[0].errors[0].field, "speed_kmh"),
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_reading_at_most_ten_seconds_ahead_is_taken_further_is_refused() {
        let body = json!([
            {"device_id": "a", "ts": NOW + 10_000},
            {"device_id": "b", "ts": NOW + 10_001},
            {"device_id": "c", "ts": NOW + 240_000},
        ]);
        let batch = validate_body(
            body.to_string().as_bytes(),
            NOW,
            &ValidationPolicy::default(),
        )
        .unwrap();
        assert_eq!(batch.accepted.len(), 1);
        assert_eq!(batch.accepted[0].1.device_id, "a");
        let messages: Vec<&str> = batch
            .rejected
            .iter()
            .map(|r| r.errors[0].message.as_str())
            .collect();
        assert_eq!(
            messages,
            [
                "is 10.0 s ahead of the receiver's clock; at most 10 s of clock skew are allowed",
                "is 240.0 s ahead of the receiver's clock; at most 10 s of clock skew are allowed",
            ]
        );
    }

    #[test]
    fn timestamps_in_both_forms() {
        assert_eq!(parse_timestamp(&json!(NOW)), Ok(NOW));
        assert_eq!(
            parse_timestamp(&json!("2025-11-23T13:13:20+01:00")),
            Ok(NOW)
        );
        assert!(parse_timestamp(&json!(1.5)).is_err());
        assert!(parse_timestamp(&json!("yesterday")).is_err());
    }
}

#[cfg(test)]
mod equivalence {
    use super::*;
    use proptest::prelude::*;

    const NOW: EpochMillis = 1_763_900_000_000;

    /// A value for a field: right, wrong in kind, null, out of range.
    fn field_value(name: &'static str) -> impl Strategy<Value = Value> {
        let right: BoxedStrategy<Value> = match name {
            "device_id" => prop_oneof![6 => "[a-z0-9_.:-]{1,10}", 1 => "[ -~]{0,70}"]
                .prop_map(Value::from)
                .boxed(),
            "ts" => prop_oneof![
                6 => (NOW - 600_000_000..NOW + 20_000).prop_map(Value::from),
                1 => Just(Value::from("2025-11-23T12:00:00Z")),
                1 => Just(Value::from("yesterday")),
                1 => Just(Value::from(1.5)),
            ]
            .boxed(),
            "event_id" => "[ -~]{0,130}".prop_map(Value::from).boxed(),
            "metrics" => proptest::collection::btree_map(
                prop_oneof![6 => "[a-z]{1,6}", 1 => "[a-z!]{1,6}"],
                prop_oneof![
                    6 => (-1e9..1e9f64).prop_map(Value::from),
                    1 => Just(Value::from("x")),
                ],
                0..4,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
            _ => {
                let (min, max) = match name {
                    "lat" => (-90.0, 90.0),
                    "lon" => (-180.0, 180.0),
                    _ => READING_FIELDS
                        .iter()
                        .find(|(field, _, _)| *field == name)
                        .map(|(_, min, max)| (*min, *max))
                        .unwrap_or((0.0, 1.0)),
                };
                // Mostly in range, sometimes just outside it.
                prop_oneof![
                    16 => (min..=max).prop_map(Value::from),
                    3 => (min as i64..=max as i64).prop_map(Value::from),
                    1 => (max..max + 10.0).prop_map(Value::from),
                ]
                .boxed()
            }
        };
        prop_oneof![
            150 => right,
            1 => Just(Value::Null),
            1 => Just(Value::from(true)),
            1 => Just(Value::from("text")),
            1 => Just(Value::Array(vec![])),
        ]
    }

    fn item() -> impl Strategy<Value = Value> {
        let names: Vec<&'static str> = ["device_id", "ts", "event_id", "lat", "lon", "metrics"]
            .into_iter()
            .chain(READING_FIELDS.iter().map(|(name, _, _)| *name))
            .collect();
        let fields: Vec<_> = names
            .into_iter()
            .map(|name| {
                // The required fields and the position are mostly there; the others often not.
                let present = if matches!(name, "device_id" | "ts" | "lat" | "lon") {
                    0.97
                } else {
                    0.7
                };
                proptest::option::weighted(present, field_value(name)).prop_map(move |v| (name, v))
            })
            .collect();
        (
            fields,
            proptest::option::weighted(0.1, "[a-z]{1,8}"),
            0..20u8,
        )
            .prop_map(|(fields, unknown, shape)| {
                if shape == 0 {
                    return Value::from(42);
                }
                let mut object: Map<String, Value> = fields
                    .into_iter()
                    .filter_map(|(name, value)| value.map(|v| (name.to_string(), v)))
                    .collect();
                if let Some(key) = unknown {
                    object.insert(key, Value::from(1));
                }
                Value::Object(object)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Reading items straight into their fields answers exactly what reading each into a
        /// JSON value and checking every key does: the same readings, the same errors.
        #[test]
        fn items_read_into_their_fields_answer_as_json_values_do(
            items in proptest::collection::vec(item(), 1..20)
        ) {
            let body = serde_json::to_vec(&items).unwrap();
            let batch = validate_body(&body, NOW, &ValidationPolicy::default()).unwrap();
            let mut accepted = Vec::new();
            let mut rejected = Vec::new();
            for (index, item) in items.iter().enumerate() {
                match validate_item(item, NOW, &ValidationPolicy::default()) {
                    Ok(reading) => accepted.push((index, reading)),
                    Err(errors) => rejected.push(ItemRejection { index, errors }),
                }
            }
            prop_assert_eq!(batch.accepted, accepted);
            prop_assert_eq!(batch.rejected, rejected);

        }
    }

    /// The generated items are both accepted and rejected, in both ways of reading them, so
    /// the property above compares readings as well as errors.
    #[test]
    fn the_generated_items_cover_both_outcomes_and_both_readings() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let items: Vec<Value> = (0..300)
            .map(|_| item().new_tree(&mut runner).unwrap().current())
            .collect();
        let typed = items
            .iter()
            .filter(|i| serde_json::from_value::<ItemFields>((*i).clone()).is_ok())
            .count();
        let body = serde_json::to_vec(&items).unwrap();
        let batch = validate_body(&body, NOW, &ValidationPolicy::default()).unwrap();
        assert!(
            batch.accepted.len() > 20,
            "{} accepted",
            batch.accepted.len()
        );
        assert!(
            batch.rejected.len() > 20,
            "{} rejected",
            batch.rejected.len()
        );
        assert!(typed > 100 && typed < 300, "{typed} read into their fields");
    }

    #[test]
    fn every_reading_field_is_a_field_of_an_item() {
        for (name, _, _) in READING_FIELDS {
            let body = format!("{{\"{name}\": 1}}");
            let fields: ItemFields =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(fields.field(name), Some(&Value::from(1)), "{name}");
        }
        assert!(serde_json::from_str::<ItemFields>("{\"lat\": 1, \"lat\": 2}").is_err());
        assert!(serde_json::from_str::<ItemFields>("{\"speed\": 1}").is_err());
        assert_eq!(
            serde_json::from_str::<ItemFields>("{\"lat\": null}")
                .unwrap()
                .lat,
            Some(Value::Null),
            "a null sent is a value, not an absent field"
        );
    }
}
