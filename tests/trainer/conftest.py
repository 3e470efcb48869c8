"""Fixtures of the trainer tier: the tiny model, trained adapters, a running `kubetune serve`, a
local S3 server and isolated environments. Shared helpers (no fixtures) are in support.py."""

import json
import shutil
import subprocess
import uuid

import pytest

from tests.trainer.support import (
    API_KEY,
    MAX_TOKENS,
    PROMPT,
    free_port,
    make_config,
    other_base_adapter,
    serve_command,
    stop,
    subprocess_env,
    wait_until_ready,
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from kubetune_trainer.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No proxy may route 127.0.0.1 elsewhere, and no real AWS/HF configuration may leak in."""
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "HF_TOKEN",
        "HF_HUB_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def pvc_root(tmp_path, monkeypatch):
    root = tmp_path / "pvc"
    (root / "data").mkdir(parents=True)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket on the local server, and a client for the test to look behind the API."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"kubetune-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    return client, bucket


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model; adapters alpha and beta trained from different seeds; adapters to refuse."""
    from kubetune_trainer import train
    from kubetune_trainer.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("serving")
    tiny = build_tiny_model(root / "tiny")
    adapters = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        assert train.run_training(make_config(tiny, root / name, steps=4, every_save=1000, seed=seed)) == 0
        adapters[name] = root / name / "output" / "adapter"
    wide = root / "wide"  # alpha's weights under a config that says rank 128: refused on the config alone
    shutil.copytree(adapters["alpha"], wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    adapters["wide"] = wide
    adapters["other"] = other_base_adapter(root / "other")
    adapters["other-bin"] = other_base_adapter(root / "other-bin", safe_serialization=False)
    return tiny, adapters


@pytest.fixture(scope="module")
def offline(files):
    """What `kubetune generate` answers, greedily, with the base and with each adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.generate import answer

    tiny, adapters = files
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    answers = {"tiny": answer(AutoModelForCausalLM.from_pretrained(tiny).eval(), tokenizer, PROMPT, MAX_TOKENS)}
    for name in ("alpha", "beta"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapters[name]).eval()
        answers[name] = answer(model, tokenizer, PROMPT, MAX_TOKENS)
    assert len(set(answers.values())) == 3, f"the base and the two adapters should answer differently: {answers}"
    return answers, tokenizer


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """`kubetune serve` in a subprocess on a free port, with adapter alpha from the command line, an
    api key (sent by this client on every request) and runtime loads allowed from the adapters' folder."""
    import httpx

    tiny, adapters = files
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "serve.log"
    command = serve_command(
        tiny,
        port,
        "--served-model-name",
        "tiny",
        "--adapter",
        f"alpha=file://{adapters['alpha']}",
        "--max-adapters",
        "2",
        "--max-lora-rank",
        "64",
        "--cache-dir",
        str(log.parent / "cache"),
        "--api-key",
        API_KEY,
        "--allow-source",
        f"file://{tiny.parent}/",
    )
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:
        wait_until_ready(client, process, log)
        yield client
    finally:
        client.close()
        stop(process)
