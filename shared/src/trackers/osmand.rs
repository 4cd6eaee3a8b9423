//! Traccar Client's OsmAnd protocol (`POST /v1/ingest/osmand`).
//!
//! Two forms, as Traccar's own server reads them:
//! - **Parameters** in the query string or a form body: `id` (or `deviceid`), `timestamp`
//!   (epoch seconds, epoch milliseconds, RFC 3339, or `YYYY-MM-DD HH:MM:SS` in UTC), `lat`,
//!   `lon` (or `location=LAT,LON`), `speed` in knots, `bearing` (or `heading`), `altitude`,
//!   `accuracy`, `hdop`, `batt` (percent), `charge`, `valid`. A parameter named like one of
//!   GeoStream's reading fields (`engine_temp_c`) sets that field; any other numeric or
//!   boolean parameter becomes a free metric of its name; text parameters (`cell`, `wifi`,
//!   `driverUniqueId`) have no place in a reading and are left out.
//! - **JSON** (Traccar Client 9 and later): `{"device_id", "location": {"timestamp",
//!   "coords": {"latitude", "longitude", "speed" (m/s), "heading", "altitude", "accuracy"},
//!   "battery": {"level" (0-1), "is_charging"}, "odometer", "uuid", "extras"}}`, where
//!   `location` may also be an array of them.
//!
//! Without a timestamp the reading takes the time it was received, as Traccar does.

use chrono::NaiveDateTime;
use serde_json::Value;

use super::{
    unknown, validate_items, Item, TrackerError, TrackerPost, TrackerRequest, SECRET_PARAMETER,
};
use crate::model::READING_FIELDS;
use crate::validation::ValidationPolicy;
use crate::EpochMillis;

const KNOTS_TO_KMH: f64 = 1.852;
const METRES_PER_SECOND_TO_KMH: f64 = 3.6;

/// Reads one request of Traccar Client.
pub fn read(
    request: &TrackerRequest<'_>,
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<TrackerPost, TrackerError> {
    let body = request.checked_body(policy)?;
    if body.starts_with(b"{") {
        return read_json(request, body, now, policy);
    }
    let mut parameters: Vec<(String, String)> = request.query_pairs().collect();
    parameters.extend(
        form_urlencoded::parse(body).map(|(name, value)| (name.into_owned(), value.into_owned())),
    );
    let mut device_id = None;
    let mut item = Item::default();
    let mut valid_fix = true;
    for (name, value) in &parameters {
        match name.as_str() {
            "id" | "deviceid" => device_id = Some(value.clone()),
            SECRET_PARAMETER | "cell" | "wifi" | "driverUniqueId" => {}
            "timestamp" => timestamp(&mut item, value),
            "lat" | "lon" => {
                if let Some(degrees) = item.parse_number(name, value) {
                    item.set_number(name, name, degrees, None);
                }
            }
            "location" => match value.split_once(',') {
                Some((lat, lon)) => {
                    for (field, text) in [("lat", lat), ("lon", lon)] {
                        if let Some(degrees) = item.parse_number(name, text) {
                            item.set_number(field, name, degrees, None);
                        }
                    }
                }
                None => item.error(name, format!("must be LAT,LON, found {value:?}")),
            },
            "speed" => {
                if let Some(knots) = item.parse_number(name, value).filter(|v| !unknown(*v)) {
                    item.set_number(
                        "speed_kmh",
                        name,
                        knots * KNOTS_TO_KMH,
                        Some("in km/h, converted from the knots sent"),
                    );
                }
            }
            "bearing" | "heading" => {
                if let Some(degrees) = item.parse_number(name, value).filter(|v| !unknown(*v)) {
                    item.set_number("heading_deg", name, degrees, None);
                }
            }
            "batt" => {
                if let Some(percent) = item.parse_number(name, value) {
                    item.set_number("battery_soc_pct", name, percent, None);
                }
            }
            "altitude" => metric(&mut item, "altitude_m", name, value),
            "accuracy" => metric(&mut item, "accuracy_m", name, value),
            "charge" => metric(&mut item, "charging", name, value),
            "valid" => valid_fix = !matches!(value.as_str(), "false" | "0"),
            field if READING_FIELDS.iter().any(|(known, _, _)| *known == field) => {
                if let Some(number) = item.parse_number(name, value) {
                    item.set_number(field, name, number, None);
                }
            }
            other => {
                if let Some(number) = flag_or_number(value) {
                    item.set_metric(other, name, number);
                }
            }
        }
    }
    let device_id = device_id.ok_or_else(|| {
        TrackerError(
            "the device is not named: Traccar Client sends its identifier as the parameter `id`"
                .into(),
        )
    })?;
    item.set("device_id", "id", Value::String(device_id.clone()));
    if !item.fields.contains_key("ts") {
        item.set("ts", "timestamp", Value::from(now));
    }
    if !valid_fix {
        // The app says the fix is not valid: the reading keeps everything but the position.
        item.remove("lat");
        item.remove("lon");
    }
    Ok(TrackerPost {
        device_id,
        secret: request.secret(),
        batch: validate_items(vec![(0, item)], now, policy),
        ignored: 0,
    })
}

/// A free metric sent as text: a number, or a boolean as 1 or 0.
fn metric(item: &mut Item, name: &str, app_field: &str, text: &str) {
    match flag_or_number(text) {
        Some(number) => item.set_metric(name, app_field, number),
        None => item.error(app_field, format!("must be a number, found {text:?}")),
    }
}

fn flag_or_number(text: &str) -> Option<f64> {
    match text.trim() {
        "true" => Some(1.0),
        "false" => Some(0.0),
        number => number.parse().ok(),
    }
}

/// Traccar's readings of `timestamp`: seconds below 2^31, else milliseconds; RFC 3339; or a
/// date and time in UTC.
fn timestamp(item: &mut Item, text: &str) {
    item.name("ts", "timestamp", None);
    let text = text.trim();
    if let Ok(number) = text.parse::<i64>() {
        let millis = if number < i64::from(i32::MAX) {
            number.saturating_mul(1000)
        } else {
            number
        };
        item.set("ts", "timestamp", Value::from(millis));
    } else if text.contains('T') {
        item.set("ts", "timestamp", Value::String(text.to_string()));
    } else if let Ok(time) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S") {
        item.set(
            "ts",
            "timestamp",
            Value::from(time.and_utc().timestamp_millis()),
        );
    } else {
        item.error(
            "timestamp",
            format!("must be epoch seconds or milliseconds, RFC 3339, or YYYY-MM-DD HH:MM:SS in UTC; found {text:?}"),
        );
    }
}

/// Traccar Client's JSON form.
fn read_json(
    request: &TrackerRequest<'_>,
    body: &[u8],
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<TrackerPost, TrackerError> {
    let message: Value = serde_json::from_slice(body)
        .map_err(|error| TrackerError(format!("request body is not valid JSON: {error}")))?;
    let device_id = match message.get("device_id") {
        Some(Value::String(id)) => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => {
            return Err(TrackerError(
                "the device is not named: Traccar Client's JSON carries it as \"device_id\"".into(),
            ))
        }
    };
    let locations: Vec<&Value> = match message.get("location") {
        Some(Value::Array(locations)) => locations.iter().collect(),
        Some(location @ Value::Object(_)) => vec![location],
        _ => {
            return Err(TrackerError(
                "no \"location\" object (or array of them) in the JSON body".into(),
            ))
        }
    };
    if locations.len() > policy.max_items {
        return Err(TrackerError(format!(
            "request body holds {} locations; the limit is {}",
            locations.len(),
            policy.max_items
        )));
    }
    let items = locations
        .into_iter()
        .enumerate()
        .map(|(index, location)| (index, json_location(&device_id, location)))
        .collect();
    Ok(TrackerPost {
        device_id,
        secret: request.secret(),
        batch: validate_items(items, now, policy),
        ignored: 0,
    })
}

fn json_location(device_id: &str, location: &Value) -> Item {
    let mut item = Item::of_device(device_id, "device_id");
    item.name("ts", "location.timestamp", None);
    match location.get("timestamp") {
        Some(time) => item.set("ts", "location.timestamp", time.clone()),
        None => item.error("location.timestamp", "is required".into()),
    }
    if let Some(Value::String(uuid)) = location.get("uuid") {
        item.set("event_id", "location.uuid", Value::String(uuid.clone()));
    }
    let coords = location.get("coords");
    let coordinate = |name: &str| coords.and_then(|c| c.get(name));
    for (field, name) in [("lat", "latitude"), ("lon", "longitude")] {
        let app_field = format!("location.coords.{name}");
        item.name(field, &app_field, None);
        if let Some(degrees) = item.json_number(&app_field, coordinate(name)) {
            item.set_number(field, &app_field, degrees, None);
        }
    }
    if let Some(speed) = item
        .json_number("location.coords.speed", coordinate("speed"))
        .filter(|v| !unknown(*v))
    {
        item.set_number(
            "speed_kmh",
            "location.coords.speed",
            speed * METRES_PER_SECOND_TO_KMH,
            Some("in km/h, converted from the m/s sent"),
        );
    }
    if let Some(heading) = item
        .json_number("location.coords.heading", coordinate("heading"))
        .filter(|v| !unknown(*v))
    {
        item.set_number("heading_deg", "location.coords.heading", heading, None);
    }
    for (metric, name) in [("altitude_m", "altitude"), ("accuracy_m", "accuracy")] {
        let app_field = format!("location.coords.{name}");
        if let Some(value) = item.json_number(&app_field, coordinate(name)) {
            item.set_metric(metric, &app_field, value);
        }
    }
    let battery = location.get("battery");
    if let Some(level) = item
        .json_number(
            "location.battery.level",
            battery.and_then(|b| b.get("level")),
        )
        .filter(|v| !unknown(*v))
    {
        item.set_number(
            "battery_soc_pct",
            "location.battery.level",
            level * 100.0,
            Some("in percent, converted from the fraction sent"),
        );
    }
    if let Some(Value::Bool(charging)) = battery.and_then(|b| b.get("is_charging")) {
        item.set_metric(
            "charging",
            "location.battery.is_charging",
            f64::from(u8::from(*charging)),
        );
    }
    if let Some(odometer) = item.json_number("location.odometer", location.get("odometer")) {
        item.set_metric("odometer_m", "location.odometer", odometer);
    }
    if let Some(Value::Object(extras)) = location.get("extras") {
        for (name, value) in extras {
            let number = match value {
                Value::Number(number) => number.as_f64(),
                Value::Bool(flag) => Some(f64::from(u8::from(*flag))),
                // Text has no place in a reading.
                _ => None,
            };
            if let Some(number) = number {
                item.set_metric(name, &format!("location.extras.{name}"), number);
            }
        }
    }
    item
}
