{{/* Chart name. */}}
{{- define "kerwen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name. Kept to 40 characters: pod names add "-<ordinal>", the peer Service adds
"-peers", and StatefulSet pods carry a controller-revision-hash label built from the name.
*/}}
{{- define "kerwen.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kerwen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the node pods. */}}
{{- define "kerwen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kerwen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{/* Labels common to every object. */}}
{{- define "kerwen.labels" -}}
helm.sh/chart: {{ include "kerwen.chart" . }}
app.kubernetes.io/name: {{ include "kerwen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kerwen
{{- end -}}

{{- define "kerwen.peerService" -}}
{{- printf "%s-peers" (include "kerwen.fullname" .) -}}
{{- end -}}

{{- define "kerwen.metricsService" -}}
{{- printf "%s-metrics" (include "kerwen.fullname" .) -}}
{{- end -}}

{{- define "kerwen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kerwen.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The stable DNS name of the pod with ordinal .ordinal: <fullname>-<i>.<fullname>-peers.<ns>.svc.<domain>. */}}
{{- define "kerwen.podHost" -}}
{{- $ctx := .ctx -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "kerwen.fullname" $ctx) (int .ordinal) (include "kerwen.peerService" $ctx) $ctx.Release.Namespace $ctx.Values.clusterDomain -}}
{{- end -}}

{{/* KERWEN_PEERS: 1=HOST:PEER,2=HOST:PEER,... for every ordinal (node id = ordinal + 1). */}}
{{- define "kerwen.peers" -}}
{{- $ctx := . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.replicas) -}}
{{- $host := include "kerwen.podHost" (dict "ctx" $ctx "ordinal" $i) -}}
{{- $peers = append $peers (printf "%d=%s:%d" (add1 $i) $host (int $ctx.Values.ports.peer)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* The ids of the nodes that formed the cluster: 1..initialReplicas (at most replicas). */}}
{{- define "kerwen.initialNodes" -}}
{{- $ids := list -}}
{{- range $i := until (int (min .Values.initialReplicas .Values.replicas)) -}}
{{- $ids = append $ids (add1 $i | toString) -}}
{{- end -}}
{{- join "," $ids -}}
{{- end -}}

{{/* Name of the Secret holding the node certificate of ordinal .ordinal. */}}
{{- define "kerwen.tlsSecretName" -}}
{{- $ctx := .ctx -}}
{{- if $ctx.Values.tls.certManager.enabled -}}
{{- printf "%s-node-%d" (include "kerwen.fullname" $ctx) (int .ordinal) -}}
{{- else -}}
{{- printf "%s-%d" $ctx.Values.tls.existingSecretPrefix (int .ordinal) -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret with the administrator certificate of the scale-down hook. */}}
{{- define "kerwen.adminSecretName" -}}
{{- if .Values.tls.admin.existingSecret -}}
{{- .Values.tls.admin.existingSecret -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-admin" (include "kerwen.fullname" .) -}}
{{- else -}}
{{- printf "%s-admin" .Values.tls.existingSecretPrefix -}}
{{- end -}}
{{- end -}}

{{/* "true" when the chart has cert-manager issue the hook's administrator certificate. */}}
{{- define "kerwen.issuesAdminCertificate" -}}
{{- if and .Values.scaleDownHook.enabled .Values.tls.certManager.enabled (not .Values.tls.admin.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{/* The scale-down hook's endpoints: the client port of each pod that stays, by its stable
name (in every node certificate). Not the client Service: it may route to a node being
removed, whose view of the registry stops once it has left the metadata group. */}}
{{- define "kerwen.stayingEndpoints" -}}
{{- $ctx := . -}}
{{- $endpoints := list -}}
{{- range $i := until (int .Values.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s:%d" (include "kerwen.podHost" (dict "ctx" $ctx "ordinal" $i)) (int $ctx.Values.ports.client)) -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- end -}}

{{/* Fails the render unless exactly one TLS source is configured. */}}
{{- define "kerwen.validateTls" -}}
{{- $cm := .Values.tls.certManager.enabled -}}
{{- $prefix := .Values.tls.existingSecretPrefix -}}
{{- if and $cm $prefix -}}
{{- fail "kerwen: set either tls.existingSecretPrefix or tls.certManager.enabled, not both" -}}
{{- end -}}
{{- if not (or $cm $prefix) -}}
{{- fail "kerwen: TLS is required; set tls.existingSecretPrefix (Secrets <prefix>-<ordinal>) or tls.certManager.enabled with tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and $cm (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "kerwen: tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- end -}}

{{/* PromQL label matchers selecting this release's series. */}}
{{- define "kerwen.promSelector" -}}
{{- if .Values.metrics.prometheusRule.selector -}}
{{- .Values.metrics.prometheusRule.selector -}}
{{- else -}}
{{- printf "job=%q,namespace=%q" (include "kerwen.metricsService" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}
