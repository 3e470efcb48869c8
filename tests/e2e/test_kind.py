"""The whole system on a real cluster: the operator runs in-cluster from the Helm chart, training
pods are started by a kubelet, data is on a PersistentVolumeClaim, answers come through a Service.

Written against whatever cluster KUBETUNE_E2E_KUBECONFIG (else KUBECONFIG) names: `make kind-up`
makes one (kind-config.yaml); `make test` runs this tier on it. The stages run in order in one
namespace, and each prints its duration; the training pods' loss lines and the answers are printed
too (`pytest -s` or the captured output of a failure).

1. data: the tiny model and the chat dataset uploaded to pvc://kubetune-data/ (`kubetune upload`);
2. a FineTuneJob of 2 pods x 1 process (DDP over gloo; rendezvous through the headless Service
   and cluster DNS) shows progress, loss and tokens/s while it runs (the operator scrapes rank 0
   over the pod network); a training pod is evicted after a checkpoint (the Job recreates it
   without spending backoffLimit, the trainer resumes from the checkpoint, status.restarts counts
   it); the operator's leader (of two replicas) is killed mid-run while another FineTuneJob is
   being admitted: the standby takes the Lease, converges with no duplicates and admits (here:
   refuses) the new job; the training job succeeds with status.adapter;
3. an AdapterDeployment (`fromJob`) becomes Available; a client pod asks through the Service and
   gets the trained answer; a second adapter is hot-loaded (no pod restarts) and then removed;
4. a FineTuneJob whose dataset is malformed fails fast with the trainer's reason, no retries;
5. deleting everything leaves nothing owned behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.kube import REPO, apply, evict, get, kubeconfig, kubectl, kubectl_binary, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.kind, pytest.mark.timeout(1800)]

EXAMPLE = REPO / "examples" / "cpu-tiny-kind.yaml"
JOB, DEPLOYMENT = "tiny-support", "tiny-support"
CLAIM = "kubetune-data"
QUESTION = "How long are backups kept?"
TRAINED_ANSWER = "Backups are kept for thirty days."
OPERATOR = "app.kubernetes.io/name=kubetune,app.kubernetes.io/component=operator"  # the chart's labels
TIMINGS = REPO / ".cache" / "kind" / "e2e-timings.txt"
OPERATOR_REPLICAS = 2  # the chart's default: a leader and a standby (Lease-based leader election)
LEASE = "kubetune-operator"
REFUSED, REFUSED_IMAGE = "not-our-image", "registry.invalid/someone-else/trainer:1"  # not in allowedImages


class Stages:
    """Prints each stage's duration as it ends (past pytest's capture) and keeps them in TIMINGS."""

    def __init__(self, capsys_manager) -> None:
        self.capture = capsys_manager
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)
        self.capture.suspend_global_capture(in_=False)
        try:
            print(f"\n[kind] {text}", file=sys.stderr, flush=True)
        finally:
            self.capture.resume_global_capture()

    def run(self, name: str):
        stages = self

        class Stage:
            def __enter__(self):
                self.t0 = time.monotonic()
                stages.say(f"── {name}")
                return self

            def __exit__(self, kind, value, tb):
                seconds = time.monotonic() - self.t0
                stages.say(f"   {name}: {'FAILED after ' if kind else ''}{seconds:.0f} s")
                TIMINGS.parent.mkdir(parents=True, exist_ok=True)
                with TIMINGS.open("a") as out:
                    out.write(
                        f"{time.strftime('%FT%TZ', time.gmtime())} {name}: {seconds:.0f} s{' FAILED' if kind else ''}\n"
                    )

        return Stage()


@pytest.fixture(scope="module")
def stages(pytestconfig) -> Stages:
    return Stages(pytestconfig.pluginmanager.getplugin("capturemanager"))


@pytest.fixture(scope="module")
def namespace(stages):
    name = f"kt-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    with stages.run(f"namespace {name} deleted"):
        kubectl("delete", "namespace", name, "--wait=true", timeout=300)


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(EXAMPLE.read_text())}


def upload(source: Path, target: str, namespace: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "kubetune", "upload", str(source), target, "-n", namespace, "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=400,
        env=_kube_env(),
    )
    assert run.returncode == 0, f"kubetune upload {source} {target}: {run.stderr}{run.stdout}"


def _kube_env() -> dict[str, str]:
    env = dict(os.environ)
    if kubeconfig():
        env["KUBECONFIG"] = kubeconfig()
    env["PATH"] = f"{Path(kubectl_binary()).parent}:{env.get('PATH', '')}"
    return env


def ftj(namespace: str, name: str = JOB) -> dict:
    return get("finetunejob", name, namespace) or {}


def cond(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def operator_pods() -> list[dict]:
    """The chart's operator pods that are Running and not being deleted."""
    pods = get("pods", namespace=None, label=OPERATOR)
    return [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def lease_holder() -> str:
    """Who holds the operator's Lease (its identity starts with the pod's name)."""
    pods = operator_pods()
    namespace = pods[0]["metadata"]["namespace"] if pods else "kubetune-system"
    lease = get("lease", LEASE, namespace) or {}
    return (lease.get("spec") or {}).get("holderIdentity") or ""


def operator_leader() -> tuple[dict, str]:
    """The leading operator pod, and the standby's name, once both run and one holds the Lease."""

    def both():
        pods, holder = operator_pods(), lease_holder()
        leaders = [p for p in pods if holder.startswith(p["metadata"]["name"])]
        return len(pods) == OPERATOR_REPLICAS and len(leaders) == 1 and (pods, leaders[0])

    pods, leader = wait_for(f"{OPERATOR_REPLICAS} operator pods, one holding the Lease", both, 180, 2)
    (standby,) = [p["metadata"]["name"] for p in pods if p is not leader]
    return leader, standby


def phase(obj: dict) -> str | None:
    return (obj.get("status") or {}).get("phase")


def job_pods(namespace: str, name: str = JOB) -> list[dict]:
    return get("pods", namespace=namespace, label=f"job-name={name}")


def running_pod(namespace: str, index: int) -> dict | None:
    for pod in job_pods(namespace):
        annotations = pod["metadata"].get("annotations") or {}
        if annotations.get("batch.kubernetes.io/job-completion-index") == str(index) and (
            pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
        ):
            return pod
    return None


def log_events(pod: str, namespace: str, event: str) -> list[dict]:
    out = kubectl("logs", "-n", namespace, pod, "-c", "trainer", check=False)
    records = []
    for line in out.splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            records.append(json.loads(line))
    return records


def owned_by(uid: str, namespace: str, kinds: str = "jobs,services,configmaps,deployments,pods") -> list[str]:
    items = get(kinds, namespace=namespace)
    return [
        f"{item['kind']}/{item['metadata']['name']}"
        for item in items
        if any(ref.get("uid") == uid for ref in item["metadata"].get("ownerReferences") or [])
        and not item["metadata"].get("deletionTimestamp")
    ]


@pytest.fixture(scope="module")
def data(namespace, stages):
    model = REPO / ".cache" / "models" / "tiny-llama"
    if not (model / "model.safetensors").exists():
        from kubetune_trainer.tiny_model import build_tiny_model

        build_tiny_model(model)
    with stages.run("data onto the claim (kubetune upload: the tiny model, the chat dataset)"):
        upload(model, f"pvc://{CLAIM}/models/tiny-llama", namespace)
        upload(
            REPO / "examples" / "data" / "support-chat.jsonl", f"pvc://{CLAIM}/datasets/support-chat.jsonl", namespace
        )
    return namespace


@pytest.fixture(scope="module")
def trained(data, stages):
    """Stage 2: the FineTuneJob trains, through an eviction and an operator restart."""
    namespace = data
    doc = documents()["FineTuneJob"]
    with stages.run("training: FineTuneJob, 2 pods x 1 process (DDP over gloo)"):
        apply(doc, namespace)
        seen: list[dict] = []
        last_line = ""

        def watch(until) -> bool:  # prints `kubectl get ftj` lines as they change, like -w
            nonlocal last_line
            obj = ftj(namespace)
            status = obj.get("status") or {}
            line = " ".join(kubectl("get", "ftj", JOB, "-n", namespace, "--no-headers").split()[:-1])  # no AGE
            if line != last_line:
                stages.say(f"   kubectl get ftj: {line}")
                last_line = line
            seen.append(status)
            assert phase(obj) != "Failed", json.dumps(status, indent=1)
            return until(obj)

        def running_with_metrics(obj):
            status = obj.get("status") or {}
            return (
                phase(obj) == "Running"
                and (status.get("progress") or {}).get("percent")
                and (status.get("metrics") or {}).get("trainLoss") is not None
                and (status.get("metrics") or {}).get("tokensPerSecond")
            )

        wait_for("progress, loss and tokens/s in status while Running", lambda: watch(running_with_metrics), 600, 2)

        rank0 = wait_for("rank 0's pod", lambda: running_pod(namespace, 0), 60)
        checkpoint = wait_for(
            "a checkpoint in rank 0's log",
            lambda: watch(lambda obj: log_events(rank0["metadata"]["name"], namespace, "checkpoint")),
            600,
            2,
        )
        victim = wait_for("pod 1", lambda: running_pod(namespace, 1), 60)
        victim_name = victim["metadata"]["name"]
        stages.say(f"   checkpoint at step {checkpoint[-1]['step']}; evicting {victim_name} (Eviction API)")
        evict(victim_name, namespace)

        def replaced(obj):
            return all(
                (pod := running_pod(namespace, index)) and pod["metadata"]["name"] != name
                for index, name in ((0, rank0["metadata"]["name"]), (1, victim_name))
            )

        wait_for("both pods recreated and running", lambda: watch(replaced), 300, 2)
        evicted = get("pod", victim_name, namespace)
        if evicted:  # the Job controller keeps it until its finalizer is handled: it must say why
            reasons = {c["type"]: c.get("reason") for c in evicted["status"].get("conditions") or []}
            assert "DisruptionTarget" in reasons, reasons

        leader, standby = operator_leader()
        name, operator_ns = leader["metadata"]["name"], leader["metadata"]["namespace"]
        stages.say(f"   killing the operator's leader {name} (no grace: its Lease is not released)")
        kubectl("delete", "pod", "-n", operator_ns, name, "--grace-period=0", "--force", "--wait=false")
        refused = {**doc, "metadata": {**doc["metadata"], "name": REFUSED}}
        refused["spec"] = {**doc["spec"], "image": REFUSED_IMAGE}
        apply(refused, namespace)  # admitted (here: refused) by whichever operator leads next
        took_over = wait_for(
            "the standby to take the Lease", lambda: (h := lease_holder()) and h.startswith(standby) and h, 120, 1
        )
        stages.say(f"   {took_over} leads; {REFUSED} is being admitted during the failover")

        final = wait_for(
            "the FineTuneJob to succeed", lambda: watch(lambda obj: obj if phase(obj) == "Succeeded" else None), 900, 2
        )
        running = [pod["metadata"]["uid"] for pod in operator_pods()]
        assert leader["metadata"]["uid"] not in running and len(running) == OPERATOR_REPLICAS, running
        refusal = wait_for("the refusal", lambda: (cond(ftj(namespace, REFUSED), "Admitted") or {}).get("reason"), 120)
        assert phase(ftj(namespace, REFUSED)) == "Failed" and refusal == "NotAllowed", ftj(namespace, REFUSED)
    return namespace, final, seen, checkpoint[-1]["step"]


def test_a_finetunejob_trains_in_two_pods_on_the_claim(trained, stages):
    namespace, final, seen, _ = trained
    status = final["status"]
    plan = status["plan"]
    assert plan["worldSize"] == 2 and plan["strategy"] == "ddp", plan
    running = [s for s in seen if s.get("phase") == "Running" and (s.get("metrics") or {}).get("tokensPerSecond")]
    assert running, "no status with metrics while the job ran"
    adapter = status["adapter"]
    assert adapter["uri"] == f"pvc://{CLAIM}/adapters/{JOB}/adapter"
    assert len(adapter["sha256"]) == 64
    assert status["metrics"]["trainLoss"] < 1.0, status["metrics"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 200
    for pod in job_pods(namespace):
        if pod["status"].get("phase") == "Succeeded":
            steps = [e for e in log_events(pod["metadata"]["name"], namespace, "step") if e["step"] % 25 == 0]
            for entry in steps:
                stages.say(
                    f"   {pod['metadata']['name']}: step {entry['step']} loss {entry.get('loss')} lr {entry.get('lr')}"
                )


def test_an_evicted_training_pod_resumes_from_its_checkpoint(trained, stages):
    namespace, final, seen, checkpoint_step = trained
    assert final["status"]["restarts"] >= 1, final["status"]
    resumed = []
    for pod in job_pods(namespace):
        resumed += log_events(pod["metadata"]["name"], namespace, "resumed")
    assert resumed, "no pod logged that it resumed"
    steps = {entry["step"] for entry in resumed}
    stages.say(f"   resumed at step {sorted(steps)} (checkpoint seen before the eviction: step {checkpoint_step})")
    assert min(steps) >= checkpoint_step > 0
    job = get("job", JOB, namespace)
    # the evicted pod (DisruptionTarget) and its peer (exit 143 after the agreed checkpoint) are
    # both ignored by the Job's podFailurePolicy: the backoffLimit is untouched
    assert not job["status"].get("failed"), job["status"]


def test_the_restarted_operator_converged_without_duplicates(trained):
    namespace, final, _, _ = trained
    uid = final["metadata"]["uid"]
    owned = owned_by(uid, namespace, "jobs,services,configmaps")
    assert sorted(owned) == sorted({*owned}), owned
    kinds = [name.split("/")[0] for name in owned]
    assert kinds.count("Job") == 1 and kinds.count("Service") == 1 and kinds.count("ConfigMap") == 1, owned


def ask(namespace: str, endpoint: str, model: str) -> tuple[int, str]:
    """POST /v1/chat/completions from the client pod, through the Service's DNS name."""
    script = (
        "import json, sys, urllib.error, urllib.request\n"
        "body = json.dumps({'model': sys.argv[2], 'max_tokens': 16, 'temperature': 0,"
        " 'messages': [{'role': 'user', 'content': sys.argv[3]}]}).encode()\n"
        "base = sys.argv[1].rstrip('/')\n"
        "url = (base if base.endswith('/v1') else base + '/v1') + '/chat/completions'\n"
        "request = urllib.request.Request(url, body, {'Content-Type': 'application/json'})\n"
        "try:\n"
        "    reply = urllib.request.urlopen(request, timeout=120)\n"
        "    print(reply.status, json.load(reply)['choices'][0]['message']['content'])\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code, error.read().decode()[:200])\n"
    )
    out = kubectl(
        "exec", "-n", namespace, "client", "--", "python3", "-c", script, endpoint, model, QUESTION, timeout=180
    ).strip()
    code, _, text = out.partition(" ")
    return int(code), " ".join(text.split())


@pytest.fixture(scope="module")
def serving(trained, stages):
    namespace = trained[0]
    doc = documents()["AdapterDeployment"]
    with stages.run("first answer: AdapterDeployment (fromJob) Available, asked through its Service"):
        apply(doc, namespace)
        client = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client"},
            "spec": {
                "containers": [
                    {
                        "name": "client",
                        "image": get("deployment", namespace=None, label=OPERATOR)[0]["spec"]["template"]["spec"][
                            "containers"
                        ][0]["image"],
                        "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        }
        apply(client, namespace)

        def available():
            obj = get("adapterdeployment", DEPLOYMENT, namespace) or {}
            conditions = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
            return obj if conditions.get("Available") == "True" else None

        obj = wait_for("the AdapterDeployment to be Available", available, 600, 2)
        wait_for(
            "the client pod",
            lambda: (get("pod", "client", namespace) or {}).get("status", {}).get("phase") == "Running",
            120,
        )
        endpoint = obj["status"]["endpoint"]
        code, answer = ask(namespace, endpoint, "support")
        stages.say(f"   Q: {QUESTION}  A (support, via {endpoint}): {answer}")
    return namespace, obj, endpoint, code, answer


def test_the_adapter_answers_through_the_service(serving):
    namespace, obj, endpoint, code, answer = serving
    assert endpoint.startswith(f"http://{DEPLOYMENT}.{namespace}.svc"), endpoint
    assert code == 200, answer
    assert answer.startswith(TRAINED_ANSWER), answer
    states = {a["name"]: a["state"] for a in obj["status"]["adapters"]}
    assert states == {"support": "Loaded"}, obj["status"]["adapters"]


def serving_pods(namespace: str) -> dict[str, int]:
    pods = get("pods", namespace=namespace, label=f"kubetune.io/adapterdeployment={DEPLOYMENT}")
    pods = [pod for pod in pods if pod["metadata"]["name"] != "client"]
    return {
        pod["metadata"]["uid"]: sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses") or [])
        for pod in pods
    }


def test_a_second_adapter_is_hot_loaded_and_unloaded_without_a_restart(serving, stages):
    namespace, _, endpoint, _, _ = serving
    before = serving_pods(namespace)
    assert before, "no serving pods found"
    doc = documents()["AdapterDeployment"]
    second = {"name": "support-copy", "uri": f"pvc://{CLAIM}/adapters/{JOB}/adapter"}
    doc["spec"]["adapters"].append(second)

    def states():
        obj = get("adapterdeployment", DEPLOYMENT, namespace) or {}
        return {a["name"]: a["state"] for a in (obj.get("status") or {}).get("adapters") or []}

    with stages.run("hot swap: a second adapter added to the spec, then removed"):
        apply(doc, namespace)
        wait_for("support-copy Loaded", lambda: states() == {"support": "Loaded", "support-copy": "Loaded"}, 300, 1)
        code, answer = ask(namespace, endpoint, "support-copy")
        stages.say(f"   A (support-copy): {answer}")
        assert code == 200 and answer.startswith(TRAINED_ANSWER), answer
        assert serving_pods(namespace) == before, "a serving pod was replaced or restarted"

        doc["spec"]["adapters"].remove(second)
        apply(doc, namespace)
        wait_for("support-copy gone from status", lambda: states() == {"support": "Loaded"}, 300, 1)
        code, answer = wait_for(
            "support-copy unloaded (404)",
            lambda: (r := ask(namespace, endpoint, "support-copy"))[0] == 404 and r,
            120,
            2,
        )
        assert serving_pods(namespace) == before, "a serving pod was replaced or restarted"
    assert ask(namespace, endpoint, "support")[1].startswith(TRAINED_ANSWER)


def test_a_malformed_dataset_fails_fast_without_retries(data, stages, tmp_path):
    namespace = data
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nthis line is not JSON\n')
    doc = documents()["FineTuneJob"]
    doc["metadata"]["name"] = "broken-data"
    doc["spec"]["dataset"]["uri"] = f"pvc://{CLAIM}/datasets/broken.jsonl"
    doc["spec"]["resources"]["nodes"] = 1
    doc["spec"]["output"]["uri"] = f"pvc://{CLAIM}/adapters/broken-data"
    with stages.run("a malformed dataset: Failed with the trainer's reason"):
        upload(broken, f"pvc://{CLAIM}/datasets/broken.jsonl", namespace)
        apply(doc, namespace)

        def failed():
            obj = ftj(namespace, "broken-data")
            return obj if phase(obj) == "Failed" else None

        obj = wait_for("Failed", failed, 300, 1)
    condition = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    stages.say(f"   Failed: reason={condition['reason']} message={condition['message'][:160]}")
    assert condition["reason"] == "InvalidInput", condition  # the trainer's reason, not the Job's
    assert "broken.jsonl" in condition["message"] or "line 2" in condition["message"], condition
    pods = job_pods(namespace, "broken-data")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]  # no retry


def test_deleting_everything_leaves_nothing_owned_behind(trained, serving, stages):
    namespace = trained[0]
    uids = {
        "finetunejob": [o["metadata"]["uid"] for o in get("finetunejobs", namespace=namespace)],
        "adapterdeployment": [o["metadata"]["uid"] for o in get("adapterdeployments", namespace=namespace)],
    }
    with stages.run("delete: FineTuneJobs and AdapterDeployments, owned objects garbage-collected"):
        kubectl("delete", "finetunejobs,adapterdeployments", "--all", "-n", namespace, "--wait=true", timeout=300)
        wait_for(
            "owned objects to be gone",
            lambda: not [name for uid in sum(uids.values(), []) for name in owned_by(uid, namespace)],
            300,
            2,
        )
