{{- define "karpenter.labels" -}}
app.kubernetes.io/name: strata-karpenter
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: strata
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "karpenter.required" -}}
{{- if not .value }}{{ fail (printf "karpenter values: %s is required" .name) }}{{ end -}}
{{- end -}}

{{/* Selector terms shared by both node classes: the cluster's discovery tag. */}}
{{- define "karpenter.discovery" -}}
subnetSelectorTerms:
  - tags: {karpenter.sh/discovery: {{ .Values.clusterName }}}
securityGroupSelectorTerms:
  - tags: {karpenter.sh/discovery: {{ .Values.clusterName }}}
{{- end -}}

{{/* IMDSv2 only, and not reachable from pods (one hop): pods get AWS access by Pod Identity. */}}
{{- define "karpenter.metadataOptions" -}}
metadataOptions:
  httpEndpoint: enabled
  httpProtocolIPv6: disabled
  httpPutResponseHopLimit: 1
  httpTokens: required
{{- end -}}
