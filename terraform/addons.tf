# Cluster add-ons from their upstream charts (pinned in main.tf) and Strata's charts.

resource "kubernetes_namespace_v1" "strata" {
  metadata {
    name = var.namespace
  }
}

resource "helm_release" "kube_prometheus_stack" {
  name             = "kube-prometheus-stack"
  namespace        = "monitoring"
  create_namespace = true
  repository       = local.charts.kube_prometheus_stack.repository
  chart            = local.charts.kube_prometheus_stack.chart
  version          = local.charts.kube_prometheus_stack.version

  values = [yamlencode({
    grafana = {
      # Dashboards come from ConfigMaps labelled grafana_dashboard=1 (the strata chart's),
      # read by the sidecar: nothing is downloaded when Grafana starts.
      sidecar = {
        dashboards = {
          enabled          = true
          label            = "grafana_dashboard"
          searchNamespace  = "ALL"
          folderAnnotation = "grafana_folder"
          provider         = { foldersFromFilesStructure = true }
        }
      }
      nodeSelector = { "strata.dev/pool" = "system" }
    }
  })]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = local.charts.nvidia_device_plugin.repository
  chart      = local.charts.nvidia_device_plugin.chart
  version    = local.charts.nvidia_device_plugin.version

  values = [yamlencode({
    tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
  })]
}

resource "helm_release" "efa_device_plugin" {
  name       = "aws-efa-k8s-device-plugin"
  namespace  = "kube-system"
  repository = local.charts.efa_device_plugin.repository
  chart      = local.charts.efa_device_plugin.chart
  version    = local.charts.efa_device_plugin.version

  values = [yamlencode({
    tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
    # Only EFA pools' nodes (p5/p6) run the plugin.
    nodeSelector = { "strata.dev/efa" = "true" }
  })]
}

resource "helm_release" "argo_workflows" {
  name             = "argo-workflows"
  namespace        = "argo"
  create_namespace = true
  repository       = local.charts.argo_workflows.repository
  chart            = local.charts.argo_workflows.chart
  version          = local.charts.argo_workflows.version

  values = [
    file("${local.platform}/argo/argo-workflows-values.yaml"),
    yamlencode({ controller = { workflowNamespaces = [var.namespace] } }),
  ]
}

resource "helm_release" "mlflow" {
  name             = "mlflow"
  namespace        = local.mlflow_namespace
  create_namespace = true
  repository       = local.charts.mlflow.repository
  chart            = local.charts.mlflow.chart
  version          = local.charts.mlflow.version

  values = [yamlencode({
    serviceAccount = { create = true, name = local.mlflow_service_account }
    backendStore = {
      databaseMigration = true
      postgres = {
        enabled  = true
        host     = aws_db_instance.mlflow.address
        port     = aws_db_instance.mlflow.port
        database = aws_db_instance.mlflow.db_name
        user     = aws_db_instance.mlflow.username
      }
    }
    artifactRoot = {
      proxiedArtifactStorage = true
      s3 = {
        enabled = true
        bucket  = aws_s3_bucket.data["mlflow"].bucket
        path    = trimsuffix(local.mlflow_prefix, "/")
      }
    }
    nodeSelector = { "strata.dev/pool" = "system" }
  })]

  set_sensitive = [{
    name  = "backendStore.postgres.password"
    value = jsondecode(data.aws_secretsmanager_secret_version.mlflow_db.secret_string)["password"]
  }]
}

resource "helm_release" "strata_storage" {
  name      = "strata-storage"
  namespace = kubernetes_namespace_v1.strata.metadata[0].name
  chart     = "${local.platform}/storage"

  values = [yamlencode({
    backend   = var.model_cache_backend
    claimName = "strata-model-cache"
    fsx = var.model_cache_backend == "fsx" ? {
      fileSystemId = aws_fsx_lustre_file_system.models[0].id
      dnsName      = aws_fsx_lustre_file_system.models[0].dns_name
      mountName    = aws_fsx_lustre_file_system.models[0].mount_name
      capacity     = "${var.fsx_storage_capacity_gib}Gi"
    } : null
    efs = var.model_cache_backend == "efs" ? {
      fileSystemId = aws_efs_file_system.models[0].id
    } : null
  })]
}

resource "helm_release" "strata_workflows" {
  name      = "strata-workflows"
  namespace = kubernetes_namespace_v1.strata.metadata[0].name
  chart     = "${local.platform}/argo/strata-workflows"

  values = [yamlencode({
    image             = var.strata_image
    modelCachePvc     = "strata-model-cache"
    mlflowTrackingUri = "http://mlflow.${local.mlflow_namespace}.svc.cluster.local:5000"
    serviceAccount    = { name = local.workflows_service_account }
    # Promotion moves the serving chart's release below (when Terraform installs one).
    servingRelease = var.strata_values_file == "" ? "" : "strata"
  })]

  depends_on = [helm_release.argo_workflows]
}

# One model deployment; usually installed after the first publish (strata_values_file).
resource "helm_release" "strata" {
  count     = var.strata_values_file == "" ? 0 : 1
  name      = "strata"
  namespace = kubernetes_namespace_v1.strata.metadata[0].name
  chart     = "${local.platform}/helm/strata"

  values = [
    yamlencode({
      image      = var.strata_image
      modelCache = { claimName = "strata-model-cache", mountPath = "/model-cache" }
      workers    = { serviceAccount = { name = local.worker_service_account } }
    }),
    file(var.strata_values_file),
  ]

  depends_on = [helm_release.strata_storage, helm_release.kube_prometheus_stack, helm_release.strata_karpenter]
}
