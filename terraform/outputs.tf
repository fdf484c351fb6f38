output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "models_bucket" {
  description = "Publish weights under s3://<this>/<model>/ for strata publish --source."
  value       = aws_s3_bucket.data["models"].bucket
}

output "kv_bucket" {
  description = "The KV cache's shared S3 tier (prefix kv/)."
  value       = aws_s3_bucket.data["kv"].bucket
}

output "mlflow_artifacts_bucket" {
  description = "MLflow's artifact store (prefix artifacts/)."
  value       = aws_s3_bucket.data["mlflow"].bucket
}

output "model_cache" {
  description = "The shared model cache behind the strata-model-cache PVC."
  value = var.model_cache_backend == "fsx" ? {
    backend        = "fsx"
    file_system_id = aws_fsx_lustre_file_system.models[0].id
    } : {
    backend        = "efs"
    file_system_id = aws_efs_file_system.models[0].id
  }
}

output "karpenter_node_role" {
  description = "IAM role of Karpenter's nodes (the EC2NodeClasses' spec.role)."
  value       = module.karpenter.node_iam_role_name
}

output "argo_ui" {
  description = "How to reach the Argo UI and server."
  value       = "kubectl -n argo port-forward svc/argo-workflows-server 2746:2746, then https://localhost:2746 with a token from: kubectl -n ${var.namespace} create token strata-publisher"
}
