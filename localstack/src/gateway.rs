//! The local API gateway: every `/v1/*` request becomes a real API Gateway HTTP API (payload
//! v2) event for the ingest or query-api handler, and the handler's response becomes the HTTP
//! response, as API Gateway would do it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lambda_events::encodings::Body as LambdaBody;
use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use geostream_lambda::http::{error_response, query_parameters};
use geostream_shared::now_millis;

use crate::Stack;

/// Bodies up to this size reach the ingest handler, which applies the contract's own limit and
/// names it in its error; larger ones are refused by the gateway, as API Gateway does.
const GATEWAY_BODY_LIMIT: usize = 4 * 1024 * 1024;

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The gateway's routes, behind the [`HostGuard`](crate::host_guard::HostGuard).
pub fn router(stack: Arc<Stack>, guard: crate::host_guard::HostGuard) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/local/stats", get(stats))
        .route("/local/dead-letters", get(dead_letters))
        .route("/local/positions", get(positions))
        .route("/local/metrics", get(metrics))
        .route("/local/dashboard.json", get(dashboard_definition))
        .route("/local/live", get(crate::live::live))
        .route("/assets/{*path}", get(crate::live::asset))
        .fallback(api_gateway)
        .layer(DefaultBodyLimit::max(GATEWAY_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(guard),
            crate::host_guard::guard,
        ))
        .with_state(stack)
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn stats(State(stack): State<Arc<Stack>>) -> Json<crate::StackStats> {
    Json(stack.stats())
}

async fn dead_letters(State(stack): State<Arc<Stack>>) -> impl IntoResponse {
    match &stack.memory {
        Some(memory) => {
            let (letters, total) = memory.dead_letters.snapshot();
            Json(
                serde_json::json!({ "total": total, "kept": letters.len(), "dead_letters": letters }),
            )
        }
        None => Json(
            serde_json::json!({ "note": "on the AWS backend dead letters go to the SQS dead-letter queue" }),
        ),
    }
}

/// Every vehicle's position as `[device_id, lat, lon]`, compact for the status page's map
/// (on the AWS backend: the vehicles this runner has written).
async fn positions(State(stack): State<Arc<Stack>>) -> impl IntoResponse {
    // On the AWS backend, what this runner wrote: a DynamoDB scan would cost more than it is worth.
    let all: Vec<(String, f64, f64)> = stack
        .vehicles()
        .into_iter()
        .map(|p| (p.device_id, p.lat, p.lon))
        .collect();
    Json(all)
}

/// The dashboard definition the CloudWatch dashboard is rendered from.
async fn dashboard_definition() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::dashboard::DEFINITION,
    )
}

#[derive(serde::Deserialize)]
struct MetricsQuery {
    /// Epoch seconds: only buckets after it (the page asks for what it has not seen yet).
    #[serde(default)]
    since: i64,
}

/// The functions' metrics as per-second series (`t`, `sum`, `count`, `max` per bucket).
async fn metrics(
    State(stack): State<Arc<Stack>>,
    axum::extract::Query(query): axum::extract::Query<MetricsQuery>,
) -> impl IntoResponse {
    Json(serde_json::json!({
        "now": now_millis() / 1000,
        "window_s": crate::metrics::WINDOW_SECONDS,
        "series": stack.metrics.series_since(query.since),
    }))
}

async fn api_gateway(
    State(stack): State<Arc<Stack>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut event = build_event(&method, &uri, headers, &body, peer);
    let path = uri.path();
    // The API's description is for anyone, as on API Gateway; tracker apps present their
    // device's secret to the ingest function instead of a token.
    let tracker = [
        geostream_ingest::OSMAND_PATH,
        geostream_ingest::OWNTRACKS_PATH,
    ]
    .contains(&path);
    let public = path == geostream_query_api::OPENAPI_PATH;
    if let Some(tokens) = stack.tokens.as_ref().filter(|_| !public && !tracker) {
        if let Err(refusal) = tokens.authorize(&mut event).await {
            return token_refused(refusal);
        }
    }
    let response = if path == geostream_ingest::TELEMETRY_PATH || tracker {
        stack.ingest.handle(event, stack.metrics.as_ref()).await
    } else if path.starts_with("/v1/") || public {
        stack.query_api.handle(event, stack.metrics.as_ref()).await
    } else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": format!("no route {path}")})),
        )
            .into_response();
    };
    into_http_response(response)
}

/// The API Gateway v2 event for a request, as API Gateway builds it for a `$default` route.
pub fn build_event(
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: &[u8],
    peer: SocketAddr,
) -> ApiGatewayV2httpRequest {
    let now = now_millis();
    let raw_query = uri.query().unwrap_or_default().to_string();
    let user_agent = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);

    let mut event = ApiGatewayV2httpRequest::default();
    event.version = Some("2.0".into());
    event.route_key = Some("$default".into());
    event.raw_path = Some(uri.path().to_string());
    event.raw_query_string = Some(raw_query);
    event.headers = headers;
    event.query_string_parameters = query_parameters(uri.query().unwrap_or_default());
    let context = &mut event.request_context;
    context.route_key = Some("$default".into());
    context.account_id = Some("000000000000".into());
    context.stage = Some("$default".into());
    context.request_id = Some(format!(
        "local-{}",
        REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    context.apiid = Some("local".into());
    context.domain_name = Some("localhost".into());
    context.time_epoch = now;
    context.http.method = method.clone();
    context.http.path = Some(uri.path().to_string());
    context.http.protocol = Some("HTTP/1.1".into());
    context.http.source_ip = Some(peer.ip().to_string());
    context.http.user_agent = user_agent;
    match std::str::from_utf8(body) {
        _ if body.is_empty() => {}
        Ok(text) => event.body = Some(text.to_string()),
        Err(_) => {
            event.body = Some(base64::engine::general_purpose::STANDARD.encode(body));
            event.is_base64_encoded = true;
        }
    }
    event
}

/// A request whose token did not pass: 401 with the reason, and the `WWW-Authenticate`
/// challenge of RFC 6750 (503 when the keys could not be read).
fn token_refused(refusal: geostream_lambda::identity::Refusal) -> Response {
    let mut response = into_http_response(error_response(refusal.status, refusal.message.as_str()));
    if refusal.status == 401 {
        let description = refusal.message.replace(['"', '\\'], "'");
        if let Ok(challenge) =
            format!("Bearer error=\"invalid_token\", error_description=\"{description}\"").parse()
        {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, challenge);
        }
    }
    response
}

fn into_http_response(response: ApiGatewayV2httpResponse) -> Response {
    let status = u16::try_from(response.status_code)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let body = match response.body {
        Some(LambdaBody::Text(text)) => Body::from(text),
        Some(LambdaBody::Binary(bytes)) => Body::from(bytes),
        _ => Body::empty(),
    };
    let mut http_response = Response::new(body);
    *http_response.status_mut() = status;
    *http_response.headers_mut() = response.headers;
    http_response
}
