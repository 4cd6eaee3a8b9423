//! When the stream functions have caught up. Where the runner sees the end of the stream (the
//! in-memory stream, Kinesis), caught up means no record left behind any mapping's checkpoint.
//! On the Kafka bus it cannot (the broker's own tools report consumer lag), so there caught up
//! means no stream function has been handed a record for [`KAFKA_QUIET`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::stack::Stack;

/// On the Kafka bus, how long the stream functions must go without records to count as caught
/// up.
pub const KAFKA_QUIET: Duration = Duration::from_secs(2);

/// How often the condition is looked at.
const POLL: Duration = Duration::from_millis(5);

/// Whether the runner sees the end of the stream every mapping reads.
pub fn measures_lag(stack: &Stack) -> bool {
    stack.mappings.iter().all(|m| m.sees_stream_end())
}

/// True when every stream function has processed every record on the stream.
pub fn drained(stack: &Stack) -> bool {
    stack.mappings.iter().all(|m| m.snapshot().lag == Some(0))
}

/// Waits until every stream function has caught up, at most `timeout`; false on time-out.
pub async fn wait_drained(stack: &Stack, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let processed = || -> u64 {
        stack
            .mappings
            .iter()
            .map(|m| m.stats.records.load(Ordering::Relaxed))
            .sum()
    };
    let sees_end = measures_lag(stack);
    let (mut last_count, mut last_change) = (processed(), Instant::now());
    while Instant::now() < deadline {
        if sees_end {
            if drained(stack) {
                return true;
            }
        } else {
            let count = processed();
            if count != last_count {
                (last_count, last_change) = (count, Instant::now());
            } else if last_change.elapsed() >= KAFKA_QUIET {
                return true;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    false
}
