"""FineTuneJob: one fine-tuning run of a base model on a dataset, producing an adapter."""

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from .common import (
    DNS_SUBDOMAIN,
    MAX_NAME,
    MAX_SHORT,
    MAX_URI,
    ApiModel,
    Condition,
    ModelSource,
    Placement,
    Quantity,
    Rule,
    SecretRef,
    conditions_field,
    section,
)
from .evaluation import EvaluationResult
from .uris import uri_rules

MethodType = Literal["full", "lora", "qlora", "dora", "ia3", "prefixTuning", "promptTuning", "adalora"]
LORA_FAMILY = ("lora", "qlora", "dora")
DatasetFormat = Literal["chat", "instruction", "completion", "text", "preference"]
StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]
Precision = Literal["bf16", "fp16", "fp32"]


# --- spec.dataset --------------------------------------------------------------------------------


class ValidationSplit(ApiModel):
    """Held-out data for evaluation: a fraction of the training set, or a separate file."""

    fraction: float | None = Field(default=None, gt=0, lt=1, description="Fraction of the dataset held out.")
    uri: str | None = Field(default=None, max_length=MAX_URI, description="A separate validation file, same format.")

    cel_rules: ClassVar = (
        Rule(
            cel="has(self.fraction) != has(self.uri)",
            message="dataset.validation needs exactly one of fraction or uri",
            check=lambda v: (v.fraction is None) != (v.uri is None),
        ),
        *uri_rules("uri", "uri", optional=True),
    )


class DatasetSpec(ApiModel):
    """The training data and how it becomes token sequences."""

    uri: str = Field(
        min_length=1,
        max_length=MAX_URI,
        description=(
            "pvc://CLAIM/PATH, s3://BUCKET/PATH, https://..., hf://ORG/NAME, configmap://NAME/KEY or "
            "file:///PATH (local runs only). JSON Lines, JSON, CSV or Parquet."
        ),
    )
    format: DatasetFormat = Field(
        description=(
            "chat: {messages:[{role,content}]}; instruction: alpaca {instruction,input,output}; "
            "completion: {prompt,completion}; text: {text} (continued pre-training); "
            "preference: {prompt,chosen,rejected} (objective dpo)."
        )
    )
    validation: ValidationSplit | None = Field(default=None, description="Evaluation split; none by default.")
    max_seq_length: int = Field(default=2048, ge=16, le=131072, description="Longer examples are truncated.")
    packing: bool = Field(
        default=False,
        description=(
            "Pack several short examples into one sequence (fewer pad tokens; attention stays within each example)."
        ),
    )
    chat_template: Literal["tokenizer", "chatml", "llama3"] = Field(
        default="tokenizer",
        description="Template that renders chat and instruction data: the tokenizer's own, or a named one.",
    )
    max_bad_row_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description=(
            "Largest fraction of rows that may be unusable (unparsable, wrong shape, wrong encoding) before the "
            "job fails with InvalidInput and examples of the bad rows; bad rows below it are skipped and counted."
        ),
    )

    cel_rules: ClassVar = uri_rules("uri", "uri")


# --- spec.method ---------------------------------------------------------------------------------


class LoraSettings(ApiModel):
    """Low-rank adapter settings for lora, qlora and dora."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(
        default=32, ge=1, le=4096, description="Scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description=(
            "Module names to adapt (q_proj, v_proj, ...), or all-linear for every linear layer but the output head."
        ),
        json_schema_extra={"default": ["all-linear"], "items": {"type": "string", "maxLength": MAX_SHORT}},
    )
    rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha / sqrt(r).")


class QuantizationSettings(ApiModel):
    """How qlora loads the frozen base model (bitsandbytes)."""

    bits: Literal[4, 8] = Field(default=4, description="4 (NF4/FP4) or 8 (LLM.int8).")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(
        default=True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="dtype of the matmuls against dequantised weights."
    )


class AdaLoraSettings(ApiModel):
    """AdaLoRA: ranks start at initR and are pruned towards targetR between tinit and tfinal."""

    init_r: int = Field(default=12, ge=1, le=1024, description="Starting rank of every adapted layer.")
    target_r: int = Field(default=8, ge=1, le=1024, description="Average rank budget after pruning.")
    tinit: int = Field(default=0, ge=0, description="Steps of warm-up before pruning starts.")
    tfinal: int = Field(default=0, ge=0, description="Steps at the end with the final budget fixed.")
    delta_t: int = Field(default=10, ge=1, description="Steps between two budget updates.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or all-linear.",
        json_schema_extra={"default": ["all-linear"], "items": {"type": "string", "maxLength": MAX_SHORT}},
    )

    cel_rules: ClassVar = (
        Rule(
            cel="self.targetR <= self.initR",
            message="method.adalora.targetR must not exceed initR",
            check=lambda a: a.target_r <= a.init_r,
        ),
    )


class IA3Settings(ApiModel):
    """(IA)^3: learned rescaling vectors on attention keys/values and the feed-forward layer."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        min_length=1,
        max_length=64,
        description="Modules whose outputs (or inputs, for feed-forward modules) are rescaled.",
        json_schema_extra={
            "default": ["k_proj", "v_proj", "down_proj"],
            "items": {"type": "string", "maxLength": MAX_SHORT},
        },
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        max_length=64,
        description="The subset of targetModules that are feed-forward layers.",
        json_schema_extra={"default": ["down_proj"], "items": {"type": "string", "maxLength": MAX_SHORT}},
    )

    cel_rules: ClassVar = (
        Rule(
            cel="self.feedforwardModules.all(m, m in self.targetModules)",
            message="method.ia3.feedforwardModules must be a subset of targetModules",
            check=lambda s: set(s.feedforward_modules) <= set(s.target_modules),
        ),
    )


class VirtualTokenSettings(ApiModel):
    """Prompt and prefix tuning: learned virtual tokens in front of every input."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024, description="How many virtual tokens are learned.")
    init_text: str | None = Field(
        default=None,
        max_length=4096,
        description="promptTuning only: initialise the virtual tokens from this text's embeddings.",
    )


def _only_with(block: str, methods: tuple[str, ...]) -> Rule:
    allowed = " || ".join(f"self.type == '{m}'" for m in methods)
    names = ", ".join(methods)
    return Rule(
        cel=f"!has(self.{block}) || {allowed}",
        message=f"method.{block} is only allowed with method.type {names}",
        check=lambda m: getattr(m, _snake(block)) is None or m.type in methods,
        field_path=f".{block}",
    )


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


class MethodSpec(ApiModel):
    """Which weights are trained. Only the block matching `type` may be set; omitted blocks take their defaults."""

    type: MethodType = Field(
        default="lora",
        description="full, lora, qlora (4/8-bit base + LoRA), dora, ia3, prefixTuning, promptTuning or adalora.",
    )
    lora: LoraSettings | None = Field(default=None, description="Settings for lora, qlora and dora.")
    quantization: QuantizationSettings | None = Field(
        default=None, description="qlora only: how the base is quantised."
    )
    adalora: AdaLoraSettings | None = Field(default=None, description="adalora only.")
    ia3: IA3Settings | None = Field(default=None, description="ia3 only.")
    virtual_tokens: VirtualTokenSettings | None = Field(default=None, description="prefixTuning and promptTuning only.")

    cel_rules: ClassVar = (
        _only_with("quantization", ("qlora",)),
        _only_with("lora", LORA_FAMILY),
        _only_with("adalora", ("adalora",)),
        _only_with("ia3", ("ia3",)),
        _only_with("virtualTokens", ("prefixTuning", "promptTuning")),
    )

    def effective_lora(self) -> LoraSettings:
        return self.lora or LoraSettings()

    def effective_quantization(self) -> QuantizationSettings:
        return self.quantization or QuantizationSettings()

    @property
    def is_adapter(self) -> bool:
        return self.type != "full"


# --- spec.dpo, spec.hyperparameters --------------------------------------------------------------


class DpoSettings(ApiModel):
    """Direct Preference Optimisation against a frozen reference (the base model)."""

    beta: float = Field(default=0.1, gt=0, le=10, description="Strength of the KL penalty towards the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="Preference loss.")


LEARNING_RATE_PATTERN = r"^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$"


class Hyperparameters(ApiModel):
    """Optimisation settings. Set at most one of epochs and maxSteps; with neither, one epoch."""

    epochs: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Passes over the training set (1 when neither this nor maxSteps is set).",
    )
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Optimizer steps, instead of epochs.")
    learning_rate: str = Field(
        default="2e-4",
        pattern=LEARNING_RATE_PATTERN,
        max_length=32,
        description='Peak learning rate, as a string ("2e-4"): the Kubernetes API avoids floats.',
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate decay after warm-up."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5, description="Fraction of steps spent warming up linearly.")
    global_batch_size: int = Field(
        default=16,
        ge=1,
        le=65536,
        description="Sequences per optimizer step, across all GPUs (= micro × accumulation × world size).",
    )
    micro_batch_size: int = Field(default=1, ge=1, le=4096, description="Sequences per forward pass on one GPU.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0, le=1000, description="Gradient clipping norm; 0 disables clipping.")
    precision: Precision = Field(default="bf16", description="bf16, fp16 (with loss scaling) or fp32.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in backward to save memory.")
    kernels: Literal["auto", "none"] = Field(
        default="auto",
        description=(
            "Fused kernels. auto: what fits the model and device (Liger Kernel's RMSNorm, RoPE and fused linear "
            "cross-entropy on CUDA; kubetune's fused LoRA layers and chunked cross-entropy everywhere), each "
            "patch and each fallback logged with its reason; none: the plain PyTorch + PEFT model."
        ),
    )
    compile: Literal["auto", "always", "never"] = Field(
        default="auto",
        description=(
            "Regional torch.compile of the decoder layers. auto: on CUDA, where it pays; never on CPU, where "
            "compiling takes longer than it saves. The first step's compile time is logged."
        ),
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for initialisation, shuffling and dropout.")

    cel_rules: ClassVar = (
        Rule(
            cel="!has(self.epochs) || !has(self.maxSteps)",
            message="set at most one of hyperparameters.epochs and hyperparameters.maxSteps",
            check=lambda h: h.epochs is None or h.max_steps is None,
        ),
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _number_to_string(cls, value: Any) -> Any:
        # Python callers (and YAML that parses 2.0e-4 as a float) may pass a number.
        return repr(value) if isinstance(value, float) else value

    @property
    def epoch_count(self) -> int:
        """Passes over the data when training by epochs (maxSteps unset)."""
        return self.epochs or 1

    @property
    def lr(self) -> float:
        return float(self.learning_rate)


# --- spec.distributed, spec.resources ------------------------------------------------------------


class DistributedSpec(ApiModel):
    """How the model and optimizer are spread over the GPUs."""

    strategy: StrategyName = Field(
        default="auto",
        description="auto (chosen from the memory plan), ddp, fsdp, deepspeed-zero2 or deepspeed-zero3.",
    )
    offload: Literal["none", "cpu"] = Field(
        default="none", description="Move optimizer state (and ZeRO-3 parameters) to host memory."
    )

    cel_rules: ClassVar = (
        Rule(
            cel="self.offload == 'none' || self.strategy != 'ddp'",
            message=(
                "distributed.offload cpu needs strategy fsdp, deepspeed-zero2, deepspeed-zero3 or "
                "auto (ddp keeps a full replica per GPU)"
            ),
            check=lambda d: d.offload == "none" or d.strategy != "ddp",
        ),
    )


class ResourcesSpec(Placement):
    """What each training pod asks for, and where it may run."""

    nodes: int = Field(default=1, ge=1, le=512, description="Pods (one per node); torchrun's NNODES.")
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="GPUs per pod; 0 trains on CPU.")
    shared_memory: Quantity | None = Field(
        default=None,
        description="Size of /dev/shm (NCCL and data loaders need more than the default 64Mi); default 1Gi per GPU.",
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="A core/v1 Affinity, passed to the pods unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(default=None, max_length=MAX_NAME, description="PriorityClass of the pods.")

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)


# --- the rest of spec ----------------------------------------------------------------------------


class CheckpointingSpec(ApiModel):
    """Checkpoints make a run survive preemption: resume is automatic from the newest complete one."""

    every_steps: int = Field(default=200, ge=1, description="Save every N optimizer steps (and on SIGTERM).")
    keep: int = Field(default=2, ge=1, le=100, description="How many of the newest checkpoints to keep.")


class BenchmarksSpec(ApiModel):
    """Standard benchmarks with lm-evaluation-harness (PyPI lm-eval), on the tuned model (the adapter applied).

    Task definitions and their data come from `taskUri` (a folder of lm-eval task YAML files and the
    local data they name: a PVC, a bucket) or are lm-eval's own tasks (which download their data
    from the Hugging Face Hub: the pod needs to reach it). Scores go to status.evaluation.benchmarks
    as task -> metric -> value, and promotion rules can name them (benchmarks.TASK.METRIC).
    """

    tasks: list[Annotated[str, Field(max_length=100)]] = Field(
        min_length=1,
        max_length=20,
        description="lm-eval task names (from taskUri's YAML files, or lm-eval's own).",
    )
    task_uri: str | None = Field(
        default=None, max_length=MAX_URI, description="A folder of lm-eval task YAML files and their data."
    )
    limit: int = Field(default=100, ge=1, le=100000, description="Examples per task, at most.")
    num_fewshot: int | None = Field(default=None, ge=0, le=64, description="Few-shot examples (default: the task's).")

    cel_rules: ClassVar = (
        Rule(
            cel="self.tasks.all(t, t.matches('^[A-Za-z0-9_.-]{1,100}$'))",
            message="benchmark task names are letters, digits, '_', '.' and '-' (at most 100)",
            check=lambda b: all(re.match(r"^[A-Za-z0-9_.-]{1,100}$", t) for t in b.tasks),
        ),
        *uri_rules("taskUri", "task_uri", optional=True),
    )


class EvaluationSpec(ApiModel):
    """The validation loss during training, and after training the tuned model against the base model.

    After training (on by default, `enabled: false` to skip it), rank 0 measures the base model and
    the tuned one on the same held-out examples: greedy answers scored with exact match, token F1 and
    ROUGE-L (preference data: preference accuracy and reward margin), and perplexity on a reference
    text that is not training data (the forgetting check). Results go to status.evaluation and
    report.json; an AdapterDeployment can gate on them (`require`). The default is cheap: at most 32
    examples, 64 new tokens each, and a reference text of a few thousand tokens.
    """

    every_steps: int = Field(
        default=100, ge=0, description="Validation loss every N steps; 0 evaluates only at the end."
    )
    enabled: bool = Field(
        default=True, description="Compare with the base model after training; false keeps only the validation loss."
    )
    max_examples: int = Field(
        default=32, ge=1, le=10000, description="Held-out examples scored after training (the first N)."
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Tokens generated per answer, at most.")
    uri: str | None = Field(
        default=None,
        max_length=MAX_URI,
        description="A separate evaluation file in the dataset's format; default: the validation split.",
    )
    reference_uri: str | None = Field(
        default=None,
        max_length=MAX_URI,
        description="Plain text for the forgetting check (perplexity, base against tuned); default: a short "
        "general-English text shipped with the trainer.",
    )
    benchmarks: BenchmarksSpec | None = Field(
        default=None, description="lm-evaluation-harness tasks run on the tuned model after training."
    )

    cel_rules: ClassVar = (
        *uri_rules("uri", "uri", optional=True),
        *uri_rules("referenceUri", "reference_uri", optional=True),
    )


class MlflowTracking(ApiModel):
    """An MLflow tracking server: params at the start, metrics every logged step, the evaluation and
    the adapter (as an artifact) at the end. Rank 0 logs; the run is named after the FineTuneJob."""

    tracking_uri: str = Field(max_length=MAX_URI, description="http(s)://HOST[:PORT] of the MLflow tracking server.")
    experiment: str | None = Field(
        default=None, max_length=MAX_NAME, description="Experiment name (default: the FineTuneJob's namespace)."
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="A Secret whose keys become the trainer's environment: MLFLOW_TRACKING_TOKEN, or "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.",
    )
    log_artifacts: bool = Field(default=True, description="Upload the adapter to the run's artifacts.")

    cel_rules: ClassVar = (
        Rule(
            cel="self.trackingUri.startsWith('http://') || self.trackingUri.startsWith('https://')",
            message="mlflow.trackingUri must be an http:// or https:// URL",
            check=lambda m: m.tracking_uri.startswith(("http://", "https://")),
        ),
    )


class WandbTracking(ApiModel):
    """Weights & Biases: the same as MLflow gets. `offline` writes the run under the job's output
    (`wandb/`) without any network, to `wandb sync` later."""

    project: str = Field(max_length=MAX_NAME, description="W&B project.")
    entity: str | None = Field(default=None, max_length=MAX_NAME, description="W&B entity (team or user).")
    mode: Literal["online", "offline"] = Field(default="online", description="online, or offline (no network).")
    secret_ref: SecretRef | None = Field(
        default=None, description="A Secret whose keys become the trainer's environment: WANDB_API_KEY (online)."
    )


class TrackingSpec(ApiModel):
    """Experiment trackers the trainer reports to (none by default)."""

    mlflow: MlflowTracking | None = Field(default=None, description="An MLflow tracking server.")
    wandb: WandbTracking | None = Field(default=None, description="Weights & Biases.")


class OutputSpec(ApiModel):
    """Where the adapter, report.json and checkpoints are written."""

    uri: str = Field(
        min_length=1,
        max_length=MAX_URI,
        description="pvc://CLAIM/PATH, s3://BUCKET/PATH or file:///PATH (local runs only).",
    )
    merge_weights: bool = Field(default=False, description="Also write the base model with the adapter merged in.")

    cel_rules: ClassVar = uri_rules("uri", "uri")


class RunPolicy(ApiModel):
    """Retries, deadlines, clean-up, suspension and queueing."""

    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Failed attempts before the job fails; preemptions and node drains don't count.",
    )
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit for the whole run.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished pods and Job after this long (the FineTuneJob stays)."
    )
    suspend: bool = Field(default=False, description="Stop the pods and keep checkpoints; false again resumes.")
    queue_name: str | None = Field(
        default=None, max_length=MAX_SHORT, description="Kueue LocalQueue (sets the kueue.x-k8s.io/queue-name label)."
    )


Objective = Literal["sft", "dpo"]


def _batch_divides(spec: "FineTuneJobSpec") -> bool:
    h, r = spec.hyperparameters, spec.resources
    return h.global_batch_size % (h.micro_batch_size * r.world_size) == 0


def _batch_message(spec: "FineTuneJobSpec") -> str:
    h, r = spec.hyperparameters, spec.resources
    return (
        f"hyperparameters.globalBatchSize ({h.global_batch_size}) must be a multiple of "
        f"microBatchSize ({h.micro_batch_size}) x world size ({r.world_size})"
    )


_WORLD_SIZE_CEL = "self.resources.nodes * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1)"


def _immutable(field: str, hint: str) -> Rule:
    return Rule(
        cel=f"self.{field} == oldSelf.{field}", message=f"spec.{field} is immutable: {hint}", field_path=f".{field}"
    )


class FineTuneJobSpec(ApiModel):
    """What to train, on what, how, and where the result goes."""

    model: ModelSource = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="The training data.")
    method: MethodSpec = section(MethodSpec, "Which weights are trained (LoRA by default).")
    objective: Objective = Field(
        default="sft", description="sft (supervised) or dpo (needs dataset.format preference)."
    )
    dpo: DpoSettings | None = Field(default=None, description="objective dpo only.")
    hyperparameters: Hyperparameters = section(Hyperparameters, "Optimisation settings (every field has a default).")
    distributed: DistributedSpec = section(DistributedSpec, "Parallelism strategy.")
    resources: ResourcesSpec = section(ResourcesSpec, "Pods, GPUs and placement.")
    checkpointing: CheckpointingSpec = section(CheckpointingSpec, "Checkpoint frequency and retention.")
    evaluation: EvaluationSpec = section(
        EvaluationSpec, "Validation loss during training; the tuned model against the base after it."
    )
    tracking: TrackingSpec | None = Field(default=None, description="Experiment trackers (MLflow, W&B).")
    output: OutputSpec = Field(description="Where the trained adapter goes.")
    run_policy: RunPolicy = section(RunPolicy, "Retries, deadlines, suspension, queueing.")
    image: str | None = Field(
        default=None, max_length=1024, description="Trainer image; the operator's default when empty."
    )

    cel_rules: ClassVar = (
        Rule(
            cel="(self.objective == 'dpo') == (self.dataset.format == 'preference')",
            message="objective dpo needs dataset.format preference, and preference data needs objective dpo",
            check=lambda s: (s.objective == "dpo") == (s.dataset.format == "preference"),
        ),
        Rule(
            cel="!has(self.dpo) || self.objective == 'dpo'",
            message="spec.dpo is only allowed with objective dpo",
            check=lambda s: s.dpo is None or s.objective == "dpo",
            field_path=".dpo",
        ),
        Rule(
            cel=(
                f"self.hyperparameters.globalBatchSize % (self.hyperparameters.microBatchSize * {_WORLD_SIZE_CEL}) == 0"
            ),
            message=(
                "hyperparameters.globalBatchSize must be a multiple of microBatchSize x world size "
                "(resources.nodes x resources.gpusPerNode)"
            ),
            check=_batch_divides,
            # format() rather than string concatenation: the API server's cost estimator rejects
            # `'...' + string(x)` in a messageExpression as far over budget (Kubernetes 1.34).
            message_expression=(
                "'hyperparameters.globalBatchSize (%d) must be a multiple of microBatchSize (%d) x world size (%d)'"
                ".format([self.hyperparameters.globalBatchSize, self.hyperparameters.microBatchSize, "
                f"{_WORLD_SIZE_CEL}])"
            ),
            describe=_batch_message,
        ),
        Rule(
            cel=(
                "self.method.type != 'qlora' || self.distributed.strategy != 'deepspeed-zero3' || "
                "self.distributed.offload == 'none'"
            ),
            message="qlora cannot offload its 4-bit base to CPU with deepspeed-zero3; use offload none or method lora",
            check=lambda s: (
                not (
                    s.method.type == "qlora"
                    and s.distributed.strategy == "deepspeed-zero3"
                    and s.distributed.offload == "cpu"
                )
            ),
        ),
        _immutable("model", "create a new FineTuneJob to train another base model"),
        _immutable("method", "create a new FineTuneJob to train with another method"),
        _immutable("dataset", "create a new FineTuneJob to train on other data"),
        _immutable("objective", "create a new FineTuneJob for another objective"),
        _immutable("hyperparameters", "create a new FineTuneJob (checkpoints would not match)"),
        _immutable("output", "create a new FineTuneJob to write elsewhere"),
        Rule(
            cel="self.resources == oldSelf.resources || (oldSelf.runPolicy.suspend && self.runPolicy.suspend)",
            message="spec.resources can only change while the job is suspended (set runPolicy.suspend true first)",
            field_path=".resources",
        ),
    )


# --- status --------------------------------------------------------------------------------------

Phase = Literal["Pending", "Admitted", "Running", "Suspended", "Succeeded", "Failed"]


class TrainingPlan(ApiModel):
    """What the operator decided at admission."""

    world_size: int | None = Field(default=None, description="Processes in the run (nodes x GPUs per node).")
    strategy: StrategyName | None = Field(default=None, description="The strategy chosen (auto resolved).")
    micro_batch: int | None = Field(default=None, description="Sequences per forward pass per process.")
    grad_accumulation: int | None = Field(default=None, description="Micro-batches per optimizer step.")
    estimated_gpu_memory_gib: float | None = Field(
        default=None, alias="estimatedGpuMemoryGiB", description="Estimated peak memory per GPU, GiB."
    )
    trainable_params: int | None = Field(default=None, description="Parameters that receive gradients.")
    total_params: int | None = Field(default=None, description="Parameters in the model.")


class Progress(ApiModel):
    """Training progress from rank 0's metrics."""

    step: int | None = Field(default=None, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    percent: int | None = Field(default=None, ge=0, le=100, description="step / totalSteps, in percent.")
    eta: datetime | None = Field(default=None, description="Estimated completion time.")


class TrainingMetrics(ApiModel):
    """The latest (or, when finished, final) training metrics."""

    train_loss: float | None = Field(default=None, description="Training loss.")
    eval_loss: float | None = Field(default=None, description="Validation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput across all processes.")
    gpu_memory_gib: float | None = Field(
        default=None, alias="gpuMemoryGiB", description="Peak GPU memory of rank 0, GiB."
    )


class AdapterArtifact(ApiModel):
    """The trained result."""

    uri: str = Field(max_length=MAX_URI, description="Where the adapter was written.")
    size_bytes: int | None = Field(default=None, description="Size of the adapter weights.")
    sha256: str | None = Field(default=None, max_length=64, description="Digest of the adapter weights.")


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator only."""

    observed_generation: int | None = Field(default=None, description="The generation the status reflects.")
    conditions: list[Condition] = conditions_field()
    phase: Phase | None = Field(default=None, description="Summary of the conditions, for people and printer columns.")
    plan: TrainingPlan | None = Field(default=None, description="The admission plan.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(default=None, description="Training metrics.")
    restarts: int | None = Field(
        default=None,
        description="Times training restarted: failed attempts that were retried, and preemptions the "
        "trainer resumed from a checkpoint.",
    )
    start_time: datetime | None = Field(default=None, description="When the first pod started.")
    completion_time: datetime | None = Field(default=None, description="When the job finished.")
    adapter: AdapterArtifact | None = Field(default=None, description="The result, once Succeeded.")
    evaluation: EvaluationResult | None = Field(
        default=None, description="The tuned model against the base model, measured after training."
    )


class ObjectMeta(ApiModel):
    """The parts of metadata kubetune reads; the rest passes through."""

    model_config = {**ApiModel.model_config, "extra": "allow"}
    name: str | None = Field(default=None, pattern=DNS_SUBDOMAIN, max_length=MAX_NAME)
    namespace: str | None = Field(default=None, max_length=MAX_SHORT)
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(ApiModel):
    """A fine-tuning run: the operator turns it into an Indexed Job of torchrun pods and reports progress here."""

    model_config = {**ApiModel.model_config, "extra": "allow"}
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
