"""The adapters file of `kubetune serve` (an AdapterDeployment's ConfigMap): loaded before the
replica reports ready, followed when it changes, and never fighting the operator's HTTP loads."""

import os
import re
import subprocess
import time

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
httpx = pytest.importorskip("httpx", reason="NOT RUN: serving tests need httpx (the [dev] extra)")
pytest.importorskip("fastapi", reason="NOT RUN: serving tests need the [serve] extra")

from kubetune.api.adaptersfile import parse_adapters_file, render_adapters_file  # noqa: E402
from kubetune_serve.adapters_file import AdaptersFileSync  # noqa: E402
from kubetune_serve.engine import Engine  # noqa: E402
from kubetune_serve.metrics import ServingMetrics  # noqa: E402
from tests.trainer.support import (  # noqa: E402
    free_port,
    load,
    model_ids,
    serve_command,
    stop,
    subprocess_env,
    wait_until_ready,
)


def write(path, adapters):
    """As the kubelet updates a mounted ConfigMap: the new content appears at once, whole."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(render_adapters_file(adapters))
    os.replace(temporary, path)


def eventually(check, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_the_file_format_is_checked():
    assert parse_adapters_file("") == {}
    text = render_adapters_file([("a", "pvc://c/a"), ("b", "s3://bucket/b")])
    assert parse_adapters_file(text) == {"a": "pvc://c/a", "b": "s3://bucket/b"}
    for bad, words in [
        ("{", "not JSON"),
        ('{"adapters": {}}', "expected"),
        ('{"adapters": [{"name": "a"}]}', "adapters[0]: needs a non-empty name and path"),
        ('{"adapters": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}', "listed twice"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_adapters_file(bad)


@pytest.fixture
def engine(files, tmp_path):
    tiny, _ = files
    engine = Engine(str(tiny), "tiny", cache_dir=tmp_path / "cache", max_adapters=3, max_lora_rank=64)
    engine.load_base()
    return engine


def loaded(engine):
    return {a.name: a.uri for a in engine.adapters()}


def test_only_changes_of_the_file_are_applied(files, engine, tmp_path):
    _, adapters = files
    alpha, beta, wide = (f"file://{adapters[n]}" for n in ("alpha", "beta", "wide"))
    path = tmp_path / "adapters.json"
    sync = AdaptersFileSync(engine, path, ServingMetrics(), interval=0.1)

    assert sync.sync_once() is False and loaded(engine) == {}  # no file yet: nothing to serve, not an error
    write(path, [("alpha", alpha), ("wide", wide)])
    assert sync.sync_once() is True
    assert loaded(engine) == {"alpha": alpha}
    assert sync.failed == {"wide": "adapter rank 128 exceeds maxLoraRank 64"}  # refused alone
    assert sync.sync_once() is False  # unchanged: the refused one is not tried again

    engine.unload_adapter("alpha")  # the operator unloads through the API; the file catches up later
    engine.load_adapter("beta", beta)  # ... and loads another the file does not list yet
    write(path, [("wide", wide), ("gamma", beta)])
    assert sync.sync_once() is True
    assert loaded(engine) == {"beta": beta, "gamma": beta}  # alpha not loaded again, beta left alone
    assert sync.failed == {"wide": "adapter rank 128 exceeds maxLoraRank 64"}

    write(path, [("gamma", alpha)])  # moved to another path: replaced in place
    assert sync.sync_once() is True
    assert loaded(engine) == {"beta": beta, "gamma": alpha} and sync.failed == {}

    path.write_text("{broken")
    assert sync.sync_once() is False
    assert "not JSON" in sync.error and loaded(engine) == {"beta": beta, "gamma": alpha}  # the last good set stays
    write(path, [])
    assert sync.sync_once() is True
    assert loaded(engine) == {"beta": beta} and sync.error is None

    write(path, [("plain", str(adapters["alpha"])), ("up", "pvc://data/../etc")])  # trusted, but URIs all the same
    assert sync.sync_once() is True
    assert loaded(engine) == {"beta": beta} and sorted(sync.failed) == ["plain", "up"]


def test_a_replica_is_ready_only_with_the_files_adapters_and_follows_the_file(files, tmp_path):
    tiny, adapters = files
    path = tmp_path / "config" / "adapters.json"
    path.parent.mkdir()
    alpha, beta, wide = (f"file://{adapters[n]}" for n in ("alpha", "beta", "wide"))
    write(path, [("alpha", alpha), ("wide", wide)])
    port, log = free_port(), tmp_path / "serve.log"
    command = serve_command(
        tiny,
        port,
        "--served-model-name",
        "tiny",
        "--adapters-file",
        str(path),
        "--adapters-file-interval",
        "0.2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--allow-unauthenticated-admin",  # a laptop's server: no key, loads from the adapters' folder
        "--allow-source",
        f"file://{tiny.parent}",
    )
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_until_ready(client, process, log)
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["adapters"] == ["alpha"]  # loaded before the replica said it was ready
        assert health.json()["adaptersFile"]["failed"] == {"wide": "adapter rank 128 exceeds maxLoraRank 64"}
        assert client.get("/live").status_code == 200

        write(path, [("beta", beta)])  # the operator changed spec.adapters
        eventually(lambda: model_ids(client) == ["tiny", "beta"], "alpha unloaded and beta loaded from the file")
        assert "adaptersFile" not in client.get("/health").json()

        assert load(client, "alpha", alpha).status_code == 200  # a load through the API stays
        write(path, [("beta", beta), ("gamma", alpha)])
        eventually(lambda: "gamma" in model_ids(client), "gamma loaded from the file")
        assert model_ids(client) == ["tiny", "beta", "alpha", "gamma"]
        metrics = client.get("/metrics").text
        assert 'kubetune_serve_adapter_load_failures_total{reason="invalid"} 1.0' in metrics
        assert "wide" not in metrics  # counted by reason, never by the name a client chose
        assert "kubetune_serve_loaded_adapters 3.0" in metrics
    finally:
        client.close()
        stop(process)
