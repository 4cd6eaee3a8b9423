//! The query-api function (API Gateway HTTP API, payload v2):
//!
//! - `GET  /v1/vehicles/{id}`: latest position of a vehicle
//! - `GET  /v1/vehicles/near?lat=&lon=&radius_m=&limit=`: vehicles within a radius, nearest first
//! - `GET  /v1/vehicles/{id}/track?from=&to=&limit=`: a vehicle's readings over a time range
//! - `GET  /v1/alerts?state=active|cleared&device_id=&limit=`: alerts, newest first
//! - `POST /v1/alerts/{alert_id}/ack`: acknowledge an alert, recorded under the token's subject
//!   (on an open runner without tokens, under the body's optional `{"by": "name"}`)
//!
//! With fleet stores ([`QueryApi::with_fleet`]):
//!
//! - `PUT /v1/geofences/{geofence_id}`, `GET /v1/geofences`, `GET|DELETE
//!   /v1/geofences/{geofence_id}`, `GET /v1/geofences/{geofence_id}/vehicles` (who is inside)
//! - `GET /v1/events?device_id=&type=&geofence_id=&from=&to=&limit=`: fleet events, newest first
//!
//! With a history store ([`QueryApi::with_history`]):
//!
//! - `GET /v1/vehicles/{id}/trips?from=&to=&limit=`: trips that started in the range
//! - `GET /v1/vehicles/{id}/stops?from=&to=&limit=`: stops that began in the range
//! - `GET /v1/vehicles/{id}/summary?from=&to=&interval=1m|1h|1d`: readings summarized per
//!   minute, hour or day (UTC)
//!
//! And `GET /openapi.json`, this API's OpenAPI 3.1 description (`docs/openapi.json`), to anyone.
//!
//! It routes on the request path itself, so it serves both per-route integrations and a
//! `$default` route. Reads need the `fleet:read` scope, acknowledging `alerts:ack`, writing
//! geofences `geofences:write` ([`geostream_lambda::identity`]).

use std::sync::Arc;
use std::time::Instant;

use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use geostream_lambda::http::{
    error_response, json_response, measure_response, method_and_path, request_body,
};
use geostream_lambda::identity::{AccessPolicy, Caller, Refusal};
use geostream_shared::fleet::{is_valid_geofence_id, FleetEventType, Geofence};
use geostream_shared::geo::MAX_QUERY_RADIUS_M;
use geostream_shared::history::{summarize, HistoryItem, HistoryKind, Rollup, SummaryInterval};
use geostream_shared::metrics::{Measurements, MetricsSink};
use geostream_shared::model::{AlertState, GeoPoint};
use geostream_shared::ports::{
    AlertFilter, AlertStore, Archive, ErrorKind, EventFilter, FleetEventStore, GeofenceStore,
    HistoryStore, PositionStore, StoreError,
};
use geostream_shared::validation::{is_valid_device_id, parse_timestamp};
use geostream_shared::{now_millis, EpochMillis};
use http::Method;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

pub const FUNCTION_NAME: &str = "query-api";
/// Where the API's OpenAPI description is served, without a token.
pub const OPENAPI_PATH: &str = "/openapi.json";
/// The API's OpenAPI 3.1 description, every route of ingest and the query API.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../../docs/openapi.json");
const DEFAULT_RADIUS_M: f64 = 1_000.0;
const MAX_NEAR_LIMIT: usize = 1_000;
const MAX_TRACK_LIMIT: usize = 10_000;
const MAX_ALERT_LIMIT: usize = 1_000;
const MAX_EVENT_LIMIT: usize = 1_000;
const DEFAULT_TRACK_SPAN_MS: EpochMillis = 3_600_000;
const DEFAULT_HISTORY_SPAN_MS: EpochMillis = 86_400_000;
const MAX_HISTORY_LIMIT: usize = 10_000;
/// A summary combines at most this many minutes (31 days) per request.
const MAX_SUMMARY_MINUTES: i64 = 31 * 24 * 60;

pub struct QueryApi {
    positions: Arc<dyn PositionStore>,
    archive: Arc<dyn Archive>,
    alerts: Arc<dyn AlertStore>,
    fleet: Option<FleetStores>,
    history: Option<Arc<dyn HistoryStore>>,
    access: AccessPolicy,
}

/// The stores behind the geofence and event routes.
struct FleetStores {
    geofences: Arc<dyn GeofenceStore>,
    events: Arc<dyn FleetEventStore>,
}

/// A failed request: status and message.
struct Reject(u16, String);

/// By what the store said: a request it cannot answer as asked is the client's to change (400),
/// a refusal retrying cannot cure is the service's fault (500), anything else may pass (503).
impl From<StoreError> for Reject {
    fn from(error: StoreError) -> Self {
        match error.kind {
            ErrorKind::Invalid => Reject(400, error.message),
            ErrorKind::Permanent => {
                tracing::error!(function = FUNCTION_NAME, %error, "store refused a request");
                Reject(500, format!("store error: {error}"))
            }
            ErrorKind::Transient | ErrorKind::Conflict => {
                tracing::warn!(function = FUNCTION_NAME, %error, "store call failed");
                Reject(503, format!("store unavailable, retry: {error}"))
            }
        }
    }
}

impl From<Refusal> for Reject {
    fn from(refusal: Refusal) -> Self {
        Reject(refusal.status, refusal.message)
    }
}

fn bad(message: impl Into<String>) -> Reject {
    Reject(400, message.into())
}

impl QueryApi {
    pub fn new(
        positions: Arc<dyn PositionStore>,
        archive: Arc<dyn Archive>,
        alerts: Arc<dyn AlertStore>,
    ) -> Self {
        QueryApi {
            positions,
            archive,
            alerts,
            fleet: None,
            history: None,
            access: AccessPolicy::open(),
        }
    }

    /// Serves the geofence and event routes from these stores.
    pub fn with_fleet(
        mut self,
        geofences: Arc<dyn GeofenceStore>,
        events: Arc<dyn FleetEventStore>,
    ) -> Self {
        self.fleet = Some(FleetStores { geofences, events });
        self
    }

    /// Serves trips, stops and summaries from this store.
    pub fn with_history(mut self, history: Arc<dyn HistoryStore>) -> Self {
        self.history = Some(history);
        self
    }

    fn history(&self) -> Result<&Arc<dyn HistoryStore>, Reject> {
        self.history.as_ref().ok_or_else(|| {
            Reject(
                404,
                "trips, stops and summaries are not set up on this deployment".into(),
            )
        })
    }

    fn fleet(&self) -> Result<&FleetStores, Reject> {
        self.fleet.as_ref().ok_or_else(|| {
            Reject(
                404,
                "fleet events (geofences, events) are not set up on this deployment".into(),
            )
        })
    }

    /// Who may read and acknowledge (open, as the local runner without token verification,
    /// until given a policy).
    pub fn with_access(mut self, access: AccessPolicy) -> Self {
        self.access = access;
        self
    }

    /// Answers a request and publishes what it measured.
    pub async fn handle(
        &self,
        request: ApiGatewayV2httpRequest,
        metrics: &dyn MetricsSink,
    ) -> ApiGatewayV2httpResponse {
        let started = Instant::now();
        let response = match self.route(&request).await {
            Ok(body) => json_response(200, &body),
            Err(Reject(status, message)) => error_response(status, message),
        };
        let mut measurements = Measurements::default();
        measure_response(&mut measurements, started, &response);
        metrics.publish(FUNCTION_NAME, &measurements);
        response
    }

    async fn route(&self, request: &ApiGatewayV2httpRequest) -> Result<Value, Reject> {
        let (method, path) = method_and_path(request);
        let segments: Vec<String> = path
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let query = Params(&request.query_string_parameters);
        if method == Method::GET && path == OPENAPI_PATH {
            return serde_json::from_str(OPENAPI_DOCUMENT)
                .map_err(|e| Reject(500, format!("the bundled OpenAPI description: {e}")));
        }
        let caller = self.access.caller(request)?;
        let scopes = &self.access.scopes;
        match (&method, segments.as_slice()) {
            (
                &Method::GET,
                ["v1", "vehicles", ..]
                | ["v1", "alerts"]
                | ["v1", "geofences", ..]
                | ["v1", "events"],
            ) => self.access.require(
                &caller,
                &scopes.fleet_read,
                &format_args!("{method} {path}"),
            )?,
            (&Method::POST, ["v1", "alerts", _, "ack"]) => self.access.require(
                &caller,
                &scopes.alerts_ack,
                &format_args!("{method} {path}"),
            )?,
            (&Method::PUT | &Method::DELETE, ["v1", "geofences", _]) => self.access.require(
                &caller,
                &scopes.geofences_write,
                &format_args!("{method} {path}"),
            )?,
            _ => {}
        }
        match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "vehicles", "near"]) => self.near(&query).await,
            (&Method::GET, ["v1", "vehicles", id]) => self.vehicle(id).await,
            (&Method::GET, ["v1", "vehicles", id, "track"]) => self.track(id, &query).await,
            (&Method::GET, ["v1", "vehicles", id, "trips"]) => {
                self.history_items(id, HistoryKind::Trip, &query).await
            }
            (&Method::GET, ["v1", "vehicles", id, "stops"]) => {
                self.history_items(id, HistoryKind::Stop, &query).await
            }
            (&Method::GET, ["v1", "vehicles", id, "summary"]) => self.summary(id, &query).await,
            (&Method::GET, ["v1", "alerts"]) => self.list_alerts(&query).await,
            (&Method::POST, ["v1", "alerts", id, "ack"]) => {
                self.acknowledge(id, request, &caller).await
            }
            (&Method::GET, ["v1", "geofences"]) => {
                let geofences = self.fleet()?.geofences.list().await?;
                Ok(json!({ "count": geofences.len(), "geofences": geofences }))
            }
            (&Method::GET, ["v1", "geofences", id]) => {
                valid_geofence(id)?;
                match self.fleet()?.geofences.get(id).await? {
                    Some(geofence) => Ok(json!(geofence)),
                    None => Err(Reject(404, format!("no geofence {id:?}"))),
                }
            }
            (&Method::PUT, ["v1", "geofences", id]) => {
                let body = request_body(request).map_err(bad)?;
                let geofence = Geofence::from_request(id, &body, now_millis()).map_err(bad)?;
                self.fleet()?.geofences.put(&geofence).await?;
                Ok(json!(geofence))
            }
            (&Method::DELETE, ["v1", "geofences", id]) => {
                valid_geofence(id)?;
                let fleet = self.fleet()?;
                if fleet.geofences.delete(id).await? {
                    fleet.events.clear_occupants(id).await?;
                    Ok(json!({ "deleted": id }))
                } else {
                    Err(Reject(404, format!("no geofence {id:?}")))
                }
            }
            (&Method::GET, ["v1", "geofences", id, "vehicles"]) => {
                valid_geofence(id)?;
                let fleet = self.fleet()?;
                if fleet.geofences.get(id).await?.is_none() {
                    return Err(Reject(404, format!("no geofence {id:?}")));
                }
                let vehicles = fleet.events.occupants(id).await?;
                Ok(json!({ "geofence_id": id, "count": vehicles.len(), "vehicles": vehicles }))
            }
            (&Method::GET, ["v1", "events"]) => self.list_events(&query).await,
            (
                _,
                ["v1", "vehicles", ..]
                | ["v1", "alerts", ..]
                | ["v1", "geofences", ..]
                | ["v1", "events"],
            ) => Err(Reject(405, format!("{method} {path} is not a route"))),
            _ => Err(Reject(404, format!("no route {path}"))),
        }
    }

    async fn vehicle(&self, id: &str) -> Result<Value, Reject> {
        valid_device(id)?;
        match self.positions.get(id).await? {
            Some(position) => Ok(json!(position)),
            None => Err(Reject(404, format!("no position known for vehicle {id:?}"))),
        }
    }

    async fn near(&self, query: &Params<'_>) -> Result<Value, Reject> {
        let lat = number(query, "lat")?.ok_or_else(|| bad("lat is required"))?;
        let lon = number(query, "lon")?.ok_or_else(|| bad("lon is required"))?;
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Err(bad(format!(
                "lat {lat} / lon {lon} are outside WGS84 ranges"
            )));
        }
        let radius_m = number(query, "radius_m")?.unwrap_or(DEFAULT_RADIUS_M);
        if !(radius_m > 0.0 && radius_m <= MAX_QUERY_RADIUS_M) {
            return Err(bad(format!(
                "radius_m {radius_m} must be in (0, {MAX_QUERY_RADIUS_M}]"
            )));
        }
        let limit = limit(query, 100, MAX_NEAR_LIMIT)?;
        let vehicles = self
            .positions
            .near(GeoPoint { lat, lon }, radius_m, limit)
            .await?;
        Ok(json!({ "count": vehicles.len(), "vehicles": vehicles }))
    }

    async fn track(&self, id: &str, query: &Params<'_>) -> Result<Value, Reject> {
        valid_device(id)?;
        let (from, to) = range(query, DEFAULT_TRACK_SPAN_MS)?;
        let limit = limit(query, 1_000, MAX_TRACK_LIMIT)?;
        let readings = self.archive.track(id, from, to, limit).await?;
        Ok(
            json!({ "device_id": id, "from": from, "to": to, "count": readings.len(), "readings": readings }),
        )
    }

    /// Trips or stops that began in the range (default: the last day), oldest first.
    async fn history_items(
        &self,
        id: &str,
        kind: HistoryKind,
        query: &Params<'_>,
    ) -> Result<Value, Reject> {
        valid_device(id)?;
        let (from, to) = range(query, DEFAULT_HISTORY_SPAN_MS)?;
        let limit = limit(query, 1_000, MAX_HISTORY_LIMIT)?;
        let items = self.history()?.read(id, kind, from, to, limit).await?;
        let items: Vec<Value> = items
            .into_iter()
            .filter_map(|item| match item {
                HistoryItem::Trip(trip) => Some(json!(trip)),
                HistoryItem::Stop(stop) => Some(json!(stop)),
                HistoryItem::Minute(_) => None,
            })
            .collect();
        let name = match kind {
            HistoryKind::Trip => "trips",
            _ => "stops",
        };
        Ok(json!({ "device_id": id, "from": from, "to": to, "count": items.len(), name: items }))
    }

    /// Minute summaries combined into buckets of the interval (default `1h`), over the range
    /// widened to whole buckets; minutes not yet complete are not in it.
    async fn summary(&self, id: &str, query: &Params<'_>) -> Result<Value, Reject> {
        valid_device(id)?;
        let interval = match query.get("interval") {
            None => SummaryInterval::Hour,
            Some(text) => SummaryInterval::parse(&text)
                .ok_or_else(|| bad(format!("interval={text:?} is not 1m, 1h or 1d")))?,
        };
        let (from, to) = range(query, DEFAULT_HISTORY_SPAN_MS)?;
        let width = interval.millis();
        let (from, to) = (
            from.div_euclid(width) * width,
            to.div_euclid(width) * width + if to % width == 0 { 0 } else { width },
        );
        let minutes = (to - from) / 60_000;
        if minutes > MAX_SUMMARY_MINUTES {
            return Err(bad(format!(
                "the range holds {minutes} minutes; a summary reads at most {MAX_SUMMARY_MINUTES} (31 days): ask for shorter ranges"
            )));
        }
        let items = self
            .history()?
            .read(id, HistoryKind::Minute, from, to, minutes as usize)
            .await?;
        let minutes: Vec<Rollup> = items
            .into_iter()
            .filter_map(|item| match item {
                HistoryItem::Minute(minute) => Some(minute),
                _ => None,
            })
            .collect();
        let buckets = summarize(&minutes, interval);
        Ok(json!({
            "device_id": id, "from": from, "to": to, "interval": query.get("interval").unwrap_or_else(|| "1h".into()),
            "count": buckets.len(), "buckets": buckets
        }))
    }

    async fn list_alerts(&self, query: &Params<'_>) -> Result<Value, Reject> {
        let state = match query.get("state") {
            None => None,
            Some(text) => Some(text.parse::<AlertState>().map_err(bad)?),
        };
        let device_id = query.get("device_id");
        if let Some(id) = &device_id {
            valid_device(id)?;
        }
        let filter = AlertFilter {
            state,
            device_id,
            limit: limit(query, 100, MAX_ALERT_LIMIT)?,
        };
        let alerts = self.alerts.list_alerts(&filter).await?;
        Ok(json!({ "count": alerts.len(), "alerts": alerts }))
    }

    async fn list_events(&self, query: &Params<'_>) -> Result<Value, Reject> {
        let device_id = query.get("device_id");
        if let Some(id) = &device_id {
            valid_device(id)?;
        }
        let geofence_id = query.get("geofence_id");
        if let Some(id) = &geofence_id {
            valid_geofence(id)?;
        }
        let kind = match query.get("type") {
            None => None,
            Some(text) => Some(text.parse::<FleetEventType>().map_err(bad)?),
        };
        let from = time(query, "from")?;
        let to = time(query, "to")?;
        if let (Some(from), Some(to)) = (from, to) {
            if from >= to {
                return Err(bad(format!("from ({from}) must be before to ({to})")));
            }
        }
        let filter = EventFilter {
            device_id,
            kind,
            geofence_id,
            from,
            to,
            limit: limit(query, 100, MAX_EVENT_LIMIT)?,
        };
        let events = self.fleet()?.events.list(&filter).await?;
        Ok(json!({ "count": events.len(), "events": events }))
    }

    async fn acknowledge(
        &self,
        alert_id: &str,
        request: &ApiGatewayV2httpRequest,
        caller: &Caller,
    ) -> Result<Value, Reject> {
        let body = request_body(request).map_err(bad)?;
        let named = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            let value: Value =
                serde_json::from_slice(&body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
            match value.get("by") {
                None => None,
                Some(Value::String(by)) if (1..=128).contains(&by.len()) => Some(by.clone()),
                Some(_) => return Err(bad("by must be a string of 1-128 characters")),
            }
        };
        // Who acknowledged is who holds the token; a name in the body may only repeat it.
        let by = match (caller, named) {
            (Caller::Token(token), Some(named)) if named != token.subject => {
                return Err(Reject(
                    403,
                    format!(
                    "by {named:?}: an acknowledgement is recorded under the token's subject, {:?}",
                    token.subject
                ),
                ))
            }
            (Caller::Token(token), _) => token.subject.clone(),
            (Caller::Anyone, named) => named.unwrap_or_else(|| "anonymous".to_string()),
        };
        match self.alerts.acknowledge(alert_id, &by, now_millis()).await? {
            Some(alert) => Ok(json!(alert)),
            None => Err(Reject(404, format!("no alert {alert_id:?}"))),
        }
    }
}

/// The request's query parameters (first value of each).
struct Params<'a>(&'a aws_lambda_events::query_map::QueryMap);

impl Params<'_> {
    fn get(&self, name: &str) -> Option<String> {
        self.0.first(name).map(str::to_string)
    }
}

fn valid_device(id: &str) -> Result<(), Reject> {
    if is_valid_device_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "{id:?} is not a device id (1-64 of A-Z a-z 0-9 _ . : -)"
        )))
    }
}

fn valid_geofence(id: &str) -> Result<(), Reject> {
    if is_valid_geofence_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "{id:?} is not a geofence id (1-128 of A-Z a-z 0-9 _ . : -)"
        )))
    }
}

fn number(query: &Params<'_>, name: &str) -> Result<Option<f64>, Reject> {
    match query.get(name) {
        None => Ok(None),
        Some(text) => match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Some(value)),
            _ => Err(bad(format!("{name}={text:?} is not a finite number"))),
        },
    }
}

fn limit(query: &Params<'_>, default: usize, max: usize) -> Result<usize, Reject> {
    match query.get("limit") {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(value) if (1..=max).contains(&value) => Ok(value),
            _ => Err(bad(format!(
                "limit={text:?} must be a whole number from 1 to {max}"
            ))),
        },
    }
}

/// A time parameter: epoch milliseconds or RFC 3339.
/// `from` and `to` of a time range, by default the `span` up to now.
fn range(query: &Params<'_>, span: EpochMillis) -> Result<(EpochMillis, EpochMillis), Reject> {
    let to = time(query, "to")?.unwrap_or_else(|| now_millis() + 1);
    let from = time(query, "from")?.unwrap_or(to - span);
    if from >= to {
        return Err(bad(format!("from ({from}) must be before to ({to})")));
    }
    Ok((from, to))
}

fn time(query: &Params<'_>, name: &str) -> Result<Option<EpochMillis>, Reject> {
    match query.get(name) {
        None => Ok(None),
        Some(text) => {
            let value = match text.parse::<i64>() {
                Ok(ms) => Value::from(ms),
                Err(_) => Value::String(text.clone()),
            };
            parse_timestamp(&value)
                .map(Some)
                .map_err(|e| bad(format!("{name}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::encodings::Body;
    use geostream_shared::memory::{MemoryAlertStore, MemoryArchive, MemoryPositionStore};
    use geostream_shared::metrics::RecordedMetrics;
    use geostream_shared::model::{Position, Reading};
    use geostream_shared::rules::{DeviceRuleStates, RuleSet};
    use std::collections::HashMap;

    fn request(
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&str>,
    ) -> ApiGatewayV2httpRequest {
        let mut request: ApiGatewayV2httpRequest =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-get-near.json")).unwrap();
        request.request_context.http.method = method.parse().unwrap();
        request.request_context.http.path = Some(path.to_string());
        request.raw_path = Some(path.to_string());
        let map: HashMap<String, String> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        request.query_string_parameters = map.into();
        request.body = body.map(str::to_string);
        request
    }

    fn json_of(response: &ApiGatewayV2httpResponse) -> Value {
        match &response.body {
            Some(Body::Text(text)) => serde_json::from_str(text).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    async fn api() -> (QueryApi, Arc<MemoryAlertStore>) {
        let positions = Arc::new(MemoryPositionStore::new());
        for (n, (lat, lon)) in [(52.5200, 13.4050), (52.5210, 13.4060), (52.6000, 13.5000)]
            .iter()
            .enumerate()
        {
            positions
                .upsert_if_newer(Position {
                    device_id: format!("v{n}"),
                    ts: 1_000,
                    event_id: format!("v{n}@1000"),
                    lat: *lat,
                    lon: *lon,
                    geohash: String::new(),
                    speed_kmh: Some(30.0),
                    heading_deg: None,
                    received_at: 1_000,
                })
                .await
                .unwrap();
        }
        let archive = Arc::new(MemoryArchive::new(100));
        let readings: Vec<Reading> = (0..5)
            .map(|n| Reading {
                device_id: "v0".into(),
                ts: n * 1_000,
                event_id: format!("v0@{n}"),
                speed_kmh: Some(n as f64),
                ..Default::default()
            })
            .collect();
        archive.write(&readings).await.unwrap();
        let alerts = Arc::new(MemoryAlertStore::new());
        let mut state = DeviceRuleStates::default();
        let hot = Reading {
            device_id: "v0".into(),
            ts: 10,
            event_id: "e".into(),
            engine_temp_c: Some(120.0),
            ..Default::default()
        };
        let evaluation = RuleSet::default_rules().evaluate("v0", &mut state, &[hot]);
        alerts
            .commit("v0", 0, &state, &evaluation.touched_alerts)
            .await
            .unwrap();
        (QueryApi::new(positions, archive, alerts.clone()), alerts)
    }

    #[tokio::test]
    async fn near_answers_nearest_first_from_a_real_event() {
        let (api, _) = api().await;
        let request: ApiGatewayV2httpRequest =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-get-near.json")).unwrap();
        let response = api.handle(request, &RecordedMetrics::new()).await;
        assert_eq!(response.status_code, 200);
        let json = json_of(&response);
        let ids: Vec<&str> = json["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["device_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["v0", "v1"]);
        assert!(json["vehicles"][1]["distance_m"].as_f64().unwrap() > 100.0);
    }

    #[tokio::test]
    async fn vehicle_track_and_errors() {
        let (api, _) = api().await;
        let response = api
            .handle(
                request("GET", "/v1/vehicles/v2", &[], None),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(json_of(&response)["lat"], 52.6);
        assert_eq!(
            api.handle(
                request("GET", "/v1/vehicles/nobody", &[], None),
                &RecordedMetrics::new()
            )
            .await
            .status_code,
            404
        );
        let track = api
            .handle(
                request(
                    "GET",
                    "/v1/vehicles/v0/track",
                    &[("from", "1000"), ("to", "1970-01-01T00:00:04Z")],
                    None,
                ),
                &RecordedMetrics::new(),
            )
            .await;
        let json = json_of(&track);
        assert_eq!(json["count"], 3, "{json}");
        for (params, needle) in [
            (vec![("lat", "x"), ("lon", "1")], "lat"),
            (vec![("lat", "1")], "lon is required"),
            (
                vec![("lat", "1"), ("lon", "1"), ("radius_m", "1e9")],
                "radius_m",
            ),
            (vec![("lat", "1"), ("lon", "1"), ("limit", "0")], "limit"),
        ] {
            let response = api
                .handle(
                    request("GET", "/v1/vehicles/near", &params, None),
                    &RecordedMetrics::new(),
                )
                .await;
            assert_eq!(response.status_code, 400);
            assert!(
                json_of(&response)["error"]
                    .as_str()
                    .unwrap()
                    .contains(needle),
                "{needle}"
            );
        }
        assert_eq!(
            api.handle(
                request("DELETE", "/v1/alerts", &[], None),
                &RecordedMetrics::new()
            )
            .await
            .status_code,
            405
        );
        assert_eq!(
            api.handle(
                request("GET", "/v2/else", &[], None),
                &RecordedMetrics::new()
            )
            .await
            .status_code,
            404
        );
    }

    /// The real authorizer event with `claims`, `scopes`, a method, path and body of ours.
    fn token_request(
        claims: Value,
        scopes: &[&str],
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> ApiGatewayV2httpRequest {
        let mut event: Value = serde_json::from_str(geostream_lambda::fixtures::APIGW_JWT).unwrap();
        event["requestContext"]["authorizer"]["jwt"]["claims"] = claims;
        event["requestContext"]["authorizer"]["jwt"]["scopes"] = json!(scopes);
        event["requestContext"]["http"]["method"] = json!(method);
        event["requestContext"]["http"]["path"] = json!(path);
        event["rawPath"] = json!(path);
        event["body"] = body.map_or(Value::Null, |b| Value::String(b.to_string()));
        serde_json::from_value(event).unwrap()
    }

    #[tokio::test]
    async fn operators_read_and_acknowledge_under_their_subject_devices_do_neither() {
        let (api, alerts) = api().await;
        let api = api.with_access(AccessPolicy::jwt());
        let metrics = RecordedMetrics::new();
        let alert_id = alerts
            .list_alerts(&AlertFilter {
                state: None,
                device_id: None,
                limit: 10,
            })
            .await
            .unwrap()[0]
            .alert_id
            .clone();
        let ack_path = format!("/v1/alerts/{}/ack", alert_id.replace('|', "%7C"));
        let device = || json!({"sub": "truck-7", "scope": "telemetry:write"});
        let operator = || json!({"sub": "ops-ana", "scope": "fleet:read alerts:ack"});

        for (method, path) in [
            ("GET", "/v1/vehicles/v0"),
            ("GET", "/v1/alerts"),
            ("POST", ack_path.as_str()),
        ] {
            let response = api
                .handle(
                    token_request(device(), &["telemetry:write"], method, path, None),
                    &metrics,
                )
                .await;
            assert_eq!(response.status_code, 403, "a device token: {method} {path}");
        }
        let read = api
            .handle(
                token_request(operator(), &["fleet:read"], "GET", "/v1/vehicles/v0", None),
                &metrics,
            )
            .await;
        assert_eq!(read.status_code, 200);

        let forged = api
            .handle(
                token_request(
                    operator(),
                    &["alerts:ack"],
                    "POST",
                    &ack_path,
                    Some(json!({"by": "someone-else"})),
                ),
                &metrics,
            )
            .await;
        assert_eq!(forged.status_code, 403, "{}", json_of(&forged));
        let acked = api
            .handle(
                token_request(operator(), &["alerts:ack"], "POST", &ack_path, None),
                &metrics,
            )
            .await;
        assert_eq!(acked.status_code, 200, "{}", json_of(&acked));
        assert_eq!(json_of(&acked)["acknowledged_by"], "ops-ana");

        let mut anonymous = token_request(operator(), &[], "GET", "/v1/alerts", None);
        anonymous.request_context.authorizer = None;
        assert_eq!(api.handle(anonymous, &metrics).await.status_code, 401);
    }

    #[tokio::test]
    async fn geofences_are_written_with_their_scope_and_read_with_fleet_read() {
        let (api, _) = api().await;
        let geofences = Arc::new(geostream_shared::memory::MemoryGeofences::new());
        let events = Arc::new(geostream_shared::memory::MemoryFleetEvents::new(10));
        let api = api
            .with_fleet(geofences.clone(), events)
            .with_access(AccessPolicy::jwt());
        let metrics = RecordedMetrics::new();
        // A token with exactly `scopes` (in the claims, as API Gateway matched them).
        let operator = |scopes: &[&str], method: &str, path: &str, body: Option<Value>| {
            let claims = json!({"sub": "ops-ana", "scope": scopes.join(" ")});
            token_request(claims, scopes, method, path, body)
        };
        let body = json!({"name": "Yard", "geometry": {"type": "Point", "coordinates": [13.4, 52.5], "radius_m": 120}});
        let put = |scopes: &[&str], body: Value| {
            operator(scopes, "PUT", "/v1/geofences/yard", Some(body))
        };
        let refused = api
            .handle(put(&["fleet:read"], body.clone()), &metrics)
            .await;
        assert_eq!(refused.status_code, 403, "{}", json_of(&refused));
        assert!(geofences.get("yard").await.unwrap().is_none());
        let stored = api
            .handle(put(&["geofences:write"], body.clone()), &metrics)
            .await;
        assert_eq!(stored.status_code, 200, "{}", json_of(&stored));
        let mut open_ring = json!({"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}});
        let invalid = api
            .handle(put(&["geofences:write"], open_ring.take()), &metrics)
            .await;
        assert_eq!(invalid.status_code, 400);
        assert!(json_of(&invalid)["error"]
            .as_str()
            .is_some_and(|e| e.contains("not closed")));
        for (scopes, path, status) in [
            (&["fleet:read"][..], "/v1/geofences", 200),
            (&["fleet:read"], "/v1/geofences/yard", 200),
            (&["fleet:read"], "/v1/geofences/yard/vehicles", 200),
            (&["fleet:read"], "/v1/geofences/gone", 404),
            (&["fleet:read"], "/v1/events", 200),
            (&["geofences:write"], "/v1/events", 403),
        ] {
            let response = api
                .handle(operator(scopes, "GET", path, None), &metrics)
                .await;
            assert_eq!(response.status_code, status, "GET {path} with {scopes:?}");
        }
        let delete = |scopes: &[&str]| operator(scopes, "DELETE", "/v1/geofences/yard", None);
        assert_eq!(
            api.handle(delete(&["fleet:read"]), &metrics)
                .await
                .status_code,
            403
        );
        assert_eq!(
            api.handle(delete(&["geofences:write"]), &metrics)
                .await
                .status_code,
            200
        );
        assert_eq!(
            api.handle(delete(&["geofences:write"]), &metrics)
                .await
                .status_code,
            404
        );
    }

    #[tokio::test]
    async fn without_fleet_stores_the_fleet_routes_say_so() {
        let (api, _) = api().await;
        let response = api
            .handle(
                request("GET", "/v1/events", &[], None),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(response.status_code, 404);
        assert!(json_of(&response)["error"]
            .as_str()
            .is_some_and(|e| e.contains("not set up")));
    }

    #[tokio::test]
    async fn alerts_list_and_acknowledge() {
        let (api, store) = api().await;
        let response = api
            .handle(
                request("GET", "/v1/alerts", &[("state", "active")], None),
                &RecordedMetrics::new(),
            )
            .await;
        let json = json_of(&response);
        assert_eq!(json["count"], 1);
        let alert_id = json["alerts"][0]["alert_id"].as_str().unwrap().to_string();
        let encoded = alert_id.replace('|', "%7C");
        let response = api
            .handle(
                request(
                    "POST",
                    &format!("/v1/alerts/{encoded}/ack"),
                    &[],
                    Some(r#"{"by":"dispatch"}"#),
                ),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(response.status_code, 200);
        assert_eq!(json_of(&response)["acknowledged_by"], "dispatch");
        assert!(
            store
                .get_alert(&alert_id)
                .await
                .unwrap()
                .unwrap()
                .acknowledged
        );
        assert_eq!(
            api.handle(
                request("GET", "/v1/alerts", &[("state", "open")], None),
                &RecordedMetrics::new()
            )
            .await
            .status_code,
            400
        );
        assert_eq!(
            api.handle(
                request("POST", "/v1/alerts/none/ack", &[], None),
                &RecordedMetrics::new()
            )
            .await
            .status_code,
            404
        );
    }
}

#[cfg(test)]
mod store_error_tests {
    use super::*;
    use async_trait::async_trait;
    use geostream_shared::memory::{MemoryAlertStore, MemoryPositionStore};
    use geostream_shared::metrics::RecordedMetrics;
    use geostream_shared::model::Reading;
    use geostream_shared::ports::RejectedReading;

    /// An archive whose track reads fail with a given kind of error.
    struct FailingArchive(ErrorKind);

    #[async_trait]
    impl Archive for FailingArchive {
        async fn write(&self, _: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
            Ok(Vec::new())
        }
        async fn track(
            &self,
            _: &str,
            _: i64,
            _: i64,
            _: usize,
        ) -> Result<Vec<Reading>, StoreError> {
            Err(StoreError {
                kind: self.0,
                operation: "track",
                message: "the store said no".into(),
            })
        }
    }

    /// The answer's status follows what the store said: ask differently (400), a fault retrying
    /// cannot cure (500), or try again (503).
    #[tokio::test]
    async fn store_errors_answer_by_their_kind() {
        for (kind, status) in [
            (ErrorKind::Invalid, 400),
            (ErrorKind::Permanent, 500),
            (ErrorKind::Transient, 503),
            (ErrorKind::Conflict, 503),
        ] {
            let api = QueryApi::new(
                Arc::new(MemoryPositionStore::new()),
                Arc::new(FailingArchive(kind)),
                Arc::new(MemoryAlertStore::new()),
            );
            let mut request: ApiGatewayV2httpRequest =
                serde_json::from_str(include_str!("../tests/fixtures/apigw-get-near.json"))
                    .unwrap();
            request.request_context.http.method = http::Method::GET;
            request.request_context.http.path = Some("/v1/vehicles/v0/track".into());
            request.raw_path = Some("/v1/vehicles/v0/track".into());
            request.query_string_parameters = Default::default();
            let response = api.handle(request, &RecordedMetrics::new()).await;
            assert_eq!(
                response.status_code, status,
                "{kind:?}: {:?}",
                response.body
            );
        }
    }
}
