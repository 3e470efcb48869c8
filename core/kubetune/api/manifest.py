"""Reading kubetune objects from YAML: schema, cross-field rules and semantic checks in one pass."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .adapterdeployment import AdapterDeployment
from .common import API_VERSION, rule_field_path
from .finetunejob import FineTuneJob
from .kinds import BY_KIND
from .validation import Problem, validate


@dataclass
class Checked:
    """One document of a manifest and what is wrong with it (nothing, when `ok`)."""

    kind: str
    name: str
    obj: Any = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse(doc: Any, local: bool = False) -> Checked:
    """Parse and validate one object the way the API server and the operator together would."""
    if not isinstance(doc, dict):
        return Checked(
            "", "", problems=[Problem("(document)", f"expected a mapping with apiVersion and kind, not {doc!r:.40}")]
        )
    kind = doc.get("kind", "")
    name = (doc.get("metadata") or {}).get("name", "")
    if doc.get("apiVersion") != API_VERSION or kind not in BY_KIND:
        return Checked(
            kind, name, problems=[Problem("apiVersion/kind", f"not a kubetune object ({doc.get('apiVersion')}/{kind})")]
        )
    try:
        obj = BY_KIND[kind].model.model_validate(doc)
    except ValidationError as error:
        return Checked(kind, name, problems=problems_from(error))
    assert isinstance(obj, FineTuneJob | AdapterDeployment)
    return Checked(kind, name, obj, validate(obj, local))


def problems_from(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        path = _path(item["loc"])
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `kubectl explain` (fields are camelCase)"
        elif item["type"] == "missing":
            message = "required field is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
            path += rule_field_path(message) or ""
        problems.append(Problem(path, message))
    return problems


def _path(loc: tuple[int | str, ...]) -> str:
    """pydantic's ('spec', 'adapters', 0, 'uri') as kubectl writes it: spec.adapters[0].uri."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(object)"


def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as stream:
        try:
            return [doc for doc in yaml.safe_load_all(stream) if doc]
        except yaml.YAMLError as error:
            raise ValueError(f"not valid YAML: {error}") from None


def check_file(path: Path, local: bool = False) -> list[Checked]:
    return [parse(doc, local) for doc in load_documents(path)]


def load_one(path: Path, kind: str, local: bool = False) -> Any:
    """The single object of `kind` in a manifest, validated; raises ValueError listing the problems."""
    matches = [c for c in check_file(path, local) if c.kind == kind]
    if len(matches) != 1:
        raise ValueError(f"{path}: expected exactly one {kind}, found {len(matches)}")
    checked = matches[0]
    if not checked.ok:
        raise ValueError(
            f"{path}: {kind} {checked.name!r} is invalid:\n" + "\n".join(f"  {p}" for p in checked.problems)
        )
    return checked.obj
