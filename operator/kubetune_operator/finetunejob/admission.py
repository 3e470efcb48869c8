"""Admission of a FineTuneJob: is the spec usable in a cluster, and does the plan fit the GPUs?

Pure: a parsed FineTuneJob in, an `Admission` out. The operator has no model weights, so the
memory check uses the model's shape from a small table of well-known models (parsed out of
hf:// URIs), or the parameter count a user states in the annotation `kubetune.io/model-params`
(e.g. "7B", "494M", "8030261248"). A model of unknown size is admitted without the memory check,
and the Admitted condition says so. The GPU's memory comes from the `nvidia.com/gpu.product`
node selector, the annotation `kubetune.io/gpu-memory-gib`, or an 80 GiB default.

Annotations are anyone's text: a count that is not finite, not positive or beyond any model
(`1e999`, `nan`, `-1`, 400 digits) is "not a parameter count" and the job is admitted without the
memory check; a GPU memory that is not a finite, plausible number is ignored. The operator's
allow-lists (images, PriorityClasses, GPU resource names; `OperatorConfig`) refuse a job with
reason NotAllowed.
"""

import math
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from kubetune.api.finetunejob import FineTuneJob, TrainingPlan
from kubetune.api.validation import validate
from kubetune.planning import DecoderShape, ModelShape, Plan, adapted_linears, method_trainable_params, plan_for_spec

from ..config import OperatorConfig
from ..render_common import gpu_resource_problem
from .render import name_problems, policy_problems

MODEL_PARAMS_ANNOTATION = "kubetune.io/model-params"
GPU_MEMORY_ANNOTATION = "kubetune.io/gpu-memory-gib"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_MEMORY_GIB = 80.0
MAX_PARAMS = 10**14  # 100T parameters: beyond any model, and small enough for the planner's arithmetic
MAX_GPU_MEMORY_GIB = 4096.0
MAX_ANNOTATION_TEXT = 64  # characters of an annotation parsed as a number

# Reasons of the Admitted (and, when refused, Failed) condition.
ADMITTED = "Admitted"
INVALID_SPEC = "InvalidSpec"
INSUFFICIENT_GPU_MEMORY = "InsufficientGpuMemory"
NOT_ALLOWED = "NotAllowed"


@dataclass(frozen=True)
class Architecture:
    """A model's shape plus the linear-layer sizes that adapter parameter counts depend on."""

    shape: ModelShape
    intermediate_size: int
    kv_size: int  # key/value projection width (grouped-query attention makes it narrower than hidden)

    @property
    def decoder(self) -> DecoderShape:
        return DecoderShape(self.shape.hidden_size, self.intermediate_size, self.kv_size, self.shape.num_layers)


def _arch(total: int, hidden: int, layers: int, vocab: int, intermediate: int, kv: int) -> Architecture:
    return Architecture(ModelShape(total, hidden, layers, vocab), intermediate, kv)


# hf:// repository names (lower-cased) → shapes from the models' published configs.
KNOWN_MODELS: tuple[tuple[re.Pattern[str], Architecture], ...] = tuple(
    (re.compile(pattern), arch)
    for pattern, arch in (
        (r"qwen2\.5-(?:[a-z]+-)?0\.5b\b", _arch(494_032_768, 896, 24, 151_936, 4_864, 128)),
        (r"qwen2\.5-(?:[a-z]+-)?1\.5b\b", _arch(1_543_714_304, 1_536, 28, 151_936, 8_960, 256)),
        (r"qwen2\.5-(?:[a-z]+-)?7b\b", _arch(7_615_616_512, 3_584, 28, 152_064, 18_944, 512)),
        (r"qwen2\.5-(?:[a-z]+-)?32b\b", _arch(32_763_876_352, 5_120, 64, 152_064, 27_648, 1_024)),
        (r"llama-3\.1-8b\b", _arch(8_030_261_248, 4_096, 32, 128_256, 14_336, 1_024)),
        (r"llama-3\.1-70b\b", _arch(70_553_706_496, 8_192, 80, 128_256, 28_672, 1_024)),
        (r"mistral-7b\b", _arch(7_241_732_096, 4_096, 32, 32_768, 14_336, 1_024)),
    )
)

# Memory of common data-centre GPUs, by a fragment of their nvidia.com/gpu.product label, checked
# after a "<N>GB" in the label itself.
GPU_PRODUCTS_GIB = (
    ("H200", 141.0),
    ("H100", 80.0),
    ("B200", 180.0),
    ("A100", 40.0),
    ("L40", 48.0),
    ("A10", 24.0),
    ("L4", 24.0),
    ("T4", 16.0),
    ("V100", 16.0),
)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str
    message: str
    plan: TrainingPlan | None = None


# --- the model's shape ---------------------------------------------------------------------------


def parse_param_count(text: str) -> int | None:
    """ "7B", "1.5b", "494M", "7e9", "8030261248" → a parameter count; None if unreadable, not
    finite, not positive or beyond MAX_PARAMS ("1e999", "nan", "-1", 400 digits)."""
    if not isinstance(text, str) or len(text) > MAX_ANNOTATION_TEXT:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not match:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
    value = float(match.group(1)) * scale
    if not math.isfinite(value) or not 1 <= value <= MAX_PARAMS:
        return None
    return int(value)


def architecture_from_params(total: int) -> Architecture:
    """A plausible decoder shape for `total` parameters (about 12 x layers x hidden² of them)."""
    layers = 24 if total < 1e9 else 28 if total < 4e9 else 32 if total < 15e9 else 64 if total < 45e9 else 80
    hidden = max(128, round(math.sqrt(total / (12 * layers)) / 128) * 128)
    return _arch(total, hidden, layers, 32_000, int(hidden * 3.5), hidden)


def known_architecture(uri: str) -> Architecture | None:
    parsed = urlparse(uri)
    if parsed.scheme != "hf":
        return None
    repository = f"{parsed.netloc}{parsed.path}".lower()
    for pattern, arch in KNOWN_MODELS:
        if pattern.search(repository):
            return arch
    return None


def model_architecture(job: FineTuneJob) -> tuple[Architecture | None, str]:
    """The model's shape and where it came from (for the Admitted message)."""
    stated = job.metadata.annotations.get(MODEL_PARAMS_ANNOTATION)
    if stated is not None:
        count = parse_param_count(stated)
        if count is None:
            shown = repr(stated[:40]) + ("..." if len(stated) > 40 else "")
            return None, f"annotation {MODEL_PARAMS_ANNOTATION}={shown} is not a parameter count (e.g. 7B, 494M)"
        return architecture_from_params(count), f"{count:,} parameters from annotation {MODEL_PARAMS_ANNOTATION}"
    arch = known_architecture(job.spec.model.uri)
    if arch is None:
        return None, (
            f"the size of {job.spec.model.uri} is unknown to the operator; "
            f'set annotation {MODEL_PARAMS_ANNOTATION} (e.g. "7B") to check GPU memory'
        )
    return arch, f"{job.spec.model.uri} is a known {arch.shape.total_params / 1e9:.1f}B model"


# --- trainable parameters ------------------------------------------------------------------------


def trainable_params(job: FineTuneJob, arch: Architecture) -> int:
    """Parameters that get gradients under the job's method (as PEFT counts them; names outside the
    Llama/Qwen/Mistral family are estimated as hidden x hidden)."""
    method, layers, hidden = job.spec.method, arch.shape.num_layers, arch.shape.hidden_size
    if method.type == "full":
        return arch.shape.total_params
    counted = method_trainable_params(method, arch.decoder)
    if counted is not None:  # loha, lokr, vera, oft, hra, fourierft, lnTuning
        return counted
    if method.type in ("lora", "qlora", "dora"):
        lora = method.effective_lora()
        modules = adapted_linears(arch.decoder, lora.target_modules)
        extra = sum(out for _, out in modules) if method.type == "dora" else 0  # DoRA's magnitude vectors
        return layers * (lora.r * sum(i + o for i, o in modules) + extra)
    if method.type == "adalora":
        adalora = method.adalora
        modules = adapted_linears(arch.decoder, adalora.target_modules if adalora else ["all-linear"])
        return layers * (adalora.init_r if adalora else 12) * sum(i + o for i, o in modules)
    if method.type == "ia3":
        ia3 = method.ia3
        targets = ia3.target_modules if ia3 else ["k_proj", "v_proj", "down_proj"]
        feedforward = set(ia3.feedforward_modules if ia3 else ["down_proj"])
        sizes = dict(zip(targets, adapted_linears(arch.decoder, targets), strict=True))
        return layers * sum(i if name in feedforward else o for name, (i, o) in sizes.items())
    tokens = method.virtual_tokens.num_virtual_tokens if method.virtual_tokens else 20
    if method.type == "prefixTuning":
        return tokens * 2 * layers * hidden  # a key and a value prefix in every layer
    return tokens * hidden  # promptTuning


# --- GPU memory ----------------------------------------------------------------------------------


def gpu_memory_gib(job: FineTuneJob) -> tuple[float, str]:
    """The per-GPU memory budget and where it came from."""
    stated = job.metadata.annotations.get(GPU_MEMORY_ANNOTATION)
    if stated is not None:
        try:
            value = float(stated[:MAX_ANNOTATION_TEXT])
        except ValueError:
            value = 0.0
        if math.isfinite(value) and 0 < value <= MAX_GPU_MEMORY_GIB:
            return value, f"annotation {GPU_MEMORY_ANNOTATION}"
    product = job.spec.resources.node_selector.get(GPU_PRODUCT_LABEL, "")
    if product:
        stated_gb = re.search(r"(\d+)\s*GB", product, re.IGNORECASE)
        if stated_gb:
            return float(stated_gb.group(1)), f"node selector {GPU_PRODUCT_LABEL}={product}"
        for fragment, gib in GPU_PRODUCTS_GIB:
            if fragment.lower() in product.lower():
                return gib, f"node selector {GPU_PRODUCT_LABEL}={product}"
    return DEFAULT_GPU_MEMORY_GIB, "the default for a GPU of unknown type"


# --- the plan ------------------------------------------------------------------------------------


def plan_for(job: FineTuneJob, arch: Architecture, budget_gib: float) -> Plan:
    return plan_for_spec(job.spec, arch.shape, trainable_params(job, arch), budget_gib)


def training_plan(plan: Plan) -> TrainingPlan:
    return TrainingPlan(
        world_size=plan.world_size,
        strategy=plan.strategy,
        micro_batch=plan.micro_batch,
        grad_accumulation=plan.grad_accumulation,
        estimated_gpu_memory_gib=plan.estimated_gpu_memory_gib,
        trainable_params=plan.trainable_params,
        total_params=plan.total_params,
    )


def sizeless_plan(job: FineTuneJob) -> TrainingPlan:
    """What is known without the model's size: the layout, and the strategy as written."""
    h, r = job.spec.hyperparameters, job.spec.resources
    world = r.world_size
    return TrainingPlan(
        world_size=world,
        strategy=job.spec.distributed.strategy,
        micro_batch=h.micro_batch_size,
        grad_accumulation=max(1, h.global_batch_size // (h.micro_batch_size * world)),
    )


# --- admission -----------------------------------------------------------------------------------


def spec_problems(job: FineTuneJob) -> list[str]:
    """Everything that stops the job from running in a cluster, in the user's words."""
    meta = job.metadata
    problems = name_problems(meta.name, job.spec.resources.nodes)
    if not meta.namespace:
        problems.append("metadata.namespace is required")
    return problems + [str(problem) for problem in validate(job, local=False)]


def not_allowed_problems(job: FineTuneJob, config: OperatorConfig) -> list[str]:
    """What the operator's allow-lists refuse in `job`: its image, its PriorityClass, and the
    extended resource it requests its GPUs under."""
    resources = job.spec.resources
    gpu = gpu_resource_problem(resources.gpu_resource, resources.gpus_per_node, config)
    return policy_problems(job, config) + ([gpu] if gpu else [])


def refuse_invalid(problems: list[str]) -> Admission:
    return Admission(False, INVALID_SPEC, "the spec cannot run in a cluster:\n" + "\n".join(f"  {p}" for p in problems))


def refuse_not_allowed(problems: list[str]) -> Admission:
    return Admission(False, NOT_ALLOWED, "; ".join(problems))


def admit(job: FineTuneJob, config: OperatorConfig | None = None) -> Admission:
    """Admit the job (with its plan), or refuse it with the reason and what to change. `config`:
    the operator's, whose allow-lists apply (without it, only the spec is checked)."""
    problems = spec_problems(job)
    if problems:
        return refuse_invalid(problems)
    refused = not_allowed_problems(job, config) if config is not None else []
    if refused:
        return refuse_not_allowed(refused)
    arch, model_note = model_architecture(job)
    if arch is None:
        return Admission(True, ADMITTED, f"admitted without a GPU memory check: {model_note}", sizeless_plan(job))
    budget, budget_note = gpu_memory_gib(job)
    plan = plan_for(job, arch, budget)
    if not plan.fits:
        message = (
            f"needs ~{plan.estimated_gpu_memory_gib:.1f} GiB per GPU ({plan.strategy} over {plan.world_size} GPU(s), "
            f"method {job.spec.method.type}) but a GPU has {budget:g} GiB ({budget_note}); {model_note}. "
            f"Would fit: {plan.advice}"
        )
        return Admission(False, INSUFFICIENT_GPU_MEMORY, message, training_plan(plan))
    budget_text = f" of {budget:g} GiB ({budget_note})" if job.spec.resources.gpus_per_node else ""
    return Admission(True, ADMITTED, f"{plan.summary()}{budget_text}; {model_note}", training_plan(plan))
