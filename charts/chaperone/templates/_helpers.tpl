{{/*
Names shared by the templates. The fullname is fullnameOverride, else the
release name, unless that does not already say the chart's name (nameOverride,
default "chaperone": then "<release>-<name>"); objects derive their names from
it so that two releases never collide on cluster-scoped names.
*/}}
{{- define "chaperone.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "chaperone.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "chaperone.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The controller's ServiceAccount: serviceAccount.name, else the controller's name. */}}
{{- define "chaperone.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "chaperone.controllerName" .) -}}
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
app.kubernetes.io/name: {{ include "chaperone.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chaperone
{{- end -}}

{{/* Selects the controller's pods; never changes between upgrades. */}}
{{- define "chaperone.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chaperone.name" . }}
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
