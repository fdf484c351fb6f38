# Least-privilege AWS access for Strata's pods through EKS Pod Identity: one role per
# ServiceAccount, each allowed only the buckets, prefixes and key uses it needs.
#   workflows (strata step: stage reads the models bucket)
#   workers   (read the models bucket; read/write the KV tier's prefix)
#   mlflow    (its artifact prefix)

data "aws_iam_policy_document" "pod_identity_trust" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
  }
}

locals {
  kv_prefix       = "kv/"
  mlflow_prefix   = "artifacts/"
  kms_read        = ["kms:Decrypt", "kms:DescribeKey"]
  kms_write       = ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"]
  models_bucket   = aws_s3_bucket.data["models"].arn
  kv_bucket       = aws_s3_bucket.data["kv"].arn
  mlflow_bucket   = aws_s3_bucket.data["mlflow"].arn
  s3_read_objects = ["s3:GetObject", "s3:GetObjectVersion"]
}

data "aws_iam_policy_document" "workflows" {
  statement {
    sid       = "ListModels"
    actions   = ["s3:ListBucket"]
    resources = [local.models_bucket]
  }
  statement {
    sid       = "ReadModels"
    actions   = local.s3_read_objects
    resources = ["${local.models_bucket}/*"]
  }
  statement {
    sid       = "DecryptModels"
    actions   = local.kms_read
    resources = [aws_kms_key.strata.arn]
  }
}

data "aws_iam_policy_document" "workers" {
  statement {
    sid       = "ListModels"
    actions   = ["s3:ListBucket"]
    resources = [local.models_bucket]
  }
  statement {
    sid       = "ReadModels"
    actions   = local.s3_read_objects
    resources = ["${local.models_bucket}/*"]
  }
  statement {
    sid       = "ListKVTier"
    actions   = ["s3:ListBucket"]
    resources = [local.kv_bucket]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.kv_prefix}*"]
    }
  }
  statement {
    sid       = "ReadWriteKVTier"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.kv_bucket}/${local.kv_prefix}*"]
  }
  statement {
    sid       = "UseKey"
    actions   = local.kms_write
    resources = [aws_kms_key.strata.arn]
  }
}

data "aws_iam_policy_document" "mlflow" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [local.mlflow_bucket]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.mlflow_prefix}*"]
    }
  }
  statement {
    sid       = "ReadWriteArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.mlflow_bucket}/${local.mlflow_prefix}*"]
  }
  statement {
    sid       = "UseKey"
    actions   = local.kms_write
    resources = [aws_kms_key.strata.arn]
  }
}

locals {
  pod_roles = {
    workflows = { namespace = var.namespace, service_account = local.workflows_service_account, policy = data.aws_iam_policy_document.workflows.json }
    workers   = { namespace = var.namespace, service_account = local.worker_service_account, policy = data.aws_iam_policy_document.workers.json }
    mlflow    = { namespace = local.mlflow_namespace, service_account = local.mlflow_service_account, policy = data.aws_iam_policy_document.mlflow.json }
  }
}

resource "aws_iam_role" "pod" {
  for_each           = local.pod_roles
  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.pod_identity_trust.json
}

resource "aws_iam_role_policy" "pod" {
  for_each = local.pod_roles
  name     = "${var.name}-${each.key}"
  role     = aws_iam_role.pod[each.key].id
  policy   = each.value.policy
}

resource "aws_eks_pod_identity_association" "pod" {
  for_each        = local.pod_roles
  cluster_name    = module.eks.cluster_name
  namespace       = each.value.namespace
  service_account = each.value.service_account
  role_arn        = aws_iam_role.pod[each.key].arn
}
