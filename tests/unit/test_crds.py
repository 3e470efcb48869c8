"""The CRDs in crds/ are generated from the models, structural, and carry the rules users rely on."""

import subprocess
import sys

import pytest
import yaml

from kubetune.api import crdgen
from kubetune.api.kinds import ADAPTERDEPLOYMENT, FINETUNEJOB, KINDS
from tests.examples import REPO

# The only places where arbitrary content is accepted on purpose.
FREE_FORM = {"spec.resources.affinity"}


def load(info):
    return yaml.safe_load((REPO / "crds" / crdgen.file_name(info)).read_text())


def schema(info):
    return load(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node, path=""):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}".lstrip("."))
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("directory", ["crds", "helm/kubetune/crds"])
def test_generated_crds_match_the_models(directory):
    assert crdgen.stale(REPO / directory) == [], f"{directory} is stale: run `make crds`"


def test_kubetune_crds_prints_exactly_the_files():
    printed = subprocess.run(
        [sys.executable, "-m", "kubetune", "crds"], capture_output=True, text=True, check=True
    ).stdout
    files = "---\n".join((REPO / "crds" / crdgen.file_name(info)).read_text() for info in KINDS)
    assert printed == files


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_schema_is_structural(info):
    for path, node in walk(schema(info)):
        if path == "metadata":
            continue
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert "$ref" not in node and "allOf" not in node and "title" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path in FREE_FORM, f"{path} is free-form but not on the allow-list"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf is only allowed for int-or-string"
        if path.startswith("spec") and node.get("type") == "string" and "enum" not in node and "format" not in node:
            assert "maxLength" in node, f"{path}: unbounded string makes CEL cost estimates fail"


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_names_subresource_and_columns(info):
    crd = load(info)
    names = crd["spec"]["names"]
    assert names["shortNames"] == list(info.short_names)
    assert names["categories"] == ["kubetune"]
    version = crd["spec"]["versions"][0]
    scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}
    scale["labelSelectorPath"] = ".status.selector"  # kubectl scale and a HorizontalPodAutoscaler drive it
    expected = {"status": {}, "scale": scale} if info is ADAPTERDEPLOYMENT else {"status": {}}
    assert version["subresources"] == expected
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]


def test_finetunejob_printer_columns():
    columns = [c["name"] for c in load(FINETUNEJOB)["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Method", "Phase", "Progress", "Loss", "Tokens/s", "Age"]


def rules_at(info, path):
    node = dict(walk(schema(info)))[path]
    return {rule["rule"]: rule for rule in node.get("x-kubernetes-validations", [])}


def test_cross_field_cel_rules_are_in_the_crd():
    method = rules_at(FINETUNEJOB, "spec.method")
    assert "!has(self.quantization) || self.type == 'qlora'" in method
    hyper = rules_at(FINETUNEJOB, "spec.hyperparameters")
    assert "!has(self.epochs) || !has(self.maxSteps)" in hyper
    spec = rules_at(FINETUNEJOB, "spec")
    batch = next(r for text, r in spec.items() if "globalBatchSize %" in text)
    assert "messageExpression" in batch
    assert spec["self.model == oldSelf.model"]["message"].startswith("spec.model is immutable")
    assert spec["self.method == oldSelf.method"]["fieldPath"] == ".method"


def test_defaults_reach_the_crd():
    props = schema(FINETUNEJOB)["properties"]["spec"]["properties"]
    assert props["method"]["default"] == {"type": "lora"}
    assert props["distributed"]["default"] == {"strategy": "auto", "offload": "none"}
    assert props["method"]["properties"]["type"]["default"] == "lora"
    assert props["resources"]["properties"]["gpuResource"]["default"] == "nvidia.com/gpu"
    assert props["hyperparameters"]["properties"]["learningRate"]["default"] == "2e-4"


def test_adapters_are_a_map_keyed_by_name():
    adapters = schema(ADAPTERDEPLOYMENT)["properties"]["spec"]["properties"]["adapters"]
    assert adapters["x-kubernetes-list-type"] == "map"
    assert adapters["x-kubernetes-list-map-keys"] == ["name"]


def test_descriptions_teach_the_api():
    for info in KINDS:
        for path, node in walk(schema(info)["properties"]["spec"], "spec"):
            if path.endswith(("[]", "{}")):  # list items and map values are described by their field
                continue
            assert node.get("description"), f"{info.kind} {path} has no description for kubectl explain"


# --- admission closes the holes: URIs and names (issue 14, findings 7 and 8) ----------------------

URI_FIELDS = {
    "FineTuneJob": ["spec.model", "spec.dataset", "spec.dataset.validation", "spec.output", "spec.evaluation"],
    "AdapterDeployment": ["spec.baseModel", "spec.adapters[]", "spec.adapters[].merge.sources[]"],
}


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_every_uri_field_carries_the_uri_rules(info):
    from kubetune.api.uris import CONFIGMAP_MESSAGE, CONTROL_MESSAGE, DOT_SEGMENT_MESSAGE, PVC_MESSAGE

    nodes = dict(walk(schema(info)))
    with_uri = {path for path, node in nodes.items() if "uri" in node.get("properties", {}) and path.startswith("spec")}
    assert with_uri == set(URI_FIELDS[info.kind])
    for path in URI_FIELDS[info.kind]:
        rules = nodes[path].get("x-kubernetes-validations", [])
        on_uri = {r["message"] for r in rules if r.get("fieldPath") == ".uri"}
        assert {CONTROL_MESSAGE, DOT_SEGMENT_MESSAGE, PVC_MESSAGE, CONFIGMAP_MESSAGE} <= on_uri, path
        assert nodes[path]["properties"]["uri"]["maxLength"] <= 2048, "CEL cost needs a bounded URI"


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_the_root_refuses_names_the_operator_cannot_use(info):
    from kubetune.api.names import NAME_RULES

    rules = schema(info)["x-kubernetes-validations"]
    rule = NAME_RULES[info.kind]
    assert {r["message"] for r in rules} == {rule.format_message, rule.length_message}
    assert any(f"self.metadata.name.size() <= {rule.max_length}" == r["rule"] for r in rules)
    assert any("self.metadata.name.matches(" in r["rule"] for r in rules)
