"""Training speed: kubetune's trainer against HF + PEFT, Liger Kernel and torch.compile, in one run.

Every row trains the same LoRA (r=16, alpha 32, all linear layers) on the same Llama-shaped model
(random weights from a fixed seed, built from a LlamaConfig), on the same synthetic token ids (no
padding: every token is real and counted), with the same optimizer (AdamW, lr 1e-4), for W warm-up
and S timed steps. Each row runs in its own process, so that its peak memory is its own: on CUDA
torch.cuda.max_memory_allocated() over the timed steps, on CPU the peak RSS of the whole process
(ru_maxrss; it cannot be reset after the warm-up, so it includes building the model).

    .venv/bin/python bench/train_speed.py [--preset small|1b] [--rows hf,kubetune,...] [--warmup W]
        [--steps S] [--profile [ROW]] [--json FILE]

The baseline rows reproduce shared/anchors/lora_1b.py (the figures quoted in the issue); the
kubetune rows run the trainer's own pieces (methods.apply_method, acceleration.accelerate,
train.token_loss_sum) the way train.py does. One row alone, as the parent runs it:

    python bench/train_speed.py --row NAME [--preset P] --json OUT
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

SEED = 0  # the anchor's
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class Preset:
    """A Llama shape and the batch it is trained on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_length: int
    micro_batch: int


PRESETS = {
    # shared/anchors/lora_1b.py: Llama-3.2-1B's shape, micro-batch 4 x 2048 (bf16 on a GPU).
    "1b": Preset(2048, 8192, 16, 32, 8, 128_256, 2048, 4),
    # The CPU configuration of the issue: Llama 3's vocabulary, so the logits weigh what they weigh in
    # real models (fp32 on a CPU).
    "small": Preset(1024, 2816, 8, 16, 4, 128_256, 1024, 4),
    # Checks that every path of this script runs; its figures mean nothing.
    "tiny": Preset(64, 128, 2, 4, 2, 1024, 64, 2),
}


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    runner: str  # "hf" (a baseline) or "kubetune"
    liger: bool = False
    checkpointing: bool = False
    compile: bool = False
    qlora: bool = False


ROWS = (
    Row("hf", "HF + PEFT eager", "hf"),
    Row("hf-gc", "HF + PEFT + gradient checkpointing", "hf", checkpointing=True),
    Row("liger", "Liger Kernel (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)", "hf", liger=True),
    Row("liger-gc", "Liger + checkpointing", "hf", liger=True, checkpointing=True),
    Row("compile", "torch.compile of the decoder", "hf", compile=True),
    Row("liger-compile", "Liger + compile", "hf", liger=True, compile=True),
    Row("kubetune", "kubetune (kernels: auto)", "kubetune"),
    Row("kubetune-gc", "kubetune (kernels: auto) + checkpointing", "kubetune", checkpointing=True),
    Row("qlora-hf", "QLoRA: HF + PEFT + bitsandbytes NF4", "hf", qlora=True),
    Row("qlora-kubetune", "QLoRA: kubetune (kernels: auto)", "kubetune", qlora=True),
)
ROW_NAMES = tuple(row.name for row in ROWS)
BASELINE = "hf"
# Which row each of ours is compared with, besides HF + PEFT eager.
OURS_VS = {"kubetune": "hf", "kubetune-gc": "hf-gc", "qlora-kubetune": "qlora-hf"}
# Rows a CPU run leaves out unless --rows names them: what inductor builds takes minutes on a few cores.
CPU_OPT_IN = {"compile": "opt-in on CPU (--rows ...,compile): inductor's C++ build takes minutes on a few cores"}
PACKAGES = ("torch", "transformers", "peft", "liger-kernel", "bitsandbytes", "triton")


# --- which rows run ---------------------------------------------------------------------------------


def parse_rows(text: str | None) -> list[str] | None:
    """`--rows a,b` as names in table order; None (no --rows) means the device's default set.
    `all` asks for every row, the CPU's opt-in ones included."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ROW_NAMES)
    unknown = [name for name in names if name not in ROW_NAMES]
    if unknown or not names:
        raise ValueError(f"--rows: unknown row {', '.join(unknown) or '(none given)'}; rows: {', '.join(ROW_NAMES)}")
    return [name for name in ROW_NAMES if name in names]


def plan_rows(requested: list[str] | None, device_type: str) -> list[tuple[Row, str | None]]:
    """Every row to print, each with why it cannot run here (None: it runs). Without --rows every
    row is listed, so a row that cannot run on this device is printed as NOT RUN, never dropped."""
    explicit = requested is not None
    names = requested if explicit else ROW_NAMES
    planned = []
    for row in ROWS:
        if row.name in names:
            planned.append((row, device_reason(row, device_type, explicit)))
    return planned


def device_reason(row: Row, device_type: str, explicit: bool) -> str | None:
    """Why `row` does not run on this kind of device (None: it does), known before starting it."""
    if device_type != "cuda":
        if row.liger:
            return "Liger Kernel's Triton kernels need a CUDA GPU"
        if row.name in CPU_OPT_IN and not explicit:
            return CPU_OPT_IN[row.name]
    return None


# --- the table ----------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def gib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**30:.2f}"


def speed(tokens_per_s: float) -> str:
    """As the issue writes them: 31.9k on a GPU, 52.3 on a CPU."""
    return f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 10_000 else f"{tokens_per_s:.1f}"


def figure(record: dict, key: str) -> float | None:
    return record.get(key) if record.get("status") == "ok" else None


def table(records: list[dict]) -> list[str]:
    """The markdown table: each row's figures, and its tokens/s and peak as ratios of HF + PEFT eager's."""
    by_name = {r["row"]: r for r in records}
    base = by_name.get(BASELINE, {})
    base_speed, base_peak = figure(base, "tokens_per_s"), figure(base, "peak_bytes")
    memory = next((r["peak_kind"] for r in records if r.get("peak_kind")), "peak memory")
    lines = [
        f"| row | runner | tokens/s | peak GiB | step s | loss | tokens/s vs {BASELINE} | peak vs {BASELINE} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r.get("status") != "ok":
            state = "NOT RUN" if r.get("status") == "not run" else "FAILED"
            lines.append(f"| {r['row']} | {r['label']} | {state}: {r.get('reason', '?')} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['row']} | {r['label']} | {speed(r['tokens_per_s'])} | {gib(r['peak_bytes'])} | "
            f"{r['step_s']:.3f} | {r['loss']:.4f} | {ratio(r['tokens_per_s'], base_speed)} | "
            f"{ratio(r['peak_bytes'], base_peak)} |"
        )
    before = [r["rss_before_model_bytes"] for r in records if r.get("rss_before_model_bytes")]
    held = f" (each process held {gib(max(before))} GiB before building its model)" if before else ""
    lines.append(f"\npeak memory: {memory}{held}")
    return lines


def comparisons(records: list[dict]) -> list[str]:
    """Ours against the baseline each should beat: tokens/s and peak as ratios (> 1 faster, < 1 smaller)."""
    by_name = {r["row"]: r for r in records}
    lines = []
    for ours, theirs in OURS_VS.items():
        for base in dict.fromkeys((theirs, BASELINE)):
            a, b = by_name.get(ours), by_name.get(base)
            if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
                continue
            lines.append(
                f"{ours} vs {base}: tokens/s {ratio(a['tokens_per_s'], b['tokens_per_s'])}, "
                f"peak {ratio(a['peak_bytes'], b['peak_bytes'])}"
            )
    return lines


def targets(records: list[dict], preset: str) -> list[str]:
    """The issue's targets, met or missed and by how much; only for the presets they are stated for."""
    by_name = {r["row"]: r for r in records if r.get("status") == "ok"}
    ours, base, ours_gc = by_name.get("kubetune"), by_name.get(BASELINE), by_name.get("kubetune-gc")
    checks = []
    if preset == "small" and ours and base and ours.get("device_type") == "cpu":
        speed = ours["tokens_per_s"] / base["tokens_per_s"]
        peak = ours["peak_bytes"] / base["peak_bytes"]
        checks.append(("kubetune tokens/s >= 1.00x hf", speed >= 1.0, f"{speed:.2f}x"))
        checks.append(("kubetune peak <= 0.45x hf", peak <= 0.45, f"{peak:.2f}x"))
    if preset == "1b" and ours and ours.get("device_type") == "cuda":
        if base:
            speed = ours["tokens_per_s"] / base["tokens_per_s"]
            checks.append(("kubetune tokens/s >= 2.00x hf", speed >= 2.0, f"{speed:.2f}x"))
        checks.append(("kubetune peak <= 18 GiB", ours["peak_bytes"] <= 18 * 2**30, f"{gib(ours['peak_bytes'])} GiB"))
    if preset == "1b" and ours_gc and ours_gc.get("device_type") == "cuda":
        peak = ours_gc["peak_bytes"]
        checks.append(("kubetune-gc peak <= 4.5 GiB", peak <= 4.5 * 2**30, f"{gib(peak)} GiB"))
    return [f"target {name}: {'met' if met else 'MISSED'} ({value})" for name, met, value in checks]


def versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def report(records: list[dict], preset: str, args) -> str:
    device = next((r["device"] for r in records if r.get("device")), "?")
    shape = PRESETS[preset]
    header = (
        f"training speed, preset {preset} (hidden {shape.hidden}, {shape.layers} layers, vocab {shape.vocab}), "
        f"micro-batch {args.micro_batch or shape.micro_batch} x {args.seq_length or shape.seq_length} tokens, "
        f"LoRA r=16 all-linear, AdamW lr {LEARNING_RATE:g}, {args.warmup} warm-up + {args.steps} timed steps"
    )
    lines = [header, f"device: {device}", "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    lines += table(records)
    lines += [""] + comparisons(records) + targets(records, preset)
    for r in records:
        if r.get("notes"):
            lines += ["", f"{r['row']}: {r['notes']}"]
        if r.get("profile"):
            lines += ["", f"{r['row']}: profile of {r['profile_steps']} steps", r["profile"]]
    if args.profile and not any(r.get("profile") for r in records):
        lines += ["", f"no profile: row {args.profile} did not run"]
    return "\n".join(lines)


# --- the parent: one process per row ----------------------------------------------------------------


def not_run(row: Row, reason: str, status: str = "not run") -> dict:
    return {"row": row.name, "label": row.label, "status": status, "reason": reason}


def child_command(row: Row, args, out: Path, work: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--row", row.name, "--preset", args.preset]
    command += ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    command += ["--json", str(out), "--work", str(work)]
    if args.micro_batch:
        command += ["--micro-batch", str(args.micro_batch)]
    if args.seq_length:
        command += ["--seq-length", str(args.seq_length)]
    if args.profile == row.name:
        command += ["--profile", row.name]
    return command


def run_row(row: Row, args, work: Path) -> dict:
    """Runs one row in a process of its own and reads back its record; a crash (out of memory, an
    exception) becomes a FAILED row with the child's last line, never a missing one."""
    out = work / f"{row.name}.json"
    started = time.perf_counter()
    try:
        done = subprocess.run(
            child_command(row, args, out, work), capture_output=True, text=True, timeout=args.row_timeout
        )
    except subprocess.TimeoutExpired:
        return not_run(row, f"still running after --row-timeout {args.row_timeout} s", "failed")
    if done.returncode == 0 and out.exists():
        record = json.loads(out.read_text())
        record["wall_s"] = round(time.perf_counter() - started, 1)
        return record
    tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
    if args.verbose and tail:
        print("\n".join(tail[-30:]), file=sys.stderr)
    code = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    return not_run(row, f"{code}: {tail[-1][:300] if tail else 'no output'}", "failed")


def run_all(args) -> list[dict]:
    records = []
    work = Path(tempfile.mkdtemp(prefix="kubetune-train-speed-"))
    try:
        for row, reason in plan_rows(args.rows, args.device):
            if reason:
                record = not_run(row, reason)
            else:
                print(f"running {row.name} ...", file=sys.stderr, flush=True)
                record = run_row(row, args, work)
            print(f"  {summary_line(record)}", file=sys.stderr, flush=True)
            records.append(record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return records


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def summary_line(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record['row']}: {record['status'].upper()}: {record.get('reason')}"
    return (
        f"{record['row']}: {record['tokens_per_s']:.0f} tokens/s, peak {gib(record['peak_bytes'])} GiB, "
        f"{record['step_s']:.3f} s/step, loss {record['loss']:.4f} (first step {seconds(record['first_step_s'])}, "
        f"process {seconds(record.get('wall_s'))})"
    )


# --- the child: one row ---------------------------------------------------------------------------


class NotRun(Exception):
    """This row cannot run here; the message says why."""


def llama_config(shape: Preset):
    from transformers import LlamaConfig

    # As shared/anchors/lora_1b.py builds it (tied embeddings and RoPE base of Llama 3.2).
    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max(4096, shape.seq_length),
        rope_theta=500000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def build_model(shape: Preset, device, dtype):
    """The same random model in every row: the seed is set right before it is built."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(shape))
    return model.to(dtype)


def saved_model(preset: str, dtype_name: str, work: Path) -> Path:
    """The random model as a folder, for the QLoRA rows (bitsandbytes quantises while loading).
    Written by a process of its own, so that building it in full precision does not count in a CPU
    row's peak RSS; both QLoRA rows of a run load the same folder."""
    folder = work / f"model-{preset}-{dtype_name}"
    if not (folder / "config.json").exists():
        command = [sys.executable, str(Path(__file__).resolve()), "--save-model", str(folder)]
        command += ["--preset", preset, "--dtype", dtype_name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise RuntimeError(f"writing the random model to {folder} failed: {lines[-1]}")
    return folder


def save_model(preset: str, dtype_name: str, folder: Path) -> None:
    import torch

    model = build_model(PRESETS[preset], "cpu", getattr(torch, dtype_name))
    model.save_pretrained(folder)


def tokens(shape: Preset, device):
    """Synthetic token ids from their own generator: the same in every row, whatever the model's
    construction drew from the global one."""
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, shape.vocab, (shape.micro_batch, shape.seq_length), generator=generator)
    return ids.to(device)


def compiler_missing(device_type: str) -> str | None:
    """torch.compile builds C++ on a CPU (inductor) and a C launcher for Triton on a GPU."""
    if device_type == "cuda":
        found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        return None if found else "no C compiler (cc, gcc or clang) for Triton's launchers"
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    return None if found else "no C++ compiler (g++ or clang++) for inductor's CPU code"


def hf_row(row: Row, shape: Preset, device, dtype, work: Path, preset: str):
    """The baselines, as shared/anchors/lora_1b.py writes them."""
    import torch
    from peft import LoraConfig, get_peft_model

    if row.liger:
        if device.type != "cuda":
            raise NotRun("Liger Kernel's Triton kernels need a CUDA GPU")
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except ImportError as error:
            raise NotRun(f"liger-kernel cannot be imported ({error})") from None
        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    if row.compile and (missing := compiler_missing(device.type)):
        raise NotRun(missing)
    if row.qlora:
        model = quantized_hf_model(device, dtype, work, preset)
    else:
        model = build_model(shape, device, dtype)
        if row.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if row.compile:
        model.base_model.model.model = torch.compile(model.base_model.model.model)
    optimizer = adamw(model)
    x = tokens(shape, device)

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, ""


def quantized_hf_model(device, dtype, work: Path, preset: str):
    """HF's QLoRA recipe: NF4 with double quantisation, computing in the training dtype; no
    checkpointing, like the kubetune QLoRA row."""
    try:
        import bitsandbytes  # noqa: F401
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as error:
        raise NotRun(f"bitsandbytes cannot be imported ({error})") from None
    folder = saved_model(preset, str(dtype).removeprefix("torch."), work)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    placement = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quantization, **placement)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def kubetune_spec(row: Row, shape: Preset, on_gpu: bool, total_steps: int, work: Path):
    """The FineTuneJob spec of this row, as a user would write it (see train_throughput.config)."""
    from kubetune.api.finetunejob import FineTuneJobSpec

    method = {"type": "qlora" if row.qlora else "lora"}
    method["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
    if row.qlora:
        method["quantization"] = {"bits": 4, "type": "nf4", "computeDtype": "bfloat16" if on_gpu else "float32"}
    spec = {
        "model": {"uri": f"file://{work}/model"},
        "dataset": {"uri": f"file://{work}/data.jsonl", "format": "text", "maxSeqLength": shape.seq_length},
        "method": method,
        "hyperparameters": {
            "maxSteps": total_steps,
            "learningRate": repr(LEARNING_RATE),
            "globalBatchSize": shape.micro_batch,
            "microBatchSize": shape.micro_batch,
            "precision": "bf16" if on_gpu else "fp32",
            "gradientCheckpointing": row.checkpointing,
            "kernels": "auto",
            "compile": "auto",
            "seed": SEED,
        },
        "resources": {"gpusPerNode": 1 if on_gpu else 0},
        "output": {"uri": f"file://{work}/output"},
    }
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValueError as error:  # pydantic's ValidationError: a field the API does not have yet
        raise NotRun(f"the spec is refused: {str(error).splitlines()[-1].strip()[:200]}") from None


def kubetune_row(row: Row, shape: Preset, device, dtype, work: Path, preset: str, total_steps: int):
    """kubetune's rows: the trainer's own pieces, in the order train.setup and train.train_step use them."""
    import torch

    try:
        from kubetune_trainer import acceleration
    except ImportError:
        raise NotRun("kubetune_trainer.acceleration not available") from None
    from kubetune_trainer import methods, train

    on_gpu = device.type == "cuda"
    spec = kubetune_spec(row, shape, on_gpu, total_steps, work)
    if row.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise NotRun(f"bitsandbytes cannot be imported ({error})") from None
        folder = saved_model(preset, str(dtype).removeprefix("torch."), work)
        model = methods.load_base_model(folder, spec, on_gpu=on_gpu)
    else:
        model = build_model(shape, device, methods.base_dtype(spec, on_gpu))
        model.config.use_cache = False  # as methods.load_base_model does
    model = methods.apply_method(model, spec, total_steps, work)  # PEFT (and checkpointing) as the trainer does
    if not row.qlora:
        model.to(device)  # the single-device strategy's placement (bitsandbytes placed QLoRA's weights)
    # "ddp": what the planner picks for one process (strategies.DDP wraps nothing when not distributed).
    accelerated = acceleration.accelerate(model, spec, device, strategy="ddp")
    optimizer = adamw(model)
    x = tokens(shape, device)
    mask = torch.ones_like(x)
    # train._autocast, without a Run: bf16 autocast on a GPU, none in fp32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()

    def step():
        with autocast:
            loss_sum, count = train.token_loss_sum(model, {"input_ids": x, "labels": x, "attention_mask": mask})
            loss = loss_sum / count
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, accelerated.summary()


def adamw(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int | None:
    """This process's RSS now (Linux): what torch and transformers hold before any model exists,
    which every CPU row's peak includes."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def peak_bytes(device) -> tuple[int, str]:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated over the timed steps"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak RSS of the row's process (ru_maxrss)"


def measure(step, device, warmup: int, steps: int, tokens_per_step: int) -> dict:
    """W warm-up steps (the first one's time reported: compilation, autotuning), then S timed ones."""
    import torch

    first_step_s = None
    for index in range(warmup):
        started = time.perf_counter()
        step()
        synchronize(device)
        if index == 0:
            first_step_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak, kind = peak_bytes(device)
    reserved = {"reserved_bytes": torch.cuda.max_memory_reserved(device)} if device.type == "cuda" else {}
    return reserved | {
        "tokens_per_s": steps * tokens_per_step / seconds,
        "step_s": seconds / steps,
        "first_step_s": first_step_s,
        "loss": float(loss),
        "peak_bytes": peak,
        "peak_kind": kind,
    }


def profile(step, device, steps: int = 2, top: int = 15) -> str:
    """Where the time goes: the operators and kernels with the most self time over a few steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiling

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiling(activities=activities) as trace:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return trace.key_averages().table(sort_by=key, row_limit=top)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def run_one(row: Row, args) -> dict:
    """Trains one row and returns its record (status "not run" with the reason when it cannot)."""
    import torch

    device = torch.device(args.device)
    shape = shape_of(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = args.work or Path(tempfile.mkdtemp(prefix="kubetune-train-speed-"))
    record = {"row": row.name, "label": row.label, "device": device_name(device), "device_type": device.type}
    record |= {"micro_batch": shape.micro_batch, "seq_length": shape.seq_length, "dtype": str(dtype)}
    record |= {"warmup": args.warmup, "steps": args.steps, "versions": versions()}
    if device.type == "cpu":
        record["rss_before_model_bytes"] = resident_bytes()
    try:
        if row.runner == "kubetune":
            model, step, notes = kubetune_row(row, shape, device, dtype, work, args.preset, args.warmup + args.steps)
        else:
            model, step, notes = hf_row(row, shape, device, dtype, work, args.preset)
    except NotRun as why:
        return record | {"status": "not run", "reason": str(why)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    record["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record |= measure(step, device, args.warmup, args.steps, shape.micro_batch * shape.seq_length)
    record |= {"status": "ok", "notes": notes}
    if args.profile == row.name:
        record |= {"profile": profile(step, device), "profile_steps": 2}
    return record


def shape_of(args) -> Preset:
    shape = PRESETS[args.preset]
    return Preset(
        shape.hidden,
        shape.intermediate,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.vocab,
        args.seq_length or shape.seq_length,
        args.micro_batch or shape.micro_batch,
    )


# --- command line -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and batch (default: 1b on CUDA, small on CPU)")
    p.add_argument("--rows", help=f"comma-separated, or all (default: what runs here): {','.join(ROW_NAMES)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument(
        "--profile",
        nargs="?",
        const="kubetune",
        choices=ROW_NAMES,
        metavar="ROW",
        help="print a torch.profiler summary of a row (default kubetune): top 15 by self time",
    )
    p.add_argument("--json", type=Path, help="write the records to this file")
    p.add_argument("--row-timeout", type=int, default=3600, help="seconds one row may take")
    p.add_argument("--verbose", action="store_true", help="print a failed row's stderr")
    p.add_argument("--row", choices=ROW_NAMES, help=argparse.SUPPRESS)  # a child: run this row only
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # a child: the parent's scratch folder
    p.add_argument("--save-model", type=Path, help=argparse.SUPPRESS)  # a child: write the random model
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return p


def resolve(args, cuda_available: bool, p: argparse.ArgumentParser):
    """Fills in the device-dependent defaults; a user's mistake is a usage error, not a traceback."""
    if args.device == "auto":
        args.device = "cuda" if cuda_available else "cpu"
    elif args.device == "cuda" and not cuda_available:
        p.error("--device cuda: no CUDA GPU is available")
    on_gpu = args.device == "cuda"
    args.preset = args.preset or ("1b" if on_gpu else "small")
    args.warmup = (3 if on_gpu else 1) if args.warmup is None else args.warmup
    args.steps = (10 if on_gpu else 2) if args.steps is None else args.steps
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    for name in ("micro_batch", "seq_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        args.rows = parse_rows(args.rows)
    except ValueError as error:
        p.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch touches CUDA
    import torch

    if args.save_model:
        save_model(args.preset, args.dtype, args.save_model)
        return 0
    args = resolve(args, torch.cuda.is_available(), p)
    if args.row:
        record = run_one(next(row for row in ROWS if row.name == args.row), args)
        print(json.dumps({k: v for k, v in record.items() if k != "profile"}))
        if args.json:
            args.json.write_text(json.dumps(record, indent=1))
        return 0
    records = run_all(args)
    print(report(records, args.preset, args))
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "versions": versions(), "rows": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
