{{/* Chart name, truncated to the 63 characters Kubernetes allows in names and labels. */}}
{{- define "sitsflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, plus the chart name unless the release name holds it. */}}
{{- define "sitsflow.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sitsflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "sitsflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The service account the workflow's pods run as. */}}
{{- define "sitsflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sitsflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The CPU and GPU images: repository@digest when a digest is given, else repository:tag. */}}
{{- define "sitsflow.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "sitsflow.gpuImage" -}}
{{- $repository := default .Values.image.repository .Values.gpuImage.repository }}
{{- if .Values.gpuImage.digest }}
{{- printf "%s@%s" $repository .Values.gpuImage.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.gpuImage.tag) }}
{{- end }}
{{- end }}
