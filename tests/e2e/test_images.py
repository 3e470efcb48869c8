"""kubetune's images, run as real containers: the operator's CLI, and the trainer image training the
tiny model from a FineTuneJob manifest and serving the result through a published port, with the
served answer checked against PEFT's offline one. The rendered pods themselves run on a real
cluster in test_kind.py (kubelet, claims, Services, the operator in-cluster)."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from .conftest import OPERATOR_IMAGE, REPO, TRAINER_IMAGE, VERSION, docker

pytestmark = pytest.mark.e2e

DATA = REPO / "examples" / "data" / "support-chat.jsonl"
STEPS = 20


def test_operator_image_runs_the_cli_as_non_root():
    assert docker("run", "--rm", OPERATOR_IMAGE, "kubetune", "--version").stdout.strip() == f"kubetune {VERSION}"
    # The chart passes only args (`operator ...`): the entrypoint puts `kubetune` in front.
    assert docker("run", "--rm", OPERATOR_IMAGE, "--version").stdout.strip() == f"kubetune {VERSION}"

    crds = list(yaml.safe_load_all(docker("run", "--rm", OPERATOR_IMAGE, "kubetune", "crds").stdout))
    assert {c["metadata"]["name"] for c in crds if c} >= {"finetunejobs.kubetune.io", "adapterdeployments.kubetune.io"}
    assert all(c["kind"] == "CustomResourceDefinition" for c in crds if c)

    ids = docker("run", "--rm", "--entrypoint", "id", OPERATOR_IMAGE).stdout
    assert "uid=1000(kubetune)" in ids and "gid=1000(kubetune)" in ids, ids
    config = json.loads(docker("image", "inspect", OPERATOR_IMAGE).stdout)[0]["Config"]
    assert config["User"] == "1000:1000"

    # Small: no torch, no compilers.
    probe = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        OPERATOR_IMAGE,
        "-c",
        "python3 -c 'import kopf, kubernetes, kubetune_operator'; "
        "python3 -c 'import torch' 2>/dev/null && echo HAS-TORCH; command -v gcc cc || true",
    ).stdout
    assert "HAS-TORCH" not in probe and "gcc" not in probe, probe


@pytest.fixture(scope="module")
def trained(shared_dir, tiny_model):
    """`kubetune train -f /work/job.yaml` in the trainer image: the tiny model and the dataset
    mounted read-only, the output folder read-write; returns the host's output folder."""
    work = shared_dir / "work"
    out = shared_dir / "out"
    work.mkdir()
    out.mkdir()
    out.chmod(0o777)  # written by the image's user (uid 1000)
    shutil.copy(DATA, work / "data.jsonl")
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "e2e-tiny"},
        "spec": {
            "model": {"uri": "file:///models/tiny"},
            "dataset": {
                "uri": "file:///work/data.jsonl",
                "format": "chat",
                "validation": {"fraction": 0.1},
                "maxSeqLength": 96,
            },
            "method": {
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj", "lm_head"]},
            },
            "hyperparameters": {
                "maxSteps": STEPS,
                "learningRate": "1e-2",
                "warmupRatio": 0.0,
                "globalBatchSize": 8,
                "microBatchSize": 4,
                "precision": "fp32",
                "gradientCheckpointing": False,
            },
            "resources": {"gpusPerNode": 0},
            "checkpointing": {"everySteps": 10, "keep": 1},
            "evaluation": {"everySteps": 10},
            "output": {"uri": "file:///out"},
        },
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    for path in (work, *work.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)

    start = time.monotonic()
    run = docker(
        "run",
        "--rm",
        "--name",
        f"kubetune-e2e-train-{uuid.uuid4().hex[:8]}",
        "-e",
        "HF_HUB_OFFLINE=1",
        "-v",
        f"{tiny_model}:/models/tiny:ro",
        "-v",
        f"{work}:/work:ro",
        "-v",
        f"{out}:/out",
        TRAINER_IMAGE,
        "kubetune",
        "train",
        "-f",
        "/work/job.yaml",
        timeout=600,
    )
    print(f"\ne2e: kubetune train in {TRAINER_IMAGE} took {time.monotonic() - start:.1f} s")
    return {"out": out, "stdout": run.stdout, "model": tiny_model}


def test_trainer_image_trains_the_tiny_model(trained):
    out = trained["out"]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0, sorted(p.name for p in out.iterdir())
    assert (adapter / "adapter_config.json").is_file()
    steps = [
        json.loads(line)
        for line in trained["stdout"].splitlines()
        if line.startswith("{") and '"step"' in line and '"loss"' in line
    ]
    assert steps and max(s["step"] for s in steps) == STEPS, trained["stdout"][-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report, "report.json is empty"
    # Written by the image's non-root user.
    assert adapter.stat().st_uid == 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def test_trainer_image_serves_the_base_model_and_the_adapter(trained):
    port = _free_port()
    name = f"kubetune-e2e-serve-{uuid.uuid4().hex[:8]}"
    docker(
        "run",
        "-d",
        "--name",
        name,
        "-e",
        "HF_HUB_OFFLINE=1",
        "-p",
        f"127.0.0.1:{port}:8000",
        "-v",
        f"{trained['model']}:/models/tiny:ro",
        "-v",
        f"{trained['out']}:/out:ro",
        TRAINER_IMAGE,
        "kubetune",
        "serve",
        "--model",
        "file:///models/tiny",
        "--served-model-name",
        "tiny",
        "--adapter",
        "a=file:///out/adapter",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            state = docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = docker("logs", "--tail", "40", name, check=False)
                pytest.fail(f"the server in {name} is {state}, not ready on {base}/ready:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)

        for model in ("tiny", "a"):
            status, reply = _post(
                f"{base}/v1/chat/completions",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "How long are backups kept?"}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert status == 200, (model, reply)
            assert reply["model"] == model and reply["choices"][0]["message"]["role"] == "assistant"
            assert reply["usage"]["completion_tokens"] > 0
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny", "a"]
    finally:
        docker("rm", "-f", name, check=False)
