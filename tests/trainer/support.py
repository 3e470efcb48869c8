"""Helpers the trainer tier's tests share (fixtures are in conftest.py): configurations for the
tiny model, files and folders, and a client's view of `kubetune serve`. Nothing here imports torch
at module level, so the tier's own skip (no [trainer] extra) still reports NOT RUN."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from kubetune.contract import RuntimeSettings, TrainerConfig
from tests.examples import REPO

DATA = REPO / "examples" / "data" / "support-chat.jsonl"


PROMPT = "How do I reset my password?"
MAX_TOKENS = 16


METHODS = {
    "lora": {"type": "lora"},
    "dora": {"type": "dora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
    "qlora": {"type": "qlora", "quantization": {"computeDtype": "float32"}},
    "ia3": {"type": "ia3"},
    "adalora": {"type": "adalora", "adalora": {"initR": 6, "targetR": 4, "tinit": 1, "tfinal": 1, "deltaT": 1}},
    "promptTuning": {
        "type": "promptTuning",
        "virtualTokens": {"numVirtualTokens": 4, "initText": "Answer as Acme support:"},
    },
    "prefixTuning": {"type": "prefixTuning", "virtualTokens": {"numVirtualTokens": 4}},
    "full": {"type": "full"},
}


def make_config(tiny_model, out, *, steps=30, method=None, every_save=10, metrics_port=0, evaluate=False, **hyper):
    """A local job on the tiny model. The comparison with the base after training (on by default for
    a FineTuneJob) is off unless `evaluate`: tests/trainer/test_evaluation.py measures it; the other
    tests train dozens of times and need only the validation loss."""
    spec = {
        "model": {"uri": f"file://{tiny_model}"},
        "dataset": {"uri": f"file://{DATA}", "format": "chat", "validation": {"fraction": 0.1}, "maxSeqLength": 96},
        "method": method or {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {
            "maxSteps": steps,
            "learningRate": "1e-2",
            "warmupRatio": 0.0,
            "globalBatchSize": 8,
            "microBatchSize": 4,
            "precision": "fp32",
            "gradientCheckpointing": False,
            **hyper,
        },
        "resources": {"gpusPerNode": 0},
        "checkpointing": {"everySteps": every_save, "keep": 2},
        "evaluation": {"everySteps": 10, "enabled": evaluate},
        "output": {"uri": f"file://{out}/output"},
    }
    runtime = RuntimeSettings(
        local=True,
        cache_dir=str(out / "cache"),
        metrics_port=metrics_port,
        termination_message_path=str(out / "termination-log"),
    )
    return TrainerConfig.model_validate({"spec": spec, "runtime": runtime.to_wire()})


def write_config(config: TrainerConfig, path):
    path.write_text(json.dumps(config.to_wire()))
    return path


def adapter_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "output" / "adapter" / "adapter_model.safetensors"))


# --- files and folders ----------------------------------------------------------------------


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return path


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


# --- `kubetune serve` from the outside -------------------------------------------------------


def other_base_adapter(path, safe_serialization=True):
    """A LoRA adapter (PEFT's random init) of a model half the tiny model's width."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(model, port, *args):
    return [
        sys.executable,
        "-m",
        "kubetune",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


def subprocess_env():
    return dict(os.environ)


API_KEY = "kubetune-test-api-key"  # the shared `server` fixture's api key
STARTUP_TIMEOUT_S = 300  # torch's import and the model's load, on a machine other test runs share


def wait_until_ready(client, process, log, timeout=STARTUP_TIMEOUT_S):
    """Until /ready answers 200; the server's log in the failure when it exits or never gets there."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never ready:\n{log.read_text()[-3000:]}"
        try:
            if client.get("/ready", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)


def stop(process):
    """SIGTERM, then SIGKILL if the server has not gone within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def chat(client, model, content=PROMPT, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def chat_text(client, model):
    response = chat(client, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def model_ids(client):
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return [card["id"] for card in response.json()["data"]]


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] and error["message"]
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


def load(client, name, path):
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(client, name):
    return client.post("/v1/unload_lora_adapter", json={"lora_name": name})
