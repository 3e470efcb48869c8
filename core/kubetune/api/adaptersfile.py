"""The adapters file: the adapters each serving replica of an AdapterDeployment must have.

The operator writes it into the ConfigMap `<name>-adapters` (key `adapters.json`), which every
replica mounts; `kubetune serve --adapters-file` loads it before reporting ready and follows its
changes, and vLLM's start-up command turns it into `--lora-modules`. One JSON object:

    {"adapters": [{"name": "support-v1", "path": "pvc://adapters/run-1/adapter"}]}

`path` is what the runtime loads: the URI for the builtin runtime, a local path or Hub id for vLLM.

A merged adapter (builtin runtime only) has a `merge` block instead of a `path`: the method, the
resolved source URIs, one weight per source and the density, as the replica hands them to PEFT:

    {"name": "both", "merge": {"method": "ties", "sources": ["pvc://a/x", "pvc://a/y"],
                               "weights": [1.0, 0.5], "density": 0.5}}

`parse_adapters_file` gives it as the merge's canonical `merge:` path (`kubetune.api.merging`), the
string the replica loads and reports back, so the replica follows it as it follows any other path.
"""

import json
from typing import Any

from .merging import is_merge_path, parse_merge_path, plan_from_wire

CONFIGMAP_KEY = "adapters.json"
MOUNT_DIR = "/etc/kubetune/adapters"
PATH_IN_POD = f"{MOUNT_DIR}/{CONFIGMAP_KEY}"


def configmap_name(adapterdeployment: str) -> str:
    return f"{adapterdeployment}-adapters"


# The operator writes at most 256 adapters of a few hundred bytes each.
MAX_BYTES = 1 << 20


def parse_adapters_file(text: str) -> dict[str, str]:
    """name → path of the adapters the file lists (a merge's `merge:` path); ValueError says what is
    wrong with it (also for a file too large or nested too deep to be one the operator wrote)."""
    if not text.strip():
        return {}
    if len(text) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES // 1024} KiB")
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"not JSON: {error}") from None
    except RecursionError:
        raise ValueError("not JSON the operator writes: nested too deep") from None
    entries = document.get("adapters") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('expected {"adapters": [{"name": ..., "path": ...}, ...]}')
    adapters: dict[str, str] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and "merge" in entry and "path" not in entry:
            try:
                path = plan_from_wire(entry["merge"]).path
            except ValueError as error:
                raise ValueError(f"adapters[{index}].merge: {error}") from None
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"adapters[{index}]: needs a non-empty name and path (or a merge)")
        if name in adapters:
            raise ValueError(f"adapters[{index}]: {name} is listed twice")
        adapters[name] = path
    return adapters


def render_adapters_file(adapters: list[tuple[str, str]]) -> str:
    """The file's text for (name, path) pairs, as the operator writes it (stable: sorted keys); a
    `merge:` path is written as its merge block."""
    return json.dumps({"adapters": [file_entry(n, p) for n, p in adapters]}, indent=2, sort_keys=True) + "\n"


def file_entry(name: str, path: str) -> dict[str, Any]:
    if is_merge_path(path):
        return {"name": name, "merge": parse_merge_path(path).wire()}
    return {"name": name, "path": path}
