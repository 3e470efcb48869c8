"""Memory and parallelism planning: pure arithmetic, shared by the operator (at admission) and the trainer.

The estimate follows the usual accounting for mixed-precision AdamW training: frozen weights in
their storage dtype, and for every trainable parameter a gradient, two fp32 moments and (for full
fine-tunes) an fp32 master copy. Sharded strategies divide the sharded parts by the world size;
CPU offload moves optimizer state to host memory. Activations are estimated per decoder layer.
It is an estimate, meant to reject jobs that cannot fit and to pick a strategy, not to predict
the last gigabyte.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from .api.finetunejob import FineTuneJobSpec, MethodSpec

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int = 32000


@dataclass(frozen=True)
class Plan:
    world_size: int
    strategy: str
    micro_batch: int
    grad_accumulation: int
    trainable_params: int
    total_params: int
    estimated_gpu_memory_gib: float | None  # None when training on CPU
    fits: bool
    advice: str = ""

    def summary(self) -> str:
        return (
            f"world size {self.world_size}, strategy {self.strategy}, micro-batch {self.micro_batch} x "
            f"accumulation {self.grad_accumulation}, trainable {self.trainable_params:,} / {self.total_params:,} "
            f"params, "
            + (
                f"~{self.estimated_gpu_memory_gib:.1f} GiB per GPU"
                if self.estimated_gpu_memory_gib is not None
                else "on CPU"
            )
        )


def weight_bytes_per_param(method: str, precision: str, quant_bits: int = 4) -> float:
    if method == "qlora":
        return quant_bits / 8 + 0.07  # block-wise constants, double-quantised
    return 4.0 if precision == "fp32" else 2.0


def estimate_gib(
    shape: ModelShape,
    trainable: int,
    method: str,
    precision: str,
    strategy: str,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    offload: bool,
    kernels: bool = False,
) -> float:
    """Peak memory per GPU in GiB for one strategy. With `kernels` (spec.hyperparameters.kernels auto)
    the loss is computed in chunks, so the fp32 logits are never held whole (one gradient of the
    last hidden state instead), and an adapter's fused LoRA MLP keeps two of its four
    intermediate activations per layer."""
    weights = shape.total_params * weight_bytes_per_param(method, precision)
    grads: float = trainable * (4 if precision == "fp32" else 2)
    optimizer: float = trainable * (8 + (4 if method == "full" and precision != "fp32" else 0))
    if strategy in ("fsdp", "deepspeed-zero3"):
        weights, grads, optimizer = weights / world_size, grads / world_size, optimizer / world_size
    elif strategy == "deepspeed-zero2":
        grads, optimizer = grads / world_size, optimizer / world_size
    if offload:
        optimizer = 0
        if strategy == "deepspeed-zero3":
            weights = 0.1 * weights  # only the layers being computed stay resident
    tokens = micro_batch * seq_len
    per_layer = (2 if gradient_checkpointing else _activation_factor(method, kernels)) * tokens * shape.hidden_size
    logits = 4 * tokens * (shape.hidden_size if kernels else shape.vocab_size)  # fp32, whole or chunked
    activations = per_layer * shape.num_layers + logits
    overhead = 1.0 * GIB  # CUDA context, allocator fragmentation, communication buffers
    return (weights + grads + optimizer + activations + overhead) / GIB


def _activation_factor(method: str, kernels: bool) -> int:
    """Bytes per token and hidden unit one decoder layer keeps for backward (the usual 34 of
    mixed precision); kubetune's fused LoRA MLP saves its input and two projections, not four
    intermediate-sized tensors, which is about a third less."""
    return 22 if kernels and method in ("lora", "qlora") else 34


STRATEGY_ORDER = ("ddp", "fsdp", "deepspeed-zero3")


def make_plan(
    shape: ModelShape,
    trainable: int,
    *,
    method: str,
    precision: str,
    strategy: str,
    offload: bool,
    nodes: int,
    gpus_per_node: int,
    global_batch: int,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    gpu_memory_gib: float | None,
    kernels: bool = False,
) -> Plan:
    """Resolve `auto`, derive accumulation, and say whether the job fits in `gpu_memory_gib`
    (None: unknown, or CPU training, where nothing is rejected)."""
    world = nodes * max(gpus_per_node, 1)
    accumulation = max(1, global_batch // (micro_batch * world))

    def estimate(candidate: str, with_offload: bool) -> float:
        return estimate_gib(
            shape,
            trainable,
            method,
            precision,
            candidate,
            world,
            micro_batch,
            seq_len,
            gradient_checkpointing,
            with_offload,
            kernels,
        )

    chosen = strategy
    if strategy == "auto":
        candidates = [s for s in STRATEGY_ORDER if world > 1 or s == "ddp"]
        budget = gpu_memory_gib or math.inf
        chosen = next((s for s in candidates if estimate(s, offload) <= budget), candidates[-1])
    need = estimate(chosen, offload)
    fits = gpus_per_node == 0 or gpu_memory_gib is None or need <= gpu_memory_gib
    advice = (
        ""
        if fits or gpu_memory_gib is None
        else _advice(
            shape, trainable, method, precision, world, micro_batch, seq_len, gradient_checkpointing, gpu_memory_gib
        )
    )
    memory = round(need, 1) if gpus_per_node else None
    return Plan(world, chosen, micro_batch, accumulation, trainable, shape.total_params, memory, fits, advice)


def plan_for_spec(
    spec: FineTuneJobSpec,
    shape: ModelShape,
    trainable: int,
    gpu_gib: float | None,
    *,
    layout: tuple[int, int] | None = None,
) -> Plan:
    """The plan of a FineTuneJob spec for a model of `shape` with `trainable` parameters on GPUs of
    `gpu_gib` GiB (None: unknown). `layout` = (nodes, GPUs per node) replaces the spec's resources,
    for a local run that uses the processes and devices it has."""
    h = spec.hyperparameters
    nodes, gpus = layout or (spec.resources.nodes, spec.resources.gpus_per_node)
    return make_plan(
        shape,
        trainable,
        method=spec.method.type,
        precision=h.precision,
        strategy=spec.distributed.strategy,
        offload=spec.distributed.offload == "cpu",
        nodes=nodes,
        gpus_per_node=gpus,
        global_batch=h.global_batch_size,
        micro_batch=h.micro_batch_size,
        seq_len=spec.dataset.max_seq_length,
        gradient_checkpointing=h.gradient_checkpointing,
        gpu_memory_gib=gpu_gib if gpus else None,
        kernels=h.kernels == "auto",
    )


def _advice(
    shape: ModelShape,
    trainable: int,
    method: str,
    precision: str,
    world: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    budget: float,
) -> str:
    """What would fit instead, tried in the order a user would reach for."""
    options = []
    if (
        estimate_gib(
            shape, trainable, method, precision, "deepspeed-zero3", world, micro_batch, seq_len, checkpointing, True
        )
        <= budget
    ):
        options.append("distributed strategy deepspeed-zero3 with offload cpu")
    lora_trainable = max(1, shape.total_params // 200)
    if (
        method != "qlora"
        and estimate_gib(shape, lora_trainable, "qlora", precision, "ddp", 1, micro_batch, seq_len, True, False)
        <= budget
    ):
        options.append("method qlora on one GPU")
    for gpus in (2, 4, 8, 16, 32, 64):
        if (
            gpus > world
            and estimate_gib(
                shape, trainable, method, precision, "fsdp", gpus, micro_batch, seq_len, checkpointing, False
            )
            <= budget
        ):
            options.append(f"fsdp over {gpus} GPUs")
            break
    return (
        "; ".join(options) if options else "no configuration up to 64 GPUs fits; reduce maxSeqLength or microBatchSize"
    )


# --- trainable parameters of the adapter methods counted from the layer shapes --------------------


@dataclass(frozen=True)
class DecoderShape:
    """The sizes adapter parameter counts depend on: a Llama/Qwen/Mistral-style decoder's widths
    (kv_size: the key/value projections' width, narrower than hidden under grouped-query attention)."""

    hidden_size: int
    intermediate_size: int
    kv_size: int
    num_layers: int


def linear_sizes(shape: DecoderShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder-layer linear, Llama/Qwen/Mistral naming."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip


def adapted_linears(shape: DecoderShape, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of the linears one decoder layer adapts; names of other architectures count as
    hidden x hidden (an estimate: their sizes are unknown here)."""
    sizes = linear_sizes(shape)
    if "all-linear" in targets:
        return list(sizes.values())
    square = (shape.hidden_size, shape.hidden_size)
    return [sizes.get(name, square) for name in targets]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the divisor pair
    closest to the square root not above `factor`. PEFT's LoKr splits each layer's sizes this way."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def nearest_divisor(size: int, wanted: int) -> int:
    """The divisor of `size` nearest to `wanted` (the lower one on a tie; `size` itself when wanted
    is not smaller): how PEFT's OFT fits a block size to a layer it does not divide."""
    if wanted >= size:
        return size
    higher = wanted
    while higher <= size and size % higher:
        higher += 1
    lower = wanted
    while lower > 1 and size % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def _loha(i: int, o: int, r: int) -> int:
    return 2 * r * (i + o)  # two low-rank pairs, Hadamard-multiplied


def _lokr(i: int, o: int, r: int, decompose_both: bool, factor: int) -> int:
    in_m, in_n = factorization(i, factor)
    out_l, out_k = factorization(o, factor)
    small = (
        out_l * in_m if not (decompose_both and r < max(out_l, in_m) / 2) else r * (out_l + in_m)
    )  # the small Kronecker factor: whole, or itself low-rank
    large = out_k * in_n if r >= max(out_k, in_n) / 2 else r * (out_k + in_n)
    return small + large


def _oft(i: int, block_size: int, block_share: bool) -> int:
    block = nearest_divisor(i, block_size) if i % block_size or block_size > i else block_size
    blocks = 1 if block_share else i // block
    return blocks * block * (block - 1) // 2  # the strictly upper triangle of each skew-symmetric block


def _norm_params(shape: DecoderShape, targets: list[str]) -> int:
    """LayerNorm tuning: every named norm once per decoder layer, `norm` (the final one) once."""
    per_layer = sum(1 for name in targets if name != "norm")
    return shape.hidden_size * (per_layer * shape.num_layers + (1 if "norm" in targets else 0))


def method_trainable_params(method: MethodSpec, shape: DecoderShape) -> int | None:
    """Parameters that get gradients under one of the methods counted from the layer shapes alone
    (loha, lokr, vera, oft, hra, fourierft, lnTuning), exactly as PEFT creates them for a
    Llama/Qwen/Mistral decoder; None for the other methods (the operator counts those itself)."""
    if method.type == "lnTuning":
        return _norm_params(shape, method.effective_ln_tuning().target_modules)
    per_linear = _per_linear_counter(method)
    if per_linear is None:
        return None
    counter, targets = per_linear
    return shape.num_layers * sum(counter(i, o) for i, o in adapted_linears(shape, targets))


def _per_linear_counter(method: MethodSpec) -> tuple[Callable[[int, int], int], list[str]] | None:
    """How many parameters the method adds to one (in, out) linear, and which linears it adapts."""
    if method.type == "loha":
        loha = method.effective_loha()
        return (lambda i, o: _loha(i, o, loha.r)), loha.target_modules
    if method.type == "lokr":
        lokr = method.effective_lokr()
        return (lambda i, o: _lokr(i, o, lokr.r, lokr.decompose_both, lokr.decompose_factor)), lokr.target_modules
    if method.type == "vera":
        vera = method.effective_vera()
        # The random projections are shared and frozen: each layer trains two scaling vectors.
        return (lambda i, o: vera.r + o), vera.target_modules
    if method.type == "oft":
        oft = method.effective_oft()
        return (lambda i, o: _oft(i, oft.block_size, oft.block_share)), oft.target_modules
    if method.type == "hra":
        hra = method.effective_hra()
        return (lambda i, o: i * hra.r), hra.target_modules  # r Householder vectors of the input's width
    if method.type == "fourierft":
        fourier = method.effective_fourierft()
        return (lambda i, o: fourier.n_frequency), fourier.target_modules
    return None
