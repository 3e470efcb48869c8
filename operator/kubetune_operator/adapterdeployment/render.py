"""AdapterDeployment → a Deployment `<name>` of serving replicas, a Service `<name>` in front, the
ConfigMap `<name>-adapters` that holds the adapters every replica must have, the Secret
`<name>-admin-key` that opens the replicas' load and unload endpoints, and the NetworkPolicy
`<name>-serving` that admits traffic to the replicas' port only from this namespace and the operator.

Adapters are deliberately NOT part of the pod template, so that changing spec.adapters never
restarts a replica. Instead:
- the ConfigMap (the adapters file, `api.adaptersfile`) is mounted into every pod. The builtin
  runtime loads it before it reports ready (`/health`) and follows its changes; vLLM's start-up
  command turns it into `--lora-modules`. So a replica that starts or restarts comes up with the
  full set, even while the operator is away, and only then receives traffic.
- the operator also loads and unloads through the runtime's `/v1/load_lora_adapter` on each ready
  replica (both runtimes speak it; vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): faster than the
  kubelet's refresh of a mounted ConfigMap, and the only way to change a running vLLM.

The one thing adapters can change in the template is the set of mounted claims: a pvc:// adapter on
a claim that no replica mounts yet needs a volume, which Kubernetes can only add with new pods.
Adapters on claims already mounted load without a restart. (The claim a `fromJob` adapter's job
publishes to is mounted as soon as the job exists, so its adapter loads without one too.)

The builtin runtime loads over HTTP only from the sources the AdapterDeployment declares: an
adapter's `uri`, or for a `fromJob` adapter the place that job publishes to
(`contract.adapter_uri(job.spec.output.uri)`, from the job's spec, before it has run). The list
(`allowed_sources`) is the ConfigMap's key ALLOWED_SOURCES_KEY, given to the runtime as
KUBETUNE_SERVE_ALLOWED_SOURCES by reference, so the template does not change with it. A replica
reads it when it starts: one started before a new source was declared answers the operator's load
404 for it, and gets that adapter from the adapters file instead (the runtime follows the file, and
what the file lists is the deployment's own configuration, not subject to the list); the operator
counts such a 404 as a refusal only once it has lasted longer than the kubelet takes to refresh
the file (see runtime.py).

Access: every replica gets the AdapterDeployment's admin key (`keys.py`) from the Secret, mounted as
a file (`--admin-key-file`); the runtime takes loads and unloads only with it, and re-reads the
file when the kubelet refreshes it. With `spec.apiKeySecretRef` the user's key (a key of their own
Secret, which the operator never reads) is mounted the same way (`--api-key-file`) and then guards
inference and /v1/models too. vLLM has one key for every /v1 endpoint (VLLM_API_KEY) and no
allow-list: without a user key it gets the admin key, so its clients need that key as well (from
the Secret `<name>-admin-key`); with a user key it gets the user's, and then the operator's key
opens nothing there: adapters come only from the adapters file when a replica starts, and the
status says the replicas refuse the operator. vLLM leaves endpoints outside /v1 (e.g.
/invocations, /tokenize) unauthenticated: the NetworkPolicy is what limits who reaches them.

A merged adapter (`merge`, builtin runtime only) is written to the adapters file as its merge block,
with its sources' resolved URIs (`api.merging`); its sources' places are allowed and their claims
mounted as those of adapters of their own.

Every URI is checked again here (`uris.uri_problem`) before it reaches the adapters file, a mount or
the allow-list, though the spec's were checked at admission: a URI that fails is left out.

Scaling: spec.replicas is the AdapterDeployment's `scale` subresource (`kubectl scale`). With
`spec.autoscaling` a HorizontalPodAutoscaler `<name>` targets the AdapterDeployment itself, not the
Deployment: it writes spec.replicas through /scale and the Deployment is rendered from that as
always, so the operator and the autoscaler never write the same field (the operator never writes
spec.replicas). Its metric is the runtime's in-flight-requests gauge, averaged over the pods (a
Pods metric: the cluster needs a custom-metrics adapter, e.g. prometheus-adapter, serving it). With
more than one replica wanted (or autoscaling.minReplicas above one) a PodDisruptionBudget `<name>`
lets a node drain evict only one replica at a time; the reconciler deletes either when it no longer
applies.

Pure: the same input gives equal dicts.
"""

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kubetune.api import adaptersfile
from kubetune.api.adapterdeployment import IN_FLIGHT_METRIC, AdapterDeployment, AdapterDeploymentSpec
from kubetune.api.common import API_VERSION
from kubetune.api.kinds import ADAPTERDEPLOYMENT
from kubetune.api.merging import is_merge_path, parse_merge_path
from kubetune.api.names import name_problems
from kubetune.api.uris import uri_problem
from kubetune.contract import PVC_ROOT, PVC_ROOT_ENV, SCRATCH, TMP_DIR

from .. import keys
from ..config import OperatorConfig
from ..render_common import (
    DEFAULT_CONTAINER_ANNOTATION,
    LABEL_COMPONENT,
    LABEL_NAME,
    RenderError,
    container_resources,
    container_security_context,
    dns_label,
    gpu_resource_problem,
    identity,
    image_problem,
    object_meta,
    owner_reference,
    pod_security_context,
    short_hash,
    standard_labels,
)

KIND = "AdapterDeployment"
COMPONENT = "serving"
CONTAINER = "server"
DEPLOYMENT_LABEL = "kubetune.io/adapterdeployment"
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"
PORT_NAME = "http"
GRACE_SECONDS = 35  # the builtin server drains for 30 s
ADAPTERS_VOLUME = "adapters"
ALLOWED_SOURCES_KEY = "allowed-sources"  # in the adapters ConfigMap: the runtime's allow-list, one per line
ALLOWED_SOURCES_ENV = "KUBETUNE_SERVE_ALLOWED_SOURCES"
ADAPTER_SCHEMES = ("pvc", "s3", "hf")  # where an adapter may come from
ADMIN_KEY_VOLUME, ADMIN_KEY_DIR, ADMIN_KEY_ITEM = "admin-key", "/etc/kubetune/admin-key", "admin-key"
API_KEY_VOLUME, API_KEY_DIR, API_KEY_ITEM = "api-key", "/etc/kubetune/api-key", "api-key"
# The operator's pods, as the chart labels them (helm/kubetune/templates/_helpers.tpl: selector).
OPERATOR_POD_LABELS = {LABEL_NAME: "kubetune", LABEL_COMPONENT: "operator"}
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# vLLM reads no adapters file: this start-up wrapper (run by the image's python3) turns the mounted
# file into `--lora-modules NAME=PATH ...` and then becomes `vllm serve` (exec: signals reach vLLM).
VLLM_LAUNCHER = """import json, os, sys
try:
    adapters = json.load(open(sys.argv[1])).get("adapters") or []
except (OSError, ValueError):
    adapters = []
modules = [f"{a['name']}={a['path']}" for a in adapters]
argv = sys.argv[2:] + (["--lora-modules", *modules] if modules else [])
os.execvp(argv[0], argv)
"""


def deployment_name(name: str) -> str:
    return name


def service_name(name: str) -> str:
    return name


def admin_key_secret_name(name: str) -> str:
    return f"{name}-admin-key"


def network_policy_name(name: str) -> str:
    return f"{name}-serving"


def autoscaler_name(name: str) -> str:
    return name


def disruption_budget_name(name: str) -> str:
    return name


def endpoint(name: str, namespace: str, port: int) -> str:
    return f"http://{service_name(name)}.{namespace}.svc:{port}/v1"


def pod_labels(name: str) -> dict[str, str]:
    return {**standard_labels(name, COMPONENT), DEPLOYMENT_LABEL: name}


def selector(name: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: name, LABEL_COMPONENT: COMPONENT}


def label_selector(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(name).items()))


# --- URIs ----------------------------------------------------------------------------------------


def adapter_uri_problem(uri: str) -> str | None:
    """What is wrong with an adapter URI (one line), or None: the one rule for the spec's and those
    read from a FineTuneJob's status."""
    return uri_problem(uri, ADAPTER_SCHEMES)


def servable_problem(uri: str) -> str | None:
    """`adapter_uri_problem`, also for a merged adapter's `merge:` path: a plan whose every source passes it."""
    if not is_merge_path(uri):
        return adapter_uri_problem(uri)
    try:
        plan = parse_merge_path(uri)
    except ValueError as error:
        return str(error)
    return next((f"merge source {u[:80]!r}: {p}" for u in plan.uris if (p := adapter_uri_problem(u))), None)


def acceptable(uris: Iterable[str | None]) -> list[str]:
    """The URIs that pass `adapter_uri_problem`, in order; the others are dropped (the reconciler
    reports them, see adapters.resolve)."""
    return [u for u in uris if u and adapter_uri_problem(u) is None]


def under(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or below it, at a '/' boundary (pvc://a/out/adapter2 is not under
    pvc://a/out/adapter)."""
    base = prefix.rstrip("/")
    return uri == base or uri.rstrip("/") == base or uri.startswith(base + "/")


def allowed_sources(spec: AdapterDeploymentSpec, job_sources: Mapping[str, str]) -> list[str]:
    """The prefixes the builtin runtime may load from, sorted: the claims and buckets the adapters
    given by `uri` declare (`pvc://CLAIM/`, `s3://BUCKET/`: a new adapter in a declared place loads
    at once, without waiting for the kubelet to refresh this list in the replicas; hf:// ids exactly),
    and for a `fromJob` adapter exactly the place its FineTuneJob publishes to (`job_sources`,
    adapter name (or `NAME.merge.sources[I]`, `adapters.merge_sources`) → contract.adapter_uri of its
    job's spec.output.uri); none that fails the URI rules, and none with a comma (the runtime splits
    the list on commas). Merge sources count as adapters of their own."""
    declared = [source_prefix(uri) for uri in declared_uris(spec)]
    return sorted({u for u in acceptable([*declared, *job_sources.values()]) if "," not in u})


def declared_uris(spec: AdapterDeploymentSpec) -> list[str]:
    """The URIs the spec names: adapters' `uri`, and their merge sources' (a merge reads them as
    adapters of their own)."""
    sources = [s.uri for a in spec.adapters if a.merge is not None for s in a.merge.sources]
    return [u for u in [*(a.uri for a in spec.adapters), *sources] if u]


def source_prefix(uri: str) -> str:
    """The place a declared adapter URI names: its claim or bucket, or the URI itself (hf://, file://)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("pvc", "s3") and parsed.netloc:
        return f"{parsed.scheme}://{parsed.netloc}/"
    return uri


def claim_of(uri: str | None) -> str | None:
    parsed = urlparse(uri or "")
    return parsed.netloc if parsed.scheme == "pvc" and parsed.netloc else None


def local_path(uri: str) -> str:
    """What vLLM, which knows no URI schemes, is given: pvc://CLAIM/PATH → the mount path,
    hf://ORG/NAME → ORG/NAME (a Hub id it downloads); s3:// cannot be read by vLLM."""
    parsed = urlparse(uri)
    if parsed.scheme == "pvc":
        return f"{PVC_ROOT}/{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "hf":
        return f"{parsed.netloc}{parsed.path}".strip("/")
    raise RenderError(f"runtime vllm cannot read {uri!r}: use pvc:// or hf://")


def adapter_path(runtime: str, uri: str) -> str:
    """The `lora_path` sent to /v1/load_lora_adapter: the URI itself for the builtin runtime (it
    resolves pvc://, s3:// and hf:// itself, and builds a merge from its `merge:` path), a local
    path or Hub id for vLLM, which has no merging."""
    if runtime == "builtin":
        return uri
    if is_merge_path(uri):
        raise RenderError(f"runtime {runtime} cannot serve merged adapters: it has no adapter merging")
    return local_path(uri)


def readable_path(runtime: str, uri: str) -> str | None:
    """`adapter_path`, or None where the runtime cannot read the URI (vLLM and s3://): such an
    adapter is left out of the adapters file, and the operator's load is refused with the reason."""
    try:
        return adapter_path(runtime, uri)
    except RenderError:
        return None


def claims(spec: AdapterDeploymentSpec, adapter_uris: Iterable[str] = ()) -> list[str]:
    """The claims to mount (read-only): the base model's and those of adapters given by URI or
    resolved from a FineTuneJob (`adapter_uris`, e.g. the jobs' `allowed_sources`). A URI that
    fails the rules mounts nothing."""
    uris = [spec.base_model.uri, *acceptable([*declared_uris(spec), *adapter_uris])]
    return sorted({c for c in (claim_of(u) for u in uris) if c})


# --- the pod -------------------------------------------------------------------------------------


def api_key_ref(ad: AdapterDeployment) -> tuple[str, str] | None:
    """(Secret name, key) of the user's API key, `spec.apiKeySecretRef`, when set (read by
    attribute: older API models have no such field)."""
    ref = getattr(ad.spec, "api_key_secret_ref", None)
    name, key = getattr(ref, "name", None), getattr(ref, "key", None)
    return (str(name), str(key or API_KEY_ITEM)) if name else None


def server_command(ad: AdapterDeployment) -> list[str]:
    spec = ad.spec
    port = str(spec.service.port)
    if spec.runtime == "vllm":
        command = ["python3", "-c", VLLM_LAUNCHER, adaptersfile.PATH_IN_POD,
                   "vllm", "serve", local_path(spec.base_model.uri), "--enable-lora",
                   "--max-loras", str(spec.max_adapters), "--max-lora-rank", str(spec.max_lora_rank),
                   "--port", port, "--host", "0.0.0.0"]  # fmt: skip
        if spec.base_model.revision:
            command += ["--revision", spec.base_model.revision]
        return command
    return ["kubetune", "serve", "--model", spec.base_model.uri, "--host", "0.0.0.0", "--port", port,
            "--max-adapters", str(spec.max_adapters), "--max-lora-rank", str(spec.max_lora_rank),
            "--adapters-file", adaptersfile.PATH_IN_POD,
            "--admin-key-file", f"{ADMIN_KEY_DIR}/{ADMIN_KEY_ITEM}",
            *(["--api-key-file", f"{API_KEY_DIR}/{API_KEY_ITEM}"] if api_key_ref(ad) else [])]  # fmt: skip


def server_env(ad: AdapterDeployment) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH}/.cache"},
        {"name": PVC_ROOT_ENV, "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if ad.spec.runtime == "builtin":
        # By reference: the list changes with the adapters, the template must not.
        ref = {
            "name": adaptersfile.configmap_name(identity(ad.metadata)[0]),
            "key": ALLOWED_SOURCES_KEY,
            "optional": True,
        }
        env.append({"name": ALLOWED_SOURCES_ENV, "valueFrom": {"configMapKeyRef": ref}})
    if ad.spec.runtime == "vllm":
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
        user = api_key_ref(ad)
        secret, key = user or (admin_key_secret_name(identity(ad.metadata)[0]), ADMIN_KEY_ITEM)
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def volumes(ad: AdapterDeployment, adapter_uris: Iterable[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    vols: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        # optional: a pod that starts before the operator wrote it serves no adapters yet
        {
            "name": ADAPTERS_VOLUME,
            "configMap": {"name": adaptersfile.configmap_name(identity(ad.metadata)[0]), "optional": True},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        # the whole folder, not a subPath: only then does the kubelet update it
        {"name": ADAPTERS_VOLUME, "mountPath": adaptersfile.MOUNT_DIR, "readOnly": True},
    ]
    if ad.spec.runtime == "builtin":  # vLLM reads its key from the environment
        vols.append({"name": ADMIN_KEY_VOLUME, "secret": {"secretName": admin_key_secret_name(identity(ad.metadata)[0]),
                     "items": [{"key": ADMIN_KEY_ITEM, "path": ADMIN_KEY_ITEM}], "defaultMode": 0o440}})  # fmt: skip
        mounts.append({"name": ADMIN_KEY_VOLUME, "mountPath": ADMIN_KEY_DIR, "readOnly": True})
        user = api_key_ref(ad)
        if user:
            vols.append({"name": API_KEY_VOLUME, "secret": {"secretName": user[0],
                         "items": [{"key": user[1], "path": API_KEY_ITEM}], "defaultMode": 0o440}})  # fmt: skip
            mounts.append({"name": API_KEY_VOLUME, "mountPath": API_KEY_DIR, "readOnly": True})
    for claim in claims(ad.spec, adapter_uris):
        volume = dns_label("pvc", claim)
        vols.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": volume, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return vols, mounts


def pod_template(ad: AdapterDeployment, config: OperatorConfig, adapter_uris: Iterable[str] = ()) -> dict[str, Any]:
    spec, (name, _) = ad.spec, identity(ad.metadata)
    vols, mounts = volumes(ad, adapter_uris)
    # Builtin: /live answers as soon as the process does, /health once the model and the adapters
    # file are loaded. vLLM's /health answers once the engine (and its --lora-modules) is up.
    live_path = "/health" if spec.runtime == "vllm" else "/live"
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or config.serving_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": server_command(ad),
        "env": server_env(ad),
        "ports": [{"name": PORT_NAME, "containerPort": spec.service.port, "protocol": "TCP"}],
        "resources": container_resources(ad.spec.resources, ad.spec.resources.gpus_per_replica, config),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "startupProbe": probe(live_path, 5, 120),
        "readinessProbe": probe("/health", 5, 3),
        "livenessProbe": probe(live_path, 10, 6),
    }
    if spec.base_model.secret_ref:
        container["envFrom"] = [{"secretRef": {"name": spec.base_model.secret_ref.name}}]
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": vols,
    }
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(sorted(spec.resources.node_selector.items()))
    if spec.resources.tolerations:
        pod["tolerations"] = [t.to_wire() for t in spec.resources.tolerations]
    if config.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    return {
        "metadata": {"labels": pod_labels(name), "annotations": {DEFAULT_CONTAINER_ANNOTATION: CONTAINER}},
        "spec": pod,
    }


# --- the objects ---------------------------------------------------------------------------------


def render_deployment(
    ad: AdapterDeployment, config: OperatorConfig, adapter_uris: Iterable[str] = ()
) -> dict[str, Any]:
    """The Deployment; SPEC_HASH_ANNOTATION (of replicas + template) tells the handler whether the
    Deployment it finds was made from the same input, without comparing API-server defaults."""
    name, namespace = identity(ad.metadata)
    template = pod_template(ad, config, adapter_uris)
    spec = {
        "replicas": ad.spec.replicas,
        "selector": {"matchLabels": selector(name)},
        # One replica at a time, never below the wanted count: a new replica serves only after the
        # operator has loaded its adapters... and the old ones keep serving meanwhile.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": template,
    }
    digest = short_hash(repr(sorted_items(spec)), 16)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(
            deployment_name(name),
            namespace,
            pod_labels(name),
            owner_reference(ad.metadata, KIND),
            {SPEC_HASH_ANNOTATION: digest},
        ),
        "spec": spec,
    }


def sorted_items(value: Any) -> Any:
    if isinstance(value, dict):
        return [(k, sorted_items(value[k])) for k in sorted(value)]
    if isinstance(value, list):
        return [sorted_items(v) for v in value]
    return value


def render_service(ad: AdapterDeployment) -> dict[str, Any]:
    (name, namespace), service = identity(ad.metadata), ad.spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(service_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)),
        "spec": {
            "type": service.type,
            "selector": selector(name),
            "ports": [{"name": PORT_NAME, "port": service.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def resolved_adapters(
    spec: AdapterDeploymentSpec, from_jobs: Mapping[str, str], job_sources: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """(name, URI), spec order, of the adapters whose URI is known and acceptable: given, or
    (`from_jobs`, name → URI) the adapter of a Succeeded FineTuneJob, under its job's source when
    `job_sources` names one. Adapters still waiting for their job, and URIs that fail the rules, are
    left out. A merged adapter's URI (`from_jobs` too) is its `merge:` path, once every source is
    resolved: kept when each source passes the URI rules and lies under its job's source (keyed
    `NAME.merge.sources[I]`)."""
    pairs = [(a.name, a.uri or from_jobs.get(a.name)) for a in spec.adapters]
    sources = job_sources or {}
    return [(name, uri) for name, uri in pairs if uri and servable_problem(uri) is None and within(name, uri, sources)]


def within(name: str, uri: str, job_sources: Mapping[str, str]) -> bool:
    """Whether a resolved URI (a merge's: each source) lies under where its FineTuneJob publishes,
    where `job_sources` names that place."""
    if not is_merge_path(uri):
        return name not in job_sources or under(uri, job_sources[name])
    keyed = enumerate(parse_merge_path(uri).uris)
    return all(under(u, job_sources[k]) for i, u in keyed if (k := f"{name}.merge.sources[{i}]") in job_sources)


def adapters_file_entries(ad: AdapterDeployment, adapters: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, path the runtime loads) for each adapter; one vLLM cannot read (s3://) is left out
    here and refused with a message by the operator's load."""
    paths = [(name, readable_path(ad.spec.runtime, uri)) for name, uri in adapters]
    return [(name, path) for name, path in paths if path is not None]


def render_adapters_configmap(
    ad: AdapterDeployment, adapters: Iterable[tuple[str, str]], sources: Sequence[str] = ()
) -> dict[str, Any]:
    """The adapters file: `adapters` is (name, URI) of every adapter whose URI is known, spec order;
    and (builtin runtime) the allow-list `sources`, one per line."""
    name, namespace = identity(ad.metadata)
    text = adaptersfile.render_adapters_file(adapters_file_entries(ad, adapters))
    data = {adaptersfile.CONFIGMAP_KEY: text}
    if ad.spec.runtime == "builtin":
        data[ALLOWED_SOURCES_KEY] = "".join(f"{source}\n" for source in sources)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(
            adaptersfile.configmap_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)
        ),
        "data": data,
    }


def render_admin_key_secret(ad: AdapterDeployment, config: OperatorConfig) -> dict[str, Any]:
    """The Secret holding the replicas' admin key (`keys.admin_key`). The operator only ever writes
    it (server-side apply), never reads it: it derives the key again whenever it calls a replica."""
    (name, namespace), uid = identity(ad.metadata), str(ad.metadata.uid or "")
    key = keys.admin_key(config, namespace, name, uid)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(
            admin_key_secret_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)
        ),
        "type": "Opaque",
        "data": {ADMIN_KEY_ITEM: base64.b64encode(key.encode()).decode()},
    }


def configured_namespace(config: OperatorConfig) -> str:
    """The operator's namespace where its configuration says (`operator_namespace`), else ""."""
    return str(getattr(config, "operator_namespace", "") or "")


def render_network_policy(
    ad: AdapterDeployment, operator_ns: str, scrapers: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Ingress to the replicas, on the serving port only, from:
    - any pod of the same namespace: the Service's clients. NetworkPolicy selects pods, not the
      path a packet took, so "only through the Service" cannot be said: a pod of this namespace
      may also call a replica's IP directly (it is let through either way);
    - the operator's pods (`operator_ns` by its `kubernetes.io/metadata.name` label, and the
      operator's pod labels), which load and unload adapters; left out when `operator_ns` is "";
    - the configured metrics scrapers (`metricsScrapers`: the cluster's Prometheus, for /metrics; the
      serving port also carries /v1, which the API key guards when set);
    - anywhere, when the Service is a NodePort or LoadBalancer: the user asked for it to be
      reachable from outside the cluster (the API key is then what guards it).
    Other ports (none today) and other namespaces are refused. Kubelet probes come from the node,
    which most network plugins always let through. Egress is not restricted: replicas download
    base models and adapters from hf:// and s3:// endpoints that no IP list can name, and a
    NetworkPolicy cannot select by host name."""
    (name, namespace), spec = identity(ad.metadata), ad.spec
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if operator_ns:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator_ns}},
                "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
            }
        )
    peers += [dict(peer) for peer in scrapers]
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": spec.service.port}]}
    if spec.service.type == "ClusterIP":
        rule["from"] = peers
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(
            network_policy_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)
        ),
        "spec": {"podSelector": {"matchLabels": selector(name)}, "policyTypes": ["Ingress"], "ingress": [rule]},
    }


def render_autoscaler(ad: AdapterDeployment) -> dict[str, Any] | None:
    """The autoscaling/v2 HorizontalPodAutoscaler of `spec.autoscaling`, None without it. Its target
    is the AdapterDeployment (through the scale subresource), so what it decides lands in
    spec.replicas, where the Deployment and the PodDisruptionBudget are rendered from."""
    scaling = ad.spec.autoscaling
    if scaling is None:
        return None
    name, namespace = identity(ad.metadata)
    target = {"type": "AverageValue", "averageValue": str(scaling.target_in_flight_requests)}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(autoscaler_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": IN_FLIGHT_METRIC}, "target": target}}],
        },
    }


def wants_disruption_budget(spec: AdapterDeploymentSpec) -> bool:
    """More than one replica wanted, now or as the autoscaler's floor: then a drain must leave one
    serving. With one replica a budget could only block the drain (or allow everything)."""
    floor = spec.autoscaling.min_replicas if spec.autoscaling is not None else 0
    return max(spec.replicas, floor) > 1


def render_disruption_budget(ad: AdapterDeployment) -> dict[str, Any] | None:
    """The policy/v1 PodDisruptionBudget: evictions (node drains) take one serving replica at a time;
    None when `wants_disruption_budget` says no. Replicas that are not ready (crash-looping,
    still loading) may always be evicted (`AlwaysAllow`): they serve nothing, and must not block a drain."""
    if not wants_disruption_budget(ad.spec):
        return None
    name, namespace = identity(ad.metadata)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(
            disruption_budget_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)
        ),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


@dataclass(frozen=True)
class AdapterDeploymentObjects:
    adapters: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]
    admin_key: dict[str, Any]
    network_policy: dict[str, Any] | None  # None when the operator is configured to render none
    autoscaler: dict[str, Any] | None = None  # None without spec.autoscaling: any existing one is deleted
    disruption_budget: dict[str, Any] | None = None  # None with one replica: any existing one is deleted

    def all(self) -> list[dict[str, Any]]:
        optional = [o for o in (self.autoscaler, self.disruption_budget) if o is not None]
        policy = [self.network_policy] if self.network_policy is not None else []
        return [self.admin_key, *policy, self.adapters, self.service, self.deployment, *optional]


def check_renderable(ad: AdapterDeployment) -> None:
    meta, problems = ad.metadata, []
    problems.extend(name_problems(ADAPTERDEPLOYMENT.kind, meta.name))
    if not meta.namespace:
        problems.append("metadata.namespace is required")
    if not meta.uid:
        problems.append("metadata.uid is required (children are owned by it)")
    base_problem = uri_problem(ad.spec.base_model.uri)
    if base_problem:
        problems.append(f"spec.baseModel.uri: {base_problem}")
    elif ad.spec.runtime == "vllm":
        try:
            local_path(ad.spec.base_model.uri)
        except RenderError as error:
            problems.append(f"spec.baseModel.uri: {error}")
    if problems:
        raise RenderError(
            f"AdapterDeployment {meta.name!r} cannot be rendered:\n" + "\n".join(f"  {p}" for p in problems)
        )


def render_adapterdeployment(
    ad: AdapterDeployment,
    config: OperatorConfig,
    from_jobs: Mapping[str, str] | None = None,
    job_sources: Mapping[str, str] | None = None,
    operator_ns: str | None = None,
) -> AdapterDeploymentObjects:
    """The children of `ad`, owned by it. `from_jobs`: adapter name → URI for the `fromJob`
    adapters whose FineTuneJob has Succeeded; `job_sources`: adapter name → where its FineTuneJob
    publishes (contract.adapter_uri of the job's spec.output.uri), for every `fromJob` adapter whose
    job exists. A resolved URI outside its job's source, or failing the URI rules, is left out.
    `operator_ns`: the operator's namespace, for the NetworkPolicy (default: the configuration's
    `operator_namespace`, where it has one)."""
    check_renderable(ad)
    refused = image_problem(ad.spec.image, config)
    if refused:
        raise RenderError(f"AdapterDeployment {ad.metadata.name!r} cannot be rendered: spec.image: {refused}")
    refused = gpu_resource_problem(ad.spec.resources.gpu_resource, ad.spec.resources.gpus_per_replica, config)
    if refused:
        raise RenderError(f"AdapterDeployment {ad.metadata.name!r} cannot be rendered: {refused}")
    resolved = resolved_adapters(ad.spec, from_jobs or {}, job_sources)
    sources = allowed_sources(ad.spec, job_sources or {})
    # Mounted: the claims of what is allowed (a job's output claim is mounted before it finishes,
    # so its adapter loads without a restart) and of what is resolved.
    uris = [*sources, *(uri for _, uri in resolved)]
    return AdapterDeploymentObjects(
        render_adapters_configmap(ad, resolved, sources),
        render_deployment(ad, config, uris),
        render_service(ad),
        render_admin_key_secret(ad, config),
        render_network_policy(
            ad, configured_namespace(config) if operator_ns is None else operator_ns, config.metrics_scrapers
        )
        if config.network_policies
        else None,
        render_autoscaler(ad),
        render_disruption_budget(ad),
    )
