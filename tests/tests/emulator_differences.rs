//! Where moto and LocalStack (with DynamoDB Local, AWS's own engine) answer differently, or
//! where GeoStream leans on an answer both must give as AWS documents it, GeoStream's behaviour
//! pinned on each (`NAME::moto`, `NAME::localstack`). docs/local-modes.md lists the
//! differences found and which test pins each.

use geostream_aws::config::{sdk_config, Clients};
use geostream_aws::dynamodb::{DynamoAlerts, DynamoPositions};
use geostream_aws::kinesis::KinesisBus;
use geostream_aws::provision::{create_resources, ResourceNames};
use geostream_e2e::fleet::position;
use geostream_e2e::harness::{read_stream, Emulator, EmulatorKind};
use geostream_e2e::on_each_emulator;
use geostream_shared::model::{Alert, AlertState, Severity};
use geostream_shared::ports::{
    AlertStore, BusRecord, ErrorKind, EventBus, PositionStore, UpsertOutcome,
};
use geostream_shared::rules::DeviceRuleStates;
use geostream_shared::stream::SequenceNumber;

on_each_emulator!(
    put_records_stays_within_what_kinesis_takes,
    sequence_numbers_order_as_numbers_whatever_their_length,
    a_failed_condition_leaves_a_newer_position_in_place,
    a_cancelled_transaction_is_a_conflict_and_writes_nothing,
);

async fn deployment(emulator: &Emulator, test: &str) -> (ResourceNames, Clients) {
    let names = ResourceNames::with_prefix(&format!("gs-diff-{test}-{}", std::process::id()));
    let clients = Clients::new(&sdk_config(Some(&emulator.endpoint)).await);
    create_resources(&clients, &names, 1, emulator.archive())
        .await
        .expect("resources are created on the emulator");
    (names, clients)
}

/// Kinesis takes at most 500 records and 1 MiB per record in a PutRecords call. moto refuses
/// a 501st record (ValidationException, as AWS documents); LocalStack's Kinesis takes it. A
/// record over 1 MiB: moto answers ValidationException, LocalStack InvalidArgumentException.
/// GeoStream never sends either: 1,201 records go out in calls of 500, 500 and 201 on both, and
/// a record over 1 MiB is refused before any call, with the reason.
async fn put_records_stays_within_what_kinesis_takes(emulator: Emulator) {
    let (names, clients) = deployment(&emulator, "limits").await;
    let bus = KinesisBus::new(clients.kinesis.clone(), &names.telemetry_stream);
    let mut records: Vec<BusRecord> = (0..1_201)
        .map(|n| BusRecord {
            partition_key: format!("truck-{n}"),
            data: format!("reading {n}").into_bytes(),
            decoded: None,
        })
        .collect();
    records.push(BusRecord {
        partition_key: "truck-big".into(),
        data: vec![b'x'; 1024 * 1024 + 1],
        decoded: None,
    });
    let results = bus.publish(records).await;
    assert_eq!(results.len(), 1_202);
    assert!(
        results[..1_201].iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let refused = results[1_201]
        .as_ref()
        .expect_err("the record over 1 MiB is refused");
    assert_eq!(refused.kind, ErrorKind::Permanent);
    assert!(refused.message.contains("1 MiB"), "{refused:?}");
    assert_eq!(
        clients.calls.snapshot().get("PutRecords"),
        Some(&3),
        "500 + 500 + 201, the big one never sent"
    );
    let stored: usize = read_stream(&clients.kinesis, &names.telemetry_stream)
        .await
        .iter()
        .map(|event| event.records.len())
        .sum();
    assert_eq!(stored, 1_201);
}

/// moto numbers a shard's records 1, 2, 3...; Kinesis and LocalStack give 56-digit numbers.
/// GeoStream keeps the text and orders it as a number, so "9" comes before "10" on moto and the
/// long ones order as Kinesis's do: the stream's order on both.
async fn sequence_numbers_order_as_numbers_whatever_their_length(emulator: Emulator) {
    let (names, clients) = deployment(&emulator, "sequence").await;
    let bus = KinesisBus::new(clients.kinesis.clone(), &names.telemetry_stream);
    let records: Vec<BusRecord> = (0..25)
        .map(|n| BusRecord {
            partition_key: "truck-7".into(),
            data: n.to_string().into_bytes(),
            decoded: None,
        })
        .collect();
    let published: Vec<String> = bus
        .publish(records)
        .await
        .into_iter()
        .map(|r| r.expect("published").sequence_number)
        .collect();
    let lengths: Vec<usize> = published.iter().map(String::len).collect();
    match emulator.kind {
        EmulatorKind::Moto => assert!(lengths.iter().any(|l| *l < 3), "{published:?}"),
        EmulatorKind::LocalStack => assert!(lengths.iter().all(|l| *l == 56), "{published:?}"),
    }
    let as_read: Vec<(SequenceNumber, u64)> =
        read_stream(&clients.kinesis, &names.telemetry_stream)
            .await
            .into_iter()
            .flat_map(|event| event.records)
            .map(|record| {
                let data = String::from_utf8(record.kinesis.data.0).unwrap();
                (
                    SequenceNumber::new(record.kinesis.sequence_number),
                    data.parse().unwrap(),
                )
            })
            .collect();
    let data_in_stream_order: Vec<u64> = as_read.iter().map(|(_, n)| *n).collect();
    assert_eq!(data_in_stream_order, (0..25).collect::<Vec<u64>>());
    assert!(
        as_read.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "each record's number above the one before: {published:?}"
    );
}

/// Both emulators refuse a conditional PutItem with ConditionalCheckFailedException, as
/// DynamoDB does; GeoStream reads it as "a newer position is stored", not as an error.
async fn a_failed_condition_leaves_a_newer_position_in_place(emulator: Emulator) {
    let (names, clients) = deployment(&emulator, "condition").await;
    let store = DynamoPositions::new(clients.dynamodb.clone(), &names.positions_table);
    let newer = position("truck-9", 2_000, "e2", 52.5, 13.4);
    let older = position("truck-9", 1_000, "e1", 48.1, 11.5);
    assert_eq!(
        store.upsert_if_newer(newer.clone()).await.unwrap(),
        UpsertOutcome::Applied
    );
    assert_eq!(
        store.upsert_if_newer(older).await.unwrap(),
        UpsertOutcome::Stale
    );
    assert_eq!(
        store.upsert_if_newer(newer.clone()).await.unwrap(),
        UpsertOutcome::Stale,
        "the same reading again (a replay)"
    );
    assert_eq!(store.get("truck-9").await.unwrap(), Some(newer));
}

/// A transaction whose condition fails is cancelled with one reason per item
/// (`[ConditionalCheckFailed, None]`), on both emulators as on DynamoDB, and writes nothing;
/// GeoStream takes it as a conflict (another writer moved the rule state on), which the
/// anomaly-inspector answers by reloading and evaluating again.
async fn a_cancelled_transaction_is_a_conflict_and_writes_nothing(emulator: Emulator) {
    let (names, clients) = deployment(&emulator, "transaction").await;
    let store = DynamoAlerts::new(
        clients.dynamodb.clone(),
        &names.alert_state_table,
        &names.alerts_table,
    );
    let alert = |count: u64| Alert {
        alert_id: Alert::make_id("truck-5", "engine_overheat", 1_000),
        device_id: "truck-5".into(),
        rule: "engine_overheat".into(),
        severity: Severity::Critical,
        state: AlertState::Active,
        acknowledged: false,
        acknowledged_by: None,
        acknowledged_at: None,
        started_at: 1_000,
        cleared_at: None,
        peak_value: 100.0 + count as f64,
        last_value: 100.0,
        count,
    };
    let states = DeviceRuleStates::default();
    store
        .commit("truck-5", 0, &states, &[alert(1)])
        .await
        .expect("the first commit");
    let stale = store
        .commit("truck-5", 0, &states, &[alert(2)])
        .await
        .expect_err("a commit from version 0 again");
    assert_eq!(stale.kind, ErrorKind::Conflict, "{stale:?}");
    let stored = store
        .get_alert(&alert(1).alert_id)
        .await
        .unwrap()
        .expect("the alert of the first commit");
    assert_eq!(stored.count, 1, "the cancelled transaction wrote nothing");
    assert_eq!(store.load_rule_states("truck-5").await.unwrap().version, 1);
}
