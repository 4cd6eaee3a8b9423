//! The protocols of existing tracker apps, read into GeoStream readings: Traccar Client's
//! OsmAnd protocol ([`osmand`]) and OwnTracks' HTTP mode ([`owntracks`]).
//!
//! Each message becomes an item of GeoStream's own fields and goes through the same
//! validation as `POST /v1/telemetry`; a problem is reported under the app's name of the field
//! (`speed`, `tst`), with the unit conversion said where one was made. Neither app sends an
//! idempotency id (except Traccar Client's JSON form, whose `uuid` is used), so a reading's
//! event id is `device@ts` and a message sent again is the same reading.

pub mod osmand;
pub mod owntracks;

#[cfg(test)]
mod tests;

use base64::Engine;
use serde_json::{Map, Number, Value};

use crate::validation::{
    json_kind, validate_item, FieldError, ItemRejection, ValidatedBatch, ValidationPolicy,
};
use crate::EpochMillis;

/// A tracker app's request, read: the device it speaks for, the secret it presented and its
/// readings, validated.
#[derive(Debug, Clone)]
pub struct TrackerPost {
    pub device_id: String,
    pub secret: Option<String>,
    pub batch: ValidatedBatch,
    /// Messages that are not locations (OwnTracks' transitions, waypoints, ...): answered,
    /// not stored.
    pub ignored: usize,
}

/// A request that could not be read at all (answered 400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TrackerError(pub String);

/// The parts of an HTTP request a tracker protocol reads.
#[derive(Debug, Clone, Copy)]
pub struct TrackerRequest<'a> {
    /// The raw query string, without `?`.
    pub query: &'a str,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
}

/// The query parameter that carries a device's secret where the app cannot send a header
/// (Traccar Client's server URL: `https://HOST/v1/ingest/osmand?secret=...`).
pub const SECRET_PARAMETER: &str = "secret";

impl TrackerRequest<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| !value.is_empty())
    }

    /// HTTP Basic credentials, user and password.
    fn basic_credentials(&self) -> Option<(String, String)> {
        let encoded = self
            .header(http::header::AUTHORIZATION.as_str())?
            .strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }

    fn query_pairs(&self) -> impl Iterator<Item = (String, String)> + '_ {
        form_urlencoded::parse(self.query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
    }

    /// The secret in the URL, else the password of HTTP Basic.
    fn secret(&self) -> Option<String> {
        self.query_pairs()
            .find(|(name, _)| name == SECRET_PARAMETER)
            .map(|(_, secret)| secret)
            .or_else(|| self.basic_credentials().map(|(_, password)| password))
    }

    fn checked_body(&self, policy: &ValidationPolicy) -> Result<&[u8], TrackerError> {
        if self.body.len() > policy.max_body_bytes {
            return Err(TrackerError(format!(
                "request body is {} bytes; the limit is {}",
                self.body.len(),
                policy.max_body_bytes
            )));
        }
        Ok(self.body.trim_ascii())
    }
}

/// What a GeoStream field was called by the app, and the conversion made on the way.
struct AppName {
    field: String,
    app_field: String,
    conversion: Option<&'static str>,
}

/// One message being read into GeoStream's fields.
#[derive(Default)]
struct Item {
    fields: Map<String, Value>,
    metrics: Map<String, Value>,
    names: Vec<AppName>,
    errors: Vec<FieldError>,
}

impl Item {
    /// An item of `device_id`, named `app_field` by the app.
    fn of_device(device_id: &str, app_field: &str) -> Item {
        let mut item = Item::default();
        item.set("device_id", app_field, Value::String(device_id.to_string()));
        item
    }

    fn error(&mut self, app_field: &str, message: String) {
        self.errors.push(FieldError {
            field: app_field.to_string(),
            message,
        });
    }

    fn name(&mut self, field: &str, app_field: &str, conversion: Option<&'static str>) {
        self.names.retain(|name| name.field != field);
        self.names.push(AppName {
            field: field.to_string(),
            app_field: app_field.to_string(),
            conversion,
        });
    }

    fn set(&mut self, field: &str, app_field: &str, value: Value) {
        self.fields.insert(field.to_string(), value);
        self.name(field, app_field, None);
    }

    /// Sets a number, converted (`conversion` says how, for error messages).
    fn set_number(
        &mut self,
        field: &str,
        app_field: &str,
        value: f64,
        conversion: Option<&'static str>,
    ) {
        match Number::from_f64(value) {
            Some(number) => {
                self.fields.insert(field.to_string(), Value::Number(number));
                self.name(field, app_field, conversion);
            }
            None => self.error(app_field, "must be a finite number".to_string()),
        }
    }

    fn set_metric(&mut self, name: &str, app_field: &str, value: f64) {
        match Number::from_f64(value) {
            Some(number) => {
                self.metrics.insert(name.to_string(), Value::Number(number));
                self.name(&format!("metrics.{name}"), app_field, None);
            }
            None => self.error(app_field, "must be a finite number".to_string()),
        }
    }

    fn remove(&mut self, field: &str) {
        self.fields.remove(field);
        self.names.retain(|name| name.field != field);
    }

    /// A number sent as text (query and form parameters).
    fn parse_number(&mut self, app_field: &str, text: &str) -> Option<f64> {
        match text.trim().parse::<f64>() {
            Ok(number) => Some(number),
            Err(_) => {
                self.error(app_field, format!("must be a number, found {text:?}"));
                None
            }
        }
    }

    /// A number sent as JSON; `null` is the same as not sent.
    fn json_number(&mut self, app_field: &str, value: Option<&Value>) -> Option<f64> {
        match value? {
            Value::Null => None,
            Value::Number(number) => number.as_f64(),
            other => {
                self.error(
                    app_field,
                    format!("must be a number, found {}", json_kind(other)),
                );
                None
            }
        }
    }

    /// Validates the item as `POST /v1/telemetry` would, and names every problem as the app
    /// named the field.
    fn finish(
        mut self,
        now: EpochMillis,
        policy: &ValidationPolicy,
    ) -> Result<crate::model::Reading, Vec<FieldError>> {
        if !self.metrics.is_empty() {
            let metrics = std::mem::take(&mut self.metrics);
            self.fields.insert("metrics".into(), Value::Object(metrics));
        }
        let checked = validate_item(&Value::Object(self.fields), now, policy);
        let names = self.names;
        let in_app_terms = |error: FieldError| match names.iter().find(|n| n.field == error.field) {
            Some(name) => FieldError {
                field: name.app_field.clone(),
                message: match name.conversion {
                    Some(conversion) => format!("{} ({conversion})", error.message),
                    None => error.message,
                },
            },
            None => error,
        };
        match checked {
            Ok(reading) if self.errors.is_empty() => Ok(reading),
            Ok(_) => Err(self.errors),
            Err(errors) => {
                // A field the app's value was already refused for is not reported twice.
                let mut all = self.errors;
                let reported: Vec<String> = all.iter().map(|e| e.field.clone()).collect();
                all.extend(
                    errors
                        .into_iter()
                        .map(in_app_terms)
                        .filter(|error| !reported.contains(&error.field)),
                );
                Err(all)
            }
        }
    }
}

/// Validates the items of one request into a batch, each under its message's index.
fn validate_items(
    items: Vec<(usize, Item)>,
    now: EpochMillis,
    policy: &ValidationPolicy,
) -> ValidatedBatch {
    let mut batch = ValidatedBatch::default();
    for (index, item) in items {
        match item.finish(now, policy) {
            Ok(reading) => batch.accepted.push((index, reading)),
            Err(errors) => batch.rejected.push(ItemRejection { index, errors }),
        }
    }
    batch
}

/// Whether a value an app sends as "unknown" (Traccar Client and OwnTracks send -1 for a speed
/// or course they do not have).
fn unknown(value: f64) -> bool {
    value < 0.0
}
