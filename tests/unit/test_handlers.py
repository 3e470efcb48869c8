"""The kopf wiring, without a cluster: no handler makes kopf add a finalizer (a FineTuneJob must
always be deletable, operator running or not), kopf keeps its state in our own annotations,
`kubetune operator` watches what it is told to, and the kinds' indices feed the resync loop."""

import ast
from pathlib import Path

import kopf

import kubetune_operator
from kubetune_operator.adapterdeployment import handlers as adh
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import handlers as ftjh
from kubetune_operator.handlers import KOPF_PREFIX, REGISTRY, RESYNCED, configure
from kubetune_operator.main import Options, watched_namespaces
from kubetune_operator.state import OperatorState


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
    assert ftjh.due(index) == [("ml", "a"), ("ml", "c")]
    del index[("ml", "a")]  # deleted
    assert ftjh.due(index) == [("ml", "c")]


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
