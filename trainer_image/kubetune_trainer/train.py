"""The training recipe: config in, adapter + report out, resumable at every checkpoint.

Read top to bottom, as in a torchtune recipe: set up (process group, model, data, optimizer),
resume if a checkpoint exists, loop over optimizer steps, save. Each optimizer step consumes
exactly `globalBatchSize` sequences in an order fixed by (seed, epoch), split over ranks and
micro-batches; the loss is the mean over every trainable token of that global batch, so the
result does not depend on how the batch was split (world size, accumulation), nor on the
distributed strategy (DDP, FSDP, DeepSpeed ZeRO: see strategies.py), up to reduction order.
"""

import json
import math
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kubetune import storage
from kubetune.api.finetunejob import DpoSettings, KtoSettings, OrpoSettings, SimpoSettings
from kubetune.contract import (
    ADAPTER_DIR,
    EXIT_INVALID_INPUT,
    EXIT_PREEMPTED,
    MERGED_DIR,
    REPORT_FILE,
    TrainerConfig,
    TrainerResult,
)
from kubetune.logs import first_line, log
from kubetune.planning import ModelShape, Plan, plan_for_spec

from . import acceleration, checkpoint, data, dpo, evaluation, methods, preference, strategies, tracking
from .distributed import DistEnv
from .metrics import MetricsExporter
from .outcome import record_failure
from .preemption import mark_preempted


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written."""


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    config: TrainerConfig
    env: DistEnv
    device: torch.device
    model_dir: Path
    strategy: strategies.Strategy
    model: torch.nn.Module  # what the loop calls: the strategy's wrapper (DDP, DeepSpeed engine) or the model
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_set: list
    eval_set: list | None
    data_report: data.DataReport
    plan: Plan
    output: storage.OutputLocation
    metrics: MetricsExporter
    total_steps: int
    steps_per_epoch: int
    state: checkpoint.TrainerState
    accelerated: acceleration.Acceleration | None = None
    stop_requested: bool = False
    timings: dict = field(default_factory=dict)
    trackers: tracking.Trackers = field(default_factory=tracking.Trackers)  # MLflow, W&B: rank 0 only
    initial_adapter: dict | None = None  # PiSSA/OLoRA's initial weights, rank 0: the saved adapter is converted


# --- set-up ------------------------------------------------------------------------------------


def setup(config: TrainerConfig, env: DistEnv) -> Run:
    spec, runtime = config.spec, config.runtime
    cache = Path(runtime.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    device = env.device()
    torch.manual_seed(spec.hyperparameters.seed)
    # Before anything slow (a download, the model): an output that cannot be written would
    # otherwise fail the job only when the first checkpoint or the adapter is published.
    output = storage.open_output(spec.output.uri, cache_dir=cache, local=runtime.local)
    output.probe()

    model_dir = _on_main_first(
        env,
        lambda: storage.resolve_input(
            spec.model.uri, cache_dir=cache, revision=spec.model.revision, local=runtime.local
        ),
    )
    methods.model_folder(spec.model.uri, model_dir)
    if "gguf" in spec.output.exports:
        from . import export

        # before training: an export that cannot be written would fail the job after the whole run
        if why := export.gguf_problem(model_dir):
            raise ValueError(f"spec.output.export gguf: {why}")
    data_path = _on_main_first(
        env, lambda: storage.resolve_input(spec.dataset.uri, cache_dir=cache, local=runtime.local)
    )
    validation = spec.dataset.validation
    validation_path = None
    if validation and validation.uri:
        validation_path = _on_main_first(
            env, lambda: storage.resolve_input(validation.uri, cache_dir=cache, local=runtime.local)
        )

    tokenizer = methods.loading_model(spec.model.uri, model_dir, lambda: methods.load_tokenizer(model_dir))
    train_set, eval_set, data_report = data.build_datasets(
        spec.dataset, data_path, tokenizer, seed=spec.hyperparameters.seed, validation_path=validation_path
    )
    steps_per_epoch = max(1, len(train_set) // spec.hyperparameters.global_batch_size)
    total_steps = spec.hyperparameters.max_steps or steps_per_epoch * spec.hyperparameters.epoch_count

    on_gpu = device.type == "cuda"
    base = methods.loading_model(
        spec.model.uri, model_dir, lambda: methods.load_base_model(model_dir, spec, on_gpu=on_gpu)
    )
    model = methods.apply_method(base, spec, total_steps, model_dir)
    initial_adapter = methods.initial_adapter_state(model, spec.method) if env.is_main else None
    trainable, total = methods.count_parameters(model)
    plan = _plan(config, env, base.config, trainable, total)
    accelerated = acceleration.accelerate(model, spec, device, plan.strategy)
    if env.is_main:
        log("kernels", summary=accelerated.summary(), **accelerated.to_wire())

    strategy = strategies.build(plan.strategy, spec, env, device)  # places, wraps or shards the model
    model, optimizer = strategy.prepare(
        model,
        lambda parameters: _optimizer(
            methods.parameter_groups(model, parameters, spec.method, spec.hyperparameters.lr), spec.hyperparameters
        ),
    )
    scheduler = _scheduler(optimizer, spec.hyperparameters, total_steps)
    state = checkpoint.TrainerState(
        step=0, fingerprint=data_report.fingerprint, global_batch_size=spec.hyperparameters.global_batch_size
    )
    return Run(
        config,
        env,
        device,
        model_dir,
        strategy,
        model,
        tokenizer,
        optimizer,
        scheduler,
        train_set,
        eval_set,
        data_report,
        plan,
        output,
        MetricsExporter(),
        total_steps,
        steps_per_epoch,
        state,
        accelerated,
        initial_adapter=initial_adapter,
    )


def _on_main_first(env: DistEnv, fetch):
    """Rank 0 downloads, the others wait and then find the completed cache entry."""
    if env.is_main:
        result = fetch()
        env.barrier()
        return result
    env.barrier()
    return fetch()


def _plan(config: TrainerConfig, env: DistEnv, model_config, trainable: int, total: int) -> Plan:
    spec = config.spec
    h = spec.hyperparameters
    shape = ModelShape(total, model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    layout = (1, env.world_size if torch.cuda.is_available() else 0) if config.runtime.local else None
    plan = plan_for_spec(spec, shape, trainable, gpu_gib, layout=layout)
    # The data order is fixed by the global batch; this process count decides the accumulation.
    accumulation = h.global_batch_size // (h.micro_batch_size * env.world_size)
    strategy = strategies.resolve(spec.distributed.strategy, plan.strategy, spec.method.type, env.world_size)
    return Plan(
        env.world_size,
        strategy,
        plan.micro_batch,
        accumulation,
        trainable,
        total,
        plan.estimated_gpu_memory_gib,
        plan.fits,
        plan.advice,
    )


def _optimizer(parameters, h) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=h.lr, weight_decay=h.weight_decay)


def _scheduler(optimizer, h, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[h.scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(h.warmup_ratio * total_steps), num_training_steps=total_steps
    )


# --- resume, data order ------------------------------------------------------------------------


def resume_if_possible(run: Run) -> None:
    """Continue from the newest complete checkpoint in the output location, if there is one.

    Rank 0 picks it, so every rank loads the same one. On each node the first process fetches it
    (downloads it, for s3://; a pvc:// folder is read in place), then the node's other processes use
    that copy: ranks of one node never download into the same folder at once."""
    env = run.env
    names = _on_ranks(env, env.is_main, lambda: run.output.list_complete(checkpoint.CHECKPOINTS))[0]
    if not names:
        return
    newest = names[-1] if "/" in names[-1] else f"{checkpoint.CHECKPOINTS}/{names[-1]}"
    dest = Path(run.config.runtime.cache_dir) / "resume" / Path(newest).name
    fetched = _on_ranks(env, env.is_local_main, lambda: run.output.fetch_dir(newest, dest))[env.rank]
    folder = fetched if env.is_local_main else run.output.fetch_dir(newest, dest)  # found, not downloaded
    strategies.check_resumable(run.strategy, checkpoint.read_layout(folder), newest)
    state = checkpoint.load_trainer_files(folder, run.scheduler, run.env.rank)
    if state.fingerprint != run.data_report.fingerprint:
        raise ValueError(
            f"checkpoint {newest} was trained on other data (fingerprint {state.fingerprint[:12]} != "
            f"{run.data_report.fingerprint[:12]}); write to a new output URI or delete the checkpoints"
        )
    run.strategy.load_state(folder)  # weights and optimizer state, in the strategy's format
    state.resumes += 1
    run.state = state
    run.metrics.set(resumes=state.resumes)
    log("resumed", checkpoint=newest, step=state.step, resumes=state.resumes)


def _on_ranks(env: DistEnv, selected: bool, action) -> list:
    """Run `action` on the selected ranks; every rank gets every rank's result (None where not
    selected), in rank order. Collective, and a failure anywhere is raised on every rank, so no
    rank is left waiting in the next collective for one that gave up."""
    result, failure = None, None
    if selected:
        try:
            result = action()
        except Exception as error:
            failure = error
    outcomes = env.all_gather((result, None if failure is None else f"rank {env.rank}: {failure}"))
    if failure is not None:
        raise failure
    failed = [message for _, message in outcomes if message]
    if failed:
        raise storage.StorageError(failed[0])
    return [value for value, _ in outcomes]


def micro_batches(run: Run, step: int) -> list[list[int]]:
    """Indices of this rank's micro-batches for optimizer step `step` (0-based): a pure function
    of (seed, epoch, step), which is what makes resume exact."""
    h = run.config.spec.hyperparameters
    epoch, position = divmod(step, run.steps_per_epoch)
    generator = torch.Generator().manual_seed(h.seed * 1_000_003 + epoch)
    order = torch.randperm(len(run.train_set), generator=generator).tolist()
    start = position * h.global_batch_size
    global_batch = [order[(start + i) % len(order)] for i in range(h.global_batch_size)]
    per_rank = h.global_batch_size // run.env.world_size
    mine = global_batch[run.env.rank * per_rank : (run.env.rank + 1) * per_rank]
    return [mine[i : i + h.micro_batch_size] for i in range(0, len(mine), h.micro_batch_size)]


# --- the step ----------------------------------------------------------------------------------


def token_loss_sum(model, batch: dict, packed: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trainable tokens, and how many there were."""
    labels = batch.pop("labels")
    if _is_prompt_learning(model):
        batch.pop("position_ids", None)  # virtual tokens shift positions; PEFT builds its own
    if packed:
        # transformers keeps packed examples apart (a block-diagonal mask built from the
        # restarting position_ids) only when no attention_mask is given; right padding makes
        # dropping it safe, since no real token attends to the pads after it.
        batch.pop("attention_mask")
    if acceleration.fused_loss(model):  # the logits are never held whole: see acceleration.py
        loss = model(**batch, use_cache=False, **{acceleration.LOSS_KEYWORD: ("sum", labels)}).loss
        return loss, int((labels[:, 1:] != -100).sum())
    logits = model(**batch, use_cache=False).logits
    logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual-token logits
    shifted = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((shifted != -100).sum())


PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo")  # trained on preference pairs (collate_preference)


def collate(run: Run, examples: list) -> dict:
    if run.config.spec.objective in PAIRED_OBJECTIVES:
        return data.collate_preference(examples, run.tokenizer.pad_token_id)
    if run.config.spec.objective == "kto":
        return data.collate_unpaired(examples, run.tokenizer.pad_token_id)
    return data.collate(examples, run.tokenizer.pad_token_id)


def loss_units(run: Run, batch: dict) -> int:
    """What the loss is a mean over: trainable tokens (sft), preference pairs (dpo, orpo, simpo) or
    labelled replies (kto)."""
    if run.config.spec.objective in PAIRED_OBJECTIVES:
        return int(batch["chosen_input_ids"].shape[0])
    if run.config.spec.objective == "kto":
        return int(batch["desirable"].shape[0])
    return int((batch["labels"][:, 1:] != -100).sum())


def loss_sum(run: Run, model, batch: dict) -> tuple[torch.Tensor, int]:
    spec = run.config.spec
    if spec.objective == "dpo":
        settings = spec.dpo or DpoSettings()
        total, pairs, _ = dpo.dpo_loss_sum(model, batch, settings.beta, settings.loss_type)
        return total, pairs
    if spec.objective in ("orpo", "simpo", "kto"):
        total, count, _ = preference_loss_sum(spec, model, batch)
        return total, count
    return token_loss_sum(model, batch, packed=spec.dataset.packing)


def preference_loss_sum(spec, model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """ORPO, SimPO or KTO (preference.py) with the spec's settings, or their defaults."""
    if spec.objective == "orpo":
        return preference.orpo_loss_sum(model, batch, (spec.orpo or OrpoSettings()).beta)
    if spec.objective == "simpo":
        simpo = spec.simpo or SimpoSettings()
        return preference.simpo_loss_sum(model, batch, simpo.beta, simpo.gamma_beta_ratio)
    kto = spec.kto or KtoSettings()
    return preference.kto_loss_sum(model, batch, kto.beta, kto.desirable_weight, kto.undesirable_weight)


def input_tokens(batch: dict) -> int:
    return sum(int(mask.sum()) for key, mask in batch.items() if key.endswith("attention_mask"))


def train_step(run: Run, step: int) -> dict:
    h = run.config.spec.hyperparameters
    batches = [collate(run, [run.train_set[i] for i in indices]) for indices in micro_batches(run, step)]
    global_units = max(1.0, run.env.sum(sum(loss_units(run, b) for b in batches)))
    autocast = _autocast(run)
    total = 0.0
    for index, batch in enumerate(batches):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with run.strategy.no_sync(skip=index < len(batches) - 1), autocast:
            loss, _ = loss_sum(run, run.model, batch)
            # Every strategy averages gradients over ranks; scaling by world size turns that into a
            # sum, so the gradient is that of the mean over the whole global batch.
            run.strategy.backward(loss * run.env.world_size / global_units)
        total += loss.item()
    run.strategy.clip(h.max_grad_norm)
    run.strategy.step()
    run.scheduler.step()
    _adalora_update(run, step)  # reads this step's gradients, so before they are cleared
    run.strategy.zero_grad()
    return {
        "loss": run.env.sum(total) / global_units,
        "tokens": run.env.sum(sum(input_tokens(b) for b in batches)),
        "grad_norm": run.strategy.grad_norm,
    }


def evaluate(run: Run) -> float | None:
    if not run.eval_set:
        return None
    model, micro = run.model, run.config.spec.hyperparameters.micro_batch_size
    model.eval()
    mine = run.eval_set[run.env.rank :: run.env.world_size]
    # The same number of forward passes on every rank: a sharded model's forward is collective.
    rounds = math.ceil(math.ceil(len(run.eval_set) / run.env.world_size) / micro)
    total, units = 0.0, 0
    with torch.no_grad(), _autocast(run):
        for start in range(0, rounds * micro, micro):
            examples = mine[start : start + micro]
            batch = collate(run, examples or run.eval_set[:1])  # a filler, not counted
            batch = {k: v.to(run.device) for k, v in batch.items()}
            loss, count = loss_sum(run, model, batch)
            if examples:
                total, units = total + loss.item(), units + count
    model.train()
    return run.env.sum(total) / max(1.0, run.env.sum(units))


# --- the loop ----------------------------------------------------------------------------------


def fit(run: Run) -> None:
    spec = run.config.spec
    every_eval, every_save = spec.evaluation.every_steps, spec.checkpointing.every_steps
    run.model.train()
    started, tokens_seen = time.monotonic(), 0.0
    first_step = run.state.step
    compiled = run.accelerated if run.accelerated and run.accelerated.compiled_layers else None
    while run.state.step < run.total_steps:
        step_started = time.monotonic()
        result = train_step(run, run.state.step)
        if compiled and compiled.first_step_seconds is None:  # the first step pays for compilation
            compiled.first_step_seconds = round(time.monotonic() - step_started, 2)
            if run.env.is_main:
                log("compiled", first_step_seconds=compiled.first_step_seconds, layers=compiled.compiled_layers)
        run.state.step += 1
        step = run.state.step
        tokens_seen += result["tokens"]
        elapsed = time.monotonic() - started
        entry = {
            "step": step,
            "loss": round(result["loss"], 5),
            "grad_norm": _rounded(result["grad_norm"]),
            "lr": run.scheduler.get_last_lr()[0],
        }
        if every_eval and step % every_eval == 0 and step < run.total_steps:
            entry["eval_loss"] = evaluate(run)
        run.state.history.append(entry)
        _publish_metrics(run, entry, tokens_seen / elapsed, (step - first_step) / elapsed)
        run.trackers.metrics(step, tracking.step_metrics(entry, tokens_seen / elapsed))
        if run.env.is_main:
            log("step", **entry, tokens_per_second=round(tokens_seen / elapsed, 1), total_steps=run.total_steps)
        if _stop_agreed(run):
            save_checkpoint(run)
            raise Preempted()
        if step % every_save == 0 and step < run.total_steps:
            save_checkpoint(run)
    final_eval = evaluate(run)
    if final_eval is not None:
        run.state.history[-1]["eval_loss"] = final_eval
        run.metrics.set(eval_loss=final_eval)
        run.trackers.metrics(run.state.step, {"eval_loss": final_eval})
    run.timings["train_seconds"] = round(time.monotonic() - started, 2)
    run.timings["tokens_per_second"] = round(tokens_seen / max(1e-9, time.monotonic() - started), 1)


def _rounded(value: float | None) -> float | None:
    """For the log: 6 significant digits; None for an overflowed (fp16) step's infinite norm."""
    return float(f"{value:.6g}") if value is not None and math.isfinite(value) else None


def _stop_agreed(run: Run) -> bool:
    """Whether any rank got SIGTERM. Ranks get it at slightly different moments (and in a multi-node
    job only the preempted pod's ranks get it at all), so they agree after every step: all of
    them then checkpoint the same step, instead of some entering the checkpoint's collectives while
    others run the next step's."""
    return run.env.sum(1.0 if run.stop_requested else 0.0) > 0


def _publish_metrics(run: Run, entry: dict, tokens_per_second: float, steps_per_second: float) -> None:
    remaining = run.total_steps - entry["step"]
    memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    run.metrics.set(
        step=entry["step"],
        total_steps=run.total_steps,
        epoch=entry["step"] / run.steps_per_epoch,
        loss=entry["loss"],
        eval_loss=entry.get("eval_loss"),
        learning_rate=entry["lr"],
        tokens_per_second=tokens_per_second,
        samples_per_second=steps_per_second * run.config.spec.hyperparameters.global_batch_size,
        eta_seconds=remaining / steps_per_second if steps_per_second else None,
        gpu_memory_bytes=memory,
        resumes=run.state.resumes,
    )


def save_checkpoint(run: Run) -> None:
    """Every rank writes its own files into a staging folder, published atomically; rank 0 then
    prunes old checkpoints. When the output's local folder is shared by all ranks (one node, or a
    pvc:// volume every node mounts), rank 0 publishes the one staging folder. Otherwise (s3:// across
    nodes) each node stages in its own cache and the nodes publish together (`_publish_from_every_node`)."""
    step = run.state.step
    per_node = run.env.multi_node and not run.output.local_dir_shared
    staging = _shared_staging(run, f"step-{step:08d}", per_node)
    run.strategy.save_state(staging)  # rank 0 alone (replicated) or every rank its shards
    checkpoint.save_rank_files(staging, run.env.rank)
    if run.env.is_main:
        checkpoint.save_trainer_files(staging, run.scheduler, run.state, strategies.describe(run.strategy))
    run.env.barrier()
    if per_node:
        uri = _publish_from_every_node(run, staging, checkpoint.checkpoint_name(step))
    elif run.env.is_main:
        uri = run.output.publish_dir(staging, checkpoint.checkpoint_name(step))
        shutil.rmtree(staging, ignore_errors=True)
    if run.env.is_main:
        kept = run.output.list_complete(checkpoint.CHECKPOINTS)
        for old in kept[: -run.config.spec.checkpointing.keep]:
            run.output.delete(old if "/" in old else f"{checkpoint.CHECKPOINTS}/{old}")
        log("checkpoint", step=step, uri=uri)
    run.env.barrier()


def _shared_staging(run: Run, name: str, per_node: bool = False) -> Path:
    """The staging folder the ranks write into, made empty before anyone writes: by rank 0 in the
    output's shared local folder, or (`per_node`) by each node's first process in its node's own."""
    root = run.output.local_dir() / ".staging"
    folder = root / name
    if run.env.is_local_main if per_node else run.env.is_main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    run.env.barrier()
    return folder


def _publish_from_every_node(run: Run, staging: Path, name: str) -> str | None:
    """A folder whose files lie on several nodes, published in phases, each ended by a collective:
    rank 0 unmarks and empties `name`; each node's first process uploads its node's staging folder;
    rank 0 checks that every uploaded file is there and writes the marker. Until then the folder
    has no marker, so no reader takes it for complete. Returns its URI on rank 0."""
    env, output = run.env, run.output
    _on_ranks(env, env.is_main, lambda: output.begin_dir(name))

    def upload() -> list[str]:
        files = output.upload_part(staging, name)
        shutil.rmtree(staging, ignore_errors=True)
        return files

    parts = _on_ranks(env, env.is_local_main, upload)
    files = sorted({file for part in parts if part for file in part})
    return _on_ranks(env, env.is_main, lambda: output.finish_dir(name, files))[0]


# --- output ------------------------------------------------------------------------------------


def save_outputs(run: Run) -> dict | None:
    """Adapter (+ tokenizer) and optionally the merged model, each published atomically; returns
    the artifact description for the report and the termination message (None off rank 0).
    Every rank calls it: sharded weights are gathered to rank 0, which writes."""
    spec = run.config.spec
    staging = Path(tempfile.mkdtemp(prefix="adapter-", dir=run.config.runtime.cache_dir)) if run.env.is_main else None
    run.strategy.save_pretrained(staging)
    if staging is None:
        return None
    if run.initial_adapter is not None:  # trained on a changed base: an ordinary LoRA for the real one
        methods.convert_saved_adapter(staging, run.initial_adapter)
    run.tokenizer.save_pretrained(staging)
    weights = next(iter(sorted(staging.glob("*.safetensors"))))
    artifact = {"uri": None, "sizeBytes": weights.stat().st_size, "sha256": storage.sha256_of(weights)}
    artifact["uri"] = run.output.publish_dir(staging, ADAPTER_DIR)
    run.trackers.artifacts(staging)  # before the staging folder goes
    if spec.output.exports:
        _publish_exports(run, staging, artifact)
    shutil.rmtree(staging, ignore_errors=True)
    return artifact


def _publish_exports(run: Run, staging: Path, artifact: dict) -> None:
    """spec.output.export (mergeWeights is `merged`): the merged model under merged/, and GGUF files
    written from it beside the adapter. A full fine-tune's weights are already the whole model:
    there is nothing to merge, and its GGUF files are written from the adapter folder itself."""
    from . import export

    spec, cache = run.config.spec, Path(run.config.runtime.cache_dir)
    if not spec.method.is_adapter:
        source, merged_dir = staging, None
    else:
        merged_dir = Path(tempfile.mkdtemp(prefix="merged-", dir=cache))
        _merged_model(run, staging).save_pretrained(merged_dir, safe_serialization=True)
        run.tokenizer.save_pretrained(merged_dir)
        source = merged_dir
    try:
        if "gguf" in spec.output.exports:
            types = spec.output.gguf_types()
            artifact["gguf"] = export.publish_gguf(source, types, run.output, cache, run.config.runtime.job_name)
        if merged_dir is not None and "merged" in spec.output.exports:
            artifact["mergedUri"] = run.output.publish_dir(merged_dir, MERGED_DIR)
    finally:
        if merged_dir is not None:
            shutil.rmtree(merged_dir, ignore_errors=True)


def _merged_model(run: Run, adapter_dir: Path):
    """The base with the adapter folded in. Rank 0 reloads the base on its CPU and applies the
    adapter it has just saved when no rank holds the whole model (FSDP, ZeRO-3) and for QLoRA:
    folding an adapter into 4-bit weights would quantize it again and lose part of it, so the merge
    goes into the original weights, in the compute dtype."""
    quantized = run.config.spec.method.type == "qlora"
    if not run.strategy.gathers_to_merge and not quantized:
        return run.strategy.module.merge_and_unload()
    from peft import PeftModel

    base = methods.load_base_model(run.model_dir, run.config.spec, on_gpu=run.device.type == "cuda", quantized=False)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def evaluate_published(run: Run) -> dict | None:
    """Rank 0, once the adapter is published: the tuned model against the base (evaluation.py), or
    None when spec.evaluation.enabled is false. Never raises: a failure is a note in the result.
    The training copy of the model (weights, gradients, optimizer state) goes first: the evaluation
    loads the published weights on the same device."""
    run.model = run.optimizer = run.scheduler = run.strategy = None  # type: ignore[assignment]
    cache = Path(run.config.runtime.cache_dir)
    return evaluation.evaluate_after_training(
        run.config.spec,
        model_dir=run.model_dir,
        tuned_dir=lambda: run.output.fetch_dir(ADAPTER_DIR, cache / "evaluation" / ADAPTER_DIR),
        tokenizer=run.tokenizer,
        eval_set=run.eval_set,
        device=run.device,
        cache_dir=cache,
        local=run.config.runtime.local,
    )


def build_result(run: Run, artifact: dict, evaluated: dict | None = None) -> TrainerResult:
    last = run.state.history[-1] if run.state.history else {}
    return TrainerResult.model_validate(
        {
            "phase": "Succeeded",
            "adapter": artifact,
            "metrics": {
                "trainLoss": last.get("loss"),
                "evalLoss": last.get("eval_loss"),
                "tokensPerSecond": run.timings.get("tokens_per_second"),
            },
            "steps": run.state.step,
            "trainableParams": run.plan.trainable_params,
            "totalParams": run.plan.total_params,
            "plan": {
                "worldSize": run.plan.world_size,
                "strategy": run.plan.strategy,
                "microBatch": run.plan.micro_batch,
                "gradAccumulation": run.plan.grad_accumulation,
            },
            "data": {"fingerprint": run.data_report.fingerprint, "badRows": run.data_report.bad_rows},
            "evaluation": evaluated,
        }
    )


# --- entry point -------------------------------------------------------------------------------


def run_training(config: TrainerConfig) -> int:
    """Train, checkpoint, resume, report. Returns the process exit code; whatever goes wrong ends
    as a termination message (`failure`), never as an exception out of here."""
    env = DistEnv.from_env()
    run = None
    stage = "setup"
    try:
        env.init()
        run = setup(config, env)
        run.trackers = tracking.open_trackers(
            config.spec,
            job_name=config.runtime.job_name,
            namespace=config.runtime.namespace,
            work_dir=Path(config.runtime.cache_dir) / "tracking",
            publish=run.output.publish_dir,
            main=env.is_main,
            allow_node_local=config.runtime.local,
        )
        run.trackers.params(tracking.job_params(config.spec, _plan_params(run)))
        _handle_sigterm(run)
        if env.is_main:
            run.metrics.set(
                trainable_parameters=run.plan.trainable_params,
                total_parameters=run.plan.total_params,
                total_steps=run.total_steps,
            )
            run.metrics.serve(config.runtime.metrics_port)
            log("plan", summary=run.plan.summary(), total_steps=run.total_steps, data=vars(run.data_report))
        resume_if_possible(run)
        stage = "training"
        fit(run)
        env.barrier()
        artifact = save_outputs(run)
        if not env.is_main:
            return 0
        evaluated = evaluate_published(run)
        run.trackers.evaluation(evaluated)
        result = build_result(run, artifact, evaluated)
        _write_report(run, result)
        result.write(config.runtime.termination_message_path)
        run.trackers.finish(ok=True)
        log("done", **result.to_wire())
        return 0
    except Preempted:
        log("preempted", step=run.state.step if run else 0)
        mark_preempted()
        return EXIT_PREEMPTED
    except Exception as error:
        reason, message, code = failure(error, stage)
        if reason == "UnexpectedError":
            traceback.print_exc()  # a bug or a broken machine: the log keeps the whole story
        return _fail(config, env, reason, message, code)
    finally:
        if run is not None:
            run.trackers.finish(ok=False)  # after a failure or a preemption; nothing once finished
            run.metrics.stop()
        env.shutdown()


def _plan_params(run: Run) -> dict:
    plan = run.plan
    return {
        "worldSize": plan.world_size,
        "strategy": plan.strategy,
        "microBatch": plan.micro_batch,
        "gradAccumulation": plan.grad_accumulation,
        "trainableParams": plan.trainable_params,
        "totalParams": plan.total_params,
        "totalSteps": run.total_steps,
    }


def failure(error: Exception, stage: str) -> tuple[str, str, int]:
    """(reason, message, exit code) for an exception that ended a run.

    Before training starts (`stage` "setup": reading the config's URIs, the model, the data, a
    checkpoint to resume) a ValueError, and a recursion, memory or decoding error out of a parser,
    is the input's fault: InvalidInput, exit 2, never retried. So is an output location that refuses
    writes. Other storage errors may pass (a bucket briefly unreachable): exit 1, retried. Anything
    else is unexpected: exit 1, with its type and first line in the message."""
    if isinstance(error, storage.OutputNotWritable):
        return "InvalidInput", str(error), EXIT_INVALID_INPUT
    if isinstance(error, storage.StorageError):
        return ("InputUnavailable" if stage == "setup" else "OutputUnavailable"), str(error), 1
    if stage == "setup" and isinstance(error, ValueError):
        return "InvalidInput", str(error), EXIT_INVALID_INPUT
    if stage == "setup" and isinstance(error, RecursionError | MemoryError):
        message = f"an input is nested too deeply or too large to read ({first_line(error)})"
        return "InvalidInput", message, EXIT_INVALID_INPUT
    return "UnexpectedError", first_line(error), 1


def _fail(config: TrainerConfig, env: DistEnv, reason: str, message: str, code: int) -> int:
    """Say why in the log and in the termination message the operator turns into a condition; every
    rank also leaves it for torchrun's launcher, which reports the failure of whichever rank had it."""
    result = TrainerResult.failed(reason, message)
    if env.is_main:
        log("failed", reason=reason, message=message)
        result.write(config.runtime.termination_message_path)
    record_failure(env.rank, code, result, config.runtime.termination_message_path)
    return code


def _write_report(run: Run, result: TrainerResult) -> None:
    report = {
        **result.to_wire(),
        "config": run.config.to_wire(),
        "data": vars(run.data_report),
        "history": run.state.history,
        "timings": run.timings,
        "kernels": run.accelerated.to_wire() if run.accelerated else None,
        "versions": _versions(),
    }
    path = Path(run.config.runtime.cache_dir) / REPORT_FILE
    path.write_text(json.dumps(report, indent=1, default=str))
    run.output.publish_file(path, REPORT_FILE)


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _handle_sigterm(run: Run) -> None:
    """Kubernetes sends SIGTERM before killing a pod (preemption, drain): finish the step, save."""

    def request_stop(signum, frame):
        run.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)


def _is_prompt_learning(model) -> bool:
    config = getattr(acceleration.unwrap(model), "peft_config", {}).get("default")
    return bool(config and getattr(config, "is_prompt_learning", False))


def _autocast(run: Run):
    precision = run.config.spec.hyperparameters.precision
    if precision == "fp32":
        return torch.autocast(run.device.type, enabled=False)
    return torch.autocast(run.device.type, dtype=methods.DTYPES[precision])


def _adalora_update(run: Run, step: int) -> None:
    if run.config.spec.method.type == "adalora":
        run.strategy.module.base_model.update_and_allocate(step)
