"""Building blocks shared by every kubetune API type.

Every field is defined once, here and in the kind modules. The CRD YAML is generated from these
models (see `crdgen`), the operator parses objects with them and the trainer parses its config
with them, so a field cannot mean two things in two places.
"""

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetJsonSchemaHandler, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from .rules import Rule as Rule  # re-exported: Rule and MAX_URI have always been importable from here
from .uris import MAX_URI as MAX_URI
from .uris import uri_rules

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds on strings and lists keep the API server's CEL cost estimate finite: without a
# maxLength every rule that compares whole objects is rejected as too expensive.
MAX_NAME = 253
MAX_SHORT = 63


class ApiModel(BaseModel):
    """Base for every API struct: camelCase on the wire, unknown fields rejected (as the API
    server's strict field validation does), cross-field rules checked after parsing."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=False
    )
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.user_message(self))
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.cel_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.cel_rules]
        return schema

    def to_wire(self) -> dict[str, Any]:
        """The object in its wire format: camelCase, unset optionals left out (defaults kept)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def section(model: type[ApiModel], description: str) -> Any:
    """A nested block whose fields all have defaults: present when omitted, so CEL rules can read
    its fields without `has()`. The CRD default spells out every nested default, because the API
    server checks a default against the block's own rules as written, before nested defaulting."""
    defaults = {key: value for key, value in model().to_wire().items() if value not in ({}, [])}
    return Field(default_factory=model, description=description, json_schema_extra={"default": defaults})


def rule_field_path(message: str) -> str | None:
    """The fieldPath of the rule that produced `message` (offline errors name the same field as
    the API server does)."""
    return _rule_paths().get(message)


def _rule_paths() -> dict[str, str]:
    paths, pending = {}, list(ApiModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        paths.update({rule.message: rule.field_path for rule in model.cel_rules if rule.field_path})
    return paths


# --- Quantities -------------------------------------------------------------------------------

QUANTITY_RE = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 8, 500m, 64Gi)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_RE.pattern,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

_BINARY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIX = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}


def parse_quantity(value: int | str) -> float:
    """A Kubernetes quantity as a number (bytes for memory, cores for CPU)."""
    if isinstance(value, int):
        return float(value)
    match = re.match(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$", value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix in _BINARY_SUFFIX:
        return number * _BINARY_SUFFIX[suffix]
    if suffix in _DECIMAL_SUFFIX:
        return number * _DECIMAL_SUFFIX[suffix]
    raise ValueError(f"{value!r} has an unknown suffix {suffix!r}")


# --- Types shared by both kinds ----------------------------------------------------------------

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SecretRef(ApiModel):
    """A Secret in the object's namespace whose keys become environment variables of the pods
    (for example HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN, max_length=MAX_NAME)


class ModelSource(ApiModel):
    """Where the base model's weights and tokenizer are read from."""

    uri: str = Field(
        description=(
            "hf://ORG/NAME (Hugging Face Hub), pvc://CLAIM/PATH (a PersistentVolumeClaim in the "
            "namespace, mounted read-only), s3://BUCKET/PATH, or file:///PATH (local runs only)."
        ),
        min_length=1,
        max_length=MAX_URI,
    )
    revision: str | None = Field(
        default=None, description="Branch, tag or commit for hf:// models (default: main).", max_length=MAX_NAME
    )
    secret_ref: SecretRef | None = Field(default=None, description="Credentials for private models or buckets.")

    cel_rules: ClassVar = uri_rules("uri", "uri")


class Toleration(ApiModel):
    """A toleration copied onto the pods, as in core/v1 (GPU pools are usually tainted)."""

    key: str | None = Field(default=None, max_length=MAX_NAME, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=MAX_SHORT, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Placement(ApiModel):
    """Per-pod resources and node placement, shared by training pods and serving replicas."""

    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        max_length=MAX_NAME,
        description="Extended resource name of the GPUs (e.g. amd.com/gpu).",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod.")
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the pods require (e.g. nvidia.com/gpu.product).",
        json_schema_extra={"additionalProperties": {"type": "string", "maxLength": MAX_NAME}, "maxProperties": 64},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations for tainted GPU pools."
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """An observation of one aspect of the object's state, following the Kubernetes API conventions."""

    type: str = Field(description="Condition type, e.g. Admitted, Running, Succeeded.", max_length=316)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        description="One CamelCase word a program can switch on.",
        max_length=1024,
        pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$",
    )
    message: str = Field(default="", description="What happened, for a person.", max_length=32768)
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was computed from."
    )
    last_transition_time: datetime | None = Field(default=None, description="When status last changed.")


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        description="The truth about the object's state; `phase` only summarises it.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
