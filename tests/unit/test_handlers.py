"""The kopf wiring, without a cluster: no handler makes kopf add a finalizer (a FineTuneJob must
always be deletable, operator running or not), kopf keeps its state in our own annotations, and
`kubetune operator` watches what it is told to."""

import kopf

from kubetune_operator.config import OperatorConfig
from kubetune_operator.handlers import REGISTRY
from kubetune_operator.handlers.main import Options, watched_namespaces
from kubetune_operator.handlers.runtime import KOPF_PREFIX, Tracker, configure


def all_handlers():
    return [*REGISTRY._changing._handlers, *REGISTRY._watching._handlers, *REGISTRY._spawning._handlers]


def test_no_handler_requires_a_finalizer():
    assert not REGISTRY._spawning._handlers, "kopf timers and daemons put a finalizer on every object they watch"
    assert all(not getattr(h, "requires_finalizer", False) for h in all_handlers())
    assert not [h for h in REGISTRY._changing._handlers if h.reason == kopf.Reason.DELETE]


def test_the_finetunejob_handlers():
    ids = {h.id for h in REGISTRY._changing._handlers}
    assert {"admit_finetunejob", "suspend_changed/spec.runPolicy.suspend"} <= ids
    assert {"limits_changed/spec.runPolicy.activeDeadlineSeconds", "workload_changed/spec.resources"} <= ids
    watched = {(h.selector.group, h.selector.any_name) for h in REGISTRY._watching._handlers}
    assert watched == {("kubetune.io", "finetunejobs"), ("batch", "jobs"), ("", "pods")}


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


def test_tracker_feeds_the_resync_loop():
    tracker = Tracker()
    body = {"metadata": {"namespace": "ml", "name": "a"}, "spec": {"resources": {"nodes": 2, "gpusPerNode": 4}},
            "status": {"phase": "Running"}}  # fmt: skip
    tracker.observe(None, body)
    done = {"metadata": {"namespace": "ml", "name": "b"}, "spec": {}, "status": {"phase": "Succeeded"}}
    tracker.observe("ADDED", done)
    assert [(j.name, j.phase, j.gpus) for j in tracker.unfinished()] == [("a", "Running", 8)]
    tracker.observe("DELETED", body)
    assert tracker.unfinished() == []
