# With position_store = valkey: latest positions in ElastiCache Serverless for Valkey, reached
# by geo-update and the query API from inside the VPC (docs/cost.md: the cheapest configuration
# that keeps positions fresh at fleet scale). Every other function stays outside the VPC.
#
# What the two VPC functions reach, without a NAT gateway: Valkey (port 6379), DynamoDB and S3
# through gateway endpoints (free), SQS through an interface endpoint (dead letters).

locals {
  valkey = var.position_store == "valkey"

  # The position store the deployment chose, for geo-update and the query API. With valkey the
  # table name still prefixes the keys, so two stacks can share a cache.
  position_environment = {
    POSITION_STORE  = var.position_store
    POSITIONS_TABLE = aws_dynamodb_table.positions.name
    VALKEY_URL      = local.valkey ? "rediss://${aws_elasticache_serverless_cache.positions[0].endpoint[0].address}:${aws_elasticache_serverless_cache.positions[0].endpoint[0].port}" : ""
  }

  valkey_vpc = local.valkey ? {
    subnet_ids         = var.vpc_subnet_ids
    security_group_ids = [aws_security_group.vpc_functions[0].id]
  } : null
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
      condition     = var.archive == "s3"
      error_message = "position_store = valkey needs archive = s3: the query API reaches S3 through a gateway endpoint, Timestream would need interface endpoints this stack does not declare."
    }
  }
}

data "aws_vpc" "functions" {
  count = local.valkey ? 1 : 0
  id    = data.aws_subnet.first[0].vpc_id
}

resource "aws_security_group" "vpc_functions" {
  #checkov:skip=CKV2_AWS_5:attached to geo-update and the query API through module "function" (var.vpc), which checkov does not follow
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-vpc-functions"
  description = "geo-update and the query API: out to Valkey and the AWS endpoints only"
  vpc_id      = data.aws_vpc.functions[0].id
}

resource "aws_security_group" "valkey" {
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-valkey"
  description = "The position store: in from geo-update and the query API only"
  vpc_id      = data.aws_vpc.functions[0].id
}

resource "aws_security_group" "endpoints" {
  count       = local.valkey ? 1 : 0
  name        = "${var.name_prefix}-endpoints"
  description = "The SQS interface endpoint: in from geo-update and the query API only"
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
  description                  = "HTTPS to the SQS interface endpoint"
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
  description                  = "geo-update and the query API"
  referenced_security_group_id = aws_security_group.vpc_functions[0].id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6380
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_functions" {
  count                        = local.valkey ? 1 : 0
  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "geo-update and the query API"
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

resource "aws_vpc_endpoint" "sqs" {
  count               = local.valkey ? 1 : 0
  vpc_id              = data.aws_vpc.functions[0].id
  service_name        = "com.amazonaws.${var.region}.sqs"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.vpc_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
}

resource "aws_elasticache_serverless_cache" "positions" {
  count                    = local.valkey ? 1 : 0
  name                     = "${var.name_prefix}-positions"
  description              = "GeoStream latest positions and their geo index"
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
