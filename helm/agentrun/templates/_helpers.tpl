{{/* Names and labels shared by every template. */}}

{{- define "agentrun.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentrun.labels" -}}
app.kubernetes.io/name: agentrun
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "operator"). */}}
{{- define "agentrun.selectorLabels" -}}
app.kubernetes.io/name: agentrun
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Full image reference: include with (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "agentrun.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .image.repository $tag -}}
{{- end -}}

{{- define "agentrun.redisName" -}}
{{- printf "%s-redis" (include "agentrun.fullname" .) -}}
{{- end -}}

{{/* Secret with the Redis password (key from agentrun.redisPasswordKey). */}}
{{- define "agentrun.redisSecretName" -}}
{{- if and (not .Values.redis.bundled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- printf "%s-redis-auth" (include "agentrun.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "agentrun.redisPasswordKey" -}}
{{- if and (not .Values.redis.bundled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{/* Whether the chart creates the password Secret. */}}
{{- define "agentrun.createRedisSecret" -}}
{{- if .Values.redis.bundled -}}
{{- if .Values.redis.createSecret }}true{{ end -}}
{{- else if and (not .Values.redis.external.existingSecret) .Values.redis.external.password -}}
true
{{- end -}}
{{- end -}}

{{/* Environment that points a component at Redis. */}}
{{- define "agentrun.redisEnv" -}}
- name: AGENTRUN_REDIS_URL
{{- if .Values.redis.bundled }}
  value: {{ printf "redis://%s.%s.svc:6379" (include "agentrun.redisName" .) .Release.Namespace | quote }}
{{- else if and .Values.redis.external.existingSecret .Values.redis.external.existingSecretUrlKey (not .Values.redis.external.url) }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretUrlKey }}
{{- else }}
  value: {{ required "redis.external.url (or redis.external.existingSecret with a url key) is required when redis.bundled is false" .Values.redis.external.url | quote }}
{{- end }}
- name: AGENTRUN_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "agentrun.redisSecretName" . }}
      key: {{ include "agentrun.redisPasswordKey" . }}
      optional: {{ not .Values.redis.bundled }}
{{- with .Values.redis.external.username }}
- name: AGENTRUN_REDIS_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "agentrun.relayUrl" -}}
{{- if .Values.relay.publicUrl -}}
{{- .Values.relay.publicUrl | trimSuffix "/" -}}
{{- else if .Values.relay.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" (ne .Values.relay.ingress.tlsSecretName "")) .Values.relay.ingress.host -}}
{{- end -}}
{{- end -}}
