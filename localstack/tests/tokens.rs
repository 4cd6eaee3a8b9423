//! `geostream-local --jwks FILE --jwt-issuer ISS --jwt-audience AUD` verifies bearer tokens as
//! API Gateway's JWT authorizer does, then the handlers decide from the token's claims as they
//! do on AWS. The runner is the real binary; the tokens are signed with the test keys in
//! shared/lambda/tests/fixtures/jwt.

mod common;

use std::time::{Duration, Instant};

use common::tokens::{now, runner_arguments, token};
use common::Runner;
use serde_json::{json, Value};

fn signed(claims: Value) -> String {
    token("test-key-1", "test-key-1", claims)
}

fn reading(device: &str) -> Value {
    json!({"device_id": device, "event_id": format!("{device}-{}", now()), "ts": now() * 1000,
           "lat": 52.52, "lon": 13.40, "speed_kmh": 30.0})
}

async fn runner() -> Runner {
    let args = runner_arguments();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Runner::start(env!("CARGO_BIN_EXE_geostream-local"), &args, &[]).await
}

/// The status and body of a request with `token` (none when `None`).
async fn call(
    http: &reqwest::Client,
    request: reqwest::RequestBuilder,
    token: Option<&str>,
) -> (u16, Value, Option<String>) {
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let response = http.execute(request.build().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        challenge,
    )
}

#[tokio::test]
async fn a_request_without_a_good_token_is_401_whatever_is_wrong_with_it() {
    let runner = runner().await;
    let http = reqwest::Client::new();
    let post = || {
        http.post(format!("{}/v1/telemetry", runner.base))
            .json(&json!([reading("truck-7")]))
    };
    let device = json!({"sub": "truck-7", "scope": "telemetry:write"});
    let with = |change: Value| {
        let mut claims = device.clone();
        for (name, value) in change.as_object().unwrap() {
            claims[name] = value.clone();
        }
        claims
    };
    let cases = [
        (None, "no bearer token"),
        (Some("not-a-jwt".to_string()), "not a JWT"),
        (Some(signed(with(json!({"exp": now() - 60})))), "expired"),
        (
            Some(signed(with(json!({"nbf": now() + 600})))),
            "not valid yet",
        ),
        (
            Some(signed(with(json!({"aud": "another-api"})))),
            "audience",
        ),
        (
            Some(signed(with(json!({"iss": "https://elsewhere.example"})))),
            "issuer",
        ),
        (
            Some(token("test-key-2", "test-key-2", device.clone())),
            "not in the issuer's key set",
        ),
        (
            Some(token("test-key-2", "test-key-1", device.clone())),
            "signature",
        ),
    ];
    for (token, reason) in cases {
        let (status, body, challenge) = call(&http, post(), token.as_deref()).await;
        assert_eq!(status, 401, "{reason}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "wanted {reason:?}, got {error:?}");
        assert!(
            challenge.is_some_and(|c| c.starts_with("Bearer error=\"invalid_token\"")),
            "{reason}: a 401 carries the Bearer challenge"
        );
    }
    // Reads too: the whole API is behind the tokens.
    let (status, _, _) = call(
        &http,
        http.get(format!("{}/v1/vehicles", runner.base)),
        None,
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn the_tokens_claims_decide_what_it_may_do() {
    let runner = runner().await;
    let http = reqwest::Client::new();
    let base = &runner.base;
    let device = signed(json!({"sub": "truck-7", "scope": "telemetry:write"}));
    let operator = signed(json!({"sub": "ops-anna", "scope": "fleet:read alerts:ack"}));

    let post = |body: Value| http.post(format!("{base}/v1/telemetry")).json(&body);
    let (status, body, _) = call(&http, post(json!([reading("truck-7")])), Some(&device)).await;
    assert_eq!(status, 202, "a device posts as itself: {body}");
    let (status, body, _) = call(&http, post(json!([reading("truck-8")])), Some(&device)).await;
    assert_eq!(status, 403, "a device posts as another: {body}");
    let (status, body, _) = call(&http, post(json!([reading("truck-9")])), Some(&operator)).await;
    assert_eq!(status, 403, "a token without telemetry:write posts: {body}");
    let (status, body, _) = call(
        &http,
        http.get(format!("{base}/v1/vehicles")),
        Some(&device),
    )
    .await;
    assert_eq!(status, 403, "a device reads the fleet: {body}");

    // The operator reads the fleet and sees the device's reading once it has landed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = call(
            &http,
            http.get(format!("{base}/v1/vehicles/truck-7")),
            Some(&operator),
        )
        .await;
        if status == 200 {
            assert_eq!(body["device_id"], "truck-7", "{body}");
            break;
        }
        assert!(
            status == 404 && Instant::now() < deadline,
            "the operator reads truck-7: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
