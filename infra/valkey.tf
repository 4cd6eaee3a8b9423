# With position_store, rule_state_store or recent_tracks = valkey: latest positions (geo-update,
# the query API), the anomaly-inspector's rule state, and/or the last hour of every vehicle's
# readings (the archiver, the query API) in ElastiCache Serverless for Valkey, reached from
# inside the VPC (docs/cost.md: the cheapest configuration that keeps positions
# fresh at fleet scale). Every other function stays outside the VPC.
#
# What the VPC functions reach, without a NAT gateway: Valkey (port 6379), DynamoDB and S3
# through gateway endpoints (free), SQS (dead letters) and Kinesis (the alerts stream, for the
# anomaly-inspector) through interface endpoints.

locals {
  valkey     = var.position_store == "valkey" || var.rule_state_store == "valkey" || var.recent_tracks == "valkey"
  valkey_url = local.valkey ? "rediss://${aws_elasticache_serverless_cache.hot_state[0].endpoint[0].address}:${aws_elasticache_serverless_cache.hot_state[0].endpoint[0].port}" : ""

  # The position store the deployment chose, for geo-update and the query API. With valkey the
  # table name still prefixes the keys, so two stacks can share a cache.
  position_environment = {
    POSITION_STORE          = var.position_store
    POSITIONS_TABLE         = aws_dynamodb_table.positions.name
    POSITION_RETENTION_DAYS = tostring(var.position_retention_days)
    VALKEY_URL              = local.valkey_url
  }

  # Where the anomaly-inspector keeps rule state (alert records stay in DynamoDB).
  rule_state_environment = {
    RULE_STATE_STORE     = var.rule_state_store
    ALERT_STATE_TABLE    = aws_dynamodb_table.alert_state.name
    ALERT_RETENTION_DAYS = tostring(var.alert_retention_days)
    VALKEY_URL           = local.valkey_url
  }

  vpc_access = local.valkey ? {
    subnet_ids         = var.vpc_subnet_ids
    security_group_ids = [aws_security_group.vpc_functions[0].id]
  } : null
  positions_vpc  = var.position_store == "valkey" ? local.vpc_access : null
  rule_state_vpc = var.rule_state_store == "valkey" ? local.vpc_access : null
  archiver_vpc   = var.recent_tracks == "valkey" ? local.vpc_access : null
  query_api_vpc  = var.position_store == "valkey" || var.recent_tracks == "valkey" ? local.vpc_access : null
}

data "aws_subnet" "first" {
  count = local.valkey ? 1 : 0
  id    = var.vpc_subnet_ids[0]

  lifecycle {
    postcondition {
      condition     = length(var.vpc_subnet_ids) >= 2 && length(var.vpc_route_table_ids) >= 1
      error_message = "position_store = valkey needs vpc_subnet_ids in two or more availability zones and their vpc_route_table_ids."
    }
    postcondition {
      condition     = (var.position_store != "valkey" && var.recent_tracks != "valkey") || var.archive == "s3"
      error_message = "position_store or recent_tracks = valkey needs archive = s3: the functions in the VPC reach S3 through a gateway endpoint, Timestream would need interface endpoints this stack does not declare."
    }
    postcondition {
      condition     = var.rule_state_store != "valkey" || var.bus == "kinesis"
      error_message = "rule_state_store = valkey needs bus = kinesis: the anomaly-inspector reaches the alerts stream through an interface endpoint; Kafka brokers and their secret from inside the VPC are not declared here."
    }
  }
}

data "aws_vpc" "functions" {
  count = local.valkey ? 1 : 0
  id    = data.aws_subnet.first[0].vpc_id
}

resource "aws_security_group" "vpc_functions" {
  #checkov:skip=CKV2_AWS_5:attached to the VPC functions through module "function" (var.vpc), which checkov does not follow
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-vpc-functions"
  description = "The functions in the VPC: out to Valkey and the AWS endpoints only"
  vpc_id      = data.aws_vpc.functions[0].id
}

resource "aws_security_group" "valkey" {
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-valkey"
  description = "The hot-state cache: in from the VPC functions only"
  vpc_id      = data.aws_vpc.functions[0].id
}

resource "aws_security_group" "endpoints" {
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-endpoints"
  description = "The SQS and Kinesis interface endpoints: in from the VPC functions only"
  vpc_id      = data.aws_vpc.functions[0].id
}

resource "aws_vpc_security_group_egress_rule" "functions_to_valkey" {
  count                        = local.valkey ? 1 : 0
  security_group_id            = aws_security_group.vpc_functions[0].id
  description                  = "Valkey (TLS)"
  referenced_security_group_id = aws_security_group.valkey[0].id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6380
}

resource "aws_vpc_security_group_egress_rule" "functions_to_interface_endpoints" {
  count                        = local.valkey ? 1 : 0
  security_group_id            = aws_security_group.vpc_functions[0].id
  description                  = "HTTPS to the interface endpoints"
  referenced_security_group_id = aws_security_group.endpoints[0].id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

resource "aws_vpc_security_group_egress_rule" "functions_to_gateway_endpoints" {
  for_each          = local.valkey ? { dynamodb = aws_vpc_endpoint.dynamodb[0].prefix_list_id, s3 = aws_vpc_endpoint.s3[0].prefix_list_id } : {}
  security_group_id = aws_security_group.vpc_functions[0].id
  description       = "HTTPS to ${each.key} through its gateway endpoint"
  prefix_list_id    = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "valkey_from_functions" {
  count                        = local.valkey ? 1 : 0
  security_group_id            = aws_security_group.valkey[0].id
  description                  = "The VPC functions"
  referenced_security_group_id = aws_security_group.vpc_functions[0].id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6380
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_functions" {
  count                        = local.valkey ? 1 : 0
  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "The VPC functions"
  referenced_security_group_id = aws_security_group.vpc_functions[0].id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

resource "aws_vpc_endpoint" "dynamodb" {
  count             = local.valkey ? 1 : 0
  vpc_id            = data.aws_vpc.functions[0].id
  service_name      = "com.amazonaws.${var.region}.dynamodb"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = var.vpc_route_table_ids
}

resource "aws_vpc_endpoint" "s3" {
  count             = local.valkey ? 1 : 0
  vpc_id            = data.aws_vpc.functions[0].id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = var.vpc_route_table_ids
}

resource "aws_vpc_endpoint" "kinesis" {
  count               = var.rule_state_store == "valkey" && var.bus == "kinesis" ? 1 : 0
  vpc_id              = data.aws_vpc.functions[0].id
  service_name        = "com.amazonaws.${var.region}.kinesis-streams"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.vpc_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
}

resource "aws_vpc_endpoint" "sqs" {
  count               = local.valkey ? 1 : 0
  vpc_id              = data.aws_vpc.functions[0].id
  service_name        = "com.amazonaws.${var.region}.sqs"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.vpc_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
}

resource "aws_elasticache_serverless_cache" "hot_state" {
  count                    = local.valkey ? 1 : 0
  name                     = "${var.name_prefix}-hot-state"
  description              = "GeoStream latest positions with their geo index, and/or rule state"
  engine                   = "valkey"
  major_engine_version     = "8"
  subnet_ids               = var.vpc_subnet_ids
  security_group_ids       = [aws_security_group.valkey[0].id]
  snapshot_retention_limit = 1

  cache_usage_limits {
    data_storage {
      maximum = var.valkey_max_storage_gb
      unit    = "GB"
    }
    ecpu_per_second {
      maximum = var.valkey_max_ecpu_per_second
    }
  }
}
