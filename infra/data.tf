# The bus, the stores and the dead-letter queues.

resource "aws_kinesis_stream" "telemetry" {
  count            = var.bus == "kinesis" ? 1 : 0
  name             = "${var.name_prefix}-telemetry"
  shard_count      = var.stream_mode == "PROVISIONED" ? var.telemetry_shards : null
  retention_period = var.stream_retention_hours
  encryption_type  = "KMS"
  kms_key_id       = "alias/aws/kinesis"

  stream_mode_details {
    stream_mode = var.stream_mode
  }
}

resource "aws_kinesis_stream" "alerts" {
  count            = var.bus == "kinesis" ? 1 : 0
  name             = "${var.name_prefix}-alerts"
  shard_count      = var.stream_mode == "PROVISIONED" ? 1 : null
  retention_period = var.stream_retention_hours
  encryption_type  = "KMS"
  kms_key_id       = "alias/aws/kinesis"

  stream_mode_details {
    stream_mode = var.stream_mode
  }
}

# Latest position per vehicle, with the sharded geohash index (see shared/aws/src/dynamodb.rs).
resource "aws_dynamodb_table" "positions" {
  name         = "${var.name_prefix}-positions"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "device_id"

  attribute {
    name = "device_id"
    type = "S"
  }

  attribute {
    name = "geo_pk"
    type = "S"
  }

  attribute {
    name = "geohash"
    type = "S"
  }

  global_secondary_index {
    name            = "geo-index"
    hash_key        = "geo_pk"
    range_key       = "geohash"
    projection_type = "ALL"
  }

  # The position of a vehicle gone silent goes position_retention_days after its reading.
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

# The deployment's free metric names, one item each, and their count (item "#count"): ingest
# refuses a new name once the count reaches max_metric_names (shared/aws/src/metric_names.rs).
resource "aws_dynamodb_table" "metric_names" {
  name         = "${var.name_prefix}-metric-names"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "name"

  attribute {
    name = "name"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

resource "aws_dynamodb_table" "alert_state" {
  name         = "${var.name_prefix}-alert-state"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "device_id"

  attribute {
    name = "device_id"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

resource "aws_dynamodb_table" "alerts" {
  name         = "${var.name_prefix}-alerts"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "alert_id"

  attribute {
    name = "alert_id"
    type = "S"
  }

  attribute {
    name = "state"
    type = "S"
  }

  attribute {
    name = "device_id"
    type = "S"
  }

  attribute {
    name = "started_at"
    type = "N"
  }

  global_secondary_index {
    name            = "by-state"
    hash_key        = "state"
    range_key       = "started_at"
    projection_type = "KEYS_ONLY"
  }

  global_secondary_index {
    name            = "by-device"
    hash_key        = "device_id"
    range_key       = "started_at"
    projection_type = "KEYS_ONLY"
  }

  # A cleared alert goes alert_retention_days after its clear; an active one stays.
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

# Fleet events (docs/fleet-events.md): geofences, with a version item bumped with every write
# (the anomaly-inspector's cache reads it, not the table); the events, kept
# var.fleet_event_retention_days by DynamoDB's TTL, written once and never changed (so their
# indexes hold whole items at no later cost); who is inside each geofence.
resource "aws_dynamodb_table" "geofences" {
  name         = "${var.name_prefix}-geofences"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "geofence_id"

  attribute {
    name = "geofence_id"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

resource "aws_dynamodb_table" "fleet_events" {
  name         = "${var.name_prefix}-fleet-events"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "event_id"

  attribute {
    name = "event_id"
    type = "S"
  }

  attribute {
    name = "device_id"
    type = "S"
  }

  attribute {
    name = "day"
    type = "S"
  }

  attribute {
    name = "geofence_id"
    type = "S"
  }

  attribute {
    name = "ts"
    type = "N"
  }

  global_secondary_index {
    name            = "by-device"
    hash_key        = "device_id"
    range_key       = "ts"
    projection_type = "ALL"
  }

  global_secondary_index {
    name            = "by-day"
    hash_key        = "day"
    range_key       = "ts"
    projection_type = "ALL"
  }

  global_secondary_index {
    name            = "by-geofence"
    hash_key        = "geofence_id"
    range_key       = "ts"
    projection_type = "ALL"
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

# Trips, stops and minute summaries (docs/history.md): a vehicle's items of one kind and time
# range are one key range (item_key = "{kind}#{start}"); DynamoDB's TTL is the retention.
resource "aws_dynamodb_table" "history" {
  name         = "${var.name_prefix}-history"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "device_id"
  range_key    = "item_key"

  attribute {
    name = "device_id"
    type = "S"
  }

  attribute {
    name = "item_key"
    type = "S"
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

resource "aws_dynamodb_table" "geofence_occupants" {
  name         = "${var.name_prefix}-geofence-occupants"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "occupant_id"

  attribute {
    name = "occupant_id"
    type = "S"
  }

  attribute {
    name = "geofence_id"
    type = "S"
  }

  attribute {
    name = "device_id"
    type = "S"
  }

  global_secondary_index {
    name            = "by-geofence"
    hash_key        = "geofence_id"
    range_key       = "device_id"
    projection_type = "ALL"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

resource "aws_timestreamwrite_database" "archive" {
  count         = var.archive == "timestream" ? 1 : 0
  database_name = "${var.name_prefix}-archive"
}

resource "aws_timestreamwrite_table" "readings" {
  count         = var.archive == "timestream" ? 1 : 0
  database_name = aws_timestreamwrite_database.archive[0].database_name
  table_name    = "readings"

  retention_properties {
    memory_store_retention_period_in_hours  = var.timestream_memory_retention_hours
    magnetic_store_retention_period_in_days = var.timestream_magnetic_retention_days
  }

  # Readings older than the memory store's retention go to the magnetic store, which refuses
  # records asynchronously (after WriteRecords answered): its error reports land beside the
  # dead letters, under timestream-rejected/, where the operator's runbook looks.
  magnetic_store_write_properties {
    enable_magnetic_store_writes = true

    magnetic_store_rejected_data_location {
      s3_configuration {
        bucket_name       = aws_s3_bucket.dead_letters.bucket
        object_key_prefix = "timestream-rejected/"
        encryption_option = "SSE_S3"
      }
    }
  }
}

# The S3 archive: readings/date=YYYY-MM-DD/hour=HH/<digest>.jsonl.gz (see shared/aws/src/s3archive.rs),
# described to Athena by a Glue table with partition projection.
resource "aws_s3_bucket" "archive" {
  count         = var.archive == "s3" ? 1 : 0
  bucket_prefix = "${var.name_prefix}-archive-"
}

resource "aws_s3_bucket_public_access_block" "archive" {
  count                   = var.archive == "s3" ? 1 : 0
  bucket                  = aws_s3_bucket.archive[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "archive" {
  count  = var.archive == "s3" ? 1 : 0
  bucket = aws_s3_bucket.archive[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "archive" {
  count  = var.archive == "s3" ? 1 : 0
  bucket = aws_s3_bucket.archive[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "archive" {
  count  = var.archive == "s3" ? 1 : 0
  bucket = aws_s3_bucket.archive[0].id

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  rule {
    id     = "expire-readings"
    status = "Enabled"

    filter {
      prefix = "readings/"
    }

    expiration {
      days = var.archive_expiration_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 7
    }
  }
}

resource "aws_glue_catalog_database" "archive" {
  count = var.archive == "s3" ? 1 : 0
  name  = replace("${var.name_prefix}_archive", "-", "_")
}

resource "aws_glue_catalog_table" "readings" {
  count         = var.archive == "s3" ? 1 : 0
  name          = "readings"
  database_name = aws_glue_catalog_database.archive[0].name
  table_type    = "EXTERNAL_TABLE"

  parameters = {
    "classification"            = "json"
    "projection.enabled"        = "true"
    "projection.date.type"      = "date"
    "projection.date.format"    = "yyyy-MM-dd"
    "projection.date.range"     = "2025-01-01,NOW"
    "projection.hour.type"      = "integer"
    "projection.hour.range"     = "0,23"
    "projection.hour.digits"    = "2"
    "storage.location.template" = "s3://${aws_s3_bucket.archive[0].bucket}/readings/date=$${date}/hour=$${hour}/"
  }

  partition_keys {
    name = "date"
    type = "string"
  }

  partition_keys {
    name = "hour"
    type = "string"
  }

  storage_descriptor {
    location      = "s3://${aws_s3_bucket.archive[0].bucket}/readings/"
    input_format  = "org.apache.hadoop.mapred.TextInputFormat"
    output_format = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat"

    ser_de_info {
      serialization_library = "org.openx.data.jsonserde.JsonSerDe"
    }

    dynamic "columns" {
      for_each = {
        device_id         = "string"
        ts                = "bigint"
        event_id          = "string"
        lat               = "double"
        lon               = "double"
        speed_kmh         = "double"
        heading_deg       = "double"
        engine_temp_c     = "double"
        battery_temp_c    = "double"
        battery_soc_pct   = "double"
        tire_pressure_psi = "double"
        fuel_pct          = "double"
        temperature_c     = "double"
        humidity_pct      = "double"
        metrics           = "map<string,double>"
      }
      content {
        name = columns.key
        type = columns.value
      }
    }
  }
}

# Records a function gave up on, whole, with the reason (written by the functions; read by
# `geostream-local redrive`).
resource "aws_sqs_queue" "dead_letters" {
  name                      = "${var.name_prefix}-dead-letters"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

# Batches the event source mappings gave up on (written by Lambda: shard, sequence range).
resource "aws_sqs_queue" "stream_failures" {
  name                      = "${var.name_prefix}-stream-failures"
  message_retention_seconds = 1209600
  sqs_managed_sse_enabled   = true
}

# Dead letters too large for an SQS message (over 250 KiB): the message points to the letter
# here, under dead-letters/FUNCTION/. Kept as long as the queue keeps its messages, and a day.
resource "aws_s3_bucket" "dead_letters" {
  bucket_prefix = "${var.name_prefix}-dead-letters-"
}

resource "aws_s3_bucket_public_access_block" "dead_letters" {
  bucket                  = aws_s3_bucket.dead_letters.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "dead_letters" {
  bucket = aws_s3_bucket.dead_letters.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "dead_letters" {
  bucket = aws_s3_bucket.dead_letters.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "dead_letters" {
  bucket = aws_s3_bucket.dead_letters.id

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  rule {
    id     = "expire-timestream-rejections"
    status = "Enabled"

    filter {
      prefix = "timestream-rejected/"
    }

    expiration {
      days = 15
    }

    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  rule {
    id     = "expire-dead-letters"
    status = "Enabled"

    filter {
      prefix = "dead-letters/"
    }

    expiration {
      days = 15
    }

    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }
}
