"""The example manifests and, for the invalid ones, what must reject them and with which words.

Each file in examples/invalid/ starts with comment lines:
  # rejected-by: admission | validation   (the API server's schema/CEL, or kubetune's semantic checks)
  # expect: TEXT            (both `kubetune validate` and, for admission, the API server say TEXT)
  # expect-offline: TEXT    (only `kubetune validate`)
  # expect-server: TEXT     (only the API server)
"""

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@dataclass
class InvalidExample:
    path: Path
    rejected_by: str
    offline: list[str] = field(default_factory=list)
    server: list[str] = field(default_factory=list)


def valid_examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def invalid_examples() -> list[InvalidExample]:
    return [read_invalid(path) for path in sorted((EXAMPLES / "invalid").glob("*.yaml"))]


def read_invalid(path: Path) -> InvalidExample:
    example = InvalidExample(path, rejected_by="")
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line.lstrip("# ").partition(": ")
        if key == "rejected-by":
            example.rejected_by = value
        elif key == "expect":
            example.offline.append(value)
            example.server.append(value)
        elif key == "expect-offline":
            example.offline.append(value)
        elif key == "expect-server":
            example.server.append(value)
    if example.rejected_by not in ("admission", "validation") or not example.offline:
        raise ValueError(f"{path}: needs '# rejected-by: admission|validation' and an '# expect' line")
    return example
