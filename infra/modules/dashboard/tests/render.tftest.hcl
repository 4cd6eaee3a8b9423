# `terraform test` (offline: the module has no provider) renders the real definition file and
# checks the CloudWatch dashboard body Terraform would deploy.

variables {
  definition = file("../../dashboard.json")
  region     = "eu-central-1"
  functions = {
    "ingest"            = "gs-ingest"
    "geo-update"        = "gs-geo-update"
    "archiver"          = "gs-archiver"
    "anomaly-inspector" = "gs-anomaly-inspector"
    "query-api"         = "gs-query-api"
  }
  queues = {
    "dead-letters"    = "gs-dead-letters"
    "stream-failures" = "gs-stream-failures"
  }
}

run "renders_every_widget_of_the_definition" {
  command = apply

  assert {
    condition     = length(jsondecode(output.body).widgets) == length(jsondecode(file("../../dashboard.json")).widgets)
    error_message = "every widget of infra/dashboard.json becomes a CloudWatch widget"
  }

  assert {
    condition = jsondecode(output.body).widgets[0].properties.metrics[0] == [
      "GeoStream", "EventsAccepted", "FunctionName", "gs-ingest", { label = "accepted" }
    ]
    error_message = "a GeoStream metric is dimensioned by the deployed function name"
  }

  assert {
    condition = contains(
      flatten([for w in jsondecode(output.body).widgets : [for m in w.properties.metrics : m[3]]]),
      "gs-dead-letters",
    )
    error_message = "the dead-letter queue depth is drawn by its queue name"
  }

  assert {
    condition     = alltrue([for w in jsondecode(output.body).widgets : w.width == 12 && w.properties.region == "eu-central-1"])
    error_message = "widgets are laid out two per row, in the deployment's region"
  }
}

run "refuses_a_metric_of_an_unknown_function" {
  command = plan

  variables {
    definition = jsonencode({ widgets = [{ title = "t", stat = "Sum", metrics = [{ namespace = "GeoStream", name = "EventsAccepted", of = "nobody", label = "x" }] }] })
  }

  expect_failures = [output.body]
}
