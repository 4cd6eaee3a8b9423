# Renders the one dashboard definition (infra/dashboard.json, which geostream-local's live page
# also draws) into a CloudWatch dashboard body. No provider and no resource here, so that
# `terraform test` can check the rendering offline (tests/render.tftest.hcl).

terraform {
  required_version = ">= 1.6"
}

variable "definition" {
  description = "The dashboard definition (JSON text of infra/dashboard.json)."
  type        = string
}

variable "region" {
  description = "The region the metrics live in."
  type        = string
}

variable "functions" {
  description = "Deployed function name per logical function (ingest, geo-update, archiver, anomaly-inspector, query-api)."
  type        = map(string)
}

variable "queues" {
  description = "Queue name per logical queue (dead-letters, stream-failures)."
  type        = map(string)
}

variable "period_s" {
  description = "The period every widget aggregates over, in seconds."
  type        = number
  default     = 60
}

locals {
  definition = jsondecode(var.definition)
  # The dimension of each namespace the definition may use, and the names behind its "of".
  dimensions = {
    "GeoStream"  = { name = "FunctionName", values = var.functions }
    "AWS/Lambda" = { name = "FunctionName", values = var.functions }
    "AWS/SQS"    = { name = "QueueName", values = var.queues }
  }
  unknown_metrics = flatten([
    for widget in local.definition.widgets : [
      for metric in widget.metrics : "${metric.namespace} ${metric.name} of ${metric.of}"
      if !can(local.dimensions[metric.namespace].values[metric.of])
    ]
  ])
  widgets = [
    for index, widget in local.definition.widgets : {
      type   = "metric"
      x      = (index % 2) * 12
      y      = floor(index / 2) * 6
      width  = 12
      height = 6
      properties = {
        title  = widget.title
        region = var.region
        stat   = widget.stat
        period = var.period_s
        view   = "timeSeries"
        metrics = [
          for metric in widget.metrics : [
            metric.namespace,
            metric.name,
            try(local.dimensions[metric.namespace].name, ""),
            try(local.dimensions[metric.namespace].values[metric.of], ""),
            merge({ label = metric.label }, try({ stat = metric.stat }, {})),
          ]
        ]
      }
    }
  ]
}

output "body" {
  description = "The CloudWatch dashboard body (JSON)."
  value       = jsonencode({ widgets = local.widgets })

  precondition {
    condition     = length(local.unknown_metrics) == 0
    error_message = "The dashboard definition names a namespace or function/queue this deployment does not have: ${join(", ", local.unknown_metrics)}."
  }
}
