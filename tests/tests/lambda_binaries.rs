//! The real Lambda binaries, not only their handler libraries: each function's `main` is built
//! for the host, started as Lambda starts a `bootstrap` (with the environment variables
//! Terraform gives that function, read from `infra/`, and a Runtime API server of this test's
//! own, `geostream_e2e::runtime_api`), against each AWS-API emulator (moto and LocalStack,
//! started by `scripts/test`). Real API Gateway v2 and Kinesis events are driven through them: ingest to
//! Kinesis, the three stream functions to DynamoDB, S3 and the alerts stream, query-api back.
//! A `main` that reads a variable Terraform does not set fails at init, and so fails here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::manifest::FUNCTIONS;
use geostream_aws::provision::{create_resources, ArchiveKind, ResourceNames};
use geostream_e2e::harness::{read_stream, request, Emulator, EmulatorKind};
use geostream_e2e::on_each_emulator;
use geostream_e2e::runtime_api::{build_function_binaries, FunctionProcess};
use geostream_e2e::terraform_environment;
use geostream_shared::device_secret::DeviceSecrets;
use serde_json::{json, Value};

const INVOCATION_TIMEOUT: Duration = Duration::from_secs(60);
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every function's binary, by function name (`geostream-<name>`).
fn binaries() -> BTreeMap<String, std::path::PathBuf> {
    let packages: Vec<String> = FUNCTIONS
        .iter()
        .map(|f| format!("geostream-{}", f.name))
        .collect();
    let packages: Vec<&str> = packages.iter().map(String::as_str).collect();
    let built = build_function_binaries(&packages).expect("the function binaries build");
    FUNCTIONS
        .iter()
        .map(|f| {
            let binary = built
                .get(&format!("geostream-{}", f.name))
                .unwrap_or_else(|| panic!("no binary built for {}: {built:?}", f.name));
            (f.name.to_string(), binary.clone())
        })
        .collect()
}

/// What the Lambda service and Terraform put in a function's environment: the AWS variables
/// (here pointing at the emulator), and each variable Terraform sets for it, valued as
/// Terraform would for these resources. A variable Terraform sets that the test cannot value
/// fails the test, so the list is the one in `infra/`.
fn lambda_environment(
    function: &str,
    endpoint: &str,
    deployment: &geostream_aws::compose::SettingMap,
) -> BTreeMap<String, String> {
    let mut environment: BTreeMap<String, String> = [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("RUST_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for name in terraform_environment(repository(), function).expect("infra/ parses") {
        let value = deployment
            .iter()
            .find(|(setting, _)| *setting == name)
            .map(|(_, value)| value.to_string())
            .unwrap_or_else(|| {
                panic!("Terraform sets {name} for {function}; the test has no value for it")
            });
        environment.insert(name, value);
    }
    environment
}

/// A deployment's resources on the emulator, named `PREFIX-PID-...`: their names, clients
/// for the test's own reads, and the dead-letter queue's URL.
async fn resources_on_emulator(endpoint: &str, prefix: &str) -> (ResourceNames, Clients, String) {
    let names = ResourceNames::with_prefix(&format!("{prefix}-{}", std::process::id()));
    let harness = Clients::new(&sdk_config(Some(endpoint)).await);
    let queue_url = create_resources(&harness, &names, 1, ArchiveKind::S3)
        .await
        .expect("resources are created on the emulator");
    (names, harness, queue_url)
}

async fn invoke(function: &FunctionProcess, event: Value) -> Value {
    function
        .api
        .invoke(event, INVOCATION_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{} failed: {error}\n{}", function.name, function.output()))
}

/// The request as API Gateway's JWT authorizer passes it on, for a token of `subject` with
/// `scope`.
fn with_token(
    request: &aws_lambda_events::event::apigw::ApiGatewayV2httpRequest,
    subject: &str,
    scope: &str,
) -> Value {
    let mut event = serde_json::to_value(request).unwrap();
    event["requestContext"]["authorizer"] =
        json!({"jwt": {"claims": {"sub": subject, "scope": scope}, "scopes": [scope]}});
    event
}

async fn get(query_api: &FunctionProcess, path: &str, query: &[(&str, String)]) -> Value {
    let answer = invoke(
        query_api,
        with_token(&request("GET", path, query, None), "ops-1", "fleet:read"),
    )
    .await;
    assert_eq!(answer["statusCode"], 200, "GET {path}: {answer}");
    serde_json::from_str(answer["body"].as_str().unwrap_or("null")).unwrap()
}

on_each_emulator!(
    the_lambda_binaries_run_the_pipeline_under_the_runtime_api,
    ingest_behind_a_function_url_verifies_tokens_itself,
);

async fn the_lambda_binaries_run_the_pipeline_under_the_runtime_api(emulator: Emulator) {
    let endpoint = emulator.endpoint;
    let binaries = binaries();
    let (names, harness, queue_url) = resources_on_emulator(&endpoint, "gs-bin").await;
    // Terraform's defaults: the Kinesis bus, the S3 archive, tokens required.
    let deployment = names
        .settings(ArchiveKind::S3, &queue_url)
        .set(geostream_aws::compose::settings::AUTHORIZATION, "jwt");

    let mut functions: BTreeMap<&str, FunctionProcess> = BTreeMap::new();
    for function in FUNCTIONS {
        let environment = lambda_environment(function.name, &endpoint, &deployment);
        let mut process = FunctionProcess::spawn(
            &format!("geostream-{}", function.name),
            &binaries[function.name],
            &environment,
        )
        .await
        .unwrap();
        let init = process
            .wait_initialised(INIT_TIMEOUT)
            .await
            .unwrap_or_else(|error| panic!("{error}"));
        eprintln!(
            "init duration {:<18} {:>6.1} ms (debug build, x86_64)",
            function.name,
            init.as_secs_f64() * 1000.0
        );
        functions.insert(function.name, process);
    }

    // ingest: an API Gateway v2 POST, published to Kinesis.
    let t0 = geostream_shared::now_millis() - 60_000;
    let body = json!([
        {"device_id": "bin-hot-1", "ts": t0, "event_id": "h0", "lat": 52.52, "lon": 13.405, "engine_temp_c": 104.0},
        {"device_id": "bin-hot-1", "ts": t0 + 1000, "event_id": "h1", "lat": 52.521, "lon": 13.405, "engine_temp_c": 108.0},
        {"device_id": "bin-cool-2", "ts": t0, "event_id": "c0", "lat": 52.53, "lon": 13.41, "engine_temp_c": 85.0},
    ]);
    let post = request("POST", "/v1/telemetry", &[], Some(body));
    let anonymous = invoke(&functions["ingest"], serde_json::to_value(&post).unwrap()).await;
    assert_eq!(anonymous["statusCode"], 401, "no token: {anonymous}");
    // Terraform's default has no device secret key: the tracker apps' routes are closed.
    let mut tracker =
        serde_json::to_value(request("POST", "/v1/ingest/osmand", &[], None)).unwrap();
    tracker["rawQueryString"] = json!(format!(
        "id=bin-phone&timestamp={}&lat=52.5&lon=13.4",
        t0 / 1000
    ));
    let closed = invoke(&functions["ingest"], tracker).await;
    assert_eq!(closed["statusCode"], 404, "no device secret key: {closed}");
    let device = invoke(
        &functions["ingest"],
        with_token(&post, "bin-other-9", "telemetry:write"),
    )
    .await;
    assert_eq!(
        device["statusCode"], 403,
        "a device token posts only its own vehicle: {device}"
    );
    let answer = invoke(
        &functions["ingest"],
        with_token(&post, "depot-1", "telemetry:write:any"),
    )
    .await;
    assert_eq!(answer["statusCode"], 202, "{answer}");

    // The stream functions: every record of the stream as the KinesisEvent Lambda would send.
    let events = read_stream(&harness.kinesis, &names.telemetry_stream).await;
    let records: usize = events.iter().map(|e| e.records.len()).sum();
    assert_eq!(records, 2, "one record per device per request");
    for event in &events {
        for function in ["geo-update", "archiver", "anomaly-inspector"] {
            let answer = invoke(&functions[function], serde_json::to_value(event).unwrap()).await;
            assert_eq!(
                answer,
                json!({"batchItemFailures": []}),
                "{function} answered {answer}"
            );
        }
    }
    let transitions = read_stream(&harness.kinesis, &names.alerts_stream).await;
    assert_eq!(
        transitions.iter().map(|e| e.records.len()).sum::<usize>(),
        1,
        "one raise published to the alerts stream"
    );

    // query-api reads back what the stream functions wrote.
    let position = get(&functions["query-api"], "/v1/vehicles/bin-hot-1", &[]).await;
    assert_eq!(position["lat"], 52.521, "{position}");
    let alerts = get(
        &functions["query-api"],
        "/v1/alerts",
        &[("state", "active".into())],
    )
    .await;
    assert_eq!(alerts["count"], 1, "{alerts}");
    assert_eq!(alerts["alerts"][0]["device_id"], "bin-hot-1");
    let track = get(
        &functions["query-api"],
        "/v1/vehicles/bin-hot-1/track",
        &[
            ("from", (t0 - 1000).to_string()),
            ("to", (t0 + 2000).to_string()),
        ],
    )
    .await;
    let ids: Vec<&Value> = track["readings"]
        .as_array()
        .map(|readings| readings.iter().map(|r| &r["event_id"]).collect())
        .unwrap_or_default();
    assert_eq!(ids, [&json!("h0"), &json!("h1")], "{track}");

    // Metrics leave as Embedded Metric Format lines on stdout, named by the deployed function.
    let geo_output = functions["geo-update"].output();
    assert!(
        geo_output.contains("\"PositionsUpdated\"")
            && geo_output.contains("\"FunctionName\":\"geostream-geo-update\""),
        "no EMF line from geo-update:\n{geo_output}"
    );
}

/// Fails before any AWS call: on one emulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_without_a_variable_it_reads_fails_at_init() {
    let Some(Emulator { endpoint, .. }) = Emulator::get(EmulatorKind::Moto) else {
        return;
    };
    let binaries = binaries();
    let names = ResourceNames::with_prefix("gs-bin-missing");
    let deployment = names.settings(ArchiveKind::S3, "http://127.0.0.1:1/queue/unused");
    let mut environment = lambda_environment("geo-update", &endpoint, &deployment);
    environment.remove("POSITIONS_TABLE");
    let mut process = FunctionProcess::spawn(
        "geostream-geo-update",
        &binaries["geo-update"],
        &environment,
    )
    .await
    .unwrap();
    let error = process
        .wait_initialised(INIT_TIMEOUT)
        .await
        .expect_err("geo-update must not start without POSITIONS_TABLE");
    assert!(
        error.contains(
            "environment variable POSITIONS_TABLE is not set: the DynamoDB table of latest positions"
        ),
        "{error}"
    );
}

/// A token signed by the test key `test-key-1` with `claims` over an issuer, audience and
/// lifetime that pass.
fn signed_token(issuer: &str, claims: Value) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut all = json!({"iss": issuer, "aud": "geostream", "iat": now, "exp": now + 600});
    for (name, value) in claims.as_object().unwrap() {
        all[name] = value.clone();
    }
    let keys = repository().join("shared/lambda/tests/fixtures/jwt");
    let pem = std::fs::read(keys.join("test-key-1.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("test-key-1".into());
    jsonwebtoken::encode(
        &header,
        &all,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// An issuer as an OpenID Connect provider publishes it: the discovery document and the
/// JWKS it names, each GET counted.
async fn serve_issuer(fetches: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let jwks = std::fs::read_to_string(
        repository().join("shared/lambda/tests/fixtures/jwt/test-key-1.jwks.json"),
    )
    .unwrap();
    let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/keys")}).to_string();
    let (seen_discovery, seen_jwks) = (fetches.clone(), fetches);
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(move || async move {
                seen_discovery.fetch_add(1, Ordering::SeqCst);
                discovery
            }),
        )
        .route(
            "/keys",
            axum::routing::get(move || async move {
                seen_jwks.fetch_add(1, Ordering::SeqCst);
                jwks
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    issuer
}

/// ingest = "function_url": no authorizer runs before ingest, which verifies the bearer token
/// itself, with the keys found through the issuer's discovery document, read once and kept.
/// The key the Function URL deployment derives its tracker apps' device secrets from.
const TRACKER_KEY: &str = "lambda-binaries-test-key-0123456789abcdef";

async fn ingest_behind_a_function_url_verifies_tokens_itself(emulator: Emulator) {
    let endpoint = emulator.endpoint;
    let binaries = binaries();
    let fetches = Arc::new(AtomicUsize::new(0));
    let issuer = serve_issuer(fetches.clone()).await;
    let (names, harness, queue_url) = resources_on_emulator(&endpoint, "gs-url").await;
    use geostream_aws::compose::settings;
    let deployment = names
        .settings(ArchiveKind::S3, &queue_url)
        .set(settings::AUTHORIZATION, "jwt_in_function")
        .set(settings::JWT_ISSUER, &issuer)
        .set(settings::JWT_AUDIENCES, "fleet-console, geostream")
        .set(settings::DEVICE_SECRET_KEY, TRACKER_KEY)
        .set(settings::REVOKED_DEVICES, "url-phone-9");
    let environment = lambda_environment("ingest", &endpoint, &deployment);
    let mut ingest = FunctionProcess::spawn("geostream-ingest", &binaries["ingest"], &environment)
        .await
        .unwrap();
    ingest
        .wait_initialised(INIT_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}"));

    let t0 = geostream_shared::now_millis() - 1_000;
    let body =
        json!([{"device_id": "url-truck-1", "ts": t0, "event_id": "u0", "lat": 52.5, "lon": 13.4}]);
    // As a Function URL sends it: the payload of an HTTP API, no authorizer, the header as sent.
    let post = |bearer: Option<String>| {
        let mut event =
            serde_json::to_value(request("POST", "/v1/telemetry", &[], Some(body.clone())))
                .unwrap();
        if let Some(token) = bearer {
            event["headers"] = json!({"authorization": format!("Bearer {token}")});
        }
        event
    };
    let status = |answer: &Value| answer["statusCode"].as_u64().unwrap_or_default();

    let answer = invoke(&ingest, post(None)).await;
    assert_eq!(status(&answer), 401, "no token: {answer}");
    // Claims put in the event by whoever invokes it directly count for nothing.
    let forged = with_token(
        &request("POST", "/v1/telemetry", &[], Some(body.clone())),
        "url-truck-1",
        "telemetry:write",
    );
    let answer = invoke(&ingest, forged).await;
    assert_eq!(status(&answer), 401, "claims without a token: {answer}");
    let expired = signed_token(
        &issuer,
        json!({"sub": "url-truck-1", "scope": "telemetry:write", "exp": jsonwebtoken::get_current_timestamp() - 60}),
    );
    let answer = invoke(&ingest, post(Some(expired))).await;
    assert_eq!(status(&answer), 401, "an expired token: {answer}");
    let other = signed_token(
        &issuer,
        json!({"sub": "url-truck-2", "scope": "telemetry:write"}),
    );
    let answer = invoke(&ingest, post(Some(other))).await;
    assert_eq!(status(&answer), 403, "another device's token: {answer}");
    for _ in 0..3 {
        let own = signed_token(
            &issuer,
            json!({"sub": "url-truck-1", "scope": "telemetry:write"}),
        );
        let answer = invoke(&ingest, post(Some(own))).await;
        assert_eq!(status(&answer), 202, "the device's own token: {answer}");
    }
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "the discovery document and the JWKS, each read once for every request of this environment"
    );

    // A phone running Traccar Client on the same URL: no token, its device's secret (derived
    // from DEVICE_SECRET_KEY) in the URL; a revoked one is refused.
    let secrets = DeviceSecrets::new(TRACKER_KEY.as_bytes(), []).unwrap();
    let osmand = |device: &str| {
        let mut event =
            serde_json::to_value(request("POST", "/v1/ingest/osmand", &[], None)).unwrap();
        // As a Function URL passes the query on (a secret is base64url: nothing to escape).
        event["rawQueryString"] = json!(format!(
            "id={device}&timestamp={}&lat=52.5&lon=13.4&secret={}",
            t0 / 1000,
            secrets.issue(device)
        ));
        event
    };
    let answer = invoke(&ingest, osmand("url-phone-1")).await;
    assert_eq!(
        status(&answer),
        200,
        "a tracker app's device secret: {answer}"
    );
    let answer = invoke(&ingest, osmand("url-phone-9")).await;
    assert_eq!(status(&answer), 403, "a revoked device: {answer}");

    let records: usize = read_stream(&harness.kinesis, &names.telemetry_stream)
        .await
        .iter()
        .map(|e| e.records.len())
        .sum();
    assert_eq!(
        records, 4,
        "the three accepted posts and the phone's, and nothing else"
    );
}
