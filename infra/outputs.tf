output "api_url" {
  description = "Base URL of the API: queries, and POST $api_url/v1/telemetry with a bearer token unless ingress = function_url."
  value       = aws_apigatewayv2_stage.default.invoke_url
}

output "telemetry_url" {
  description = "Where devices POST telemetry with a bearer token: the API's /v1/telemetry, or ingest's Function URL with ingress = function_url."
  value       = var.ingress == "function_url" ? "${trimsuffix(aws_lambda_function_url.ingest[0].function_url, "/")}/v1/telemetry" : "${aws_apigatewayv2_stage.default.invoke_url}/v1/telemetry"
}

output "telemetry_stream" {
  description = "Where telemetry records go: the Kinesis stream, or the Kafka topic with bus = kafka."
  value       = var.bus == "kinesis" ? aws_kinesis_stream.telemetry[0].name : var.kafka_telemetry_topic
}

output "alerts_stream" {
  description = "Where alert raise and clear transitions go: the Kinesis stream, or the Kafka topic with bus = kafka."
  value       = var.bus == "kinesis" ? aws_kinesis_stream.alerts[0].name : var.kafka_alerts_topic
}

output "tables" {
  description = "DynamoDB tables."
  value = {
    positions   = aws_dynamodb_table.positions.name
    alert_state = aws_dynamodb_table.alert_state.name
    alerts      = aws_dynamodb_table.alerts.name
  }
}

output "dead_letter_queue_url" {
  description = "Records the functions gave up on, with reasons."
  value       = aws_sqs_queue.dead_letters.url
}

output "stream_failures_queue_url" {
  description = "Batches the event source mappings gave up on."
  value       = aws_sqs_queue.stream_failures.url
}

output "dashboard" {
  description = "CloudWatch dashboard name."
  value       = aws_cloudwatch_dashboard.pipeline.dashboard_name
}

output "archive" {
  description = "Where readings are archived: the S3 bucket and Athena (Glue) table, or the Timestream table."
  value = var.archive == "s3" ? {
    kind   = "s3"
    bucket = aws_s3_bucket.archive[0].bucket
    athena = "${aws_glue_catalog_database.archive[0].name}.${aws_glue_catalog_table.readings[0].name}"
    } : {
    kind   = "timestream"
    bucket = ""
    athena = "${aws_timestreamwrite_database.archive[0].database_name}.${aws_timestreamwrite_table.readings[0].table_name}"
  }
}
