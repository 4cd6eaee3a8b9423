# The six functions, each with only the actions it calls on only its resources, and the event
# source mappings (Kinesis, or self-managed Kafka with bus = kafka) of the three stream
# functions.

locals {
  artifact = { for f in ["ingest", "geo-update", "archiver", "anomaly-inspector", "query-api", "offline-check"] : f => "${var.lambda_artifacts_dir}/geostream-${f}/bootstrap.zip" }

  # The SASL/SCRAM secret of the Kafka brokers, for the event source mappings and the
  # functions that produce (none when the brokers need no authentication), and the
  # customer-managed KMS key it is encrypted with (MSK requires one for SCRAM secrets).
  kafka_secret_statements = var.bus == "kafka" && var.kafka_secret_arn != "" ? concat([
    {
      sid       = "ReadKafkaSecret"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [var.kafka_secret_arn]
    },
    ], var.kafka_secret_kms_key_arn != "" ? [
    {
      sid       = "DecryptKafkaSecret"
      actions   = ["kms:Decrypt"]
      resources = [var.kafka_secret_kms_key_arn]
    },
  ] : []) : []

  # What Lambda's event source mapping needs to read the telemetry stream (or the Kafka
  # brokers' secret) and report failures.
  stream_reader_statements = concat(var.bus == "kinesis" ? [
    {
      sid       = "ReadTelemetryStream"
      actions   = ["kinesis:DescribeStream", "kinesis:DescribeStreamSummary", "kinesis:GetRecords", "kinesis:GetShardIterator", "kinesis:ListShards"]
      resources = [aws_kinesis_stream.telemetry[0].arn]
    },
    {
      sid       = "ListStreams"
      actions   = ["kinesis:ListStreams"]
      resources = ["*"]
    },
    ] : local.kafka_secret_statements, [
    {
      sid       = "ReportStreamFailures"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.stream_failures.arn]
    },
  ])

  # Who may do what (shared/lambda/src/identity.rs): the HTTP functions check the token's
  # scopes again after API Gateway's authorizer, and bind a device token to its vehicle.
  access_environment = {
    AUTHORIZATION             = "jwt"
    DEVICE_CLAIM              = var.device_claim
    SCOPE_TELEMETRY_WRITE     = var.scopes.telemetry_write
    SCOPE_TELEMETRY_WRITE_ANY = var.scopes.telemetry_write_any
    SCOPE_FLEET_READ          = var.scopes.fleet_read
    SCOPE_ALERTS_ACK          = var.scopes.alerts_ack
    SCOPE_GEOFENCES_WRITE     = var.scopes.geofences_write
  }

  # Fleet events' stores (docs/fleet-events.md), for the anomaly-inspector and the query API.
  fleet_environment = {
    GEOFENCES_TABLE            = aws_dynamodb_table.geofences.name
    FLEET_EVENTS_TABLE         = aws_dynamodb_table.fleet_events.name
    GEOFENCE_OCCUPANTS_TABLE   = aws_dynamodb_table.geofence_occupants.name
    FLEET_EVENT_RETENTION_DAYS = tostring(var.fleet_event_retention_days)
  }

  # Trips, stops and summaries (docs/history.md), for the anomaly-inspector and the query API.
  history_environment = {
    HISTORY_TABLE          = aws_dynamodb_table.history.name
    HISTORY_RETENTION_DAYS = tostring(var.history_retention_days)
  }

  # What a function that makes fleet events writes: the events, and who is inside (an enter
  # puts, an exit deletes).
  fleet_event_statements = [
    {
      sid       = "RecordFleetEvents"
      actions   = ["dynamodb:PutItem"]
      resources = [aws_dynamodb_table.fleet_events.arn]
    },
    {
      sid       = "GeofenceOccupants"
      actions   = ["dynamodb:PutItem", "dynamodb:DeleteItem"]
      resources = [aws_dynamodb_table.geofence_occupants.arn]
    },
  ]

  # The bus the deployment chose (variable bus), for every function that reads it.
  kafka_environment = {
    BUS                     = var.bus
    KAFKA_BOOTSTRAP_SERVERS = var.bus == "kafka" ? var.kafka_bootstrap_servers : ""
    KAFKA_SECRET_ARN        = var.bus == "kafka" ? var.kafka_secret_arn : ""
  }

  # Where a stream function sends what it gives up on, and when it gives up: on the last
  # attempt the mapping makes, or near the record's maximum age (then Lambda's on-failure
  # destination would get only the record's position).
  dead_letter_environment = {
    DEAD_LETTER_QUEUE_URL         = aws_sqs_queue.dead_letters.url
    DEAD_LETTER_BUCKET            = aws_s3_bucket.dead_letters.bucket
    STREAM_MAX_RETRIES            = tostring(var.stream_max_retries)
    STREAM_MAX_RECORD_AGE_SECONDS = tostring(var.stream_max_record_age_seconds)
  }

  dead_letter_statements = [
    {
      sid       = "SendDeadLetters"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.dead_letters.arn]
    },
    {
      sid       = "SpillDeadLetters"
      actions   = ["s3:PutObject"]
      resources = ["${aws_s3_bucket.dead_letters.arn}/dead-letters/*"]
    },
  ]

  # Timestream resolves its cell endpoints through DescribeEndpoints, which takes no resource.
  timestream_endpoints_statement = {
    sid       = "TimestreamEndpoints"
    actions   = ["timestream:DescribeEndpoints"]
    resources = ["*"]
  }

  # The archive the deployment chose (variable archive), for the archiver and the query API.
  archive_environment = {
    ARCHIVE             = var.archive
    RECENT_TRACKS       = var.recent_tracks
    VALKEY_URL          = local.valkey_url
    ARCHIVE_BUCKET      = var.archive == "s3" ? aws_s3_bucket.archive[0].bucket : ""
    TIMESTREAM_DATABASE = var.archive == "timestream" ? aws_timestreamwrite_database.archive[0].database_name : ""
    TIMESTREAM_TABLE    = var.archive == "timestream" ? aws_timestreamwrite_table.readings[0].table_name : ""
  }

  archive_write_statements = var.archive == "s3" ? [
    {
      sid       = "WriteArchive"
      actions   = ["s3:PutObject"]
      resources = ["${aws_s3_bucket.archive[0].arn}/readings/*"]
    },
    ] : [
    {
      sid       = "WriteReadings"
      actions   = ["timestream:WriteRecords"]
      resources = [aws_timestreamwrite_table.readings[0].arn]
    },
    local.timestream_endpoints_statement,
  ]

  archive_read_statements = var.archive == "s3" ? [
    {
      sid       = "ListArchive"
      actions   = ["s3:ListBucket"]
      resources = [aws_s3_bucket.archive[0].arn]
    },
    {
      sid       = "ReadArchive"
      actions   = ["s3:GetObject"]
      resources = ["${aws_s3_bucket.archive[0].arn}/readings/*"]
    },
    ] : [
    {
      sid       = "ReadTracks"
      actions   = ["timestream:Select"]
      resources = [aws_timestreamwrite_table.readings[0].arn]
    },
    local.timestream_endpoints_statement,
  ]
}

module "ingest" {
  source               = "./modules/function"
  name                 = "${var.name_prefix}-ingest"
  description          = "POST /v1/telemetry: validates readings and publishes them to the telemetry stream"
  zip_path             = local.artifact["ingest"]
  reserved_concurrency = var.ingest_reserved_concurrency
  log_retention_days   = var.log_retention_days
  system_log_level     = var.lambda_system_log_level
  environment = merge(local.kafka_environment, local.access_environment, {
    # Behind a Function URL no authorizer runs: ingest verifies the tokens itself.
    AUTHORIZATION      = var.ingress == "function_url" ? "jwt_in_function" : "jwt"
    JWT_ISSUER         = var.jwt_issuer
    JWT_AUDIENCES      = join(",", var.jwt_audiences)
    JWKS_URL           = var.jwks_url
    TELEMETRY_STREAM   = var.bus == "kinesis" ? aws_kinesis_stream.telemetry[0].name : ""
    TELEMETRY_TOPIC    = var.bus == "kafka" ? var.kafka_telemetry_topic : ""
    METRIC_NAMES_TABLE = aws_dynamodb_table.metric_names.name
    # Per-device limits, counted in each execution environment.
    DEVICE_RATE_PER_SECOND = tostring(var.device_rate_limit.per_second)
    DEVICE_RATE_BURST      = tostring(var.device_rate_limit.burst)
    MAX_METRIC_NAMES       = tostring(var.max_metric_names)
    # Tracker apps' device secrets: without a key their routes answer 404.
    DEVICE_SECRET_KEY = var.device_secret_key == null ? "" : var.device_secret_key
    REVOKED_DEVICES   = join(",", var.revoked_devices)
  })
  policy_statements = concat(var.bus == "kinesis" ? [
    {
      sid       = "PublishTelemetry"
      actions   = ["kinesis:PutRecords"]
      resources = [aws_kinesis_stream.telemetry[0].arn]
    },
    ] : local.kafka_secret_statements, [
    {
      sid       = "AdmitMetricNames"
      actions   = ["dynamodb:BatchGetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"]
      resources = [aws_dynamodb_table.metric_names.arn]
    },
  ])
}

module "geo_update" {
  source             = "./modules/function"
  name               = "${var.name_prefix}-geo-update"
  description        = "Keeps the latest position of every vehicle and its geo index"
  zip_path           = local.artifact["geo-update"]
  log_retention_days = var.log_retention_days
  system_log_level   = var.lambda_system_log_level
  vpc                = local.positions_vpc
  environment = merge(local.position_environment, local.dead_letter_environment, {
    BUS = var.bus
  })
  policy_statements = concat(local.stream_reader_statements, var.position_store == "dynamodb" ? [
    {
      sid       = "WritePositions"
      actions   = ["dynamodb:PutItem"]
      resources = [aws_dynamodb_table.positions.arn]
    },
  ] : [], local.dead_letter_statements)
}

module "archiver" {
  source             = "./modules/function"
  name               = "${var.name_prefix}-archiver"
  description        = "Archives every reading (S3 or Timestream)"
  zip_path           = local.artifact["archiver"]
  log_retention_days = var.log_retention_days
  vpc                = local.archiver_vpc
  system_log_level   = var.lambda_system_log_level
  timeout_seconds    = 60
  environment = merge(local.archive_environment, local.dead_letter_environment, {
    BUS = var.bus
  })
  policy_statements = concat(local.stream_reader_statements, local.archive_write_statements, local.dead_letter_statements)
}

module "anomaly_inspector" {
  source             = "./modules/function"
  name               = "${var.name_prefix}-anomaly-inspector"
  description        = "Evaluates the rules per vehicle, keeps alert state, publishes raise and clear"
  zip_path           = local.artifact["anomaly-inspector"]
  log_retention_days = var.log_retention_days
  system_log_level   = var.lambda_system_log_level
  vpc                = local.rule_state_vpc
  environment = merge(local.kafka_environment, local.rule_state_environment, local.dead_letter_environment, local.fleet_environment, local.history_environment, {
    ALERTS_TABLE  = aws_dynamodb_table.alerts.name
    ALERTS_STREAM = var.bus == "kinesis" ? aws_kinesis_stream.alerts[0].name : ""
    ALERTS_TOPIC  = var.bus == "kafka" ? var.kafka_alerts_topic : ""
  })
  policy_statements = concat(local.stream_reader_statements, var.rule_state_store == "dynamodb" ? [
    {
      # A state change alone is a conditional PutItem; with the alerts it touched, one
      # TransactWriteItems call, which DynamoDB authorises as the PutItem, UpdateItem and
      # DeleteItem inside it (a delete: an alert a late reading undid).
      sid       = "RuleState"
      actions   = ["dynamodb:GetItem", "dynamodb:PutItem"]
      resources = [aws_dynamodb_table.alert_state.arn]
    },
    ] : [], [
    {
      sid       = "AlertRecords"
      actions   = ["dynamodb:UpdateItem", "dynamodb:DeleteItem"]
      resources = [aws_dynamodb_table.alerts.arn]
    },
    {
      # The geofence cache: the version item every 30 s, the table when it changed.
      sid       = "ReadGeofences"
      actions   = ["dynamodb:GetItem", "dynamodb:Scan"]
      resources = [aws_dynamodb_table.geofences.arn]
    },
    {
      # Trips, stops and minutes as they complete.
      sid       = "WriteHistory"
      actions   = ["dynamodb:BatchWriteItem"]
      resources = [aws_dynamodb_table.history.arn]
    },
    ], local.fleet_event_statements, local.dead_letter_statements, var.bus == "kinesis" ? [
    {
      sid       = "PublishAlerts"
      actions   = ["kinesis:PutRecords"]
      resources = [aws_kinesis_stream.alerts[0].arn]
    },
  ] : local.kafka_secret_statements)
}

module "query_api" {
  source             = "./modules/function"
  name               = "${var.name_prefix}-query-api"
  description        = "Vehicles by id and near a point, tracks, alerts and acknowledgements"
  zip_path           = local.artifact["query-api"]
  log_retention_days = var.log_retention_days
  system_log_level   = var.lambda_system_log_level
  vpc                = local.query_api_vpc
  environment = merge(local.archive_environment, local.position_environment, local.access_environment, local.fleet_environment, local.history_environment, {
    ALERT_STATE_TABLE = aws_dynamodb_table.alert_state.name
    ALERTS_TABLE      = aws_dynamodb_table.alerts.name
  })
  policy_statements = concat(var.position_store == "dynamodb" ? [
    {
      # Scan: a circle spanning more geo-index cells than a query reads (near a pole).
      sid       = "ReadPositions"
      actions   = ["dynamodb:GetItem", "dynamodb:Scan"]
      resources = [aws_dynamodb_table.positions.arn]
    },
    {
      sid       = "QueryGeoIndex"
      actions   = ["dynamodb:Query"]
      resources = ["${aws_dynamodb_table.positions.arn}/index/geo-index"]
    },
    ] : [], [
    {
      # BatchGetItem: the alerts indexes hold keys only, listed alerts are fetched by key.
      sid       = "ReadAndAcknowledgeAlerts"
      actions   = ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"]
      resources = [aws_dynamodb_table.alerts.arn]
    },
    {
      sid       = "ListAlerts"
      actions   = ["dynamodb:Query"]
      resources = ["${aws_dynamodb_table.alerts.arn}/index/by-state", "${aws_dynamodb_table.alerts.arn}/index/by-device"]
    },
    {
      # A write or delete is one TransactWriteItems with the version item's UpdateItem,
      # authorised as the PutItem or DeleteItem and the UpdateItem inside it.
      sid       = "Geofences"
      actions   = ["dynamodb:GetItem", "dynamodb:Scan", "dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:UpdateItem"]
      resources = [aws_dynamodb_table.geofences.arn]
    },
    {
      # A deleted geofence's occupants are forgotten.
      sid       = "ForgetOccupants"
      actions   = ["dynamodb:DeleteItem"]
      resources = [aws_dynamodb_table.geofence_occupants.arn]
    },
    {
      sid       = "ListFleetEvents"
      actions   = ["dynamodb:Query"]
      resources = ["${aws_dynamodb_table.fleet_events.arn}/index/by-device", "${aws_dynamodb_table.fleet_events.arn}/index/by-day", "${aws_dynamodb_table.fleet_events.arn}/index/by-geofence", "${aws_dynamodb_table.geofence_occupants.arn}/index/by-geofence"]
    },
    {
      sid       = "ReadHistory"
      actions   = ["dynamodb:Query"]
      resources = [aws_dynamodb_table.history.arn]
    },
  ], local.archive_read_statements)
}

# device_offline for vehicles gone silent (docs/fleet-events.md): every minute, a Scan of the
# positions table for the candidates, each checked and committed against its own rule state.
# With positions in Valkey there is no table to scan: not deployed.
module "offline_check" {
  count              = var.position_store == "dynamodb" ? 1 : 0
  source             = "./modules/function"
  name               = "${var.name_prefix}-offline-check"
  description        = "Every minute: device_offline for vehicles gone silent"
  zip_path           = local.artifact["offline-check"]
  log_retention_days = var.log_retention_days
  system_log_level   = var.lambda_system_log_level
  vpc                = local.rule_state_vpc
  timeout_seconds    = 60
  environment = merge(local.kafka_environment, local.rule_state_environment, local.position_environment, local.fleet_environment, {
    ALERTS_TABLE          = aws_dynamodb_table.alerts.name
    ALERTS_STREAM         = var.bus == "kinesis" ? aws_kinesis_stream.alerts[0].name : ""
    ALERTS_TOPIC          = var.bus == "kafka" ? var.kafka_alerts_topic : ""
    DEAD_LETTER_QUEUE_URL = aws_sqs_queue.dead_letters.url
    DEAD_LETTER_BUCKET    = aws_s3_bucket.dead_letters.bucket
  })
  policy_statements = concat(var.rule_state_store == "dynamodb" ? [
    {
      sid       = "RuleState"
      actions   = ["dynamodb:GetItem", "dynamodb:PutItem"]
      resources = [aws_dynamodb_table.alert_state.arn]
    },
    ] : [], [
    {
      sid       = "ScanPositions"
      actions   = ["dynamodb:Scan"]
      resources = [aws_dynamodb_table.positions.arn]
    },
    ], local.fleet_event_statements, local.dead_letter_statements, var.bus == "kinesis" ? [
    {
      sid       = "PublishAlerts"
      actions   = ["kinesis:PutRecords"]
      resources = [aws_kinesis_stream.alerts[0].arn]
    },
  ] : local.kafka_secret_statements)
}

resource "aws_cloudwatch_event_rule" "offline_check" {
  count               = var.position_store == "dynamodb" ? 1 : 0
  name                = "${var.name_prefix}-offline-check"
  description         = "Runs the offline check: device_offline for vehicles gone silent"
  schedule_expression = var.offline_check_schedule
}

resource "aws_cloudwatch_event_target" "offline_check" {
  count = var.position_store == "dynamodb" ? 1 : 0
  rule  = aws_cloudwatch_event_rule.offline_check[0].name
  arn   = module.offline_check[0].arn
}

resource "aws_lambda_permission" "offline_check" {
  count         = var.position_store == "dynamodb" ? 1 : 0
  statement_id  = "AllowTheOfflineCheckSchedule"
  action        = "lambda:InvokeFunction"
  function_name = module.offline_check[0].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.offline_check[0].arn
}

locals {
  stream_functions = {
    "geo-update"        = module.geo_update.arn
    "archiver"          = module.archiver.arn
    "anomaly-inspector" = module.anomaly_inspector.arn
  }
}

resource "aws_lambda_event_source_mapping" "telemetry" {
  for_each = var.bus == "kinesis" ? local.stream_functions : {}

  function_name                      = each.value
  event_source_arn                   = aws_kinesis_stream.telemetry[0].arn
  starting_position                  = "TRIM_HORIZON"
  batch_size                         = each.key == "archiver" ? var.archiver_batch_size : var.stream_batch_size
  maximum_batching_window_in_seconds = each.key == "archiver" ? var.archiver_batching_window_seconds : var.stream_batching_window_seconds
  bisect_batch_on_function_error     = true
  maximum_retry_attempts             = var.stream_max_retries
  maximum_record_age_in_seconds      = var.stream_max_record_age_seconds
  function_response_types            = ["ReportBatchItemFailures"]

  destination_config {
    on_failure {
      destination_arn = aws_sqs_queue.stream_failures.arn
    }
  }
}

# With bus = kafka: Lambda polls the cluster as consumer group PREFIX-FUNCTION per stream
# function, in provisioned mode (which the retry, bisect and partial-batch settings need), and
# authenticates with the SASL/SCRAM secret.
resource "aws_lambda_event_source_mapping" "kafka_telemetry" {
  for_each = var.bus == "kafka" ? local.stream_functions : {}

  function_name                      = each.value
  topics                             = [var.kafka_telemetry_topic]
  starting_position                  = "TRIM_HORIZON"
  batch_size                         = each.key == "archiver" ? var.archiver_batch_size : var.stream_batch_size
  maximum_batching_window_in_seconds = each.key == "archiver" ? var.archiver_batching_window_seconds : var.stream_batching_window_seconds
  bisect_batch_on_function_error     = true
  maximum_retry_attempts             = var.stream_max_retries
  maximum_record_age_in_seconds      = var.stream_max_record_age_seconds
  function_response_types            = ["ReportBatchItemFailures"]

  self_managed_event_source {
    endpoints = {
      KAFKA_BOOTSTRAP_SERVERS = var.kafka_bootstrap_servers
    }
  }

  self_managed_kafka_event_source_config {
    consumer_group_id = "${var.name_prefix}-${each.key}"
  }

  dynamic "source_access_configuration" {
    for_each = var.kafka_secret_arn == "" ? [] : [var.kafka_secret_arn]
    content {
      type = "SASL_SCRAM_512_AUTH"
      uri  = source_access_configuration.value
    }
  }

  provisioned_poller_config {
    minimum_pollers = 1
    maximum_pollers = var.kafka_max_pollers
  }

  destination_config {
    on_failure {
      destination_arn = aws_sqs_queue.stream_failures.arn
    }
  }
}
