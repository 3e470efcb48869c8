"""adapterdeployment/adapters.py and status.py: load/unload actions per replica and the
AdapterDeployment status; replicas.py: the runtime's error messages."""

from datetime import UTC, datetime

from kubetune_operator.adapterdeployment.adapters import (
    Action,
    Replica,
    Wanted,
    adapters_from_models,
    plan_actions,
    resolve,
)
from kubetune_operator.adapterdeployment.status import Observed, derive_status

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
        "status": {
            "conditions": [{"type": "Succeeded", "status": "True"}],
            "adapter": {"uri": "pvc://out/job", "sha256": "ab"},
        }
    }
    assert resolve(spec, {"job": done, "gone": None})[1] == Wanted("b", "pvc://out/job", "ab")


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
    import httpx

    from kubetune_operator.adapterdeployment.adapters import REPLICA_URLS_ANNOTATION, replica_urls
    from kubetune_operator.replicas import error_message

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
    openai = httpx.Response(400, json={"error": {"message": "adapter rank 128 exceeds maxLoraRank 64"}})
    assert error_message(openai) == "adapter rank 128 exceeds maxLoraRank 64"
    assert error_message(httpx.Response(400, json={"object": "error", "message": "vllm says no"})) == "vllm says no"
    assert error_message(httpx.Response(400, text="plain")) == "plain"


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
