"""The memory planner: strategies resolved from memory, and advice when nothing fits."""

import pytest

from kubetune.planning import ModelShape, estimate_gib, make_plan

LLAMA_8B = ModelShape(total_params=8_030_000_000, hidden_size=4096, num_layers=32, vocab_size=128_256)
LLAMA_70B = ModelShape(total_params=70_550_000_000, hidden_size=8192, num_layers=80, vocab_size=128_256)
LORA_8B = 42_000_000


def plan(shape=LLAMA_8B, trainable=LORA_8B, **overrides):
    args = dict(
        method="lora",
        precision="bf16",
        strategy="auto",
        offload=False,
        nodes=1,
        gpus_per_node=1,
        global_batch=16,
        micro_batch=2,
        seq_len=2048,
        gradient_checkpointing=True,
        gpu_memory_gib=80.0,
    )
    args.update(overrides)
    return make_plan(shape, trainable, **args)


def test_lora_on_8b_fits_one_gpu_with_ddp():
    result = plan()
    assert result.fits and result.strategy == "ddp" and result.world_size == 1
    assert result.grad_accumulation == 8
    assert 16 < result.estimated_gpu_memory_gib < 40  # 16 GB of bf16 weights plus activations


def test_full_70b_on_one_80gb_gpu_does_not_fit_and_says_what_would():
    result = plan(LLAMA_70B, LLAMA_70B.total_params, method="full")
    assert not result.fits
    assert "qlora" in result.advice and "fsdp over" in result.advice


def test_auto_shards_when_replicas_do_not_fit():
    result = plan(trainable=LLAMA_8B.total_params, method="full", gpus_per_node=8, global_batch=64)
    assert result.strategy == "fsdp" and result.fits
    assert result.world_size == 8 and result.grad_accumulation == 4


def test_sharding_and_offload_reduce_memory():
    common = (LLAMA_8B, LLAMA_8B.total_params, "full", "bf16")
    ddp = estimate_gib(*common, "ddp", 8, 1, 2048, True, False)
    zero2 = estimate_gib(*common, "deepspeed-zero2", 8, 1, 2048, True, False)
    fsdp = estimate_gib(*common, "fsdp", 8, 1, 2048, True, False)
    offload = estimate_gib(*common, "deepspeed-zero3", 8, 1, 2048, True, True)
    assert ddp > zero2 > fsdp > offload


def test_qlora_weights_take_about_half_a_byte_per_parameter():
    qlora = estimate_gib(LLAMA_70B, LORA_8B, "qlora", "bf16", "ddp", 1, 1, 1024, True, False)
    assert 35 < qlora < 60


def test_cpu_training_is_never_rejected():
    result = plan(LLAMA_70B, LLAMA_70B.total_params, method="full", gpus_per_node=0, gpu_memory_gib=None)
    assert result.fits and result.estimated_gpu_memory_gib is None
    assert "on CPU" in result.summary()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero3"])
def test_an_explicit_strategy_is_kept(strategy):
    assert plan(strategy=strategy, gpus_per_node=2).strategy == strategy


def test_kernels_lower_the_estimate_by_the_logits_and_the_fused_mlp():
    # Without checkpointing, micro-batch 4 x 2048 on an 8B LoRA: the fp32 logits alone are
    # 4 x 2048 x 128,256 x 4 B = 3.9 GiB; chunked, they become one hidden-sized gradient.
    common = dict(gradient_checkpointing=False, micro_batch=4)
    plain, fused = plan(**common), plan(**common, kernels=True)
    saved = plain.estimated_gpu_memory_gib - fused.estimated_gpu_memory_gib
    logits_gib = 4 * 2048 * (128_256 - 4096) * 4 / 2**30
    mlp_gib = 12 * 4 * 2048 * 4096 * 32 / 2**30  # 34 -> 22 per layer and token
    assert saved == pytest.approx(logits_gib + mlp_gib, abs=0.2)


def test_kernels_do_not_claim_lora_savings_for_a_full_fine_tune():
    args = (LLAMA_8B, LLAMA_8B.total_params, "full", "bf16", "fsdp", 8, 1, 2048, False, False)
    logits_gib = 1 * 2048 * (128_256 - 4096) * 4 / 2**30
    assert estimate_gib(*args) - estimate_gib(*args, kernels=True) == pytest.approx(logits_gib)


def test_a_spec_with_kernels_none_is_planned_with_the_plain_memory():
    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune.planning import plan_for_spec

    spec = {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
        "dataset": {"uri": "s3://data/train.jsonl", "format": "chat", "maxSeqLength": 2048},
        "method": {"type": "lora"},
        "hyperparameters": {"microBatchSize": 4, "globalBatchSize": 16, "gradientCheckpointing": False},
        "output": {"uri": "s3://out/run"},
    }
    auto = plan_for_spec(FineTuneJobSpec.model_validate(spec), LLAMA_8B, LORA_8B, 80.0)
    spec["hyperparameters"]["kernels"] = "none"
    none = plan_for_spec(FineTuneJobSpec.model_validate(spec), LLAMA_8B, LORA_8B, 80.0)
    assert auto.estimated_gpu_memory_gib < none.estimated_gpu_memory_gib - 3
