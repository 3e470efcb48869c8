"""adapterdeployment/adapters.py and status.py: load/unload actions per replica and the
AdapterDeployment status; runtime.py: the runtime's answers; reconcile.py against a stand-in API
server and replicas on 127.0.0.1: URIs from a FineTuneJob's status that are not its own never
reach a replica or a mount, calls to replicas are bounded, and a load the runtime keeps failing
ends Failed; a `require` rule the FineTuneJob's evaluation fails unloads the adapter, keeps it
out of the replicas' adapters file and says so in one Event."""

import base64
import copy
import json
import socket
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune_operator import k8s, keys
from kubetune_operator.adapterdeployment import reconcile as rec
from kubetune_operator.adapterdeployment import runtime
from kubetune_operator.adapterdeployment.adapters import (
    REPLICA_URLS_ANNOTATION,
    Action,
    Replica,
    Wanted,
    adapters_from_models,
    plan_actions,
    resolve,
)
from kubetune_operator.adapterdeployment.status import Observed, derive_status
from kubetune_operator.config import OperatorConfig
from kubetune_operator.state import OperatorState

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def observed(wanted, replicas, ready=1):
    return Observed("support", "ml", 8000, 3, 1, 1, ready, 1, True, wanted, replicas, NOW)


def test_models_answer_lists_adapters_only():
    models = {
        "data": [
            {"id": "base", "parent": None, "root": "pvc://m"},
            {"id": "legal", "parent": "base", "root": "pvc://a/legal"},
        ]
    }
    assert adapters_from_models(models) == {"legal": "pvc://a/legal"}


def test_resolve_from_job():
    spec = [{"name": "a", "uri": "pvc://x/a"}, {"name": "b", "fromJob": "job"}, {"name": "c", "fromJob": "gone"}]
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    wanted = resolve(spec, {"job": running, "gone": None})
    assert wanted[0] == Wanted("a", "pvc://x/a")
    assert wanted[1].uri is None and wanted[1].pending == "waiting for FineTuneJob job to succeed"
    assert "gone" in wanted[2].pending
    assert wanted[1].reason == wanted[2].reason == "WaitingForJob"
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "OOM on rank 0"}]}}
    assert resolve(spec, {"job": failed, "gone": None})[1].pending == "FineTuneJob job failed: OOM on rank 0"
    assert resolve(spec, {"job": failed, "gone": None})[1].reason == "JobFailed"
    done = {
        "spec": {"output": {"uri": "pvc://out/job"}},
        "status": {
            "conditions": [{"type": "Succeeded", "status": "True"}],
            "adapter": {"uri": "pvc://out/job/adapter", "sha256": "ab" * 32},
        },
    }
    assert resolve(spec, {"job": done, "gone": None})[1] == Wanted("b", "pvc://out/job/adapter", "ab" * 32)


def test_plan_loads_missing_unloads_extra_and_skips_refused():
    wanted = [Wanted("a", "u/a"), Wanted("b", "u/b"), Wanted("p"), Wanted("bad", "u/bad")]
    r = Replica("pod-0", "http://x", loaded={"a": "u/a", "old": "u/old"}, failed={"bad": ("u/bad", "too big")})
    down = Replica("pod-1", "http://y", error="refused")
    assert plan_actions(wanted, [r, down]) == [Action("pod-0", "unload", "old"), Action("pod-0", "load", "b", "u/b")]
    # A changed URI is unloaded and loaded again; a refusal for another URI is retried.
    r2 = Replica("pod-0", "http://x", loaded={"a": "u/a-old"}, failed={"bad": ("u/old-bad", "no")})
    assert plan_actions([Wanted("a", "u/a"), Wanted("bad", "u/bad")], [r2]) == [
        Action("pod-0", "unload", "a"),
        Action("pod-0", "load", "a", "u/a"),
        Action("pod-0", "load", "bad", "u/bad"),
    ]


def test_status_states_and_conditions():
    wanted = [Wanted("a", "u/a"), Wanted("p", pending="waiting for FineTuneJob j to succeed"), Wanted("bad", "u/bad")]
    replicas = [
        Replica(
            "pod-0",
            "http://x",
            loaded={"a": "u/a", "old": "u/old"},
            failed={"bad": ("u/bad", "adapter rank 128 exceeds maxLoraRank 64")},
            unload_failed={"old": "busy"},
        )
    ]
    status = derive_status({}, observed(wanted, replicas))
    by = {a["name"]: a for a in status["adapters"]}
    assert by["a"] == {"name": "a", "uri": "u/a", "loadedReplicas": 1, "state": "Loaded"}
    assert by["p"]["state"] == "Pending" and "waiting for FineTuneJob j" in by["p"]["message"]
    assert by["bad"]["state"] == "Failed" and by["bad"]["message"] == "adapter rank 128 exceeds maxLoraRank 64"
    assert by["old"]["state"] == "Unloading" and by["old"]["message"] == "busy"
    assert status["adaptersReady"] == "1/3"
    assert status["endpoint"] == "http://support.ml.svc:8000/v1"
    assert status["readyReplicas"] == 1 and status["observedGeneration"] == 3
    assert cond(status, "Available")["status"] == "True"
    assert cond(status, "AdaptersReady")["status"] == "False"
    assert cond(status, "Degraded")["status"] == "True"
    assert cond(status, "Progressing")["status"] == "True"  # "old" is still being unloaded


def test_steady_state_and_idempotence():
    wanted = [Wanted("a", "u/a")]
    replicas = [Replica("pod-0", "http://x", loaded={"a": "u/a"})]
    status = derive_status({}, observed(wanted, replicas))
    assert cond(status, "AdaptersReady")["status"] == "True" and status["adaptersReady"] == "1/1"
    assert cond(status, "Progressing")["status"] == "False"
    assert cond(status, "Degraded")["status"] == "False"
    later = derive_status(status, observed(wanted, replicas))
    assert later == status


def test_adapters_ready_says_what_it_waits_for():
    loaded = [Replica("pod-0", "http://x", loaded={"a": "u/a"})]
    waiting = [Wanted("a", "u/a"), Wanted("v1", pending="waiting for FineTuneJob j to succeed", reason="WaitingForJob")]
    ready = cond(derive_status({}, observed(waiting, loaded)), "AdaptersReady")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForJob")
    assert ready["message"] == "1/2 loaded; not yet: v1"
    failed_job = [*waiting, Wanted("v2", pending="FineTuneJob k failed: OOM", reason="JobFailed")]
    assert cond(derive_status({}, observed(failed_job, loaded)), "AdaptersReady")["reason"] == "JobFailed"
    refused = [Replica("pod-0", "http://x", loaded={"a": "u/a"}, failed={"b": ("u/b", "too big")})]
    assert (
        cond(derive_status({}, observed([*failed_job, Wanted("b", "u/b")], refused)), "AdaptersReady")["reason"]
        == "AdapterFailed"
    )


def test_loading_and_no_replicas():
    wanted = [Wanted("a", "u/a")]
    two = [Replica("pod-0", "http://x", loaded={"a": "u/a"}), Replica("pod-1", "http://y", loaded={})]
    status = derive_status({}, observed(wanted, two, ready=2))
    assert status["adapters"][0]["state"] == "Loading" and status["adapters"][0]["loadedReplicas"] == 1
    assert status["readyReplicas"] == 1  # only replicas with every adapter count
    none = derive_status({}, observed(wanted, [], ready=0))
    assert none["adapters"][0]["state"] == "Pending"
    assert cond(none, "Available")["status"] == "False"


def test_replica_urls_and_error_messages():
    from kubetune_operator.adapterdeployment.adapters import REPLICA_URLS_ANNOTATION, replica_urls
    from kubetune_operator.adapterdeployment.runtime import error_message
    from kubetune_operator.bounded_http import BoundedResponse

    def answer(status, body):
        return BoundedResponse(status, {}, body if isinstance(body, bytes) else json.dumps(body).encode())

    def pod(name, ready=True, ip="10.0.0.1"):
        return {
            "metadata": {"name": name},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }

    pods = [pod("b", ip="10.0.0.2"), pod("a"), pod("c", ready=False)]
    body = {"metadata": {"annotations": {REPLICA_URLS_ANNOTATION: "http://127.0.0.1:1/, http://127.0.0.1:2"}}}
    assert replica_urls(body, pods, 8000, False) == [("a", "http://10.0.0.1:8000"), ("b", "http://10.0.0.2:8000")]
    assert replica_urls(body, pods, 8000, True) == [("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")]
    openai = answer(400, {"error": {"message": "adapter rank 128 exceeds maxLoraRank 64"}})
    assert error_message(openai) == "adapter rank 128 exceeds maxLoraRank 64"
    assert error_message(answer(400, {"object": "error", "message": "vllm says no"})) == "vllm says no"
    assert error_message(answer(400, b"plain")) == "plain"
    assert error_message(answer(500, b"")) == "HTTP 500"
    long = error_message(answer(400, {"error": {"message": "line\n" * 1000}}))
    assert "\n" not in long and len(long) <= 300  # one line for a condition


def test_an_adapter_is_recognised_by_the_path_its_runtime_reports():
    """vLLM reports the local path it was given as `root`, not the pvc:// URI: no reload each sync."""
    from kubetune_operator.adapterdeployment.adapters import with_runtime_path

    want = with_runtime_path(Wanted("a", "pvc://adapters/a"), "vllm")
    assert want.root == "/mnt/pvc/adapters/a"
    vllm = Replica("pod-0", "http://x", loaded={"a": "/mnt/pvc/adapters/a"})
    assert plan_actions([want], [vllm]) == []
    assert derive_status({}, observed([want], [vllm]))["adapters"][0]["state"] == "Loaded"
    assert with_runtime_path(Wanted("a", "pvc://adapters/a"), "builtin").root == "pvc://adapters/a"
    assert with_runtime_path(Wanted("s", "s3://b/s"), "vllm").root == "s3://b/s"  # refused at load, with a message


def test_sha256_comes_from_the_job_or_the_replicas_and_a_mismatch_fails():
    from kubetune_operator.adapterdeployment.adapters import digests_from_models

    models = {
        "data": [
            {"id": "base", "parent": None},
            {"id": "a", "parent": "base", "root": "u/a", "sha256": "aa" * 32},
            {"id": "v", "parent": "base", "root": "/mnt/v"},
        ]
    }
    assert digests_from_models(models) == {"a": "aa" * 32}  # vLLM's cards carry none

    def replica(name, digest):
        return Replica(name, "http://x", loaded={"a": "u/a"}, digests={"a": digest})

    given = derive_status({}, observed([Wanted("a", "u/a")], [replica("pod-0", "aa" * 32)]))["adapters"][0]
    assert given["sha256"] == "aa" * 32 and given["state"] == "Loaded"
    from_job = derive_status({}, observed([Wanted("a", "u/a", sha256="bb" * 32)], [replica("pod-0", "aa" * 32)]))
    entry = from_job["adapters"][0]
    assert entry["sha256"] == "bb" * 32 and entry["state"] == "Failed"
    assert entry["message"] == "replicas serve weights with sha256 aaaaaaaaaaaa; the FineTuneJob reported bbbbbbbbbbbb"
    split = derive_status(
        {}, observed([Wanted("a", "u/a")], [replica("pod-0", "aa" * 32), replica("pod-1", "cc" * 32)], ready=2)
    )["adapters"][0]
    assert "sha256" not in split and split["state"] == "Failed" and "the replicas disagree" in split["message"]


# --- the reconcile against stand-ins -------------------------------------------------------------

NS, AD = "team-a", "support"
READY_POD = {
    "metadata": {"name": "pod-0"},
    "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
}


class FakeReplica:
    """The runtime's adapter API on 127.0.0.1. `answer(name, path)` → (status, body) for a load
    (default 200); `drip`: /v1/models sends its answer one byte every 0.2 s."""

    def __init__(self, answer=None, drip=False):
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, str, str]] = []  # (verb, adapter, lora_path)
        self.auth: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, code, body):
                data = (json.dumps(body) if not isinstance(body, str) else body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if drip:
                    try:
                        for _ in range(150):  # at most 30 s
                            self.wfile.write(data[:1])
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass  # the operator hung up: what the test wants
                    return
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                fake.auth.append(self.headers.get("Authorization"))
                cards = [{"id": "base", "parent": None}] + [
                    {"id": n, "parent": "base", "root": p} for n, p in fake.adapters.items()
                ]
                self.reply(200, {"object": "list", "data": cards})

            def do_POST(self):  # noqa: N802
                fake.auth.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["lora_name"]
                if self.path == "/v1/unload_lora_adapter":
                    fake.calls.append(("unload", name, ""))
                    fake.adapters.pop(name, None)
                    return self.reply(200, "ok")
                fake.calls.append(("load", name, body["lora_path"]))
                status, out = answer(name, body["lora_path"]) if answer else (200, "ok")
                if status == 200:
                    fake.adapters[name] = body["lora_path"]
                return self.reply(status, out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def loads(self, name):
        return [c for c in self.calls if c[:2] == ("load", name)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class FakeApi:
    """The API server, as the reconcile uses it: objects by path, children applied, status patched."""

    def __init__(self, ad, jobs=(), pods=(READY_POD,)):
        self.objects = {k8s.kubetune_path("AdapterDeployment", NS, AD): ad}
        for job in jobs:
            self.objects[k8s.kubetune_path("FineTuneJob", NS, job["metadata"]["name"])] = job
        self.pods = list(pods)
        self.applied: dict[str, dict] = {}
        self.events: list[tuple[str, str, str]] = []  # (type, reason, message)

    @property
    def ad(self):
        return self.objects[k8s.kubetune_path("AdapterDeployment", NS, AD)]

    def get(self, path):
        return copy.deepcopy(self.objects.get(path))

    def list(self, path, label_selector=""):
        return copy.deepcopy(self.pods)

    def apply(self, obj, field_manager=""):
        self.applied[obj["kind"]] = copy.deepcopy(obj)
        return {**copy.deepcopy(obj), "status": {}}

    def request(self, method, path, body=None, query=None, content_type=""):
        assert method == "PATCH" and content_type == k8s.APPLY_PATCH, (method, path)
        self.applied[body["kind"]] = copy.deepcopy(body)
        return copy.deepcopy(body)

    def merge_patch(self, path, body):
        status = body["status"]
        self.ad["status"] = {**(self.ad.get("status") or {}), **{k: v for k, v in status.items() if v is not None}}
        return self.ad

    def post_event(self, involved, type_, reason, message):
        self.events.append((type_, reason, message))


def ad_body(adapters, url, generation=1):
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": AD, "namespace": NS, "uid": "uid-1", "generation": generation, "resourceVersion": "7",
                     "annotations": {REPLICA_URLS_ANNOTATION: url}},
        "spec": {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}, "adapters": adapters},
    }  # fmt: skip


def succeeded_job(uri, output="pvc://outputs/job"):
    return {
        "metadata": {"name": "job", "namespace": NS},
        "spec": {"output": {"uri": output}},
        "status": {"conditions": [{"type": "Succeeded", "status": "True"}], "adapter": {"uri": uri}},
    }


@pytest.fixture
def loopback_only(monkeypatch):
    """Fails the test if anything connects anywhere but 127.0.0.1."""
    connect = socket.socket.connect

    def guarded(sock, address):
        assert address[0] == "127.0.0.1", f"connected to {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def replicas():
    started: list[FakeReplica] = []

    def start(**kwargs):
        started.append(FakeReplica(**kwargs))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def run(api, passes=1):
    state = OperatorState(OperatorConfig(), client=api, allow_metrics_url=True)  # type: ignore[arg-type]
    for _ in range(passes):
        rec.reconcile(state, (NS, AD))
    return state


def adapter_status(api, name):
    return next(a for a in api.ad["status"]["adapters"] if a["name"] == name)


HOSTILE_STATUS_URIS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "pvc://payroll-db-data/",
    "pvc://outputs/job/../../../proc/self",
    "pvc://outputs/job/adapter-of-someone-else",  # beside the job's adapter, not under it
    "pvc://outputs/other-job/adapter",
    "s3://outputs/job/adapter",
]


@pytest.mark.parametrize("uri", HOSTILE_STATUS_URIS)
def test_a_status_uri_that_is_not_the_jobs_own_reaches_no_replica_no_mount_and_no_file(uri, replicas, loopback_only):
    """Finding 7: status.adapter.uri is writable by whoever may edit a FineTuneJob's status."""
    replica = replicas()
    adapters = [{"name": "legal", "uri": "pvc://adapters/legal"}, {"name": "tuned", "fromJob": "job"}]
    api = FakeApi(ad_body(adapters, replica.url), jobs=[succeeded_job(uri)])
    run(api)
    assert replica.loads("tuned") == [] and replica.loads("legal")  # the other adapter still loads
    pod = api.applied["Deployment"]["spec"]["template"]["spec"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["adapters", "models", "outputs"]  # the job's own output claim, nothing else
    data = api.applied["ConfigMap"]["data"]
    assert uri not in data["adapters.json"] and "tuned" not in data["adapters.json"]
    assert data["allowed-sources"].splitlines() == ["pvc://adapters/", "pvc://outputs/job/adapter"]
    tuned = adapter_status(api, "tuned")
    assert tuned["state"] == "Failed" and "not loaded" in tuned["message"] and "\n" not in tuned["message"]
    ready = cond(api.ad["status"], "AdaptersReady")
    assert (ready["status"], ready["reason"]) == ("False", "UntrustedAdapterSource")


def test_the_jobs_own_adapter_uri_loads(replicas, loopback_only):
    replica = replicas()
    api = FakeApi(
        ad_body([{"name": "tuned", "fromJob": "job"}], replica.url),
        jobs=[succeeded_job("pvc://outputs/job/adapter")],
    )
    run(api)
    assert replica.loads("tuned") == [("load", "tuned", "pvc://outputs/job/adapter")]
    assert adapter_status(api, "tuned")["state"] == "Loaded"


def test_every_call_to_a_replica_carries_the_derived_admin_key_which_the_secret_holds(replicas, loopback_only):
    replica = replicas()
    api = FakeApi(ad_body([{"name": "legal", "uri": "pvc://adapters/legal"}], replica.url))
    state = run(api)
    key = keys.admin_key(state.config, NS, AD, "uid-1")
    assert replica.auth and set(replica.auth) == {f"Bearer {key}"}
    secret = api.applied["Secret"]
    assert secret["metadata"]["name"] == f"{AD}-admin-key"
    assert base64.b64decode(secret["data"]["admin-key"]).decode() == key
    assert api.applied["NetworkPolicy"]["spec"]["podSelector"] == api.applied["Deployment"]["spec"]["selector"]


def test_a_replica_dripping_its_answer_holds_the_reconcile_no_longer_than_the_deadline(
    replicas, loopback_only, monkeypatch
):
    """Finding 2 (replicas): a 5 s read timeout let a replica hold the reconcile as long as it liked."""
    monkeypatch.setattr(runtime, "QUERY_DEADLINE", 2.0)  # 10 s in the operator
    replica = replicas(drip=True)
    api = FakeApi(ad_body([{"name": "legal", "uri": "pvc://adapters/legal"}], replica.url))
    start = time.monotonic()
    run(api)
    elapsed = time.monotonic() - start
    assert elapsed < runtime.QUERY_DEADLINE + 2
    degraded = cond(api.ad["status"], "Degraded")
    assert degraded["reason"] == "ReplicaUnreachable" and "within 2s" in degraded["message"]


def test_a_huge_models_answer_is_cut_at_the_cap():
    def endless(sock):
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n")

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    thread = threading.Thread(target=lambda: endless(server.accept()[0]), daemon=True)
    thread.start()
    try:
        with pytest.raises(runtime.ReplicaError, match="over the 1048576-byte cap"):
            runtime.ReplicaClient("k").models(f"http://127.0.0.1:{server.getsockname()[1]}")
    finally:
        server.close()
        thread.join(timeout=5)


MALFORMED = "not a LoRA adapter: adapter_config.json is missing"


def test_a_load_that_keeps_failing_with_500_ends_failed_instead_of_being_retried_for_ever(replicas, loopback_only):
    """Finding 9: a 500 for a malformed adapter was retried every pass, for ever."""
    replica = replicas(answer=lambda name, path: (500, {"error": {"message": MALFORMED}}))
    api = FakeApi(ad_body([{"name": "bad", "uri": "pvc://adapters/bad"}], replica.url))
    state = run(api, passes=runtime.SERVER_ERROR_LIMIT + 3)
    assert len(replica.loads("bad")) == runtime.SERVER_ERROR_LIMIT
    bad = adapter_status(api, "bad")
    assert bad["state"] == "Failed" and MALFORMED in bad["message"]
    assert cond(api.ad["status"], "Degraded")["reason"] == "AdapterFailed"
    # A new spec (generation) asks again.
    api.ad["metadata"]["generation"] = 2
    rec.reconcile(state, (NS, AD))
    assert len(replica.loads("bad")) == runtime.SERVER_ERROR_LIMIT + 1


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refusal_fails_the_adapter_at_once_and_is_not_asked_again(status, replicas, loopback_only):
    replica = replicas(answer=lambda name, path: (status, {"error": {"message": "rank 128 exceeds 64"}}))
    api = FakeApi(ad_body([{"name": "bad", "uri": "pvc://adapters/bad"}], replica.url))
    run(api, passes=3)
    assert len(replica.loads("bad")) == 1
    assert adapter_status(api, "bad") | {"loadedReplicas": 0} == {
        "name": "bad", "uri": "pvc://adapters/bad", "state": "Failed", "message": "rank 128 exceeds 64",
        "loadedReplicas": 0,
    }  # fmt: skip


@pytest.mark.parametrize("status", [503, 504, 429, 401])
def test_transient_answers_are_asked_again_every_pass(status, replicas, loopback_only):
    replica = replicas(answer=lambda name, path: (status, {"error": {"message": "later"}}))
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], replica.url))
    run(api, passes=runtime.SERVER_ERROR_LIMIT + 2)
    assert len(replica.loads("a")) == runtime.SERVER_ERROR_LIMIT + 2
    assert adapter_status(api, "a")["state"] == "Loading"


def test_not_found_is_a_refusal_only_once_it_has_lasted(replicas, loopback_only, monkeypatch):
    """A replica started before a source was declared refuses it (404) until it gets it from the file."""
    replica = replicas(
        answer=lambda name, path: (404, {"error": {"message": "adapter source not found or not allowed"}})
    )
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], replica.url))
    state = run(api, passes=3)
    assert len(replica.loads("a")) == 3 and adapter_status(api, "a")["state"] == "Loading"
    monkeypatch.setattr(runtime, "NOT_FOUND_GRACE", 0.0)
    for _ in range(2):
        rec.reconcile(state, (NS, AD))
    assert len(replica.loads("a")) == 4
    assert adapter_status(api, "a")["message"] == "adapter source not found or not allowed"
    assert adapter_status(api, "a")["state"] == "Failed"


def test_a_conflict_is_unloaded_and_loaded_again_once(replicas, loopback_only):
    answers = iter([(409, {"error": {"message": "being served"}}), (200, "ok")])
    replica = replicas(answer=lambda name, path: next(answers))
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], replica.url))
    run(api)
    assert [c[0] for c in replica.calls] == ["load", "unload", "load"]
    assert adapter_status(api, "a")["state"] == "Loaded"
    stuck = replicas(answer=lambda name, path: (409, {"error": {"message": "being served"}}))
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], stuck.url))
    run(api, passes=3)
    assert [c[0] for c in stuck.calls] == ["load", "unload", "load"]  # an unload did not fix it: refused
    assert adapter_status(api, "a")["state"] == "Failed"


def test_vllms_already_loaded_400_is_the_same_conflict(replicas, loopback_only):
    already = (400, {"object": "error", "message": "The lora adapter 'a' has already been loaded.", "code": 400})
    answers = iter([already, (200, "ok")])
    replica = replicas(answer=lambda name, path: next(answers))
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], replica.url))
    run(api)
    assert [c[0] for c in replica.calls] == ["load", "unload", "load"]
    assert adapter_status(api, "a")["state"] == "Loaded"
    assert runtime.outcome(400, "max_lora_rank exceeded") == runtime.REFUSED  # any other 400 is a refusal


def test_no_load_starts_once_the_pass_has_spent_its_budget(replicas, loopback_only, monkeypatch):
    replica = replicas()
    api = FakeApi(ad_body([{"name": "a", "uri": "pvc://adapters/a"}], replica.url))
    monkeypatch.setattr(rec, "ACTIONS_BUDGET", -1.0)
    state = run(api)
    assert replica.loads("a") == [] and adapter_status(api, "a")["state"] == "Loading"
    monkeypatch.setattr(rec, "ACTIONS_BUDGET", 20.0)
    rec.reconcile(state, (NS, AD))  # the next pass does it
    assert len(replica.loads("a")) == 1


def test_what_replicas_said_is_forgotten_with_the_adapterdeployment(replicas, loopback_only):
    from kubetune_operator.adapterdeployment import handlers

    replica = replicas(answer=lambda name, path: (422, {"error": {"message": "not a LoRA adapter"}}))
    api = FakeApi(ad_body([{"name": "bad", "uri": "pvc://adapters/bad"}], replica.url))
    state = run(api)
    assert rec.memories(state)[(NS, AD)].refused == {"pod-0": {"bad": ("pvc://adapters/bad", "not a LoRA adapter")}}
    assert state.refused_loads[(NS, AD)] == rec.memories(state)[(NS, AD)].refused
    handlers.tick(state, {}, 1.0)
    assert rec.memories(state) == {} and state.refused_loads == {}


def test_a_rule_added_after_the_load_unloads_the_adapter_keeps_it_out_and_says_so_once(replicas, loopback_only):
    replica = replicas()
    job = succeeded_job("pvc://outputs/job/adapter")
    job["status"]["evaluation"] = {"metrics": {"rougeL": {"base": 0.2, "tuned": 0.3, "delta": 0.1}}}
    api = FakeApi(ad_body([{"name": "tuned", "fromJob": "job", "require": [
        {"metric": "rougeL.delta", "min": 0.05}]}], replica.url), jobs=[job])  # fmt: skip
    state = run(api)
    assert replica.adapters == {"tuned": "pvc://outputs/job/adapter"}
    assert not [e for e in api.events if e[1] == "AdapterRejected"]
    assert adapter_status(api, "tuned")["state"] == "Loaded"

    api.ad["spec"]["adapters"][0]["require"].append({"metric": "forgettingRatio", "max": 1.15})  # not measured
    api.ad["metadata"]["generation"] = 2
    rec.reconcile(state, (NS, AD))
    assert replica.adapters == {} and replica.calls[-1] == ("unload", "tuned", "")
    tuned = adapter_status(api, "tuned")
    assert tuned == {
        "name": "tuned",
        "state": "Rejected",
        "loadedReplicas": 0,
        "message": "FineTuneJob job fails require: forgettingRatio was not measured by the job (required: max "
        "1.15); not loaded: enable the job's spec.evaluation and retrain, or relax the rule",
    }
    assert "tuned" not in api.applied["ConfigMap"]["data"]["adapters.json"]  # a restarted replica does not load it
    ready = cond(api.ad["status"], "AdaptersReady")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterRejected")
    # One Event for the adapter, with the failed rule (beside the one for the AdaptersReady flip).
    rejections = [e for e in api.events if e[1] == "AdapterRejected" and e[2].startswith("adapter ")]
    assert rejections == [("Warning", "AdapterRejected", f"adapter tuned: {tuned['message']}")]

    asked, calls = len(replica.auth), list(replica.calls)
    for _ in range(2):  # later passes: not loaded again, not announced again
        rec.reconcile(state, (NS, AD))
    assert replica.calls == calls and len(replica.auth) == asked + 2  # asked what it has, told nothing
    assert [e for e in api.events if e[1] == "AdapterRejected" and e[2].startswith("adapter ")] == rejections

    api.ad["spec"]["adapters"][0]["require"] = [{"metric": "rougeL.delta", "min": 0.05}]  # relaxed: served again
    api.ad["metadata"]["generation"] = 3
    rec.reconcile(state, (NS, AD))
    assert replica.adapters == {"tuned": "pvc://outputs/job/adapter"}
    assert adapter_status(api, "tuned")["state"] == "Loaded"
