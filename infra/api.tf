# The HTTP API. Devices and operators authenticate with JWTs from an OIDC provider (for
# example Cognito with the client-credentials grant for devices): API Gateway checks them
# itself, so no authorizer function runs per request, tokens expire and can be revoked per
# client, and each device gets its own client id. (IAM/SigV4 would need AWS credentials on
# every device; a Lambda authorizer would add an invocation to every telemetry POST.)

resource "aws_apigatewayv2_api" "http" {
  name          = "${var.name_prefix}-api"
  protocol_type = "HTTP"
  description   = "GeoStream telemetry and query API"
}

resource "aws_apigatewayv2_authorizer" "jwt" {
  api_id           = aws_apigatewayv2_api.http.id
  name             = "${var.name_prefix}-jwt"
  authorizer_type  = "JWT"
  identity_sources = ["$request.header.Authorization"]

  jwt_configuration {
    issuer   = var.jwt_issuer
    audience = var.jwt_audiences
  }
}

locals {
  # The functions API Gateway serves: ingest too, unless it is served by a Function URL.
  api_functions = merge(var.ingress == "api_gateway" ? {
    ingest = { invoke_arn = module.ingest.invoke_arn, name = module.ingest.function_name }
    } : {}, {
    "query-api" = { invoke_arn = module.query_api.invoke_arn, name = module.query_api.function_name }
  })
}

resource "aws_apigatewayv2_integration" "function" {
  for_each = local.api_functions

  api_id                 = aws_apigatewayv2_api.http.id
  integration_type       = "AWS_PROXY"
  integration_uri        = each.value.invoke_arn
  payload_format_version = "2.0"
}

locals {
  routes = merge(var.ingress == "api_gateway" ? { "POST /v1/telemetry" = "ingest" } : {}, {
    "GET /v1/vehicles/near"                    = "query-api"
    "GET /v1/vehicles/{id}"                    = "query-api"
    "GET /v1/vehicles/{id}/track"              = "query-api"
    "GET /v1/vehicles/{id}/trips"              = "query-api"
    "GET /v1/vehicles/{id}/stops"              = "query-api"
    "GET /v1/vehicles/{id}/summary"            = "query-api"
    "GET /v1/alerts"                           = "query-api"
    "POST /v1/alerts/{alert_id}/ack"           = "query-api"
    "GET /v1/geofences"                        = "query-api"
    "GET /v1/geofences/{geofence_id}"          = "query-api"
    "PUT /v1/geofences/{geofence_id}"          = "query-api"
    "DELETE /v1/geofences/{geofence_id}"       = "query-api"
    "GET /v1/geofences/{geofence_id}/vehicles" = "query-api"
    "GET /v1/events"                           = "query-api"
  })

  # The scopes a token needs per route (any one of them); the functions check them again.
  route_scopes = {
    "POST /v1/telemetry"                       = [var.scopes.telemetry_write, var.scopes.telemetry_write_any]
    "GET /v1/vehicles/near"                    = [var.scopes.fleet_read]
    "GET /v1/vehicles/{id}"                    = [var.scopes.fleet_read]
    "GET /v1/vehicles/{id}/track"              = [var.scopes.fleet_read]
    "GET /v1/vehicles/{id}/trips"              = [var.scopes.fleet_read]
    "GET /v1/vehicles/{id}/stops"              = [var.scopes.fleet_read]
    "GET /v1/vehicles/{id}/summary"            = [var.scopes.fleet_read]
    "GET /v1/alerts"                           = [var.scopes.fleet_read]
    "POST /v1/alerts/{alert_id}/ack"           = [var.scopes.alerts_ack]
    "GET /v1/geofences"                        = [var.scopes.fleet_read]
    "GET /v1/geofences/{geofence_id}"          = [var.scopes.fleet_read]
    "PUT /v1/geofences/{geofence_id}"          = [var.scopes.geofences_write]
    "DELETE /v1/geofences/{geofence_id}"       = [var.scopes.geofences_write]
    "GET /v1/geofences/{geofence_id}/vehicles" = [var.scopes.fleet_read]
    "GET /v1/events"                           = [var.scopes.fleet_read]
  }
}

resource "aws_apigatewayv2_route" "route" {
  for_each = local.routes

  api_id               = aws_apigatewayv2_api.http.id
  route_key            = each.key
  target               = "integrations/${aws_apigatewayv2_integration.function[each.value].id}"
  authorization_type   = "JWT"
  authorizer_id        = aws_apigatewayv2_authorizer.jwt.id
  authorization_scopes = local.route_scopes[each.key]
}

# The API's OpenAPI description (docs/openapi.json), served by the query API to anyone: it
# holds no data, and tools read it before they have a token.
resource "aws_apigatewayv2_route" "openapi" {
  #checkov:skip=CKV_AWS_309:the API description is public by design: no data, read before a token exists
  api_id             = aws_apigatewayv2_api.http.id
  route_key          = "GET /openapi.json"
  target             = "integrations/${aws_apigatewayv2_integration.function["query-api"].id}"
  authorization_type = "NONE"
}

# Tracker apps (Traccar Client, OwnTracks) cannot hold a JWT: each device presents its own
# secret (in the URL, or as the HTTP Basic password), which ingest verifies with one HMAC under
# device_secret_key and no database read, refusing revoked_devices.
resource "aws_apigatewayv2_route" "tracker" {
  #checkov:skip=CKV_AWS_309:tracker apps present a per-device secret that the ingest function verifies; a phone app cannot hold a JWT
  for_each = toset(var.tracker_apps && var.ingress == "api_gateway" ? ["POST /v1/ingest/osmand", "GET /v1/ingest/osmand", "POST /v1/ingest/owntracks"] : [])

  api_id             = aws_apigatewayv2_api.http.id
  route_key          = each.key
  target             = "integrations/${aws_apigatewayv2_integration.function["ingest"].id}"
  authorization_type = "NONE"
}

resource "aws_cloudwatch_log_group" "api_access" {
  count             = var.api_access_logs ? 1 : 0
  name              = "/aws/apigateway/${var.name_prefix}-api"
  retention_in_days = var.log_retention_days
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.http.id
  name        = "$default"
  auto_deploy = true

  default_route_settings {
    throttling_rate_limit  = var.api_throttle_rate
    throttling_burst_limit = var.api_throttle_burst
  }

  dynamic "access_log_settings" {
    for_each = var.api_access_logs ? [aws_cloudwatch_log_group.api_access[0].arn] : []
    content {
      destination_arn = access_log_settings.value
      format = jsonencode({
        requestId      = "$context.requestId"
        ip             = "$context.identity.sourceIp"
        requestTime    = "$context.requestTime"
        routeKey       = "$context.routeKey"
        status         = "$context.status"
        latencyMs      = "$context.responseLatency"
        integrationErr = "$context.integrationErrorMessage"
        authorizerErr  = "$context.authorizer.error"
        subject        = "$context.authorizer.claims.sub"
      })
    }
  }
}

resource "aws_lambda_permission" "api" {
  for_each = local.api_functions

  statement_id  = "AllowApiGateway"
  action        = "lambda:InvokeFunction"
  function_name = each.value.name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.http.execution_arn}/*/*"
}

# ingress = "function_url": devices post to ingest's Lambda Function URL, which costs nothing
# per request beyond the invocation (API Gateway HTTP API: $1.00 per million). The URL has no
# authorizer (AuthType NONE): ingest verifies the bearer token itself as API Gateway would
# (AUTHORIZATION=jwt_in_function: issuer, audiences, signature by the issuer's JWKS, fetched
# once per execution environment and kept), and ingest_reserved_concurrency bounds what a flood
# can take, as the stage's throttle does behind API Gateway. Queries stay on API Gateway.
resource "aws_lambda_function_url" "ingest" {
  count = var.ingress == "function_url" ? 1 : 0

  function_name = module.ingest.function_name
  #checkov:skip=CKV_AWS_258:the function verifies the bearer JWT itself (AUTHORIZATION=jwt_in_function); IAM auth would need AWS credentials on every device
  authorization_type = "NONE"
  invoke_mode        = "BUFFERED"
}

# A public URL needs both permissions (since October 2025). The second cannot carry the
# lambda:InvokedViaFunctionUrl condition with the provider schema this is validated against
# (6.25; later releases add invoked_via_function_url): a direct Invoke is then possible for any
# AWS principal, and passes through the same token verification, since ingest drops any
# authorizer claims in the event and verifies the Authorization header itself.
resource "aws_lambda_permission" "function_url" {
  count = var.ingress == "function_url" ? 1 : 0

  statement_id           = "AllowPublicFunctionUrl"
  action                 = "lambda:InvokeFunctionUrl"
  function_name          = module.ingest.function_name
  principal              = "*"
  function_url_auth_type = "NONE"
}

resource "aws_lambda_permission" "function_url_invoke" {
  count = var.ingress == "function_url" ? 1 : 0

  statement_id  = "AllowPublicFunctionUrlInvoke"
  action        = "lambda:InvokeFunction"
  function_name = module.ingest.function_name
  principal     = "*"
}
