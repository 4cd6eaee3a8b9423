//! GeoStream's AWS adapters: the ports of `geostream-shared` over the AWS SDK.
//!
//! - [`kinesis::KinesisBus`]: `EventBus` over PutRecords, partial failures retried item by item.
//! - [`dynamodb::DynamoPositions`]: `PositionStore` with conditional upsert-if-newer and a
//!   sharded geohash index (GSI).
//! - [`dynamodb::DynamoAlerts`]: `AlertStore` with versioned rule state and alert records
//!   committed in one transaction.
//! - [`timestream::TimestreamArchive`]: `Archive` over WriteRecords (multi-measure, batches of
//!   100, rejected records reported per reading) and track reads over Timestream queries.
//! - [`sqs::SqsDeadLetters`]: `DeadLetterSink` over SendMessageBatch.
//! - [`fleet::DynamoGeofences`], [`fleet::DynamoFleetEvents`]: geofences (versioned), fleet
//!   events (with a TTL) and who is inside each geofence.
//!
//! [`compose::Composition`] builds them from settings, for the Lambda mains and the local
//! runner alike. Every client carries a [`counting::CallCounter`] so tests and benches can count API
//! calls, and every adapter a [`capacity::CapacityMeter`] for the units AWS bills.

pub mod capacity;
pub mod compose;
pub mod config;
pub mod counting;
pub mod dynamodb;
pub mod errors;
pub mod fleet;
pub mod history;
pub mod kinesis;
pub mod manifest;
pub mod metric_names;
pub mod provision;
pub mod redrive;
pub mod retry;
pub mod s3archive;
pub mod sqs;
pub mod timestream;
#[cfg(feature = "valkey")]
pub mod valkey;
