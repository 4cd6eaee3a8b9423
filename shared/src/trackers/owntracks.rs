//! OwnTracks in HTTP mode (`POST /v1/ingest/owntracks`).
//!
//! The app posts one JSON message per request (an array of them is read too). Messages with
//! `_type: location` become readings: `lat`, `lon`, `tst` (epoch seconds), `vel` (km/h),
//! `cog` (degrees), `batt` (percent), `acc`, `alt` and `vac` (metres, as free metrics
//! `accuracy_m`, `altitude_m`, `vertical_accuracy_m`). Every other type (transitions,
//! waypoints, cards, status) is answered and not stored.
//!
//! The device is `USER:DEVICE` from the headers the app sends (`X-Limit-U`, `X-Limit-D`),
//! else from the message's `topic` (`owntracks/USER/DEVICE`), else the HTTP Basic user alone.

use serde_json::Value;

use super::{unknown, validate_items, Item, TrackerError, TrackerPost, TrackerRequest};
use crate::validation::ValidationPolicy;
use crate::EpochMillis;

/// Reads one request of OwnTracks.
pub fn read(
    request: &TrackerRequest<'_>,
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> Result<TrackerPost, TrackerError> {
    let body = request.checked_body(policy)?;
    if body.is_empty() {
        return Err(TrackerError("request body is empty".into()));
    }
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|error| TrackerError(format!("request body is not valid JSON: {error}")))?;
    let messages = match parsed {
        Value::Array(messages) => messages,
        message @ Value::Object(_) => vec![message],
        _ => {
            return Err(TrackerError(
                "request body must be an OwnTracks message (a JSON object) or an array of them"
                    .into(),
            ))
        }
    };
    if messages.len() > policy.max_items {
        return Err(TrackerError(format!(
            "request body holds {} messages; the limit is {}",
            messages.len(),
            policy.max_items
        )));
    }
    let device_id = device_of(request, &messages)?;
    let mut items = Vec::new();
    let mut ignored = 0;
    for (index, message) in messages.iter().enumerate() {
        if message.get("_type").and_then(Value::as_str) == Some("location") {
            items.push((index, location(&device_id, message)));
        } else {
            ignored += 1;
        }
    }
    Ok(TrackerPost {
        device_id,
        secret: request.secret(),
        batch: validate_items(items, now, policy),
        ignored,
    })
}

fn device_of(request: &TrackerRequest<'_>, messages: &[Value]) -> Result<String, TrackerError> {
    let joined = |user: &str, device: Option<&str>| match device {
        Some(device) => format!("{user}:{device}"),
        None => user.to_string(),
    };
    if let Some(user) = request.header("x-limit-u") {
        return Ok(joined(user, request.header("x-limit-d")));
    }
    let topic = messages
        .iter()
        .find_map(|message| message.get("topic").and_then(Value::as_str));
    if let Some(topic) = topic {
        let mut parts = topic.split('/');
        return match (parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(user), device) if !user.is_empty() => Ok(joined(user, device)),
            _ => Err(TrackerError(format!(
                "topic {topic:?} does not name a device: OwnTracks topics are owntracks/USER/DEVICE"
            ))),
        };
    }
    match request.basic_credentials() {
        Some((user, _)) if !user.is_empty() => Ok(user),
        _ => Err(TrackerError(
            "the device is not named: OwnTracks names it in the X-Limit-U and X-Limit-D headers (set a username and device id in its settings)".into(),
        )),
    }
}

fn location(device_id: &str, message: &Value) -> Item {
    let mut item = Item::of_device(device_id, "X-Limit-U:X-Limit-D");
    item.name("ts", "tst", None);
    match message.get("tst") {
        None | Some(Value::Null) => item.error("tst", "is required (epoch seconds)".into()),
        sent => match item.json_number("tst", sent) {
            Some(seconds) if seconds.fract() == 0.0 => {
                item.set(
                    "ts",
                    "tst",
                    Value::from((seconds as i64).saturating_mul(1000)),
                );
            }
            Some(seconds) => item.error(
                "tst",
                format!("must be whole epoch seconds, found {seconds}"),
            ),
            None => {}
        },
    }
    for field in ["lat", "lon"] {
        item.name(field, field, None);
        if let Some(degrees) = item.json_number(field, message.get(field)) {
            item.set_number(field, field, degrees, None);
        }
    }
    if let Some(speed) = item
        .json_number("vel", message.get("vel"))
        .filter(|v| !unknown(*v))
    {
        item.set_number("speed_kmh", "vel", speed, None);
    }
    if let Some(course) = item
        .json_number("cog", message.get("cog"))
        .filter(|v| !unknown(*v))
    {
        item.set_number("heading_deg", "cog", course, None);
    }
    if let Some(percent) = item
        .json_number("batt", message.get("batt"))
        .filter(|v| !unknown(*v))
    {
        item.set_number("battery_soc_pct", "batt", percent, None);
    }
    for (metric, field) in [
        ("accuracy_m", "acc"),
        ("altitude_m", "alt"),
        ("vertical_accuracy_m", "vac"),
    ] {
        if let Some(value) = item.json_number(field, message.get(field)) {
            item.set_metric(metric, field, value);
        }
    }
    item
}
