//! One device floods at 50 times its usual rate while 40 others report as usual: the flooder
//! is answered 429 with Retry-After past its allowance, and the others see no error. The
//! runner is the real `geostream-local` with `--device-rate 2 --device-burst 20` and token
//! verification (device tokens signed by the test key), as a deployment runs.
//!
//! The latencies are printed, not asserted (speed is measured by benches, not timed tests):
//! the figures in the README come from this test's output.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::tokens::{device_token, now, runner_arguments};
use common::Runner;
use hdrhistogram::Histogram;
use serde_json::json;

const NORMAL_DEVICES: usize = 40;
const USUAL_INTERVAL: Duration = Duration::from_millis(1000);
const FLOOD_INTERVAL: Duration = Duration::from_millis(20);
const PHASE: Duration = Duration::from_secs(8);
const RATE_PER_SECOND: f64 = 2.0;
const BURST: u64 = 20;

/// What a set of devices saw.
struct Seen {
    latency_us: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    /// 429s without a Retry-After of 1 s or more.
    bad_retry_after: u64,
    /// From the first request sent to the last answer: the runner saw the requests within it.
    span: Option<(Instant, Instant)>,
}

impl Seen {
    fn new() -> Self {
        Seen {
            latency_us: Histogram::new(3).unwrap(),
            statuses: BTreeMap::new(),
            bad_retry_after: 0,
            span: None,
        }
    }

    fn merge(&mut self, other: Seen) {
        self.latency_us.add(other.latency_us).unwrap();
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.bad_retry_after += other.bad_retry_after;
        self.span = match (self.span, other.span) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (one, other) => one.or(other),
        };
    }

    fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or_default()
    }

    fn requests(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn describe(&self) -> String {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "{} requests, statuses {:?}, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            self.requests(),
            self.statuses,
            ms(0.5),
            ms(0.99),
            self.latency_us.max() as f64 / 1000.0
        )
    }
}

/// `device` posts one reading per `interval` until `until`, after waiting `offset`.
async fn report(
    http: reqwest::Client,
    base: String,
    device: String,
    interval: Duration,
    offset: Duration,
    until: Instant,
) -> Seen {
    let token = device_token(&device);
    let mut seen = Seen::new();
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        ticker.tick().await;
        if Instant::now() >= until {
            break;
        }
        let reading = json!({"device_id": device, "event_id": format!("{device}-{n}"),
            "ts": now() * 1000, "lat": 52.5, "lon": 13.4, "speed_kmh": 40.0});
        let started = Instant::now();
        let response = http
            .post(format!("{base}/v1/telemetry"))
            .bearer_auth(&token)
            .json(&json!([reading]))
            .send()
            .await
            .expect("the runner answers");
        let elapsed = started.elapsed();
        let first_sent = seen.span.map_or(started, |(first, _)| first);
        seen.span = Some((first_sent, Instant::now()));
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        seen.latency_us.record(elapsed.as_micros() as u64).unwrap();
        *seen.statuses.entry(status).or_default() += 1;
        if status == 429 && retry_after.is_none_or(|s| s < 1) {
            seen.bad_retry_after += 1;
        }
    }
    seen
}

/// The usual devices, reporting once per `USUAL_INTERVAL` each, spread over it, for `PHASE`.
async fn usual_devices(http: &reqwest::Client, base: &str) -> Seen {
    let until = Instant::now() + PHASE;
    let tasks: Vec<_> = (0..NORMAL_DEVICES)
        .map(|i| {
            let offset = USUAL_INTERVAL * i as u32 / NORMAL_DEVICES as u32;
            tokio::spawn(report(
                http.clone(),
                base.to_string(),
                format!("usual-{i}"),
                USUAL_INTERVAL,
                offset,
                until,
            ))
        })
        .collect();
    let mut all = Seen::new();
    for task in tasks {
        all.merge(task.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_answered_429_and_the_others_see_no_difference() {
    let mut args = runner_arguments();
    args.extend(["--device-rate", "2", "--device-burst", "20"].map(str::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let runner = Runner::start(env!("CARGO_BIN_EXE_geostream-local"), &args, &[]).await;
    let http = reqwest::Client::new();

    let quiet = usual_devices(&http, &runner.base).await;
    let flood = tokio::spawn(report(
        http.clone(),
        runner.base.clone(),
        "wild-1".into(),
        FLOOD_INTERVAL,
        Duration::ZERO,
        Instant::now() + PHASE,
    ));
    let during_flood = usual_devices(&http, &runner.base).await;
    let flooder = flood.await.unwrap();

    eprintln!("usual devices, alone:        {}", quiet.describe());
    eprintln!("usual devices, during flood: {}", during_flood.describe());
    eprintln!("flooding device (50x):       {}", flooder.describe());

    for (phase, seen) in [("alone", &quiet), ("during the flood", &during_flood)] {
        assert_eq!(
            seen.count(202),
            seen.requests(),
            "every usual request is accepted {phase}: {:?}",
            seen.statuses
        );
    }
    // Its burst and its rate over the time its requests took (one more for the tick at the
    // edge); measured, not the phase's nominal length: on a loaded machine the last request
    // may reach the runner well after the phase ends.
    let span = flooder
        .span
        .map_or(PHASE, |(first, last)| last.duration_since(first));
    let allowance = BURST + (RATE_PER_SECOND * span.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        flooder.count(202) <= allowance,
        "the flooder got {} accepted, more than its allowance of {allowance}",
        flooder.count(202)
    );
    assert_eq!(
        flooder.count(202) + flooder.count(429),
        flooder.requests(),
        "the flooder sees only 202 and 429: {:?}",
        flooder.statuses
    );
    // How many it sent depends on the machine's speed; with the two checks above, all past
    // its allowance were refused.
    assert!(
        flooder.count(429) > 0,
        "the flood was refused: {:?}",
        flooder.statuses
    );
    assert_eq!(flooder.bad_retry_after, 0, "every 429 says when to retry");
}
