# Karpenter: controller role (Pod Identity), node role, interruption queue (SQS + EventBridge
# rules) from the EKS module's karpenter submodule; the controller from its chart; Strata's
# NodePools and EC2NodeClasses from ../platform/karpenter.
module "karpenter" {
  #checkov:skip=CKV_TF_1:registry module pinned to an exact released version (registry versions are immutable); commit hashes apply to git sources
  source  = "terraform-aws-modules/eks/aws//modules/karpenter"
  version = "21.12.0"

  cluster_name = module.eks.cluster_name

  node_iam_role_use_name_prefix   = false
  node_iam_role_name              = "${var.name}-karpenter-node"
  create_pod_identity_association = true
  namespace                       = "kube-system"
  service_account                 = "karpenter"

  queue_kms_master_key_id = aws_kms_key.strata.arn
}

resource "helm_release" "karpenter" {
  name       = "karpenter"
  namespace  = "kube-system"
  repository = local.charts.karpenter.repository
  chart      = local.charts.karpenter.chart
  version    = local.charts.karpenter.version

  values = [yamlencode({
    serviceAccount = { name = "karpenter" }
    settings = {
      clusterName       = module.eks.cluster_name
      clusterEndpoint   = module.eks.cluster_endpoint
      interruptionQueue = module.karpenter.queue_name
    }
    nodeSelector = { "strata.dev/pool" = "system" }
  })]
}

resource "helm_release" "strata_karpenter" {
  name      = "strata-karpenter"
  namespace = "kube-system"
  chart     = "${local.platform}/karpenter"

  values = [yamlencode({
    clusterName = module.eks.cluster_name
    nodeRole    = module.karpenter.node_iam_role_name
    gpuPools = [for pool in var.gpu_pools : {
      name          = pool.name
      role          = pool.role
      families      = pool.families
      capacityTypes = pool.capacity_types
      limits        = { "nvidia.com/gpu" = tostring(pool.gpu_limit) }
    }]
  })]

  depends_on = [helm_release.karpenter]
}
