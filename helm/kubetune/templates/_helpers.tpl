{{- define "kubetune.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}


{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Lease the replicas elect a leader with (`--leader-elect-lease`): one per release. */}}
{{- define "kubetune.leaseName" -}}
{{- include "kubetune.fullname" . -}}
{{- end -}}

{{/* Leader election (kubetune_operator/leader.py: GET, POST, PUT of one Lease), in the release
namespace only. Creating cannot be limited to a name; reading and renewing are. */}}
{{- define "kubetune.leaseRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [create]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  resourceNames: [{{ include "kubetune.leaseName" . }}]
  verbs: [get, update]
{{- end -}}

{{/* "true" when the Deployment installed now runs an operator without --leader-elect (chart 0.1.0,
or leaderElection.enabled=false): it would reconcile beside the new leader during a rolling update.
Empty under `helm template` (no cluster to look at). */}}
{{- define "kubetune.replacesNonElecting" -}}
{{- $current := lookup "apps/v1" "Deployment" .Release.Namespace (include "kubetune.fullname" .) -}}
{{- if $current -}}
{{- $electing := false -}}
{{- range $current.spec.template.spec.containers -}}
{{- if has "--leader-elect" (.args | default list) -}}{{- $electing = true -}}{{- end -}}
{{- end -}}
{{- if not $electing -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Mistakes the schema cannot express, stopped before anything is installed. */}}
{{- define "kubetune.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: without leader election every replica reconciles the same objects. Set leaderElection.enabled=true, or replicaCount=1" (int .Values.replicaCount)) -}}
{{- end -}}
{{- if eq (int .Values.metrics.port) (int .Values.livenessPort) -}}
{{- fail (printf "metrics.port and livenessPort are both %d: the operator serves metrics and /healthz on different ports" (int .Values.livenessPort)) -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.adminKeySecret" -}}
{{- printf "%s-admin-key" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* What the operator does in every namespace it watches (kubetune_operator/k8s.py, writes.py and
the kinds' reconcile.py): children are read, then server-side applied (PATCH creates them too). */}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: [kubetune.io]
  resources: [finetunejobs, adapterdeployments]
  verbs: [get, list, watch, patch, update]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, adapterdeployments/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, update, delete]
# An AdapterDeployment's autoscaler (spec.autoscaling) and its replicas' disruption budget.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, update, delete]
# The serving runtimes' admin key, written by server-side apply; never read back (no get/list/watch).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch, update, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Events: posted for transitions, and read back for a stuck workload's real reason (the Job
# controller's FailedCreate, the scheduler's FailedScheduling, the kubelet's pull and start failures).
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [get, list, watch, create, patch]
{{- end -}}

{{/* kopf, with or without --namespace: discover the CRDs and list/watch the namespaces. */}}
{{- define "kubetune.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end -}}
