# Alarms on what tells an operator the pipeline is in trouble: stream functions falling behind,
# function errors and throttles, and anything landing in the dead-letter queues.

locals {
  alarm_actions = var.alarm_topic_arn == "" ? [] : [var.alarm_topic_arn]
  all_functions = {
    "ingest"            = module.ingest.function_name
    "geo-update"        = module.geo_update.function_name
    "archiver"          = module.archiver.function_name
    "anomaly-inspector" = module.anomaly_inspector.function_name
    "query-api"         = module.query_api.function_name
  }
  # Errors and throttles are watched for the offline check too, where it is deployed.
  alarmed_functions = merge(local.all_functions, var.position_store == "dynamodb" ? {
    "offline-check" = module.offline_check[0].function_name
  } : {})
}

# On Kinesis, how old the records are when read (ms); on Kafka, how many records the consumer
# group is behind (OffsetLag).
resource "aws_cloudwatch_metric_alarm" "iterator_age" {
  for_each = local.stream_functions

  alarm_name          = "${var.name_prefix}-${each.key}-${var.bus == "kafka" ? "offset-lag" : "iterator-age"}"
  alarm_description   = var.bus == "kafka" ? "${each.key} is more than ${var.offset_lag_alarm_records} records behind the telemetry topic" : "${each.key} is more than ${var.iterator_age_alarm_ms} ms behind the telemetry stream"
  namespace           = "AWS/Lambda"
  metric_name         = var.bus == "kafka" ? "OffsetLag" : "IteratorAge"
  dimensions          = { FunctionName = local.all_functions[each.key] }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  threshold           = var.bus == "kafka" ? var.offset_lag_alarm_records : var.iterator_age_alarm_ms
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
}

# Errors and throttles of every function: any at all, three minutes running.
resource "aws_cloudwatch_metric_alarm" "function_health" {
  for_each = {
    for pair in setproduct(keys(local.alarmed_functions), ["Errors", "Throttles"]) :
    "${pair[0]}-${lower(pair[1])}" => { function = pair[0], metric = pair[1] }
  }

  alarm_name          = "${var.name_prefix}-${each.key}"
  alarm_description   = "${each.value.function}: ${lower(each.value.metric)} in its invocations"
  namespace           = "AWS/Lambda"
  metric_name         = each.value.metric
  dimensions          = { FunctionName = local.alarmed_functions[each.value.function] }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "dead_letters" {
  for_each = {
    "dead-letters"    = aws_sqs_queue.dead_letters.name
    "stream-failures" = aws_sqs_queue.stream_failures.name
  }

  alarm_name          = "${var.name_prefix}-${each.key}-depth"
  alarm_description   = "Records are waiting in ${each.value}: read their reasons"
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = each.value }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
}

# The dashboard is drawn from infra/dashboard.json, the same definition geostream-local's live
# page draws; modules/dashboard renders it (and `terraform test` checks the rendering offline).
module "dashboard" {
  source = "./modules/dashboard"

  definition = file("${path.module}/dashboard.json")
  region     = data.aws_region.current.region
  functions  = local.all_functions
  queues = {
    "dead-letters"    = aws_sqs_queue.dead_letters.name
    "stream-failures" = aws_sqs_queue.stream_failures.name
  }
}

resource "aws_cloudwatch_dashboard" "pipeline" {
  dashboard_name = "${var.name_prefix}-pipeline"
  dashboard_body = module.dashboard.body
}
