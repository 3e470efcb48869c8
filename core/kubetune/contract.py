"""The operator↔trainer contract, written once.

The operator renders a training pod from these names; the trainer reads the same names inside it;
the operator reads back what the trainer reports. Nothing here imports anything beyond pydantic,
so the operator image (no torch, no boto3) and the trainer image share one definition:

* the trainer's configuration file (`TrainerConfig`: the user's spec plus `RuntimeSettings`),
  mounted from the job's ConfigMap at `CONFIG_PATH`;
* the mount roots of pvc:// and configmap:// inputs and outputs, and the environment variables
  that point the trainer at them;
* the distributed environment torchrun is started from;
* the exit codes the Job's podFailurePolicy acts on;
* the layout the trainer publishes under `spec.output.uri`;
* `TrainerResult`: what the trainer writes as its termination message and into report.json, and
  what the operator parses (tolerantly: a pod's output is untrusted) into the job's status.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .api.common import MAX_NAME, ApiModel
from .api.evaluation import BENCHMARK_METRIC, BENCHMARK_NAME, COMPARED
from .api.finetunejob import FineTuneJobSpec

# --- exit codes (the Job's podFailurePolicy) ------------------------------------------------------

EXIT_INVALID_INPUT = 2  # the config, the data or a URI is wrong: retrying cannot help
EXIT_PREEMPTED = 143  # 128 + SIGTERM, after a checkpoint was written: the retry resumes
NON_RETRYABLE_EXIT_CODES = (EXIT_INVALID_INPUT,)

# --- paths and environment inside a training pod --------------------------------------------------

TRAINER_CONTAINER = "trainer"
# Not under /etc/kubetune itself: dataset ConfigMaps mount beneath /etc/kubetune/configmaps, and a
# mount point cannot be created inside a (read-only) ConfigMap volume.
CONFIG_DIR = "/etc/kubetune/config"
CONFIG_KEY = "trainer.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
# Claim CLAIM is mounted at $KUBETUNE_PVC_ROOT/CLAIM, ConfigMap NAME at $KUBETUNE_CONFIGMAP_ROOT/NAME.
PVC_ROOT_ENV = "KUBETUNE_PVC_ROOT"
PVC_ROOT = "/mnt/pvc"
CONFIGMAP_ROOT_ENV = "KUBETUNE_CONFIGMAP_ROOT"
CONFIGMAP_ROOT = "/etc/kubetune/configmaps"
SCRATCH = "/scratch"  # the one writable volume: the root filesystem is read-only
CACHE_DIR = f"{SCRATCH}/cache"
TMP_DIR = f"{SCRATCH}/tmp"  # also mounted at /tmp, for libraries that ignore TMPDIR
TERMINATION_LOG = "/dev/termination-log"

# torchrun's rendezvous, set by the operator on multi-process pods (static rendezvous at rank 0).
ENV_NNODES = "NNODES"
ENV_NODE_RANK = "NODE_RANK"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
DEFAULT_MASTER_PORT = 29500


def pvc_mount_path(claim: str) -> str:
    """Where claim `claim` is mounted in training pods (and read by the trainer)."""
    return str(PurePosixPath(os.environ.get(PVC_ROOT_ENV) or PVC_ROOT) / claim)


def configmap_mount_path(name: str) -> str:
    """Where ConfigMap `name` is mounted in training pods (and read by the trainer)."""
    return str(PurePosixPath(os.environ.get(CONFIGMAP_ROOT_ENV) or CONFIGMAP_ROOT) / name)


# --- what the trainer publishes under spec.output.uri ---------------------------------------------

COMPLETE_MARKER = "_COMPLETE"  # written last into a published folder: the folder is whole
ADAPTER_DIR = "adapter"  # PEFT safetensors + tokenizer (the full weights for a full fine-tune)
MERGED_DIR = "merged"  # base + adapter folded in, when spec.output.mergeWeights
REPORT_FILE = "report.json"  # TrainerResult plus config, data, history, timings, versions
GGUF_FILE = "model-{type}.gguf"  # the merged model for llama.cpp/Ollama, per spec.output.gguf.types
CHECKPOINTS_DIR = "checkpoints"  # checkpoints/step-00000050, ...


def gguf_file_name(gguf_type: str) -> str:
    """The file a GGUF export of type `gguf_type` (f16, q8_0) is published as, under spec.output.uri."""
    return GGUF_FILE.format(type=gguf_type)


def adapter_uri(output_uri: str) -> str:
    """Where the trainer always publishes the adapter of a job whose output is `output_uri`."""
    return f"{output_uri.rstrip('/')}/{ADAPTER_DIR}"


# --- the trainer's configuration file --------------------------------------------------------------


class RuntimeSettings(ApiModel):
    """Set by the operator for pods, or by `kubetune train` for local runs; not part of the user API."""

    job_name: str = Field(default="local", max_length=MAX_NAME, description="The FineTuneJob's name (labels, logs).")
    namespace: str = Field(default="default", max_length=63, description="The FineTuneJob's namespace.")
    local: bool = Field(default=False, description="A run on this machine: file:// URIs allowed.")
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="Prometheus port on rank 0; 0 disables it.")
    cache_dir: str = Field(default=CACHE_DIR, description="Writable scratch for downloads and staging.")
    termination_message_path: str = Field(
        default=TERMINATION_LOG, description="Where the short JSON result goes (the pod's termination message)."
    )
    grace_seconds: int = Field(
        default=30, ge=1, description="Time between SIGTERM and SIGKILL; a checkpoint must fit in it."
    )


class TrainerConfig(ApiModel):
    """What the trainer reads from its config file."""

    spec: FineTuneJobSpec
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)


# --- the trainer's result ----------------------------------------------------------------------------

# Kubernetes keeps at most 4096 bytes of a container's termination message.
TERMINATION_LIMIT = 4096
_MESSAGE_LIMIT = 2000  # characters of a failure message kept when the whole result does not fit

# Limits on what the operator reads back (a pod's output is untrusted; report.json may be larger
# than a termination message): every string is clipped, every count fits in a JSON-safe integer,
# every reading is finite, and the JSON is at most MAX_DEPTH levels deep.
MAX_RESULT_MESSAGE = _MESSAGE_LIMIT
MAX_REASON = 128
MAX_TEXT = TERMINATION_LIMIT  # strategy, fingerprint
MAX_RESULT_URI = 2048
MAX_COUNT = 2**53 - 1  # steps, parameters, bytes: exact in a float, within int64
MAX_DEPTH = 32
_PROBLEM_LIMIT = 300  # characters of the reason parse gives for an unusable message


def _clipper(limit: int) -> BeforeValidator:
    def clip(value: Any) -> Any:
        return value[:limit] if isinstance(value, str) else value

    return BeforeValidator(clip)


Reason = Annotated[str, _clipper(MAX_REASON)]
Message = Annotated[str, _clipper(MAX_RESULT_MESSAGE)]
Text = Annotated[str, _clipper(MAX_TEXT)]
ResultUri = Annotated[str, Field(max_length=MAX_RESULT_URI)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Result(BaseModel):
    """Result parts: camelCase on the wire, unknown keys ignored (an older or newer trainer)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", allow_inf_nan=False)


MAX_EXPORTED_FILES = 4  # GGUF files read back from a result: more than the API can ask for


class PublishedFile(_Result):
    """One exported file (a GGUF of one type): where it is, how big, its digest."""

    type: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,16}$")]
    uri: ResultUri
    size_bytes: int | None = Field(default=None, alias="sizeBytes", ge=0, le=MAX_COUNT, strict=True)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class PublishedAdapter(_Result):
    uri: ResultUri | None = None
    size_bytes: int | None = Field(default=None, alias="sizeBytes", ge=0, le=MAX_COUNT, strict=True)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    merged_uri: ResultUri | None = Field(default=None, alias="mergedUri")
    gguf: list[PublishedFile] | None = Field(default=None, description="spec.output.export gguf: one per type.")

    @field_validator("gguf", mode="before")
    @classmethod
    def _usable_files(cls, value: Any) -> Any:
        """A pod's list: its first MAX_EXPORTED_FILES entries, less those that are not a usable file
        description (dropped, as an unreadable metric is: no reason to distrust the adapter); None
        when none is left."""
        files = (
            [file for file in map(_published_file, value[:MAX_EXPORTED_FILES]) if file]
            if isinstance(value, list)
            else []
        )
        return files or None


def _published_file(value: Any) -> PublishedFile | None:
    try:
        return PublishedFile.model_validate(value)
    except ValidationError:
        return None


class ResultMetrics(_Result):
    train_loss: float | None = Field(default=None, alias="trainLoss")
    eval_loss: float | None = Field(default=None, alias="evalLoss")
    tokens_per_second: float | None = Field(default=None, alias="tokensPerSecond")

    @field_validator("*", mode="before")
    @classmethod
    def _reading(cls, value: Any) -> Any:
        """A diverged run's NaN, or a JSON true, is no reading: dropped, not a reason to distrust the rest."""
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            return None
        if isinstance(value, int) and abs(value) > MAX_COUNT:
            return None
        return value

    def to_status(self) -> dict[str, float]:
        """The readings for status.metrics: finite floats only (the API server refuses anything else)."""
        wire = self.model_dump(by_alias=True, exclude_none=True)
        return {key: float(value) for key, value in wire.items() if math.isfinite(float(value))}


class ResultPlan(_Result):
    world_size: Count = Field(alias="worldSize")
    strategy: Text
    micro_batch: Count = Field(alias="microBatch")
    grad_accumulation: Count = Field(alias="gradAccumulation")


class ResultData(_Result):
    fingerprint: Text = ""
    bad_rows: Count = Field(default=0, alias="badRows")


def _finite(value: Any) -> Any:
    """A reading the operator may copy into status: finite and not a JSON true; else no reading."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


Reading = Annotated[float | None, BeforeValidator(_finite)]


class ResultComparison(_Result):
    base: Reading = None
    tuned: Reading = None
    delta: Reading = None


class ResultEvaluation(_Result):
    """The evaluation after training (api.evaluation.EvaluationResult), as read from an untrusted pod:
    only the known metrics, finite numbers, counts in range, notes clipped."""

    examples: Count | None = None
    seconds: Reading = None
    tokens_generated: Count | None = Field(default=None, alias="tokensGenerated")
    metrics: dict[str, ResultComparison] = Field(default_factory=dict)
    forgetting_ratio: Reading = Field(default=None, alias="forgettingRatio")
    benchmarks: dict[str, dict[str, float]] = Field(default_factory=dict)
    notes: list[Annotated[str, _clipper(300)]] = Field(default_factory=list)

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _scores(cls, value: Any) -> Any:
        """At most 20 tasks of 16 finite scores, under names a promotion rule could name."""
        if not isinstance(value, dict):
            return {}
        task_name, metric_name = re.compile(f"^{BENCHMARK_NAME}$"), re.compile(f"^{BENCHMARK_METRIC}$")
        kept: dict[str, dict[str, float]] = {}
        for task, scores in list(value.items())[:20]:
            if not (isinstance(task, str) and task_name.match(task) and isinstance(scores, dict)):
                continue
            kept[task] = {
                metric: float(score)
                for metric, score in list(scores.items())[:16]
                if isinstance(metric, str) and metric_name.match(metric) and _finite(score) is not None
                and isinstance(score, int | float)
            }  # fmt: skip
        return kept

    @field_validator("metrics", mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        return {k: v for k, v in value.items() if k in COMPARED} if isinstance(value, dict) else {}

    @field_validator("notes", mode="before")
    @classmethod
    def _few(cls, value: Any) -> Any:
        return [note for note in value if isinstance(note, str)][:8] if isinstance(value, list) else []

    def to_status(self) -> dict[str, Any]:
        wire = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        return {key: value for key, value in wire.items() if value not in ([], {})}


def json_depth_problem(text: str, limit: int = MAX_DEPTH) -> str | None:
    """Why `text` nests deeper than `limit` (arrays and objects, strings skipped), or None: checked
    before json.loads, whose recursion a message of 2,000 brackets would exhaust."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return f"nested deeper than {limit} levels"
        elif char in "]}":
            depth -= 1
    return None


def _one_line(text: str, limit: int = _PROBLEM_LIMIT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class TrainerResult(_Result):
    """What a run says about itself: the termination message of rank 0 and the core of report.json.

    Succeeded runs carry the adapter, the final metrics and the plan; failed runs a `reason`
    (InvalidInput, InputUnavailable, ...) and a `message` the operator quotes in the Failed condition.
    """

    phase: Literal["Succeeded", "Failed"]
    reason: Reason | None = None
    message: Message | None = None
    adapter: PublishedAdapter | None = None
    metrics: ResultMetrics = Field(default_factory=ResultMetrics)
    steps: Count | None = None
    trainable_params: Count | None = Field(default=None, alias="trainableParams")
    total_params: Count | None = Field(default=None, alias="totalParams")
    plan: ResultPlan | None = None
    data: ResultData | None = None
    evaluation: ResultEvaluation | None = None

    @classmethod
    def failed(cls, reason: str, message: str) -> TrainerResult:
        return cls(phase="Failed", reason=reason, message=message)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def termination_message(self) -> str:
        """The result as compact JSON under the 4 KiB limit, dropping the least important parts first."""
        document = self.to_wire()
        for key in ("data", "plan", "metrics", "evaluation", None):
            text = json.dumps(document, separators=(",", ":"))
            if len(text.encode()) < TERMINATION_LIMIT:
                return text
            if key:
                document.pop(key, None)
        essential: dict[str, Any] = {k: document[k] for k in ("phase", "reason", "adapter") if k in document}
        if self.message:
            essential["message"] = self.message[:_MESSAGE_LIMIT]
        return json.dumps(essential, separators=(",", ":"))

    @classmethod
    def parse(cls, message: str) -> tuple[TrainerResult | None, str]:
        """A pod's termination message as (result, "") or (None, why it is unusable, in one line).
        Never raises: the text is whatever the container left behind (a crash, a log tail, a
        truncated write, or something written to hurt the operator)."""
        try:
            return cls._parse(message)
        except Exception as error:  # noqa: BLE001 - the last guard: untrusted input must not raise
            return None, _one_line(f"rank 0's termination message could not be read: {type(error).__name__}")

    @classmethod
    def _parse(cls, message: str) -> tuple[TrainerResult | None, str]:
        text = (message if isinstance(message, str) else "").strip()
        if not text:
            return None, "rank 0 left no termination message"
        if len(text.encode(errors="replace")) > TERMINATION_LIMIT:
            return None, f"rank 0's termination message is longer than {TERMINATION_LIMIT} bytes"
        deep = json_depth_problem(text)
        if deep:
            return None, f"rank 0's termination message is not a trainer result: {deep}"
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as error:
            return None, _one_line(f"rank 0's termination message is not JSON ({error}): {text[:200]!r}")
        if not isinstance(document, dict):
            return None, _one_line(f"rank 0's termination message is not a JSON object: {text[:200]!r}")
        try:
            return cls.model_validate(document), ""
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(message)"
            return None, _one_line(
                f"rank 0's termination message does not match the trainer's result: {where}: {first['msg']}"
            )

    def write(self, path: str) -> None:
        """Write the termination message; outside a pod (read-only or absent path) the log line carries it."""
        try:
            with open(path, "w") as stream:
                stream.write(self.termination_message())
        except OSError as error:
            print(f"could not write termination message to {path}: {error}", flush=True)
