//! The Valkey position store against a real Redis 7 server (`scripts/redis`, started by
//! `scripts/test`): never back in time, replays change nothing, and radius queries equal a
//! brute-force scan at every radius the API accepts, with the round trips each query took.

use futures::stream::{self, StreamExt};
use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::dynamodb::DynamoAlerts;
use geostream_aws::provision::{create_resources, ResourceNames};
use geostream_aws::valkey::{ValkeyPositions, ValkeyStateAlerts};
use geostream_e2e::fleet::{fleet, position, METRO, RADII_M};
use geostream_e2e::harness::{valkey, Emulator};
use geostream_e2e::on_each_emulator;
use geostream_shared::geo::haversine_m;
use geostream_shared::model::{Alert, AlertState, GeoPoint, Severity};
use geostream_shared::ports::{
    nearest, AlertChanges, AlertStore, ErrorKind, PositionStore, UpsertOutcome,
};
use geostream_shared::rules::{DeviceRuleStates, Phase, RuleState, Watermark};

/// A fresh key prefix per test run, so runs never see each other's keys.
fn prefix(test: &str) -> String {
    format!("{test}-{}", geostream_shared::now_millis())
}

on_each_emulator!(alert_changes_follow_the_committed_rule_state_only);

#[tokio::test]
async fn positions_never_go_back_in_time_and_replays_change_nothing() {
    let Some(url) = valkey() else { return };
    let store = ValkeyPositions::connect(&url, prefix("order"))
        .await
        .unwrap();
    let first = position("truck-1", 10_000, "e-b", 48.137, 11.575);
    assert_eq!(
        store.upsert_if_newer(first.clone()).await.unwrap(),
        UpsertOutcome::Applied
    );
    // The same reading again (a replay), an earlier one, and the same time with a lower id.
    for stale in [
        first.clone(),
        position("truck-1", 9_000, "e-z", 52.52, 13.40),
        position("truck-1", 10_000, "e-a", 52.52, 13.40),
    ] {
        assert_eq!(
            store.upsert_if_newer(stale).await.unwrap(),
            UpsertOutcome::Stale
        );
    }
    assert_eq!(store.get("truck-1").await.unwrap(), Some(first.clone()));
    let munich = first.point();
    assert_eq!(store.near(munich, 100.0, 10).await.unwrap().len(), 1);

    // A later reading moves it, in the hash and in the geo set together.
    let moved = position("truck-1", 10_000, "e-c", 52.52, 13.40);
    assert_eq!(
        store.upsert_if_newer(moved.clone()).await.unwrap(),
        UpsertOutcome::Applied
    );
    assert_eq!(store.get("truck-1").await.unwrap(), Some(moved.clone()));
    assert!(store.near(munich, 1_000.0, 10).await.unwrap().is_empty());
    let near_berlin = store.near(moved.point(), 10.0, 10).await.unwrap();
    assert_eq!(near_berlin.len(), 1);
    assert_eq!(near_berlin[0].position, moved);
    assert_eq!(store.get("nobody").await.unwrap(), None);
}

#[tokio::test]
async fn a_vehicle_beyond_the_geo_sets_latitudes_is_kept_and_found() {
    let Some(url) = valkey() else { return };
    let store = ValkeyPositions::connect(&url, prefix("polar"))
        .await
        .unwrap();
    let polar = position("icebreaker", 1_000, "e1", 89.5, 10.0);
    let alert = position("alert-station", 1_000, "e1", 82.5, -62.3);
    for p in [polar.clone(), alert.clone()] {
        assert_eq!(
            store.upsert_if_newer(p).await.unwrap(),
            UpsertOutcome::Applied
        );
    }
    let pole = GeoPoint {
        lat: 90.0,
        lon: 0.0,
    };
    let found = store.near(pole, 100_000.0, 10).await.unwrap();
    assert_eq!(
        found
            .iter()
            .map(|v| v.position.device_id.as_str())
            .collect::<Vec<_>>(),
        ["icebreaker"]
    );
    // Back below the limit, it is indexed again (and found from the pole only within range).
    let south = position("icebreaker", 2_000, "e2", 84.0, 10.0);
    store.upsert_if_newer(south.clone()).await.unwrap();
    let found = store.near(pole, 700_000.0, 10).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].position, south);
    let found = store.near(pole, 1_000_000.0, 10).await.unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
}

#[tokio::test]
async fn radius_queries_equal_a_brute_force_scan_at_every_radius() {
    let Some(url) = valkey() else { return };
    let store = ValkeyPositions::connect(&url, prefix("radius"))
        .await
        .unwrap();
    let vehicles = fleet();
    let applied: Vec<_> = stream::iter(vehicles.clone())
        .map(|p| {
            let store = store.clone();
            async move { store.upsert_if_newer(p).await.unwrap() }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(applied.iter().all(|o| *o == UpsertOutcome::Applied));

    let centers = [
        METRO,
        GeoPoint {
            lat: 48.2,
            lon: 11.6,
        },
        GeoPoint {
            lat: 47.0,
            lon: 9.5,
        },
    ];
    for center in centers {
        for radius_m in RADII_M {
            // Limits that cut the answer, and one the radius cuts instead.
            for limit in [1, 100, 1_000, 20_000] {
                let before = store.round_trips();
                let answer = store.near(center, radius_m, limit).await.unwrap();
                let round_trips = store.round_trips() - before;
                let expected = nearest(center, radius_m, limit, &vehicles);
                assert_eq!(
                    answer, expected,
                    "center {center:?}, radius {radius_m} m, limit {limit}"
                );
                for v in &answer {
                    assert!(haversine_m(center, v.position.point()) <= radius_m);
                }
                println!(
                    "near {center:?} radius {radius_m} m limit {limit}: {} vehicles, {round_trips} round trips",
                    answer.len()
                );
                // SMEMBERS, GEOSEARCH, one pipelined read of the candidates; a COUNT that cut
                // the candidates short asks again.
                if limit <= 100 {
                    assert!(round_trips <= 10, "{round_trips} round trips");
                }
            }
        }
    }
}

/// Rule state in Valkey: versioned like DynamoDB's (a commit from a stale version is a conflict,
/// which the inspector answers by reloading). Alert records are not touched when a commit has
/// none (they are DynamoDB's, tested with the emulator).
#[tokio::test]
async fn rule_state_commits_are_versioned() {
    let Some(url) = valkey() else { return };
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    // Never called: these commits touch no alert record.
    let records = DynamoAlerts::new(aws_sdk_dynamodb::Client::new(&sdk), "unused", "unused");
    let store = ValkeyStateAlerts::connect(&url, prefix("rules"), records)
        .await
        .unwrap();
    assert_eq!(
        store.load_rule_states("truck-9").await.unwrap(),
        DeviceRuleStates::default()
    );
    let mut states = DeviceRuleStates {
        version: 0,
        watermark: Some(Watermark {
            ts: 1_000,
            event_id: "e1".into(),
        }),
        ..Default::default()
    };
    std::sync::Arc::make_mut(&mut states.rules).insert(
        "engine_overheat".into(),
        RuleState {
            phase: Phase::Pending {
                since: 1_000,
                peak_value: 101.0,
                peak_score: 1.0,
                count: 1,
            },
            stats: None,
        },
    );
    store.commit("truck-9", 0, &states, &[]).await.unwrap();
    let loaded = store.load_rule_states("truck-9").await.unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.rules, states.rules);
    assert_eq!(loaded.watermark, states.watermark);
    // A second writer that loaded version 0 loses.
    let conflict = store.commit("truck-9", 0, &states, &[]).await.unwrap_err();
    assert_eq!(conflict.kind, ErrorKind::Conflict, "{conflict}");
    store.commit("truck-9", 1, &states, &[]).await.unwrap();
    assert_eq!(store.load_rule_states("truck-9").await.unwrap().version, 2);
}

fn overheat(count: u64, state: AlertState) -> Alert {
    Alert {
        alert_id: Alert::make_id("truck-5", "engine_overheat", 1_000),
        device_id: "truck-5".into(),
        rule: "engine_overheat".into(),
        severity: Severity::Critical,
        state,
        acknowledged: false,
        acknowledged_by: None,
        acknowledged_at: None,
        started_at: 1_000,
        cleared_at: (state == AlertState::Cleared).then_some(9_000),
        peak_value: 100.0 + count as f64,
        last_value: 100.0,
        count,
    }
}

fn touched(alert: &Alert) -> AlertChanges<'_> {
    AlertChanges {
        touched: std::slice::from_ref(alert),
        removed: &[],
    }
}

/// Rule state in Valkey and alert records in DynamoDB share no transaction: the alert changes
/// go out through an outbox in the state, so a discarded evaluation writes no alert, a writer
/// that stopped after its commit has its changes written by the next load, and an older
/// version's changes never undo a newer one's.
async fn alert_changes_follow_the_committed_rule_state_only(emulator: Emulator) {
    let Some(url) = valkey() else {
        return;
    };
    let sdk = sdk_config(Some(&emulator.endpoint)).await;
    let test = format!("outbox-{:?}", emulator.kind).to_lowercase();
    let names = ResourceNames::with_prefix(&prefix(&test));
    create_resources(&Clients::new(&sdk), &names, 1, emulator.archive())
        .await
        .expect("resources on the emulator");
    let records = || {
        DynamoAlerts::new(
            aws_sdk_dynamodb::Client::new(&sdk),
            &names.alert_state_table,
            &names.alerts_table,
        )
    };
    let key_prefix = prefix(&test);
    let store = ValkeyStateAlerts::connect(&url, key_prefix.clone(), records())
        .await
        .unwrap();
    let stored = || async {
        store
            .get_alert(&overheat(0, AlertState::Active).alert_id)
            .await
            .unwrap()
    };
    let states = DeviceRuleStates::default();
    let raised = overheat(1, AlertState::Active);
    store
        .commit_changes("truck-5", 0, &states, touched(&raised))
        .await
        .unwrap();
    assert_eq!(stored().await, Some(raised.clone()));

    // An evaluation from the same version loses the race: none of its alerts is written.
    let discarded = overheat(7, AlertState::Cleared);
    let conflict = store
        .commit_changes("truck-5", 0, &states, touched(&discarded))
        .await
        .unwrap_err();
    assert_eq!(conflict.kind, ErrorKind::Conflict, "{conflict}");
    assert_eq!(
        stored().await,
        Some(raised.clone()),
        "the discarded evaluation wrote nothing"
    );

    // Version 2's changes, then a late write of version 1's: the record stays at version 2.
    let repeated = overheat(3, AlertState::Active);
    store
        .commit_changes("truck-5", 1, &states, touched(&repeated))
        .await
        .unwrap();
    records()
        .write_alerts(std::slice::from_ref(&raised), 1)
        .await
        .unwrap();
    assert_eq!(
        stored().await,
        Some(repeated.clone()),
        "an older version cannot undo a newer one"
    );

    // A writer that committed version 3 and stopped before writing its alert: the next load
    // writes it first.
    let cleared = overheat(4, AlertState::Cleared);
    let pending = serde_json::json!({"version": 3, "touched": [cleared], "removed": []});
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let committed: i64 = redis::Script::new(geostream_aws::valkey::COMMIT_STATE_SCRIPT)
        .key(format!("{{{key_prefix}}}:rules:truck-5"))
        .arg(2)
        .arg(3)
        .arg(serde_json::to_string(&states).unwrap())
        .arg(pending.to_string())
        .invoke_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(committed, 1);
    assert_eq!(stored().await, Some(repeated), "not written yet");
    assert_eq!(store.load_rule_states("truck-5").await.unwrap().version, 3);
    assert_eq!(stored().await, Some(cleared), "written by the load");
    let outbox: Option<String> = redis::cmd("HGET")
        .arg(format!("{{{key_prefix}}}:rules:truck-5"))
        .arg("pending")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(outbox, None, "and the outbox emptied");
}

/// Counts the track reads that reach the archive behind the cache.
struct CountingArchive {
    inner: geostream_shared::memory::MemoryArchive,
    track_reads: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl geostream_shared::ports::Archive for CountingArchive {
    async fn write(
        &self,
        readings: &[geostream_shared::model::Reading],
    ) -> Result<Vec<geostream_shared::ports::RejectedReading>, geostream_shared::ports::StoreError>
    {
        self.inner.write(readings).await
    }

    async fn track(
        &self,
        device_id: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<geostream_shared::model::Reading>, geostream_shared::ports::StoreError> {
        self.track_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.track(device_id, from, to, limit).await
    }
}

/// The last hour of a vehicle's readings comes from its own sorted set in Valkey, one round
/// trip, without touching the archive, and equals what the archive answers; older ranges go to
/// the archive; a replayed batch adds nothing.
#[tokio::test]
async fn a_recent_track_reads_only_that_vehicles_readings() {
    use geostream_aws::valkey::ValkeyRecentTracks;
    use geostream_shared::model::Reading;
    use geostream_shared::ports::Archive;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    let Some(url) = valkey() else { return };
    let archive = Arc::new(CountingArchive {
        inner: geostream_shared::memory::MemoryArchive::new(100_000),
        track_reads: Default::default(),
    });
    let cache = ValkeyRecentTracks::connect(&url, prefix("tracks"), archive.clone())
        .await
        .unwrap();
    let now = geostream_shared::now_millis();
    let reading = |device: &str, ts: i64, temp: f64| Reading {
        device_id: device.to_string(),
        ts,
        event_id: format!("{device}@{ts}"),
        lat: Some(48.1),
        lon: Some(11.5),
        engine_temp_c: Some(temp),
        ..Default::default()
    };
    // 200 vehicles, one reading every 10 s over the last 2 hours, in batches across vehicles.
    let mut all = Vec::new();
    for step in 0..720 {
        for vehicle in 0..200 {
            all.push(reading(
                &format!("veh-{vehicle:03}"),
                now - 2 * 3_600_000 + step * 10_000 + vehicle,
                80.0 + (step % 7) as f64,
            ));
        }
    }
    for batch in all.chunks(1_000) {
        assert!(cache.write(batch).await.unwrap().is_empty());
    }
    // A replay of a batch changes nothing.
    assert!(cache
        .write(&all[all.len() - 1_000..])
        .await
        .unwrap()
        .is_empty());

    let (from, to) = (now - 3_600_000, now + 1);
    let before = cache.round_trips();
    let recent = cache.track("veh-042", from, to, 10_000).await.unwrap();
    assert_eq!(cache.round_trips() - before, 1);
    assert_eq!(archive.track_reads.load(Ordering::Relaxed), 0);
    let expected = archive
        .inner
        .track("veh-042", from, to, 10_000)
        .await
        .unwrap();
    assert_eq!(recent.len(), 360);
    assert_eq!(recent, expected);
    let limited = cache.track("veh-042", from, to, 10).await.unwrap();
    assert_eq!(limited, expected[..10]);

    // Further back than the window: the archive answers.
    let old_from = now - 2 * 3_600_000;
    let old = cache
        .track("veh-042", old_from, old_from + 600_000, 10_000)
        .await
        .unwrap();
    assert_eq!(archive.track_reads.load(Ordering::Relaxed), 1);
    assert_eq!(old.len(), 60);
}
