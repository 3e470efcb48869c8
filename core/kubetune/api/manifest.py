"""Reading kubetune objects from YAML: schema, cross-field rules and semantic checks in one pass.

Files are read with `yamlsafe` (size, depth and alias limits); every way a file can be wrong is a
ValueError with one line (`ManifestError`, or the problems of a document), never another exception.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .adapterdeployment import AdapterDeployment
from .common import API_VERSION, rule_field_path
from .finetunejob import FineTuneJob
from .kinds import BY_KIND
from .validation import Problem, validate, validate_metadata
from .yamlsafe import ManifestError, load_path


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
    """Parse and validate one object the way the API server and the operator together would.
    Never raises: whatever `doc` is, what is wrong with it comes back as problems."""
    if not isinstance(doc, dict):
        return Checked(
            "", "", problems=[Problem("(document)", f"expected a mapping with apiVersion and kind, not {_shown(doc)}")]
        )
    kind = doc.get("kind", "")
    metadata = doc.get("metadata")
    name = metadata.get("name", "") if isinstance(metadata, dict) else ""
    kind, name = kind if isinstance(kind, str) else "", name if isinstance(name, str) else ""
    if doc.get("apiVersion") != API_VERSION or kind not in BY_KIND:
        return Checked(
            kind,
            name,
            problems=[
                Problem("apiVersion/kind", f"not a kubetune object ({_shown(doc.get('apiVersion'))}/{_shown(kind)})")
            ],
        )
    naming = validate_metadata(kind, metadata, local)
    try:
        obj = BY_KIND[kind].model.model_validate(doc)
    except ValidationError as error:
        return Checked(kind, name, problems=naming + [p for p in problems_from(error) if p.path != "metadata.name"])
    except (ValueError, TypeError, RecursionError) as error:  # a check that met a value it did not expect
        return Checked(kind, name, problems=[Problem("(object)", f"cannot be read: {_one_line(error)}")])
    assert isinstance(obj, FineTuneJob | AdapterDeployment)
    return Checked(kind, name, obj, naming + validate(obj, local))


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


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


def load_documents(path: Path) -> list[Any]:
    """The non-empty documents of a manifest file, read within `yamlsafe`'s limits; ManifestError
    (a ValueError) for a file that is unreadable as YAML."""
    return load_path(path)


def check_file(path: Path, local: bool = False) -> list[Checked]:
    """Every document of the file, parsed and validated (a document that is no kubetune object is
    reported as such, not skipped)."""
    return [parse(doc, local) for doc in load_documents(path)]


def load_one(path: Path, kind: str, local: bool = False) -> Any:
    """The single object of `kind` in a manifest (other documents, such as the AdapterDeployment
    that serves it, are left alone), validated; raises ManifestError (a ValueError) saying in one
    line what is wrong: the file, the number of objects of `kind`, or the object's problems."""
    checked = check_file(path, local)
    if not checked:
        raise ManifestError(f"{path}: no objects found; expected one {kind}")
    matches = [c for c in checked if c.kind == kind]
    if len(matches) != 1:
        raise ManifestError(f"{path}: expected exactly one {kind}, found {len(matches)} in {len(checked)} document(s)")
    (one,) = matches
    if not one.ok:
        raise ManifestError(
            f"{path}: {kind} {one.name!r} is invalid: "
            + "; ".join(str(p) for p in one.problems[:10])
            + ("; ..." if len(one.problems) > 10 else "")
        )
    return one.obj
