# Encryption key, S3 buckets (models, KV tier, MLflow artifacts, access logs), and the shared
# model cache: FSx for Lustre linked to the models bucket (lazy load), or EFS.

resource "aws_kms_key" "strata" {
  description             = "${var.name}: S3, FSx, EFS, EKS secrets, logs, queues"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "strata" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.strata.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:key policy: Resource "*" is this key only, and the statement names only this account's root
  #checkov:skip=CKV_AWS_356:key policy: Resource "*" is this key only (KMS key policies cannot name other resources)
  #checkov:skip=CKV_AWS_109:key policy: key administration by this account's root is what keeps the key manageable (no lockout)
  statement {
    sid = "AccountAdministers"
    # Every KMS action, listed (no wildcard): the account's IAM policies decide who may use them.
    actions = ["kms:CancelKeyDeletion", "kms:CreateAlias", "kms:CreateGrant", "kms:Decrypt", "kms:DeleteAlias",
      "kms:DescribeKey", "kms:DisableKey", "kms:DisableKeyRotation", "kms:EnableKey", "kms:EnableKeyRotation",
      "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:GetKeyPolicy",
      "kms:GetKeyRotationStatus", "kms:ListAliases", "kms:ListGrants", "kms:ListKeyPolicies",
      "kms:ListResourceTags", "kms:PutKeyPolicy", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:RetireGrant",
      "kms:RevokeGrant", "kms:ScheduleKeyDeletion", "kms:TagResource", "kms:UntagResource", "kms:UpdateAlias",
    "kms:UpdateKeyDescription"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
  }
}

locals {
  buckets = {
    models = "${var.name}-models-${data.aws_caller_identity.current.account_id}"
    kv     = "${var.name}-kv-${data.aws_caller_identity.current.account_id}"
    mlflow = "${var.name}-mlflow-${data.aws_caller_identity.current.account_id}"
  }
}

resource "aws_s3_bucket" "logs" {
  bucket = "${var.name}-s3-logs-${data.aws_caller_identity.current.account_id}"
  #checkov:skip=CKV_AWS_18:this is the access-log bucket itself; logging it to itself would loop
  #checkov:skip=CKV_AWS_144:access logs are not replicated to a second region
  #checkov:skip=CKV2_AWS_62:no consumer of event notifications for access logs
  #checkov:skip=CKV_AWS_145:S3 server access logs are delivered only to SSE-S3 (AES256) target buckets, not SSE-KMS
}

resource "aws_s3_bucket" "data" {
  for_each = local.buckets
  bucket   = each.value
  #checkov:skip=CKV_AWS_144:cross-region replication is a cost decision left to the operator (models can be re-published)
  #checkov:skip=CKV2_AWS_62:event notifications: the models bucket's changes reach FSx through its data repository association; nothing else consumes them
}

resource "aws_s3_bucket_public_access_block" "data" {
  for_each                = local.buckets
  bucket                  = aws_s3_bucket.data[each.key].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_public_access_block" "logs" {
  bucket                  = aws_s3_bucket.logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  for_each = local.buckets
  bucket   = aws_s3_bucket.data[each.key].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_ownership_controls" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  for_each = local.buckets
  bucket   = aws_s3_bucket.data[each.key].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.strata.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    # S3 server access logging delivers only to SSE-S3 buckets.
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "data" {
  for_each = local.buckets
  bucket   = aws_s3_bucket.data[each.key].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_versioning" "logs" {
  bucket = aws_s3_bucket.logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_logging" "data" {
  for_each      = local.buckets
  bucket        = aws_s3_bucket.data[each.key].id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "${each.key}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  for_each = local.buckets
  bucket   = aws_s3_bucket.data[each.key].id
  rule {
    id     = "tidy"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    noncurrent_version_expiration {
      noncurrent_days = each.key == "kv" ? 1 : 30
    }
  }
  dynamic "rule" {
    # KV blocks are a cache: a block nobody re-read in a week is recomputed if ever needed.
    for_each = each.key == "kv" ? [1] : []
    content {
      id     = "kv-cache-expiry"
      status = "Enabled"
      filter {}
      abort_incomplete_multipart_upload {
        days_after_initiation = 1
      }
      expiration {
        days = 7
      }
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    expiration {
      days = 365
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
}

locals {
  bucket_arns = merge(
    { for k, b in aws_s3_bucket.data : k => b.arn },
    { logs = aws_s3_bucket.logs.arn },
  )
}

resource "aws_s3_bucket_policy" "tls_only" {
  for_each = local.bucket_arns
  bucket   = split(":::", each.value)[1]
  policy   = data.aws_iam_policy_document.tls_only[each.key].json
}

data "aws_iam_policy_document" "tls_only" {
  for_each = local.bucket_arns
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"]
    resources = [each.value, "${each.value}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

# --- the model cache ---------------------------------------------------------------------------

resource "aws_security_group" "model_cache" {
  name        = "${var.name}-model-cache"
  description = "FSx for Lustre / EFS: reachable from the cluster's nodes only"
  vpc_id      = module.vpc.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "lustre" {
  for_each                     = { lnet = [988, 988], lustre = [1018, 1023] }
  security_group_id            = aws_security_group.model_cache.id
  referenced_security_group_id = module.eks.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = each.value[0]
  to_port                      = each.value[1]
  description                  = "Lustre ${each.key} from the nodes"
}

resource "aws_vpc_security_group_ingress_rule" "lustre_self" {
  security_group_id            = aws_security_group.model_cache.id
  referenced_security_group_id = aws_security_group.model_cache.id
  ip_protocol                  = "tcp"
  from_port                    = 988
  to_port                      = 1023
  description                  = "Lustre servers talk to each other"
}

resource "aws_vpc_security_group_ingress_rule" "nfs" {
  security_group_id            = aws_security_group.model_cache.id
  referenced_security_group_id = module.eks.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  description                  = "NFS (EFS) from the nodes"
}

resource "aws_vpc_security_group_egress_rule" "model_cache" {
  security_group_id            = aws_security_group.model_cache.id
  referenced_security_group_id = aws_security_group.model_cache.id
  ip_protocol                  = "-1"
  description                  = "Lustre servers talk to each other"
}

resource "aws_fsx_lustre_file_system" "models" {
  count                             = var.model_cache_backend == "fsx" ? 1 : 0
  storage_capacity                  = var.fsx_storage_capacity_gib
  deployment_type                   = "PERSISTENT_2"
  per_unit_storage_throughput       = 250
  data_compression_type             = "LZ4"
  subnet_ids                        = [module.vpc.private_subnets[0]]
  security_group_ids                = [aws_security_group.model_cache.id]
  kms_key_id                        = aws_kms_key.strata.arn
  file_system_type_version          = "2.15"
  automatic_backup_retention_days   = 7
  copy_tags_to_backups              = true
  weekly_maintenance_start_time     = "7:03:00"
  daily_automatic_backup_start_time = "05:00"
}

# The models bucket appears under /s3/models on the file system; objects load on first read.
resource "aws_fsx_data_repository_association" "models" {
  count                            = var.model_cache_backend == "fsx" ? 1 : 0
  file_system_id                   = aws_fsx_lustre_file_system.models[0].id
  data_repository_path             = "s3://${aws_s3_bucket.data["models"].bucket}"
  file_system_path                 = "/s3/models"
  batch_import_meta_data_on_create = true

  s3 {
    auto_import_policy {
      events = ["NEW", "CHANGED", "DELETED"]
    }
  }
}

resource "aws_efs_file_system" "models" {
  count            = var.model_cache_backend == "efs" ? 1 : 0
  encrypted        = true
  kms_key_id       = aws_kms_key.strata.arn
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic"

  lifecycle_policy {
    transition_to_ia = "AFTER_30_DAYS"
  }
}

resource "aws_efs_backup_policy" "models" {
  count          = var.model_cache_backend == "efs" ? 1 : 0
  file_system_id = aws_efs_file_system.models[0].id
  backup_policy {
    status = "ENABLED"
  }
}

resource "aws_efs_mount_target" "models" {
  count           = var.model_cache_backend == "efs" ? length(local.azs) : 0
  file_system_id  = aws_efs_file_system.models[0].id
  subnet_id       = module.vpc.private_subnets[count.index]
  security_groups = [aws_security_group.model_cache.id]
}
