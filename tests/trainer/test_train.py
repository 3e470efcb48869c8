"""Real training on CPU of the tiny model: learning, reloading, resuming, reporting, every method."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_trainer import train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.trainer.support import METHODS, adapter_weights, make_config, write_config  # noqa: E402


def test_lora_learns_and_the_saved_adapter_reproduces_the_model(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tiny_model, tmp_path, steps=40)
    run = train.setup(config, DistEnv(0, 1, 0))
    before = train.evaluate(run)
    train.fit(run)
    evals = [entry["eval_loss"] for entry in run.state.history if entry.get("eval_loss") is not None]
    assert evals == sorted(evals, reverse=True), f"eval loss should fall at every evaluation: {evals}"
    assert evals[-1] < before * 0.7, (before, evals)
    train.save_outputs(run)

    batch = {"input_ids": torch.tensor([run.train_set[0].input_ids])}
    run.model.eval()
    expected = run.model(**batch).logits
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "output" / "adapter"
    )
    assert torch.allclose(reloaded.eval()(**batch).logits, expected, atol=1e-5)


def test_result_report_and_termination_message(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, steps=12)
    assert train.run_training(config) == 0
    message = (tmp_path / "termination-log").read_text()
    assert len(message.encode()) < 4096
    result = json.loads(message)
    assert result["phase"] == "Succeeded" and result["steps"] == 12
    assert result["adapter"]["uri"].endswith("/output/adapter")
    assert len(result["adapter"]["sha256"]) == 64 and result["adapter"]["sizeBytes"] > 0
    assert 0 < result["trainableParams"] < result["totalParams"]
    report = json.loads((tmp_path / "output" / "report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == list(range(1, 13))
    assert report["data"]["fingerprint"] == result["data"]["fingerprint"]
    checkpoints = sorted(p.name for p in (tmp_path / "output" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints == ["step-00000010"]


def test_sigterm_checkpoints_and_the_rerun_ends_where_an_unbroken_run_ends(tiny_model, tmp_path):
    unbroken = tmp_path / "unbroken"
    assert train.run_training(make_config(tiny_model, unbroken, steps=30)) == 0

    broken = tmp_path / "broken"
    path = write_config(make_config(tiny_model, broken, steps=30, every_save=1000), tmp_path / "broken.json")
    command = [sys.executable, "-m", "kubetune", "train", "-f", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # wait until training is under way, then preempt
        if '"event": "step"' in line and json.loads(line)["step"] == 12:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == train.EXIT_PREEMPTED
    saved = sorted(p.name for p in (broken / "output" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(saved) == 1 and 12 <= int(saved[0].split("-")[1]) < 30

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"event": "resumed"' in resumed.stdout
    expected, got = adapter_weights(unbroken), adapter_weights(broken)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5), name


def test_two_processes_match_one(tiny_model, tmp_path):
    single = tmp_path / "single"
    assert train.run_training(make_config(tiny_model, single, steps=8)) == 0
    double = tmp_path / "double"
    path = write_config(make_config(tiny_model, double, steps=8), tmp_path / "ddp.json")
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "train", "-f", str(path), "--nproc-per-node", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"summary": "world size 2, strategy ddp' in result.stdout
    for name, tensor in adapter_weights(single).items():
        assert torch.allclose(tensor, adapter_weights(double)[name], atol=1e-4), name


def test_metrics_endpoint_is_scrapable_while_training(tiny_model, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write_config(
        make_config(tiny_model, tmp_path, steps=400, every_save=1000, metrics_port=port), tmp_path / "m.json"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "train", "-f", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = ""
        deadline = time.monotonic() + 120
        while "kubetune_train_step" not in text or "kubetune_train_step 0.0" in text:
            assert time.monotonic() < deadline, "metrics never appeared"
            time.sleep(0.5)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
        samples = {
            line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("kubetune_train_")
        }
        assert samples["kubetune_train_total_steps"] == 400
        assert samples["kubetune_train_step"] >= 1 and samples["kubetune_train_loss"] > 0
        assert samples["kubetune_train_tokens_per_second"] > 0
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_saves(name, tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, steps=6, method=METHODS[name], every_save=1000, learningRate="1e-3")
    assert train.run_training(config) == 0
    result = json.loads((tmp_path / "termination-log").read_text())
    history = json.loads((tmp_path / "output" / "report.json").read_text())["history"]
    assert all(entry["loss"] == entry["loss"] for entry in history), "NaN loss"
    adapter = tmp_path / "output" / "adapter"
    if name == "full":
        assert (adapter / "model.safetensors").exists() and result["trainableParams"] == result["totalParams"]
    else:
        assert (adapter / "adapter_config.json").exists() and result["trainableParams"] < result["totalParams"]


def test_merged_weights_equal_base_plus_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tiny_model, tmp_path, steps=5, every_save=1000)
    config.spec.output.merge_weights = True
    assert train.run_training(config) == 0
    result = json.loads((tmp_path / "termination-log").read_text())
    assert result["adapter"]["mergedUri"].endswith("/output/merged")
    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3]])}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "output" / "merged").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "output" / "adapter"
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapted(**batch).logits, atol=1e-4)


def test_a_qlora_adapter_is_merged_into_the_original_weights_not_the_4_bit_ones(tiny_model, tmp_path):
    """Merging into NF4 weights would quantize the adapter again: the merged model must be the
    unquantized base plus the adapter, in the compute dtype, with no quantization config."""
    from transformers import AutoModelForCausalLM

    method = {
        "type": "qlora",
        "quantization": {"computeDtype": "bfloat16"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    config = make_config(tiny_model, tmp_path, steps=5, every_save=1000, method=method)
    config.spec.output.merge_weights = True
    assert train.run_training(config) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "output" / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = adapter_weights(tmp_path)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (lora[f"{prefix}.lora_B.weight"].float() @ lora[f"{prefix}.lora_A.weight"].float()) * (16 / 8)
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16
    expected = base.model.layers[0].self_attn.q_proj.weight.float() + delta
    assert delta.abs().max() > 1e-3  # the adapter changed the layer ...
    assert (weight.float() - expected).abs().max() < 2e-3  # ... and is folded into the original weights


def test_qlora_gradient_checkpointing_is_non_reentrant(tiny_model, tmp_path):
    import warnings

    method = {"type": "qlora", "quantization": {"computeDtype": "float32"}}
    config = make_config(tiny_model, tmp_path, steps=2, every_save=1000, method=method, gradientCheckpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.run_training(config) == 0
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
