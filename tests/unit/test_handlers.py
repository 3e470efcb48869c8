"""The kopf wiring, without a cluster: no handler makes kopf add a finalizer (a FineTuneJob must
always be deletable, operator running or not), kopf keeps its state in our own annotations,
`kubetune operator` watches what it is told to, and the kinds' indices feed the resync loop."""

import ast
import inspect
from pathlib import Path

import kopf

import kubetune_operator
from kubetune_operator import k8s
from kubetune_operator.adapterdeployment import handlers as adh
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import handlers as ftjh
from kubetune_operator.finetunejob.reconcile import reconcile_finetunejob
from kubetune_operator.handlers import KOPF_PREFIX, REGISTRY, RESYNCED, configure
from kubetune_operator.main import Options, watched_namespaces
from kubetune_operator.state import OperatorState

REPO = Path(__file__).resolve().parents[2]


def all_handlers():
    return [
        *REGISTRY._changing._handlers,
        *REGISTRY._watching._handlers,
        *REGISTRY._spawning._handlers,
        *REGISTRY._indexing._handlers,
    ]


def test_no_handler_requires_a_finalizer():
    assert not REGISTRY._spawning._handlers, "kopf timers and daemons put a finalizer on every object they watch"
    assert all(not getattr(h, "requires_finalizer", False) for h in all_handlers())
    assert not [h for h in REGISTRY._changing._handlers if h.reason == kopf.Reason.DELETE]


def test_the_finetunejob_handlers():
    ids = {h.id for h in REGISTRY._changing._handlers}
    assert {"admit_finetunejob", "suspend_changed/spec.runPolicy.suspend"} <= ids
    assert {"limits_changed/spec.runPolicy.activeDeadlineSeconds", "workload_changed/spec.resources"} <= ids
    watched = {(h.selector.group, h.selector.any_name) for h in REGISTRY._watching._handlers}
    assert watched == {("batch", "jobs"), ("", "pods")}


def test_both_kinds_are_indexed_for_the_resync_loop():
    indexed = {(h.id, h.selector.group, h.selector.any_name) for h in REGISTRY._indexing._handlers}
    assert indexed == {
        ("finetunejobs", "kubetune.io", "finetunejobs"),
        ("adapterdeployments", "kubetune.io", "adapterdeployments"),
    }
    assert {part.index for part in RESYNCED} == {h.id for h in REGISTRY._indexing._handlers}
    ad_ids = {h.id for h in REGISTRY._changing._handlers if h.selector.any_name == "adapterdeployments"}
    assert ad_ids == {"adapterdeployment_changed", "adapterdeployment_changed/spec"}


def test_kopf_state_lives_in_our_annotations():
    settings = kopf.OperatorSettings()
    configure(settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.persistence.progress_storage.prefix == KOPF_PREFIX


def test_kopf_waits_for_its_own_patch_under_load_and_runs_few_handler_threads():
    """kopf's default 5 s wait for the event showing its own annotations is shorter than the watch
    stream's lag with hundreds of jobs applied at once: the creation then ran twice for half of
    them (308 creations for 200 jobs, measured by bench/operator_scale.py)."""
    settings = kopf.OperatorSettings()
    configure(settings)
    assert settings.persistence.consistency_timeout >= 30
    assert settings.execution.max_workers <= 8


def test_child_events_are_handled_in_the_event_loop_not_in_handler_threads():
    """A Job's or a pod's event only asks the runner for a refresh (coalesced per FineTuneJob), so
    a storm of them never occupies the threads the admissions run in."""
    watching = {h.selector.any_name: h for h in REGISTRY._watching._handlers}
    for plural in ("jobs", "pods"):
        assert inspect.iscoroutinefunction(watching[plural].fn), plural


def test_namespaces_from_flags_else_configuration_else_all():
    config = OperatorConfig(namespaces=("ml",))
    assert watched_namespaces(Options(namespaces=("a", "b")), config) == ("a", "b")
    assert watched_namespaces(Options(), config) == ("ml",)
    assert watched_namespaces(Options(), OperatorConfig()) == ()


def test_the_finetunejob_index_feeds_the_resync_loop():
    """kopf keeps the index (and drops a deleted object's entries); a dict of key → entries stands
    in for it here."""
    running = ftjh.finetunejobs(
        namespace="ml", name="a", spec={"resources": {"nodes": 2, "gpusPerNode": 4}}, status={"phase": "Running"}
    )
    done = ftjh.finetunejobs(namespace="ml", name="b", spec={}, status={"phase": "Succeeded"})
    new = ftjh.finetunejobs(namespace="ml", name="c", spec={}, status={})
    index = {key: [entry] for entry in (running, done, new) for key, entry in entry.items()}
    assert [(key, e.phase, e.gpus) for key, [e] in index.items()] == [
        (("ml", "a"), "Running", 8),
        (("ml", "b"), "Succeeded", 1),
        (("ml", "c"), "Pending", 1),
    ]
    admitted = ftjh.finetunejobs(namespace="ml", name="d", spec={}, status={"phase": "Admitted"})
    index.update({key: [entry] for key, entry in admitted.items()})
    # Finished jobs need nothing; one still Pending is the create handler's (no status to derive yet).
    assert ftjh.due(index) == [("ml", "a"), ("ml", "d")]
    del index[("ml", "a")]  # deleted
    assert ftjh.due(index) == [("ml", "d")]
    assert ftjh.needs_poll(index, ("ml", "d")) is False  # Admitted: its events tell what changes
    index[("ml", "a")] = [running[("ml", "a")]]
    assert ftjh.needs_poll(index, ("ml", "a")) is True  # Running: rank 0's metrics are polled


def test_the_adapterdeployment_index_lists_every_one_and_gone_ones_are_forgotten():
    index = {**adh.adapterdeployments(namespace="ml", name="b"), **adh.adapterdeployments(namespace="ml", name="a")}
    assert adh.due(index) == [("ml", "a"), ("ml", "b")]
    state = OperatorState(OperatorConfig(), client=None)  # type: ignore[arg-type]
    state.refused_loads = {("ml", "a"): {"pod": {"x": ("s3://b/x", "no")}}, ("ml", "gone"): {}}
    adh.tick(state, index, 1.0)
    assert list(state.refused_loads) == [("ml", "a")]


def test_no_import_cycles_and_pure_modules_import_no_clients():
    """Module-level imports inside the package form no cycle, and the pure modules import neither
    kopf nor kubernetes nor httpx."""
    root = Path(kubetune_operator.__file__).parent
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]  # what `from .` means in this module
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name], external[name] = set(), set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                graph[name].add(target)
                graph[name].update(f"{target}.{alias.name}" if target else alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                external[name].add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                external[name].update(alias.name.split(".")[0] for alias in node.names)
    graph = {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}

    def reach(name, seen):
        for dep in graph[name]:
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    assert [name for name in graph if name in reach(name, set())] == []
    pure = ["finetunejob.render", "finetunejob.status", "finetunejob.admission", "finetunejob.jobsync",
            "adapterdeployment.render", "adapterdeployment.status", "adapterdeployment.adapters", "conditions",
            "config", "render_common"]  # fmt: skip
    for name in pure:
        imported = set().union(*(external[m] for m in reach(name, {name})))
        assert not imported & {"kopf", "kubernetes", "httpx", "kubetune_trainer", "kubetune_serve"}, name
    assert not set().union(*external.values()) & {"kubetune_trainer", "kubetune_serve"}


class RecordingClient:
    """Stands in for k8s.Client: records every call; children are stored as applied."""

    def __init__(self, stored: dict | None = None):
        self.calls: list[tuple[str, str]] = []
        self.stored = dict(stored or {})

    def get(self, path):
        self.calls.append(("GET", path))
        return self.stored.get(path)

    def list(self, path, label_selector=""):
        self.calls.append(("LIST", path))
        return []

    def apply(self, obj):
        path = k8s.object_path(obj, obj["metadata"]["name"])
        self.calls.append(("APPLY", path))
        meta = {**obj["metadata"], "uid": f"uid-{obj['kind']}", "resourceVersion": "2"}
        self.stored[path] = {**obj, "metadata": meta}
        return self.stored[path]

    def merge_patch(self, path, body):
        self.calls.append(("PATCH", path))
        return {}

    def post_event(self, involved, type_, reason, message):
        self.calls.append(("EVENT", reason))


def new_job(**status) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "new", "namespace": "ml", "uid": "uid-ftj", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
            "output": {"uri": "s3://adapters/new"},
        },
        **({"status": status} if status else {}),
    }


def test_admitting_a_new_job_reads_nothing_it_was_handed_and_leaves_the_status_to_the_jobs_events():
    """The create handler's body is the job as its creation event showed it: admission writes on
    top of it (a stale one fails the patch with 409 and is read again), and the Job it creates has
    no pods to report yet (its own events ask for the refresh). Before: the job was read again,
    and the Job and its pods read right after creating them, on every one of 200 new jobs."""
    client = RecordingClient()
    state = OperatorState(OperatorConfig(), client=client)  # type: ignore[arg-type]
    body = new_job()
    reconcile_finetunejob(state, "ml", "new", seen=body)
    ftj_path = k8s.kubetune_path("FineTuneJob", "ml", "new")
    verbs = [verb for verb, _ in client.calls]
    assert ("GET", ftj_path) not in client.calls
    assert "LIST" not in verbs
    # ConfigMap, Service, NetworkPolicy and Job applied; the three that may exist are read first
    assert verbs.count("APPLY") == 4 and verbs.count("GET") == 3
    assert client.calls[:2] == [("PATCH", ftj_path + "/status"), ("EVENT", "Admitted")]


def test_an_admitted_job_is_read_afresh_and_its_status_refreshed():
    """Any job the operator admitted before (a resume, a spec change) is read again rather than
    trusted from the event, and its existing Job's status is derived at once."""
    admitted = {"conditions": [{"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""}]}
    stored = new_job(**admitted)
    ftj_path = k8s.kubetune_path("FineTuneJob", "ml", "new")
    job_path = k8s.resource_path("batch/v1", "Job", "ml", "new")
    owner = [{"kind": "FineTuneJob", "uid": "uid-ftj", "controller": True, "name": "new"}]
    meta = {"name": "new", "namespace": "ml", "uid": "uid-job", "ownerReferences": owner, "resourceVersion": "5"}
    workload = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {}, "status": {}}
    client = RecordingClient({ftj_path: stored, job_path: workload})
    state = OperatorState(OperatorConfig(), client=client)  # type: ignore[arg-type]
    reconcile_finetunejob(state, "ml", "new", seen=new_job(**admitted))
    assert client.calls[0] == ("GET", ftj_path)
    assert ("LIST", k8s.pods_path("ml")) in client.calls
