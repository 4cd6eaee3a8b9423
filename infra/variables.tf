variable "region" {
  description = "AWS region to deploy to."
  type        = string
  default     = "eu-central-1"
}

variable "name_prefix" {
  description = "Prefix of every resource name; one stack per prefix."
  type        = string
  default     = "geostream"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name_prefix))
    error_message = "name_prefix must be 2-31 characters of a-z, 0-9 and -, starting with a letter."
  }
}

variable "lambda_artifacts_dir" {
  description = "Folder holding geostream-<function>/bootstrap.zip, as scripts/package writes them."
  type        = string
  default     = "../target/lambda"
}

variable "bus" {
  description = "The streaming bus: kinesis (the two streams are created here) or kafka (an existing Kafka, Redpanda or MSK cluster reachable from Lambda, with its topics created beforehand)."
  type        = string
  default     = "kinesis"

  validation {
    condition     = contains(["kinesis", "kafka"], var.bus)
    error_message = "bus must be kinesis or kafka."
  }
}

variable "kafka_bootstrap_servers" {
  description = "With bus = kafka: the brokers, host:port[,host:port...]."
  type        = string
  default     = ""

  validation {
    condition     = var.bus != "kafka" || length(trimspace(var.kafka_bootstrap_servers)) > 0
    error_message = "kafka_bootstrap_servers is required when bus = kafka."
  }
}

variable "kafka_secret_arn" {
  description = "With bus = kafka: ARN of the Secrets Manager secret ({\"username\", \"password\"}) for SASL/SCRAM-SHA-512 over TLS, used by the event source mappings and the producing functions. Empty for brokers without authentication."
  type        = string
  default     = ""

  validation {
    condition     = var.kafka_secret_arn == "" || can(regex("^arn:aws[a-z-]*:secretsmanager:", var.kafka_secret_arn))
    error_message = "kafka_secret_arn must be a Secrets Manager secret ARN, or empty."
  }
}

variable "kafka_secret_kms_key_arn" {
  description = "With kafka_secret_arn: the customer-managed KMS key the secret is encrypted with (MSK accepts SCRAM secrets only under such a key); the functions' roles get kms:Decrypt on it. Empty when the secret uses Secrets Manager's AWS-managed key."
  type        = string
  default     = ""

  validation {
    condition     = var.kafka_secret_kms_key_arn == "" || can(regex("^arn:aws[a-z-]*:kms:", var.kafka_secret_kms_key_arn))
    error_message = "kafka_secret_kms_key_arn must be a KMS key ARN, or empty."
  }
}

variable "kafka_telemetry_topic" {
  description = "With bus = kafka: the telemetry topic (keyed by device)."
  type        = string
  default     = "geostream-telemetry"
}

variable "kafka_alerts_topic" {
  description = "With bus = kafka: the topic alert raise and clear transitions are published to."
  type        = string
  default     = "geostream-alerts"
}

variable "kafka_max_pollers" {
  description = "With bus = kafka: the most event pollers per stream function (provisioned mode, which the retry and partial-batch settings need)."
  type        = number
  default     = 2

  validation {
    condition     = var.kafka_max_pollers >= 1 && var.kafka_max_pollers <= 2000
    error_message = "kafka_max_pollers must be between 1 and 2000."
  }
}

variable "offset_lag_alarm_records" {
  description = "With bus = kafka: alarm when a stream function's consumer group is more than this many records behind."
  type        = number
  default     = 100000
}

variable "stream_mode" {
  description = "Kinesis capacity mode: PROVISIONED (telemetry_shards fixed shards: about a tenth of on-demand's cost per reading at fleet scale, docs/cost.md) or ON_DEMAND (scales by itself, starting at 4,000 records/s, and charges per GB plus a stream-hour: for small or spiky fleets)."
  type        = string
  default     = "PROVISIONED"

  validation {
    condition     = contains(["ON_DEMAND", "PROVISIONED"], var.stream_mode)
    error_message = "stream_mode must be ON_DEMAND or PROVISIONED."
  }
}

variable "telemetry_shards" {
  description = "Shards of the telemetry stream when stream_mode is PROVISIONED (1 MB/s or 1,000 records/s of writes each). The default holds fleet A (10,000 vehicles, a reading every 2 s: 5,000 records/s) with 60% headroom; see fleet-b.tfvars.example for 100,000 vehicles."
  type        = number
  default     = 8

  validation {
    condition     = var.telemetry_shards >= 1 && var.telemetry_shards <= 500
    error_message = "telemetry_shards must be between 1 and 500."
  }
}

variable "stream_retention_hours" {
  description = "How long the streams keep records (24 to 8760 hours)."
  type        = number
  default     = 24

  validation {
    condition     = var.stream_retention_hours >= 24 && var.stream_retention_hours <= 8760
    error_message = "stream_retention_hours must be between 24 and 8760."
  }
}

variable "timestream_memory_retention_hours" {
  description = "Hours readings stay in Timestream's memory store (fast queries, late writes accepted)."
  type        = number
  default     = 24

  validation {
    condition     = var.timestream_memory_retention_hours >= 1 && var.timestream_memory_retention_hours <= 8766
    error_message = "timestream_memory_retention_hours must be between 1 and 8766."
  }
}

variable "timestream_magnetic_retention_days" {
  description = "Days readings stay in Timestream's magnetic store."
  type        = number
  default     = 365

  validation {
    condition     = var.timestream_magnetic_retention_days >= 1 && var.timestream_magnetic_retention_days <= 73000
    error_message = "timestream_magnetic_retention_days must be between 1 and 73000."
  }
}

variable "log_retention_days" {
  description = "Retention of the functions' and the API's log groups."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be one of the values CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ...)."
  }
}

variable "stream_batch_size" {
  description = "Records per invocation of the stream functions."
  type        = number
  default     = 100

  validation {
    condition     = var.stream_batch_size >= 1 && var.stream_batch_size <= 10000
    error_message = "stream_batch_size must be between 1 and 10000."
  }
}

variable "stream_batching_window_seconds" {
  description = "How long Lambda gathers records before invoking a stream function."
  type        = number
  default     = 1

  validation {
    condition     = var.stream_batching_window_seconds >= 0 && var.stream_batching_window_seconds <= 300
    error_message = "stream_batching_window_seconds must be between 0 and 300."
  }
}

variable "archiver_batch_size" {
  description = "Records per invocation of the archiver: it writes one S3 object per batch (and hour), so larger batches mean fewer PUT requests; positions and alerts keep stream_batch_size."
  type        = number
  default     = 1000

  validation {
    condition     = var.archiver_batch_size >= 1 && var.archiver_batch_size <= 10000
    error_message = "archiver_batch_size must be between 1 and 10000."
  }
}

variable "archiver_batching_window_seconds" {
  description = "How long Lambda gathers records before invoking the archiver: how old the newest readings of a track read can be."
  type        = number
  default     = 5

  validation {
    condition     = var.archiver_batching_window_seconds >= 0 && var.archiver_batching_window_seconds <= 300
    error_message = "archiver_batching_window_seconds must be between 0 and 300."
  }
}

variable "stream_max_retries" {
  description = "Retries of a failing batch before its records go to the on-failure queue."
  type        = number
  default     = 5

  validation {
    condition     = var.stream_max_retries >= 0 && var.stream_max_retries <= 10000
    error_message = "stream_max_retries must be between 0 and 10000."
  }
}

variable "stream_max_record_age_seconds" {
  description = "Records older than this are sent to the on-failure queue instead of being processed (60 to 604800)."
  type        = number
  default     = 21600

  validation {
    condition     = var.stream_max_record_age_seconds >= 60 && var.stream_max_record_age_seconds <= 604800
    error_message = "stream_max_record_age_seconds must be between 60 and 604800."
  }
}

variable "jwt_issuer" {
  description = "Issuer URL of the OIDC provider that signs device and operator tokens (for example a Cognito user pool: https://cognito-idp.REGION.amazonaws.com/POOL_ID)."
  type        = string

  validation {
    condition     = can(regex("^https://", var.jwt_issuer))
    error_message = "jwt_issuer must be an https:// URL."
  }
}

variable "ingress" {
  description = "How devices reach ingest: api_gateway (POST /v1/telemetry on the HTTP API, whose JWT authorizer verifies tokens; $1.00 per million requests) or function_url (ingest's Lambda Function URL, no per-request charge beyond the invocation; ingest verifies the tokens itself against the issuer's JWKS). Queries stay on the HTTP API either way."
  type        = string
  default     = "api_gateway"

  validation {
    condition     = contains(["api_gateway", "function_url"], var.ingress)
    error_message = "ingress must be api_gateway or function_url."
  }
}

variable "jwks_url" {
  description = "With ingress = function_url: where the issuer's signing keys (JWKS) are. Empty: where the issuer's OpenID Connect discovery document ({jwt_issuer}/.well-known/openid-configuration) says, as API Gateway finds them."
  type        = string
  default     = ""

  validation {
    condition     = var.jwks_url == "" || can(regex("^https://", var.jwks_url))
    error_message = "jwks_url must be empty or an https:// URL."
  }
}

variable "device_claim" {
  description = "The token claim that names a device token's vehicle: a device may post that vehicle's readings only (Cognito client-credentials tokens carry the app client id in sub; a pre-token-generation trigger or another provider can put the vehicle id in a claim of its own)."
  type        = string
  default     = "sub"
}

variable "scopes" {
  description = "Scope names per permission, as the token issuer writes them (Cognito resource-server scopes look like geostream/telemetry.write): telemetry_write posts the token's own vehicle, telemetry_write_any any vehicle (a gateway forwarding for many), fleet_read reads vehicles, tracks, alerts, geofences and fleet events, alerts_ack acknowledges, geofences_write writes and deletes geofences."
  type = object({
    telemetry_write     = string
    telemetry_write_any = string
    fleet_read          = string
    alerts_ack          = string
    geofences_write     = string
  })
  default = {
    telemetry_write     = "telemetry:write"
    telemetry_write_any = "telemetry:write:any"
    fleet_read          = "fleet:read"
    alerts_ack          = "alerts:ack"
    geofences_write     = "geofences:write"
  }
}

variable "offline_check_schedule" {
  description = "How often the offline check runs (an EventBridge schedule expression): device_offline is as late as this beyond offline_after_s. Each run scans the positions table: at 100,000 vehicles about 3,100 read units, $0.55 a day at once a minute (docs/fleet-events.md)."
  type        = string
  default     = "rate(1 minute)"
}

variable "fleet_event_retention_days" {
  description = "How many days fleet events (geofence enters and exits, overspeed, offline) are kept: DynamoDB's TTL removes older ones (within a few days of expiry)."
  type        = number
  default     = 30

  validation {
    condition     = var.fleet_event_retention_days >= 1 && var.fleet_event_retention_days <= 3650 && floor(var.fleet_event_retention_days) == var.fleet_event_retention_days
    error_message = "fleet_event_retention_days must be a whole number of days from 1 to 3650."
  }
}

variable "position_retention_days" {
  description = "How many days the position of a vehicle gone silent is kept (from its reading; a newer one replaces it): DynamoDB's TTL removes it, and the vehicle leaves radius queries and the offline check. Not applied with position_store = valkey."
  type        = number
  default     = 90

  validation {
    condition     = var.position_retention_days >= 1 && var.position_retention_days <= 3650 && floor(var.position_retention_days) == var.position_retention_days
    error_message = "position_retention_days must be a whole number of days from 1 to 3650."
  }
}

variable "alert_retention_days" {
  description = "How many days a cleared alert's record is kept (from its clear): DynamoDB's TTL removes it. Active alerts are kept."
  type        = number
  default     = 90

  validation {
    condition     = var.alert_retention_days >= 1 && var.alert_retention_days <= 3650 && floor(var.alert_retention_days) == var.alert_retention_days
    error_message = "alert_retention_days must be a whole number of days from 1 to 3650."
  }
}

variable "history_retention_days" {
  description = "How many days trips, stops and minute summaries are kept (from their end): DynamoDB's TTL removes older ones (within a few days of expiry)."
  type        = number
  default     = 90

  validation {
    condition     = var.history_retention_days >= 1 && var.history_retention_days <= 3650 && floor(var.history_retention_days) == var.history_retention_days
    error_message = "history_retention_days must be a whole number of days from 1 to 3650."
  }
}

variable "jwt_audiences" {
  description = "Accepted token audiences (for Cognito: the app client ids of devices and operators)."
  type        = list(string)

  validation {
    condition     = length(var.jwt_audiences) > 0
    error_message = "jwt_audiences needs at least one audience."
  }
}

variable "api_throttle_rate" {
  description = "Steady requests per second the API accepts across all clients. The default holds fleet A (5,000 POST/s) with headroom; the account's regional quota for HTTP APIs is 10,000 requests/s unless raised."
  type        = number
  default     = 7500
}

variable "api_throttle_burst" {
  description = "Burst of requests the API accepts above the steady rate."
  type        = number
  default     = 10000
}

variable "api_access_logs" {
  description = "Write an access-log line per API request to CloudWatch Logs. Off by default: at fleet scale it is about $0.15 per million readings (a line of ~300 bytes per POST); API Gateway's own metrics and the functions' logs and metrics remain."
  type        = bool
  default     = false
}

variable "ingest_reserved_concurrency" {
  description = "Concurrent executions reserved for ingest, so that query traffic or other functions in the account cannot starve telemetry intake (fleet A needs about 100 at 20 ms per POST)."
  type        = number
  default     = 200

  validation {
    condition     = var.ingest_reserved_concurrency >= 1
    error_message = "ingest_reserved_concurrency must be at least 1."
  }
}

variable "device_rate_limit" {
  description = "Requests one device (vehicle) may post a second on average, and at once above it. Past it ingest answers 429 with Retry-After (a gateway's items of that vehicle come back as failed, to retry). Counted per ingest execution environment: see docs/deploying.md, \"Per-device limits\"."
  type = object({
    per_second = number
    burst      = number
  })
  default = {
    per_second = 2
    burst      = 20
  }

  validation {
    condition     = var.device_rate_limit.per_second >= 0.001 && var.device_rate_limit.per_second <= 1000000 && var.device_rate_limit.burst >= 1 && floor(var.device_rate_limit.burst) == var.device_rate_limit.burst
    error_message = "device_rate_limit needs per_second between 0.001 and 1000000 and a whole burst of 1 or more."
  }
}

variable "max_metric_names" {
  description = "How many distinct free metric names (a reading's \"metrics\" keys) the deployment takes; ingest refuses a reading with a new name past it (400 for that item). The Timestream archive keeps each name as a measure, and a Timestream table holds at most 8,192."
  type        = number
  default     = 8000

  validation {
    condition     = var.max_metric_names >= 1 && var.max_metric_names <= 8000
    error_message = "max_metric_names must be from 1 to 8000 (Timestream's 8,192 measure names per table, less the fixed fields and a margin)."
  }
}

variable "lambda_system_log_level" {
  description = "Lambda's own log lines per invocation (START, END, REPORT at INFO): WARN keeps them out of CloudWatch Logs, where at one invocation per POST they cost about $0.15 per million readings; Lambda's metrics (duration, errors) do not depend on them."
  type        = string
  default     = "WARN"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARN"], var.lambda_system_log_level)
    error_message = "lambda_system_log_level must be DEBUG, INFO or WARN."
  }
}

variable "iterator_age_alarm_ms" {
  description = "Alarm when a stream function falls this far behind (IteratorAge, milliseconds)."
  type        = number
  default     = 60000
}

variable "alarm_topic_arn" {
  description = "SNS topic for alarm notifications; empty for none."
  type        = string
  default     = ""
}

variable "archive" {
  description = "Where every reading is archived: s3 (time-partitioned JSON objects, queried with Athena) or timestream (for accounts that have Amazon Timestream for LiveAnalytics, closed to new customers since 2025-06-20)."
  type        = string
  default     = "s3"

  validation {
    condition     = contains(["s3", "timestream"], var.archive)
    error_message = "archive must be s3 or timestream."
  }
}

variable "archive_expiration_days" {
  description = "With the S3 archive: days after which readings are deleted."
  type        = number
  default     = 365

  validation {
    condition     = var.archive_expiration_days >= 1
    error_message = "archive_expiration_days must be at least 1."
  }
}

variable "position_store" {
  description = "Where latest positions live: dynamodb (a table with a geohash index; no VPC) or valkey (ElastiCache Serverless for Valkey: the cheapest fresh configuration at fleet scale, docs/cost.md; needs vpc_subnet_ids and vpc_route_table_ids, and the s3 archive)."
  type        = string
  default     = "dynamodb"

  validation {
    condition     = contains(["dynamodb", "valkey"], var.position_store)
    error_message = "position_store must be dynamodb or valkey."
  }
}

variable "vpc_subnet_ids" {
  description = "With position_store or rule_state_store = valkey: private subnets in two or more availability zones, for the cache and for the functions that reach it."
  type        = list(string)
  default     = []
}

variable "vpc_route_table_ids" {
  description = "With a valkey store: the route tables of vpc_subnet_ids, for the (free) DynamoDB and S3 gateway endpoints."
  type        = list(string)
  default     = []
}

variable "valkey_max_storage_gb" {
  description = "With a valkey store: the cache's storage limit (a latest position and its rule state take about 1.5 KB: 100,000 vehicles fit in 0.15 GB; recent_tracks = valkey keeps about 0.4 KB per reading for 65 minutes: 8 GB for fleet A)."
  type        = number
  default     = 1

  validation {
    condition     = var.valkey_max_storage_gb >= 1
    error_message = "valkey_max_storage_gb must be at least 1."
  }
}

variable "valkey_max_ecpu_per_second" {
  description = "With a valkey store: the cache's ECPU-per-second limit, a ceiling on its cost (a position write takes about 4 ECPUs: fleet A's 5,000 readings/s need about 20,000)."
  type        = number
  default     = 100000

  validation {
    condition     = var.valkey_max_ecpu_per_second >= 1000
    error_message = "valkey_max_ecpu_per_second must be at least 1000."
  }
}

variable "rule_state_store" {
  description = "Where the anomaly-inspector keeps per-vehicle rule state: dynamodb (a conditional write per reading) or valkey (the same ElastiCache Serverless cache as position_store = valkey: a few ECPUs per reading, docs/cost.md; needs the VPC variables and bus = kinesis). Alert records stay in DynamoDB either way."
  type        = string
  default     = "dynamodb"

  validation {
    condition     = contains(["dynamodb", "valkey"], var.rule_state_store)
    error_message = "rule_state_store must be dynamodb or valkey."
  }
}

variable "recent_tracks" {
  description = "none, or valkey: keep the last hour of every vehicle's readings in the Valkey cache (the archiver writes them, the query API reads them), so that a recent track reads only that vehicle's readings instead of every archive object of the hour (docs/cost.md). Needs the VPC variables and archive = s3."
  type        = string
  default     = "none"

  validation {
    condition     = contains(["none", "valkey"], var.recent_tracks)
    error_message = "recent_tracks must be none or valkey."
  }
}

variable "tracker_apps" {
  description = "Serve the tracker apps' routes on API Gateway: POST /v1/ingest/osmand (Traccar Client; GET too, for the OsmAnd app) and POST /v1/ingest/owntracks (OwnTracks, HTTP mode). The apps cannot hold a JWT: each device presents its own secret, which ingest verifies with one HMAC and no database read (docs/deploying.md, \"Tracker apps\"). Needs device_secret_key. With ingress = \"function_url\" the routes are on ingest's URL whenever the key is set."
  type        = bool
  default     = false

  validation {
    condition     = !var.tracker_apps || var.device_secret_key != null
    error_message = "tracker_apps needs device_secret_key: the key the devices' secrets are derived from."
  }
}

variable "device_secret_key" {
  description = "The key tracker apps' device secrets are derived from: 32 bytes or more, such as the output of `openssl rand -base64 32`. Pass it as TF_VAR_device_secret_key; it is kept in the Terraform state and in ingest's environment (encrypted at rest by Lambda). A device's secret is issued with `geostream-local device-secret --device-secret-key KEY DEVICE_ID`; a new key revokes every secret at once."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.device_secret_key == null || length(coalesce(var.device_secret_key, "-")) >= 32
    error_message = "device_secret_key must be 32 bytes or more (for example `openssl rand -base64 32`)."
  }
}

variable "revoked_devices" {
  description = "Devices whose secrets ingest refuses (403). Kept in ingest's environment, so it takes effect at the next apply, with no read per request; Lambda's 4 KB environment bounds it to about 150 ids: past that, rotate device_secret_key and issue the remaining devices new secrets."
  type        = list(string)
  default     = []

  validation {
    condition     = length(join(",", var.revoked_devices)) <= 2500
    error_message = "revoked_devices takes at most 2,500 characters joined (Lambda's environment is 4 KB in all): rotate device_secret_key instead."
  }
}
