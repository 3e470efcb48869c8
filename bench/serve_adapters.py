"""Serving throughput with many LoRA adapters: batched against serial, the base model against 1, 4 and 16 adapters.

Builds the model of --preset (tiny: the test model; small: hidden 1024, 8 layers, as
bench/train_speed.py's small; both with the offline tokenizer) or takes --model, and starts two
`kubetune serve` processes on it: the baseline with `--max-num-seqs 1` (one request at a time, as the
runtime served before continuous batching) and ours (the default batch). The baseline measures the
base model; ours measures the base with no adapter, then loads 16 LoRA adapters at runtime through
/v1/load_lora_adapter (random-init PEFT weights, a different seed each, so they differ; made offline,
nothing trained) and measures the base again and requests spread round-robin over 1, 4 and 16
adapters (so a batch mixes them). Each configuration gets the same greedy /v1/completions requests
from --concurrency client threads, after a warm-up request per model; the table reports requests/s,
generated tokens/s, p50/p99 latency, and requests/s as ratios of the serial baseline and of the
batched base model alone. All of it --rounds times (the adapters unloaded and loaded again each
round); each configuration keeps its best round.

    .venv/bin/python bench/serve_adapters.py [--preset tiny|small|1b] [--requests 64] [--concurrency 8]
                                             [--max-tokens 16] [--rounds 3] [--model DIR] [--peft]

With --peft, PEFT's own mixed-adapter batch (transformers' generate with adapter_names, in-process)
is measured afterwards on the same model and adapters, for the GPU comparison the issue asks for.
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
BATCH = 32  # ours: the serving default
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


# Model shapes (TinyModelConfig fields); the vocabulary is the offline tokenizer's.
PRESETS = {
    "tiny": {},
    "small": dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4),
    # Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8) with the offline tokenizer: for a GPU.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8),
}


def build_model(preset: str, out: Path) -> Path:
    from kubetune_trainer.tiny_model import TinyModelConfig, build_tiny_model

    return build_tiny_model(out / f"model-{preset}", TinyModelConfig(**PRESETS[preset]))


def start_server(model: Path, port: int, log: Path, adapters: Path, max_num_seqs: int) -> subprocess.Popen:
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
        "--max-num-seqs",
        str(max_num_seqs),
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the model built (default tiny)")
    parser.add_argument("--model", type=Path, help="a model folder instead of a preset")
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads sending them")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations; each keeps its best")
    parser.add_argument(
        "--peft", action="store_true", help="also PEFT's own mixed-adapter batch (transformers' generate, in-process)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-serve-"))
    servers: list[subprocess.Popen] = []
    clients: list[httpx.Client] = []
    try:
        model = args.model.resolve() if args.model else build_model(args.preset, work)
        adapters = make_adapters(model, work / "adapters", ADAPTERS)
        for label, max_num_seqs in (("serial", 1), ("batched", BATCH)):
            log, port = work / f"serve-{label}.log", free_port()
            servers.append(start_server(model, port, log, work / "adapters", max_num_seqs))
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                timeout=600,
                limits=httpx.Limits(max_connections=args.concurrency + 1),
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            clients.append(client)
            wait_until_ready(client, servers[-1], log)
        serial, batched = clients
        names = [f"adapter-{i:02d}" for i in range(ADAPTERS)]
        configurations = [
            ("base, 16 adapters loaded", ["base"]),
            ("1 adapter", names[:1]),
            ("4 adapters mixed", names[:4]),
            ("16 adapters mixed", names),
        ]
        best: dict[str, dict] = {}
        loads = []  # seconds to load the 16 adapters, each round
        # Rounds alternate the configurations and each keeps its best round, so a busy moment
        # on a shared machine does not decide a ratio. The serial server idles while ours runs.
        for _ in range(args.rounds):
            keep(best, "base, serial", measure(serial, ["base"], args.requests, args.concurrency, args.max_tokens))
            keep(best, "base, batched", measure(batched, ["base"], args.requests, args.concurrency, args.max_tokens))
            loads.append(load_adapters(batched, names, adapters))
            for label, models in configurations:
                keep(best, label, measure(batched, models, args.requests, args.concurrency, args.max_tokens))
            unload_adapters(batched, names)
        for server in servers:  # the PEFT rows run alone
            server.terminate()
            server.wait(timeout=60)
        peft = peft_batches(model, adapters, args) if args.peft else {}
        print(report(best, loads, model, args))
        if peft:
            print(peft_report(peft, args))
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(work, ignore_errors=True)


def peft_batches(model: Path, adapters: list[Path], args) -> dict[str, float]:
    """Requests/s of PEFT's own mixed-adapter batches: one PeftModel holding the 16 adapters, batches
    of --concurrency copies of the prompt through transformers' greedy `generate` with
    `adapter_names` (one per row; "__base__" for the base model), --requests requests per row, best of
    --rounds. In-process, no HTTP: a reference for how PEFT's path scales with adapters, not a
    server figure."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    network = PeftModel.from_pretrained(network, str(adapters[0]), adapter_name="adapter-00")
    for i, path in enumerate(adapters[1:], start=1):
        network.load_adapter(str(path), adapter_name=f"adapter-{i:02d}")
    ids = tokenizer([PROMPT] * args.concurrency, return_tensors="pt").to(device)
    names = [f"adapter-{i:02d}" for i in range(ADAPTERS)]
    rows = {"PEFT, base": ["__base__"], "PEFT, 1 adapter": names[:1], "PEFT, 16 adapters mixed": names}
    best: dict[str, float] = {}
    batches = max(1, args.requests // args.concurrency)
    for _ in range(args.rounds):
        for label, models in rows.items():
            per_row = [models[i % len(models)] for i in range(args.concurrency)]
            with torch.no_grad():
                network.generate(**ids, adapter_names=per_row, max_new_tokens=2, do_sample=False)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(batches):
                    network.generate(
                        **ids,
                        adapter_names=per_row,
                        max_new_tokens=args.max_tokens,
                        min_new_tokens=args.max_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                if device == "cuda":
                    torch.cuda.synchronize()
            best[label] = max(best.get(label, 0.0), batches * args.concurrency / (time.perf_counter() - started))
    return best


def peft_report(best: dict[str, float], args) -> str:
    base = best["PEFT, base"]
    lines = [
        f"\nPEFT's own mixed batch (in-process, transformers' generate, batch {args.concurrency}, no HTTP):\n",
        "| config | requests/s | vs PEFT base |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {rps:.1f} | {rps / base:.2f} |" for label, rps in best.items()]
    return "\n".join(lines)


def report(best: dict, loads: list[float], model: Path, args) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    lines = [
        f"\nkubetune serve, {args.preset if not args.model else model.name}, {device}: {args.requests} greedy "
        f"/v1/completions per configuration (max_tokens {args.max_tokens}, {args.concurrency} concurrent clients), "
        f"best of {args.rounds} rounds; serial = --max-num-seqs 1, batched = --max-num-seqs {BATCH}; LoRA r=8 on "
        f"q/k/v/o; loading the {ADAPTERS} adapters through the API took {loads[0]:.2f} s the first time"
        + (f", {min(loads[1:]):.2f} s later" if len(loads) > 1 else "")
        + "\n",
        "| config | requests/s | tokens/s | p50 latency ms | p99 latency ms | vs serial base | vs batched base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    serial, base = best["base, serial"]["rps"], best["base, batched"]["rps"]
    for label, r in best.items():
        lines.append(
            f"| {label} | {r['rps']:.1f} | {r['tps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
            f"{r['rps'] / serial:.2f} | {r['rps'] / base:.2f} |"
        )
    mixed = best["16 adapters mixed"]["rps"] / base
    lines += [
        "",
        f"target: batched base >= 3x serial base: {base / serial:.2f}x ({'met' if base / serial >= 3 else 'MISSED'})",
        f"target: 16 adapters mixed >= 0.8x batched base: {mixed:.2f}x ({'met' if mixed >= 0.8 else 'MISSED'})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
