"""Experiment trackers: what a FineTuneJob reports to MLflow and Weights & Biases (`spec.tracking`).

Rank 0 opens them (`open_trackers`); every other rank gets a `Trackers` that holds none, so the
training loop makes the same calls on every rank:

    trackers.params(job_params(spec, plan))                       # once, after set-up
    trackers.metrics(step, step_metrics(entry, tokens_per_second))   # every optimizer step
    trackers.evaluation(evaluated)        # the EvaluationResult dict, flattened to rule names
    trackers.artifacts(adapter_dir)       # the adapter folder, before its staging copy goes
    trackers.finish(ok)                   # the end, also after a failure

A tracker never fails training. Its first failure (the server down, a refused token, a name the
server does not take) is one `tracker_failed` log line, and the tracker is dropped for the rest of
the run; the others go on. Every call is bounded: MLflow's HTTP client gets a 5 s timeout, one
retry and no back-off (`MLFLOW_HTTP_*` set in the environment still win), so an unreachable server
costs seconds, once; W&B gets 30 s to start a run and 10 minutes for its final upload.

MLflow: the experiment is `spec.tracking.mlflow.experiment` (default: the job's namespace), the run
is named after the job and tagged with it. Params and metrics go through the tracking client's REST
calls (`mlflow-skinny` suffices); the adapter goes to the run's artifacts under `adapter/`. The
tracking URI passes the API's URI rule (`uris.uri_problem`) before anything connects to it: a pod
never sends its run to the node's loopback or metadata address, nor follows a redirect there.
Local runs (`kubetune train` on one's own machine, where file:// is allowed too) may name a
loopback server: MLflow on localhost:5000 is the usual set-up there.

Weights & Biases: `online` or `offline` (no network at all). An offline run is written to the
trainer's scratch folder and, at the end, published to the job's output as `wandb/RUN-FOLDER`,
ready for `wandb sync`. Credentials (MLFLOW_TRACKING_TOKEN, WANDB_API_KEY, ...) come from the
Secrets the operator turns into the trainer's environment; nothing here reads a Secret.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubetune.api.uris import node_local_host, uri_problem
from kubetune.logs import first_line, log

# Bounds on what is sent: a tracker is a side channel, never a reason for a large request.
MAX_PARAMS = 200
MAX_PARAM_VALUE = 500
MAX_METRICS = 400  # one evaluation: 16 compared metrics x 3 sides, 20 tasks x 16 scores, a few more
MLFLOW_BATCH = 100  # params per MLflow log_batch (the server refuses more)
MLFLOW_MAX_KEY = 250

# MLflow's HTTP client, unless the environment says otherwise: an unreachable server costs seconds.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}
# Always: the URI the rule checked is the only address the client connects to, and stdout is the JSON log.
MLFLOW_FORCED = {"MLFLOW_ALLOW_HTTP_REDIRECTS": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
WANDB_INIT_TIMEOUT_S = 30.0
WANDB_FINISH_TIMEOUT_S = 600.0
WANDB_OUTPUT = "wandb"  # where an offline run is published in the job's output

# The spec's parts a run is compared by; output, run policy, placement and the trackers are not.
PARAM_SECTIONS = (
    "model", "dataset", "method", "objective", "hyperparameters", "dpo", "orpo", "simpo", "kto", "distributed",
    "evaluation",
)  # fmt: skip

Publish = Callable[[Path, str], str]


class Tracker(Protocol):
    """One experiment tracker; any exception out of a method drops it (see `Trackers`)."""

    name: str
    where: str  # the run, for the log: a URL, or a folder

    def params(self, values: Mapping[str, str]) -> None: ...
    def metrics(self, step: int, values: Mapping[str, float]) -> None: ...
    def evaluation(self, step: int, values: Mapping[str, float]) -> None: ...
    def artifacts(self, adapter_dir: Path) -> None: ...
    def finish(self, ok: bool) -> None: ...


class Trackers:
    """The trackers of one run (none on ranks other than 0, or without spec.tracking). Every method
    returns normally: a tracker that raises is logged once and dropped."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self._live: list[Tracker] = list(trackers or [])
        self._step = 0

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self._live]

    def params(self, values: Mapping[str, Any]) -> None:
        clean = {str(key): str(value)[:MAX_PARAM_VALUE] for key, value in list(values.items())[:MAX_PARAMS]}
        if clean:
            self._each("params", lambda tracker: tracker.params(clean))

    def metrics(self, step: int, values: Mapping[str, Any]) -> None:
        readings = finite_readings(values)
        self._step = max(self._step, step)
        if readings:
            self._each("metrics", lambda tracker: tracker.metrics(step, readings))

    def evaluation(self, result: Mapping[str, Any] | None) -> None:
        readings = evaluation_metrics(result)
        if readings:
            self._each("evaluation", lambda tracker: tracker.evaluation(self._step, readings))

    def artifacts(self, adapter_dir: Path) -> None:
        self._each("artifacts", lambda tracker: tracker.artifacts(Path(adapter_dir)))

    def finish(self, ok: bool) -> None:
        """Ends every run (FINISHED, or FAILED when `ok` is false); later calls do nothing."""
        self._each("finish", lambda tracker: tracker.finish(ok))
        self._live = []

    def _each(self, action: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self._live):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - a tracker must never fail training
                self._live.remove(tracker)
                log("tracker_failed", tracker=tracker.name, action=action, message=first_line(error))


def open_trackers(
    spec: Any,
    *,
    job_name: str,
    namespace: str,
    work_dir: Path,
    publish: Publish | None = None,
    main: bool = True,
    allow_node_local: bool = False,
) -> Trackers:
    """The trackers `spec.tracking` names, started; an empty `Trackers` off rank 0 (`main` false) or
    when none is configured. A tracker that cannot start is one `tracker_failed` line, not an error.

    `work_dir`: scratch for W&B's run folder. `publish(folder, name)`: publishes a folder into the
    job's output (OutputLocation.publish_dir), used for an offline W&B run. `allow_node_local`:
    a local run, which may name a loopback MLflow server."""
    tracking = getattr(spec, "tracking", None)
    if not main or tracking is None:
        return Trackers()
    openers: list[tuple[str, Callable[[], Tracker]]] = []
    if tracking.mlflow is not None:
        settings = tracking.mlflow
        openers.append(("mlflow", lambda: MlflowTracker(settings, job_name, namespace, allow_node_local)))
    if tracking.wandb is not None:
        wandb_settings = tracking.wandb
        openers.append(("wandb", lambda: WandbTracker(wandb_settings, job_name, namespace, work_dir, publish)))
    started: list[Tracker] = []
    for name, opener in openers:
        try:
            started.append(opener())
        except Exception as error:  # noqa: BLE001 - a tracker must never fail training
            log("tracker_failed", tracker=name, action="open", message=first_line(error))
    if started:
        log("tracking", **{tracker.name: tracker.where for tracker in started})
    return Trackers(started)


# --- what is reported (pure) --------------------------------------------------------------------


def job_params(spec: Any, plan: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The run's parameters: the spec's model, data, method, hyperparameters and evaluation as
    dotted wire names (`hyperparameters.learningRate`, `method.lora.r`), the nodes and GPUs, and
    `plan.*` (world size, strategy, micro-batch, parameters) when given. At most MAX_PARAMS."""
    wire = spec.to_wire()
    params: dict[str, str] = {}
    for section in PARAM_SECTIONS:
        if section in wire:
            _flatten(section, wire[section], params)
    resources = wire.get("resources") or {}
    for key in ("nodes", "gpusPerNode"):
        if key in resources:
            params[f"resources.{key}"] = str(resources[key])
    _flatten("plan", dict(plan or {}), params)
    return dict(list(params.items())[:MAX_PARAMS])


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            if key != "secretRef":  # a Secret's name says nothing about the run
                _flatten(f"{prefix}.{key}", inner, into)
    elif value is not None and value != {}:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        into[prefix] = text[:MAX_PARAM_VALUE]


def step_metrics(entry: Mapping[str, Any], tokens_per_second: float | None = None) -> dict[str, float]:
    """One logged step of the loop (`{"step", "loss", "grad_norm", "lr", "eval_loss"?}`) under the
    names the trackers show: train_loss, eval_loss, learning_rate, grad_norm, tokens_per_second."""
    names = {"loss": "train_loss", "eval_loss": "eval_loss", "lr": "learning_rate", "grad_norm": "grad_norm"}
    values = {name: entry.get(key) for key, name in names.items()}
    values["tokens_per_second"] = tokens_per_second
    return finite_readings(values)


def evaluation_metrics(result: Mapping[str, Any] | None) -> dict[str, float]:
    """An EvaluationResult (wire form) under the names promotion rules use: `rougeL.delta`,
    `perplexity.tuned`, `forgettingRatio`, `benchmarks.TASK.METRIC`; and what it cost as
    `evaluation.examples`, `evaluation.seconds`, `evaluation.tokensGenerated`. Finite numbers only."""
    if not isinstance(result, Mapping):
        return {}
    values: dict[str, Any] = {}
    for family, sides in _items(result.get("metrics")):
        for side, value in _items(sides):
            values[f"{family}.{side}"] = value
    values["forgettingRatio"] = result.get("forgettingRatio")
    for task, scores in _items(result.get("benchmarks")):
        for metric, value in _items(scores):
            values[f"benchmarks.{task}.{metric}"] = value
    for key in ("examples", "seconds", "tokensGenerated"):
        values[f"evaluation.{key}"] = result.get(key)
    return dict(list(finite_readings(values).items())[:MAX_METRICS])


def _items(value: Any) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in value.items()] if isinstance(value, Mapping) else []


def finite_readings(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are finite numbers (not None, NaN, infinity or a JSON true), as floats."""
    return {
        str(key): float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def mlflow_uri_problem(uri: str, allow_node_local: bool = False) -> str | None:
    """Why the trainer will not talk to this MLflow tracking URI, or None: the API's URI rule for
    http(s). `allow_node_local` (local runs) lets a loopback or metadata-style host through, and
    nothing else the rule refuses."""
    problem = uri_problem(uri, ("http", "https"))
    if problem is None or not allow_node_local:
        return problem
    try:
        node_local = node_local_host(urlsplit(uri).hostname or "")
    except ValueError:
        return problem
    return None if node_local and problem.endswith(node_local) else problem


_MLFLOW_NAME = re.compile(r"[^\w./\- :]")


def mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts: lm-eval's `acc,none` becomes `acc:none` (MLflow takes
    letters, digits, `_ - . / : ` and spaces), at most 250 characters."""
    return _MLFLOW_NAME.sub("_", key.replace(",", ":"))[:MLFLOW_MAX_KEY]


def wandb_artifact_name(job_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{job_name}-adapter")[:128]


# --- MLflow -------------------------------------------------------------------------------------


class MlflowTracker:
    """A run on an MLflow tracking server, through MlflowClient (no global mlflow state)."""

    name = "mlflow"

    def __init__(self, settings: Any, job_name: str, namespace: str, allow_node_local: bool = False):
        problem = mlflow_uri_problem(settings.tracking_uri, allow_node_local)
        if problem:
            raise ValueError(f"spec.tracking.mlflow.trackingUri {problem}")
        bound_mlflow_http()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        self.log_artifacts = settings.log_artifacts
        experiment_id = self._experiment(settings.experiment or namespace)
        tags = {"kubetune.job": job_name, "kubetune.namespace": namespace}
        self.run_id = self.client.create_run(experiment_id, run_name=job_name, tags=tags).info.run_id
        self.where = f"{settings.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:
            found = self.client.get_experiment_by_name(name)  # another job created it meanwhile
            if found is None:
                raise
            return str(found.experiment_id)

    def params(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_name(key), value) for key, value in values.items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH], synchronous=True)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(key), value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def evaluation(self, step: int, values: Mapping[str, float]) -> None:
        self.metrics(step, values)

    def artifacts(self, adapter_dir: Path) -> None:
        if self.log_artifacts:
            self.client.log_artifacts(self.run_id, str(adapter_dir), artifact_path="adapter")

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def bound_mlflow_http() -> None:
    """Short timeouts for MLflow's HTTP client (what the environment sets wins); no redirects (the
    URI the rule checked is the only address the client connects to); and no run links printed on
    stdout, which carries the trainer's JSON log (the `tracking` line names the run instead)."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.update(MLFLOW_FORCED)


# --- Weights & Biases ---------------------------------------------------------------------------


class WandbTracker:
    """A W&B run; offline, its folder is published to the job's output when it ends."""

    name = "wandb"

    def __init__(self, settings: Any, job_name: str, namespace: str, work_dir: Path, publish: Publish | None):
        import wandb

        self.wandb = wandb
        self.offline = settings.mode == "offline"
        self.publish = publish
        self.job_name, self.namespace = job_name, namespace
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = self._init(settings, work_dir)
        except Exception:
            with contextlib.suppress(Exception):
                wandb.teardown()  # a run that never started leaves no wandb-core service behind
            raise
        self.where = str(Path(self.run.dir).parent) if self.offline else str(self.run.url)

    def _init(self, settings: Any, work_dir: Path) -> Any:
        wandb = self.wandb
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=self.job_name,
            group=self.namespace,
            job_type="fine-tune",
            dir=str(work_dir),
            settings=wandb.Settings(
                mode=settings.mode,
                console="off",  # the trainer's stdout is its JSON log; W&B must not capture or wrap it
                silent=True,
                x_disable_stats=True,
                disable_git=True,
                save_code=False,
                init_timeout=WANDB_INIT_TIMEOUT_S,
                finish_timeout=WANDB_FINISH_TIMEOUT_S,
            ),
        )

    def params(self, values: Mapping[str, str]) -> None:
        self.run.config.update(dict(values), allow_val_change=True)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def evaluation(self, step: int, values: Mapping[str, float]) -> None:
        self.run.summary.update(dict(values))

    def artifacts(self, adapter_dir: Path) -> None:
        artifact = self.wandb.Artifact(
            wandb_artifact_name(self.job_name),
            type="model",
            metadata={"job": self.job_name, "namespace": self.namespace},
        )
        for path in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):  # add_dir would print
            # Staged (copied) by W&B: the adapter's own staging folder may go once this returns.
            artifact.add_file(str(path), name=path.relative_to(adapter_dir).as_posix())
        self.run.log_artifact(artifact)

    def finish(self, ok: bool) -> None:
        run_dir = Path(self.run.dir).parent  # RUN-FOLDER/files -> RUN-FOLDER
        self.run.finish(exit_code=0 if ok else 1)
        self.wandb.teardown()  # the wandb-core service goes with the run
        if self.offline and self.publish is not None:
            copy = _without_links(run_dir)
            try:
                uri = self.publish(copy, f"{WANDB_OUTPUT}/{run_dir.name}")
            finally:
                shutil.rmtree(copy, ignore_errors=True)
            log("tracking_published", tracker=self.name, uri=uri)


def _without_links(run_dir: Path) -> Path:
    """A copy of the run folder without W&B's symbolic links (its logs point into ~/.cache):
    published, they would copy files from outside the run, or dangle."""
    copy = run_dir.with_name(run_dir.name + ".publish")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy, ignore=lambda folder, names: [n for n in names if (Path(folder) / n).is_symlink()])
    return copy
