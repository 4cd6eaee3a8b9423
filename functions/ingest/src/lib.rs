//! The ingest function: `POST /v1/telemetry` (API Gateway HTTP API, payload v2).
//!
//! Validates the body item by item, admits the readings' free metric names to the deployment's
//! bounded registry (a reading with a name past the bound is refused with a reason), groups the
//! valid readings into one versioned envelope per device, and publishes them to the telemetry
//! bus keyed by device. Answers 202 when every item
//! was accepted, 207 with per-item results when some were not, 400 when none was valid, 503
//! when the bus took none of the valid ones.
//!
//! Tracker apps post to their own routes: `POST /v1/ingest/osmand` (Traccar Client, the
//! OsmAnd protocol; `GET` too, as the OsmAnd app sends it) and `POST /v1/ingest/owntracks`
//! (OwnTracks in HTTP mode). Their messages become readings with the same validation and go
//! the same way; each device authenticates with its secret ([`DeviceSecrets`]) instead of a
//! token, and is answered as its app expects: 200 (OwnTracks: with an empty JSON array of
//! commands) when its readings were taken.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use geostream_lambda::http::{
    error_response, json_response, measure_response, method_and_path, request_body,
};
use geostream_lambda::identity::{AccessPolicy, Poster};
use geostream_lambda::jwt::JwtVerifier;
use geostream_shared::device_secret::{DeviceSecrets, SecretCheck};
use geostream_shared::envelope::{envelopes_by_device, split_to_fit, Envelope, MAX_RECORD_BYTES};
use geostream_shared::limits::{retry_after_seconds, Admission, DeviceLimits, DeviceRateLimit};
use geostream_shared::metrics::{Measurements, MetricName, MetricsSink};
use geostream_shared::model::Reading;
use geostream_shared::ports::{EventBus, MetricNameRegistry};
use geostream_shared::trackers::{self, TrackerPost, TrackerRequest};
use geostream_shared::validation::{validate_body, FieldError, ValidatedBatch, ValidationPolicy};
use geostream_shared::{now_millis, EpochMillis};
use serde::Serialize;

pub const FUNCTION_NAME: &str = "ingest";
pub const TELEMETRY_PATH: &str = "/v1/telemetry";
pub const OSMAND_PATH: &str = "/v1/ingest/osmand";
pub const OWNTRACKS_PATH: &str = "/v1/ingest/owntracks";

/// How the tracker apps' requests are authenticated.
#[derive(Debug, Clone)]
pub enum TrackerAuth {
    /// Every device is believed (the local runner without token verification).
    Open,
    /// Each device presents its secret.
    Secrets(DeviceSecrets),
    /// The tracker routes are closed: a deployment that verifies tokens and has no key.
    Disabled,
}

impl TrackerAuth {
    /// With a key, secrets; without one, closed where tokens are verified and open where
    /// nothing is.
    pub fn new(secrets: Option<DeviceSecrets>, tokens_verified: bool) -> TrackerAuth {
        match (secrets, tokens_verified) {
            (Some(secrets), _) => TrackerAuth::Secrets(secrets),
            (None, true) => TrackerAuth::Disabled,
            (None, false) => TrackerAuth::Open,
        }
    }
}

/// A tracker app's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrackerApp {
    OsmAnd,
    OwnTracks,
}

pub struct Ingest {
    bus: Arc<dyn EventBus>,
    metric_names: Arc<dyn MetricNameRegistry>,
    access: AccessPolicy,
    /// Verifies bearer tokens in the function (behind a Function URL); `None` behind API
    /// Gateway, whose authorizer did.
    tokens: Option<JwtVerifier>,
    /// Per-device request limits; none until given.
    limits: Option<Arc<dyn DeviceLimits>>,
    trackers: TrackerAuth,
    policy: ValidationPolicy,
    clock: fn() -> EpochMillis,
}

/// What happened to one item of a request.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ItemResult {
    Accepted {
        index: usize,
        event_id: String,
    },
    Rejected {
        index: usize,
        errors: Vec<FieldError>,
    },
    /// Valid, but the bus did not take it: retry it.
    Failed {
        index: usize,
        error: String,
    },
}

#[derive(Debug, Serialize)]
pub struct IngestResponse {
    pub accepted: usize,
    pub rejected: usize,
    pub failed: usize,
    /// Per-item results; left out when every item was accepted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<ItemResult>,
}

impl Ingest {
    pub fn new(bus: Arc<dyn EventBus>, metric_names: Arc<dyn MetricNameRegistry>) -> Self {
        Ingest {
            bus,
            metric_names,
            access: AccessPolicy::open(),
            tokens: None,
            limits: None,
            trackers: TrackerAuth::Open,
            policy: ValidationPolicy::default(),
            clock: now_millis,
        }
    }

    /// Who may post for which vehicle (open, as the local runner without token
    /// verification, until given a policy).
    pub fn with_access(mut self, access: AccessPolicy) -> Self {
        self.access = access;
        self
    }

    /// Verifies each request's bearer token itself before deciding (behind a Lambda Function
    /// URL, where no API Gateway authorizer has).
    pub fn with_token_verifier(mut self, tokens: Option<JwtVerifier>) -> Self {
        self.tokens = tokens;
        self
    }

    /// Limits each device's requests: past its limit a device is answered 429 with
    /// `Retry-After`, and a gateway's items of that device are answered as failed (retry).
    pub fn with_device_limits(mut self, limits: Arc<dyn DeviceLimits>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// How tracker apps authenticate (open, as the local runner without token verification,
    /// until given).
    pub fn with_tracker_auth(mut self, trackers: TrackerAuth) -> Self {
        self.trackers = trackers;
        self
    }

    /// Uses another clock (tests pin "now").
    pub fn with_clock(mut self, clock: fn() -> EpochMillis) -> Self {
        self.clock = clock;
        self
    }

    /// Answers a request and publishes what it measured.
    pub async fn handle(
        &self,
        request: ApiGatewayV2httpRequest,
        metrics: &dyn MetricsSink,
    ) -> ApiGatewayV2httpResponse {
        let started = Instant::now();
        let mut measurements = Measurements::default();
        let response = self.answer(request, &mut measurements).await;
        measure_response(&mut measurements, started, &response);
        metrics.publish(FUNCTION_NAME, &measurements);
        response
    }

    async fn answer(
        &self,
        request: ApiGatewayV2httpRequest,
        measurements: &mut Measurements,
    ) -> ApiGatewayV2httpResponse {
        let (method, path) = method_and_path(&request);
        let app = match path.as_str() {
            TELEMETRY_PATH => None,
            OSMAND_PATH => Some(TrackerApp::OsmAnd),
            OWNTRACKS_PATH => Some(TrackerApp::OwnTracks),
            _ => {
                return error_response(
                    404,
                    format!("no route {path}; telemetry goes to POST {TELEMETRY_PATH}, or from tracker apps to {OSMAND_PATH} and {OWNTRACKS_PATH}"),
                )
            }
        };
        let allowed = method == http::Method::POST
            || (app == Some(TrackerApp::OsmAnd) && method == http::Method::GET);
        if !allowed {
            return error_response(405, format!("{method} is not allowed on {path}; use POST"));
        }
        match app {
            None => self.telemetry(request, measurements).await,
            Some(app) => self.tracker(app, request, measurements).await,
        }
    }

    async fn telemetry(
        &self,
        mut request: ApiGatewayV2httpRequest,
        measurements: &mut Measurements,
    ) -> ApiGatewayV2httpResponse {
        if let Some(tokens) = &self.tokens {
            if let Err(refusal) = tokens.authorize(&mut request).await {
                return error_response(refusal.status, refusal.message);
            }
        }
        let poster = match self
            .access
            .caller(&request)
            .and_then(|caller| self.access.poster(&caller))
        {
            Ok(poster) => poster,
            Err(refusal) => return error_response(refusal.status, refusal.message),
        };
        // A device token's requests are all its own vehicle's: refused before any work.
        if let Poster::Vehicle(own) = &poster {
            if let Some(refused) = self.admit_device(own, measurements).await {
                return refused;
            }
        }
        let body = match request_body(&request) {
            Ok(body) => body,
            Err(message) => return error_response(400, message),
        };
        let received_at = (self.clock)();
        let batch = match validate_body(&body, received_at, &self.policy) {
            Ok(batch) => batch,
            Err(error) => return error_response(400, error.to_string()),
        };
        let published = self
            .publish(&poster, batch, received_at, measurements)
            .await;
        let Published {
            response,
            forbidden,
            throttled,
        } = published;
        let status = match (response.accepted, response.rejected, response.failed) {
            _ if forbidden => 403,
            (_, 0, 0) => 202,
            (0, _, 0) => 400,
            // Every valid item's device over its limit, and the bus never asked.
            (0, 0, failed) if throttled.as_ref().is_some_and(|t| t.items == failed) => 429,
            (0, 0, _) => 503,
            _ => 207,
        };
        let mut response = response;
        if status == 202 {
            response.results.clear();
        }
        let mut answer = json_response(status, &response);
        if let Some(throttled) = throttled {
            set_retry_after(&mut answer, throttled.longest_wait);
        }
        answer
    }

    /// A tracker app's request: read in its protocol, its device's secret checked, its
    /// readings published, answered as the app expects.
    async fn tracker(
        &self,
        app: TrackerApp,
        request: ApiGatewayV2httpRequest,
        measurements: &mut Measurements,
    ) -> ApiGatewayV2httpResponse {
        if matches!(self.trackers, TrackerAuth::Disabled) {
            return error_response(
                404,
                "tracker apps are not enabled on this deployment: its operator sets a device secret key (DEVICE_SECRET_KEY; Terraform variable device_secret_key)",
            );
        }
        let body = match request_body(&request) {
            Ok(body) => body,
            Err(message) => return error_response(400, message),
        };
        let received_at = (self.clock)();
        let sent = TrackerRequest {
            query: request.raw_query_string.as_deref().unwrap_or_default(),
            headers: &request.headers,
            body: &body,
        };
        let read = match app {
            TrackerApp::OsmAnd => trackers::osmand::read(&sent, received_at, &self.policy),
            TrackerApp::OwnTracks => trackers::owntracks::read(&sent, received_at, &self.policy),
        };
        let TrackerPost {
            device_id,
            secret,
            batch,
            ignored: _,
        } = match read {
            Ok(post) => post,
            Err(error) => return error_response(400, error.to_string()),
        };
        if let TrackerAuth::Secrets(secrets) = &self.trackers {
            let refusal = match secrets.check(&device_id, secret.as_deref()) {
                SecretCheck::Valid => None,
                SecretCheck::Missing => Some((401, format!(
                    "device {device_id:?} presented no secret: put it in the URL (?{}=...) or as the HTTP Basic password",
                    trackers::SECRET_PARAMETER
                ))),
                SecretCheck::Wrong => Some((
                    401,
                    format!("the secret presented is not device {device_id:?}'s"),
                )),
                SecretCheck::Revoked => Some((403, format!("device {device_id:?} is revoked"))),
            };
            if let Some((status, message)) = refusal {
                measurements.count(MetricName::DevicesRefused, 1);
                let mut response = error_response(status, message);
                if status == 401 {
                    response.headers.insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Basic realm=\"geostream\""),
                    );
                }
                return response;
            }
        }
        if let Some(refused) = self.admit_device(&device_id, measurements).await {
            return refused;
        }
        let Published {
            response,
            throttled,
            ..
        } = self
            .publish(
                &Poster::Vehicle(device_id),
                batch,
                received_at,
                measurements,
            )
            .await;
        match (response.rejected, response.failed) {
            (0, 0) => match app {
                // Traccar's own server answers an empty 200.
                TrackerApp::OsmAnd => {
                    let mut answer = ApiGatewayV2httpResponse::default();
                    answer.status_code = 200;
                    answer
                }
                // OwnTracks reads the answer as a list of commands for the app: none.
                TrackerApp::OwnTracks => json_response(200, &serde_json::json!([])),
            },
            (_, 0) => json_response(400, &response),
            (_, failed) => {
                let status = if throttled.as_ref().is_some_and(|t| t.items == failed) {
                    429
                } else {
                    503
                };
                let mut answer = json_response(status, &response);
                if let Some(throttled) = throttled {
                    set_retry_after(&mut answer, throttled.longest_wait);
                }
                answer
            }
        }
    }

    /// Admits one device's request under its limit; the refusal when it is over.
    async fn admit_device(
        &self,
        device_id: &str,
        measurements: &mut Measurements,
    ) -> Option<ApiGatewayV2httpResponse> {
        let limits = self.limits.as_ref()?;
        let Admission::RetryAfter(wait) = limits.admit(device_id).await else {
            return None;
        };
        measurements.count(MetricName::DevicesThrottled, 1);
        Some(too_many_requests(
            &format!(
                "vehicle {device_id:?} is over its limit of {}: retry after {} s",
                describe_limit(limits.limit()),
                retry_after_seconds(wait)
            ),
            wait,
        ))
    }

    /// Publishes a request's valid readings the poster may post, one envelope per device, and
    /// answers for every item.
    async fn publish(
        &self,
        poster: &Poster,
        batch: ValidatedBatch,
        received_at: EpochMillis,
        measurements: &mut Measurements,
    ) -> Published {
        let mut results: Vec<ItemResult> = batch
            .rejected
            .into_iter()
            .map(|r| ItemResult::Rejected {
                index: r.index,
                errors: r.errors,
            })
            .collect();
        let (accepted, foreign) =
            match &poster {
                Poster::AnyVehicle => (batch.accepted, 0),
                Poster::Vehicle(own) => {
                    let (own_readings, foreign): (Vec<_>, Vec<_>) = batch
                        .accepted
                        .into_iter()
                        .partition(|(_, reading)| &reading.device_id == own);
                    let count = foreign.len();
                    results.extend(foreign.into_iter().map(|(index, reading)| {
                        ItemResult::Rejected {
                            index,
                            errors: vec![FieldError {
                                field: "device_id".into(),
                                message: format!(
                                "this token posts readings of vehicle {own:?} only, not of {:?}",
                                reading.device_id
                            ),
                            }],
                        }
                    }));
                    (own_readings, count)
                }
            };
        // Nothing of the token's own vehicle, and something of another's: not allowed at all.
        let forbidden = accepted.is_empty() && foreign > 0;
        let (accepted, throttled) = match (&poster, &self.limits) {
            (Poster::AnyVehicle, Some(limits)) => {
                self.admit_devices(limits.as_ref(), accepted, &mut results, measurements)
                    .await
            }
            _ => (accepted, None),
        };
        let accepted = self.admit_metric_names(accepted, &mut results).await;
        let mut items_of_device: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        let mut readings = Vec::with_capacity(accepted.len());
        for (index, reading) in accepted {
            items_of_device
                .entry(reading.device_id.clone())
                .or_default()
                .push((index, reading.event_id.clone()));
            readings.push(reading);
        }
        // One record per device, split where it would outgrow the bus's record limit; each
        // part answers for its own items.
        let mut envelopes = Vec::new();
        let mut items_of_envelope: Vec<Vec<(usize, String)>> = Vec::new();
        for envelope in envelopes_by_device(readings, received_at) {
            let mut items = items_of_device
                .remove(&envelope.device_id)
                .unwrap_or_default();
            for part in split_to_fit(envelope, MAX_RECORD_BYTES) {
                let rest = items.split_off(part.readings.len().min(items.len()));
                items_of_envelope.push(std::mem::replace(&mut items, rest));
                envelopes.push(part);
            }
        }
        let devices: Vec<String> = envelopes.iter().map(|e| e.device_id.clone()).collect();
        let outcomes = if envelopes.is_empty() {
            Vec::new()
        } else {
            self.bus
                .publish(
                    envelopes
                        .into_iter()
                        .map(Envelope::into_bus_record)
                        .collect(),
                )
                .await
        };
        for ((device, items), outcome) in devices.iter().zip(items_of_envelope).zip(outcomes) {
            match outcome {
                Ok(_) => results.extend(
                    items
                        .into_iter()
                        .map(|(index, event_id)| ItemResult::Accepted { index, event_id }),
                ),
                Err(error) => {
                    tracing::error!(device_id = %device, %error, "telemetry bus did not take a record");
                    results.extend(items.into_iter().map(|(index, _)| ItemResult::Failed {
                        index,
                        error: error.to_string(),
                    }))
                }
            }
        }
        results.sort_by_key(|r| match r {
            ItemResult::Accepted { index, .. }
            | ItemResult::Rejected { index, .. }
            | ItemResult::Failed { index, .. } => *index,
        });

        let count = |f: fn(&ItemResult) -> bool| results.iter().filter(|r| f(r)).count();
        let accepted = count(|r| matches!(r, ItemResult::Accepted { .. }));
        let rejected = count(|r| matches!(r, ItemResult::Rejected { .. }));
        let failed = count(|r| matches!(r, ItemResult::Failed { .. }));
        measurements.count(MetricName::EventsAccepted, accepted);
        measurements.count(MetricName::EventsRejected, rejected);
        measurements.count(MetricName::EventsFailed, failed);
        Published {
            response: IngestResponse {
                accepted,
                rejected,
                failed,
                results,
            },
            forbidden,
            throttled,
        }
    }

    /// The readings of the devices within their limits; the items of the others are answered
    /// as failed (retry after the wait), and how many they were is returned with the readings.
    async fn admit_devices(
        &self,
        limits: &dyn DeviceLimits,
        accepted: Vec<(usize, Reading)>,
        results: &mut Vec<ItemResult>,
        measurements: &mut Measurements,
    ) -> (Vec<(usize, Reading)>, Option<Throttled>) {
        let devices: BTreeSet<&str> = accepted.iter().map(|(_, r)| r.device_id.as_str()).collect();
        let mut waits: HashMap<String, Duration> = HashMap::new();
        for device in devices {
            if let Admission::RetryAfter(wait) = limits.admit(device).await {
                waits.insert(device.to_string(), wait);
            }
        }
        if waits.is_empty() {
            return (accepted, None);
        }
        measurements.count(MetricName::DevicesThrottled, waits.len());
        let limit = describe_limit(limits.limit());
        let mut admitted = Vec::with_capacity(accepted.len());
        let mut items = 0;
        for (index, reading) in accepted {
            match waits.get(&reading.device_id) {
                Some(wait) => {
                    items += 1;
                    results.push(ItemResult::Failed {
                        index,
                        error: format!(
                            "{THROTTLED_PREFIX} of {limit}: retry after {} s",
                            retry_after_seconds(*wait)
                        ),
                    });
                }
                None => admitted.push((index, reading)),
            }
        }
        let longest_wait = waits.into_values().max().unwrap_or_default();
        (
            admitted,
            Some(Throttled {
                items,
                longest_wait,
            }),
        )
    }

    /// The readings whose free metric names the registry admits. A reading with a name past
    /// the deployment's bound is refused (the name is the field); when the registry cannot
    /// answer, the readings that carry metrics are answered as failed, to be sent again.
    async fn admit_metric_names(
        &self,
        accepted: Vec<(usize, Reading)>,
        results: &mut Vec<ItemResult>,
    ) -> Vec<(usize, Reading)> {
        let names: BTreeSet<String> = accepted
            .iter()
            .flat_map(|(_, reading)| reading.metrics.keys().cloned())
            .collect();
        if names.is_empty() {
            return accepted;
        }
        let refused = match self.metric_names.admit(&names).await {
            Ok(refused) => refused,
            Err(error) => {
                tracing::error!(%error, "the metric-name registry did not answer");
                let (with_metrics, without): (Vec<_>, Vec<_>) = accepted
                    .into_iter()
                    .partition(|(_, reading)| !reading.metrics.is_empty());
                results.extend(
                    with_metrics
                        .into_iter()
                        .map(|(index, _)| ItemResult::Failed {
                            index,
                            error: format!("cannot check its metric names now, retry: {error}"),
                        }),
                );
                return without;
            }
        };
        if refused.is_empty() {
            return accepted;
        }
        let limit = self.metric_names.limit();
        let mut admitted = Vec::with_capacity(accepted.len());
        for (index, reading) in accepted {
            let errors: Vec<FieldError> = reading
                .metrics
                .keys()
                .filter(|name| refused.contains(*name))
                .map(|name| FieldError {
                    field: format!("metrics.{name}"),
                    message: format!(
                        "a new metric name, and this deployment already has its limit of {limit} distinct metric names: use one of them, or have the operator raise MAX_METRIC_NAMES"
                    ),
                })
                .collect();
            if errors.is_empty() {
                admitted.push((index, reading));
            } else {
                results.push(ItemResult::Rejected { index, errors });
            }
        }
        admitted
    }
}

/// What publishing a request's readings came to.
struct Published {
    response: IngestResponse,
    /// Nothing of the token's own vehicle, and something of another's.
    forbidden: bool,
    throttled: Option<Throttled>,
}

/// A gateway's items refused for their vehicles' limits.
struct Throttled {
    items: usize,
    longest_wait: Duration,
}

/// How a throttled item's error begins.
const THROTTLED_PREFIX: &str = "its vehicle is over its limit";

fn describe_limit(limit: DeviceRateLimit) -> String {
    format!(
        "{} requests a second (burst {})",
        limit.per_second, limit.burst
    )
}

/// A 429 with a `Retry-After` header.
fn too_many_requests(message: &str, wait: Duration) -> ApiGatewayV2httpResponse {
    let mut response = error_response(429, message);
    set_retry_after(&mut response, wait);
    response
}

fn set_retry_after(response: &mut ApiGatewayV2httpResponse, wait: Duration) {
    response.headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_after_seconds(wait)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use aws_lambda_events::encodings::Body;
    use geostream_shared::envelope::Envelope;
    use geostream_shared::limits::LocalDeviceLimits;
    use geostream_shared::memory::{MemoryMetricNames, MemoryStream};
    use geostream_shared::metrics::RecordedMetrics;
    use geostream_shared::ports::{BusRecord, Published, StoreError};
    use governor::clock::FakeRelativeClock;
    use serde_json::{json, Value};

    const NOW: EpochMillis = 1_763_900_000_000;

    fn names(limit: usize) -> Arc<MemoryMetricNames> {
        Arc::new(MemoryMetricNames::new(limit))
    }

    fn fixture_request(body: &str) -> ApiGatewayV2httpRequest {
        let mut request: ApiGatewayV2httpRequest =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-post-telemetry.json"))
                .unwrap();
        request.body = Some(body.to_string());
        request
    }

    fn body_json(response: &ApiGatewayV2httpResponse) -> Value {
        match &response.body {
            Some(Body::Text(text)) => serde_json::from_str(text).unwrap(),
            other => panic!("unexpected body {other:?}"),
        }
    }

    fn stream_records(stream: &MemoryStream) -> Vec<Envelope> {
        (0..stream.shard_count())
            .flat_map(|shard| stream.read(shard, 1, 1000).records)
            .map(|r| Envelope::decode(&r.data).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn accepts_a_real_api_gateway_event() {
        let stream = Arc::new(MemoryStream::new("t", 2, 100));
        let ingest = Ingest::new(stream.clone(), names(64)).with_clock(|| NOW);
        let request: ApiGatewayV2httpRequest =
            serde_json::from_str(include_str!("../tests/fixtures/apigw-post-telemetry.json"))
                .unwrap();
        let response = ingest.handle(request, &RecordedMetrics::new()).await;
        assert_eq!(response.status_code, 202, "{:?}", response.body);
        assert_eq!(
            body_json(&response),
            json!({"accepted": 2, "rejected": 0, "failed": 0})
        );
        let envelopes = stream_records(&stream);
        assert_eq!(envelopes.len(), 1, "one record per device per request");
        assert_eq!(envelopes[0].readings.len(), 2);
        assert_eq!(envelopes[0].received_at, NOW);
    }

    /// A request of nearly 1 MiB for one device becomes a record over the bus's limit once
    /// re-encoded (default event ids): it goes as several records of that device, in order,
    /// each within the limit, and every item is accepted.
    #[tokio::test]
    async fn a_device_record_over_the_bus_limit_is_split_in_order() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), names(64)).with_clock(|| NOW);
        // As large as validation lets a reading be: 50 free metrics within their 1,024 archive
        // bytes, each value at full precision, and a 128-character event id.
        let metrics: serde_json::Map<String, Value> = (0..50)
            .map(|n| (format!("m{n:03}"), json!(-1.2345678901234567e-300)))
            .collect();
        let items: Vec<Value> = (0..500)
            .map(|n| {
                json!({
                    "device_id": "truck-1", "ts": NOW - 500 + n, "metrics": metrics,
                    "event_id": format!("{n:03}{}", "e".repeat(125)),
                    "lat": -52.123456789012345, "lon": 13.123456789012345,
                })
            })
            .collect();
        let body = Value::Array(items).to_string();
        assert!(body.len() < 1024 * 1024, "{} bytes", body.len());
        let response = ingest
            .handle(fixture_request(&body), &RecordedMetrics::new())
            .await;
        assert_eq!(response.status_code, 202, "{:?}", response.body);
        let records = stream_records(&stream);
        assert!(records.len() >= 2, "{} records", records.len());
        assert!(records.iter().all(|r| r.encode().len() <= MAX_RECORD_BYTES));
        let times: Vec<i64> = records
            .iter()
            .flat_map(|r| r.readings.iter().map(|reading| reading.ts))
            .collect();
        assert_eq!(times, (0..500).map(|n| NOW - 500 + n).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn mixed_batch_answers_207_and_keeps_valid_items() {
        let stream = Arc::new(MemoryStream::new("t", 2, 100));
        let ingest = Ingest::new(stream.clone(), names(64)).with_clock(|| NOW);
        let body = json!([
            {"device_id": "a", "ts": NOW, "lat": 1.0, "lon": 2.0},
            {"device_id": "b", "ts": NOW, "speed_kmh": -5},
            {"device_id": "c", "ts": NOW, "engine_temp_c": 99.5}
        ]);
        let metrics = RecordedMetrics::new();
        let response = ingest
            .handle(fixture_request(&body.to_string()), &metrics)
            .await;
        assert_eq!(response.status_code, 207);
        assert_eq!(
            [
                MetricName::EventsAccepted,
                MetricName::EventsRejected,
                MetricName::EventsFailed,
                MetricName::Requests,
                MetricName::ClientErrors,
            ]
            .map(|name| metrics.total(FUNCTION_NAME, name)),
            [2.0, 1.0, 0.0, 1.0, 0.0]
        );
        let json = body_json(&response);
        assert_eq!(
            (json["accepted"].as_u64(), json["rejected"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(json["results"][1]["status"], "rejected");
        assert_eq!(json["results"][1]["index"], 1);
        assert_eq!(json["results"][1]["errors"][0]["field"], "speed_kmh");
        assert_eq!(json["results"][2]["event_id"], format!("c@{NOW}"));
        assert_eq!(stream_records(&stream).len(), 2);
    }

    #[tokio::test]
    async fn all_bad_is_400_and_nothing_is_published() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), names(64)).with_clock(|| NOW);
        let response = ingest
            .handle(
                fixture_request(r#"{"device_id": "", "ts": "soon"}"#),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(response.status_code, 400);
        let json = body_json(&response);
        assert_eq!(json["results"][0]["errors"][0]["field"], "device_id");
        assert_eq!(json["results"][0]["errors"][1]["field"], "ts");
        let response = ingest
            .handle(fixture_request("not json"), &RecordedMetrics::new())
            .await;
        assert_eq!(response.status_code, 400);
        assert!(body_json(&response)["error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"));
        assert!(stream_records(&stream).is_empty());
    }

    #[tokio::test]
    async fn a_new_metric_name_past_the_deployments_limit_is_refused_by_name() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), names(2)).with_clock(|| NOW);
        let metrics = RecordedMetrics::new();
        let post = |body: Value| ingest.handle(fixture_request(&body.to_string()), &metrics);
        let first = post(json!([
            {"device_id": "a", "ts": NOW, "metrics": {"door_open": 1, "fuel_l": 40}},
        ]))
        .await;
        assert_eq!(first.status_code, 202, "{:?}", body_json(&first));
        let second = post(json!([
            {"device_id": "a", "ts": NOW + 1, "metrics": {"door_open": 0}},
            {"device_id": "b", "ts": NOW, "metrics": {"fuel_l": 12, "tyre_bar": 2.1}},
            {"device_id": "c", "ts": NOW},
        ]))
        .await;
        assert_eq!(second.status_code, 207);
        let json = body_json(&second);
        assert_eq!(json["accepted"], 2, "{json}");
        assert_eq!(json["results"][1]["status"], "rejected");
        assert_eq!(json["results"][1]["errors"][0]["field"], "metrics.tyre_bar");
        let message = json["results"][1]["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("limit of 2 distinct metric names"),
            "{message}"
        );
        assert_eq!(
            stream_records(&stream).len(),
            3,
            "a, a again and c published; b not"
        );
    }

    /// The real authorizer event (device token of truck-7), with `claims` and `scopes` in
    /// place of its own and `body` as the body.
    fn token_request(claims: Value, scopes: &[&str], body: Value) -> ApiGatewayV2httpRequest {
        let mut event: Value = serde_json::from_str(geostream_lambda::fixtures::APIGW_JWT).unwrap();
        event["requestContext"]["authorizer"]["jwt"]["claims"] = claims;
        event["requestContext"]["authorizer"]["jwt"]["scopes"] = json!(scopes);
        event["body"] = Value::String(body.to_string());
        serde_json::from_value(event).unwrap()
    }

    fn fake_clock_limits(
        per_second: f64,
        burst: u32,
    ) -> (Arc<LocalDeviceLimits<FakeRelativeClock>>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limit = DeviceRateLimit::new(per_second, burst).unwrap();
        (
            Arc::new(LocalDeviceLimits::with_clock(limit, clock.clone())),
            clock,
        )
    }

    fn retry_after(response: &ApiGatewayV2httpResponse) -> Option<&str> {
        response
            .headers
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn a_device_past_its_limit_is_answered_429_and_others_are_not() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let (limits, clock) = fake_clock_limits(1.0, 3);
        let ingest = Ingest::new(stream.clone(), names(64))
            .with_access(AccessPolicy::jwt())
            .with_device_limits(limits)
            .with_clock(|| NOW);
        let metrics = RecordedMetrics::new();
        let post = |device: &str| {
            ingest.handle(
                token_request(
                    json!({"sub": device, "scope": "telemetry:write"}),
                    &["telemetry:write"],
                    json!({"device_id": device, "ts": NOW, "lat": 52.5, "lon": 13.4}),
                ),
                &metrics,
            )
        };
        for _ in 0..3 {
            assert_eq!(post("flooder").await.status_code, 202);
        }
        let refused = post("flooder").await;
        assert_eq!(refused.status_code, 429, "{}", body_json(&refused));
        assert_eq!(retry_after(&refused), Some("1"));
        let message = body_json(&refused)["error"].as_str().unwrap().to_string();
        assert!(
            message.contains("over its limit of 1 requests a second (burst 3)"),
            "{message}"
        );
        assert_eq!(post("neighbour").await.status_code, 202);
        clock.advance(Duration::from_secs(1));
        assert_eq!(post("flooder").await.status_code, 202);
        assert_eq!(
            stream_records(&stream).len(),
            5,
            "the 429 published nothing"
        );
        assert_eq!(
            metrics.total(FUNCTION_NAME, MetricName::DevicesThrottled),
            1.0
        );
    }

    #[tokio::test]
    async fn a_gateway_gets_its_throttled_vehicles_items_back_to_retry() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let (limits, _clock) = fake_clock_limits(1.0, 2);
        let ingest = Ingest::new(stream.clone(), names(64))
            .with_access(AccessPolicy::jwt())
            .with_device_limits(limits)
            .with_clock(|| NOW);
        let metrics = RecordedMetrics::new();
        let gateway = json!({"sub": "depot-1", "scope": "telemetry:write:any"});
        let reading =
            |device: &str| json!({"device_id": device, "ts": NOW, "lat": 52.5, "lon": 13.4});
        let post = |body: Value| {
            ingest.handle(
                token_request(gateway.clone(), &["telemetry:write:any"], body),
                &metrics,
            )
        };
        for _ in 0..2 {
            assert_eq!(post(json!([reading("wild")])).await.status_code, 202);
        }
        let mixed = post(json!([reading("wild"), reading("calm"), reading("wild")])).await;
        let answer = body_json(&mixed);
        assert_eq!(mixed.status_code, 207, "{answer}");
        assert_eq!(retry_after(&mixed), Some("1"));
        assert_eq!(
            (answer["accepted"].clone(), answer["failed"].clone()),
            (json!(1), json!(2))
        );
        for index in [0, 2] {
            let error = answer["results"][index]["error"].as_str().unwrap();
            assert!(error.starts_with(THROTTLED_PREFIX), "{error}");
        }
        let only_wild = post(json!([reading("wild")])).await;
        assert_eq!(only_wild.status_code, 429, "{}", body_json(&only_wild));
        assert_eq!(retry_after(&only_wild), Some("1"));
    }

    #[tokio::test]
    async fn a_device_token_posts_its_own_vehicle_and_no_other() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), names(64))
            .with_access(AccessPolicy::jwt())
            .with_clock(|| NOW);
        let metrics = RecordedMetrics::new();
        let device = json!({"sub": "truck-7", "scope": "telemetry:write"});
        let post = |claims: &Value, scopes: &[&str], body: Value| {
            ingest.handle(token_request(claims.clone(), scopes, body), &metrics)
        };
        let own = post(
            &device,
            &["telemetry:write"],
            json!({"device_id": "truck-7", "ts": NOW}),
        )
        .await;
        assert_eq!(own.status_code, 202, "{}", body_json(&own));

        let other = post(
            &device,
            &["telemetry:write"],
            json!({"device_id": "truck-8", "ts": NOW}),
        )
        .await;
        assert_eq!(other.status_code, 403);
        let json = body_json(&other);
        assert_eq!(json["results"][0]["errors"][0]["field"], "device_id");
        assert!(json["results"][0]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("vehicle \"truck-7\" only"));

        let mixed = post(
            &device,
            &["telemetry:write"],
            json!([{"device_id": "truck-7", "ts": NOW + 1}, {"device_id": "truck-8", "ts": NOW}]),
        )
        .await;
        assert_eq!(mixed.status_code, 207);
        assert_eq!(body_json(&mixed)["accepted"], 1);

        let gateway = post(
            &json!({"sub": "depot-3"}),
            &["telemetry:write:any"],
            json!([{"device_id": "truck-8", "ts": NOW}, {"device_id": "truck-9", "ts": NOW}]),
        )
        .await;
        assert_eq!(
            gateway.status_code, 202,
            "a gateway token posts for any vehicle"
        );

        let operator = post(
            &json!({"sub": "ops-1"}),
            &["fleet:read"],
            json!({"device_id": "truck-7", "ts": NOW}),
        )
        .await;
        assert_eq!(operator.status_code, 403);
        assert!(body_json(&operator)["error"]
            .as_str()
            .unwrap()
            .contains("telemetry:write"));

        let mut anonymous = token_request(
            device.clone(),
            &[],
            json!({"device_id": "truck-7", "ts": NOW}),
        );
        anonymous.request_context.authorizer = None;
        assert_eq!(ingest.handle(anonymous, &metrics).await.status_code, 401);

        let devices: Vec<String> = stream_records(&stream)
            .into_iter()
            .map(|e| e.device_id)
            .collect();
        assert_eq!(devices, ["truck-7", "truck-7", "truck-8", "truck-9"]);
    }

    struct DownRegistry;
    #[async_trait]
    impl MetricNameRegistry for DownRegistry {
        async fn admit(&self, _: &BTreeSet<String>) -> Result<BTreeSet<String>, StoreError> {
            Err(StoreError::transient(
                "TransactWriteItems",
                "ThrottlingException",
            ))
        }
        fn limit(&self) -> usize {
            10
        }
    }

    #[tokio::test]
    async fn when_the_registry_cannot_answer_readings_with_metrics_are_retried_the_rest_taken() {
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), Arc::new(DownRegistry)).with_clock(|| NOW);
        let body = json!([
            {"device_id": "a", "ts": NOW, "metrics": {"door_open": 1}},
            {"device_id": "b", "ts": NOW},
        ]);
        let response = ingest
            .handle(fixture_request(&body.to_string()), &RecordedMetrics::new())
            .await;
        assert_eq!(response.status_code, 207);
        let json = body_json(&response);
        assert_eq!(json["results"][0]["status"], "failed");
        assert!(json["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("retry"));
        assert_eq!(json["results"][1]["status"], "accepted");
        assert_eq!(stream_records(&stream).len(), 1);
    }

    struct DownBus;
    #[async_trait]
    impl EventBus for DownBus {
        async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>> {
            records
                .iter()
                .map(|_| {
                    Err(StoreError::transient(
                        "PutRecords",
                        "ProvisionedThroughputExceededException",
                    ))
                })
                .collect()
        }
    }

    #[tokio::test]
    async fn bus_failure_is_503_with_the_reason_per_item() {
        let ingest = Ingest::new(Arc::new(DownBus), names(64)).with_clock(|| NOW);
        let response = ingest
            .handle(
                fixture_request(&json!({"device_id": "a", "ts": NOW}).to_string()),
                &RecordedMetrics::new(),
            )
            .await;
        assert_eq!(response.status_code, 503);
        let json = body_json(&response);
        assert_eq!(json["results"][0]["status"], "failed");
        assert!(json["results"][0]["error"]
            .as_str()
            .unwrap()
            .contains("ProvisionedThroughput"));
    }

    /// A Traccar Client request, as API Gateway passes it on (no authorizer on the route).
    fn osmand_request(device: &str, secret: &str) -> ApiGatewayV2httpRequest {
        let mut request = fixture_request("");
        request.body = None;
        request.request_context.http.path = Some(OSMAND_PATH.into());
        request.request_context.authorizer = None;
        request.raw_query_string = Some(format!(
            "id={device}&timestamp={}&lat=52.5&lon=13.4&speed=10&secret={secret}",
            NOW / 1000
        ));
        request
    }

    #[tokio::test]
    async fn tracker_routes_take_a_device_secret_where_tokens_are_verified() {
        let secrets =
            DeviceSecrets::new(b"0123456789abcdef0123456789abcdef", ["gone".into()]).unwrap();
        let stream = Arc::new(MemoryStream::new("t", 1, 100));
        let ingest = Ingest::new(stream.clone(), names(64))
            .with_access(AccessPolicy::jwt())
            .with_tracker_auth(TrackerAuth::new(Some(secrets.clone()), true))
            .with_clock(|| NOW);
        let metrics = RecordedMetrics::new();
        let taken = ingest
            .handle(
                osmand_request("phone-1", &secrets.issue("phone-1")),
                &metrics,
            )
            .await;
        assert_eq!((taken.status_code, &taken.body), (200, &None));
        let published = stream_records(&stream);
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].readings[0].speed_kmh, Some(18.52));

        let wrong = ingest
            .handle(
                osmand_request("phone-1", &secrets.issue("phone-2")),
                &metrics,
            )
            .await;
        assert_eq!(wrong.status_code, 401);
        assert!(wrong.headers.contains_key(http::header::WWW_AUTHENTICATE));
        let revoked = ingest
            .handle(osmand_request("gone", &secrets.issue("gone")), &metrics)
            .await;
        assert_eq!(revoked.status_code, 403);
        assert_eq!(stream_records(&stream).len(), 1, "nothing more published");
        assert_eq!(
            metrics.total(FUNCTION_NAME, MetricName::DevicesRefused),
            2.0
        );

        // The telemetry route still wants its token.
        let telemetry = ingest
            .handle(
                fixture_request(r#"{"device_id":"phone-1","ts":1763900000000}"#),
                &metrics,
            )
            .await;
        assert_eq!(telemetry.status_code, 401);

        // No key where tokens are verified: the tracker routes are closed.
        let closed = Ingest::new(stream.clone(), names(64))
            .with_access(AccessPolicy::jwt())
            .with_tracker_auth(TrackerAuth::new(None, true))
            .with_clock(|| NOW);
        let answer = closed
            .handle(osmand_request("phone-1", "x"), &metrics)
            .await;
        assert_eq!(answer.status_code, 404);
        assert!(body_json(&answer)["error"]
            .as_str()
            .unwrap()
            .contains("DEVICE_SECRET_KEY"));
    }

    #[tokio::test]
    async fn wrong_route_or_method() {
        let ingest = Ingest::new(Arc::new(DownBus), names(64)).with_clock(|| NOW);
        let mut request = fixture_request("{}");
        request.request_context.http.method = http::Method::GET;
        assert_eq!(
            ingest
                .handle(request, &RecordedMetrics::new())
                .await
                .status_code,
            405
        );
        let mut request = fixture_request("{}");
        request.request_context.http.path = Some("/v2/telemetry".into());
        assert_eq!(
            ingest
                .handle(request, &RecordedMetrics::new())
                .await
                .status_code,
            404
        );
    }
}
