//! A Lambda Runtime API server and the function processes that poll it: what the Lambda
//! service does around a `bootstrap` binary, so that the real binaries (not only their handler
//! libraries) run under test.
//!
//! Implements the Runtime API routes a custom runtime uses
//! (<https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>):
//! `GET /2018-06-01/runtime/invocation/next`, `POST .../invocation/{id}/response`,
//! `POST .../invocation/{id}/error` and `POST /2018-06-01/runtime/init/error`. One server per
//! function process, on a port this process holds from bind to end (no free-port race).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

/// What a function answered to one invocation.
pub type Answer = Result<Value, String>;

struct Invocation {
    request_id: String,
    event: Value,
    answer: oneshot::Sender<Answer>,
}

struct Shared {
    queue: AsyncMutex<mpsc::Receiver<Invocation>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    /// When the function first asked for an invocation: the end of its init phase.
    first_poll: Mutex<Option<Instant>>,
    init_error: Mutex<Option<String>>,
}

/// The Runtime API of one function.
pub struct RuntimeApi {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    invocations: mpsc::Sender<Invocation>,
    server: tokio::task::JoinHandle<()>,
    next_id: std::sync::atomic::AtomicU64,
}

impl RuntimeApi {
    pub async fn start() -> std::io::Result<RuntimeApi> {
        let (invocations, queue) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            queue: AsyncMutex::new(queue),
            waiting: Mutex::new(HashMap::new()),
            first_poll: Mutex::new(None),
            init_error: Mutex::new(None),
        });
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(RuntimeApi {
            addr,
            shared,
            invocations,
            server,
            next_id: Default::default(),
        })
    }

    /// Hands the function one event and waits for its answer, at most `timeout`.
    pub async fn invoke(&self, event: Value, timeout: Duration) -> Answer {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        let invocation = Invocation {
            request_id: format!("req-{n}"),
            event,
            answer,
        };
        self.invocations
            .send(invocation)
            .await
            .map_err(|_| "the runtime API is closed".to_string())?;
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the invocation was dropped".into()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    fn first_poll(&self) -> Option<Instant> {
        *self
            .shared
            .first_poll
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn init_error(&self) -> Option<String> {
        self.shared
            .init_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn next(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared
        .first_poll
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Instant::now);
    let Some(invocation) = shared.queue.lock().await.recv().await else {
        return (StatusCode::GONE, HeaderMap::new(), String::new());
    };
    let deadline = deadline_ms();
    let mut headers = HeaderMap::new();
    let mut header = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    header(
        "lambda-runtime-aws-request-id",
        invocation.request_id.clone(),
    );
    header("lambda-runtime-deadline-ms", deadline.to_string());
    header(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:000000000000:function:under-test".into(),
    );
    header(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000;Sampled=0".into(),
    );
    shared
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(invocation.request_id, invocation.answer);
    (StatusCode::OK, headers, invocation.event.to_string())
}

/// Lambda's default function timeout from now, as the deadline header carries it.
fn deadline_ms() -> u128 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now + Duration::from_secs(30)).as_millis()
}

fn answer(shared: &Shared, id: &str, answer: Answer) -> StatusCode {
    let waiting = shared
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(id);
    match waiting {
        Some(sender) => {
            let _ = sender.send(answer);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    let parsed = serde_json::from_slice(&body)
        .map_err(|e| format!("the response is not JSON ({e}): {body:?}"));
    answer(&shared, &id, parsed)
}

async fn error(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    answer(
        &shared,
        &id,
        Err(format!(
            "invocation error: {}",
            String::from_utf8_lossy(&body)
        )),
    )
}

async fn init_error(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    *shared.init_error.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}

/// A function's `bootstrap` binary running against its own Runtime API, with its output kept.
pub struct FunctionProcess {
    pub name: String,
    pub api: RuntimeApi,
    child: Child,
    output: Arc<Mutex<String>>,
    started: Instant,
}

impl FunctionProcess {
    /// Starts `binary` with exactly `environment` plus what the Lambda service sets
    /// (`AWS_LAMBDA_RUNTIME_API`, function name, memory, version, log names).
    pub async fn spawn(
        name: &str,
        binary: &Path,
        environment: &BTreeMap<String, String>,
    ) -> Result<FunctionProcess, String> {
        let api = RuntimeApi::start()
            .await
            .map_err(|e| format!("runtime API: {e}"))?;
        let mut command = Command::new(binary);
        command
            .env_clear()
            .envs(environment)
            .env("AWS_LAMBDA_RUNTIME_API", api.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "under-test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || drain(pipe, &output));
        }
        Ok(FunctionProcess {
            name: name.to_string(),
            api,
            child,
            output,
            started,
        })
    }

    /// Waits for the end of init (the first poll for an invocation), at most `timeout`, and
    /// answers how long init took. An init error or an exit before polling is an error with
    /// what the function printed.
    pub async fn wait_initialised(&mut self, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(error) = self.api.init_error() {
                return Err(format!(
                    "{}: init error {error}\n{}",
                    self.name,
                    self.output()
                ));
            }
            if let Some(polled) = self.api.first_poll() {
                return Ok(polled.duration_since(self.started));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the pipe threads take the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(format!(
                    "{} exited during init ({status}):\n{}",
                    self.name,
                    self.output()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not finish init within {timeout:?}:\n{}",
                    self.name,
                    self.output()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Everything the function printed so far (its JSON logs and metric lines).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for FunctionProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(mut pipe: Box<dyn Read + Send>, output: &Mutex<String>) {
    let mut buffer = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buffer) {
        if n == 0 {
            break;
        }
        output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
}

/// Builds the function binaries for the host (a debug build: what the test needs is the real
/// `main`, not its speed) and answers each one's path by package name. Built here, not taken
/// from `target/`, so the test can never run a stale binary.
pub fn build_function_binaries(packages: &[&str]) -> Result<BTreeMap<String, PathBuf>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--locked", "--bins", "--message-format=json"]);
    for package in packages {
        command.args(["-p", package]);
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo build failed ({})", output.status));
    }
    let mut binaries = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.insert(name.to_string(), PathBuf::from(executable));
        }
    }
    Ok(binaries)
}
