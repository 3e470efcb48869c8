"""Generate CustomResourceDefinitions from the pydantic models.

pydantic writes JSON Schema with `$ref`s, nullable unions and titles; the API server wants a
structural schema: every node typed, everything inlined, optional fields simply not required.
`structural()` does that translation; `crd()` wraps a kind's schema in its CRD. The output is
deterministic so `crds/` can be checked for drift.
"""

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .common import GROUP, VERSION
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


def crd(info: KindInfo) -> dict[str, Any]:
    spec_schema = schema_of(info.spec_model)
    status_schema = schema_of(info.status_model)
    root = {
        "type": "object",
        "description": (info.model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": info.kind},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        # metadata.name is the one part of metadata a CRD's rules may read: names the operator
        # could not give the object's children are refused here, as `kubetune validate` does.
        "x-kubernetes-validations": name_rules(info.kind),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
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
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources(info),
                    "additionalPrinterColumns": [dict(c) for c in info.printer_columns],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
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


def render(info: KindInfo) -> str:
    return HEADER + yaml.dump(crd(info), Dumper=_Dumper, sort_keys=False, width=120)


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
