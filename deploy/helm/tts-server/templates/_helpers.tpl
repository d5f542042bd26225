{{/* The release's base name: the release name, or release-chart when it lacks the chart's name. */}}
{{- define "tts.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select one component's pods: (dict "ctx" $ "component" "gateway"). */}}
{{- define "tts.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tts.labels" -}}
{{ include "tts.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version }}
{{- end -}}

{{- define "tts.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Where the gateway sends policy calls: this chart's router, or the external URL. */}}
{{- define "tts.policyUrl" -}}
{{- if eq .Values.policy.mode "vllm" -}}
{{- printf "http://%s-router:%v" (include "tts.fullname" .) .Values.router.port -}}
{{- else if eq .Values.policy.mode "external" -}}
{{- required "policy.external.url is required with policy.mode=external" .Values.policy.external.url -}}
{{- else -}}
{{- fail (printf "policy.mode must be vllm or external, not %q" .Values.policy.mode) -}}
{{- end -}}
{{- end -}}

{{/* The affinity release call: the value, else this chart's router's /finish_session. */}}
{{- define "tts.affinityReleaseUrl" -}}
{{- if .Values.gateway.affinity.releaseUrl -}}
{{- .Values.gateway.affinity.releaseUrl -}}
{{- else if eq .Values.policy.mode "vllm" -}}
{{- printf "http://%s-router:%v/finish_session" (include "tts.fullname" .) .Values.router.port -}}
{{- end -}}
{{- end -}}

{{- define "tts.prmUrl" -}}
{{- printf "http://%s-prm:%v" (include "tts.fullname" .) .Values.prm.port -}}
{{- end -}}

{{/* The PRM vLLM the worker's vllm backend scores with: the chart's own, or prm.vllm.url. */}}
{{- define "tts.prmVllmUrl" -}}
{{- if .Values.prm.vllm.deploy -}}
{{- printf "http://%s-prm-vllm:%v" (include "tts.fullname" .) .Values.prm.vllm.port -}}
{{- else -}}
{{- required "prm.vllm.url is required with prm.backend=vllm and prm.vllm.deploy=false" .Values.prm.vllm.url -}}
{{- end -}}
{{- end -}}

{{- define "tts.apiKeySecret" -}}
{{- .Values.gateway.apiKeys.existingSecret | default (printf "%s-api-keys" (include "tts.fullname" .)) -}}
{{- end -}}
