"""The adapters file: the adapters each serving replica of an AdapterDeployment must have.

The operator writes it into the ConfigMap `<name>-adapters` (key `adapters.json`), which every
replica mounts; `kubetune serve --adapters-file` loads it before reporting ready and follows its
changes, and vLLM's start-up command turns it into `--lora-modules`. One JSON object:

    {"adapters": [{"name": "support-v1", "path": "pvc://adapters/run-1/adapter"}]}

`path` is what the runtime loads: the URI for the builtin runtime, a local path or Hub id for vLLM.
"""

import json

CONFIGMAP_KEY = "adapters.json"
MOUNT_DIR = "/etc/kubetune/adapters"
PATH_IN_POD = f"{MOUNT_DIR}/{CONFIGMAP_KEY}"


def configmap_name(adapterdeployment: str) -> str:
    return f"{adapterdeployment}-adapters"


# The operator writes at most 256 adapters of a few hundred bytes each.
MAX_BYTES = 1 << 20


def parse_adapters_file(text: str) -> dict[str, str]:
    """name → path of the adapters the file lists; ValueError says what is wrong with it (also
    for a file too large or nested too deep to be one the operator wrote)."""
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
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"adapters[{index}]: needs a non-empty name and path")
        if name in adapters:
            raise ValueError(f"adapters[{index}]: {name} is listed twice")
        adapters[name] = path
    return adapters


def render_adapters_file(adapters: list[tuple[str, str]]) -> str:
    """The file's text for (name, path) pairs, as the operator writes it (stable: sorted keys)."""
    return json.dumps({"adapters": [{"name": n, "path": p} for n, p in adapters]}, indent=2, sort_keys=True) + "\n"
