"""Standard benchmarks: lm-evaluation-harness (PyPI lm-eval) tasks run on the tuned model.

    fetch_tasks          spec.evaluation.benchmarks.taskUri → a local folder (or one YAML file)
    run_benchmarks       the loaded tuned model (adapter applied) through lm-eval → task -> metric -> score
    scores_from          lm-eval's results → the finite scores a status can hold (pure)

The model is the one the evaluation already holds in memory (the base with the published adapter,
or the saved full fine-tune), handed to lm-eval's `HFLM` as an object: nothing is loaded twice, and
what is scored is what was published.

Tasks come from the YAML files under `taskUri` (a folder on a PVC or in a bucket, or one YAML key of
a ConfigMap next to its data keys) or are lm-eval's own. lm-eval reads a task's `data_files` relative
to the process's working directory; here a relative path is read relative to the YAML file that names
it (else the task folder's root), so a folder works wherever it is mounted. When every task comes
from `taskUri`, nothing may reach the network (the Hugging Face Hub and datasets are switched to
offline for the run): local JSON/CSV/Parquet data still loads. lm-eval's own tasks download their
data from the Hub, so then the environment decides, as the API documents.

Scores are lm-eval's aggregated metrics under lm-eval's names, with the filter (`acc,none`,
`exact_match,strict-match`), so a promotion rule names them as `benchmarks.TASK.acc,none`. Standard
errors, aliases and anything that is not a finite number are dropped, and names a rule could not
name (api.evaluation BENCHMARK_NAME / BENCHMARK_METRIC) are left out, at most 20 tasks of 16 scores.

A mistake in the spec (a task no YAML file defines, a taskUri that is not task files) is one
`BenchmarkError` line; `run_benchmarks` turns it, and any failure inside lm-eval, into a note, so a
broken benchmark never costs the evaluation's other metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kubetune.api.evaluation import BENCHMARK_METRIC, BENCHMARK_NAME
from kubetune.logs import log

MAX_TASKS = 20  # EvaluationResult.benchmarks and contract.ResultEvaluation keep no more
MAX_METRICS = 16
TASK_SUFFIXES = (".yaml", ".yml")
_TASK_NAME = re.compile(f"^{BENCHMARK_NAME}$")
_METRIC_NAME = re.compile(f"^{BENCHMARK_METRIC}$")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class BenchmarkError(ValueError):
    """A benchmark the spec asks for cannot run, for a reason the user can fix; one line."""


# --- where the tasks come from -------------------------------------------------------------------


def fetch_tasks(uri: str, *, cache_dir: Path, local: bool) -> Path:
    """The local copy of `taskUri`: a folder of task YAML files and their data, or one YAML file
    (a ConfigMap key; its data are the ConfigMap's other keys, beside it). Read through the same
    storage code as the dataset (pvc, configmap, s3 folders, file:// on a local run)."""
    from kubetune import storage

    path = storage.resolve_input(uri, cache_dir=Path(cache_dir), local=local)
    if path.is_file() and path.suffix not in TASK_SUFFIXES:
        raise BenchmarkError(f"{uri}: taskUri must be a folder of lm-eval task YAML files, or one .yaml file")
    return path


def _index_root(task_dir: Path, scratch: Path) -> Path:
    """What lm-eval scans for YAML files: the folder itself, or, for a single YAML file, a folder
    holding only a link to it (its own folder may hold anything; lm-eval would scan all of it)."""
    if task_dir.is_dir():
        return task_dir
    if not task_dir.is_file():
        raise BenchmarkError(f"{task_dir}: the benchmark task folder does not exist")
    (scratch / task_dir.name).symlink_to(task_dir.resolve())
    return scratch


def _unknown_message(unknown: list[str], task_dir: Path | None) -> str:
    where = f"the task files of taskUri ({task_dir}) nor " if task_dir is not None else ""
    names = ", ".join(repr(name) for name in unknown[:5])
    return (
        f"unknown benchmark task {names}: not in {where}lm-eval's own tasks; check "
        "spec.evaluation.benchmarks.tasks (a task is named by the `task:` or `group:` key of its YAML file)"
    )


def _reached(name: str, index: Mapping[str, Any], seen: set[str]) -> Iterator[str]:
    """The task names a requested task, group or tag runs (itself, members, tagged tasks)."""
    if name in seen or name not in index:
        return
    seen.add(name)
    entry = index[name]
    kind = entry.kind.name
    if kind in ("TASK", "PY_TASK"):
        yield name
    members = entry.tags if kind == "TAG" else (entry.cfg or {}).get("task") if kind == "GROUP" else None
    for member in members if isinstance(members, list | set) else []:
        child = (member.get("task") or member.get("group")) if isinstance(member, dict) else member
        if isinstance(child, str):
            yield from _reached(child, index, seen)


def local_data_files(value: Any, yaml_dir: Path, root: Path) -> Any:
    """`data_files` (a path, a list, or split -> path(s)) with each relative local path made
    absolute: beside the YAML file when it is there, else under the task folder's root. URLs
    (hf://, https://) and absolute paths are kept."""
    if isinstance(value, dict):
        return {split: local_data_files(files, yaml_dir, root) for split, files in value.items()}
    if isinstance(value, list):
        return [local_data_files(files, yaml_dir, root) for files in value]
    if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    beside = yaml_dir / value
    found = bool(value) and (beside.exists() or any(yaml_dir.glob(value)))
    return str(beside if found else root / value)


def _pin_local_tasks(index: dict[str, Any], names: set[str], root: Path, cache_dir: Path | None) -> None:
    """Replace each local task's index entry by its full config with its data files made absolute
    (and datasets' cache under `cache_dir`): lm-eval then builds it, directly or as a group member,
    from that config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for name in names:
        entry = index[name]
        if entry.yaml_path is None:
            continue
        config = load_yaml(entry.yaml_path, resolve_func=True)
        kwargs = dict(config.get("dataset_kwargs") or {})
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = local_data_files(kwargs[key], Path(entry.yaml_path).resolve().parent, root)
        if cache_dir is not None:
            kwargs.setdefault("cache_dir", str(Path(cache_dir) / "datasets"))
        config["dataset_kwargs"] = kwargs
        entry.cfg, entry.yaml_path = config, None


# --- offline ------------------------------------------------------------------------------------


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The Hugging Face Hub and datasets offline for the block, environment and the flags the
    libraries read once at import (setting only the environment would be too late), restored after."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    saved = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        (
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE,
        ) = saved


# --- scores (pure) ------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def task_scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """One task's finite scores under names a rule can name. A score is `metric,filter`: what has no
    filter (the alias, `sample_len`) is no score, and standard errors are left out."""
    kept: dict[str, float] = {}
    for name, value in metrics.items():
        if len(kept) == MAX_METRICS:
            break
        if "," not in name or "_stderr" in name or not _METRIC_NAME.match(name) or not _finite(value):
            continue
        kept[name] = round(float(value), 6)
    return kept


def scores_from(results: Mapping[str, Any], requested: list[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """lm-eval's `results` → (task -> metric -> score, notes). The requested tasks come first,
    then what they expanded to (a group's or tag's tasks), at most MAX_TASKS."""
    table = results.get("results") or {}
    order = [name for name in requested if name in table] + [name for name in table if name not in requested]
    scores: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name in order:
        kept = task_scores(table[name]) if _TASK_NAME.match(name) and isinstance(table[name], Mapping) else {}
        if kept and len(scores) < MAX_TASKS:
            scores[name] = kept
        elif kept:
            notes.append(f"benchmarks: only the first {MAX_TASKS} tasks' scores are kept")
            break
        elif name in requested:
            notes.append(f"benchmark {name}: lm-eval reported no numeric score")
    notes += [f"benchmark {name}: lm-eval reported nothing" for name in requested if name not in table]
    return scores, notes


def limit_notes(results: Mapping[str, Any], limit: int) -> list[str]:
    """Where the limit cut a task short: `task: N of M examples`. lm-eval's `n-samples`."""
    notes = []
    for name, counts in (results.get("n-samples") or {}).items():
        effective, original = (counts or {}).get("effective"), (counts or {}).get("original")
        if isinstance(effective, int) and isinstance(original, int) and effective < original:
            notes.append(f"benchmark {name}: {effective} of {original} examples (limit {limit})")
    return notes


# --- the run ------------------------------------------------------------------------------------


def run_benchmarks(
    model,
    tokenizer,
    spec,
    device,
    task_dir: Path | None,
    batch_size: int = 8,
    *,
    cache_dir: Path | None = None,
    max_length: int | None = None,
) -> tuple[dict[str, dict[str, float]], list[str], float]:
    """Run `spec` (api BenchmarksSpec) on `model`, an already-loaded transformers model (a PeftModel
    with the adapter applied works as it is), on `device`. `task_dir` is `fetch_tasks(taskUri)`, or
    None for lm-eval's own tasks only. `cache_dir` keeps datasets' Arrow cache off $HOME (a pod's
    may be read-only). Returns (task -> metric -> score, notes, seconds); never raises: a failure
    is a note and no scores."""
    started = time.monotonic()
    try:
        scores, notes = _run(model, tokenizer, spec, device, task_dir, batch_size, cache_dir, max_length)
    except BenchmarkError as error:
        scores, notes = {}, [f"benchmarks skipped: {error}"]
    except Exception as error:  # noqa: BLE001 - a benchmark must never cost the other metrics
        from kubetune.logs import first_line

        scores, notes = {}, [f"benchmarks failed: {first_line(error)}"]
    seconds = round(time.monotonic() - started, 2)
    log("benchmarks", tasks=list(spec.tasks), scores=scores, notes=notes, seconds=seconds)
    return scores, notes, seconds


def _run(model, tokenizer, spec, device, task_dir, batch_size, cache_dir, max_length):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    requested = list(dict.fromkeys(spec.tasks))
    with tempfile.TemporaryDirectory(prefix="kubetune-tasks-") as scratch:
        root = _index_root(Path(task_dir), Path(scratch)) if task_dir is not None else None
        manager = TaskManager(include_path=str(root), include_defaults=False) if root else None
        local = manager.task_index if manager else {}
        if manager is None or any(name not in local for name in requested):
            manager = TaskManager(include_path=str(root) if root else None, include_defaults=True)
        index = manager.task_index
        unknown = [name for name in requested if name not in index]
        if unknown:
            raise BenchmarkError(_unknown_message(unknown, task_dir))
        reached: set[str] = set()
        for name in requested:
            reached.update(_reached(name, index, set()))
        _pin_local_tasks(index, {name for name in reached if name in local}, root or Path("."), cache_dir)
        all_local = all(name in local for name in (*requested, *reached))  # else lm-eval's own may download
        if device is not None and model.device != torch.device(device):
            model.to(device)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with offline() if all_local else contextlib.nullcontext():
            results = simple_evaluate(
                model=lm,
                tasks=requested,
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=manager,
                bootstrap_iters=0,  # standard errors are dropped: no need to bootstrap them
                log_samples=False,
            )
    scores, notes = scores_from(results or {}, requested)
    return scores, limit_notes(results or {}, spec.limit) + notes
