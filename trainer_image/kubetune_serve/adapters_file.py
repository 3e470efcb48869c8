"""The adapters file: the adapters a replica should serve, as the operator last wrote them.

The operator keeps the AdapterDeployment's wanted adapters in a ConfigMap that every replica mounts;
`kubetune serve --adapters-file` loads that set before it reports ready and re-reads the file when
it changes. So a replica that starts (or restarts) while the operator is away still comes up with
every adapter, and the Service never routes a request for an adapter to a replica without it.

The file's format is defined with the API (`kubetune.api.adaptersfile`), which the
operator writes with.

The operator also loads and unloads through the HTTP API (that is faster than the kubelet's refresh
of a mounted ConfigMap, which can take a minute). Both paths converge on the same set, so the file
sync applies only what changed in the file since it last read it: an adapter loaded through the
API is left alone until the file says otherwise. A load the engine refuses is remembered with its
message (`failed`) and not retried until the file changes that adapter.

The file is the deployment's own configuration, so its paths skip the runtime allow-list
(`--allow-source`), but not the URI rule nor the size cap: a path the API would refuse as a URI is
reported as failed here too.

A merged adapter's entry (a `merge` block: method, source URIs, weights, density) reads as its
`merge:` path, so it is followed like any other: built when it appears, rebuilt in place when its
sources or weights change, and a merge the engine refuses is in `failed` with the engine's one line.
"""

from __future__ import annotations

import threading
from pathlib import Path

from kubetune.api.adaptersfile import parse_adapters_file
from kubetune.logs import log

from .engine import Engine, EngineError
from .metrics import ServingMetrics


class AdaptersFileSync:
    """Applies the adapters file to an engine: once before the server is ready, then on every change."""

    def __init__(self, engine: Engine, path: Path, metrics: ServingMetrics, interval: float = 2.0):
        self.engine, self.path, self.metrics, self.interval = engine, Path(path), metrics, interval
        self.applied: dict[str, str] = {}  # the file's adapters as last applied
        self.failed: dict[str, str] = {}  # name → why the engine refused the file's path for it
        self.error: str | None = None  # why the file could not be used (kept: the last good set stays)
        self._seen = ""  # no file and an empty one both mean no adapters: nothing to apply

    def read(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return ""  # the ConfigMap is optional: no file yet means no adapters yet
        except OSError as error:
            log("adapters_file_unreadable", path=str(self.path), error=str(error))
            raise ValueError(f"cannot read it ({type(error).__name__})") from None

    def sync_once(self) -> bool:
        """Reads the file; when it changed, unloads what it dropped and loads what it added or moved.
        True when a change was applied."""
        try:
            text = self.read()
            if text == self._seen:
                return False
            self._seen = text
            desired = parse_adapters_file(text)
        except ValueError as error:
            self.error = f"{self.path.name}: {error}"
            log("adapters_file_invalid", path=str(self.path), error=str(error))
            return False
        self.error = None
        self.failed = {name: message for name, message in self.failed.items() if name in desired}
        self._unload_dropped(desired)
        for name, path in desired.items():
            if self.applied.get(name) != path:  # new or moved; an unchanged entry was dealt with before
                self._load(name, path)
        self.applied = desired
        self.metrics.loaded(self.engine.adapters())
        log(
            "adapters_file_applied",
            path=str(self.path),
            adapters=sorted(desired),
            loaded=sorted(self._loaded()),
            failed=sorted(self.failed),
        )
        return True

    def run(self, stop: threading.Event) -> None:
        """Polls the file until `stop` is set (a mounted ConfigMap changes by a symlink swap, which
        file watchers report unreliably; a stat and a read every few seconds cost nothing)."""
        while not stop.wait(self.interval):
            try:
                self.sync_once()
            except Exception as error:  # noqa: BLE001 - the poller must outlive one bad sync
                log("adapters_file_sync_failed", error=f"{type(error).__name__}: {error}")

    def _loaded(self) -> dict[str, str]:
        return {adapter.name: adapter.uri for adapter in self.engine.adapters()}

    def _unload_dropped(self, desired: dict[str, str]) -> None:
        loaded = self._loaded()
        for name, path in self.applied.items():
            if desired.get(name) == path or loaded.get(name) != path:
                continue  # still wanted as it is, or since replaced through the API: not ours to drop
            if name in desired:
                continue  # moved to another path: the load below replaces it in place
            try:
                self.engine.unload_adapter(name)
                self.metrics.forget(name)
                log("adapter_unloaded", name=name, source="adapters-file")
            except EngineError as error:
                if error.status != 404:  # already gone (unloaded through the API): nothing to do
                    log("adapter_unload_failed", name=name, error=error.message)

    def _load(self, name: str, path: str) -> None:
        if self._loaded().get(name) == path:
            self.failed.pop(name, None)
            return
        try:
            self.engine.load_adapter(name, path, replace=True)
        except EngineError as error:
            if self._loaded().get(name) == path:  # loaded through the API meanwhile
                self.failed.pop(name, None)
                return
            self.failed[name] = error.message
            self.metrics.load_failed(error.reason or ("invalid" if error.status in (400, 422) else "not_allowed"))
            detail = getattr(error, "detail", error.message)
            log("adapter_load_failed", name=name, uri=path, error=detail, source="adapters-file")
            return
        self.failed.pop(name, None)
        log("adapter_loaded", name=name, uri=path, source="adapters-file")
