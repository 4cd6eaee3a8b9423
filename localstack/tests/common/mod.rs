//! What the runner tests share: the real `geostream-local` as a child process. (Each test
//! crate uses part of it.)
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `geostream-local` child process; killed (SIGKILL) when dropped, frozen or not.
pub struct Runner {
    child: Child,
    pub base: String,
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Runner {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -s {signal} failed: {status}");
    }

    /// SIGSTOP, then waits until every thread of the runner is stopped (`kill` returns once
    /// the signal is sent, not once it has taken effect): from then on it sends nothing.
    pub async fn freeze(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states: Vec<char> = std::fs::read_dir(&tasks)
                .expect("the runner's threads are listed in /proc")
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
                // The state follows the command name, which is in parentheses.
                .filter_map(|stat| stat[stat.rfind(')')? + 1..].trim_start().chars().next())
                .collect();
            if !states.is_empty() && states.iter().all(|state| *state == 'T') {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the runner did not stop on SIGSTOP: thread states {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Runner {
    /// Starts `binary` (geostream-local) with `args` on port 0 and learns its address from the
    /// first line of its stdout, `listening on http://ADDR`, printed once it serves: no port is
    /// chosen beforehand, so none can be taken by someone else in between.
    pub async fn start(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Runner {
        let mut command = Command::new(binary);
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        for (name, value) in [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ] {
            if std::env::var_os(name).is_none() {
                command.env(name, value);
            }
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("geostream-local starts");
        let stdout = child.stdout.take().unwrap();
        let (first_line, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            // Nothing is sent at end of file: the runner exited before serving.
            if stdout.read_line(&mut line).is_ok_and(|n| n > 0) {
                let _ = first_line.send(line);
            }
            // Keep the pipe drained so that the runner never blocks on stdout.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let line = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap();
        let mut runner = Runner {
            child,
            base: String::new(),
        };
        match line {
            Ok(line) => match line.trim_end().strip_prefix("listening on ") {
                Some(base) => runner.base = base.to_string(),
                None => panic!("geostream-local's first line is not its address: {line:?}"),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "geostream-local exited ({:?}) before serving",
                runner.child.wait()
            ),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("geostream-local did not serve in 60 s"),
        }
        runner
    }
}

/// Tokens signed by the test keys in shared/lambda/tests/fixtures/jwt, for a runner started
/// with `--jwks` on their JWKS, `--jwt-issuer ISSUER` and `--jwt-audience AUDIENCE`.
pub mod tokens {
    use std::path::PathBuf;

    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};

    pub const ISSUER: &str = "https://auth.fleet.example";
    pub const AUDIENCE: &str = "geostream";

    pub fn key_file(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/lambda/tests/fixtures/jwt")
            .join(name)
    }

    pub fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    /// A token signed by the test key `key`, naming `kid`, with `claims` over sound defaults.
    pub fn token(key: &str, kid: &str, claims: Value) -> String {
        let mut all = json!({"iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600});
        for (name, value) in claims.as_object().unwrap() {
            all[name] = value.clone();
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        let pem = std::fs::read(key_file(&format!("{key}.pem"))).unwrap();
        jsonwebtoken::encode(&header, &all, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
    }

    /// A device token of `device` (scope telemetry:write) from the first test key.
    pub fn device_token(device: &str) -> String {
        token(
            "test-key-1",
            "test-key-1",
            json!({"sub": device, "scope": "telemetry:write"}),
        )
    }

    /// The runner's arguments that verify these tokens.
    pub fn runner_arguments() -> Vec<String> {
        let jwks = key_file("test-key-1.jwks.json");
        [
            "--jwks",
            jwks.to_str().unwrap(),
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
        ]
        .map(str::to_string)
        .to_vec()
    }
}

/// An AWS-API emulator's endpoint from `variable` (GEOSTREAM_AWS_ENDPOINT for moto,
/// GEOSTREAM_LOCALSTACK_ENDPOINT for LocalStack), or `None` with a loud note; under
/// `scripts/test` (GEOSTREAM_REQUIRE_EMULATOR=1) a missing one is a failure.
pub fn emulator(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(endpoint) if !endpoint.is_empty() => Some(endpoint),
        _ if std::env::var_os("GEOSTREAM_REQUIRE_EMULATOR").is_some() => {
            panic!("{variable} is not set but GEOSTREAM_REQUIRE_EMULATOR is: run the test through scripts/test")
        }
        _ => {
            eprintln!("SKIPPED: this test needs {variable} (scripts/test starts the emulators and sets it)");
            None
        }
    }
}
