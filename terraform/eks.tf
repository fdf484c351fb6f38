module "eks" {
  #checkov:skip=CKV_TF_1:registry module pinned to an exact released version (registry versions are immutable); commit hashes apply to git sources
  source  = "terraform-aws-modules/eks/aws"
  version = "21.12.0"

  name               = var.name
  kubernetes_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  # The API endpoint is private; reach it from inside the VPC (VPN, bastion, CI runner).
  endpoint_public_access  = false
  endpoint_private_access = true

  # Secrets encrypted with the environment's key; control-plane logs kept.
  encryption_config = {
    resources        = ["secrets"]
    provider_key_arn = aws_kms_key.strata.arn
  }
  create_kms_key                  = false
  enabled_log_types               = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
  cloudwatch_log_group_kms_key_id = aws_kms_key.strata.arn

  enable_cluster_creator_admin_permissions = true
  access_entries = {
    for i, arn in var.cluster_admin_arns : "admin-${i}" => {
      principal_arn = arn
      policy_associations = {
        admin = {
          policy_arn   = "arn:${data.aws_partition.current.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
          access_scope = { type = "cluster" }
        }
      }
    }
  }

  addons = {
    coredns                = {}
    kube-proxy             = {}
    vpc-cni                = { before_compute = true }
    eks-pod-identity-agent = { before_compute = true }
    aws-ebs-csi-driver     = {}
    aws-efs-csi-driver     = {}
    aws-fsx-csi-driver     = {}
  }

  # A small managed group for the controllers (Karpenter cannot place its own pods).
  eks_managed_node_groups = {
    system = {
      instance_types = ["m7i.xlarge"]
      ami_type       = "AL2023_x86_64_STANDARD"
      min_size       = 2
      max_size       = 3
      desired_size   = 2
      labels         = { "strata.dev/pool" = "system" }
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }
    }
  }

  # EFA needs all traffic between the nodes' interfaces (same security group, both ways).
  node_security_group_additional_rules = {
    efa_ingress_self = {
      description = "EFA: all traffic from nodes in this group"
      protocol    = "-1"
      from_port   = 0
      to_port     = 0
      type        = "ingress"
      self        = true
    }
    efa_egress_self = {
      description = "EFA: all traffic to nodes in this group"
      protocol    = "-1"
      from_port   = 0
      to_port     = 0
      type        = "egress"
      self        = true
    }
  }
  node_security_group_tags = {
    "karpenter.sh/discovery" = var.name
  }
}
