"""kubetune's images, run as real containers: the operator's CLI, and the trainer image training the
tiny model from a FineTuneJob manifest and serving the result through a published port."""

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


def _docker_flags_for(container: dict, volumes: dict[str, list[str]]) -> list[str]:
    """`docker run` flags that give the image what the rendered pod gives it: the user, a read-only
    root, the env, and each volume mount (`volumes`: volume name → flags for it at a mount path)."""
    security = container["securityContext"]
    flags = [
        "--user",
        f"{security['runAsUser']}:{security['runAsUser']}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    if security.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    for variable in container["env"]:
        flags += ["-e", f"{variable['name']}={variable['value']}"]
    for mount in container["volumeMounts"]:
        flags += [flag.replace("@PATH@", mount["mountPath"]) for flag in volumes[mount["name"]]]
    return flags


def test_the_rendered_serving_pod_runs_in_the_trainer_image(trained, shared_dir):
    """The Deployment the operator renders for an AdapterDeployment, run as Docker runs a pod: its
    command, env, user, read-only root, scratch volumes and the adapters ConfigMap as a mounted file.
    The replica must come up ready with the ConfigMap's adapter and answer through it."""
    from kubetune.api.adapterdeployment import AdapterDeployment
    from kubetune_operator.adapterdeployment.render import render_adapterdeployment
    from kubetune_operator.config import OperatorConfig

    ad = AdapterDeployment.model_validate(
        {
            "metadata": {"name": "e2e", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "baseModel": {"uri": "pvc://models/tiny"},
                "resources": {"gpusPerReplica": 0},
                "adapters": [{"name": "support", "uri": "pvc://outputs/adapter"}],
            },
        }
    )
    objects = render_adapterdeployment(ad, OperatorConfig())
    container = objects.deployment["spec"]["template"]["spec"]["containers"][0]
    config = shared_dir / "adapters-configmap"
    config.mkdir(mode=0o755)
    for key, text in objects.adapters["data"].items():
        (config / key).write_text(text)
        (config / key).chmod(0o644)
    volumes = {
        "scratch": ["--tmpfs", "@PATH@:rw,exec,uid=1000,gid=1000,mode=0755"],
        "dshm": [],  # Docker gives every container its own /dev/shm
        "adapters": ["-v", f"{config}:@PATH@:ro"],
        "pvc-models": ["-v", f"{trained['model']}:@PATH@/tiny:ro"],
        "pvc-outputs": ["-v", f"{trained['out']}:@PATH@:ro"],
    }
    port = _free_port()
    name = f"kubetune-e2e-pod-{uuid.uuid4().hex[:8]}"
    container_port = container["ports"][0]["containerPort"]
    docker(
        "run",
        "-d",
        "--name",
        name,
        *_docker_flags_for(container, volumes),
        "-p",
        f"127.0.0.1:{port}:{container_port}",
        "--entrypoint",
        container["command"][0],
        TRAINER_IMAGE,
        *container["command"][1:],
    )
    try:
        base = f"http://127.0.0.1:{port}"
        ready = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}{ready}", timeout=5) as response:
                    health = json.loads(response.read())
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            state = docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = docker("logs", "--tail", "40", name, check=False)
                pytest.fail(
                    f"the pod's server in {name} is {state}, not ready on {base}{ready}:\n{logs.stdout}{logs.stderr}"
                )
            time.sleep(0.5)
        assert health["adapters"] == ["support"]  # from the mounted ConfigMap, before it said ready
        status, reply = _post(
            f"{base}/v1/chat/completions",
            {
                "model": "support",
                "messages": [{"role": "user", "content": "How long are backups kept?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
        )
        assert status == 200 and reply["model"] == "support", reply
    finally:
        docker("rm", "-f", name, check=False)


def test_the_rendered_training_pod_trains_in_the_trainer_image(tiny_model, shared_dir):
    """The Indexed Job's pod the operator renders for a FineTuneJob, run as Docker runs a pod: the
    trainer config from its ConfigMap as a mounted file, claims as bind mounts, the pod's user and
    read-only root. It must train, publish the adapter on the output claim and leave the result in
    the termination message, which is what the operator reads."""
    from kubetune.api.finetunejob import FineTuneJob
    from kubetune_operator.config import OperatorConfig
    from kubetune_operator.finetunejob.render import render_finetunejob

    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "e2e", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "model": {"uri": "pvc://models/tiny"},
                "dataset": {"uri": "pvc://datasets/chat.jsonl", "format": "chat", "maxSeqLength": 96},
                "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                "hyperparameters": {
                    "maxSteps": 6,
                    "learningRate": "1e-2",
                    "globalBatchSize": 8,
                    "microBatchSize": 4,
                    "precision": "fp32",
                    "gradientCheckpointing": False,
                },
                "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
                "checkpointing": {"everySteps": 3, "keep": 1},
                "output": {"uri": "pvc://outputs/e2e-run"},
            },
        }
    )
    objects = render_finetunejob(job, OperatorConfig())
    pod = objects.job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    root = shared_dir / "training-pod"
    config, datasets, outputs = root / "config", root / "datasets", root / "outputs"
    for folder in (root, config, datasets, outputs):
        folder.mkdir(mode=0o755)
    outputs.chmod(0o777)  # in a cluster the pod's fsGroup makes the claim writable
    for key, text in objects.config_map["data"].items():
        (config / key).write_text(text)
        (config / key).chmod(0o644)
    shutil.copy(DATA, datasets / "chat.jsonl")
    (datasets / "chat.jsonl").chmod(0o644)
    termination = root / "termination-log"
    termination.touch(mode=0o666)
    termination.chmod(0o666)
    volumes = {
        "config": ["-v", f"{config}:@PATH@:ro"],
        "scratch": ["--tmpfs", "@PATH@:rw,exec,uid=1000,gid=1000,mode=0755"],
        "dshm": [],
        "pvc-datasets": ["-v", f"{datasets}:@PATH@:ro"],
        "pvc-models": ["-v", f"{tiny_model}:@PATH@/tiny:ro"],
        "pvc-outputs": ["-v", f"{outputs}:@PATH@"],
    }
    message_path = container.get("terminationMessagePath", "/dev/termination-log")
    run = docker(
        "run",
        "--rm",
        "--name",
        f"kubetune-e2e-job-{uuid.uuid4().hex[:8]}",
        *_docker_flags_for(container, volumes),
        "-v",
        f"{termination}:{message_path}",
        "--entrypoint",
        container["command"][0],
        TRAINER_IMAGE,
        *container["command"][1:],
        timeout=600,
    )
    adapter = outputs / "e2e-run" / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0, run.stdout[-2000:]
    assert (adapter / "_COMPLETE").is_file()  # published atomically
    result = json.loads(termination.read_text())
    assert result["phase"] == "Succeeded" and result["adapter"]["uri"] == "pvc://outputs/e2e-run/adapter", result
