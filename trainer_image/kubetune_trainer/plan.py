"""`kubetune plan`: the memory and parallelism plan of a job, from the model's config alone.

The model is instantiated on the meta device (shapes, no memory), the method applied, and the
parameters counted, so the plan is exact about parameters without downloading weights twice.
"""

from pathlib import Path

import torch
from kubetune_operator.api.trainerconfig import TrainerConfig
from kubetune_operator.planning import ModelShape, Plan, make_plan

from . import methods, storage


def count_on_meta(model_dir: Path, config: TrainerConfig) -> tuple[object, int, int]:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_dir)
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
    model_dir = storage.resolve_input(spec.model.uri, cache_dir=Path(config.runtime.cache_dir), revision=spec.model.revision, local=config.runtime.local)
    model_config, trainable, total = count_on_meta(model_dir, config)
    h, r = spec.hyperparameters, spec.resources
    shape = ModelShape(total, model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size)
    return make_plan(
        shape, trainable, method=spec.method.type, precision=h.precision, strategy=spec.distributed.strategy,
        offload=spec.distributed.offload == "cpu", nodes=r.nodes, gpus_per_node=r.gpus_per_node,
        global_batch=h.global_batch_size, micro_batch=h.micro_batch_size, seq_len=spec.dataset.max_seq_length,
        gradient_checkpointing=h.gradient_checkpointing, gpu_memory_gib=gpu_memory_gib if r.gpus_per_node else None,
    )
