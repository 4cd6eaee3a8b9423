//! A fault-injecting proxy in front of an AWS-API emulator: what a test points the SDK at to
//! see GeoStream under AWS's failure modes.
//!
//! Every request is forwarded to the emulator, except that a share of the calls a plan targets
//! (by operation, as the `X-Amz-Target` header or the S3 method names it) fail instead, with
//! the fault the plan picks in turn: throttling as each service answers it
//! (`ProvisionedThroughputExceededException`, `ThrottlingException`, S3's `SlowDown`), 500s,
//! 503s, partial `PutRecords` failures (the failed entries are not written), a cancelled
//! transaction (`TransactionConflict`), a response held past the client's timeout, or a
//! dropped connection. The last two forward the call first: it took effect, the caller does
//! not know, as on a real network. An outage fails every matching call until it is lifted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{json, Value};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The service's throttling error.
    Throttle,
    /// 500 InternalFailure.
    ServerError,
    /// 503 ServiceUnavailable.
    Unavailable,
    /// PutRecords: about half the entries fail with ProvisionedThroughputExceededException and
    /// are not written (other operations: throttled).
    PartialFailure,
    /// TransactWriteItems: TransactionCanceledException for a TransactionConflict (other
    /// operations: throttled).
    TransactionConflict,
    /// The call is forwarded, its answer held for [`FaultPlan::hold`] and then dropped.
    Timeout,
    /// The call is forwarded and the connection closed without its answer.
    DroppedConnection,
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// The names the command line takes: `throttle`, `server-error`, `unavailable`,
    /// `partial-failure`, `transaction-conflict`, `timeout`, `dropped-connection`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "throttle" => Fault::Throttle,
            "server-error" => Fault::ServerError,
            "unavailable" => Fault::Unavailable,
            "partial-failure" => Fault::PartialFailure,
            "transaction-conflict" => Fault::TransactionConflict,
            "timeout" => Fault::Timeout,
            "dropped-connection" => Fault::DroppedConnection,
            other => return Err(format!("{other:?} is not a fault: throttle, server-error, unavailable, partial-failure, transaction-conflict, timeout or dropped-connection")),
        })
    }
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::Throttle,
        Fault::ServerError,
        Fault::Unavailable,
        Fault::PartialFailure,
        Fault::TransactionConflict,
        Fault::Timeout,
        Fault::DroppedConnection,
    ];
}

/// The data-plane operations GeoStream's functions call per reading.
pub const DATA_PLANE: &[&str] = &[
    "PutRecords",
    "PutItem",
    "GetItem",
    "TransactWriteItems",
    "UpdateItem",
    "WriteRecords",
    "PutObject",
    "SendMessageBatch",
];

/// Every call of `operation` (whose body contains `body_contains`, when set) fails with `fault`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub operation: String,
    pub body_contains: Option<String>,
    pub fault: Fault,
}

#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// The share of targeted calls that fail, 0 to 1.
    pub rate: f64,
    /// The operations `rate` applies to.
    pub operations: Vec<String>,
    /// The faults, taken in turn.
    pub faults: Vec<Fault>,
    /// How long a [`Fault::Timeout`] holds the answer before dropping it.
    pub hold: Duration,
    pub outages: Vec<Outage>,
}

impl FaultPlan {
    /// No faults: a plain proxy.
    pub fn none() -> Self {
        FaultPlan {
            rate: 0.0,
            operations: DATA_PLANE.iter().map(|s| s.to_string()).collect(),
            faults: Fault::ALL.to_vec(),
            hold: Duration::from_secs(10),
            outages: Vec::new(),
        }
    }

    /// `rate` of the data-plane calls fail, with every kind of fault in turn.
    pub fn every_kind(rate: f64) -> Self {
        FaultPlan {
            rate,
            ..FaultPlan::none()
        }
    }
}

/// What the proxy did, per fault and per operation.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub forwarded: AtomicU64,
    injected: Mutex<BTreeMap<(String, Fault), u64>>,
}

impl FaultStats {
    /// Faults injected, per (operation, fault).
    pub fn injected(&self) -> BTreeMap<(String, Fault), u64> {
        self.injected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn total_injected(&self) -> u64 {
        self.injected().values().sum()
    }
}

struct State {
    upstream: String,
    client: reqwest::Client,
    plan: Mutex<FaultPlan>,
    next_fault: AtomicU64,
    stats: Arc<FaultStats>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy on a free local port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str, plan: FaultPlan) -> std::io::Result<FaultProxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, plan).await
    }

    /// Starts a proxy listening on `listen`.
    pub async fn start_on(
        listen: SocketAddr,
        upstream: &str,
        plan: FaultPlan,
    ) -> std::io::Result<FaultProxy> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .map_err(std::io::Error::other)?,
            plan: Mutex::new(plan),
            next_fault: AtomicU64::new(0),
            stats: Arc::new(FaultStats::default()),
        });
        let serving = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(state.clone(), request));
                    // A dropped connection ends here with an error: that is the fault.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy { url, state, task })
    }

    /// Replaces the plan (faults change at once for new calls).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self
            .state
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = plan;
    }

    pub fn stats(&self) -> Arc<FaultStats> {
        self.state.stats.clone()
    }
}

/// Why a connection is closed without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

/// The operation a request calls: the `X-Amz-Target` action, or S3's by method.
fn operation(request: &hyper::http::request::Parts) -> (String, String) {
    if let Some(target) = request
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
    {
        let (service, action) = target.split_once('.').unwrap_or(("", target));
        return (service.to_string(), action.to_string());
    }
    let segments = request.uri.path().trim_matches('/').split('/').count();
    let action = match (request.method.as_str(), segments) {
        ("PUT", n) if n >= 2 => "PutObject",
        ("GET", n) if n >= 2 => "GetObject",
        ("GET", _) => "ListObjectsV2",
        (method, _) => method,
    };
    ("S3".to_string(), action.to_string())
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = json!({"__type": code, "message": message}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-errortype", code.rsplit('#').next().unwrap_or(code))
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn s3_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the fault proxy</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// The service's throttling answer.
fn throttled(service: &str) -> Response<Full<Bytes>> {
    match service {
        "S3" => s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown"),
        s if s.starts_with("DynamoDB") => json_error(
            StatusCode::BAD_REQUEST,
            "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
            "injected: the level of configured provisioned throughput for the table was exceeded",
        ),
        s if s.starts_with("Kinesis") => json_error(
            StatusCode::BAD_REQUEST,
            "ProvisionedThroughputExceededException",
            "injected: rate exceeded for shard",
        ),
        "AmazonSQS" => json_error(
            StatusCode::BAD_REQUEST,
            "com.amazonaws.sqs#RequestThrottled",
            "injected: request throttled",
        ),
        _ => json_error(
            StatusCode::BAD_REQUEST,
            "ThrottlingException",
            "injected: rate exceeded",
        ),
    }
}

fn failure(service: &str, status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    if service == "S3" {
        let s3_code = if status == StatusCode::SERVICE_UNAVAILABLE {
            "ServiceUnavailable"
        } else {
            "InternalError"
        };
        s3_error(status, s3_code)
    } else {
        json_error(status, code, "injected by the fault proxy")
    }
}

impl State {
    /// The fault for this call, if any.
    fn pick(&self, operation: &str, body: &[u8]) -> Option<Fault> {
        let plan = self
            .plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let body = String::from_utf8_lossy(body);
        if let Some(outage) = plan.outages.iter().find(|o| {
            o.operation == operation
                && o.body_contains
                    .as_deref()
                    .is_none_or(|needle| body.contains(needle))
        }) {
            return Some(outage.fault);
        }
        if plan.faults.is_empty()
            || !plan.operations.iter().any(|o| o == operation)
            || !rand::rng().random_bool(plan.rate.clamp(0.0, 1.0))
        {
            return None;
        }
        let turn = self.next_fault.fetch_add(1, Ordering::Relaxed) as usize;
        Some(plan.faults[turn % plan.faults.len()])
    }

    fn count(&self, operation: &str, fault: Fault) {
        *self
            .stats
            .injected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((operation.to_string(), fault))
            .or_default() += 1;
    }

    fn hold(&self) -> Duration {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .hold
    }

    async fn forward(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, Dropped> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let method =
            reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).map_err(|_| Dropped)?;
        let mut outgoing = self
            .client
            .request(method, format!("{}{path}", self.upstream))
            .body(body);
        for (name, value) in &parts.headers {
            if !matches!(name.as_str(), "host" | "content-length" | "connection") {
                outgoing = outgoing.header(name.as_str(), value.as_bytes());
            }
        }
        let answer = match outgoing.send().await {
            Ok(answer) => answer,
            // Not a fault: say so, rather than drop the connection like one.
            Err(error) => {
                return Ok(json_error(
                    StatusCode::BAD_GATEWAY,
                    "BadGateway",
                    &format!("the fault proxy cannot reach {}: {error}", self.upstream),
                ))
            }
        };
        let mut response = Response::builder().status(answer.status().as_u16());
        for (name, value) in answer.headers() {
            if !matches!(
                name.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                response = response.header(name.as_str(), value.as_bytes());
            }
        }
        let bytes = answer.bytes().await.map_err(|_| Dropped)?;
        response.body(Full::new(bytes)).map_err(|_| Dropped)
    }

    /// PutRecords with about half the entries failed: those are taken out of the request, and
    /// the answer reports them failed in their places.
    async fn partial_put_records(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, Dropped> {
        let Ok(mut request) = serde_json::from_slice::<Value>(&body) else {
            return Ok(throttled("Kinesis"));
        };
        let entries = request["Records"].as_array().cloned().unwrap_or_default();
        let failed: Vec<bool> = {
            let mut rng = rand::rng();
            entries.iter().map(|_| rng.random_bool(0.5)).collect()
        };
        let kept: Vec<Value> = entries
            .iter()
            .zip(&failed)
            .filter(|(_, failed)| !**failed)
            .map(|(entry, _)| entry.clone())
            .collect();
        let mut written = Vec::new().into_iter();
        if !kept.is_empty() {
            request["Records"] = Value::Array(kept);
            let forwarded = self
                .forward(parts, Bytes::from(request.to_string()))
                .await?;
            if !forwarded.status().is_success() {
                return Ok(forwarded);
            }
            let bytes = forwarded
                .into_body()
                .collect()
                .await
                .map_err(|_| Dropped)?
                .to_bytes();
            let answer: Value = serde_json::from_slice(&bytes).map_err(|_| Dropped)?;
            written = answer["Records"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter();
        }
        let records: Vec<Value> = failed
            .iter()
            .map(|failed| {
                if *failed {
                    json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "injected: rate exceeded for shard"})
                } else {
                    written.next().unwrap_or(Value::Null)
                }
            })
            .collect();
        let failed_count = records
            .iter()
            .filter(|r| r.get("ErrorCode").is_some())
            .count();
        let body = json!({"FailedRecordCount": failed_count, "Records": records}).to_string();
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-amz-json-1.1")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Dropped)
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let (service, operation) = operation(&parts);
    let Some(fault) = state.pick(&operation, &body) else {
        return state.forward(&parts, body).await;
    };
    state.count(&operation, fault);
    match fault {
        Fault::Throttle => Ok(throttled(&service)),
        Fault::ServerError => Ok(failure(
            &service,
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
        )),
        Fault::Unavailable => Ok(failure(
            &service,
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
        )),
        Fault::PartialFailure if operation == "PutRecords" => {
            state.partial_put_records(&parts, body).await
        }
        Fault::TransactionConflict if operation == "TransactWriteItems" => {
            let items = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["TransactItems"].as_array().map(Vec::len))
                .unwrap_or(1);
            let reasons: Vec<Value> = (0..items)
                .map(|i| {
                    if i == 0 {
                        json!({"Code": "TransactionConflict", "Message": "injected: transaction is ongoing for the item"})
                    } else {
                        json!({"Code": "None"})
                    }
                })
                .collect();
            let body = json!({
                "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
                "message": "Transaction cancelled, please refer cancellation reasons for specific reasons [TransactionConflict]",
                "CancellationReasons": reasons,
            })
            .to_string();
            Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-type", "application/x-amz-json-1.0")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default())
        }
        Fault::PartialFailure | Fault::TransactionConflict => Ok(throttled(&service)),
        Fault::Timeout => {
            let _ = state.forward(&parts, body).await;
            tokio::time::sleep(state.hold()).await;
            Err(Dropped)
        }
        Fault::DroppedConnection => {
            let _ = state.forward(&parts, body).await;
            Err(Dropped)
        }
    }
}
