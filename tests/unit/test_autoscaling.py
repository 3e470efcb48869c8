"""Scaling an AdapterDeployment: the `scale` subresource of its CRD (from the model), the
`spec.autoscaling` block and its rule, the HorizontalPodAutoscaler and PodDisruptionBudget the
renderer makes, the status fields /scale reads, and a reconcile (against a stand-in API server) that
applies them, deletes them when they no longer apply, and never writes spec.replicas."""

import copy
from datetime import UTC, datetime

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import crdgen
from kubetune.api.adapterdeployment import IN_FLIGHT_METRIC, AdapterDeployment
from kubetune.api.kinds import ADAPTERDEPLOYMENT, FINETUNEJOB
from kubetune_operator import k8s
from kubetune_operator.adapterdeployment import reconcile as rec
from kubetune_operator.adapterdeployment.render import (
    label_selector,
    render_adapterdeployment,
    render_autoscaler,
    render_disruption_budget,
)
from kubetune_operator.adapterdeployment.status import Observed, derive_status
from kubetune_operator.config import OperatorConfig
from kubetune_operator.state import OperatorState
from tests.examples import REPO

CONFIG = OperatorConfig()
NS, NAME, UID = "ml", "support", "u-1"


def make(**spec) -> AdapterDeployment:
    wire = {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}, **spec}
    return AdapterDeployment.model_validate({"metadata": {"name": NAME, "namespace": NS, "uid": UID}, "spec": wire})


# --- the CRD and the model -----------------------------------------------------------------------


def version(info):
    text = (REPO / "crds" / crdgen.file_name(info)).read_text()
    return yaml.safe_load(text)["spec"]["versions"][0]


def test_the_crd_has_the_scale_subresource_the_model_declares():
    assert version(ADAPTERDEPLOYMENT)["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    assert version(FINETUNEJOB)["subresources"] == {"status": {}}  # nothing declared: no scale


@pytest.mark.parametrize("path", [".spec.replicas", ".status.replicas", ".status.selector"])
def test_every_scale_path_names_a_field_of_the_schema(path):
    """A renamed field would leave /scale pointing at nothing; the API server would not notice."""
    node = version(ADAPTERDEPLOYMENT)["schema"]["openAPIV3Schema"]
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    assert node["type"] == ("string" if path.endswith("selector") else "integer")


def test_autoscaling_bounds_and_the_min_max_rule_in_python_and_cel():
    ok = make(autoscaling={"maxReplicas": 4})
    assert ok.spec.autoscaling is not None
    assert (ok.spec.autoscaling.min_replicas, ok.spec.autoscaling.target_in_flight_requests) == (1, 8)
    with pytest.raises(ValidationError, match="autoscaling.minReplicas must not exceed maxReplicas"):
        make(autoscaling={"minReplicas": 5, "maxReplicas": 4})
    for bad in ({"minReplicas": 0, "maxReplicas": 4}, {"maxReplicas": 257}, {"maxReplicas": 4,
                "targetInFlightRequests": 0}, {"minReplicas": 2}):  # fmt: skip
        with pytest.raises(ValidationError):
            make(autoscaling=bad)
    spec = version(ADAPTERDEPLOYMENT)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    block = spec["autoscaling"]
    assert block["x-kubernetes-validations"] == [
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "autoscaling.minReplicas must not exceed maxReplicas",
        }
    ]
    assert block["properties"]["maxReplicas"]["maximum"] == 256 and block["properties"]["minReplicas"]["minimum"] == 1
    assert "HorizontalPodAutoscaler owns this field" in spec["replicas"]["description"]


# --- rendering -----------------------------------------------------------------------------------


def test_the_autoscaler_targets_the_adapterdeployment_on_the_in_flight_gauge():
    objects = render_adapterdeployment(
        make(replicas=3, autoscaling={"minReplicas": 2, "maxReplicas": 10, "targetInFlightRequests": 4}), CONFIG
    )
    hpa = objects.autoscaler
    assert hpa is not None and (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == NAME and hpa["metadata"]["namespace"] == NS
    [ref] = hpa["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("AdapterDeployment", UID, True)
    assert hpa["metadata"]["labels"] == objects.deployment["metadata"]["labels"]
    spec = hpa["spec"]
    # The AdapterDeployment itself, not its Deployment: the autoscaler writes spec.replicas ...
    assert spec["scaleTargetRef"] == {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "name": NAME}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {"metric": {"name": IN_FLIGHT_METRIC}, "target": {"type": "AverageValue", "averageValue": "4"}},
        }
    ]
    # ... and the Deployment keeps following spec.replicas, whatever the autoscaler set it to.
    assert objects.deployment["spec"]["replicas"] == 3
    assert objects.autoscaler in objects.all() and objects.disruption_budget in objects.all()


def test_no_autoscaling_block_no_autoscaler():
    objects = render_adapterdeployment(make(replicas=3), CONFIG)
    assert objects.autoscaler is None and render_autoscaler(make()) is None
    assert [o["kind"] for o in objects.all()].count("HorizontalPodAutoscaler") == 0


@pytest.mark.parametrize(
    ("spec", "wanted"),
    [
        ({"replicas": 1}, False),
        ({"replicas": 0}, False),
        ({"replicas": 2}, True),
        ({"replicas": 1, "autoscaling": {"minReplicas": 1, "maxReplicas": 5}}, False),
        ({"replicas": 1, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, True),
        ({"replicas": 4, "autoscaling": {"minReplicas": 1, "maxReplicas": 5}}, True),  # scaled up by the autoscaler
    ],
)
def test_a_disruption_budget_with_more_than_one_replica(spec, wanted):
    objects = render_adapterdeployment(make(**spec), CONFIG)
    pdb = objects.disruption_budget
    assert (pdb is not None) == wanted
    if pdb is None:
        return
    assert (pdb["apiVersion"], pdb["kind"], pdb["metadata"]["name"]) == ("policy/v1", "PodDisruptionBudget", NAME)
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == UID
    assert pdb["spec"]["maxUnavailable"] == 1  # a drain leaves every replica but one serving
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == objects.deployment["spec"]["selector"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_rendering_is_pure():
    ad = make(replicas=2, autoscaling={"maxReplicas": 3})
    assert render_autoscaler(ad) == render_autoscaler(ad) and render_disruption_budget(ad) == render_disruption_budget(
        ad
    )


# --- the status /scale reads ---------------------------------------------------------------------


def test_status_carries_current_replicas_and_the_pod_selector():
    observed = Observed(
        name=NAME, namespace=NS, port=8000, generation=3, replicas=3, existing=3, ready=1, updated=3,
        deployment_observed=True, wanted=[], replica_views=[], now=datetime.now(UTC),
    )  # fmt: skip
    status = derive_status(None, observed)
    assert status["replicas"] == 3  # pods that exist, ready or not: what /scale reports as current
    selector = "app.kubernetes.io/component=serving,kubetune.io/adapterdeployment=support"
    assert status["selector"] == label_selector(NAME) == selector
    assert status["readyReplicas"] == 0  # no replica has answered with its adapters yet


# --- the reconcile against a stand-in API server -------------------------------------------------

HPA_PATH = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/{NAME}"
PDB_PATH = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{NAME}"


class FakeApi:
    """Objects by path; every write recorded as (method, path). No pods: no replica is called."""

    def __init__(self, spec, forbidden=()):
        self.ad_path = k8s.kubetune_path("AdapterDeployment", NS, NAME)
        self.objects = {self.ad_path: self.body(spec)}
        self.writes: list[tuple[str, str]] = []
        self.forbidden = set(forbidden)

    @staticmethod
    def body(spec):
        wire = {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}, **spec}
        meta = {"name": NAME, "namespace": NS, "uid": UID, "generation": 1, "resourceVersion": "1"}
        return {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": meta, "spec": wire}

    def get(self, path):
        if path in self.forbidden:
            raise k8s.ApiError(403, "Forbidden", "cannot get")
        return copy.deepcopy(self.objects.get(path))

    def list(self, path, label_selector=""):
        return []

    def store(self, path, obj):
        self.writes.append(("PATCH", path))
        self.objects[path] = {**copy.deepcopy(obj), "metadata": {**obj["metadata"], "uid": f"uid-of-{obj['kind']}"}}
        return copy.deepcopy(self.objects[path])

    def apply(self, obj, field_manager=""):
        return self.store(k8s.object_path(obj, obj["metadata"]["name"]), obj)

    def request(self, method, path, body=None, query=None, content_type=""):
        assert method == "PATCH" and content_type == k8s.APPLY_PATCH, (method, path)
        return self.store(path, body)

    def delete(self, path, propagation="Background", uid=None):
        self.writes.append(("DELETE", path))
        assert uid == self.objects[path]["metadata"]["uid"]
        return self.objects.pop(path, None) is not None

    def merge_patch(self, path, body):
        self.writes.append(("MERGE", path))
        assert path == self.ad_path + "/status", path
        ad = self.objects[self.ad_path]
        ad["status"] = {**(ad.get("status") or {}), **body["status"]}
        return ad

    def post_event(self, *args):
        pass

    def set_spec(self, spec):
        ad = self.objects[self.ad_path]
        ad["spec"] = self.body(spec)["spec"]
        ad["metadata"]["generation"] += 1


def run(api):
    rec.reconcile(OperatorState(CONFIG, client=api), (NS, NAME))  # type: ignore[arg-type]


def test_reconcile_applies_the_autoscaler_and_budget_and_deletes_them_when_they_no_longer_apply():
    api = FakeApi({"replicas": 2, "autoscaling": {"minReplicas": 2, "maxReplicas": 6}})
    run(api)
    assert api.objects[HPA_PATH]["spec"]["maxReplicas"] == 6
    assert api.objects[PDB_PATH]["spec"]["maxUnavailable"] == 1
    status = api.objects[api.ad_path]["status"]
    assert status["selector"] == label_selector(NAME)

    # The autoscaler scales to 5 (through /scale: a new spec.replicas): the Deployment follows.
    api.set_spec({"replicas": 5, "autoscaling": {"minReplicas": 2, "maxReplicas": 6}})
    run(api)
    assert api.objects[f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"]["spec"]["replicas"] == 5

    # autoscaling removed: the autoscaler goes; five replicas still want the budget.
    api.set_spec({"replicas": 5})
    run(api)
    assert HPA_PATH not in api.objects and ("DELETE", HPA_PATH) in api.writes
    assert PDB_PATH in api.objects

    # down to one replica: the budget goes too; another pass deletes nothing more.
    api.set_spec({"replicas": 1})
    run(api)
    assert PDB_PATH not in api.objects
    deletes = [w for w in api.writes if w[0] == "DELETE"]
    run(api)
    assert [w for w in api.writes if w[0] == "DELETE"] == deletes


def test_the_operator_never_writes_the_spec_so_it_never_fights_the_autoscaler():
    api = FakeApi({"replicas": 4, "autoscaling": {"minReplicas": 1, "maxReplicas": 8}})
    for _ in range(2):
        run(api)
    writes_to_it = [w for w in api.writes if w[1].startswith(api.ad_path)]
    assert writes_to_it and all(w == ("MERGE", api.ad_path + "/status") for w in writes_to_it)
    assert api.objects[api.ad_path]["spec"]["replicas"] == 4


def test_a_namesake_the_adapterdeployment_does_not_own_is_never_deleted():
    api = FakeApi({"replicas": 1})
    theirs = {"kind": "HorizontalPodAutoscaler", "metadata": {"name": NAME, "namespace": NS, "uid": "someone-else",
              "ownerReferences": [{"uid": "another-owner", "controller": True}]}}  # fmt: skip
    api.objects[HPA_PATH] = theirs
    run(api)
    assert api.objects[HPA_PATH] == theirs and ("DELETE", HPA_PATH) not in api.writes


def test_an_operator_that_may_not_read_autoscalers_still_serves_without_one(monkeypatch, caplog):
    """An older chart's RBAC: no autoscaler or budget wanted, and nothing of ours could exist."""
    monkeypatch.setattr(rec, "UNREADABLE", set())
    api = FakeApi({"replicas": 1}, forbidden={HPA_PATH, PDB_PATH})
    for _ in range(3):
        run(api)
    assert api.objects[api.ad_path]["status"]["selector"] == label_selector(NAME)
    said = [r.getMessage() for r in caplog.records if "may not read" in r.getMessage()]
    assert len(said) == 2 and "HorizontalPodAutoscaler" in said[0]  # once per kind, not every pass
