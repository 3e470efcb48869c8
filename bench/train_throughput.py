"""Training throughput: kubetune's recipe against Hugging Face's Trainer, same model, data and batch.

Both train the same LoRA on the same tokenized examples (kubetune's data pipeline, so the data is
identical) for the same number of optimizer steps with the same global batch; the table reports
wall time and trainable tokens per second, and kubetune / baseline as a ratio (> 1: we are faster).

    .venv/bin/python bench/train_throughput.py [--steps 100] [--model DIR] [--packing]

On a GPU the tiny model (hidden 64) measures only launch overhead; `--size small` builds a
randomly initialised ~100M-parameter Llama-style model offline (hidden 1024, 8 layers, 16 heads,
4 KV heads), and `--precision bf16` trains in bf16 (frozen base in bf16, adapters in fp32, bf16
autocast: both runners). `--device` picks the device (auto: cuda when available):

    python bench/train_throughput.py --size small --precision bf16 --steps 300 --global-batch 32 --micro-batch 8
"""

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kubetune.contract import TrainerConfig
from kubetune_trainer import train
from kubetune_trainer.data import collate
from kubetune_trainer.distributed import DistEnv
from kubetune_trainer.tiny_model import TinyModelConfig, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "support-chat.jsonl"

# Model sizes --size builds offline (random weights, the tiny model's tokenizer, vocabulary 1024).
SIZES = {
    "tiny": TinyModelConfig(),
    "small": TinyModelConfig(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4),
}


def config(
    model: Path,
    out: Path,
    steps: int,
    packing: bool,
    precision: str = "fp32",
    global_batch: int = 8,
    micro_batch: int = 4,
    seq_length: int = 128,
    data: Path = DATA,
) -> TrainerConfig:
    spec = {
        "model": {"uri": f"file://{model}"},
        "dataset": {"uri": f"file://{data}", "format": "chat", "maxSeqLength": seq_length, "packing": packing},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "hyperparameters": {
            "maxSteps": steps,
            "learningRate": "1e-3",
            "globalBatchSize": global_batch,
            "microBatchSize": micro_batch,
            "precision": precision,
            "gradientCheckpointing": False,
        },
        "resources": {"gpusPerNode": 0},
        "checkpointing": {"everySteps": 10**6},
        "evaluation": {"everySteps": 0},
        "output": {"uri": f"file://{out}/output"},
    }
    return TrainerConfig.model_validate(
        {"spec": spec, "runtime": {"local": True, "cacheDir": str(out / "cache"), "metricsPort": 0}}
    )


def trainable_tokens(examples) -> int:
    return sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_kubetune(cfg: TrainerConfig) -> tuple[float, int]:
    run = train.setup(cfg, DistEnv(0, 1, 0))
    _synchronize()
    started = time.perf_counter()
    train.fit(run)
    _synchronize()
    seconds = time.perf_counter() - started
    steps, batch = run.total_steps, cfg.spec.hyperparameters.global_batch_size
    per_example = trainable_tokens(run.train_set) / len(run.train_set)
    return seconds, int(per_example * steps * batch)


def run_hf_trainer(cfg: TrainerConfig) -> tuple[float, int]:
    """The baseline: transformers.Trainer on the same examples, model and LoRA."""
    from transformers import Trainer, TrainingArguments

    run = train.setup(cfg, DistEnv(0, 1, 0))  # same model, LoRA and tokenized data
    h = cfg.spec.hyperparameters
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "position_ids": e.position_ids} for e in run.train_set]
    accumulation = h.global_batch_size // h.micro_batch_size
    if len(rows) % h.micro_batch_size or (len(rows) // h.micro_batch_size) % accumulation:
        # The Trainer ends an optimizer step at every epoch's end: its steps would hold fewer
        # sequences than ours, and the comparison would flatter it.
        print(
            f"warning: {len(rows)} examples are not a whole number of global batches of {h.global_batch_size} "
            f"(micro-batch {h.micro_batch_size}): hf-trainer's steps at epoch ends are shorter than ours"
        )

    def collator(features):
        from kubetune_trainer.data import Example

        return collate([Example(**f) for f in features], run.tokenizer.pad_token_id)

    args = TrainingArguments(
        output_dir=str(Path(cfg.runtime.cache_dir) / "hf"),
        max_steps=h.max_steps,
        per_device_train_batch_size=h.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=h.lr,
        lr_scheduler_type="cosine",
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        bf16=h.precision == "bf16",
        fp16=h.precision == "fp16",
    )
    trainer = Trainer(model=run.model, args=args, train_dataset=rows, data_collator=collator)
    _synchronize()
    started = time.perf_counter()
    trainer.train()
    _synchronize()
    seconds = time.perf_counter() - started
    per_example = trainable_tokens(run.train_set) / len(run.train_set)
    return seconds, int(per_example * h.max_steps * h.global_batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", type=Path, help="model folder (default: build the tiny model)")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each runner counts")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="model to build when --model is not given (small: hidden 1024, 8 layers, ~100M params)",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--seq-length", type=int, default=128, help="maxSeqLength (and the packing length)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repeat the 48-example data set this many times (batches big enough to load a GPU)",
    )
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first touched: every runner sees no GPU
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    try:
        model = args.model or build_tiny_model(work / args.size, SIZES[args.size])
        shape = f"{args.model}" if args.model else f"{args.size} model ({_parameters(model) / 1e6:.1f}M params)"
        data = DATA
        if args.repeat > 1:
            data = work / "data.jsonl"
            data.write_text(DATA.read_text() * args.repeat)
        results = {}
        # Alternate the runners and keep each one's best round, so a busy moment on a shared
        # machine does not decide the ratio.
        for round_ in range(args.rounds):
            for name, runner in (("kubetune", run_kubetune), ("hf-trainer", run_hf_trainer)):
                out = work / f"{name}-{round_}"
                cfg = config(
                    model,
                    out,
                    args.steps,
                    args.packing,
                    args.precision,
                    args.global_batch,
                    args.micro_batch,
                    args.seq_length,
                    data,
                )
                seconds, tokens = runner(cfg)
                if name not in results or seconds < results[name][0]:
                    results[name] = (seconds, tokens)
        device = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
        )
        print(
            f"\ntraining throughput (best of {args.rounds}), {args.steps} steps of {args.global_batch} sequences "
            f"(micro-batch {args.micro_batch}, max {args.seq_length} tokens{', packed' if args.packing else ''}), "
            f"{f'data x{args.repeat}, ' if args.repeat > 1 else ''}LoRA r=16, {args.precision}, {shape}, {device}"
        )
        print(f"{'runner':<12} {'seconds':>8} {'tokens/s':>10}")
        for name, (seconds, tokens) in results.items():
            print(f"{name:<12} {seconds:>8.2f} {tokens / seconds:>10.0f}")
        ours, base = results["kubetune"], results["hf-trainer"]
        print(f"{'ratio':<12} {'':>8} {(ours[1] / ours[0]) / (base[1] / base[0]):>10.2f}  (kubetune / hf-trainer)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model) / "model.safetensors"), "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


if __name__ == "__main__":
    main()
