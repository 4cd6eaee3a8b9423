//! 20,000 readings through the real `geostream-local` on the AWS backend while a tenth of its
//! AWS calls fail (every kind of fault of `fault_proxy`, in turn) and the runner is killed with
//! SIGKILL and restarted twice mid-stream. The run must end where an uninterrupted one ends:
//! every reading archived (by event id), every position the vehicle's newest reading, and the
//! alerts (records and published transitions, with their counts, peaks and times) those of
//! the rules evaluated over each vehicle's readings in order, with nothing dead-lettered.
//! scripts/test starts moto and sets GEOSTREAM_AWS_ENDPOINT; GEOSTREAM_CHAOS_READINGS sets
//! the size (default 20,000; scripts/test runs 4,000 to keep the suite's time, and the 20,000
//! run's figures are in docs/operations.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::{Duration, Instant};

use common::Runner;
use geostream_aws::compose::Composition;
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::manifest;
use geostream_aws::provision::{queue_url, ArchiveKind, ResourceNames};
use geostream_local::fault_proxy::{FaultPlan, FaultProxy};
use geostream_shared::model::{Alert, AlertTransition, Reading};
use geostream_shared::ports::AlertFilter;
use geostream_shared::rules::{DeviceRuleStates, RuleSet};
use serde_json::{json, Value};

const DEVICES: usize = 100;
/// Readings per POST: one round of half the fleet.
const PER_POST: usize = 50;
const FAULT_RATE: f64 = 0.1;

fn readings_wanted() -> usize {
    std::env::var("GEOSTREAM_CHAOS_READINGS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000)
}

/// Vehicle `device`'s reading of round `round`: moving, and overheating for 20 rounds in
/// every 80 (a raise and a clear each time), at a temperature that varies within the episode.
fn reading(t0: i64, device: usize, round: usize) -> Reading {
    let overheating = (round / 20 + device) % 4 == 0;
    Reading {
        device_id: format!("chaos-{device:03}"),
        ts: t0 + round as i64 * 1_000,
        event_id: format!("chaos-{device:03}-{round:05}"),
        lat: Some(52.3 + device as f64 * 0.001 + round as f64 * 1e-5),
        lon: Some(13.3 + round as f64 * 1e-5),
        speed_kmh: Some((round % 90) as f64),
        engine_temp_c: Some(if overheating {
            101.0 + (round % 7) as f64
        } else {
            90.0 + (round % 3) as f64
        }),
        ..Default::default()
    }
}

fn body(readings: &[Reading]) -> Value {
    Value::Array(
        readings
            .iter()
            .map(|r| {
                json!({"device_id": r.device_id, "ts": r.ts, "event_id": r.event_id,
                    "lat": r.lat, "lon": r.lon, "speed_kmh": r.speed_kmh,
                    "engine_temp_c": r.engine_temp_c})
            })
            .collect(),
    )
}

/// Posts until the runner answers 202: a request it failed (503, a dropped connection while it
/// was killed) is sent again whole, as the API tells clients to; event ids make that harmless.
async fn post_until_accepted(http: &reqwest::Client, base: &str, body: &Value) -> usize {
    let mut tries = 0;
    loop {
        tries += 1;
        let answer = http
            .post(format!("{base}/v1/telemetry"))
            .json(body)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().as_u16() == 202 => return tries,
            Ok(answer) if answer.status().is_client_error() => {
                panic!("a valid request was refused: {:?}", answer.text().await)
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        assert!(tries < 100, "the runner never took a request");
    }
}

/// The published transitions, by transition id (consumers deduplicate on it).
async fn published_transitions(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> BTreeMap<String, AlertTransition> {
    let shards = kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap();
    let mut transitions = BTreeMap::new();
    for shard in shards.shards() {
        let mut iterator = kinesis
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator
            .unwrap();
        loop {
            let output = kinesis
                .get_records()
                .shard_iterator(&iterator)
                .limit(10_000)
                .send()
                .await
                .unwrap();
            for record in output.records() {
                let transition: AlertTransition =
                    serde_json::from_slice(record.data().as_ref()).unwrap();
                transitions.insert(transition.transition_id.clone(), transition);
            }
            match output.next_shard_iterator {
                Some(next) if !output.records.is_empty() => iterator = next,
                _ => break,
            }
        }
    }
    transitions
}

/// Every archived reading's event id, with how many rows carry it.
async fn archived(s3: &aws_sdk_s3::Client, bucket: &str) -> BTreeMap<String, usize> {
    let mut rows = BTreeMap::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix("readings/")
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        for object in page.contents() {
            let body = s3
                .get_object()
                .bucket(bucket)
                .key(object.key().unwrap())
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes();
            let mut text = String::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .unwrap();
            for line in text.lines() {
                let reading: Reading = serde_json::from_str(line).unwrap();
                *rows.entry(reading.event_id).or_default() += 1;
            }
        }
        match page.next_continuation_token {
            Some(next) => token = Some(next),
            None => return rows,
        }
    }
}

/// What the alert records should be: the rules over each vehicle's readings in order.
fn expected_alerts(
    by_device: &BTreeMap<String, Vec<Reading>>,
) -> (BTreeMap<String, Alert>, BTreeMap<String, AlertTransition>) {
    let rules = RuleSet::default_rules();
    let mut alerts = BTreeMap::new();
    let mut transitions = BTreeMap::new();
    for (device, readings) in by_device {
        let evaluation = rules.evaluate(device, &mut DeviceRuleStates::default(), readings);
        for alert in evaluation.touched_alerts {
            alerts.insert(alert.alert_id.clone(), alert);
        }
        for transition in evaluation.transitions {
            transitions.insert(transition.transition_id.clone(), transition);
        }
    }
    (alerts, transitions)
}

async fn dead_letter_count(sqs: &aws_sdk_sqs::Client, queue: &str) -> usize {
    let letters = sqs
        .get_queue_attributes()
        .queue_url(queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .unwrap();
    letters
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The alerts that differ, expected then stored, one per line.
fn alert_differences(
    expected: &BTreeMap<String, Alert>,
    stored: &BTreeMap<String, Alert>,
) -> String {
    let ids: BTreeSet<&String> = expected.keys().chain(stored.keys()).collect();
    ids.into_iter()
        .filter(|id| expected.get(*id) != stored.get(*id))
        .map(|id| {
            format!(
                "\n  {id}:\n    expected {:?}\n    stored   {:?}",
                expected.get(id),
                stored.get(id)
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_two_crashes_end_where_an_uninterrupted_run_ends() {
    let emulator = match std::env::var("GEOSTREAM_AWS_ENDPOINT") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var_os("GEOSTREAM_REQUIRE_EMULATOR").is_some() => {
            panic!("GEOSTREAM_AWS_ENDPOINT is not set but GEOSTREAM_REQUIRE_EMULATOR is")
        }
        _ => {
            eprintln!("SKIPPED: the chaos test needs GEOSTREAM_AWS_ENDPOINT (scripts/test)");
            return;
        }
    };
    let started = Instant::now();
    let rounds = readings_wanted().div_ceil(DEVICES);
    let t0 = geostream_shared::now_millis() - 6 * 3_600_000;
    let readings: Vec<Reading> = (0..rounds)
        .flat_map(|round| (0..DEVICES).map(move |device| reading(t0, device, round)))
        .collect();
    let proxy = FaultProxy::start(
        &emulator,
        FaultPlan {
            hold: Duration::from_secs(3),
            ..FaultPlan::every_kind(FAULT_RATE)
        },
    )
    .await
    .unwrap();
    let prefix = format!("chaos-{}", std::process::id());
    // GeoStream's own 2 s per try, as on AWS (a held answer is given up on before the proxy
    // drops it), unless GEOSTREAM_CHAOS_ATTEMPT_TIMEOUT_MS says otherwise: the test command
    // shares moto with the other tests, and moto then takes seconds for a write.
    let attempt_timeout =
        std::env::var("GEOSTREAM_CHAOS_ATTEMPT_TIMEOUT_MS").unwrap_or_else(|_| "2000".into());
    let attempt_timeout = attempt_timeout.as_str();
    let start = |create: bool| {
        let mut args = vec![
            "--backend",
            "aws",
            "--endpoint-url",
            proxy.url.as_str(),
            "--resource-prefix",
            prefix.as_str(),
            "--archive",
            "s3",
            "--shards",
            "2",
        ];
        if create {
            args.push("--create-resources");
        }
        async move {
            Runner::start(
                env!("CARGO_BIN_EXE_geostream-local"),
                &args,
                &[("GEOSTREAM_AWS_ATTEMPT_TIMEOUT_MS", attempt_timeout)],
            )
            .await
        }
    };
    let http = reqwest::Client::new();
    let mut runner = start(true).await;
    let posts: Vec<&[Reading]> = readings.chunks(PER_POST).collect();
    let crashes = [posts.len() / 3, 2 * posts.len() / 3];
    let mut tries = 0;
    for (index, chunk) in posts.iter().enumerate() {
        if crashes.contains(&index) {
            runner.kill();
            runner = start(false).await;
        }
        tries += post_until_accepted(&http, &runner.base, &body(chunk)).await;
    }
    let posted_in = started.elapsed();

    // The stores, read straight from the emulator.
    let names = ResourceNames::with_prefix(&prefix);
    let clients = Clients::new(&sdk_config(Some(&emulator)).await);
    let dead_letter_queue = queue_url(&clients, &names.dead_letter_queue).await.unwrap();
    let query = manifest::function("query-api").unwrap();
    let reader = Composition::new(
        query.name,
        query.ports,
        Box::new(names.settings(ArchiveKind::S3, &dead_letter_queue)),
        Clients::new(&sdk_config(Some(&emulator)).await),
    );
    let positions = reader.positions().await.unwrap();
    let alerts = reader.alert_records().unwrap();

    let mut by_device: BTreeMap<String, Vec<Reading>> = BTreeMap::new();
    for reading in &readings {
        by_device
            .entry(reading.device_id.clone())
            .or_default()
            .push(reading.clone());
    }
    let (expected_alerts, expected_transitions) = expected_alerts(&by_device);

    // Caught up once every vehicle is at its newest reading and every alert is as expected.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut stored_alerts = BTreeMap::new();
    // Alerts that stay the same for a minute once every position is current will not change.
    let mut settled_since: Option<(Instant, BTreeMap<String, Alert>)> = None;
    loop {
        let mut behind = 0;
        for (device, readings) in &by_device {
            let newest = readings.last().unwrap();
            let position = positions.get(device).await.unwrap();
            if position.as_ref().map(|p| (p.ts, p.event_id.as_str()))
                != Some((newest.ts, newest.event_id.as_str()))
            {
                behind += 1;
            }
        }
        if behind == 0 {
            stored_alerts = alerts
                .list_alerts(&AlertFilter {
                    limit: 100_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|a| (a.alert_id.clone(), a))
                .collect();
            if stored_alerts == expected_alerts {
                break;
            }
            match &settled_since {
                Some((since, seen)) if *seen == stored_alerts => {
                    if since.elapsed() > Duration::from_secs(60) {
                        let archive = archived(&clients.s3, &names.archive_bucket).await;
                        let mut states = String::new();
                        for alert in expected_alerts
                            .values()
                            .filter(|a| stored_alerts.get(&a.alert_id) != Some(a))
                        {
                            let device = &alert.device_id;
                            let missing: Vec<&String> = by_device[device]
                                .iter()
                                .map(|r| &r.event_id)
                                .filter(|id| !archive.contains_key(*id))
                                .collect();
                            states.push_str(&format!(
                                "\n  {device}: not archived {missing:?}; rule state {:?}",
                                alerts.load_rule_states(device).await
                            ));
                        }
                        panic!(
                            "alerts settled unlike an uninterrupted run ({} dead letters): {}{states}",
                            dead_letter_count(&clients.sqs, &dead_letter_queue).await,
                            alert_differences(&expected_alerts, &stored_alerts)
                        );
                    }
                }
                _ => settled_since = Some((Instant::now(), stored_alerts.clone())),
            }
        }
        assert!(
            Instant::now() < deadline,
            "not caught up in 15 minutes: {behind} vehicles behind, {} of {} alerts as expected",
            stored_alerts
                .iter()
                .filter(|(id, a)| expected_alerts.get(*id) == Some(a))
                .count(),
            expected_alerts.len()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let caught_up_in = started.elapsed();
    // The archiver batches for 5 s: give its last batch time, then read the archive.
    let mut rows = BTreeMap::new();
    let wanted: BTreeSet<&String> = readings.iter().map(|r| &r.event_id).collect();
    while Instant::now() < deadline {
        rows = archived(&clients.s3, &names.archive_bucket).await;
        if rows.keys().collect::<BTreeSet<_>>() == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let published = published_transitions(&clients.kinesis, &names.alerts_stream).await;
    let dead_letters = dead_letter_count(&clients.sqs, &dead_letter_queue).await;
    let stats = proxy.stats();
    let mut by_fault: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, fault), count) in stats.injected() {
        *by_fault.entry(format!("{fault:?}")).or_default() += count;
    }
    let duplicate_rows: usize = rows.values().map(|n| n - 1).sum();
    println!(
        "chaos run: {} readings in {} POSTs ({tries} tries) from {} vehicles, runner killed and restarted {} times; \
         {} AWS calls forwarded, {} faults injected ({:?}); posted in {:.0} s, caught up after {:.0} s; \
         archive: {} of {} event ids ({duplicate_rows} duplicate rows); positions: {} vehicles at their newest reading; \
         alerts: {} records and {} transitions as an uninterrupted run; dead letters: {dead_letters}",
        readings.len(),
        posts.len(),
        DEVICES,
        crashes.len(),
        stats.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        stats.total_injected(),
        by_fault,
        posted_in.as_secs_f64(),
        caught_up_in.as_secs_f64(),
        rows.len(),
        wanted.len(),
        by_device.len(),
        stored_alerts.len(),
        published.len(),
    );
    assert_eq!(
        rows.keys().collect::<BTreeSet<_>>(),
        wanted,
        "every reading archived"
    );
    assert_eq!(published, expected_transitions, "the published transitions");
    assert_eq!(dead_letters, 0, "nothing given up on");
    assert!(
        stats.total_injected() as f64
            > 0.05 * stats.forwarded.load(std::sync::atomic::Ordering::Relaxed) as f64
    );
    for fault in geostream_local::fault_proxy::Fault::ALL {
        assert!(
            by_fault.contains_key(&format!("{fault:?}")),
            "{fault:?} was injected"
        );
    }
}
