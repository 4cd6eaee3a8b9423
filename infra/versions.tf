terraform {
  required_version = ">= 1.9.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Project = "geostream"
      Stack   = var.name_prefix
    }
  }
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
