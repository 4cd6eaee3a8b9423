//! The mapping policy against a fake source, in every flavour (Kinesis-like shards, Kafka-like
//! partitions, the in-memory stream's in-process batches) and on tokio's paused clock, so
//! backoff is observed, not waited for.

use std::sync::Mutex;

use geostream_lambda::stream::{batch_from_kinesis, kinesis_response};
use geostream_shared::memory::MemoryDeadLetters;
use geostream_shared::ports::StoreError;
use geostream_shared::stream::StreamBatch;
use tokio::time::Instant;

use super::event::{Event, Response};
use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Flavour {
    Kinesis,
    Kafka,
    InProcess,
}

const FLAVOURS: [Flavour; 3] = [Flavour::Kinesis, Flavour::Kafka, Flavour::InProcess];

/// Records with data `[0]`, `[1]`, ... spread round-robin over `partitions` partitions.
struct FakeSource {
    records: Vec<SourceRecord>,
    next: Mutex<usize>,
    /// Every checkpoint call, in order.
    checkpoints: Mutex<Vec<Vec<RecordId>>>,
    event_source: EventSource,
    /// Partitions a rebalance moved to another consumer.
    revoked: Mutex<HashSet<String>>,
}

impl FakeSource {
    fn new(flavour: Flavour, count: u8, partitions: u8) -> Arc<FakeSource> {
        let records = (0..count)
            .map(|n| {
                let partition = n % partitions;
                let (id, partition_name) = match flavour {
                    Flavour::Kinesis | Flavour::InProcess => (
                        RecordId::kinesis(format!("{}", 1000 + u32::from(n))),
                        format!("shardId-{partition}"),
                    ),
                    Flavour::Kafka => (
                        RecordId::kafka("t", i32::from(partition), i64::from(n / partitions)),
                        format!("t-{partition}"),
                    ),
                };
                SourceRecord {
                    id,
                    partition: partition_name,
                    partition_key: format!("device-{partition}"),
                    data: vec![n].into(),
                    arrival: 1,
                    decoded: None,
                }
            })
            .collect();
        let event_source = match flavour {
            Flavour::Kinesis => EventSource::Kinesis {
                stream_arn: "arn:aws:kinesis:local:000000000000:stream/t".into(),
                shard_id: "shardId-0".into(),
            },
            Flavour::Kafka | Flavour::InProcess => EventSource::InProcess,
        };
        Arc::new(FakeSource {
            records,
            next: Mutex::new(0),
            checkpoints: Mutex::new(Vec::new()),
            event_source,
            revoked: Mutex::new(HashSet::new()),
        })
    }

    /// The data of the last record checkpointed per partition, each checkpoint call in order.
    fn checkpoint_history(&self) -> Vec<Vec<u8>> {
        let data_of = |id: &RecordId| {
            self.records
                .iter()
                .find(|r| &r.id == id)
                .map_or(u8::MAX, |r| r.data[0])
        };
        self.checkpoints
            .lock()
            .unwrap()
            .iter()
            .map(|through| through.iter().map(data_of).collect())
            .collect()
    }
}

#[async_trait]
impl Source for FakeSource {
    fn describe(&self) -> &str {
        "fake"
    }
    fn event_source(&self) -> &EventSource {
        &self.event_source
    }
    async fn read(&self, max: usize, wait: Duration) -> Result<SourceRead, String> {
        let batch: Vec<SourceRecord> = {
            let mut next = self.next.lock().unwrap();
            let batch: Vec<SourceRecord> =
                self.records.iter().skip(*next).take(max).cloned().collect();
            *next += batch.len();
            batch
        };
        if batch.is_empty() {
            tokio::time::sleep(wait).await;
        }
        Ok(SourceRead {
            records: batch,
            expired: 0,
        })
    }
    async fn checkpoint(&self, through: &[RecordId]) -> Result<(), String> {
        self.checkpoints.lock().unwrap().push(through.to_vec());
        Ok(())
    }
    fn backlog(&self) -> Option<u64> {
        None
    }
    fn sees_stream_end(&self) -> bool {
        false
    }
    fn released(&self, partitions: &BTreeSet<&str>) -> BTreeSet<String> {
        let revoked = self.revoked.lock().unwrap();
        partitions
            .iter()
            .filter(|p| revoked.contains(**p))
            .map(|p| p.to_string())
            .collect()
    }
}

/// Fails the record with data `poison` on its first `fail_times` deliveries, answering with the
/// partial batch response of the event's kind; notes what it saw and when.
struct Flaky {
    poison: u8,
    failures_left: Mutex<u32>,
    seen: Mutex<Vec<u8>>,
    invoked_at: Mutex<Vec<Instant>>,
    /// The name of the thread each invocation ran on.
    invoked_on: Mutex<Vec<Option<String>>>,
}

impl Flaky {
    fn new(poison: u8, fail_times: u32) -> Arc<Flaky> {
        Arc::new(Flaky {
            poison,
            failures_left: Mutex::new(fail_times),
            seen: Mutex::new(Vec::new()),
            invoked_at: Mutex::new(Vec::new()),
            invoked_on: Mutex::new(Vec::new()),
        })
    }

    fn failed(&self, batch: StreamBatch) -> Vec<RecordId> {
        let mut failed = Vec::new();
        let mut left = self.failures_left.lock().unwrap();
        let poisoned = batch.records.iter().any(|r| *r.data == [self.poison]) && *left > 0;
        for record in batch.records {
            self.seen.lock().unwrap().push(record.data[0]);
            if poisoned && *record.data == [self.poison] {
                failed.push(record.id);
            }
        }
        if poisoned {
            *left -= 1;
        }
        failed
    }
}

#[async_trait]
impl Invoke for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn invoke(&self, event: Event) -> Result<Response, String> {
        self.invoked_at.lock().unwrap().push(Instant::now());
        self.invoked_on
            .lock()
            .unwrap()
            .push(std::thread::current().name().map(String::from));
        Ok(match event {
            Event::InProcess(batch) => Response::InProcess(self.failed(batch)),
            Event::Kinesis(event) => {
                Response::Kinesis(kinesis_response(self.failed(batch_from_kinesis(event))))
            }
        })
    }
}

/// A dead-letter sink that refuses the first `failures` sends.
struct UnreliableSink {
    failures_left: Mutex<u32>,
    taken: MemoryDeadLetters,
}

impl UnreliableSink {
    fn new(failures: u32) -> Arc<UnreliableSink> {
        Arc::new(UnreliableSink {
            failures_left: Mutex::new(failures),
            taken: MemoryDeadLetters::new(100),
        })
    }
}

#[async_trait]
impl DeadLetterSink for UnreliableSink {
    async fn send(&self, letters: Vec<DeadLetter>) -> Result<(), StoreError> {
        {
            let mut left = self.failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(StoreError::transient(
                    "SendMessageBatch",
                    "queue unavailable",
                ));
            }
        }
        self.taken.send(letters).await
    }
}

struct Run {
    function: Arc<Flaky>,
    source: Arc<FakeSource>,
    sink: Arc<UnreliableSink>,
    stats: Arc<MappingStats>,
}

fn config(max_retries: u32) -> MappingConfig {
    MappingConfig {
        batch_size: 10,
        max_retries,
        retry_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        ..Default::default()
    }
}

/// Runs one mapping over `source` until `done` holds (virtual time), then stops it.
async fn run(
    source: Arc<FakeSource>,
    function: Arc<Flaky>,
    sink: Arc<UnreliableSink>,
    config: MappingConfig,
    done: impl Fn(&Run) -> bool,
) -> Run {
    let (stop, stopped) = watch::channel(false);
    let (mapping, tasks) = start_mapping(
        function.clone(),
        vec![source.clone() as Arc<dyn Source>],
        config,
        sink.clone(),
        stopped,
    );
    let run = Run {
        function,
        source,
        sink,
        stats: mapping.stats.clone(),
    };
    for _ in 0..10_000 {
        if done(&run) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done(&run), "the mapping did not get there");
    stop.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    run
}

fn everything_checkpointed(run: &Run) -> bool {
    run.source
        .checkpoint_history()
        .last()
        .is_some_and(|last| last.contains(&4))
}

#[tokio::test(start_paused = true)]
async fn a_failed_record_is_retried_from_itself_and_what_precedes_it_is_checkpointed() {
    for flavour in FLAVOURS {
        let run = run(
            FakeSource::new(flavour, 5, 1),
            Flaky::new(2, 2),
            UnreliableSink::new(0),
            config(3),
            everything_checkpointed,
        )
        .await;
        // First delivery 0..4, then twice from the failed record 2 onwards.
        assert_eq!(
            *run.function.seen.lock().unwrap(),
            [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4],
            "{flavour:?}"
        );
        assert_eq!(
            run.source.checkpoint_history(),
            [vec![1], vec![4]],
            "{flavour:?}"
        );
        assert_eq!(run.sink.taken.snapshot().1, 0);
        assert_eq!(run.stats.retried_records.load(Ordering::Relaxed), 6);
    }
}

#[tokio::test(start_paused = true)]
async fn retries_are_bounded_then_the_record_is_dead_lettered_whole_and_passed() {
    for flavour in FLAVOURS {
        let run = run(
            FakeSource::new(flavour, 5, 1),
            Flaky::new(2, u32::MAX),
            UnreliableSink::new(0),
            config(2),
            everything_checkpointed,
        )
        .await;
        assert_eq!(
            run.function.seen.lock().unwrap().len(),
            5 + 3 + 3,
            "{flavour:?}"
        );
        let (letters, total) = run.sink.taken.snapshot();
        let data: Vec<&[u8]> = letters.iter().map(|l| l.data.as_slice()).collect();
        assert_eq!(
            data,
            [[2], [3], [4]],
            "{flavour:?}: from the failed record on"
        );
        assert_eq!(total, 3);
        assert_eq!(letters[0].partition_key, "device-0");
        assert_eq!(letters[0].attempts, 3);
        assert!(
            letters[0].reason.contains("on all 3 attempts"),
            "{}",
            letters[0].reason
        );
        assert_eq!(run.source.checkpoint_history(), [vec![1], vec![4]]);
        assert_eq!(run.stats.dead_lettered.load(Ordering::Relaxed), 3);
    }
}

#[tokio::test(start_paused = true)]
async fn the_checkpoint_does_not_move_while_the_dead_letter_sink_fails() {
    for flavour in FLAVOURS {
        let run = run(
            FakeSource::new(flavour, 5, 1),
            Flaky::new(2, u32::MAX),
            UnreliableSink::new(3),
            config(1),
            everything_checkpointed,
        )
        .await;
        assert_eq!(
            run.source.checkpoint_history(),
            [vec![1], vec![4]],
            "{flavour:?}: nothing past the failed record before the sink took it"
        );
        assert_eq!(run.stats.dead_letter_failures.load(Ordering::Relaxed), 3);
        assert_eq!(run.sink.taken.snapshot().1, 3);

        // A sink that never takes them: the runner stops with the checkpoint before the record.
        let run = run_until_stopped_while_the_sink_fails(flavour).await;
        assert_eq!(run.source.checkpoint_history(), [vec![1]], "{flavour:?}");
        assert_eq!(run.sink.taken.snapshot().1, 0);
    }
}

async fn run_until_stopped_while_the_sink_fails(flavour: Flavour) -> Run {
    run(
        FakeSource::new(flavour, 5, 1),
        Flaky::new(2, u32::MAX),
        UnreliableSink::new(u32::MAX),
        config(1),
        |run| run.stats.dead_letter_failures.load(Ordering::Relaxed) >= 5,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_failure_holds_back_only_its_own_partition() {
    // Kafka-like: 10 records over two partitions; record 2 (partition 0) fails once.
    let run = run(
        FakeSource::new(Flavour::Kafka, 10, 2),
        Flaky::new(2, 1),
        UnreliableSink::new(0),
        config(3),
        |run| run.function.seen.lock().unwrap().len() >= 14,
    )
    .await;
    // The first delivery checkpoints partition 0 before record 2 and all of partition 1.
    let first = &run.source.checkpoint_history()[0];
    assert_eq!(
        first,
        &[0, 9],
        "partition 0 up to record 0, partition 1 through record 9"
    );
    let retried: Vec<u8> = run.function.seen.lock().unwrap()[10..].to_vec();
    assert_eq!(
        retried,
        [2, 4, 6, 8],
        "only partition 0, from the failed record"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_delays_grow_up_to_the_cap_with_jitter() {
    let run = run(
        FakeSource::new(Flavour::Kinesis, 5, 1),
        Flaky::new(2, u32::MAX),
        UnreliableSink::new(0),
        config(6),
        everything_checkpointed,
    )
    .await;
    let at = run.function.invoked_at.lock().unwrap().clone();
    let delays: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(delays.len(), 6);
    for (n, delay) in delays.iter().enumerate() {
        let ceiling = Duration::from_millis((100u64 << n).min(400));
        assert!(
            *delay >= ceiling / 2 && *delay <= ceiling,
            "retry {}: {delay:?} outside [{:?}, {ceiling:?}]",
            n + 1,
            ceiling / 2
        );
    }
}

#[test]
fn retry_delays_are_jittered_and_capped() {
    let config = MappingConfig::default();
    let delays: HashSet<Duration> = (0..200).map(|_| config.retry_delay(30)).collect();
    assert!(delays
        .iter()
        .all(|d| *d <= config.max_backoff && *d >= config.max_backoff / 2));
    assert!(
        delays.len() > 100,
        "not jittered: {} distinct delays",
        delays.len()
    );
}

#[tokio::test(start_paused = true)]
async fn kinesis_and_kafka_sources_are_delivered_the_same_way() {
    let mut outcomes = Vec::new();
    for flavour in FLAVOURS {
        let run = run(
            FakeSource::new(flavour, 5, 1),
            Flaky::new(3, 5),
            UnreliableSink::new(1),
            config(2),
            everything_checkpointed,
        )
        .await;
        let seen = run.function.seen.lock().unwrap().clone();
        let letters: Vec<Vec<u8>> = run
            .sink
            .taken
            .snapshot()
            .0
            .iter()
            .map(|l| l.data.clone())
            .collect();
        outcomes.push((seen, run.source.checkpoint_history(), letters));
    }
    assert_eq!(outcomes[0], outcomes[1]);
}

#[tokio::test(start_paused = true)]
async fn a_partition_revoked_mid_retry_is_let_go_not_retried_beside_its_new_owner() {
    // Records 0..9 on partitions t-0 (even) and t-1 (odd); record 3 fails every time.
    let source = FakeSource::new(Flavour::Kafka, 10, 2);
    let function = Flaky::new(3, u32::MAX);
    let sink = UnreliableSink::new(0);
    let (stop, stopped) = watch::channel(false);
    let (mapping, tasks) = start_mapping(
        function.clone(),
        vec![source.clone() as Arc<dyn Source>],
        config(2),
        sink.clone(),
        stopped,
    );
    while function.seen.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A rebalance moves t-1 to another runner before the first retry.
    source.revoked.lock().unwrap().insert("t-1".into());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        *function.seen.lock().unwrap(),
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "delivered once, never retried"
    );
    assert_eq!(
        source.checkpoint_history(),
        [vec![8, 1]],
        "t-0 done through 8; t-1 only before the failed record, where its new owner resumes"
    );
    assert_eq!(sink.taken.snapshot().1, 0, "nothing dead-lettered");
    assert_eq!(mapping.stats.retried_records.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_mapping_on_its_own_thread_runs_the_same_policy_there_and_its_handle_ends_when_it_stops()
{
    // Real time: the loops run on their own runtime, whose clock this test cannot pause.
    let source = FakeSource::new(Flavour::InProcess, 5, 1);
    let function = Flaky::new(2, 1);
    let sink = UnreliableSink::new(0);
    let (stop, stopped) = watch::channel(false);
    let quick_retries = MappingConfig {
        retry_backoff: Duration::from_millis(1),
        ..config(3)
    };
    let (mapping, task) = start_mapping_on_own_thread(
        function.clone(),
        vec![source.clone() as Arc<dyn Source>],
        quick_retries,
        sink.clone(),
        stopped,
    )
    .expect("a thread and a runtime for the mapping");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !source
        .checkpoint_history()
        .last()
        .is_some_and(|last| last.contains(&4))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the mapping did not get there"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the handle ends once the loops stop")
        .unwrap();
    assert_eq!(*function.seen.lock().unwrap(), [0, 1, 2, 3, 4, 2, 3, 4]);
    assert_eq!(
        *function.invoked_on.lock().unwrap(),
        [Some("flaky".to_string()), Some("flaky".to_string())],
        "every invocation on the thread named after the function"
    );
    assert_ne!(
        std::thread::current().name(),
        Some("flaky"),
        "not the test's own thread"
    );
    assert_eq!(mapping.stats.invocations.load(Ordering::Relaxed), 2);
    assert_eq!(sink.taken.snapshot().1, 0, "nothing dead-lettered");
}
