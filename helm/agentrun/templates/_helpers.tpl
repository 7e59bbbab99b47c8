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
  value: {{ printf "%s://%s.%s.svc:6379" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "agentrun.redisName" .) .Release.Namespace | quote }}
{{- else if and .Values.redis.external.existingSecret .Values.redis.external.existingSecretUrlKey (not .Values.redis.external.url) }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretUrlKey }}
{{- else }}
{{- $url := required "redis.external.url (or redis.external.existingSecret with a url key) is required when redis.bundled is false" .Values.redis.external.url }}
{{- if and .Values.redis.tls.enabled (not (hasPrefix "rediss" $url)) }}
{{- fail (printf "redis.tls.enabled is true but redis.external.url %q is not a rediss:// (or rediss+sentinel://, rediss+cluster://) URL" $url) }}
{{- end }}
{{- if and (contains "+cluster://" $url) (ne (toString .Values.sidecar.durability) "none") }}
{{- fail (printf "sidecar.durability %q cannot be used with a Redis Cluster (redis.external.url %q): its WAIT would go to every master, not the run's; set sidecar.durability=none" (toString .Values.sidecar.durability) $url) }}
{{- end }}
  value: {{ $url | quote }}
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
{{- if .Values.redis.tls.enabled }}
{{- if .Values.redis.tls.caSecret }}
- name: AGENTRUN_REDIS_CA_FILE
  value: /etc/agentrun/redis-tls/ca/ca.crt
{{- end }}
{{- if .Values.redis.tls.clientCertSecret }}
- name: AGENTRUN_REDIS_CLIENT_CERT
  value: /etc/agentrun/redis-tls/client/tls.crt
- name: AGENTRUN_REDIS_CLIENT_KEY
  value: /etc/agentrun/redis-tls/client/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* Checks the TLS values once (included by every template that uses Redis). */}}
{{- define "agentrun.redisTlsCheck" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.bundled }}
{{- if not .Values.redis.tls.serverCertSecret }}
{{- fail "redis.tls.serverCertSecret (a kubernetes.io/tls Secret for the bundled Redis) is required when redis.tls.enabled and redis.bundled are true" }}
{{- end }}
{{- if not .Values.redis.tls.caSecret }}
{{- fail "redis.tls.caSecret (the CA that signed redis.tls.serverCertSecret) is required when redis.tls.enabled and redis.bundled are true" }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Read-only mounts of the Redis TLS Secrets (empty without TLS). */}}
{{- define "agentrun.redisTlsMounts" -}}
{{- if .Values.redis.tls.enabled }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls-ca
  mountPath: /etc/agentrun/redis-tls/ca
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.clientCertSecret }}
- name: redis-tls-client
  mountPath: /etc/agentrun/redis-tls/client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The volumes of agentrun.redisTlsMounts: only the keys needed, readable by fsGroup only. */}}
{{- define "agentrun.redisTlsVolumes" -}}
{{- if .Values.redis.tls.enabled }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.redis.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if .Values.redis.tls.clientCertSecret }}
- name: redis-tls-client
  secret:
    secretName: {{ .Values.redis.tls.clientCertSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* Secret with the relay's bearer tokens (relay.auth.mode token). */}}
{{- define "agentrun.relayTokensSecret" -}}
{{- .Values.relay.auth.existingSecret | default (printf "%s-relay-tokens" (include "agentrun.fullname" .)) -}}
{{- end -}}

{{- define "agentrun.relayUrl" -}}
{{- if .Values.relay.publicUrl -}}
{{- .Values.relay.publicUrl | trimSuffix "/" -}}
{{- else if .Values.relay.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" (ne .Values.relay.ingress.tlsSecretName "")) .Values.relay.ingress.host -}}
{{- end -}}
{{- end -}}

{{/* Pod security context of the chart's own pods (without fixed ids on OpenShift). */}}
{{- define "agentrun.podSecurityContext" -}}
{{- $sc := deepCopy .Values.podSecurityContext -}}
{{- if .Values.openshift -}}
{{- $_ := unset $sc "runAsUser" -}}
{{- $_ := unset $sc "runAsGroup" -}}
{{- $_ := unset $sc "fsGroup" -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}

{{/* The sidecar containers' security context as JSON (without fixed ids on OpenShift). */}}
{{- define "agentrun.sidecarSecurityContext" -}}
{{- $sc := deepCopy .Values.sidecar.securityContext -}}
{{- if .Values.openshift -}}
{{- $_ := unset $sc "runAsUser" -}}
{{- $_ := unset $sc "runAsGroup" -}}
{{- end -}}
{{- toJson $sc -}}
{{- end -}}

{{/* fsGroup of agent pods: a number, or "none". */}}
{{- define "agentrun.agentFsGroup" -}}
{{- if or .Values.openshift (kindIs "invalid" .Values.agentPods.fsGroup) -}}
none
{{- else -}}
{{- int64 .Values.agentPods.fsGroup -}}
{{- end -}}
{{- end -}}

{{/* The archive store's URL, as the archiver and the relay get it. */}}
{{- define "agentrun.archiveStoreUrl" -}}
{{- .Values.archive.storeUrl | default "file:///var/lib/agentrun/archive" -}}
{{- end -}}

{{/* The PersistentVolumeClaim of the filesystem store. */}}
{{- define "agentrun.archiveClaim" -}}
{{- .Values.archive.persistence.existingClaim | default (printf "%s-archive" (include "agentrun.fullname" .)) -}}
{{- end -}}
