//! GeoStream's domain core.
//!
//! Pure code only: the telemetry model and its validation, the versioned bus envelope, the geo
//! index math, the rules engine, fleet events (geofences, overspeed, offline), the ports the handlers talk to, the neutral stream batch, and
//! the in-memory adapters used by the embedded runner and the tests. No AWS SDK and no Lambda
//! event types in here: Lambda's events are turned into these types by `geostream-lambda`, and
//! the SDK adapters live in `geostream-aws`, so that most tests compile fast. The map of the
//! crates is `docs/architecture.md`.

pub mod device_secret;
pub mod envelope;
pub mod fleet;
pub mod geo;
pub mod history;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod ports;
pub mod rules;
pub mod stream;
pub mod trackers;
pub mod validation;

/// Milliseconds since the Unix epoch, the one clock unit used across GeoStream.
pub type EpochMillis = i64;

/// The current wall-clock time in epoch milliseconds.
pub fn now_millis() -> EpochMillis {
    chrono::Utc::now().timestamp_millis()
}
