//! The Kafka bus (docs/architecture.md, "Ports and adapters"): Kafka, Redpanda or MSK in place of Kinesis, with
//! the same handlers. Records are keyed by device, so a device's envelopes stay in one
//! partition and in order, as they stay in one Kinesis shard.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use geostream_shared::ports::{BusRecord, EventBus, Published, StoreError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};

pub use rdkafka;

/// How to reach the brokers.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// SASL/SCRAM credentials (MSK and hosted Redpanda); none for a local broker.
    pub sasl: Option<SaslScram>,
}

#[derive(Debug, Clone)]
pub struct SaslScram {
    /// `SCRAM-SHA-512` or `SCRAM-SHA-256`.
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

impl KafkaSettings {
    pub fn plaintext(bootstrap_servers: impl Into<String>) -> Self {
        KafkaSettings {
            bootstrap_servers: bootstrap_servers.into(),
            sasl: None,
        }
    }

    /// Brokers with SASL/SCRAM-SHA-512 over TLS when credentials are given (what Lambda's Kafka
    /// event source mappings use with a Secrets Manager secret), plaintext otherwise.
    pub fn with_credentials(
        bootstrap_servers: impl Into<String>,
        credentials: Option<(String, String)>,
    ) -> Self {
        KafkaSettings {
            bootstrap_servers: bootstrap_servers.into(),
            sasl: credentials.map(|(username, password)| SaslScram {
                mechanism: "SCRAM-SHA-512".into(),
                username,
                password,
            }),
        }
    }

    /// The librdkafka configuration every GeoStream client starts from.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        if let Some(sasl) = &self.sasl {
            config
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanism", &sasl.mechanism)
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
        config
    }
}

/// Publishes to one topic with an idempotent producer (acks from all in-sync replicas, no
/// duplicates from the producer's own retries), and checks every delivery report.
pub struct KafkaBus {
    producer: FutureProducer,
    topic: String,
}

/// How long a record may wait for its delivery report (the producer retries within it).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Record batches are compressed with LZ4: the envelopes of a batch are JSON of the same shape,
/// so a burst's batches shrink to 43% of their bytes (224 instead of 523 bytes per reading on
/// the wire, and each consumer group fetches them again), for little CPU: 3.6% of the local
/// runner's on the Kafka burst bench, which the broker's lighter load more than repaid
/// (docs/performance.md). Consumers, Lambda's Kafka event source mapping among them, decompress
/// transparently.
const COMPRESSION: &str = "lz4";

impl KafkaBus {
    /// `linger` is how long the producer waits for more records to fill a produce request.
    /// Zero sends at once: right for a Lambda invocation, which publishes one request's records
    /// and waits for them. A process whose many requests share one producer (the local runner)
    /// gathers them into fewer, larger produce requests with a short linger, which costs the
    /// broker far less per record.
    pub fn new(
        settings: &KafkaSettings,
        topic: impl Into<String>,
        linger: Duration,
    ) -> Result<Self, String> {
        let producer: FutureProducer = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger.as_millis().to_string())
            .set("compression.type", COMPRESSION)
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| {
                format!(
                    "cannot create a Kafka producer for {}: {e}",
                    settings.bootstrap_servers
                )
            })?;
        Ok(KafkaBus {
            producer,
            topic: topic.into(),
        })
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, records: Vec<BusRecord>) -> Vec<Result<Published, StoreError>> {
        // Queue every record first (the producer batches them), then wait for the reports.
        let deliveries = records.iter().map(|record| {
            let message = FutureRecord::to(&self.topic)
                .key(record.partition_key.as_bytes())
                .payload(&record.data);
            self.producer.send(message, DELIVERY_TIMEOUT)
        });
        join_all(deliveries)
            .await
            .into_iter()
            .map(|report| match report {
                Ok(delivery) => Ok(Published {
                    shard_id: format!("{}-{}", self.topic, delivery.partition),
                    sequence_number: delivery.offset.to_string(),
                }),
                Err((error, _)) => Err(delivery_error(&self.topic, error)),
            })
            .collect()
    }
}

fn delivery_error(topic: &str, error: KafkaError) -> StoreError {
    let message = format!("Kafka did not take the record on {topic}: {error}");
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    );
    if permanent {
        StoreError::permanent("Produce", message)
    } else {
        StoreError::transient("Produce", message)
    }
}

/// Creates the topics that do not exist yet (`(name, partitions)`); existing ones are kept as
/// they are.
pub async fn ensure_topics(settings: &KafkaSettings, topics: &[(&str, i32)]) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .map_err(|e| format!("cannot create a Kafka admin client: {e}"))?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| format!("creating topics on {}: {e}", settings.bootstrap_servers))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("creating topic {topic}: {code}")),
        }
    }
    Ok(())
}
