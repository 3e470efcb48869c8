"""Loading the base model and applying the fine-tuning method (PEFT for every adapter method)."""

import json
from pathlib import Path

import torch

from kubetune.api.finetunejob import (
    BASE_CHANGING_INITS,
    AdaLoraSettings,
    FineTuneJobSpec,
    IA3Settings,
    MethodSpec,
    VirtualTokenSettings,
)
from kubetune.logs import first_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(spec: FineTuneJobSpec, on_gpu: bool) -> torch.dtype:
    """Frozen base weights are stored in the training precision (they get no optimizer state);
    a full fine-tune keeps fp32 master weights and autocasts the matmuls."""
    if spec.method.type == "full" or not on_gpu:
        return torch.float32
    return DTYPES[spec.hyperparameters.precision]


def model_folder(uri: str, path: Path) -> None:
    """spec.model.uri must name a folder (config, weights, tokenizer), not one of its files."""
    if not path.is_dir():
        raise ValueError(
            f"spec.model.uri {uri}: a file, not a model folder; point it at the folder that holds "
            "config.json, the weights and the tokenizer"
        )


# What transformers, tokenizers and safetensors raise for a folder that is not a loadable model: a
# garbage or missing config.json, weights or tokenizer file, a config nested deeper than the parser goes.
_MODEL_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, EOFError)


def loading_model(uri: str, folder: Path, load):
    """`load()`, with a model folder's contents that cannot be loaded turned into one line naming
    the user's URI, not the folder it is mounted at (a ValueError: retrying cannot help). Memory and
    CUDA errors are not the folder's fault and pass through."""
    try:
        return load()
    except Exception as error:
        # safetensors' own error type is not importable by name from every version
        if not isinstance(error, _MODEL_ERRORS) and type(error).__name__ != "SafetensorError":
            raise
        why = first_line(error).replace(str(folder), uri.rstrip("/"))
        raise ValueError(f"spec.model.uri {uri}: not a model transformers can load ({why})") from None


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one; pads are masked anyway
    return tokenizer


def load_base_model(model_dir: Path, spec: FineTuneJobSpec, on_gpu: bool, quantized: bool = True):
    """The base model to train (QLoRA: quantized, compute dtype) or, with `quantized=False`, to merge
    an adapter into (QLoRA: the original weights in the compute dtype)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": base_dtype(spec, on_gpu)}
    if spec.method.type == "qlora":
        kwargs["dtype"] = COMPUTE_DTYPES[spec.method.effective_quantization().compute_dtype]
        if quantized:
            kwargs["quantization_config"] = quantization_config(spec.method)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def quantization_config(method: MethodSpec):
    from transformers import BitsAndBytesConfig

    q = method.effective_quantization()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[q.compute_dtype],
    )


def _targets(modules: list[str]) -> str | list[str]:
    # PEFT spells "every linear layer but the head" as the string "all-linear", not a list.
    return "all-linear" if modules == ["all-linear"] else list(modules)


def peft_config(method: MethodSpec, total_steps: int, tokenizer_dir: Path):
    """The PEFT configuration for an adapter method (None for a full fine-tune)."""
    import peft

    causal = peft.TaskType.CAUSAL_LM
    if method.type in ("lora", "qlora", "dora"):
        lora = method.effective_lora()
        return peft.LoraConfig(
            task_type=causal,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_targets(lora.target_modules),
            use_rslora=lora.rslora,
            use_dora=method.type == "dora",
            init_lora_weights=LORA_INITS[lora.init],
        )
    if method.type == "adalora":
        a = method.adalora or AdaLoraSettings()
        return peft.AdaLoraConfig(
            task_type=causal,
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=a.tinit,
            tfinal=a.tfinal,
            deltaT=a.delta_t,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=_targets(a.target_modules),
            total_step=total_steps,
        )
    if method.type == "ia3":
        ia3 = method.ia3 or IA3Settings()
        return peft.IA3Config(
            task_type=causal, target_modules=list(ia3.target_modules), feedforward_modules=list(ia3.feedforward_modules)
        )
    if method.type in ("promptTuning", "prefixTuning"):
        tokens = method.virtual_tokens or VirtualTokenSettings()
        if method.type == "prefixTuning":
            return peft.PrefixTuningConfig(task_type=causal, num_virtual_tokens=tokens.num_virtual_tokens)
        if tokens.init_text:
            return peft.PromptTuningConfig(
                task_type=causal,
                num_virtual_tokens=tokens.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=tokens.init_text,
                tokenizer_name_or_path=str(tokenizer_dir),
            )
        return peft.PromptTuningConfig(task_type=causal, num_virtual_tokens=tokens.num_virtual_tokens)
    return _more_methods_config(method)


def _more_methods_config(method: MethodSpec):
    """The PEFT configuration of loha, lokr, vera, oft, hra, fourierft and lnTuning (None otherwise)."""
    import peft

    causal = peft.TaskType.CAUSAL_LM
    if method.type == "loha":
        loha = method.effective_loha()
        return peft.LoHaConfig(
            task_type=causal,
            r=loha.r,
            alpha=loha.alpha,
            rank_dropout=loha.rank_dropout,
            module_dropout=loha.module_dropout,
            target_modules=_targets(loha.target_modules),
        )
    if method.type == "lokr":
        lokr = method.effective_lokr()
        return peft.LoKrConfig(
            task_type=causal,
            r=lokr.r,
            alpha=lokr.alpha,
            rank_dropout=lokr.rank_dropout,
            module_dropout=lokr.module_dropout,
            decompose_both=lokr.decompose_both,
            decompose_factor=lokr.decompose_factor,
            target_modules=_targets(lokr.target_modules),
        )
    if method.type == "vera":
        vera = method.effective_vera()
        return peft.VeraConfig(
            task_type=causal,
            r=vera.r,
            d_initial=vera.d_initial,
            vera_dropout=vera.dropout,
            projection_prng_key=vera.projection_seed,
            save_projection=True,  # the adapter then loads without regenerating the projections
            target_modules=_targets(vera.target_modules),
        )
    if method.type == "oft":
        oft = method.effective_oft()
        return peft.OFTConfig(
            task_type=causal,
            r=0,  # the block size decides the number of blocks
            oft_block_size=oft.block_size,
            block_share=oft.block_share,
            coft=oft.coft,
            module_dropout=oft.module_dropout,
            target_modules=_targets(oft.target_modules),
        )
    if method.type == "hra":
        hra = method.effective_hra()
        return peft.HRAConfig(
            task_type=causal, r=hra.r, apply_GS=hra.apply_gs, target_modules=_targets(hra.target_modules)
        )
    if method.type == "fourierft":
        fourier = method.effective_fourierft()
        return peft.FourierFTConfig(
            task_type=causal,
            n_frequency=fourier.n_frequency,
            scaling=fourier.scaling,
            random_loc_seed=fourier.frequency_seed,
            target_modules=_targets(fourier.target_modules),
        )
    if method.type == "lnTuning":
        return peft.LNTuningConfig(task_type=causal, target_modules=list(method.effective_ln_tuning().target_modules))
    return None


def parameter_groups(model, parameters: list, method: MethodSpec, learning_rate: float) -> list:
    """What the optimizer gets: `parameters` unchanged, or with LoRA+ (method.lora.loraplusLrRatio)
    two groups: the B matrices at learning_rate x ratio, everything else at learning_rate.

    LoRA+ (Hayou et al., 2024): A and B play different roles, and B learning faster speeds up
    training and improves the result at no cost. B is told apart by its parameter name in `model`
    (PEFT's lora_B / lora_embedding_B), looked up when the strategy builds the optimizer, after
    sharding, so the parameters are the ones the strategy trains."""
    ratio = method.effective_lora().loraplus_lr_ratio if method.type in ("lora", "qlora", "dora") else None
    if ratio is None:
        return parameters
    b_matrices = {id(p) for name, p in model.named_parameters() if ".lora_B." in name or ".lora_embedding_B." in name}
    fast = [p for p in parameters if id(p) in b_matrices]
    if not fast:
        raise ValueError("method.lora.loraplusLrRatio: the adapter has no LoRA B matrices to give a learning rate")
    slow = [p for p in parameters if id(p) not in b_matrices]
    return [{"params": slow, "lr": learning_rate}, {"params": fast, "lr": learning_rate * ratio}]


def apply_method(model, spec: FineTuneJobSpec, total_steps: int, tokenizer_dir: Path):
    """Wrap the base model for the method; returns the model whose trainable parameters are trained."""
    import peft

    checkpointing = spec.hyperparameters.gradient_checkpointing
    # Non-reentrant checkpointing: the reentrant kind is being retired by torch and needs inputs that
    # require grad to reach frozen layers.
    non_reentrant = {"use_reentrant": False}
    if spec.method.type == "qlora":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=non_reentrant
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        if spec.method.is_adapter:
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    config = peft_config(spec.method, total_steps, tokenizer_dir)
    return model if config is None else peft.get_peft_model(model, config)


# spec.method.lora.init → PEFT's init_lora_weights. PiSSA by randomized SVD (16 power iterations, as
# PEFT advises for large models: seconds instead of minutes per 7B model, near the exact factors).
LORA_INITS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa_niter_16",
    "olora": "olora",
}


def initial_adapter_state(model, method: MethodSpec) -> dict | None:
    """PiSSA and OLoRA: the adapter's weights as initialised (CPU copies), which saving needs to
    convert the trained adapter for the unchanged base; None for every other method. Called right
    after `apply_method`, before any step (a resumed run initialises the same way: the same base,
    the same seed)."""
    if method.type != "lora" or method.effective_lora().init not in BASE_CHANGING_INITS:
        return None
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in get_peft_model_state_dict(model).items()}


def to_plain_lora(config: dict, trained: dict, initial: dict) -> tuple[dict, dict]:
    """A PiSSA/OLoRA adapter as an ordinary LoRA adapter of the base it was made from.

    Training ran on W_res = W - s B0 A0 (the init moved s B0 A0 into the adapter), so the tuned weight
    is W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]: a LoRA of rank 2r with A' = [A ; A0]
    and B' = [B | -B0]. Doubling alpha with r keeps s = alpha / r (with rsLoRA, alpha / sqrt(r): alpha
    times sqrt 2); the config says the default init, so loading it changes no base weight."""
    state = {}
    for name, tensor in trained.items():
        if ".lora_A." in name:
            state[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            state[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
        else:
            state[name] = tensor
    converted = dict(config, r=2 * config["r"], init_lora_weights=True)
    converted["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    return converted, state


def convert_saved_adapter(folder: Path, initial: dict) -> None:
    """Rewrite the adapter saved in `folder` (a staging folder, not yet published) with `to_plain_lora`."""
    from safetensors.torch import load_file, save_file

    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    config, state = to_plain_lora(json.loads(config_file.read_text()), load_file(weights), initial)
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total
