"""The GitOps health checks in helm/kubetune/health/: Argo CD's Lua scripts and Flux's CEL
expressions, run against the same recorded statuses, and the argocd-cm snippet that ships the Lua.

Statuses come from the operator's own derivation functions (finetunejob/status.py,
adapterdeployment/status.py), so a change in what the operator writes that a check does not
follow shows up here. Each check runs the way its tool runs it:

* Argo CD runs a health script in gopher-lua (Lua 5.1) with the object as the global `obj`, JSON
  numbers as floats, and reads `status` and `message` of the table the script returns. Here: the
  Lua 5.1 runtime of lupa, the object converted the same way.
* Flux binds the object's top-level fields (metadata, spec, status) as CEL variables and evaluates
  inProgress, failed, current in that order; the first true one decides, none means in progress.
"""

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cel
import lupa.lua51 as lua51
import pytest
import yaml

from kubetune.api import FineTuneJob
from kubetune_operator import conditions as c
from kubetune_operator.adapterdeployment.adapters import Replica, Wanted
from kubetune_operator.adapterdeployment.status import Observed, derive_status, refused_status
from kubetune_operator.finetunejob import status as s

HEALTH = Path(__file__).resolve().parents[2] / "helm" / "kubetune" / "health"
GROUP, VERSION = "kubetune.io", "v1alpha1"
ARGO_STATES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
OUTPUT = "s3://adapters/support-bot"


# --- running the checks as Argo CD and Flux do ---------------------------------------------------


def as_json_numbers(value: Any) -> Any:
    """The object as Argo CD hands it to Lua: decoded from JSON, every number a float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: as_json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json_numbers(v) for v in value]
    return value


def argo_health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(hs.status, hs.message) of the kind's health.lua, with `obj` a global as Argo CD sets it."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(as_json_numbers(json.loads(json.dumps(obj))), recursive=True)
    hs = lua.execute((HEALTH / f"{kind.lower()}.lua").read_text())
    return hs["status"], hs["message"]


def flux_exprs() -> dict[str, dict[str, str]]:
    return {entry["kind"]: entry for entry in yaml.safe_load((HEALTH / "flux.yaml").read_text())}


def flux_health(kind: str, obj: dict[str, Any]) -> str:
    """Current, Failed or InProgress, as kustomize-controller decides from healthCheckExprs."""
    exprs = flux_exprs()[kind]
    variables = {k: v for k, v in obj.items() if k in ("metadata", "spec", "status")}
    for field, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if field in exprs and cel.evaluate(exprs[field], variables) is True:
            return result
    return "InProgress"


def wrap(kind: str, status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": "support-bot", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


# --- recorded FineTuneJob statuses, from the operator's own derivation ----------------------------


def ftj(generation: int = 1, suspend: bool = False, queue: str | None = None) -> FineTuneJob:
    policy = {"suspend": suspend, **({"queueName": queue} if queue else {})}
    return FineTuneJob.model_validate({
        "metadata": {"name": "support-bot", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "s3://data/chat.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 100, "globalBatchSize": 8},
            "output": {"uri": OUTPUT},
            "runPolicy": policy,
        },
    })  # fmt: skip


def workload(suspend: bool = False, conditions: tuple = (), **status: Any) -> dict[str, Any]:
    spec = {"parallelism": 2, "completions": 2, "suspend": suspend}
    job_status = {"failed": 0, "conditions": list(conditions), "startTime": "2026-01-02T03:00:00Z", **status}
    return {"metadata": {"name": "support-bot", "uid": "j-1"}, "spec": spec, "status": job_status}


def pod(name: str, phase: str = "Running", index: str = "0", terminated: dict | None = None) -> dict[str, Any]:
    meta = {"name": name, "creationTimestamp": "2026-01-02T03:00:01Z", "annotations": {s.COMPLETION_INDEX: index}}
    status: dict[str, Any] = {"phase": phase, "conditions": [], "podIP": "10.0.0.7"}
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": meta, "status": status}


def derive(current, job=None, wl=None, pods=(), now=T1):
    return s.derive_status(current, s.Context(job or ftj(), wl, list(pods), now))


def admitted() -> dict[str, Any]:
    return s.apply_admission({}, True, "Admitted", "plan fits: 2 ranks of 1 GPU", {"worldSize": 2}, 1, T0)


def refused(reason: str, message: str) -> dict[str, Any]:
    return s.apply_admission({}, False, reason, message, None, 1, T0)


def ftj_pods_pending() -> dict[str, Any]:
    return derive(admitted(), wl=workload(), pods=[])


def ftj_running() -> dict[str, Any]:
    st = derive(admitted(), wl=workload(active=2), pods=[pod("sb-0"), pod("sb-1", index="1")])
    st["progress"] = {"step": 42, "totalSteps": 100, "percent": 42}
    return st


def ftj_succeeded() -> dict[str, Any]:
    done = pod("sb-0", phase="Succeeded", terminated={"exitCode": 0, "reason": "Completed", "message": ""})
    wl = workload(conditions=({"type": "Complete", "status": "True", "reason": "", "message": ""},), succeeded=2,
                  completionTime="2026-01-02T04:00:00Z")  # fmt: skip
    return derive(ftj_running(), wl=wl, pods=[done])


def ftj_backoff_limit() -> dict[str, Any]:
    crash = {"exitCode": 1, "reason": "Error", "message": "CUDA error: an illegal memory access",
             "finishedAt": "2026-01-02T03:20:00Z"}  # fmt: skip
    because = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
               "message": "Job has reached the specified backoff limit"}  # fmt: skip
    return derive(admitted(), wl=workload(conditions=(because,), failed=3), pods=[pod("sb-0", "Failed", "0", crash)])


def ftj_suspended() -> dict[str, Any]:
    return derive(ftj_running(), job=ftj(suspend=True), wl=workload(suspend=True), pods=[])


def ftj_queued() -> dict[str, Any]:
    return derive(admitted(), job=ftj(queue="gpus"), wl=workload(suspend=True), pods=[])


def ftj_stuck() -> dict[str, Any]:
    """A pod the kubelet cannot start: the image cannot be pulled (Running reason, Stalled=True)."""
    stuck = pod("sb-0", phase="Pending")
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.local/trainer:typo"'}
    stuck["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    return derive(admitted(), wl=workload(), pods=[stuck])


def ftj_generation_behind() -> dict[str, Any]:
    return ftj_running()  # observedGeneration 1, the object below is at generation 2


FINETUNEJOB_CASES = [
    # name, status, metadata.generation, Argo CD status, message fragment, Flux status
    ("fresh, no status yet", None, 1, "Progressing", "waiting for the operator", None),
    ("pods pending", ftj_pods_pending(), 1, "Progressing", "Admitted; 0/2 pods running", "InProgress"),
    ("running", ftj_running(), 1, "Progressing", "Running; 42% done; 2/2 pods running", "InProgress"),
    ("queued in Kueue", ftj_queued(), 1, "Progressing", "Queued: waiting for Kueue", "InProgress"),
    ("suspended", ftj_suspended(), 1, "Suspended", "Suspended: spec.runPolicy.suspend is true", "InProgress"),
    ("succeeded", ftj_succeeded(), 1, "Healthy", "Completed", "Current"),
    ("succeeded, spec edited after", ftj_succeeded(), 2, "Healthy", "Completed", "Current"),
    ("failed: InvalidSpec", refused("InvalidSpec", "spec.dataset.uri: scheme ftp is not allowed\nsee docs"), 1,
     "Degraded", "InvalidSpec: spec.dataset.uri: scheme ftp is not allowed", "Failed"),
    ("failed at admission: InsufficientGpuMemory",
     refused("InsufficientGpuMemory", "needs 61.2 GiB per GPU, nvidia.com/gpu nodes have 40 GiB"), 1,
     "Degraded", "InsufficientGpuMemory: needs 61.2 GiB per GPU", "Failed"),
    ("failed: BackoffLimitExceeded", ftj_backoff_limit(), 1, "Degraded", "BackoffLimitExceeded:", "Failed"),
    ("stuck: image pull", ftj_stuck(), 1, "Degraded", "ImagePullBackOff: 0/2 pods running; pod sb-0", "Failed"),
    ("generation behind", ftj_generation_behind(), 2, "Progressing", "observe generation 2 (status is for 1)",
     "InProgress"),
]  # fmt: skip


# --- recorded AdapterDeployment statuses ------------------------------------------------------------


def observed(wanted, replicas, want=1, ready=1, updated=None, existing=None) -> Observed:
    updated = want if updated is None else updated
    existing = want if existing is None else existing
    return Observed("support", "ml", 8000, 1, want, existing, ready, updated, True, wanted, replicas, T0)


def loaded(name: str, **adapters: str) -> Replica:
    return Replica(name, f"http://{name}:8000", loaded=dict(adapters))


A, B = Wanted("a", "s3://adapters/a"), Wanted("b", "s3://adapters/b")
REJECTION = "evalLoss 1.92 > 1.5 (require evalLoss <= 1.5)"

AD_AVAILABLE = derive_status({}, observed([A, B], [loaded("p0", a=A.uri, b=B.uri), loaded("p1", a=A.uri, b=B.uri)],
                                          want=2, ready=2))  # fmt: skip
AD_ROLLOUT = derive_status({}, observed([A], [loaded("p0", a=A.uri)], want=2, ready=1, updated=1))
AD_LOADING = derive_status({}, observed([A, B], [loaded("p0", a=A.uri, b=B.uri), loaded("p1", a=A.uri)], 2, 2))
AD_WAITING_FOR_JOB = derive_status(
    {}, observed([Wanted("a", pending="FineTuneJob support-bot is Running", reason="WaitingForJob")], [loaded("p0")])
)
AD_UNREACHABLE = derive_status({}, observed([A], [Replica("p0", "http://p0:8000", error="connection refused")]))
AD_NOT_ALLOWED = refused_status({}, 1, "image evil.example/serve:1 is not allowed by the operator", T0)
AD_REJECTED = derive_status({}, observed([A, Wanted("b", rejected=REJECTION)], [loaded("p0", a=A.uri)]))
AD_FAILED = derive_status(
    {}, observed([A], [Replica("p0", "http://p0:8000", loaded={}, failed={"a": (A.uri, "adapter rank 128 > 64")})])
)

ADAPTERDEPLOYMENT_CASES = [
    ("available, every adapter loaded", AD_AVAILABLE, 1, "Healthy", "2 of 2 replicas ready; adapters 2/2 loaded",
     "Current"),
    ("rollout", AD_ROLLOUT, 1, "Progressing", "ReplicasUpdating: 1 of 2 replicas ready", "InProgress"),
    ("adapters loading", AD_LOADING, 1, "Progressing", "AdaptersChanging: loading or unloading: b", "InProgress"),
    ("waiting for its FineTuneJob", AD_WAITING_FOR_JOB, 1, "Progressing", "WaitingForJob: 0/1 loaded",
     "InProgress"),
    ("degraded: replica unreachable", AD_UNREACHABLE, 1, "Degraded", "ReplicaUnreachable: p0: connection refused",
     "Failed"),
    ("degraded: image not allowed", AD_NOT_ALLOWED, 1, "Degraded", "NotAllowed: image evil.example", "Failed"),
    ("an adapter rejected", AD_REJECTED, 1, "Degraded", f"adapter b is Rejected: {REJECTION}", "Failed"),
    ("an adapter failed", AD_FAILED, 1, "Degraded", "AdapterFailed: a: adapter rank 128 > 64", "Failed"),
    ("generation behind", AD_AVAILABLE, 2, "Progressing", "observe generation 2 (status is for 1)", "InProgress"),
    ("degraded, generation behind", AD_UNREACHABLE, 2, "Progressing", "observe generation 2", "InProgress"),
]  # fmt: skip


def case_ids(cases):
    return [case[0] for case in cases]


# --- the table tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "status", "generation", "argo", "fragment", "flux"),
    [("FineTuneJob", *case) for case in FINETUNEJOB_CASES]
    + [("AdapterDeployment", *case) for case in ADAPTERDEPLOYMENT_CASES],
    ids=[f"FineTuneJob-{n}" for n in case_ids(FINETUNEJOB_CASES)]
    + [f"AdapterDeployment-{n}" for n in case_ids(ADAPTERDEPLOYMENT_CASES)],
)
def test_argo_cd_and_flux_read_the_recorded_status(kind, name, status, generation, argo, fragment, flux):
    obj = wrap(kind, copy.deepcopy(status), generation)
    state, message = argo_health(kind, obj)
    assert state in ARGO_STATES
    assert (state, fragment in message) == (argo, True), f"{name}: {state}: {message!r}"
    assert "\n" not in message and 0 < len(message) <= 256
    if flux is None:  # no status at all: Flux cannot evaluate `status` and keeps waiting (in progress)
        with pytest.raises(RuntimeError, match="status"):
            flux_health(kind, obj)
    else:
        assert flux_health(kind, obj) == flux, name


def test_the_recorded_statuses_are_what_the_cases_say():
    """The derivations produce the conditions the cases are named after (else the table tests
    would test something else than they claim)."""

    def reason(status, type_):
        condition = c.find(status["conditions"], type_)
        return condition["status"], condition["reason"]

    assert ftj_running()["phase"] == "Running" and ftj_pods_pending()["phase"] == "Admitted"
    assert reason(ftj_queued(), c.SUSPENDED) == ("True", "Queued")
    assert reason(ftj_suspended(), c.SUSPENDED) == ("True", "Suspended")
    assert ftj_succeeded()["phase"] == "Succeeded" and ftj_backoff_limit()["phase"] == "Failed"
    assert reason(ftj_backoff_limit(), c.FAILED) == ("True", "BackoffLimitExceeded")
    assert reason(refused("InsufficientGpuMemory", "x"), c.ADMITTED) == ("False", "InsufficientGpuMemory")
    assert reason(AD_REJECTED, "Degraded") == ("False", "Healthy")  # the operator does not call it Degraded
    assert reason(AD_REJECTED, "AdaptersReady") == ("False", "AdapterRejected")
    assert [a["state"] for a in AD_FAILED["adapters"]] == ["Failed"]
    assert reason(AD_ROLLOUT, "Available") == ("True", "ReplicasReady")
    assert reason(AD_LOADING, "Progressing") == ("True", "AdaptersChanging")


def test_a_long_multiline_message_becomes_one_clipped_line():
    status = refused("InvalidSpec", "x" * 5000 + "\nsecond line")
    state, message = argo_health("FineTuneJob", wrap("FineTuneJob", status))
    assert state == "Degraded" and len(message) == 256 and message.endswith("...")


def test_what_the_status_subresource_could_hold_does_not_break_the_scripts():
    """Anyone with access to the status subresource can write odd shapes: the scripts still answer."""
    for kind in ("FineTuneJob", "AdapterDeployment"):
        for status in ({}, {"conditions": "nonsense"}, {"conditions": [1, "x", {"type": "Failed"}]},
                       {"adapters": ["x", {"name": "a"}]}):  # fmt: skip
            state, _ = argo_health(kind, wrap(kind, status))
            assert state == "Progressing", (kind, status)


# --- what ships -------------------------------------------------------------------------------------


def test_the_argocd_cm_snippet_embeds_exactly_the_lua_files():
    snippet = yaml.safe_load((HEALTH / "argocd-cm.yaml").read_text())
    assert (snippet["apiVersion"], snippet["kind"], snippet["metadata"]["name"]) == ("v1", "ConfigMap", "argocd-cm")
    expected = {
        f"resource.customizations.health.{GROUP}_{kind}": (HEALTH / f"{kind.lower()}.lua").read_text()
        for kind in ("FineTuneJob", "AdapterDeployment")
    }
    assert snippet["data"] == expected, "argocd-cm.yaml drifted from the .lua files beside it: copy them in again"


def test_the_flux_snippet_names_the_served_kinds_and_only_fields_flux_knows():
    entries = yaml.safe_load((HEALTH / "flux.yaml").read_text())
    assert [(e["apiVersion"], e["kind"]) for e in entries] == [
        (f"{GROUP}/{VERSION}", "FineTuneJob"),
        (f"{GROUP}/{VERSION}", "AdapterDeployment"),
    ]
    for entry in entries:
        assert set(entry) <= {"apiVersion", "kind", "current", "inProgress", "failed"} and entry["current"]
    crds = Path(__file__).resolve().parents[2] / "helm" / "kubetune" / "crds"
    for kind in ("finetunejobs", "adapterdeployments"):
        crd = yaml.safe_load((crds / f"{GROUP}_{kind}.yaml").read_text())
        assert crd["spec"]["group"] == GROUP
        assert VERSION in [v["name"] for v in crd["spec"]["versions"] if v.get("served")]


def test_the_readme_kustomization_waits_with_the_shipped_expressions():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## GitOps\n", 1)[1].split("\n## ", 1)[0]
    blocks = [yaml.safe_load(b.split("```", 1)[0]) for b in section.split("```yaml\n")[1:]]
    kustomization = next(b for b in blocks if b["kind"] == "Kustomization")
    assert kustomization["spec"]["wait"] is True

    def normal(entry):
        return {k: " ".join(v.split()) for k, v in entry.items()}

    shipped = [normal(e) for e in yaml.safe_load((HEALTH / "flux.yaml").read_text())]
    for entry in kustomization["spec"]["healthCheckExprs"]:
        assert normal(entry) in shipped, entry["kind"]
