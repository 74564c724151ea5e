{{/* The labels of one component's objects. */}}
{{- define "turnpike.labels" -}}
app.kubernetes.io/name: turnpike
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* The selector of one component's pods. */}}
{{- define "turnpike.selector" -}}
app.kubernetes.io/name: turnpike
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "turnpike.secretName" -}}
{{- default (printf "%s-secrets" .Release.Name) .Values.existingSecret -}}
{{- end }}

{{- define "turnpike.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end }}

{{/*
The environment every Turnpike process gets besides the ConfigMap: the
secrets, and each database node's role and URLs. The password stays in the
Secret; Kubernetes expands $(TURNPIKE_DATABASE_PASSWORD) into the URLs.
Each replica is reached at its own address (direct) and through its own
PgBouncer (pooled): the router must know which node it reads.
*/}}
{{- define "turnpike.env" -}}
- name: TURNPIKE_DATABASE_PASSWORD
  valueFrom: { secretKeyRef: { name: {{ include "turnpike.secretName" . }}, key: TURNPIKE_DATABASE_PASSWORD } }
- name: TURNPIKE__REDIS__URL
  valueFrom: { secretKeyRef: { name: {{ include "turnpike.secretName" . }}, key: TURNPIKE__REDIS__URL } }
- name: TURNPIKE__MODEL__API_KEY
  valueFrom: { secretKeyRef: { name: {{ include "turnpike.secretName" . }}, key: TURNPIKE__MODEL__API_KEY, optional: true } }
{{- $root := . }}
{{- range (include "turnpike.nodes" . | fromYamlArray) }}
{{- $key := upper .name }}
- name: TURNPIKE__DATABASE__NODES__{{ $key }}__ROLE
  value: {{ .role | quote }}
- name: TURNPIKE__DATABASE__NODES__{{ $key }}__URL
  value: {{ printf "postgres://%s:$(TURNPIKE_DATABASE_PASSWORD)@%s:%d/%s" $root.Values.database.user .host (int $root.Values.database.port) $root.Values.database.name | quote }}
{{- if $root.Values.pgbouncer.enabled }}
- name: TURNPIKE__DATABASE__NODES__{{ $key }}__POOLED_URL
  value: {{ printf "postgres://%s:$(TURNPIKE_DATABASE_PASSWORD)@%s-pgbouncer-%s:%d/%s" $root.Values.database.user $root.Release.Name .name (int $root.Values.pgbouncer.port) $root.Values.database.name | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The database nodes: `database.nodes`, or with `cnpg.enabled` the
CloudNativePG cluster's: its read-write Service as the primary (it follows
failovers), and a Service per instance as the replicas (the router needs
each replica's own address; an instance that is the primary for now fails
the replica probe — it is not in recovery — and takes no replica reads).
*/}}
{{- define "turnpike.nodes" -}}
{{- if .Values.cnpg.enabled -}}
- { name: primary, role: primary, host: {{ printf "%s-db-rw" .Release.Name }} }
{{- range $i := until (int .Values.cnpg.instances) }}
- { name: {{ printf "instance%d" (add1 $i) }}, role: replica, host: {{ printf "%s-db-instance-%d" $.Release.Name (add1 $i) }} }
{{- end }}
{{- else -}}
{{ toYaml .Values.database.nodes }}
{{- end -}}
{{- end }}
