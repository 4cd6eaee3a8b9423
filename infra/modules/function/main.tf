# One GeoStream Lambda function: its log group, its own least-privilege role, the function.

variable "name" {
  description = "Full function name."
  type        = string
}

variable "description" {
  description = "What the function does."
  type        = string
}

variable "zip_path" {
  description = "Path of the bootstrap.zip built by scripts/package."
  type        = string
}

variable "environment" {
  description = "Environment variables the function reads."
  type        = map(string)
}

variable "policy_statements" {
  description = "IAM statements the function needs beyond writing its own logs: actions on resources."
  type = list(object({
    sid       = string
    actions   = list(string)
    resources = list(string)
  }))
}

variable "memory_mb" {
  description = "Memory (and with it CPU) of the function."
  type        = number
  default     = 256
}

variable "timeout_seconds" {
  description = "Invocation timeout."
  type        = number
  default     = 30
}

variable "vpc" {
  description = "Subnets and security groups when the function must reach something inside a VPC (the Valkey position store); null for none."
  type = object({
    subnet_ids         = list(string)
    security_group_ids = list(string)
  })
  default = null
}

variable "reserved_concurrency" {
  description = "Concurrent executions reserved for the function; null for none (the account's pool)."
  type        = number
  default     = null
}

variable "system_log_level" {
  description = "Lambda's own log lines (START, END, REPORT at INFO; WARN drops them)."
  type        = string
  default     = "WARN"
}

variable "log_retention_days" {
  description = "Retention of the function's log group."
  type        = number
}

resource "aws_cloudwatch_log_group" "this" {
  name              = "/aws/lambda/${var.name}"
  retention_in_days = var.log_retention_days
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  name               = "${var.name}-role"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.this.arn}:*"]
  }

  dynamic "statement" {
    for_each = var.policy_statements
    content {
      sid       = statement.value.sid
      actions   = statement.value.actions
      resources = statement.value.resources
    }
  }
}

# A function in a VPC creates its network interfaces with the managed policy's EC2 actions.
resource "aws_iam_role_policy_attachment" "vpc_access" {
  count      = var.vpc == null ? 0 : 1
  role       = aws_iam_role.this.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

resource "aws_iam_role_policy" "this" {
  name   = "${var.name}-policy"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.this.json
}

resource "aws_lambda_function" "this" {
  function_name    = var.name
  description      = var.description
  role             = aws_iam_role.this.arn
  runtime          = "provided.al2023"
  architectures    = ["arm64"]
  handler          = "bootstrap"
  filename         = var.zip_path
  source_code_hash = filebase64sha256(var.zip_path)
  memory_size      = var.memory_mb
  timeout          = var.timeout_seconds

  environment {
    variables = var.environment
  }

  reserved_concurrent_executions = var.reserved_concurrency

  logging_config {
    log_format       = "JSON"
    log_group        = aws_cloudwatch_log_group.this.name
    system_log_level = var.system_log_level
  }

  tracing_config {
    mode = "PassThrough"
  }

  dynamic "vpc_config" {
    for_each = var.vpc == null ? [] : [var.vpc]
    content {
      subnet_ids         = vpc_config.value.subnet_ids
      security_group_ids = vpc_config.value.security_group_ids
    }
  }

  depends_on = [aws_iam_role_policy.this, aws_iam_role_policy_attachment.vpc_access]
}

output "function_name" {
  description = "Name of the function."
  value       = aws_lambda_function.this.function_name
}

output "arn" {
  description = "ARN of the function."
  value       = aws_lambda_function.this.arn
}

output "invoke_arn" {
  description = "Invoke ARN, for API Gateway integrations."
  value       = aws_lambda_function.this.invoke_arn
}

output "role_name" {
  description = "Name of the function's role."
  value       = aws_iam_role.this.name
}
