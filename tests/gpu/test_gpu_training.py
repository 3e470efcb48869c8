"""On a CUDA GPU: bf16 LoRA and NF4 QLoRA train, and GPU memory is reported.

Reported as NOT RUN on machines without a GPU (see tests/conftest.py)."""

import json

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")

from kubetune_trainer import train  # noqa: E402
from tests.trainer.test_train import make_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from kubetune_trainer.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize(
    "method",
    [
        {"type": "lora"},
        {"type": "qlora", "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}},
    ],
    ids=["lora-bf16", "qlora-nf4"],
)
def test_trains_on_the_gpu_in_bf16(method, tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, steps=20, method=method, precision="bf16")
    config.spec.resources.gpus_per_node = 1
    assert train.run_training(config) == 0
    history = json.loads((tmp_path / "output" / "report.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.cuda.max_memory_allocated() > 0
