"""The operator's own configuration: images, namespaces, ports and defaults that are not part of any spec.

Precedence, lowest first: the defaults below, a YAML file named by KUBETUNE_CONFIG (keys in camelCase,
as the Helm chart writes them, or snake_case), then one environment variable per field. Only the
variables listed in ENV_VARS are read; other KUBETUNE_* variables (KUBETUNE_PVC_ROOT, KUBETUNE_CACHE,
...) belong to the trainer and are ignored here.

Policy lives here too, because it is the cluster operator's, not a FineTuneJob author's: which images
(`allowedImages`, prefixes; default: the repositories of the operator's own trainer and serving images)
and which PriorityClasses (`allowedPriorityClasses`; default: any but the `system-` ones) a workload
may use, and under which extended resource names a workload may request GPUs (`gpuResources`;
default `nvidia.com/gpu`; only names vendors' device plugins register, see KNOWN_GPU_RESOURCES).
The admin key (`KUBETUNE_OPERATOR_ADMIN_KEY`, from the chart's Secret) is kept out of reprs.
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from kubetune import __version__

CONFIG_FILE_ENV = "KUBETUNE_CONFIG"

# Extended resource names that GPU and accelerator device plugins register. A name outside these is a
# typo (`nvidia.com/gpus`) or a resource that is not an accelerator: a workload requesting it would
# stay Pending with "Insufficient <name>" on every node, so the operator refuses it up front. The
# chart's values.schema.json holds the same list (a unit test compares them).
KNOWN_GPU_RESOURCES = (
    "nvidia.com/gpu",
    "amd.com/gpu",
    "gpu.intel.com/i915",
    "gpu.intel.com/xe",
    "habana.ai/gaudi",
    "aws.amazon.com/neuron",
    "aws.amazon.com/neuroncore",
    "google.com/tpu",
)
# NVIDIA's MIG slices under the mixed strategy: nvidia.com/mig-<compute>g.<memory>gb, optionally with
# a media-extension suffix of the MIG user guide's profile tables (+me, +me.all, -me).
MIG_RESOURCE_PATTERN = r"^nvidia\.com/mig-[1-8]g\.[0-9]{1,4}gb(\+me|\+me\.all|-me)?$"  # also in the chart's schema
MIG_RESOURCE = re.compile(MIG_RESOURCE_PATTERN)


PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})  # networking.k8s.io/v1 NetworkPolicyPeer


def is_known_gpu_resource(name: str) -> bool:
    """Whether `name` is an accelerator resource some vendor's device plugin registers."""
    return name in KNOWN_GPU_RESOURCES or MIG_RESOURCE.fullmatch(name) is not None


class OperatorConfig(BaseModel):
    """Settings the renderers and handlers read; immutable once loaded so a reconcile cannot change them."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    trainer_image: str = Field(default=f"ghcr.io/kubetune/trainer:{__version__}", min_length=1)
    serving_image: str = Field(default=f"ghcr.io/kubetune/serve:{__version__}", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = Field(default=(), description="Namespaces to watch; empty watches all.")
    # Requests for pods whose spec leaves cpu/memory unset (spec values become requests = limits).
    default_cpu: str | None = "1"
    default_memory: str | None = "4Gi"
    metrics_scrape_interval_seconds: float = Field(default=15.0, gt=0)
    trainer_metrics_port: int = Field(default=9090, ge=0, le=65535, description="0 disables the trainer's metrics.")
    master_port: int = Field(default=29500, ge=1, le=65535, description="torchrun's rendezvous port on rank 0.")
    # Time the trainer gets between SIGTERM and SIGKILL to finish its step and write a checkpoint.
    checkpoint_grace_seconds: int = Field(default=120, ge=1)
    allowed_images: tuple[str, ...] = Field(
        default=(),
        description="Image prefixes workloads may use ('*': any); empty: the repositories of the two images above.",
    )
    allowed_priority_classes: tuple[str, ...] = Field(
        default=(), description="PriorityClasses workloads may use; empty: any whose name does not start with system-."
    )
    admin_key_secret: str = Field(
        default="", repr=False, description="Serving runtimes' admin key; empty: a random one per operator process."
    )
    operator_namespace: str = Field(
        default="", max_length=63, description="Where the operator runs (the chart's downward API); scrape policies."
    )
    network_policies: bool = Field(default=True, description="Render a NetworkPolicy for each workload.")
    gpu_resources: tuple[str, ...] = Field(
        default=("nvidia.com/gpu",),
        min_length=1,
        max_length=32,
        description="Extended resource names workloads may request GPUs under (spec.resources.gpuResource).",
    )

    metrics_scrapers: tuple[dict[str, Any], ...] = Field(
        default=(),
        max_length=16,
        description="NetworkPolicy peers (podSelector/namespaceSelector/ipBlock) let in to the workloads' metrics "
        "ports beside the operator: your Prometheus.",
    )

    @field_validator("metrics_scrapers", mode="before")
    @classmethod
    def _peers(cls, value: Any) -> Any:
        # A variable carries the list as JSON; each entry is a NetworkPolicyPeer, checked for its keys
        # here and for the rest by the API server when the NetworkPolicy is applied.
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except json.JSONDecodeError as error:
                raise ValueError(f"not a JSON list of NetworkPolicy peers: {error}") from None
        for peer in value if isinstance(value, list | tuple) else ():
            if not isinstance(peer, dict) or not peer or not set(peer) <= PEER_KEYS:
                raise ValueError(f"a NetworkPolicy peer has one or more of {sorted(PEER_KEYS)}, got {peer!r:.200}")
        return value

    @field_validator(
        "namespaces", "image_pull_secrets", "allowed_images", "allowed_priority_classes", "gpu_resources", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # An environment variable carries a list as "a,b"; a YAML file as a list.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("gpu_resources")
    @classmethod
    def _known_gpu_resources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A misspelt name would make every GPU workload unschedulable: stop at start-up instead.
        unknown = [name for name in value if not is_known_gpu_resource(name)]
        if unknown:
            raise ValueError(
                f"unknown GPU resource name(s) {unknown}: use names device plugins register, "
                f"{list(KNOWN_GPU_RESOURCES)} or nvidia.com/mig-<profile> (e.g. nvidia.com/mig-1g.10gb)"
            )
        return value

    @field_validator("default_cpu", "default_memory", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # KUBETUNE_DEFAULT_CPU="" turns the default request off.
        return None if value == "" else value

    @property
    def watches_all_namespaces(self) -> bool:
        return not self.namespaces

    @property
    def image_allow_list(self) -> tuple[str, ...]:
        """The image prefixes in force: `allowed_images`, or the operator's own images' repositories."""
        if self.allowed_images:
            return self.allowed_images
        return tuple(dict.fromkeys(image_repository(image) for image in (self.trainer_image, self.serving_image)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        """Defaults, then the KUBETUNE_CONFIG file, then KUBETUNE_* variables. Raises ValueError naming
        the file or variable at fault, so a misconfigured operator stops at start-up, not mid-reconcile."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if environ.get(CONFIG_FILE_ENV):
            values.update(_read_file(Path(environ[CONFIG_FILE_ENV])))
        from_vars = {field: environ[var] for field, var in ENV_VARS.items() if var in environ}
        values.update(from_vars)
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise ValueError(_explain(error, from_vars, environ.get(CONFIG_FILE_ENV))) from None


# Settings that are the operator's own (not shared with the trainer's KUBETUNE_* names) carry OPERATOR.
_OPERATOR_ENV = {
    "allowed_images": "KUBETUNE_OPERATOR_ALLOWED_IMAGES",
    "allowed_priority_classes": "KUBETUNE_OPERATOR_ALLOWED_PRIORITY_CLASSES",
    "admin_key_secret": "KUBETUNE_OPERATOR_ADMIN_KEY",
    "operator_namespace": "KUBETUNE_OPERATOR_NAMESPACE",
    "network_policies": "KUBETUNE_OPERATOR_NETWORK_POLICIES",
    "gpu_resources": "KUBETUNE_OPERATOR_GPU_RESOURCES",
    "metrics_scrapers": "KUBETUNE_OPERATOR_METRICS_SCRAPERS",
}
ENV_VARS = {field: _OPERATOR_ENV.get(field, f"KUBETUNE_{field.upper()}") for field in OperatorConfig.model_fields}


def image_repository(image: str) -> str:
    """`registry/path/name` of an image reference, without its tag or digest."""
    name = image.split("@", 1)[0]
    return re.sub(r":[^/:]*$", "", name)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{CONFIG_FILE_ENV}={path}: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{CONFIG_FILE_ENV}={path}: expected a mapping of settings, got {type(document).__name__}")
    # Field names and aliases both work; normalise to field names so variables override either spelling.
    aliases = {to_camel(name): name for name in OperatorConfig.model_fields}
    return {aliases.get(key) or key: value for key, value in document.items()}


def _explain(error: ValidationError, from_vars: dict[str, str], file: str | None) -> str:
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "(config)"
        source = ENV_VARS[field] if field in from_vars else (f"{file}: {field}" if file else field)
        lines.append(f"{source}: {item['msg']}")
    return "invalid operator configuration:\n" + "\n".join(f"  {line}" for line in lines)
