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
