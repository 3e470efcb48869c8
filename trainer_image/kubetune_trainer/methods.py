"""Loading the base model and applying the fine-tuning method (PEFT for every adapter method)."""

from pathlib import Path

import torch

from kubetune.api.finetunejob import (
    AdaLoraSettings,
    FineTuneJobSpec,
    IA3Settings,
    MethodSpec,
    VirtualTokenSettings,
)

from .outcome import first_line

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
    return None


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
