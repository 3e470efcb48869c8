"""AdapterDeployment → a Deployment `<name>` of serving replicas, a Service `<name>` in front, and
the ConfigMap `<name>-adapters` that holds the adapters every replica must have.

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
Adapters on claims already mounted load without a restart.

Pure: the same input gives equal dicts.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kubetune.api import adaptersfile
from kubetune.api.adapterdeployment import AdapterDeployment, AdapterDeploymentSpec
from kubetune.contract import PVC_ROOT, PVC_ROOT_ENV, SCRATCH, TMP_DIR

from ..config import OperatorConfig
from ..render_common import (
    DEFAULT_CONTAINER_ANNOTATION,
    DNS_1035_LABEL,
    LABEL_COMPONENT,
    MAX_DNS_LABEL,
    RenderError,
    container_resources,
    container_security_context,
    dns_label,
    identity,
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


def endpoint(name: str, namespace: str, port: int) -> str:
    return f"http://{service_name(name)}.{namespace}.svc:{port}/v1"


def pod_labels(name: str) -> dict[str, str]:
    return {**standard_labels(name, COMPONENT), DEPLOYMENT_LABEL: name}


def selector(name: str) -> dict[str, str]:
    return {DEPLOYMENT_LABEL: name, LABEL_COMPONENT: COMPONENT}


def label_selector(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(name).items()))


# --- URIs ----------------------------------------------------------------------------------------


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
    resolves pvc://, s3:// and hf:// itself), a local path or Hub id for vLLM."""
    return uri if runtime == "builtin" else local_path(uri)


def readable_path(runtime: str, uri: str) -> str | None:
    """`adapter_path`, or None where the runtime cannot read the URI (vLLM and s3://): such an
    adapter is left out of the adapters file, and the operator's load is refused with the reason."""
    try:
        return adapter_path(runtime, uri)
    except RenderError:
        return None


def claims(spec: AdapterDeploymentSpec, adapter_uris: Iterable[str] = ()) -> list[str]:
    """The claims to mount (read-only): the base model's and those of adapters given by URI or
    resolved from a FineTuneJob (`adapter_uris`)."""
    uris = [spec.base_model.uri, *(a.uri for a in spec.adapters if a.uri), *adapter_uris]
    return sorted({c for c in (claim_of(u) for u in uris) if c})


# --- the pod -------------------------------------------------------------------------------------


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
            "--adapters-file", adaptersfile.PATH_IN_POD]  # fmt: skip


def server_env(ad: AdapterDeployment) -> list[dict[str, Any]]:
    env = [
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH}/.cache"},
        {"name": PVC_ROOT_ENV, "value": PVC_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if ad.spec.runtime == "vllm":
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
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


def resolved_adapters(spec: AdapterDeploymentSpec, from_jobs: Mapping[str, str]) -> list[tuple[str, str]]:
    """(name, URI), spec order, of the adapters whose URI is known: given, or (`from_jobs`, name →
    URI) the adapter of a Succeeded FineTuneJob. Adapters still waiting for their job are left out."""
    pairs = [(a.name, a.uri or from_jobs.get(a.name)) for a in spec.adapters]
    return [(name, uri) for name, uri in pairs if uri]


def adapters_file_entries(ad: AdapterDeployment, adapters: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, path the runtime loads) for each adapter; one vLLM cannot read (s3://) is left out
    here and refused with a message by the operator's load."""
    paths = [(name, readable_path(ad.spec.runtime, uri)) for name, uri in adapters]
    return [(name, path) for name, path in paths if path is not None]


def render_adapters_configmap(ad: AdapterDeployment, adapters: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The adapters file: `adapters` is (name, URI) of every adapter whose URI is known, spec order."""
    name, namespace = identity(ad.metadata)
    text = adaptersfile.render_adapters_file(adapters_file_entries(ad, adapters))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(
            adaptersfile.configmap_name(name), namespace, pod_labels(name), owner_reference(ad.metadata, KIND)
        ),
        "data": {adaptersfile.CONFIGMAP_KEY: text},
    }


@dataclass(frozen=True)
class AdapterDeploymentObjects:
    adapters: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [self.adapters, self.service, self.deployment]


def check_renderable(ad: AdapterDeployment) -> None:
    meta, problems = ad.metadata, []
    if not meta.name or not DNS_1035_LABEL.match(meta.name) or len(meta.name) > MAX_DNS_LABEL:
        problems.append(
            f"metadata.name {meta.name!r} cannot name the Service: use at most {MAX_DNS_LABEL} lowercase "
            "letters, digits and '-', starting with a letter"
        )
    if not meta.namespace:
        problems.append("metadata.namespace is required")
    if not meta.uid:
        problems.append("metadata.uid is required (children are owned by it)")
    if ad.spec.runtime == "vllm":
        try:
            local_path(ad.spec.base_model.uri)
        except RenderError as error:
            problems.append(f"spec.baseModel.uri: {error}")
    if problems:
        raise RenderError(
            f"AdapterDeployment {meta.name!r} cannot be rendered:\n" + "\n".join(f"  {p}" for p in problems)
        )


def render_adapterdeployment(
    ad: AdapterDeployment, config: OperatorConfig, from_jobs: Mapping[str, str] | None = None
) -> AdapterDeploymentObjects:
    """The adapters ConfigMap, Deployment and Service of `ad`, owned by it. `from_jobs`: adapter
    name → URI for the `fromJob` adapters whose FineTuneJob has Succeeded."""
    check_renderable(ad)
    resolved = resolved_adapters(ad.spec, from_jobs or {})
    uris = [uri for _, uri in resolved]
    return AdapterDeploymentObjects(
        render_adapters_configmap(ad, resolved), render_deployment(ad, config, uris), render_service(ad)
    )
