"""Generate CustomResourceDefinitions from the pydantic models.

pydantic writes JSON Schema with `$ref`s, nullable unions and titles; the API server wants a
structural schema: every node typed, everything inlined, optional fields simply not required.
`structural()` does that translation; `crd()` wraps a kind's schema in its CRD. The output is
deterministic so `crds/` can be checked for drift.

Which API versions a CRD serves, and which one etcd stores, is the table `VERSIONS`
(helm/kubetune/UPGRADING.md is the policy: how v1beta1 is added beside v1alpha1, stored, and
v1alpha1 retired). Every version is generated from the same models, so the conversion between them
is the API server's own (strategy None: only apiVersion changes); a renamed field will need a
conversion webhook, which `crd()` refuses until the operator has one.
"""

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .common import API_VERSION, GROUP, VERSION
from .kinds import KINDS, KindInfo
from .names import name_rules
from .subresources import ScaleSubresource

# Keys a structural schema may carry, in the order they are written (so the YAML reads like
# hand-written CRDs: type and description first); pydantic's other keys (title, ...) are dropped.
_ORDER = (
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-validations",
)
_KEPT = set(_ORDER)


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
    node = _openapi_v3_bounds(_inline(node, defs))
    if node.get("x-kubernetes-int-or-string"):
        return _ordered({k: v for k, v in node.items() if k in _KEPT})
    if "const" in node:
        node = {**node, "enum": [node.pop("const")]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: structural(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if value is True:  # dict[str, Any]: deliberately free-form
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = structural(value, defs)
        else:
            out[key] = value
    if "type" not in out and "enum" in out:
        out["type"] = _enum_type(out["enum"])
    if out.get("type") == "object" and not out.get("properties"):
        out.pop("properties", None)
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    return {key: node[key] for key in _ORDER if key in node}


def _openapi_v3_bounds(node: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema 2020 writes `exclusiveMinimum: 0`; OpenAPI v3.0 (the CRD dialect) writes
    `minimum: 0, exclusiveMinimum: true`."""
    node = dict(node)
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if exclusive in node and not isinstance(node[exclusive], bool):
            node[bound] = node[exclusive]
            node[exclusive] = True
    return node


def _inline(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve $ref / allOf / Optional[...] until the node stands alone. Sibling keys of a
    reference (the field's own description, default, rules) win over the referenced model's."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        rules = target.get("x-kubernetes-validations", []) + node.pop("x-kubernetes-validations", [])
        node = {**_inline(target, defs), **node}
        if rules:
            node["x-kubernetes-validations"] = rules
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {branches} structurally")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**_inline(branches[0], defs), **rest}
    return node


def _enum_type(values: list[Any]) -> str:
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return "string"
    if kinds <= {int}:
        return "integer"
    raise ValueError(f"mixed enum {values}")


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def subresources(info: KindInfo) -> dict[str, Any]:
    """Every kind has the status subresource (only the operator writes status); a kind whose model
    declares `scale` (a `ScaleSubresource`) also gets the scale subresource."""
    out: dict[str, Any] = {"status": {}}
    scale = getattr(info.model, "scale", None)
    if isinstance(scale, ScaleSubresource):
        out["scale"] = scale.to_crd()
    return out


@dataclass(frozen=True)
class ApiVersion:
    """One entry of a CRD's spec.versions. `served`: clients can read and write through it;
    `storage`: the form objects are kept in etcd (exactly one version); `deprecated` with a
    `deprecation_warning`: the API server answers every request through it with that warning."""

    name: str
    served: bool = True
    storage: bool = False
    deprecated: bool = False
    deprecation_warning: str | None = None


# Served and stored today. Adding v1beta1: a second row, served, storage still on v1alpha1 for at
# least one release; then storage moves (UPGRADING.md). VERSION (what the operator reads and writes
# through) stays served as long as the operator uses it.
VERSIONS: tuple[ApiVersion, ...] = (ApiVersion(VERSION, served=True, storage=True),)

# spec.conversion.strategy: "None" is right only while every version has the same schema, which
# holds by construction here (one set of models). "Webhook" waits for the operator to serve one.
CONVERSION = "None"
CONVERSION_STRATEGIES = ("None",)

# Kubernetes version names (v1, v1beta2, v2alpha1): the API server sorts them by this form.
_VERSION_NAME = re.compile(r"^v[1-9][0-9]*((alpha|beta)[1-9][0-9]*)?$")
# The API server's limit on a version's deprecationWarning.
MAX_DEPRECATION_WARNING = 256


class VersionTableError(ValueError):
    """The version table cannot become a CRD the API server (or the operator) accepts."""


def check_versions(versions: Sequence[ApiVersion], conversion: str = CONVERSION) -> None:
    """Refuse, with one sentence, a version table the API server would reject or that would strand
    stored objects: one storage version, served; the operator's own version served; names unique
    and in Kubernetes form; warnings only on deprecated versions; a conversion we can honour."""
    if not versions:
        raise VersionTableError("a CRD needs at least one version")
    names = [v.name for v in versions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VersionTableError(f"version {', '.join(duplicates)} is listed twice")
    for v in versions:
        if not _VERSION_NAME.match(v.name):
            raise VersionTableError(f"version {v.name!r} is not a Kubernetes version name (v1, v1beta1, v2alpha1)")
        if v.deprecation_warning is not None and not v.deprecated:
            raise VersionTableError(f"version {v.name} has a deprecationWarning but is not deprecated")
        if v.deprecation_warning is not None and len(v.deprecation_warning) > MAX_DEPRECATION_WARNING:
            raise VersionTableError(f"the deprecationWarning of {v.name} is over {MAX_DEPRECATION_WARNING} characters")
    stored = [v.name for v in versions if v.storage]
    if len(stored) != 1:
        found = ", ".join(stored) if stored else "none"
        raise VersionTableError(f"exactly one version must be the storage version; found {len(stored)} ({found})")
    storage = next(v for v in versions if v.storage)
    if not storage.served:
        raise VersionTableError(f"the storage version {storage.name} must be served")
    if not any(v.name == VERSION and v.served for v in versions):
        raise VersionTableError(f"{VERSION} must stay served: the operator reads and writes through it")
    if conversion not in CONVERSION_STRATEGIES:
        raise VersionTableError(
            f"conversion strategy {conversion!r} is not generated: the operator serves no conversion webhook "
            f"(helm/kubetune/UPGRADING.md); use one of {', '.join(CONVERSION_STRATEGIES)}"
        )


def version_entry(info: KindInfo, version: ApiVersion, root: dict[str, Any]) -> dict[str, Any]:
    """One spec.versions item: the flags, then what every version shares (subresources, columns,
    schema), so a second version differs from the first only where the table says it does."""
    entry: dict[str, Any] = {"name": version.name, "served": version.served, "storage": version.storage}
    if version.deprecated:
        entry["deprecated"] = True
        if version.deprecation_warning is not None:
            entry["deprecationWarning"] = version.deprecation_warning
    schema = copy.deepcopy(root)  # its own copy: YAML would otherwise alias a shared schema (&id001)
    schema["properties"]["apiVersion"]["description"] = f"{GROUP}/{version.name}"
    entry["subresources"] = subresources(info)
    entry["additionalPrinterColumns"] = [dict(c) for c in info.printer_columns]
    entry["schema"] = {"openAPIV3Schema": schema}
    return entry


def crd(info: KindInfo, versions: Sequence[ApiVersion] = VERSIONS, conversion: str = CONVERSION) -> dict[str, Any]:
    """The CRD of one kind, serving every version of `versions`. With more than one version the
    conversion strategy is written out (the API server would default it to None silently)."""
    check_versions(versions, conversion)
    spec_schema = schema_of(info.spec_model)
    status_schema = schema_of(info.status_model)
    root = {
        "type": "object",
        "description": (info.model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": API_VERSION},
            "kind": {"type": "string", "description": info.kind},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        # metadata.name is the one part of metadata a CRD's rules may read: names the operator
        # could not give the object's children are refused here, as `kubetune validate` does.
        "x-kubernetes-validations": name_rules(info.kind),
    }
    spec: dict[str, Any] = {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "kind": info.kind,
            "listKind": f"{info.kind}List",
            "plural": info.plural,
            "singular": info.kind.lower(),
            "shortNames": list(info.short_names),
            "categories": ["kubetune"],
        },
    }
    if len(versions) > 1:
        spec["conversion"] = {"strategy": conversion}
    spec["versions"] = [version_entry(info, v, root) for v in versions]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": spec,
    }


class _Dumper(yaml.SafeDumper):
    """Quotes strings that a YAML 1.2 reader (kubectl, the API server) would take for numbers,
    such as the learning rate "2e-4", which PyYAML's YAML 1.1 rules leave bare."""


_NUMBER_LIKE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if _NUMBER_LIKE.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)

HEADER = "# Generated by `kubetune crds` from the pydantic models in kubetune.api. Do not edit.\n"


def render(info: KindInfo, versions: Sequence[ApiVersion] = VERSIONS, conversion: str = CONVERSION) -> str:
    return HEADER + yaml.dump(crd(info, versions, conversion), Dumper=_Dumper, sort_keys=False, width=120)


def render_all() -> str:
    """Every CRD as one multi-document YAML stream (what `kubetune crds` prints)."""
    return "---\n".join(render(info) for info in KINDS)


def file_name(info: KindInfo) -> str:
    return f"{GROUP}_{info.plural}.yaml"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for info in KINDS:
        path = directory / file_name(info)
        path.write_text(render(info))
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Files in `directory` that differ from what the models generate (empty when up to date)."""
    return [
        file_name(info)
        for info in KINDS
        if not (directory / file_name(info)).exists() or (directory / file_name(info)).read_text() != render(info)
    ]
