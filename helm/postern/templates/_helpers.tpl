{{/* Names and labels shared by every object. */}}

{{- define "postern.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "postern.fullname" -}}
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

{{- define "postern.selectorLabels" -}}
app.kubernetes.io/name: {{ include "postern.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "postern.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "postern.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: postern
{{- end }}

{{- define "postern.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "postern.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding tls.crt and tls.key, or "" for a self-signed certificate. */}}
{{- define "postern.tlsSecret" -}}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "postern.fullname" .) }}
{{- end }}
{{- end }}

{{- define "postern.usersSecret" -}}
{{- default (printf "%s-users" (include "postern.fullname" .)) .Values.users.existingSecret }}
{{- end }}

{{/* Seconds Postern drains sessions for after SIGTERM. */}}
{{- define "postern.drainSeconds" -}}
{{- int .Values.shutdown.drainSeconds }}
{{- end }}

{{- define "postern.terminationGracePeriodSeconds" -}}
{{- $floor := add (int .Values.shutdown.drainSeconds) (int .Values.shutdown.preStopSleepSeconds) }}
{{- if kindIs "invalid" .Values.shutdown.terminationGracePeriodSeconds }}
{{- add $floor 10 }}
{{- else }}
{{- $grace := int .Values.shutdown.terminationGracePeriodSeconds }}
{{- if le $grace $floor }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must be above shutdown.drainSeconds + shutdown.preStopSleepSeconds (%d), or Kubernetes kills Postern before its sessions are told to reconnect" $grace $floor) }}
{{- end }}
{{- $grace }}
{{- end }}
{{- end }}

{{/* The client listeners, in the order they are rendered everywhere. */}}
{{- define "postern.clientListeners" -}}
{{- list "imaps" "imap" "pop3s" "pop3" "submission" "submissions" "sieve" | toJson }}
{{- end }}

{{/* The protocol a client listener speaks, by its name. */}}
{{- define "postern.listenerProtocol" -}}
{{- if hasPrefix "pop3" . }}pop3
{{- else if hasPrefix "submission" . }}submission
{{- else if eq . "sieve" }}managesieve
{{- else }}imap
{{- end }}
{{- end }}

{{/* "true" when a POP3 listener runs, else "". */}}
{{- define "postern.pop3" -}}
{{- if or .Values.listeners.pop3s .Values.listeners.pop3 }}true{{ end }}
{{- end }}

{{/* "true" when a submission listener runs, else "". */}}
{{- define "postern.submission" -}}
{{- if or .Values.listeners.submission .Values.listeners.submissions }}true{{ end }}
{{- end }}

{{/* "true" when the ManageSieve listener runs, else "". */}}
{{- define "postern.sieve" -}}
{{- if .Values.listeners.sieve }}true{{ end }}
{{- end }}

{{/* The ports of one of the backends' other services, as JSON: called
with (list $ "pop3_port"), "submission_port" or "sieve_port". */}}
{{- define "postern.backendServicePorts" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $backends := (include "postern.config" $root | fromYaml).backends }}
{{- $servers := concat (default list $backends.pool) }}
{{- range (default list $backends.pools) }}
{{- $servers = concat $servers (default list .servers) }}
{{- end }}
{{- $ports := list }}
{{- range $servers }}
{{- with index . $key }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/* The ports of the submission relays (submission.relays: each address's
port), as JSON; [] without relays. */}}
{{- define "postern.relayPorts" -}}
{{- $config := include "postern.config" . | fromYaml }}
{{- $ports := list }}
{{- range (dig "submission" "relays" list $config) }}
{{- $ports = append $ports (regexFind ":[0-9]+$" .address | trimPrefix ":" | int) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/* The Postern configuration file, rendered from the values. */}}
{{- define "postern.config" -}}
{{- $v := .Values }}
{{- $listeners := list }}
{{- range $name := include "postern.clientListeners" . | fromJsonArray }}
{{- if index $v.listeners $name }}
{{- $l := dict "name" $name "bind" (printf "%s:%d" $v.listeners.bindAddress (int (index $v.containerPorts $name))) "tls" (ternary "implicit" "starttls" (has $name (list "imaps" "pop3s" "submissions"))) }}
{{- $protocol := include "postern.listenerProtocol" $name }}
{{- if ne $protocol "imap" }}
{{- $_ := set $l "protocol" $protocol }}
{{- end }}
{{- if $v.proxyProtocol.enabled }}
{{- if not $v.proxyProtocol.trustedNetworks }}
{{- fail "proxyProtocol.enabled needs proxyProtocol.trustedNetworks: the load balancer's addresses (headers from anywhere else are refused)" }}
{{- end }}
{{- $_ := set $l "proxy_protocol" (dict "trusted_networks" $v.proxyProtocol.trustedNetworks "timeout" $v.proxyProtocol.timeout) }}
{{- end }}
{{- $listeners = append $listeners $l }}
{{- end }}
{{- end }}
{{- if not $listeners }}
{{- fail "listeners: enable at least one of listeners.imaps, listeners.imap, listeners.pop3s, listeners.pop3, listeners.submission, listeners.submissions and listeners.sieve" }}
{{- end }}
{{- $tls := dict }}
{{- if include "postern.tlsSecret" . }}
{{- $_ := set $tls "certificates" (list (dict "cert" "/etc/postern/tls/tls.crt" "key" "/etc/postern/tls/tls.key")) }}
{{- else }}
{{- $_ := set $tls "certificates" list }}
{{- $_ := set $tls "self_signed" (dict "dir" "/var/lib/postern/self-signed-tls" "names" $v.tls.selfSignedNames) }}
{{- end }}
{{- $config := dict
  "listeners" $listeners
  "tls" $tls
  "auth" (dict "source" "static" "static" (dict "users_file" "/etc/postern/users/users.yaml" "format" $v.users.format))
  "backends" (deepCopy $v.backends)
  "limits" (dict "shutdown_drain" (printf "%ds" (int $v.shutdown.drainSeconds)))
  "metrics" (dict "bind" (printf "%s:%d" $v.listeners.bindAddress (int $v.containerPorts.metrics)))
  "reload" (dict "watch" true)
  "log" (dict "format" $v.log.format "level" $v.log.level)
}}
{{- with $v.submission }}
{{- $_ := set $config "submission" (deepCopy .) }}
{{- end }}
{{- with $v.managesieve }}
{{- $_ := set $config "managesieve" (deepCopy .) }}
{{- end }}
{{- if $v.admin.enabled }}
{{- $_ := set $config "admin" (dict "bind" (printf "127.0.0.1:%d" (int $v.admin.port)) "token_file" "/etc/postern/admin/token") }}
{{- end }}
{{- with include "postern.cluster.config" . }}
{{- $_ := set $config "cluster" (fromJson .) }}
{{- end }}
{{- $owned := dict
  "listeners" "listeners.* and containerPorts.*"
  "metrics" "containerPorts.metrics (the probes use it)"
  "tls" "tls.*"
  "admin" "admin.*"
  "reload" "reload.mode"
  "log" "log.*"
  "cluster" "cluster.*"
}}
{{- range $key, $instead := $owned }}
{{- if hasKey $v.config $key }}
{{- fail (printf "config.%s is set by the chart: use %s" $key $instead) }}
{{- end }}
{{- end }}
{{- if and (hasKey $v.config "limits") (hasKey (default dict $v.config.limits) "shutdown_drain") }}
{{- fail "config.limits.shutdown_drain is set by the chart: use shutdown.drainSeconds (the grace period follows it)" }}
{{- end }}
{{- if and (hasKey $v.config "auth") (hasKey (default dict $v.config.auth) "static") }}
{{- fail "config.auth.static is set by the chart: use users.*" }}
{{- end }}
{{- if and $v.users.entries (eq $v.users.format "passwd-file") }}
{{- fail "users.entries makes a YAML users file: use users.format yaml with it, or users.existingSecret for a passwd-file" }}
{{- end }}
{{- $config = mustMergeOverwrite $config (deepCopy $v.config) }}
{{- /* The ports each running protocol needs on every backend. */}}
{{- $relays := dig "submission" "relays" list $config }}
{{- $needs := list }}
{{- if include "postern.pop3" . }}
{{- $needs = append $needs (list "pop3_port" "a POP3 listener (listeners.pop3s or listeners.pop3) runs, so every backend needs its POP3 port") }}
{{- end }}
{{- if and (include "postern.submission" .) (not $relays) }}
{{- $needs = append $needs (list "submission_port" "a submission listener (listeners.submission or listeners.submissions) runs and submission.relays is empty, so every backend needs its submission port") }}
{{- end }}
{{- if include "postern.sieve" . }}
{{- $needs = append $needs (list "sieve_port" "the ManageSieve listener (listeners.sieve) runs, so every backend needs its ManageSieve port") }}
{{- end }}
{{- if $needs }}
{{- $pools := list (list "backends.pool" (default list $config.backends.pool)) }}
{{- range $p, $pool := (default list $config.backends.pools) }}
{{- $pools = append $pools (list (printf "backends.pools[%d].servers" $p) (default list $pool.servers)) }}
{{- end }}
{{- range $pools }}
{{- $key := index . 0 }}
{{- range $j, $server := index . 1 }}
{{- range $needs }}
{{- if not (index $server (index . 0)) }}
{{- fail (printf "%s[%d].%s: %s" $key $j (index . 0) (index . 1)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $i, $relay := $relays }}
{{- if not (regexMatch ":[0-9]+$" (toString (default "" $relay.address))) }}
{{- fail (printf "submission.relays[%d].address: the relay's host:port (its submission port), not %q" $i (toString (default "" $relay.address))) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The cluster store: the optional Valkey the chart runs, and where Postern finds the store. */}}

{{- define "postern.valkey.fullname" -}}
{{- printf "%s-valkey" (include "postern.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of the Valkey pods: another app name, so that no selector of Postern's (Service, PDB, spreading) takes them. */}}
{{- define "postern.valkey.selectorLabels" -}}
app.kubernetes.io/name: valkey
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cluster-store
{{- end }}

{{- define "postern.valkey.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "postern.valkey.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.cluster.valkey.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: postern
{{- end }}

{{/* The Secret holding the Valkey password: the existing one, or the one the chart makes. */}}
{{- define "postern.valkey.secret" -}}
{{- default (include "postern.valkey.fullname" .) .Values.cluster.valkey.existingSecret }}
{{- end }}

{{- define "postern.valkey.secretKey" -}}
{{- ternary .Values.cluster.valkey.existingSecretKey "password" (not (empty .Values.cluster.valkey.existingSecret)) }}
{{- end }}

{{/* The store's URL: cluster.store.url, else the chart's Valkey Service. */}}
{{- define "postern.cluster.url" -}}
{{- $c := .Values.cluster }}
{{- if $c.store.url }}
{{- $c.store.url }}
{{- else if $c.valkey.enabled }}
{{- printf "redis://%s.%s.svc:%d/0" (include "postern.valkey.fullname" .) .Release.Namespace (int $c.store.port) }}
{{- end }}
{{- end }}

{{/* The Secret and key of the store password Postern mounts, as JSON ({} for none). */}}
{{- define "postern.cluster.passwordSecret" -}}
{{- $c := .Values.cluster }}
{{- if $c.store.passwordSecret.name }}
{{- dict "name" $c.store.passwordSecret.name "key" $c.store.passwordSecret.key | toJson }}
{{- else if $c.valkey.enabled }}
{{- dict "name" (include "postern.valkey.secret" .) "key" (include "postern.valkey.secretKey" .) | toJson }}
{{- else }}
{{- dict | toJson }}
{{- end }}
{{- end }}

{{/* The `cluster` block of the Postern configuration; checks the cluster values first. */}}
{{- define "postern.cluster.config" -}}
{{- $c := .Values.cluster }}
{{- if $c.valkey.enabled }}
{{- if not $c.enabled }}
{{- fail "cluster.valkey.enabled needs cluster.enabled: the Valkey the chart runs is Postern's cluster store" }}
{{- end }}
{{- end }}
{{- if $c.enabled }}
{{- $url := include "postern.cluster.url" . }}
{{- if not $url }}
{{- fail "cluster.store.url: the store's redis:// or rediss:// URL (or cluster.valkey.enabled for a Valkey the chart runs)" }}
{{- end }}
{{- if not (regexMatch "^rediss?://" $url) }}
{{- fail (printf "cluster.store.url (%s) must start with redis:// or rediss:// (TLS)" $url) }}
{{- end }}
{{- $host := (urlParse $url).host }}
{{- $port := regexFind ":[0-9]+$" $host | trimPrefix ":" }}
{{- if and $port (ne (int $port) (int $c.store.port)) }}
{{- fail (printf "cluster.store.port (%d) is not the port of cluster.store.url (%s): the NetworkPolicy opens cluster.store.port" (int $c.store.port) $port) }}
{{- end }}
{{- if and $c.store.caSecret.name $c.store.caConfigMap.name }}
{{- fail "cluster.store.caSecret and cluster.store.caConfigMap: set one, not both" }}
{{- end }}
{{- if and (or $c.store.caSecret.name $c.store.caConfigMap.name) (not (hasPrefix "rediss://" $url)) }}
{{- fail "cluster.store.caSecret / cluster.store.caConfigMap are for a TLS store: use a rediss:// cluster.store.url" }}
{{- end }}
{{- $store := dict "url" $url "timeout" $c.store.timeout "key_prefix" $c.store.keyPrefix }}
{{- with $c.store.username }}
{{- $_ := set $store "username" . }}
{{- end }}
{{- if (include "postern.cluster.passwordSecret" . | fromJson).name }}
{{- $_ := set $store "password_file" "/etc/postern/store/password" }}
{{- end }}
{{- if or $c.store.caSecret.name $c.store.caConfigMap.name }}
{{- $_ := set $store "ca_file" "/etc/postern/store-ca/ca.pem" }}
{{- end }}
{{- $cluster := dict "store" $store "lease_ttl" $c.leaseTtl "user_expire" $c.userExpire "hold_wait" $c.holdWait }}
{{- if $c.keySecret.name }}
{{- $_ := set $cluster "key_file" "/etc/postern/cluster-key/key" }}
{{- end }}
{{- toJson $cluster }}
{{- end }}
{{- end }}
