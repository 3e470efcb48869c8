"""`kubetune serve`: the process. The API answers at once (`/live`), the model, the command-line
adapters and those of the adapters file load in the background, and `/health` (also `/ready`) turns
200 once all are loaded. If the model or a command-line adapter fails to load, the process exits 1,
so its pod restarts and its logs say why; an adapter of the adapters file that fails is reported on
/health and the others serve. The adapters file is then polled for changes."""

from __future__ import annotations

import argparse
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

from kubetune.logs import log

_NAME = re.compile(r"^[^\s=]{1,256}$")


def default_served_name(model_uri: str) -> str:
    """hf://ORG/NAME is served as ORG/NAME (as vLLM names Hub models); anything else as written."""
    parsed = urlparse(model_uri)
    if parsed.scheme == "hf":
        parts = [parsed.netloc, *[p for p in parsed.path.split("/") if p]]
        if parts[0] == "models":
            parts.pop(0)
        if len(parts) >= 2:
            return f"{parts[0]}/{parts[1]}"
    return model_uri


def parse_adapters(pairs: list[str], max_adapters: int) -> list[tuple[str, str]]:
    """NAME=URI pairs, each name once, no more than `max_adapters`; ValueError says what is wrong."""
    adapters: list[tuple[str, str]] = []
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not _NAME.match(name) or not uri:
            raise ValueError(f"--adapter {pair!r}: write NAME=URI, e.g. support-v1=pvc://adapters/support")
        if name in dict(adapters):
            raise ValueError(f"--adapter {name} is given twice")
        adapters.append((name, uri))
    if len(adapters) > max_adapters:
        raise ValueError(f"{len(adapters)} adapters given but --max-adapters is {max_adapters}")
    return adapters


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kubetune.logs import quiet_libraries
    from kubetune.storage import local_cache

    from .adapters_file import AdaptersFileSync
    from .app import Startup, create_app
    from .engine import Engine
    from .metrics import ServingMetrics

    adapters = parse_adapters(args.adapter, args.max_adapters)
    quiet_libraries()
    engine = Engine(
        args.model,
        args.served_model_name or default_served_name(args.model),
        cache_dir=Path(args.cache_dir) if args.cache_dir else local_cache() / "inputs",
        max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank,
        device=args.device,
        dtype=args.dtype,
    )
    metrics = ServingMetrics()
    adapters_file = None
    if args.adapters_file:
        adapters_file = AdaptersFileSync(engine, Path(args.adapters_file), metrics, args.adapters_file_interval)
    startup = Startup(engine, adapters, metrics, adapters_file)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, metrics, startup),
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=30,
        )
    )

    stop = threading.Event()

    def load() -> None:
        try:
            startup.run()
        except Exception:  # logged by Startup; exit so that the pod restarts
            server.should_exit = True
            return
        if adapters_file is not None:
            adapters_file.run(stop)

    log(
        "starting",
        model=engine.served_name,
        uri=args.model,
        host=args.host,
        port=args.port,
        adapters=[name for name, _ in adapters],
        adapters_file=args.adapters_file,
        max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank,
    )
    loader = threading.Thread(target=load, name="kubetune-load", daemon=True)
    loader.start()
    server.run()
    stop.set()
    loader.join(timeout=1)
    return 1 if startup.error else 0
