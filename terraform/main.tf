# The EKS environment for Strata: network, cluster, Karpenter, model cache, buckets, IAM by
# EKS Pod Identity, the add-ons, and Strata's own charts from ../platform.

provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}

provider "helm" {
  kubernetes = {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)
    exec = {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}

provider "kubernetes" {
  host                   = module.eks.cluster_endpoint
  cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)
  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  azs      = var.availability_zones
  platform = "${path.module}/../platform"
  tags = merge(var.tags, {
    "strata.dev/environment" = var.name
    "managed-by"             = "terraform"
  })

  # Charts from public repositories, pinned. Strata's own charts come from ../platform.
  charts = {
    karpenter             = { repository = "oci://public.ecr.aws/karpenter", chart = "karpenter", version = "1.14.1" }
    argo_workflows        = { repository = "https://argoproj.github.io/argo-helm", chart = "argo-workflows", version = "0.45.26" }
    kube_prometheus_stack = { repository = "https://prometheus-community.github.io/helm-charts", chart = "kube-prometheus-stack", version = "77.6.2" }
    mlflow                = { repository = "https://community-charts.github.io/helm-charts", chart = "mlflow", version = "1.8.1" }
    nvidia_device_plugin  = { repository = "https://nvidia.github.io/k8s-device-plugin", chart = "nvidia-device-plugin", version = "0.18.0" }
    efa_device_plugin     = { repository = "https://aws.github.io/eks-charts", chart = "aws-efa-k8s-device-plugin", version = "0.5.14" }
  }

  # Service accounts that get AWS access through EKS Pod Identity.
  workflows_service_account = "strata-workflows"
  worker_service_account    = "strata-worker"
  mlflow_namespace          = "mlflow"
  mlflow_service_account    = "mlflow"
}
