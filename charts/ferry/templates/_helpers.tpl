{{/*
Names. Every name the operator is told about (--webhook-secret,
--webhook-service, --webhook-config, --lease-name) comes from one helper
here, so the flags and the objects cannot disagree.
*/}}

{{/* The chart name (nameOverride). */}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: the release name, or
"<release>-<chart>" when the release name does not contain the chart name. */}}
{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "ferry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "ferry.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Selector labels of the NATS pods. */}}
{{- define "ferry.nats.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end }}

{{- define "ferry.operator.name" -}}{{ include "ferry.fullname" . }}-operator{{- end }}
{{- define "ferry.serviceAccountName" -}}{{ include "ferry.fullname" . }}-operator{{- end }}
{{- define "ferry.leaseName" -}}{{ include "ferry.fullname" . }}-operator{{- end }}
{{- define "ferry.injectConfigName" -}}{{ include "ferry.fullname" . }}-inject{{- end }}
{{- define "ferry.webhook.serviceName" -}}{{ include "ferry.fullname" . }}-webhook{{- end }}
{{- define "ferry.webhook.secretName" -}}{{ include "ferry.fullname" . }}-webhook-tls{{- end }}
{{- define "ferry.webhook.configName" -}}{{ include "ferry.fullname" . }}-sidecar-injector{{- end }}
{{- define "ferry.webhook.certificateName" -}}{{ include "ferry.fullname" . }}-webhook{{- end }}
{{- define "ferry.webhook.issuerName" -}}{{ include "ferry.fullname" . }}-selfsigned{{- end }}
{{- define "ferry.metrics.serviceName" -}}{{ include "ferry.fullname" . }}-metrics{{- end }}
{{- define "ferry.nats.name" -}}{{ include "ferry.fullname" . }}-nats{{- end }}
{{- define "ferry.nats.headlessName" -}}{{ include "ferry.fullname" . }}-nats-headless{{- end }}

{{/* The operator's broker URL: the bundled NATS when enabled, else broker.url. */}}
{{- define "ferry.brokerURL" -}}
{{- if .Values.nats.enabled -}}
nats://{{ include "ferry.nats.name" . }}.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{ .Values.broker.url }}
{{- end -}}
{{- end }}

{{/* image: repository:tag, the tag defaulting to the appVersion. Takes
(list $image $root). */}}
{{- define "ferry.image" -}}
{{- $image := index . 0 }}{{ $root := index . 1 -}}
{{ $image.repository }}:{{ $image.tag | default $root.Chart.AppVersion }}
{{- end }}

{{/* The injected sidecar's defaults (inject.yaml, read by the operator as
webhook::InjectConfig). */}}
{{- define "ferry.injectConfig" -}}
image: {{ include "ferry.image" (list .Values.sidecar.image .) }}
imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
broker:
  url: {{ .Values.sidecar.broker.url | default (include "ferry.brokerURL" .) | quote }}
  credentialsSecret: {{ .Values.sidecar.broker.credentialsSecret | quote }}
  tlsCASecret: {{ .Values.sidecar.broker.tlsCASecret | quote }}
fsync: {{ .Values.sidecar.fsync }}
logFormat: {{ .Values.sidecar.logFormat }}
apiPort: {{ .Values.sidecar.apiPort }}
adminPort: {{ .Values.sidecar.adminPort }}
dataDir: {{ .Values.sidecar.dataDir | quote }}
dataVolume:
  type: {{ .Values.sidecar.dataVolume.type }}
  sizeLimit: {{ .Values.sidecar.dataVolume.sizeLimit | quote }}
  storageClassName: {{ .Values.sidecar.dataVolume.storageClassName | quote }}
resources:
  {{- toYaml .Values.sidecar.resources | nindent 2 }}
{{- with .Values.sidecar.dedupeMaxIds }}
dedupeMaxIds: {{ . | int64 }}
{{- end }}
{{- with .Values.sidecar.dedupeWindow }}
dedupeWindow: {{ . | quote }}
{{- end }}
{{- with .Values.sidecar.outboxRetention }}
outboxRetention: {{ . | quote }}
{{- end }}
{{- with .Values.sidecar.maxMessageBytes }}
maxMessageBytes: {{ . | int64 }}
{{- end }}
{{- end }}
