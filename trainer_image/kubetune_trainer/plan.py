"""`kubetune plan`: the memory and parallelism plan of a job, from the model's config alone.

The model is instantiated on the meta device (shapes, no memory), the method applied, and the
parameters counted, so the plan is exact about parameters without downloading weights twice.
"""

from pathlib import Path

import torch

from kubetune import storage
from kubetune.contract import TrainerConfig
from kubetune.planning import ModelShape, Plan, plan_for_spec

from . import methods


def count_on_meta(model_dir: Path, config: TrainerConfig) -> tuple[object, int, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    uri = config.spec.model.uri
    model_config = methods.loading_model(uri, model_dir, lambda: AutoConfig.from_pretrained(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    spec = config.spec
    peft_config = methods.peft_config(spec.method, total_steps=1000, tokenizer_dir=model_dir)
    if peft_config is not None and not peft_config.is_prompt_learning:
        import peft

        model = peft.get_peft_model(model, peft_config)
    elif peft_config is not None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = peft_config.num_virtual_tokens * model_config.hidden_size
        return model_config, trainable, sum(p.numel() for p in model.parameters()) + trainable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model_config, trainable, sum(p.numel() for p in model.parameters())


def plan_for_config(config: TrainerConfig, gpu_memory_gib: float | None = 80.0) -> Plan:
    spec = config.spec
    model_dir = storage.resolve_input(
        spec.model.uri,
        cache_dir=Path(config.runtime.cache_dir),
        revision=spec.model.revision,
        local=config.runtime.local,
    )
    methods.model_folder(spec.model.uri, model_dir)
    model_config, trainable, total = count_on_meta(model_dir, config)
    shape = ModelShape(total, model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size)
    return plan_for_spec(spec, shape, trainable, gpu_memory_gib)
