//! Helpers for the HTTP functions: reading an API Gateway v2 request body and answering JSON.

use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use std::collections::HashMap;

use aws_lambda_events::query_map::QueryMap;
use base64::Engine;
use serde::Serialize;

use geostream_shared::metrics::{Measurements, MetricName};

/// A raw query string's parameters, as API Gateway puts them in the event
/// (`queryStringParameters`, every value of a repeated name kept).
pub fn query_parameters(raw_query: &str) -> QueryMap {
    let mut query: HashMap<String, Vec<String>> = HashMap::new();
    for (key, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        query
            .entry(key.into_owned())
            .or_default()
            .push(value.into_owned());
    }
    QueryMap::from(query)
}

/// The request body as bytes, decoding it when API Gateway marked it base64.
pub fn request_body(request: &ApiGatewayV2httpRequest) -> Result<Vec<u8>, String> {
    let body = request.body.as_deref().unwrap_or_default();
    if request.is_base64_encoded {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("request body is marked base64 but does not decode: {e}"))
    } else {
        Ok(body.as_bytes().to_vec())
    }
}

/// The request's method and path (API Gateway's `requestContext.http`, else the raw path).
pub fn method_and_path(request: &ApiGatewayV2httpRequest) -> (http::Method, String) {
    let http = &request.request_context.http;
    let path = http
        .path
        .clone()
        .or_else(|| request.raw_path.clone())
        .unwrap_or_else(|| "/".to_string());
    (http.method.clone(), path)
}

/// A JSON response with the given status.
pub fn json_response(status: u16, body: &impl Serialize) -> ApiGatewayV2httpResponse {
    let mut response = ApiGatewayV2httpResponse::default();
    response.status_code = i64::from(status);
    response.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response.body = Some(Body::Text(
        serde_json::to_string(body).unwrap_or_else(|_| "{}".into()),
    ));
    response
}

/// A JSON error response: `{"error": message}`.
pub fn error_response(status: u16, message: impl Into<String>) -> ApiGatewayV2httpResponse {
    json_response(status, &serde_json::json!({ "error": message.into() }))
}

/// Records what every HTTP function measures of a request: that it was answered, whether it
/// was the client's error, and how long it took.
pub fn measure_response(
    measurements: &mut Measurements,
    started: std::time::Instant,
    response: &ApiGatewayV2httpResponse,
) {
    measurements.count(MetricName::Requests, 1);
    let client_error = (400..500).contains(&response.status_code);
    measurements.count(MetricName::ClientErrors, usize::from(client_error));
    measurements.millis(
        MetricName::RequestDuration,
        started.elapsed().as_secs_f64() * 1000.0,
    );
}
