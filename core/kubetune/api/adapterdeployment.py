"""AdapterDeployment: a base model served behind an OpenAI-compatible endpoint with hot-swapped adapters."""

from typing import ClassVar, Literal

from pydantic import Field

from .common import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    MAX_NAME,
    MAX_URI,
    ApiModel,
    Condition,
    ModelSource,
    Placement,
    Rule,
    conditions_field,
    section,
)
from .evaluation import Requirement
from .finetunejob import ObjectMeta
from .merging import AdapterMerge
from .subresources import ScaleSubresource
from .uris import uri_rules

MAX_REPLICAS = 256
# The gauge of requests being served (queued or generating) that every replica of the builtin
# runtime exports on /metrics; the HorizontalPodAutoscaler averages it over the replicas.
IN_FLIGHT_METRIC = "kubetune_serve_requests_in_flight"


class AdapterRef(ApiModel):
    """One adapter to serve: from a FineTuneJob in this namespace, from a URI, or merged from others."""

    name: str = Field(
        pattern=DNS_LABEL,
        max_length=63,
        description="The name clients put in the OpenAI `model` field to use this adapter.",
    )
    from_job: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        description="A FineTuneJob in this namespace; served once it has Succeeded, from its status.adapter.uri.",
    )
    uri: str | None = Field(
        default=None, max_length=MAX_URI, description="pvc://CLAIM/PATH, s3://BUCKET/PATH or hf://ORG/NAME."
    )
    require: list[Requirement] = Field(
        default_factory=list,
        max_length=16,
        description="Promotion rules for a fromJob adapter: what its FineTuneJob's evaluation must show "
        "(e.g. {metric: rougeL.delta, min: 0.05}, {metric: forgettingRatio, max: 1.15}). An adapter that "
        "fails one is not loaded: its state is Rejected, with the metric, its value and the rule. On a "
        "merge, every fromJob source must pass them.",
    )
    merge: AdapterMerge | None = Field(
        default=None,
        description="Build this adapter on each replica by merging others (linear, cat, ties, dare_linear, "
        "dare_ties; PEFT's add_weighted_adapter): each source a fromJob (gated by this adapter's require) or a uri. "
        "Pending until every source is ready; a change of its sources or weights replaces it without a "
        "restart. Builtin runtime only.",
    )

    cel_rules: ClassVar = (
        Rule(
            cel="!has(self.require) || size(self.require) == 0 || has(self.fromJob) || has(self.merge)",
            message="require applies to fromJob adapters and merges only: a uri has no evaluation to check",
            check=lambda a: not a.require or a.from_job is not None or a.merge is not None,
        ),
        Rule(
            cel="(has(self.fromJob) ? 1 : 0) + (has(self.uri) ? 1 : 0) + (has(self.merge) ? 1 : 0) == 1",
            message="each adapter needs exactly one of fromJob or uri or merge",
            check=lambda a: [a.from_job, a.uri, a.merge].count(None) == 2,
        ),
        *uri_rules("uri", "uri", optional=True),
    )


class ServingResources(Placement):
    """What each serving replica asks for, and where it may run."""

    gpus_per_replica: int = Field(
        default=1, ge=0, le=16, description="GPUs per replica; 0 serves on CPU (builtin runtime)."
    )


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible API.")
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")


class ApiKeyRef(ApiModel):
    """A key of a Secret in the AdapterDeployment's namespace holding the API key clients must send."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN, max_length=MAX_NAME)
    key: str = Field(
        default="api-key", description="Key in the Secret.", pattern=r"^[-._a-zA-Z0-9]+$", max_length=MAX_NAME
    )


class Autoscaling(ApiModel):
    """A HorizontalPodAutoscaler for the replicas, on the runtime's own in-flight-requests gauge."""

    min_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS, description="Fewest replicas (at least 1).")
    max_replicas: int = Field(ge=1, le=MAX_REPLICAS, description="Most replicas (at most 256, at least minReplicas).")
    target_in_flight_requests: int = Field(
        default=8,
        ge=1,
        le=100000,
        description=(
            f"Requests in flight per replica (the runtime's `{IN_FLIGHT_METRIC}` gauge, averaged over the "
            "replicas) the autoscaler aims for: more replicas above it, fewer below."
        ),
    )

    cel_rules: ClassVar = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
        ),
    )


class AdapterDeploymentSpec(ApiModel):
    """The base model, the runtime, and the adapters to keep loaded."""

    base_model: ModelSource = Field(description="The base model every adapter was trained on.")
    runtime: Literal["builtin", "vllm"] = Field(
        default="builtin", description="builtin (transformers + PEFT, CPU or GPU) or vllm (GPU)."
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "Serving replicas; also the `scale` subresource (`kubectl scale`). With `autoscaling` the "
            "HorizontalPodAutoscaler owns this field and sets it between minReplicas and maxReplicas; "
            "the operator never resets it."
        ),
    )
    adapters: list[AdapterRef] = Field(
        default_factory=list,
        max_length=256,
        description="Adapters to serve. Adding or removing one loads or unloads it on every replica without a restart.",
        json_schema_extra={"default": [], "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    max_adapters: int = Field(default=8, ge=1, le=256, description="Adapters resident per replica.")
    max_lora_rank: int = Field(
        default=64, ge=1, le=1024, description="Largest adapter rank accepted (vLLM's max_lora_rank)."
    )
    resources: ServingResources = section(ServingResources, "Replicas' GPUs and placement.")
    service: ServiceSpec = section(ServiceSpec, "The Service.")
    image: str | None = Field(
        default=None, max_length=1024, description="Serving image; the operator's default when empty."
    )
    api_key_secret_ref: ApiKeyRef | None = Field(
        default=None,
        description=(
            "Clients must send this key as `Authorization: Bearer KEY` for inference and /v1/models. Loading and "
            "unloading adapters always needs the operator's own per-object key."
        ),
    )

    autoscaling: Autoscaling | None = Field(
        default=None,
        description=(
            "Scale the replicas with load: the operator renders a HorizontalPodAutoscaler `<name>` that "
            "drives spec.replicas through the scale subresource. Removing the block deletes it; "
            "spec.replicas then stays where the autoscaler left it."
        ),
    )

    cel_rules: ClassVar = (
        Rule(
            cel="size(self.adapters) <= self.maxAdapters",
            message="more adapters than maxAdapters: raise maxAdapters or remove adapters",
            check=lambda s: len(s.adapters) <= s.max_adapters,
            field_path=".adapters",
        ),
        Rule(
            cel="self.runtime != 'vllm' || self.resources.gpusPerReplica >= 1",
            message="runtime vllm needs resources.gpusPerReplica of at least 1; use runtime builtin on CPU",
            check=lambda s: s.runtime != "vllm" or s.resources.gpus_per_replica >= 1,
        ),
        Rule(
            cel="self.runtime != 'vllm' || self.adapters.all(a, !has(a.merge))",
            message="runtime vllm cannot serve merged adapters: vLLM has no adapter merging; use runtime builtin",
            check=lambda s: s.runtime != "vllm" or all(a.merge is None for a in s.adapters),
            field_path=".adapters",
        ),
        Rule(
            cel="self.baseModel == oldSelf.baseModel",
            message="spec.baseModel is immutable: adapters are tied to their base; create a new AdapterDeployment",
            field_path=".baseModel",
        ),
    )


AdapterState = Literal["Pending", "Loading", "Loaded", "Failed", "Unloading", "Rejected"]


class AdapterStatus(ApiModel):
    """Per-adapter state across the replicas."""

    name: str = Field(max_length=63, description="The adapter's name.")
    uri: str | None = Field(default=None, max_length=MAX_URI, description="Where it is loaded from.")
    sha256: str | None = Field(default=None, max_length=64, description="Digest of the adapter weights.")
    loaded_replicas: int | None = Field(default=None, description="Ready replicas that have it loaded.")
    state: AdapterState = Field(
        description="Pending, Loading, Loaded, Failed, Unloading, or Rejected (its job's evaluation fails a "
        "require rule)."
    )
    message: str | None = Field(default=None, max_length=32768, description="Why, when Failed or Pending.")


class AdapterDeploymentStatus(ApiModel):
    """Observed state, written by the operator only."""

    observed_generation: int | None = Field(default=None, description="The generation the status reflects.")
    conditions: list[Condition] = conditions_field()
    replicas: int | None = Field(
        default=None,
        description=(
            "Replicas that exist now, ready or not (the Deployment's status.replicas): the current count "
            "the scale subresource reports, as a Deployment's does."
        ),
    )
    ready_replicas: int | None = Field(default=None, description="Replicas ready with every adapter loaded.")
    endpoint: str | None = Field(default=None, max_length=MAX_URI, description="Base URL of the OpenAI-compatible API.")
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        max_length=256,
        description="State of each adapter.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    adapters_ready: str | None = Field(default=None, max_length=32, description='"loaded/wanted", for printer columns.')
    selector: str | None = Field(
        default=None,
        max_length=1024,
        description="Label selector of the serving pods, for the scale subresource (what an autoscaler counts).",
    )


class AdapterDeployment(ApiModel):
    """A served base model with hot-swapped LoRA adapters behind an OpenAI-compatible endpoint."""

    # `kubectl scale` and HorizontalPodAutoscalers drive spec.replicas through /scale.
    scale: ClassVar = ScaleSubresource(
        spec_replicas_path=".spec.replicas",
        status_replicas_path=".status.replicas",
        label_selector_path=".status.selector",
    )
    model_config = {**ApiModel.model_config, "extra": "allow"}
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None
