"""Experiment trackers (spec.tracking): a run on a real `mlflow server` started here on loopback and
read back through MLflow's own client; a W&B offline run published with the job's output and read
back from its transaction log; and the promise that a tracker never fails training and never costs
more than seconds when its server is gone, hangs or refuses what it is sent.

W&B 0.31 has no Python reader of its offline `.wandb` files any more (the DataStore is gone and
`wandb sync` has no view option), so `wandb_records` reads them here: the file is W&B's transaction
log, LevelDB's log framing (32 KiB blocks of CRC-checked chunks) after a `:W&B` header, and each
record is W&B's own protobuf `Record`, parsed with wandb's generated classes.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

mlflow = pytest.importorskip("mlflow", reason="NOT RUN: trainer tier needs the [trainer] and dev extras (make setup)")
pytest.importorskip("wandb", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune import storage  # noqa: E402
from kubetune.contract import TrainerConfig  # noqa: E402
from kubetune_trainer import tracking  # noqa: E402
from tests.trainer.support import free_port, make_config  # noqa: E402

STARTUP_TIMEOUT_S = 300  # `mlflow server` creates its database first; this machine is shared
DEAD_SERVER_BUDGET_S = 15
JOB, NAMESPACE = "support-bot", "team-a"
EVALUATION = {
    "examples": 12,
    "seconds": 3.5,
    "tokensGenerated": 640,
    "metrics": {
        "rougeL": {"base": 0.12, "tuned": 0.31, "delta": 0.19},
        "exactMatch": {"base": 0.0, "tuned": 0.25, "delta": 0.25},
        "perplexity": {"base": 20.0, "tuned": 21.0, "delta": 1.0},
    },
    "forgettingRatio": 1.05,
    "benchmarks": {"support_qa": {"acc,none": 0.75}},
    "notes": ["a note is not a metric"],
}
ENTRIES = [  # three logged steps of the training loop, as `fit` builds them
    ({"step": 1, "loss": 2.5, "grad_norm": 1.5, "lr": 0.01}, 900.0),
    ({"step": 2, "loss": 2.0, "grad_norm": None, "lr": 0.009}, 950.0),
    ({"step": 3, "loss": 1.5, "grad_norm": 0.5, "lr": 0.008, "eval_loss": 1.75}, 1000.0),
]
ADAPTER = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": os.urandom(4096),
    "tokenizer/tokenizer.json": b"{}",
}


def config_with(tmp_path, **tracking_spec) -> TrainerConfig:
    """make_config's job (the tiny model's path need not exist: nothing here loads it) with trackers."""
    wire = make_config(tmp_path / "no-model", tmp_path).to_wire()
    wire["spec"]["tracking"] = tracking_spec
    return TrainerConfig.model_validate(wire)


def adapter_folder(path: Path) -> Path:
    for name, content in ADAPTER.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return path


def run_through(trackers: tracking.Trackers, config: TrainerConfig, adapter: Path) -> None:
    """What train.py does with the trackers: params, three steps, the evaluation, the adapter, the end."""
    trackers.params(tracking.job_params(config.spec, {"worldSize": 1, "strategy": "ddp", "trainableParams": 1234}))
    for entry, tokens_per_second in ENTRIES:
        trackers.metrics(entry["step"], tracking.step_metrics(entry, tokens_per_second))
    trackers.evaluation(EVALUATION)
    trackers.artifacts(adapter)
    trackers.finish(ok=True)


def log_lines(capsys, event: str) -> list[dict]:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == event]


@pytest.fixture
def quiet_env(monkeypatch, tmp_path):
    """No proxy for 127.0.0.1, no tracker settings or credentials from this machine, W&B's own
    folders (cache, staging, config) under the test's."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # Also the variables tracking.py sets itself: set, then removed, they are undone after the test.
    for name in {
        *tracking.MLFLOW_HTTP_DEFAULTS,
        *tracking.MLFLOW_FORCED,
        *(n for n in os.environ if n.startswith(("MLFLOW_", "WANDB_"))),
    }:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


@pytest.fixture
def patient_env(quiet_env, monkeypatch):
    """`quiet_env` for talks with the real server: the product's 5 s bound is for a server that is gone;
    the test's SQLite-backed server on a busy machine may take longer than that to answer, and a
    dropped call would fail the test for the machine's load, not for the code."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite store, artifacts served by the server itself),
    in its own process group, stopped with it."""
    import httpx

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"NO_PROXY": "127.0.0.1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server never answered:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's group (the CLI, uvicorn, its job runner), SIGKILL after 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def runs_of(url: str, experiment: str, job: str) -> list:
    found = client(url).get_experiment_by_name(experiment)
    if found is None:
        return []
    return client(url).search_runs([found.experiment_id], filter_string=f"tags.`kubetune.job` = '{job}'")


# --- MLflow, against a real server ---------------------------------------------------------------


def test_a_run_on_a_real_mlflow_server_reads_back_params_every_step_the_evaluation_and_the_adapter(
    mlflow_server, patient_env, tmp_path, capsys
):
    config = config_with(tmp_path, mlflow={"trackingUri": mlflow_server, "experiment": "tuning"})
    trackers = tracking.open_trackers(
        config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path / "tracking", allow_node_local=True
    )
    assert trackers.names == ["mlflow"]
    run_through(trackers, config, adapter_folder(tmp_path / "adapter"))

    [run] = runs_of(mlflow_server, "tuning", JOB)
    assert run.info.run_name == JOB and run.info.status == "FINISHED"
    assert run.data.tags["kubetune.namespace"] == NAMESPACE
    params = run.data.params
    assert params["hyperparameters.learningRate"] == "1e-2"
    assert params["hyperparameters.globalBatchSize"] == "8"
    assert params["method.type"] == "lora" and params["method.lora.r"] == "8"
    assert params["model.uri"] == config.spec.model.uri and params["dataset.uri"] == config.spec.dataset.uri
    assert params["plan.worldSize"] == "1" and params["plan.strategy"] == "ddp"
    assert not [key for key in params if key.startswith(("output.", "runPolicy.", "tracking."))]

    mlflow_client = client(mlflow_server)
    history = mlflow_client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    rates = mlflow_client.get_metric_history(run.info.run_id, "learning_rate")
    assert sorted((m.step, m.value) for m in rates) == [(1, 0.01), (2, 0.009), (3, 0.008)]
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "grad_norm")] == [1, 3]  # None: no point
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, "eval_loss")] == [(3, 1.75)]
    assert len(mlflow_client.get_metric_history(run.info.run_id, "tokens_per_second")) == 3

    metrics = run.data.metrics  # the latest value of each: the evaluation under the rules' names
    assert metrics["rougeL.delta"] == pytest.approx(0.19) and metrics["rougeL.base"] == pytest.approx(0.12)
    assert metrics["forgettingRatio"] == pytest.approx(1.05)
    assert metrics["benchmarks.support_qa.acc:none"] == pytest.approx(0.75)  # MLflow takes no ','
    assert metrics["evaluation.examples"] == 12 and metrics["evaluation.tokensGenerated"] == 640

    downloaded = Path(mlflow_client.download_artifacts(run.info.run_id, "adapter", str(tmp_path / "download")))
    assert {p.relative_to(downloaded).as_posix(): p.read_bytes() for p in downloaded.rglob("*") if p.is_file()} == (
        ADAPTER
    )
    [opened] = log_lines(capsys, "tracking")
    assert opened["mlflow"].endswith(f"/runs/{run.info.run_id}")
    assert not log_lines(capsys, "tracker_failed")


def test_log_artifacts_false_keeps_the_adapter_off_the_server_and_a_failed_run_ends_failed(
    mlflow_server, patient_env, tmp_path
):
    config = config_with(tmp_path, mlflow={"trackingUri": mlflow_server, "logArtifacts": False})
    trackers = tracking.open_trackers(
        config.spec, job_name="no-artifacts", namespace=NAMESPACE, work_dir=tmp_path, allow_node_local=True
    )
    trackers.metrics(1, {"train_loss": 1.0})
    trackers.artifacts(adapter_folder(tmp_path / "adapter"))
    trackers.finish(ok=False)
    [run] = runs_of(mlflow_server, NAMESPACE, "no-artifacts")  # the experiment defaults to the namespace
    assert run.info.status == "FAILED"
    assert client(mlflow_server).list_artifacts(run.info.run_id) == []


def test_a_server_that_refuses_a_call_mid_run_drops_the_tracker_with_one_log_line(
    mlflow_server, patient_env, tmp_path, capsys
):
    """MLflow refuses to change a logged param: the tracker is dropped there, one line says why, and
    nothing more is sent (the run on the server keeps what came before)."""
    config = config_with(tmp_path, mlflow={"trackingUri": mlflow_server})
    trackers = tracking.open_trackers(
        config.spec, job_name="refused", namespace=NAMESPACE, work_dir=tmp_path, allow_node_local=True
    )
    trackers.params({"seed": 1})
    trackers.metrics(1, {"train_loss": 1.0})
    trackers.params({"seed": 2})  # refused by the server
    trackers.metrics(2, {"train_loss": 0.5})
    trackers.evaluation(EVALUATION)
    trackers.finish(ok=True)
    assert trackers.names == []
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["tracker"] == "mlflow" and failed["action"] == "params" and "\n" not in failed["message"]
    [run] = runs_of(mlflow_server, NAMESPACE, "refused")
    assert [m.step for m in client(mlflow_server).get_metric_history(run.info.run_id, "train_loss")] == [1]
    assert "rougeL.delta" not in run.data.metrics and run.info.status == "RUNNING"


def test_a_loopback_tracking_uri_is_refused_outside_local_runs_before_anything_connects(
    mlflow_server, patient_env, tmp_path, capsys
):
    config = config_with(tmp_path, mlflow={"trackingUri": mlflow_server})
    trackers = tracking.open_trackers(config.spec, job_name="in-a-pod", namespace=NAMESPACE, work_dir=tmp_path)
    trackers.metrics(1, {"train_loss": 1.0})
    trackers.finish(ok=True)
    assert trackers.names == []
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["action"] == "open" and "loopback" in failed["message"]
    assert runs_of(mlflow_server, NAMESPACE, "in-a-pod") == []


def test_other_ranks_open_nothing_and_send_nothing(quiet_env, tmp_path, capsys):
    config = config_with(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{free_port()}"})
    trackers = tracking.open_trackers(
        config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path, main=False, allow_node_local=True
    )
    run_through(trackers, config, adapter_folder(tmp_path / "adapter"))
    assert trackers.names == [] and capsys.readouterr().out == ""


def test_a_dead_mlflow_port_costs_seconds_and_training_goes_on(quiet_env, tmp_path, capsys):
    config = config_with(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{free_port()}"})
    import mlflow.tracking  # noqa: F401 - the import's time is not the server's

    started = time.monotonic()
    trackers = tracking.open_trackers(
        config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path, allow_node_local=True
    )
    run_through(trackers, config, adapter_folder(tmp_path / "adapter"))
    assert time.monotonic() - started < DEAD_SERVER_BUDGET_S
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["tracker"] == "mlflow" and failed["action"] == "open"


def test_a_server_that_accepts_and_never_answers_costs_seconds_too(quiet_env, tmp_path, capsys):
    """The worst server: it takes the connection and says nothing. MLflow's own default would wait
    120 s per request and retry 7 times; the trainer's bound is a few seconds, once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    config = config_with(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{listener.getsockname()[1]}"})
    import mlflow.tracking  # noqa: F401

    try:
        started = time.monotonic()
        trackers = tracking.open_trackers(
            config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path, allow_node_local=True
        )
        run_through(trackers, config, adapter_folder(tmp_path / "adapter"))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()
    assert held, "the client never connected"
    assert elapsed < DEAD_SERVER_BUDGET_S
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["action"] == "open" and "readtimeout" in failed["message"].lower()


def test_a_redirect_from_the_tracking_server_is_not_followed(quiet_env, tmp_path, capsys):
    """The URI rule checked the tracking URI only; a server answering 302 to somewhere else (the
    node's metadata address, here a second loopback listener) must not get the client there."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    class Redirector(Target):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}{self.path}")
            self.end_headers()

        do_POST = do_GET

    target, redirector = (
        ThreadingHTTPServer(("127.0.0.1", 0), Target),
        ThreadingHTTPServer(("127.0.0.1", 0), Redirector),
    )
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in (target, redirector)]
    for thread in threads:
        thread.start()
    try:
        config = config_with(tmp_path, mlflow={"trackingUri": f"http://127.0.0.1:{redirector.server_address[1]}"})
        trackers = tracking.open_trackers(
            config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path, allow_node_local=True
        )
        run_through(trackers, config, adapter_folder(tmp_path / "adapter"))
    finally:
        for server in (target, redirector):
            server.shutdown()
            server.server_close()
    assert hits == []
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["tracker"] == "mlflow" and failed["action"] == "open"


# --- Weights & Biases ------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """Every record of a W&B transaction log (`run-ID.wandb`), each chunk's CRC-32 checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", "not a W&B transaction log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == checksum, f"corrupt chunk at {position}"
        pending += chunk
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items(update_list) -> dict:
    return {(item.key or ".".join(item.nested_key)): json.loads(item.value_json) for item in update_list}


def test_an_offline_wandb_run_is_published_with_the_output_and_reads_back(quiet_env, tmp_path, capsys):
    output = storage.open_output(f"file://{tmp_path}/output", cache_dir=tmp_path / "cache", local=True)
    config = config_with(tmp_path, wandb={"project": "tuning", "mode": "offline"})
    trackers = tracking.open_trackers(
        config.spec,
        job_name=JOB,
        namespace=NAMESPACE,
        work_dir=tmp_path / "cache" / "tracking",
        publish=output.publish_dir,
    )
    assert trackers.names == ["wandb"]
    run_through(trackers, config, adapter_folder(tmp_path / "adapter"))

    [published] = output.list_complete(tracking.WANDB_OUTPUT)  # published whole, with its marker
    run_dir = tmp_path / "output" / tracking.WANDB_OUTPUT / Path(published).name
    assert not [p for p in run_dir.rglob("*") if p.is_symlink()]
    [log_file] = run_dir.glob("run-*.wandb")
    records = wandb_records(log_file)

    [run] = of_type(records, "run")
    assert run.project == "tuning" and run.display_name == JOB and run.run_group == NAMESPACE
    config_values = {}
    for update in of_type(records, "config"):
        config_values.update(items(update.update))
    assert config_values["hyperparameters.learningRate"] == "1e-2" and config_values["plan.worldSize"] == "1"
    steps = [items(h.item) for h in of_type(records, "history")]
    assert [(s["_step"], s["train_loss"]) for s in steps] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert [s.get("eval_loss") for s in steps] == [None, None, 1.75]
    summary = {}
    for update in of_type(records, "summary"):
        summary.update(items(update.update))
    assert summary["rougeL.delta"] == pytest.approx(0.19) and summary["forgettingRatio"] == pytest.approx(1.05)
    assert summary["benchmarks.support_qa.acc,none"] == pytest.approx(0.75)
    [artifact] = of_type(records, "artifact")
    assert artifact.type == "model" and artifact.name == f"{JOB}-adapter"
    assert sorted(entry.path for entry in artifact.manifest.contents) == sorted(ADAPTER)
    [end] = of_type(records, "exit")
    assert end.exit_code == 0
    [opened] = log_lines(capsys, "tracking")  # capsys was read above only by this call
    assert Path(opened["wandb"]).name == run_dir.name


def test_wandb_online_without_a_reachable_server_gives_up_within_its_bound(quiet_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    config = config_with(tmp_path, wandb={"project": "tuning", "mode": "online"})
    started = time.monotonic()
    trackers = tracking.open_trackers(config.spec, job_name=JOB, namespace=NAMESPACE, work_dir=tmp_path)
    run_through(trackers, config, adapter_folder(tmp_path / "adapter"))
    assert time.monotonic() - started < tracking.WANDB_INIT_TIMEOUT_S + 30
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed["tracker"] == "wandb" and failed["action"] == "open"


# --- the contract with the training loop (no server) ------------------------------------------------


class Recorder:
    def __init__(self, name, fail_on=()):
        self.name, self.where, self.fail_on, self.calls = name, name, fail_on, []

    def __getattr__(self, action):
        def record(*args):
            if action in self.fail_on:
                raise RuntimeError(f"{self.name} refused {action}\nsecond line")
            self.calls.append((action, *args))

        return record


def test_a_tracker_that_raises_is_dropped_once_and_the_others_get_everything(capsys):
    broken, healthy = Recorder("broken", fail_on=("metrics",)), Recorder("healthy")
    trackers = tracking.Trackers([broken, healthy])
    trackers.params({"a": 1})
    trackers.metrics(1, {"train_loss": 1.0, "eval_loss": float("nan"), "grad_norm": None})
    trackers.metrics(2, {"train_loss": 0.5})
    trackers.evaluation({"metrics": {"rougeL": {"delta": 0.1}}})
    trackers.finish(ok=True)
    trackers.finish(ok=False)  # a second end (a failure after the first) reaches no one
    assert [call[0] for call in broken.calls] == ["params"]
    assert healthy.calls == [
        ("params", {"a": "1"}),
        ("metrics", 1, {"train_loss": 1.0}),
        ("metrics", 2, {"train_loss": 0.5}),
        ("evaluation", 2, {"rougeL.delta": 0.1}),
        ("finish", True),
    ]
    [failed] = log_lines(capsys, "tracker_failed")
    assert failed == {
        **failed,
        "tracker": "broken",
        "action": "metrics",
        "message": "RuntimeError: broken refused metrics",
    }


def test_the_evaluation_is_reported_under_the_names_promotion_rules_use():
    assert tracking.evaluation_metrics(EVALUATION) == {
        "rougeL.base": 0.12,
        "rougeL.tuned": 0.31,
        "rougeL.delta": 0.19,
        "exactMatch.base": 0.0,
        "exactMatch.tuned": 0.25,
        "exactMatch.delta": 0.25,
        "perplexity.base": 20.0,
        "perplexity.tuned": 21.0,
        "perplexity.delta": 1.0,
        "forgettingRatio": 1.05,
        "benchmarks.support_qa.acc,none": 0.75,
        "evaluation.examples": 12.0,
        "evaluation.seconds": 3.5,
        "evaluation.tokensGenerated": 640.0,
    }
    assert tracking.evaluation_metrics(None) == {} and tracking.evaluation_metrics({"notes": ["x"]}) == {}
    assert tracking.evaluation_metrics({"metrics": {"rougeL": {"base": None, "tuned": True, "delta": "0.1"}}}) == {}


@pytest.mark.parametrize(
    ("uri", "local", "refused"),
    [
        ("https://mlflow.example.com", False, False),
        ("http://10.0.0.5:5000", False, False),  # in-cluster servers live in private ranges
        ("http://127.0.0.1:5000", False, True),
        ("http://localhost:5000", False, True),
        ("http://169.254.169.254/", False, True),
        ("http://2852039166/", False, True),
        ("http://127.0.0.1:5000", True, False),
        ("http://localhost:5000", True, False),
        ("http://user:pw@127.0.0.1:5000", True, True),  # local runs get loopback, nothing else
        ("http://127.0.0.1:5000/%2e%2e/x", True, True),
        ("file:///tmp/mlruns", True, True),
    ],
)
def test_the_tracking_uri_follows_the_apis_http_rule_and_local_runs_may_name_loopback(uri, local, refused):
    assert (tracking.mlflow_uri_problem(uri, allow_node_local=local) is not None) == refused


def test_names_mlflow_refuses_are_spelled_so_it_accepts_them():
    assert tracking.mlflow_name("benchmarks.arc_easy.acc,none") == "benchmarks.arc_easy.acc:none"
    assert tracking.mlflow_name("rougeL.delta") == "rougeL.delta"
    assert tracking.mlflow_name("a*b" + "x" * 300) == ("a_b" + "x" * 300)[:250]


def test_a_short_training_run_reports_to_the_mlflow_server(mlflow_server, patient_env, tiny_model, tmp_path):
    """The trainer itself: params at the start, a loss per step, the evaluation and the adapter at the end."""
    from kubetune_trainer import train

    wire = make_config(tiny_model, tmp_path, steps=6, every_save=1000).to_wire()
    wire["spec"]["tracking"] = {"mlflow": {"trackingUri": mlflow_server, "experiment": "e2e"}}
    wire["spec"]["evaluation"] = {"everySteps": 3, "maxExamples": 4, "maxNewTokens": 8}
    wire["runtime"]["jobName"] = "e2e-job"
    assert train.run_training(TrainerConfig.model_validate(wire)) == 0
    [run] = runs_of(mlflow_server, "e2e", "e2e-job")
    assert run.info.status == "FINISHED" and run.data.params["plan.worldSize"] == "1"
    c = client(mlflow_server)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "eval_loss")) == [3, 6]
    assert "rougeL.delta" in run.data.metrics and "forgettingRatio" in run.data.metrics
    assert "adapter/adapter_model.safetensors" in [a.path for a in c.list_artifacts(run.info.run_id, "adapter")]


@pytest.mark.parametrize(
    ("objective", "settings", "expected"),
    [
        ("orpo", {}, "orpo.beta"),
        ("simpo", {"gammaBetaRatio": 0.5}, "simpo.gammaBetaRatio"),
        ("kto", {"desirableWeight": 1.3}, "kto.desirableWeight"),
    ],
)
def test_a_preference_objectives_settings_are_run_params(tmp_path, objective, settings, expected):
    wire = make_config(tmp_path / "no-model", tmp_path).to_wire()
    data_format = "unpaired-preference" if objective == "kto" else "preference"
    wire["spec"] |= {"objective": objective, objective: {"beta": 0.2, **settings}}
    wire["spec"]["dataset"]["format"] = data_format
    params = tracking.job_params(TrainerConfig.model_validate(wire).spec)
    assert params["objective"] == objective and params[f"{objective}.beta"] == "0.2" and expected in params
