{{/* Names, labels and the parts the web and forwarder pods share. */}}

{{- define "identity-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "identity-service.fullname" -}}
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

{{/* `<fullname>-<suffix>`, the full name cut so that the whole fits in `max` characters:
(dict "root" $ "suffix" "forwarder" "max" 63). A Service's name is a DNS label (63); a
StatefulSet's at most 52, its pods' controller-revision-hash label being it plus 11. */}}
{{- define "identity-service.suffixedName" -}}
{{- $room := sub .max (add1 (len .suffix)) | int }}
{{- printf "%s-%s" (include "identity-service.fullname" .root | trunc $room | trimSuffix "-") .suffix }}
{{- end }}

{{/* The forwarder's Deployment and Service. */}}
{{- define "identity-service.forwarderName" -}}
{{- include "identity-service.suffixedName" (dict "root" . "suffix" "forwarder" "max" 63) }}
{{- end }}

{{/* The web pods' metrics Service (with metricsPort). */}}
{{- define "identity-service.metricsName" -}}
{{- include "identity-service.suffixedName" (dict "root" . "suffix" "metrics" "max" 63) }}
{{- end }}

{{/* The label of a Service naming the job of its targets' series (the ServiceMonitor's
jobLabel); a Service without it gives its own name, as the forwarder's does. */}}
{{- define "identity-service.jobLabel" -}}
identity-service/job
{{- end }}

{{/* The in-chart Redis's StatefulSet, Service and NetworkPolicy. */}}
{{- define "identity-service.redisName" -}}
{{- include "identity-service.suffixedName" (dict "root" . "suffix" "redis" "max" 52) }}
{{- end }}

{{/* Labels of every object; `component` (web, forwarder, redis, test) is added per object. */}}
{{- define "identity-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "identity-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "identity-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "identity-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "web"). */}}
{{- define "identity-service.componentSelector" -}}
{{ include "identity-service.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "identity-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "identity-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "identity-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "identity-service.redisImage" -}}
{{- with .Values.redis.internal.image }}
{{- if .digest }}
{{- printf "%s:%s@%s" .repository .tag .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret the IDENTITY_* secrets come from: the user's or the chart's. */}}
{{- define "identity-service.secretName" -}}
{{- default (include "identity-service.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* Which Secret holds the Redis password, if any: redis.auth.existingSecret, else the
chart's own (redisAuthSecretName) when redis.auth.password is set or the Redis is the
in-chart one, which always requires a password. Empty: an external Redis without one. */}}
{{- define "identity-service.redisPasswordSecret" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if or .Values.redis.auth.password .Values.redis.internal.enabled }}
{{- include "identity-service.redisAuthSecretName" . }}
{{- end }}
{{- end }}

{{/* The chart's own Secret of the Redis password. */}}
{{- define "identity-service.redisAuthSecretName" -}}
{{- printf "%s-redis-auth" (include "identity-service.fullname" .) }}
{{- end }}

{{/* The password the chart's own Redis Secret holds (as bitnami's
common.secrets.passwords.manage), the first of:
1. redis.auth.password;
2. the one the Secret already holds in the cluster, so that `helm upgrade` keeps it, whether
   given, derived or random before (lookup; a render without a cluster, `helm template`,
   `--dry-run`, Argo CD, finds none, and neither does a first install);
3. with the server secret in the values (`secret`, no existingSecret): one derived from it,
   so that every render makes the same one, and a render without a cluster changes neither
   the Secret nor the checksums that roll Redis and the pods (redisDerivedPassword);
4. else (the server secret in the user's existingSecret, unknown here) a new random one, 32
   letters and digits, which only lookup keeps: such renders must be given one.
All URL-safe as the URL takes them. Worked out once per render and kept aside in the values
(under a key the schema refuses in user values), so that the Secret and the checksums that
roll the pods on a new password all see the same one. */}}
{{- define "identity-service.redisChartPassword" -}}
{{- $auth := .Values.redis.auth }}
{{- if not (hasKey $auth "_resolvedPassword") }}
{{- $password := $auth.password }}
{{- if not $password }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "identity-service.redisAuthSecretName" .) }}
{{- $password = dig "data" "redis-password" "" ($existing | default dict) | b64dec }}
{{- end }}
{{- if not $password }}
{{- $password = include "identity-service.redisDerivedPassword" . }}
{{- end }}
{{- $_ := set $auth "_resolvedPassword" ($password | default (randAlphaNum 32)) }}
{{- end }}
{{- index $auth "_resolvedPassword" }}
{{- end }}

{{/* The Redis password derived from the server secret when the values hold it (`secret`,
and no existingSecret, whose IDENTITY_SECRET the chart cannot read); empty otherwise. The
first 32 hex digits (128 bits) of SHA-256 over a label unique to this use, the release's
full name and the server secret: one-way, so the password (which the pods' environment and
anyone who may read its Secret see) reveals nothing of the server secret, at least 32
characters and kept secret itself; and another release, or another use of the same secret,
gets another password. The full name, not the namespace: a render without `--namespace`
(`helm template`) would see `default`, while a new full name makes new objects anyway (the
Secret, the Redis StatefulSet and its volume). The server secret last, so that no two
inputs read alike. */}}
{{- define "identity-service.redisDerivedPassword" -}}
{{- if and .Values.secret (not .Values.existingSecret) }}
{{- printf "identity-service/in-chart-redis-password/v1\n%s\n%s" (include "identity-service.fullname" .) .Values.secret | sha256sum | trunc 32 }}
{{- end }}
{{- end }}

{{- define "identity-service.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- "redis-password" }}
{{- end }}
{{- end }}

{{/* IDENTITY_REDIS_URL, with $(REDIS_PASSWORD) for the kubelet to fill in. */}}
{{- define "identity-service.redisUrl" -}}
{{- $url := .Values.redis.url }}
{{- if .Values.redis.internal.enabled }}
{{- $url = printf "redis://%s:6379/0" (include "identity-service.redisName" .) }}
{{- end }}
{{- if not $url }}
{{- fail "set redis.url (an external Redis) or redis.internal.enabled=true: the service keeps its handoffs and outbox in Redis" }}
{{- end }}
{{- $username := .Values.redis.auth.username }}
{{- $password := include "identity-service.redisPasswordSecret" . }}
{{- if and $username (not $password) }}
{{- fail "redis.auth.username needs a password: set redis.auth.password or redis.auth.existingSecret (a user name alone would be dropped from the URL)" }}
{{- end }}
{{- if and .Values.redis.internal.enabled $username (ne $username "default") }}
{{- fail "the in-chart Redis has only the default user: leave redis.auth.username empty (or default) with redis.internal.enabled" }}
{{- end }}
{{- if $password }}
{{- $credentials := printf "%s:$(REDIS_PASSWORD)@" .Values.redis.auth.username }}
{{- regexReplaceAll "^(rediss?(\\+cluster|\\+sentinel)?://)" $url (printf "${1}%s" $credentials) }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* The Redis ports the NetworkPolicy lets the pods reach, comma-separated: the in-chart
Redis's; else redis.port, or the port of every host redis.url names (6379 when one names
none); and redis.dataPorts: the data nodes a Sentinel names (6379 when not given) or the
Cluster nodes the seeds do not name. */}}
{{- define "identity-service.redisPorts" -}}
{{- $ports := list }}
{{- if .Values.redis.internal.enabled }}
{{- $ports = list "6379" }}
{{- else }}
{{- $url := urlParse .Values.redis.url }}
{{- if .Values.redis.port }}
{{- $ports = list (toString .Values.redis.port) }}
{{- else }}
{{- range splitList "," $url.host }}
{{- $ports = append $ports (regexFind ":[0-9]+$" . | trimPrefix ":" | default "6379") }}
{{- end }}
{{- end }}
{{- $data := .Values.redis.dataPorts }}
{{- if and (kindIs "invalid" $data) (hasSuffix "+sentinel" $url.scheme) }}
{{- $data = list 6379 }}
{{- end }}
{{- range $data }}
{{- $ports = append $ports (toString .) }}
{{- end }}
{{- end }}
{{- $ports | uniq | join "," }}
{{- end }}

{{/* The environment both pods share: settings, secrets, Redis. */}}
{{- define "identity-service.envFrom" -}}
- configMapRef:
    name: {{ include "identity-service.fullname" . }}
- secretRef:
    name: {{ include "identity-service.secretName" . }}
{{- end }}

{{- define "identity-service.redisEnv" -}}
{{- $secret := include "identity-service.redisPasswordSecret" . }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "identity-service.redisPasswordKey" . }}
{{- end }}
- name: IDENTITY_REDIS_URL
  value: {{ include "identity-service.redisUrl" . | quote }}
{{- end }}

{{/* The pod-level parts of the web and forwarder pods. */}}
{{- define "identity-service.podSpecCommon" -}}
serviceAccountName: {{ include "identity-service.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- include "identity-service.podSecurityContext" (dict "root" . "id" 10001 "fsGroup" true) | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: tmp
    emptyDir:
      medium: Memory
      sizeLimit: 64Mi
{{- end }}

{{/* Topology spread of one component's pods: (dict "root" $ "component" "web"). A
constraint given without a labelSelector (which would count no pod at all) counts the
component's own pods. */}}
{{- define "identity-service.topologySpread" -}}
{{- if .root.Values.topologySpreadConstraints }}
{{- range .root.Values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "identity-service.componentSelector" $ | fromYaml)) }}
{{- end }}
- {{ toYaml $constraint | indent 2 | trim }}
{{- end }}
{{- else }}
{{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "identity-service.componentSelector" $ | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The container-level parts of every identity-service container. */}}
{{- define "identity-service.containerCommon" -}}
image: {{ include "identity-service.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- include "identity-service.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{- end }}

{{/* "true" when the pods leave their user and group IDs to the platform, as OpenShift's
restricted-v2 SecurityContextConstraints want (it assigns a UID of the namespace's range,
GID 0, and refuses pods that ask for any other): with
global.compatibility.openshift.adaptSecurityContext `force`, or `auto` on OpenShift (the
API serves security.openshift.io/v1). Empty otherwise. */}}
{{- define "identity-service.adaptToOpenShift" -}}
{{- $mode := dig "compatibility" "openshift" "adaptSecurityContext" "auto" (.Values.global | default dict) }}
{{- if or (eq $mode "force") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "security.openshift.io/v1")) }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* A pod's securityContext: non-root, RuntimeDefault seccomp and, unless adaptToOpenShift,
the image's user `id` as UID and GID (and fsGroup with "fsGroup" true):
(dict "root" $ "id" 10001 "fsGroup" true). */}}
{{- define "identity-service.podSecurityContext" -}}
runAsNonRoot: true
{{- if not (include "identity-service.adaptToOpenShift" .root) }}
runAsUser: {{ .id }}
runAsGroup: {{ .id }}
{{- if .fsGroup }}
fsGroup: {{ .id }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "identity-service.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Probes on `path` at `port`: (dict "root" $ "port" "http" "liveness" "/healthz" "readiness" "/readyz"). */}}
{{- define "identity-service.probes" -}}
{{- $p := .root.Values.probes }}
startupProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
readinessProbe:
  httpGet: {path: {{ .readiness }}, port: {{ .port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}

{{/* Checksums of the settings and secrets, so that a change rolls the pods. */}}
{{- define "identity-service.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- /* The chart's Secrets: its own, or only the Redis password's beside an existingSecret. */}}
{{- $secrets := include (print .Template.BasePath "/secret.yaml") . }}
{{- if trim $secrets }}
checksum/secret: {{ $secrets | sha256sum }}
{{- end }}
{{- end }}

{{/* Seconds a container may take to stop after SIGTERM: `waits` times config.shutdownTimeout
(null: the service's 10 s; 0: it waits for nothing, which Helm's `default` would read as
unset), rounded up, and 5 s to close: (dict "root" $ "waits" 2). */}}
{{- define "identity-service.stopSeconds" -}}
{{- $timeout := .root.Values.config.shutdownTimeout }}
{{- if kindIs "invalid" $timeout }}
{{- $timeout = 10 }}
{{- end }}
{{- add (mulf $timeout .waits | ceil | int) 5 }}
{{- end }}

{{/* A duration of the schema's form (`500ms`, `10s`, `1m`) in milliseconds. */}}
{{- define "identity-service.milliseconds" -}}
{{- $unit := regexFind "[a-z]+$" . }}
{{- mul (trimSuffix $unit . | int) (get (dict "ms" 1 "s" 1000 "m" 60000) $unit) }}
{{- end }}

{{/* The PromQL selector of this release's series (both Services' jobs). */}}
{{- define "identity-service.promSelector" -}}
{{- $fullname := include "identity-service.fullname" . -}}
namespace="{{ .Release.Namespace }}",job=~"{{ $fullname }}|{{ include "identity-service.forwarderName" . }}"
{{- end }}

{{/* The pod template's metadata: (dict "root" $ "component" "web"). */}}
{{- define "identity-service.podMetadata" -}}
labels:
  {{- include "identity-service.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  {{- include "identity-service.checksums" .root | nindent 2 }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
