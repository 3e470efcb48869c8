"""Distributed strategies on CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu): FSDP2 and DeepSpeed ZeRO-2/3
train the same model as one process does, resume exactly from their sharded checkpoints, and save
ordinary PEFT / transformers folders.

Tolerances: everything runs in fp32 and the strategies compute the same sums in another order
(reduce-scatter instead of all-reduce, ZeRO's flat buckets, a norm assembled from shards), which
moves results by ~1e-7 per step; over 8 AdamW steps at lr 1e-2 the adapters differ by < 1e-6
(full fine-tune: < 3e-5), so atol 1e-4 leaves a wide margin while any real difference in the data
order, the token weighting or the update (a skipped micro-batch, a rank's tokens weighted
differently) moves weights by ~1e-2. AdamW barely sees a gradient multiplied by a constant, so the
gradient normalization is checked directly: the logged pre-clipping gradient norms must agree to
rtol 1e-4 (a missed 1/world size or 1/accumulation would show as a factor of 2).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.contract import TrainerConfig  # noqa: E402
from kubetune_trainer import strategies, train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.trainer.support import adapter_weights, make_config, write_config  # noqa: E402

STEPS = 8
# r 16: ZeRO-3 keeps tensors under 10 x hidden (640) elements whole on every rank; 16 x 64 is above,
# so the adapter itself is partitioned and has to be gathered to be saved.
LORA = {"type": "lora", "lora": {"r": 16, "alpha": 16, "dropout": 0.0}}  # no dropout: ranks draw other masks
FULL = {"type": "full"}


def config_for(tiny_model, out, strategy="auto", offload="none", method=LORA, steps=STEPS, **hyper) -> TrainerConfig:
    wire = make_config(tiny_model, out, steps=steps, method=method, every_save=1000, **hyper).to_wire()
    wire["spec"]["distributed"] = {"strategy": strategy, "offload": offload}
    return TrainerConfig.model_validate(wire)


# A bound on one training subprocess, not a speed target: DeepSpeed builds its CPU ops on first use,
# which takes minutes on two busy cores.
RUN_TIMEOUT_S = 600


def train_two_processes(config: TrainerConfig, path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "kubetune",
        "train",
        "-f",
        str(write_config(config, path)),
        "--nproc-per-node",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def events(stdout: str, kind: str) -> list[dict]:
    return [e for e in (json.loads(line) for line in stdout.splitlines() if line.startswith("{")) if e["event"] == kind]


def grad_norms(out) -> list[float]:
    return [entry["grad_norm"] for entry in json.loads((out / "output" / "report.json").read_text())["history"]]


def assert_same_training(expected_out, got_out, weights=adapter_weights, atol=1e-4):
    expected, got = weights(expected_out), weights(got_out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        assert torch.allclose(expected[name], got[name], atol=atol), (name, (expected[name] - got[name]).abs().max())
    assert grad_norms(got_out) == pytest.approx(grad_norms(expected_out), rel=1e-4)


def full_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "output" / "adapter" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    """One process, default strategy (auto: ddp, i.e. plain training): the reference."""
    out = tmp_path_factory.mktemp("single")
    assert train.run_training(config_for(tiny_model, out)) == 0
    return out


@pytest.fixture(scope="module")
def fsdp(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = train_two_processes(config_for(tiny_model, out, "fsdp"), out / "config.json")
    return out, result.stdout


def test_fsdp_two_processes_match_one_and_save_an_ordinary_adapter(single, fsdp, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, stdout = fsdp
    assert events(stdout, "plan")[0]["summary"].startswith(
        "world size 2, strategy fsdp, micro-batch 4 x accumulation 1"
    )
    assert json.loads((out / "termination-log").read_text())["plan"]["strategy"] == "fsdp"
    assert_same_training(single, out)

    batch = {"input_ids": torch.tensor([[1, 5, 9, 200, 31, 7]])}
    logits = {}
    for name, folder in (("single", single), ("fsdp", out)):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model), folder / "output" / "adapter"
        )
        logits[name] = model.eval()(**batch).logits
    assert torch.allclose(logits["single"], logits["fsdp"], atol=1e-4)


@pytest.mark.parametrize("strategy, offload", [("deepspeed-zero2", "none"), ("deepspeed-zero3", "cpu")])
def test_deepspeed_two_processes_match_one(strategy, offload, single, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_two_processes(config_for(tiny_model, tmp_path, strategy, offload), tmp_path / "config.json")
    assert events(result.stdout, "plan")[0]["summary"].startswith(f"world size 2, strategy {strategy}, ")
    assert_same_training(single, tmp_path)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "output" / "adapter")


def launch_ranks(config_path, world_size: int = 2) -> list[subprocess.Popen]:
    """The trainer processes as torchrun would start them, without torchrun in between, so one rank
    alone can be preempted (as when one node of a multi-node job is drained)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "KUBETUNE_LAUNCHED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    command = [sys.executable, "-m", "kubetune", "train", "-f", str(config_path)]
    return [
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(world_size)
    ]


def test_fsdp_sigterm_checkpoints_shards_and_the_rerun_ends_where_an_unbroken_run_ends(fsdp, tiny_model, tmp_path):
    unbroken, _ = fsdp
    broken = tmp_path / "broken"
    path = write_config(config_for(tiny_model, broken, "fsdp"), tmp_path / "broken.json")
    ranks = launch_ranks(path)
    try:
        for line in ranks[0].stdout:  # preempt rank 1 only, once training is under way
            if '"event": "step"' in line and json.loads(line)["step"] == 1:
                ranks[1].send_signal(signal.SIGTERM)
        assert [rank.wait(timeout=120) for rank in ranks] == [train.EXIT_PREEMPTED] * 2  # both stop at the same step
    finally:
        for rank in ranks:
            rank.kill()
    saved = sorted(p for p in (broken / "output" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(saved) == 1 and 1 <= int(saved[0].name.split("-")[1]) < STEPS
    assert sorted(p.name for p in (saved[0] / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((saved[0] / "strategy.json").read_text()) == {"strategy": "fsdp", "format": "dcp", "worldSize": 2}

    resumed_copy = tmp_path / "one-process"  # DCP re-shards: the same checkpoint resumes in one process too
    shutil.copytree(broken / "output" / "checkpoints", resumed_copy / "output" / "checkpoints")
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune",
            "train",
            "-f",
            str(write_config(config_for(tiny_model, resumed_copy, "fsdp"), tmp_path / "one.json")),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    resumed = train_two_processes(config_for(tiny_model, broken, "fsdp"), path)
    assert events(resumed.stdout, "resumed")[0]["step"] == int(saved[0].name.split("-")[1])
    expected, got = adapter_weights(unbroken), adapter_weights(broken)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name

    assert events(one.stdout, "plan")[0]["summary"].startswith("world size 1, strategy fsdp")
    assert events(one.stdout, "resumed")
    assert_same_training(unbroken, resumed_copy)


def test_fsdp_full_fine_tune_matches_one_process(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    options = {"method": FULL, "steps": 4, "learningRate": "1e-3"}
    assert train.run_training(config_for(tiny_model, tmp_path / "single", **options)) == 0
    train_two_processes(config_for(tiny_model, tmp_path / "fsdp", "fsdp", **options), tmp_path / "fsdp.json")
    assert_same_training(tmp_path / "single", tmp_path / "fsdp", weights=full_weights)
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "output" / "adapter")


def test_fsdp_with_regional_compile_and_checkpointing_matches_one_eager_process(tiny_model, tmp_path):
    """Each decoder layer compiled in place (compile: always), sharded by FSDP2 and recomputed by
    checkpointing in backward: the same training as one eager process."""
    options = {"steps": 4, "gradientCheckpointing": True}
    assert train.run_training(config_for(tiny_model, tmp_path / "single", **options)) == 0
    config = config_for(tiny_model, tmp_path / "fsdp", "fsdp", compile="always", **options)
    result = train_two_processes(config, tmp_path / "fsdp.json")
    assert events(result.stdout, "kernels")[0]["compiledLayers"] == 2
    assert events(result.stdout, "compiled")[0]["first_step_seconds"] > 0
    assert_same_training(tmp_path / "single", tmp_path / "fsdp")


# --- choosing a strategy, refusing what cannot work --------------------------------------------


def test_auto_is_plain_training_alone_and_the_plan_with_several_processes():
    assert strategies.resolve("auto", "fsdp", "lora", world_size=1) == "ddp"
    assert strategies.resolve("auto", "deepspeed-zero3", "lora", world_size=8) == "deepspeed-zero3"
    assert strategies.resolve("auto", "fsdp", "adalora", world_size=8) == "ddp"  # the plan's pick cannot train it
    assert strategies.resolve("deepspeed-zero3", "ddp", "lora", world_size=1) == "deepspeed-zero3"
    assert strategies.resolve("deepspeed-zero2", "ddp", "qlora", world_size=2) == "deepspeed-zero2"
    for strategy, method in (("fsdp", "qlora"), ("deepspeed-zero3", "qlora"), ("fsdp", "adalora")):
        with pytest.raises(ValueError, match=f"method {method} cannot be trained with distributed.strategy {strategy}"):
            strategies.resolve(strategy, "ddp", method, world_size=2)


def test_decoder_layers_are_found_inside_the_peft_model(tiny_model):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), peft.LoraConfig(target_modules=["q_proj"])
    )
    assert [type(layer).__name__ for layer in strategies.decoder_layers(model)] == ["LlamaDecoderLayer"] * 2


def test_deepspeed_config_follows_the_spec(tiny_model, tmp_path):
    config = config_for(
        tiny_model, tmp_path, "deepspeed-zero3", "cpu", microBatchSize=2, precision="bf16", maxGradNorm=0.5
    )
    ds = strategies.build("deepspeed-zero3", config.spec, DistEnv(0, 2, 0), torch.device("cpu"))
    settings = ds.config(type("Config", (), {"hidden_size": 64})())
    assert (
        settings["train_batch_size"],
        settings["train_micro_batch_size_per_gpu"],
        settings["gradient_accumulation_steps"],
    ) == (8, 2, 2)
    assert (
        settings["gradient_clipping"] == 0.5
        and settings["bf16"] == {"enabled": True}
        and not settings["fp16"]["enabled"]
    )
    zero = settings["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    )
    zero2 = strategies.build("deepspeed-zero2", config.spec, DistEnv(0, 2, 0), torch.device("cpu")).config(None)
    assert zero2["zero_optimization"]["stage"] == 2 and "offload_param" not in zero2["zero_optimization"]


def test_a_checkpoint_resumes_only_in_its_own_format(tiny_model, tmp_path):
    config = config_for(tiny_model, tmp_path, "fsdp")
    fsdp = strategies.build("fsdp", config.spec, DistEnv(0, 2, 0), torch.device("cpu"))
    strategies.check_resumable(fsdp, {"strategy": "fsdp", "format": "dcp", "worldSize": 4}, "step-1")  # DCP re-shards
    with pytest.raises(
        ValueError, match="written by strategy ddp .replicated format. and cannot be resumed with strategy fsdp"
    ):
        strategies.check_resumable(fsdp, {"strategy": "ddp", "format": "replicated"}, "step-1")
    zero3 = strategies.build("deepspeed-zero3", config.spec, DistEnv(0, 2, 0), torch.device("cpu"))
    with pytest.raises(ValueError, match="holds 4 DeepSpeed optimizer partitions; resume it with 4 processes, not 2"):
        strategies.check_resumable(
            zero3, {"strategy": "deepspeed-zero3", "format": "deepspeed-zero3", "worldSize": 4}, "step-1"
        )
