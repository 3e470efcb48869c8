"""`kubetune serve`: the process. The API answers at once (`/live`), the model, the command-line
adapters and those of the adapters file load in the background, and `/health` (also `/ready`) turns
200 once all are loaded. If the model or a command-line adapter fails to load, the process exits 1,
so its pod restarts and its logs say why; an adapter of the adapters file that fails is reported on
/health and the others serve. The adapters file is then polled for changes.

Access (see `access`, `sources`, `loads`): `--admin-key-file` protects loading and unloading,
`--api-key-file`/`--api-key` inference (and is accepted for admin too); without either key, runtime
loads are refused unless `--allow-unauthenticated-admin`. A runtime load must name a URI below an
`--allow-source` prefix (none: every runtime load is refused); it runs in a pool of
`--max-concurrent-loads` with a deadline of `--load-timeout` seconds and a cap of
`--max-adapter-bytes`. Up to `--max-num-seqs` requests are generated together (continuous
batching, see `batching`). Requests are capped by `--max-request-bytes`, `--max-sequences-per-request`
and `--max-queued-requests` (waiting generations; 429 past it); /health answers 503 when
generation makes no progress for `--stall-timeout` seconds."""

from __future__ import annotations

import argparse
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

from kubetune.api.uris import uri_problem
from kubetune.logs import log

from .sources import ADAPTER_SCHEMES, parse_prefixes, prefix_problem

_NAME = re.compile(r"^[^\s=]{1,256}$")


def parse_allowed_sources(values: list[str]) -> tuple[str, ...]:
    """--allow-source prefixes (each one a valid adapter URI); ValueError says which is not."""
    prefixes = parse_prefixes(values)
    for prefix in prefixes:
        problem = prefix_problem(prefix)
        if problem:
            raise ValueError(f"--allow-source: {problem}")
    return prefixes


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
        problem = uri_problem(uri, ADAPTER_SCHEMES)
        if problem:
            raise ValueError(f"--adapter {name}: {problem}")
        adapters.append((name, uri))
    if len(adapters) > max_adapters:
        raise ValueError(f"{len(adapters)} adapters given but --max-adapters is {max_adapters}")
    return adapters


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kubetune.logs import quiet_libraries
    from kubetune.storage import local_cache

    from .access import from_args
    from .adapters_file import AdaptersFileSync
    from .app import Limits, Startup, create_app
    from .engine import Engine
    from .loads import Loads
    from .metrics import ServingMetrics

    adapters = parse_adapters(args.adapter, args.max_adapters)
    allowed = parse_allowed_sources(args.allow_source)
    access = from_args(args.admin_key_file, args.api_key_file, args.api_key, args.allow_unauthenticated_admin)
    quiet_libraries()
    engine = Engine(
        args.model,
        args.served_model_name or default_served_name(args.model),
        cache_dir=Path(args.cache_dir) if args.cache_dir else local_cache() / "inputs",
        max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank,
        device=args.device,
        dtype=args.dtype,
        max_adapter_bytes=args.max_adapter_bytes,
        max_queued=args.max_queued_requests,
        max_running=args.max_num_seqs,
    )
    metrics = ServingMetrics()
    loads = Loads(engine, allowed, max_concurrent=args.max_concurrent_loads, timeout=args.load_timeout)
    limits = Limits(
        max_request_bytes=args.max_request_bytes,
        max_sequences=args.max_sequences_per_request,
        stall_timeout=args.stall_timeout,
    )
    adapters_file = None
    if args.adapters_file:
        adapters_file = AdaptersFileSync(engine, Path(args.adapters_file), metrics, args.adapters_file_interval)
    startup = Startup(engine, adapters, metrics, adapters_file)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, metrics, startup, access=access, loads=loads, limits=limits),
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
        allowed_sources=list(allowed),
        admin_key=bool(access.admin),
        api_key=bool(access.api),
        unauthenticated_admin=args.allow_unauthenticated_admin,
    )
    loader = threading.Thread(target=load, name="kubetune-load", daemon=True)
    loader.start()
    server.run()
    stop.set()
    loader.join(timeout=1)
    return 1 if startup.error else 0
