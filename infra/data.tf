# The bus, the stores and the dead-letter queues.

resource "aws_kinesis_stream" "telemetry" {
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
    projection_type = "ALL"
  }

  global_secondary_index {
    name            = "by-device"
    hash_key        = "device_id"
    range_key       = "started_at"
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
  database_name = "${var.name_prefix}-archive"
}

resource "aws_timestreamwrite_table" "readings" {
  database_name = aws_timestreamwrite_database.archive.database_name
  table_name    = "readings"

  retention_properties {
    memory_store_retention_period_in_hours  = var.timestream_memory_retention_hours
    magnetic_store_retention_period_in_days = var.timestream_magnetic_retention_days
  }

  magnetic_store_write_properties {
    enable_magnetic_store_writes = true
  }
}

# Records a function gave up on, with the reason (written by the functions).
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
