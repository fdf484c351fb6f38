{{/* Names, labels and the pieces every pod shares. */}}

{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels on every object, besides its selector labels (strata.selector). */}}
{{- define "strata.labels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: strata
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
strata.dev/model: {{ .Values.model.name | quote }}
{{- with .Values.model.version }}
strata.dev/model-version: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Selector labels: (dict "ctx" $ "component" "worker" "role" "decode" "pool" "p"); all optional but ctx. */}}
{{- define "strata.selector" -}}
app.kubernetes.io/name: strata
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- if .role }}
strata.dev/role: {{ .role }}
{{- end }}
{{- if .pool }}
strata.dev/worker-pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "strata.workerName" -}}
{{- printf "%s-worker-%s" (include "strata.fullname" .ctx) .pool | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Container hardening shared by every container. */}}
{{- define "strata.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Probes: (dict "startupFailures" N "ready" PATH "live" PATH); paths default to /health. */}}
{{- define "strata.probes" -}}
startupProbe:
  httpGet: {path: {{ default "/health" .live }}, port: http}
  periodSeconds: 5
  failureThreshold: {{ .startupFailures }}
readinessProbe:
  httpGet: {path: {{ default "/health" .ready }}, port: http}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet: {path: {{ default "/health" .live }}, port: http}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* The EFA interfaces one worker of a pool requests: gpus * efaPerGpu of its family. */}}
{{- define "strata.workerEfa" -}}
{{- $family := index .ctx.Values.gpuFamilies .family -}}
{{- mul .gpus $family.efaPerGpu -}}
{{- end -}}

{{- define "strata.frontendName" -}}
{{- printf "%s-frontend" (include "strata.fullname" .) -}}
{{- end -}}

{{/* The label selector of this release's worker Services (frontend discovery, planner). */}}
{{- define "strata.workerSelector" -}}
{{- printf "app.kubernetes.io/component=worker,app.kubernetes.io/instance=%s" .Release.Name -}}
{{- end -}}

{{/* STRATA_ADMIN_KEY from frontend.adminKeySecret (frontend and planner), if one is named. */}}
{{- define "strata.adminKeyEnv" -}}
{{- with .Values.frontend.adminKeySecret }}
{{- if .name }}
- name: STRATA_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ .name }}, key: {{ .key }}}
{{- end }}
{{- end }}
{{- end -}}
