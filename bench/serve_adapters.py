"""Serving throughput with many LoRA adapters: the base model alone against 1, 4 and 16 adapters.

Starts `kubetune serve` on the tiny model (or --model) with no adapter, measures the base, then
loads 16 LoRA adapters at runtime through /v1/load_lora_adapter (random-init PEFT weights, a
different seed each, so they differ; made offline, nothing trained) and measures the base again
and requests spread round-robin over 1, 4 and 16 adapters. Each configuration gets the same
greedy /v1/completions requests from a pool of client threads, after a warm-up request per model;
the table reports requests/s, generated tokens/s, latency percentiles, and requests/s as a ratio
of the first row (> 1: faster than the base model alone). All of it --rounds times (the adapters
unloaded and loaded again each round); each configuration keeps its best round.

    .venv/bin/python bench/serve_adapters.py [--requests 64] [--concurrency 4] [--max-tokens 16]
                                             [--rounds 3] [--model DIR]
"""

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = 16
PROMPT = "<|im_start|>user\nHow long are backups kept?<|im_end|>\n<|im_start|>assistant\n"


def make_adapters(model: Path, out: Path, count: int, rank: int = 8) -> list[Path]:
    """`count` LoRA adapters of `model` with PEFT's random init of both A and B (so each one changes
    the output), seeds 0..count-1; saved as PEFT writes them (adapter_config.json + safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )
        path = out / f"adapter-{seed:02d}"
        get_peft_model(base, config).save_pretrained(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


API_KEY = "kubetune-bench"  # the api key also opens loading and unloading


def start_server(model: Path, port: int, log: Path, adapters: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "kubetune",
        "serve",
        "--model",
        str(model),
        "--served-model-name",
        "base",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-adapters",
        str(ADAPTERS),
        "--cache-dir",
        str(log.parent / "cache"),
        "--api-key",
        API_KEY,
        "--allow-source",
        f"file://{adapters}/",
    ]
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_until_ready(client: httpx.Client, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            sys.exit(f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)


def complete(client: httpx.Client, model: str, max_tokens: int) -> tuple[float, int]:
    """One greedy completion: its latency in seconds and the tokens it generated."""
    started = time.perf_counter()
    response = client.post(
        "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        sys.exit(f"{model}: HTTP {response.status_code}: {response.text}")
    return seconds, response.json()["usage"]["completion_tokens"]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def measure(client: httpx.Client, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    for model in models:  # warm-up: one request per model, not counted
        complete(client, model, max_tokens)
    names = [models[i % len(models)] for i in range(requests)]  # round-robin
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda model: complete(client, model, max_tokens), names))
    seconds = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    return {
        "rps": requests / seconds,
        "tps": sum(tokens for _, tokens in results) / seconds,
        "p50": 1000 * percentile(latencies, 0.5),
        "p99": 1000 * percentile(latencies, 0.99),
    }


def keep(best: dict, label: str, result: dict) -> None:
    if label not in best or result["rps"] > best[label]["rps"]:
        best[label] = result


def load_adapters(client: httpx.Client, names: list[str], paths: list[Path]) -> float:
    """Load the adapters through the API; the seconds it took."""
    started = time.perf_counter()
    for name, path in zip(names, paths, strict=True):
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"file://{path}"})
        if response.status_code != 200:
            sys.exit(f"loading {name}: HTTP {response.status_code}: {response.text}")
    return time.perf_counter() - started


def unload_adapters(client: httpx.Client, names: list[str]) -> None:
    for name in names:
        response = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code != 200:
            sys.exit(f"unloading {name}: HTTP {response.status_code}: {response.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads sending them")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations; each keeps its best")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-serve-"))
    server = None
    try:
        if args.model:
            model = args.model.resolve()
        else:
            from kubetune_trainer.tiny_model import build_tiny_model

            model = build_tiny_model(work / "tiny")
        adapters = make_adapters(model, work / "adapters", ADAPTERS)
        log = work / "serve.log"
        port = free_port()
        server = start_server(model, port, log, work / "adapters")
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=600,
            limits=httpx.Limits(max_connections=args.concurrency + 1),
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as client:
            wait_until_ready(client, server, log)
            names = [f"adapter-{i:02d}" for i in range(ADAPTERS)]
            configurations = [
                ("base, 16 adapters loaded", ["base"]),
                ("1 adapter", names[:1]),
                ("4 adapters", names[:4]),
                ("16 adapters", names),
            ]
            best: dict[str, dict] = {}
            loads = []  # seconds to load the 16 adapters, each round
            # Rounds alternate the configurations and each keeps its best round, so a busy moment
            # on a shared machine does not decide a ratio.
            for _ in range(args.rounds):
                keep(
                    best,
                    "base, no adapter loaded",
                    measure(client, ["base"], args.requests, args.concurrency, args.max_tokens),
                )
                loads.append(load_adapters(client, names, adapters))
                for label, models in configurations:
                    keep(best, label, measure(client, models, args.requests, args.concurrency, args.max_tokens))
                unload_adapters(client, names)

        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
        print(
            f"\nkubetune serve, {model.name}, {device}: {args.requests} greedy /v1/completions per configuration "
            f"(max_tokens {args.max_tokens}, {args.concurrency} concurrent clients), best of {args.rounds} rounds; "
            f"LoRA r=8 on q/k/v/o; loading the {ADAPTERS} adapters through the API took {loads[0]:.2f} s "
            "the first time" + (f", {min(loads[1:]):.2f} s later" if len(loads) > 1 else "") + "\n"
        )
        print("| config | requests/s | tokens/s | p50 latency ms | p99 latency ms | requests/s vs base |")
        print("|---|---:|---:|---:|---:|---:|")
        base = best["base, no adapter loaded"]["rps"]
        for label, r in best.items():
            print(
                f"| {label} | {r['rps']:.1f} | {r['tps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                f"{r['rps'] / base:.2f} |"
            )
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
