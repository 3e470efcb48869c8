"""FineTuneJob → the objects that run it: a ConfigMap, a headless Service, a NetworkPolicy and an Indexed Job.

- ConfigMap `<name>-trainer-config`: `trainer.yaml`, the TrainerConfig (the user's spec plus runtime
  settings) written with the API models' own `to_wire()`, so the trainer parses exactly the spec
  the API server accepted.
- Service `<name>-workers` (headless): gives pod `<name>-<index>` the DNS name
  `<name>-<index>.<name>-workers`, so every node finds rank 0 (MASTER_ADDR) before any pod is ready.
  It is not called `<name>` because an AdapterDeployment of the same name (the usual pairing:
  examples/cpu-tiny-kind.yaml) serves on Service `<name>`.
- Job `<name>`: Indexed, one pod per node; the completion index is torchrun's node rank. Pod
  disruptions (preemption, drain) and preempted-after-checkpoint exits do not use up backoffLimit;
  exit codes that mean "bad input" fail the Job at once instead of retrying.
- NetworkPolicy `<name>-trainer`: the training pods accept connections only from the same job's
  pods (any port: torchrun's rendezvous, NCCL) and from the operator's pods on the metrics port
  (its scrape); egress stays open (models and datasets come from https, hf and s3). Off with the
  operator setting `networkPolicies: false`.

The operator's allow-lists (images, PriorityClasses) are checked here too, as a last line of
defence behind admission, so a workload the operator would refuse is never rendered.

Everything here is pure: no API calls, no clock, no randomness. The same input gives equal dicts.
"""

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import ValidationError

from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec, ResourcesSpec, TrainingPlan
from kubetune.api.kinds import FINETUNEJOB
from kubetune.api.names import FINETUNEJOB_SERVICE_SUFFIX, NAME_RULES
from kubetune.api.names import name_problems as api_name_problems
from kubetune.api.validation import validate
from kubetune.contract import (
    CACHE_DIR,
    CONFIG_DIR,
    CONFIG_KEY,
    CONFIG_PATH,
    CONFIGMAP_ROOT,
    CONFIGMAP_ROOT_ENV,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    EXIT_PREEMPTED,
    NON_RETRYABLE_EXIT_CODES,
    PVC_ROOT,
    PVC_ROOT_ENV,
    SCRATCH,
    TERMINATION_LOG,
    TMP_DIR,
    TRAINER_CONTAINER,
    RuntimeSettings,
    TrainerConfig,
)
from kubetune.planning import Plan

from ..config import OperatorConfig
from ..render_common import (
    DEFAULT_CONTAINER_ANNOTATION,
    LABEL_COMPONENT,
    MAX_DNS_LABEL,
    RenderError,
    container_resources,
    container_security_context,
    dns_label,
    identity,
    image_problem,
    metrics_peers,
    object_meta,
    owner_reference,
    pod_security_context,
    priority_class_problem,
    quantity,
    short_hash,
    standard_labels,
)

KIND = "FineTuneJob"
# The admission plan: planning.Plan, or the TrainingPlan recorded in status (either gives
# world_size and strategy); None renders the spec as written.
AnyPlan = Plan | TrainingPlan | None
COMPONENT = "trainer"
CONTAINER = TRAINER_CONTAINER

# Names derived from the FineTuneJob's name.
SERVICE_SUFFIX = FINETUNEJOB_SERVICE_SUFFIX  # the name rule of kubetune.api.names counts it
CONFIG_MAP_SUFFIX = "-trainer-config"
NETWORK_POLICY_SUFFIX = "-trainer"
# Longest FineTuneJob name whose Service name still fits a DNS label (pod hostnames
# `<name>-<index>` are shorter for any possible node count, so this is the binding limit).
MAX_JOB_NAME = NAME_RULES[FINETUNEJOB.kind].max_length

# Labels and annotations.
JOB_LABEL = "kubetune.io/job"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_HASH_ANNOTATION = "kubetune.io/config-hash"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Extra seconds the pod gets beyond the trainer's grace period, for torchrun to tear down workers.
GRACE_MARGIN_SECONDS = 15


# --- names ---------------------------------------------------------------------------------------


def service_name(name: str) -> str:
    return f"{name}{SERVICE_SUFFIX}"


def config_map_name(name: str) -> str:
    return f"{name}{CONFIG_MAP_SUFFIX}"


def network_policy_name(name: str) -> str:
    return f"{name}{NETWORK_POLICY_SUFFIX}"


def pod_hostname(name: str, index: int) -> str:
    """The hostname the Job controller gives the pod of completion index `index`."""
    return f"{name}-{index}"


def master_addr(name: str) -> str:
    """Rank 0's DNS name through the headless Service (resolved via the namespace's search path)."""
    return f"{pod_hostname(name, 0)}.{service_name(name)}"


def name_problems(name: str | None, nodes: int = 1) -> list[str]:
    """What makes `name` unusable for a FineTuneJob's workload, in words for the user: the rule of
    `kubetune.api.names` (the one `kubetune validate` and the API server apply), plus the pod
    hostnames of this many nodes. Exposed so admission can reject such a job up front; the
    renderer raises the same messages."""
    problems = api_name_problems(FINETUNEJOB.kind, name)
    if not problems and name and len(pod_hostname(name, nodes - 1)) > MAX_DNS_LABEL:
        problems.append(
            f"metadata.name {name!r} is {len(name)} characters: the pod hostname {pod_hostname(name, nodes - 1)!r} "
            f"must fit in {MAX_DNS_LABEL} characters"
        )
    return problems


# --- labels --------------------------------------------------------------------------------------


def pod_labels(name: str) -> dict[str, str]:
    """Labels of every object of the job; the pods' subset is also the Service's selector."""
    return {**standard_labels(name, COMPONENT), JOB_LABEL: name}


def selector(name: str) -> dict[str, str]:
    return {JOB_LABEL: name, LABEL_COMPONENT: COMPONENT}


def job_labels(name: str, spec: FineTuneJobSpec) -> dict[str, str]:
    labels = pod_labels(name)
    if spec.run_policy.queue_name:
        labels[QUEUE_LABEL] = spec.run_policy.queue_name
    return labels


# --- the trainer's config ------------------------------------------------------------------------


def runtime_settings(job: FineTuneJob, config: OperatorConfig) -> RuntimeSettings:
    """What the trainer needs beyond the spec: where it runs and where it may write (a read-only
    root filesystem leaves only the scratch volume and the termination log writable)."""
    return RuntimeSettings(
        job_name=job.metadata.name,
        namespace=job.metadata.namespace,
        local=False,
        metrics_port=config.trainer_metrics_port,
        cache_dir=CACHE_DIR,
        termination_message_path=TERMINATION_LOG,
        grace_seconds=config.checkpoint_grace_seconds,
    )


def pinned_spec(spec: FineTuneJobSpec, plan: AnyPlan) -> FineTuneJobSpec:
    """The spec with strategy `auto` replaced by the plan's choice, so every rank (and every retry)
    uses the strategy admission decided on, whatever the GPU it lands on reports. When the choice
    would break a rule of the API (ddp with offload cpu), the spec keeps `auto` and the trainer
    resolves it the same way."""
    if plan is None or not plan.strategy or plan.strategy == "auto" or spec.distributed.strategy != "auto":
        return spec
    wire = spec.to_wire()
    wire["distributed"]["strategy"] = plan.strategy
    try:
        return FineTuneJobSpec.model_validate(wire)
    except ValidationError:
        return spec


def trainer_config(job: FineTuneJob, config: OperatorConfig, plan: AnyPlan = None) -> TrainerConfig:
    return TrainerConfig(spec=pinned_spec(job.spec, plan), runtime=runtime_settings(job, config))


def trainer_config_text(trainer: TrainerConfig) -> str:
    """YAML with sorted keys: the same config always gives the same bytes (and the same hash)."""
    return yaml.safe_dump(trainer.to_wire(), sort_keys=True, default_flow_style=False)


# --- the objects ---------------------------------------------------------------------------------


def render_config_map(job: FineTuneJob, config: OperatorConfig, plan: AnyPlan = None) -> dict[str, Any]:
    name, namespace = identity(job.metadata)
    owner = owner_reference(job.metadata, KIND)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(config_map_name(name), namespace, pod_labels(name), owner),
        "data": {CONFIG_KEY: trainer_config_text(trainer_config(job, config, plan))},
    }


def render_service(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Headless, and publishing not-ready addresses: torchrun on every node resolves rank 0 while
    the pods start, long before (and regardless of whether) they would count as ready."""
    name, namespace = identity(job.metadata)
    ports = [
        {"name": port["name"], "port": port["containerPort"], "targetPort": port["containerPort"], "protocol": "TCP"}
        for port in container_ports(config)
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(service_name(name), namespace, pod_labels(name), owner_reference(job.metadata, KIND)),
        "spec": {
            "clusterIP": "None",
            "selector": selector(name),
            "publishNotReadyAddresses": True,
            "ports": ports,
        },
    }


def render_network_policy(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Ingress to the job's pods from the job's own pods (every port), and from the operator's pods
    and the configured metrics scrapers to the metrics port (none when metrics are off). Egress is
    not restricted: only Ingress is named in policyTypes."""
    name, namespace = identity(job.metadata)
    own = {"matchLabels": selector(name)}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": own}]}]
    if config.trainer_metrics_port:
        ports = [{"port": config.trainer_metrics_port, "protocol": "TCP"}]
        ingress.append({"from": metrics_peers(config), "ports": ports})
    owner = owner_reference(job.metadata, KIND)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(network_policy_name(name), namespace, pod_labels(name), owner),
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def render_job(job: FineTuneJob, config: OperatorConfig, config_hash: str = "") -> dict[str, Any]:
    """The Indexed Job. `config_hash` (of the ConfigMap's trainer.yaml) is recorded so the handler
    can tell that a Job was made for another config (e.g. resources changed while suspended) and
    must be replaced: a Job's pod template and completions cannot be patched."""
    (name, namespace), spec = identity(job.metadata), job.spec
    policy = spec.run_policy
    annotations = {CONFIG_HASH_ANNOTATION: config_hash} if config_hash else None
    owner = owner_reference(job.metadata, KIND)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        "backoffLimit": policy.backoff_limit,
        # Kueue admits a queued Job by unsuspending it, so a queued Job is always created suspended.
        "suspend": policy.suspend or bool(policy.queue_name),
        "podFailurePolicy": pod_failure_policy(),
        "template": pod_template(job, config),
    }
    if policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(name, namespace, job_labels(name, spec), owner, annotations),
        "spec": job_spec,
    }


def pod_failure_policy() -> dict[str, Any]:
    """Rules are evaluated in order, first match wins. Disruptions come first: a preempted or
    drained pod may also exit 143 or be killed, and must never count as a failure; then inputs
    that no retry can fix fail the whole Job; a SIGTERM that the trainer answered with a
    checkpoint (143) is ignored too. Everything else counts against backoffLimit."""

    def on_exit(codes: tuple[int, ...]) -> dict[str, Any]:
        return {"containerName": CONTAINER, "operator": "In", "values": list(codes)}

    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": on_exit(NON_RETRYABLE_EXIT_CODES)},
            {"action": "Ignore", "onExitCodes": on_exit((EXIT_PREEMPTED,))},
        ]
    }


# --- the pod -------------------------------------------------------------------------------------


def pod_template(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    name, _ = identity(job.metadata)
    return {
        "metadata": {"labels": pod_labels(name), "annotations": {DEFAULT_CONTAINER_ANNOTATION: CONTAINER}},
        "spec": pod_spec(job, config),
    }


def pod_spec(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any]:
    """Restricted Pod Security, no API token (the pods never talk to the API server: progress is
    read from rank 0's metrics, the result from the termination message), no service links (a
    Service named `master` would otherwise inject a MASTER_PORT variable)."""
    (name, _), resources = identity(job.metadata), job.spec.resources
    mounts = volume_mounts(name, job.spec)
    spec: dict[str, Any] = {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job controller replaces failed pods
        "subdomain": service_name(name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.checkpoint_grace_seconds + GRACE_MARGIN_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [trainer_container(job, config, [m for _, m in mounts])],
        "volumes": dedupe_volumes([v for v, _ in mounts]),
    }
    spec.update(placement(resources))
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": secret} for secret in config.image_pull_secrets]
    return spec


def placement(resources: ResourcesSpec) -> dict[str, Any]:
    """Scheduling fields passed through from the spec, only when set."""
    out: dict[str, Any] = {}
    if resources.node_selector:
        out["nodeSelector"] = dict(sorted(resources.node_selector.items()))
    if resources.tolerations:
        out["tolerations"] = [t.to_wire() for t in resources.tolerations]
    if resources.affinity:
        out["affinity"] = resources.affinity
    if resources.priority_class_name:
        out["priorityClassName"] = resources.priority_class_name
    return out


def trainer_container(job: FineTuneJob, config: OperatorConfig, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    spec = job.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": trainer_command(spec.resources),
        "env": trainer_env(identity(job.metadata)[0], spec.resources, config),
        "ports": container_ports(config),
        "resources": container_resources(spec.resources, spec.resources.gpus_per_node, config),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        # The trainer writes a JSON result on success; a crash before that leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    secrets = env_secrets(spec)
    if secrets:
        # Keys such as HF_TOKEN and AWS_* become variables; a missing Secret keeps the pod pending, visibly.
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in secrets]
    return container


def env_secrets(spec: FineTuneJobSpec) -> list[str]:
    """The Secrets whose keys become the trainer's environment, each once: the experiment trackers'
    (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, ...) and the model's (HF_TOKEN, AWS_*). The model's comes
    last because Kubernetes lets the last envFrom source win a key several hold: a tracker's Secret
    can then never replace the credentials the job reads its data and writes its output with. The
    container's own `env` (HOME, MASTER_ADDR, ...) wins over every Secret."""
    tracking = spec.tracking
    refs = [
        tracking.mlflow.secret_ref if tracking and tracking.mlflow else None,
        tracking.wandb.secret_ref if tracking and tracking.wandb else None,
        spec.model.secret_ref,
    ]
    names = [ref.name for ref in refs if ref is not None]
    return [name for index, name in enumerate(names) if name not in names[index + 1 :]]


def uses_torchrun(resources: ResourcesSpec) -> bool:
    return resources.nodes > 1 or resources.gpus_per_node > 1


def nproc_per_node(resources: ResourcesSpec) -> int:
    return max(resources.gpus_per_node, 1)


def trainer_command(resources: ResourcesSpec) -> list[str]:
    """Always `kubetune train`: with NNODES/NPROC_PER_NODE above 1 in its env it starts torchrun
    itself (static rendezvous at rank 0), forwards SIGTERM and reports a preemption as 143."""
    return ["kubetune", "train", "-f", CONFIG_PATH]


def trainer_env(name: str, resources: ResourcesSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every writable location points into the scratch volume, so the root filesystem can be
    read-only. HF_HUB_OFFLINE is deliberately not set: hf:// models are downloaded in the pod."""
    env = [
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": TMP_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH}/.cache"},
        {"name": PVC_ROOT_ENV, "value": PVC_ROOT},
        {"name": CONFIGMAP_ROOT_ENV, "value": CONFIGMAP_ROOT},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if uses_torchrun(resources):
        env += distributed_env(name, resources, config)
    return env


def distributed_env(name: str, resources: ResourcesSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """What torchrun's command line reads. The node rank is the pod's completion index, which the
    Job controller writes into an annotation of each pod."""
    index = {"fieldRef": {"apiVersion": "v1", "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    return [
        {"name": ENV_NNODES, "value": str(resources.nodes)},
        {"name": ENV_NODE_RANK, "valueFrom": index},
        {"name": ENV_NPROC_PER_NODE, "value": str(nproc_per_node(resources))},
        {"name": ENV_MASTER_ADDR, "value": master_addr(name)},
        {"name": ENV_MASTER_PORT, "value": str(config.master_port)},
    ]


def container_ports(config: OperatorConfig) -> list[dict[str, Any]]:
    ports = [{"name": "master", "containerPort": config.master_port, "protocol": "TCP"}]
    if config.trainer_metrics_port:
        ports.append({"name": "metrics", "containerPort": config.trainer_metrics_port, "protocol": "TCP"})
    return ports


# --- volumes -------------------------------------------------------------------------------------


def input_uris(spec: FineTuneJobSpec) -> list[str]:
    """What the pods read: the model, the data, and what the evaluation after training reads (its
    file, its reference text, its benchmark task folder) — their claims and ConfigMaps are mounted."""
    uris = [spec.model.uri, spec.dataset.uri]
    if spec.dataset.validation and spec.dataset.validation.uri:
        uris.append(spec.dataset.validation.uri)
    evaluation = spec.evaluation
    benchmarks = evaluation.benchmarks
    extra = (evaluation.uri, evaluation.reference_uri, benchmarks.task_uri if benchmarks else None)
    uris.extend(uri for uri in extra if uri)
    return uris


def claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Each distinct pvc:// claim → whether it must be writable (only the output's claim is)."""
    writable: dict[str, bool] = {}
    for uri in input_uris(spec):
        parsed = urlparse(uri)
        if parsed.scheme == "pvc":
            writable.setdefault(parsed.netloc, False)
    output = urlparse(spec.output.uri)
    if output.scheme == "pvc":
        writable[output.netloc] = True
    return dict(sorted(writable.items()))


def dataset_config_maps(spec: FineTuneJobSpec) -> list[str]:
    names = {urlparse(uri).netloc for uri in input_uris(spec)[1:] if urlparse(uri).scheme == "configmap"}
    return sorted(names)


def shared_memory_size(resources: ResourcesSpec) -> str:
    """NCCL and data-loader workers exchange tensors through /dev/shm; the container default of 64Mi
    is far too small. The spec's size, else 1Gi per GPU (1Gi on CPU)."""
    if resources.shared_memory is not None:
        return quantity(resources.shared_memory)
    return f"{max(resources.gpus_per_node, 1)}Gi"


Pair = tuple[dict[str, Any], dict[str, Any]]  # (volume, its mount in the trainer container)


def _pair(volume: str, source: dict[str, Any], path: str, read_only: bool | None = None, sub_path: str = "") -> Pair:
    mount: dict[str, Any] = {"name": volume, "mountPath": path}
    if read_only is not None:
        mount["readOnly"] = read_only
    if sub_path:
        mount["subPath"] = sub_path
    return {"name": volume, **source}, mount


def volume_mounts(name: str, spec: FineTuneJobSpec) -> list[Pair]:
    """(volume, mount) pairs, in a fixed order: config, scratch (twice: /scratch and /tmp), shm,
    claims by name, dataset ConfigMaps by name. Input claims are read-only at the volume level
    too, so no process in the pod can alter a model or a dataset."""
    scratch: dict[str, Any] = {"emptyDir": {}}
    pairs = [
        _pair("config", {"configMap": {"name": config_map_name(name)}}, CONFIG_DIR, read_only=True),
        _pair("scratch", scratch, SCRATCH),
        _pair("scratch", scratch, "/tmp", sub_path="tmp"),
        _pair("dshm", {"emptyDir": {"medium": "Memory", "sizeLimit": shared_memory_size(spec.resources)}}, "/dev/shm"),
    ]
    for claim, writable in claims(spec).items():
        source = {"persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
        pairs.append(_pair(dns_label("pvc", claim), source, f"{PVC_ROOT}/{claim}", read_only=not writable))
    for config_map in dataset_config_maps(spec):
        source = {"configMap": {"name": config_map}}
        pairs.append(_pair(dns_label("cm", config_map), source, f"{CONFIGMAP_ROOT}/{config_map}", read_only=True))
    return pairs


def dedupe_volumes(volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One volume per name (scratch is mounted twice), first occurrence kept."""
    seen: dict[str, dict[str, Any]] = {}
    for volume in volumes:
        seen.setdefault(volume["name"], volume)
    return list(seen.values())


# --- everything ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineTuneJobObjects:
    """The rendered objects, in the order they should be created (the Job's pods mount the
    ConfigMap, resolve each other through the Service, and start behind their NetworkPolicy).
    `network_policy` is None when the operator renders none."""

    config_map: dict[str, Any]
    service: dict[str, Any]
    job: dict[str, Any]
    network_policy: dict[str, Any] | None = None

    def all(self) -> list[dict[str, Any]]:
        policy = [self.network_policy] if self.network_policy is not None else []
        return [self.config_map, self.service, *policy, self.job]


def policy_problems(job: FineTuneJob, config: OperatorConfig) -> list[str]:
    """What the operator's allow-lists refuse in `job` (its image, its PriorityClass)."""
    problems = [
        image_problem(job.spec.image, config),
        priority_class_problem(job.spec.resources.priority_class_name, config),
    ]
    return [problem for problem in problems if problem]


def check_renderable(job: FineTuneJob, plan: AnyPlan = None, config: OperatorConfig | None = None) -> None:
    """Raise RenderError, listing every problem, for a job the cluster would reject or run wrongly:
    unusable names, missing namespace/uid, a spec that fails validation, a plan for another world size,
    an image or PriorityClass the operator's allow-lists refuse (when `config` is given)."""
    meta = job.metadata
    problems = name_problems(meta.name, job.spec.resources.nodes)
    if not meta.namespace:
        problems.append("metadata.namespace is required")
    if not meta.uid:
        problems.append("metadata.uid is required (children are owned by it)")
    problems += [str(problem) for problem in validate(job, local=False)]
    if plan is not None and plan.world_size is not None and plan.world_size != job.spec.resources.world_size:
        world = job.spec.resources.world_size
        problems.append(f"the plan is for world size {plan.world_size} but resources give {world}; plan again")
    if config is not None:
        problems += policy_problems(job, config)
    if problems:
        raise RenderError(f"FineTuneJob {meta.name!r} cannot be rendered:\n" + "\n".join(f"  {p}" for p in problems))


def render_finetunejob(job: FineTuneJob, config: OperatorConfig, plan: AnyPlan = None) -> FineTuneJobObjects:
    """All objects for `job`, owned by it. `plan` (from admission) pins strategy `auto`."""
    check_renderable(job, plan, config)
    config_map = render_config_map(job, config, plan)
    config_hash = short_hash(config_map["data"][CONFIG_KEY], 16)
    policy = render_network_policy(job, config) if config.network_policies else None
    return FineTuneJobObjects(config_map, render_service(job, config), render_job(job, config, config_hash), policy)
