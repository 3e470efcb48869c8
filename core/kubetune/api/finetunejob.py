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

MethodType = Literal[
    "full",
    "lora",
    "qlora",
    "dora",
    "ia3",
    "prefixTuning",
    "promptTuning",
    "adalora",
    "loha",
    "lokr",
    "vera",
    "oft",
    "hra",
    "fourierft",
    "lnTuning",
]
LORA_FAMILY = ("lora", "qlora", "dora")
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
BASE_CHANGING_INITS = ("pissa", "olora")  # trained on a changed base: the adapter is converted when saved
DatasetFormat = Literal["chat", "instruction", "completion", "text", "preference", "unpaired-preference"]
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
            "preference: {prompt,chosen,rejected} (objective dpo, orpo or simpo); "
            "unpaired-preference: {prompt,completion,label} with label true for a good reply, false for a bad "
            "one (objective kto)."
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
    rslora: bool = Field(
        default=False,
        description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, so high ranks (64 and up) still learn.",
    )
    loraplus_lr_ratio: float | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            "LoRA+: the B matrices learn this many times faster than the A matrices (their own optimizer "
            "parameter group, learningRate x ratio); 16 is the paper's choice. Unset: one learning rate."
        ),
    )
    init: LoraInit = Field(
        default="default",
        description=(
            "How the adapter starts. default: A random, B zero (the update starts at zero); gaussian: A "
            "Gaussian; pissa: A and B from each weight's top-r singular vectors, the rest left in the base "
            "(converges faster); olora: from a QR decomposition of each weight. pissa and olora (method "
            "lora only) change the base while training, so the saved adapter is converted to an ordinary "
            "LoRA of rank 2r for the unchanged base (serve it with maxLoraRank >= 2r)."
        ),
    )


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


def _targets_field(default: list[str], description: str) -> Any:
    return Field(
        default_factory=lambda: list(default),
        min_length=1,
        max_length=64,
        description=description,
        json_schema_extra={"default": list(default), "items": {"type": "string", "maxLength": MAX_SHORT}},
    )


def _all_linear_alone(block: str) -> Rule:
    return Rule(
        cel="!('all-linear' in self.targetModules) || size(self.targetModules) == 1",
        message=f"method.{block}.targetModules: all-linear already covers every linear layer; list it alone",
        check=lambda s: "all-linear" not in s.target_modules or len(s.target_modules) == 1,
    )


_LINEAR_TARGETS = (
    "Module names to adapt (q_proj, v_proj, ...), or all-linear for every linear layer but the output head."
)


class LohaSettings(ApiModel):
    """LoHa: the update is the Hadamard (element-wise) product of two low-rank products, so rank r
    reaches an effective rank up to r², at twice LoRA's parameters for the same r."""

    r: int = Field(default=8, ge=1, le=1024, description="Rank of each of the two low-rank factors.")
    alpha: int = Field(default=8, ge=1, le=4096, description="Scaling numerator (scale = alpha / r).")
    rank_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the update's rank dimension.")
    module_dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Probability of skipping a layer's whole update in a training step."
    )
    target_modules: list[str] = _targets_field(["all-linear"], _LINEAR_TARGETS)

    cel_rules: ClassVar[tuple[Rule, ...]] = (_all_linear_alone("loha"),)


class LokrSettings(LohaSettings):
    """LoKr: the update is the Kronecker product of a small matrix and a (low-rank) one: the fewest
    parameters of the LoRA-like methods for a full-rank update."""

    decompose_both: bool = Field(
        default=False, description="Also decompose the small Kronecker factor into a low-rank product."
    )
    decompose_factor: int = Field(
        default=-1,
        ge=-1,
        le=65536,
        description="Size of the small factor's dimensions (a divisor of the layer's sizes); -1: near the square root.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        _all_linear_alone("lokr"),
        Rule(
            cel="self.decomposeFactor != 0",
            message="method.lokr.decomposeFactor must be -1 (automatic) or a positive size",
            check=lambda s: s.decompose_factor != 0,
        ),
    )


class VeraSettings(ApiModel):
    """VeRA: one pair of frozen random projections shared by every adapted layer; each layer learns
    only two scaling vectors, so the adapter is ~10x smaller than LoRA's at a similar quality."""

    r: int = Field(default=256, ge=1, le=8192, description="Rank of the shared random projections.")
    d_initial: float = Field(default=0.1, gt=0, le=10, description="Initial value of the per-rank scaling vector.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    projection_seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Seed of the shared random projections (saved with the adapter)."
    )
    target_modules: list[str] = _targets_field(
        ["q_proj", "v_proj"], "Module names to adapt, or all-linear (every linear layer but the output head)."
    )

    cel_rules: ClassVar = (_all_linear_alone("vera"),)


class OftSettings(ApiModel):
    """OFT: each adapted layer's input is rotated by a learned block-diagonal orthogonal matrix,
    which keeps the angles between neurons (less forgetting of the base model's knowledge)."""

    block_size: int = Field(
        default=32,
        ge=2,
        le=1024,
        description="Size of each orthogonal block (a layer whose width it does not divide gets the nearest divisor).",
    )
    block_share: bool = Field(default=False, description="One block shared by all the blocks of a layer.")
    coft: bool = Field(default=False, description="Constrained OFT: keep the rotation within a small radius.")
    module_dropout: float = Field(
        default=0.0, ge=0, lt=1, description="Multiplicative dropout of whole blocks (replaced by the identity)."
    )
    target_modules: list[str] = _targets_field(["all-linear"], _LINEAR_TARGETS)

    cel_rules: ClassVar = (_all_linear_alone("oft"),)


class HraSettings(ApiModel):
    """HRA: the update is a chain of r Householder reflections of the input (orthogonal, like OFT,
    at LoRA-like cost)."""

    r: int = Field(default=8, ge=2, le=1024, description="Number of Householder reflections (an even number).")
    apply_gs: bool = Field(
        default=False, description="Gram-Schmidt-orthogonalise the reflection vectors (slower, stricter)."
    )
    target_modules: list[str] = _targets_field(["all-linear"], _LINEAR_TARGETS)

    cel_rules: ClassVar = (
        _all_linear_alone("hra"),
        Rule(
            cel="self.r % 2 == 0",
            message="method.hra.r must be even (the reflections are initialised in pairs)",
            check=lambda s: s.r % 2 == 0,
        ),
    )


class FourierFtSettings(ApiModel):
    """FourierFT: each layer learns nFrequency coefficients of its update's 2-D Fourier spectrum, at
    fixed random frequencies: the smallest adapters of all (a few thousand parameters per layer)."""

    n_frequency: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Spectral coefficients learned per layer (at most the layer's in x out features).",
    )
    scaling: float = Field(default=150.0, gt=0, le=100000, description="Scale of the update (the paper's alpha).")
    frequency_seed: int = Field(
        default=777, ge=0, le=2**31 - 1, description="Seed that picks the frequencies (saved with the adapter)."
    )
    target_modules: list[str] = _targets_field(
        ["q_proj", "v_proj"], "Module names to adapt, or all-linear (every linear layer but the output head)."
    )

    cel_rules: ClassVar = (_all_linear_alone("fourierft"),)


class LnTuningSettings(ApiModel):
    """LayerNorm tuning: only the normalisation layers' weights are trained (a few hundred thousand
    parameters for a 7B model): the cheapest way to adapt style and format."""

    target_modules: list[str] = _targets_field(
        ["input_layernorm", "post_attention_layernorm", "norm"],
        "Normalisation layers to train (Llama/Qwen/Mistral names; norm is the final one).",
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
        description=(
            "full: every weight (most capacity, most memory); lora: low-rank updates, the default; qlora: LoRA on "
            "a 4/8-bit base (least memory); dora: LoRA plus learned magnitudes (closer to full fine-tuning); "
            "ia3: rescaling vectors (tiny adapters); prefixTuning / promptTuning: learned virtual tokens; "
            "adalora: LoRA whose ranks are pruned to where they matter; loha / lokr: Hadamard / Kronecker "
            "products (higher effective rank per parameter); vera: shared random projections (10x smaller "
            "than LoRA); oft / hra: orthogonal updates (keep more of the base's knowledge); fourierft: a few "
            "spectral coefficients per layer (smallest adapters); lnTuning: the normalisation layers only. "
            "Only lora and qlora adapters can be served by vLLM."
        ),
    )
    lora: LoraSettings | None = Field(
        default=None, description="lora, qlora and dora: rank, scaling (rsLoRA), LoRA+ learning-rate ratio."
    )
    quantization: QuantizationSettings | None = Field(
        default=None, description="qlora only: how the base is quantised (no other method trains on a quantised base)."
    )
    adalora: AdaLoraSettings | None = Field(
        default=None, description="adalora only: pick it when a rank budget should go where it helps most."
    )
    ia3: IA3Settings | None = Field(
        default=None, description="ia3 only: pick it for the smallest adapters that still rescale activations."
    )
    virtual_tokens: VirtualTokenSettings | None = Field(
        default=None, description="prefixTuning and promptTuning only: pick them to steer a task without new weights."
    )
    loha: LohaSettings | None = Field(
        default=None, description="loha only: pick it for a higher-rank update than LoRA's at the same rank."
    )
    lokr: LokrSettings | None = Field(
        default=None, description="lokr only: pick it for a full-rank update with very few parameters."
    )
    vera: VeraSettings | None = Field(
        default=None, description="vera only: pick it when many adapters must be stored or served (tiny files)."
    )
    oft: OftSettings | None = Field(
        default=None, description="oft only: pick it to adapt while keeping the base's knowledge (orthogonal)."
    )
    hra: HraSettings | None = Field(
        default=None, description="hra only: pick it for an orthogonal update at LoRA-like cost."
    )
    fourierft: FourierFtSettings | None = Field(
        default=None, description="fourierft only: pick it for the fewest trainable parameters per layer."
    )
    ln_tuning: LnTuningSettings | None = Field(
        default=None, description="lnTuning only: pick it for style or format changes at the lowest cost."
    )

    cel_rules: ClassVar = (
        _only_with("quantization", ("qlora",)),
        _only_with("lora", LORA_FAMILY),
        Rule(
            cel="!has(self.lora) || !has(self.lora.init) || self.lora.init in ['default', 'gaussian'] || "
            "self.type == 'lora'",
            message="lora.init pissa and olora are for method lora: they move part of each weight into the "
            "adapter, which a quantised (qlora) base cannot take back exactly and DoRA's magnitudes do not model",
            check=lambda m: m.lora is None or m.lora.init not in BASE_CHANGING_INITS or m.type == "lora",
            field_path=".lora.init",
        ),
        _only_with("adalora", ("adalora",)),
        _only_with("ia3", ("ia3",)),
        _only_with("virtualTokens", ("prefixTuning", "promptTuning")),
        _only_with("loha", ("loha",)),
        _only_with("lokr", ("lokr",)),
        _only_with("vera", ("vera",)),
        _only_with("oft", ("oft",)),
        _only_with("hra", ("hra",)),
        _only_with("fourierft", ("fourierft",)),
        _only_with("lnTuning", ("lnTuning",)),
    )

    def effective_lora(self) -> LoraSettings:
        return self.lora or LoraSettings()

    def effective_quantization(self) -> QuantizationSettings:
        return self.quantization or QuantizationSettings()

    def effective_loha(self) -> LohaSettings:
        return self.loha or LohaSettings()

    def effective_lokr(self) -> LokrSettings:
        return self.lokr or LokrSettings()

    def effective_vera(self) -> VeraSettings:
        return self.vera or VeraSettings()

    def effective_oft(self) -> OftSettings:
        return self.oft or OftSettings()

    def effective_hra(self) -> HraSettings:
        return self.hra or HraSettings()

    def effective_fourierft(self) -> FourierFtSettings:
        return self.fourierft or FourierFtSettings()

    def effective_ln_tuning(self) -> LnTuningSettings:
        return self.ln_tuning or LnTuningSettings()

    @property
    def is_adapter(self) -> bool:
        return self.type != "full"

    def vllm_problem(self) -> str:
        """Why vLLM cannot serve what this method trains ("" when it can): vLLM loads plain LoRA
        adapters only (it refuses DoRA's magnitudes and every other PEFT type); the builtin runtime
        serves them (by adapter, besides grouped LoRA)."""
        if self.type in ("lora", "qlora"):
            return ""
        what = "a whole model, not an adapter" if self.type == "full" else f"a {self.type} adapter"
        return f"runtime vllm serves LoRA adapters (lora, qlora) only, and this is {what}; use runtime builtin"


# --- spec.dpo, spec.hyperparameters --------------------------------------------------------------


class DpoSettings(ApiModel):
    """Direct Preference Optimisation against a frozen reference (the base model)."""

    beta: float = Field(default=0.1, gt=0, le=10, description="Strength of the KL penalty towards the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="Preference loss.")


class OrpoSettings(ApiModel):
    """Odds Ratio Preference Optimisation (Hong et al., 2024): supervised loss on the chosen reply plus an
    odds-ratio term that pushes the rejected one down. No reference model: SFT and alignment in one pass."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="Weight (the paper's lambda) of the odds-ratio term against the chosen reply's NLL.",
    )


class SimpoSettings(ApiModel):
    """Simple Preference Optimisation (Meng et al., 2024): DPO's sigmoid loss on length-normalised
    log-probabilities, with a target margin and no reference model. Defaults from the paper's code."""

    beta: float = Field(default=2.0, gt=0, le=100, description="Scale of the length-normalised reward.")
    gamma_beta_ratio: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="Target reward margin gamma, as a fraction of beta (gamma = beta x gammaBetaRatio).",
    )


class KtoSettings(ApiModel):
    """Kahneman-Tversky Optimisation (Ethayarajh et al., 2024) on unpaired good/bad replies, against a
    frozen reference (the base model). Balance the weights so that desirableWeight x good examples over
    undesirableWeight x bad examples lies between 1 and 4/3, as the paper advises."""

    beta: float = Field(default=0.1, gt=0, le=10, description="Strength of the KL penalty towards the reference.")
    desirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="Weight of the loss on replies labelled true."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="Weight of the loss on replies labelled false."
    )


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


ExportFormat = Literal["merged", "gguf"]
GgufType = Literal["f16", "q8_0"]
# Methods whose training leaves no weight delta: soft prompts live beside the model, not in it, so
# there is nothing to fold into the base (PEFT has no merge for them) and nothing a GGUF file holds.
UNMERGEABLE_METHODS = ("prefixTuning", "promptTuning")
# Hugging Face architectures the trainer writes as llama.cpp's `llama` (same tensors, same rope).
GGUF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Fragments of hf:// model names of families llama.cpp reads under another architecture (other
# tensors, biases, rope or experts): refused at validation, before a download or any training.
_NOT_LLAMA_NAMES = ("qwen", "gemma", "phi-", "phi3", "gpt2", "gpt-neox", "pythia", "falcon", "mixtral", "bloom")


def _listed_once(field: str, label: str) -> Rule:
    """A list of enum values given at most once each: the API server's `exists_one` and its twin
    (`field` is a one-word name, the same on the wire and in Python)."""
    return Rule(
        cel=f"self.{field}.all(x, self.{field}.exists_one(y, y == x))",
        message=f"{label} lists an entry twice",
        check=lambda obj: len(set(getattr(obj, field))) == len(getattr(obj, field)),
        field_path=f".{field}",
    )


class GgufSettings(ApiModel):
    """How the GGUF files (llama.cpp, Ollama, LM Studio) are written: one file per type."""

    types: list[GgufType] = Field(
        default_factory=lambda: list[GgufType](["f16"]),
        min_length=1,
        max_length=2,
        description="f16 (2 bytes a weight, what llama.cpp computes in) and/or q8_0 (8-bit blocks of 32 with "
        "one scale, about half the size, near-lossless); each is written as model-TYPE.gguf.",
        json_schema_extra={"default": ["f16"]},
    )

    cel_rules: ClassVar = (_listed_once("types", "output.gguf.types"),)


class OutputSpec(ApiModel):
    """Where the adapter, report.json and checkpoints are written, and what is exported beside them."""

    uri: str = Field(
        min_length=1,
        max_length=MAX_URI,
        description="pvc://CLAIM/PATH, s3://BUCKET/PATH or file:///PATH (local runs only).",
    )
    merge_weights: bool = Field(
        default=False,
        description="Deprecated alias of export [merged]: also write the base with the adapter merged in.",
    )
    export: list[ExportFormat] = Field(
        default_factory=list,
        max_length=2,
        description="Also write, beside the adapter: merged (the base with the adapter folded in, safetensors, "
        "under merged/) and/or gguf (that merged model as GGUF files for llama.cpp and Ollama; Llama-family "
        "models). Not for prefixTuning or promptTuning, which leave no weights to merge.",
        json_schema_extra={"default": []},
    )
    gguf: GgufSettings | None = Field(default=None, description="export gguf only: the GGUF types written.")

    cel_rules: ClassVar = (
        *uri_rules("uri", "uri"),
        _listed_once("export", "output.export"),
        Rule(
            cel="!has(self.gguf) || 'gguf' in self.export",
            message="output.gguf is only allowed when output.export lists gguf",
            check=lambda o: o.gguf is None or "gguf" in o.export,
            field_path=".gguf",
        ),
    )

    @property
    def exports(self) -> tuple[str, ...]:
        """What is exported, in the order it is written (merged first: gguf reads the merged weights);
        mergeWeights counts as merged."""
        wanted = set(self.export) | ({"merged"} if self.merge_weights else set())
        return tuple(name for name in ("merged", "gguf") if name in wanted)

    def gguf_types(self) -> list[str]:
        """The GGUF types to write ([] when gguf is not exported)."""
        return list((self.gguf or GgufSettings()).types) if "gguf" in self.export else []


def _exports_merge(spec: "FineTuneJobSpec") -> bool:
    return bool(spec.output.exports)


EXPORT_METHOD_RULE = Rule(
    cel=(
        "!(self.output.mergeWeights || (has(self.output.export) && size(self.output.export) > 0)) || "
        f"!(self.method.type in {list(UNMERGEABLE_METHODS)})"
    ),
    message="output.export and output.mergeWeights need weights to merge into the base; prefixTuning and "
    "promptTuning train soft prompts, which stay a separate adapter",
    check=lambda s: not (_exports_merge(s) and s.method.type in UNMERGEABLE_METHODS),
    field_path=".output",
)
"""A FineTuneJobSpec rule (it reads method and output): listed in FineTuneJobSpec.cel_rules."""


def gguf_model_problem(model_uri: str) -> str | None:
    """Why a GGUF export of this model would fail, when its hf:// name already says so (validation
    has no weights: the trainer checks config.json's architecture before it trains); else None."""
    if not model_uri.startswith("hf://"):
        return None
    name = model_uri.removeprefix("hf://").split("/")[-1].lower()
    family = next((fragment for fragment in _NOT_LLAMA_NAMES if fragment in name), None)
    if family is None:
        return None
    return (
        f"GGUF export writes Llama-family models ({', '.join(GGUF_ARCHITECTURES)}); {model_uri!r} looks like "
        f"{family.strip('-')}, which llama.cpp reads under another architecture: export merged and convert it "
        "with llama.cpp's convert_hf_to_gguf.py"
    )


def gguf_architecture_problem(architectures: list[str] | None) -> str | None:
    """Why the model whose config.json lists `architectures` cannot be exported as GGUF, or None."""
    found = [name for name in architectures or [] if isinstance(name, str)]
    if any(name in GGUF_ARCHITECTURES for name in found):
        return None
    shown = ", ".join(found[:3]) or "no architecture in config.json"
    return (
        f"GGUF export writes Llama-family models ({', '.join(GGUF_ARCHITECTURES)}), not {shown}: "
        "export merged and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


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


Objective = Literal["sft", "dpo", "orpo", "simpo", "kto"]
# The dataset format each preference objective learns from (sft takes every other format).
OBJECTIVE_FORMATS = {"dpo": "preference", "orpo": "preference", "simpo": "preference", "kto": "unpaired-preference"}


def _objective_needs_format(objective: str, data_format: str) -> Rule:
    return Rule(
        cel=f"self.objective != '{objective}' || self.dataset.format == '{data_format}'",
        message=f"objective {objective} needs dataset.format {data_format}",
        check=lambda s: s.objective != objective or s.dataset.format == data_format,
    )


def _format_needs_objective(data_format: str) -> Rule:
    objectives = [o for o, f in OBJECTIVE_FORMATS.items() if f == data_format]
    listed = ", ".join(f"'{o}'" for o in objectives)
    names = " or ".join([", ".join(objectives[:-1]), objectives[-1]] if len(objectives) > 1 else objectives)
    return Rule(
        cel=f"self.dataset.format != '{data_format}' || self.objective in [{listed}]",
        message=f"{data_format} data needs objective {names}",
        check=lambda s: s.dataset.format != data_format or s.objective in objectives,
    )


def _settings_only_with(objective: str) -> Rule:
    return Rule(
        cel=f"!has(self.{objective}) || self.objective == '{objective}'",
        message=f"spec.{objective} is only allowed with objective {objective}",
        check=lambda s: getattr(s, objective) is None or s.objective == objective,
        field_path=f".{objective}",
    )


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
        default="sft",
        description=(
            "sft (supervised); on dataset.format preference: dpo (against the base as reference), orpo (SFT and "
            "preference in one loss, no reference) or simpo (length-normalised, no reference); on "
            "unpaired-preference data (good/bad replies, no pairs): kto."
        ),
    )
    dpo: DpoSettings | None = Field(default=None, description="objective dpo only.")
    orpo: OrpoSettings | None = Field(default=None, description="objective orpo only.")
    simpo: SimpoSettings | None = Field(default=None, description="objective simpo only.")
    kto: KtoSettings | None = Field(default=None, description="objective kto only.")
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
        *(_objective_needs_format(o, f) for o, f in OBJECTIVE_FORMATS.items()),
        *(_format_needs_objective(f) for f in dict.fromkeys(OBJECTIVE_FORMATS.values())),
        *(_settings_only_with(o) for o in OBJECTIVE_FORMATS),
        Rule(
            cel="self.objective != 'kto' || self.method.type != 'full'",
            message=(
                "objective kto uses the base model as its frozen reference, so it needs an adapter method "
                "(lora, qlora, dora, ...), not full"
            ),
            check=lambda s: s.objective != "kto" or s.method.type != "full",
            field_path=".method.type",
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
        EXPORT_METHOD_RULE,
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


class ExportedFile(ApiModel):
    """One exported file (spec.output.export gguf: one per GGUF type)."""

    type: str = Field(max_length=16, description="The GGUF type (f16, q8_0).")
    uri: str = Field(max_length=MAX_URI, description="Where the file was written.")
    size_bytes: int | None = Field(default=None, description="Its size.")
    sha256: str | None = Field(default=None, max_length=64, description="Its digest.")


class AdapterArtifact(ApiModel):
    """The trained result."""

    uri: str = Field(max_length=MAX_URI, description="Where the adapter was written.")
    size_bytes: int | None = Field(default=None, description="Size of the adapter weights.")
    sha256: str | None = Field(default=None, max_length=64, description="Digest of the adapter weights.")
    merged_uri: str | None = Field(
        default=None, max_length=MAX_URI, description="spec.output.export merged: the base with the adapter merged in."
    )
    gguf: list[ExportedFile] | None = Field(
        default=None, max_length=4, description="spec.output.export gguf: the GGUF files written, one per type."
    )


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
