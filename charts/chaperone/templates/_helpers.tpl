{{/*
Names shared by the templates. The fullname is the release name, unless that
does not already say "chaperone" (then "<release>-chaperone"); objects derive
their names from it so that two releases never collide on cluster-scoped names.
*/}}
{{- define "chaperone.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The controller's Deployment, ServiceAccount, gRPC Service and Lease. */}}
{{- define "chaperone.controllerName" -}}
{{- printf "%s-controller" (include "chaperone.fullname" .) -}}
{{- end -}}

{{/* The Service the API server calls the injection webhook through. */}}
{{- define "chaperone.webhookServiceName" -}}
{{- printf "%s-webhook" (include "chaperone.fullname" .) -}}
{{- end -}}

{{/* The Service that exposes /metrics. */}}
{{- define "chaperone.metricsServiceName" -}}
{{- printf "%s-controller-metrics" (include "chaperone.fullname" .) -}}
{{- end -}}

{{/* The MutatingWebhookConfiguration (cluster-scoped). */}}
{{- define "chaperone.webhookConfigName" -}}
{{- printf "%s-injector" (include "chaperone.fullname" .) -}}
{{- end -}}

{{/* The Secret holding the CA and the serving certificate. */}}
{{- define "chaperone.tlsSecretName" -}}
{{- printf "%s-controller-tls" (include "chaperone.fullname" .) -}}
{{- end -}}

{{- define "chaperone.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chaperone
{{- end -}}

{{/* Selects the controller's pods; never changes between upgrades. */}}
{{- define "chaperone.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* repository[:tag][@digest] of an image value (.image) with .appVersion. */}}
{{- define "chaperone.image" -}}
{{- $tag := .image.tag | default .appVersion -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
Namespaces the webhook never sees: the ones the controller itself never
injects (kube-system, kube-public, kube-node-lease and its own), and more from
values.
*/}}
{{- define "chaperone.excludedNamespaces" -}}
{{- $list := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- range .Values.webhook.excludedNamespaces -}}
{{- $list = append $list . -}}
{{- end -}}
{{- toJson (uniq $list) -}}
{{- end -}}
