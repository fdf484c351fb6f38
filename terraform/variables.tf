variable "name" {
  description = "Name of the environment: the EKS cluster, buckets and roles are named after it."
  type        = string
  default     = "strata"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: lowercase letters, digits and '-', 2 to 21 characters, starting with a letter."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-west-2"
}

variable "availability_zones" {
  description = "Availability zones of the VPC's subnets (listed, so the set never changes under a running cluster)."
  type        = list(string)
  default     = ["us-west-2a", "us-west-2b", "us-west-2c"]

  validation {
    condition     = length(var.availability_zones) >= 2
    error_message = "availability_zones: EKS needs subnets in at least two zones."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "CIDR of the VPC."
  type        = string
  default     = "10.0.0.0/16"
}

variable "cluster_admin_arns" {
  description = "IAM principals given cluster-admin through EKS access entries."
  type        = list(string)
  default     = []
}

variable "model_cache_backend" {
  description = "Shared model cache: fsx (FSx for Lustre, linked to the models bucket) or efs."
  type        = string
  default     = "fsx"

  validation {
    condition     = contains(["fsx", "efs"], var.model_cache_backend)
    error_message = "model_cache_backend must be fsx or efs."
  }
}

variable "fsx_storage_capacity_gib" {
  description = "FSx for Lustre capacity in GiB (PERSISTENT_2: multiples of 1200)."
  type        = number
  default     = 1200
}

variable "gpu_pools" {
  description = "Karpenter GPU pools: name, role (prefill|decode|both), explicit instance families, capacity types, GPU limit."
  type = list(object({
    name           = string
    role           = string
    families       = list(string)
    capacity_types = list(string)
    gpu_limit      = number
  }))
  default = [
    { name = "gpu-prefill", role = "prefill", families = ["g6"], capacity_types = ["on-demand"], gpu_limit = 16 },
    { name = "gpu-decode", role = "decode", families = ["g6"], capacity_types = ["on-demand"], gpu_limit = 16 },
  ]
}

variable "strata_image" {
  description = "The Strata image (repository and tag) for every role."
  type = object({
    repository = string
    tag        = string
  })
  default = {
    repository = "ghcr.io/strata-llm/strata"
    tag        = "0.1.0"
  }
}

variable "strata_values_file" {
  description = "Values for the strata chart (one model deployment); empty: do not install it yet (install after the first publish)."
  type        = string
  default     = ""
}

variable "namespace" {
  description = "Namespace of the serving stack and the workflows."
  type        = string
  default     = "strata"
}

variable "tags" {
  description = "Tags on every AWS resource."
  type        = map(string)
  default     = {}
}
