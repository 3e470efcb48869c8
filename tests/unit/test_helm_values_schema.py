"""The chart's values.schema.json, read as data: it declares and describes every value in values.yaml,
keeps its blocks closed (a misspelt key is an error, not a silently ignored setting), and agrees with
the operator on what it checks twice (the GPU resource names, the configuration's keys).
Helm itself validates values against it in tests/cluster/test_helm_chart.py."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.config import KNOWN_GPU_RESOURCES, MIG_RESOURCE_PATTERN, OperatorConfig

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubetune"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# OperatorConfig fields the chart sets itself, never through config: watchNamespaces, the admin-key
# Secret and the Downward API.
SET_BY_THE_CHART = {"namespaces", "admin_key_secret", "operator_namespace"}


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return resolve(SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]])
    return node


def walk(schema: dict[str, Any], path: str = ""):
    """(path, schema) of every object schema with declared properties, depth first."""
    yield path, schema
    for key, child in schema.get("properties", {}).items():
        child = resolve(child)
        if child.get("type") == "object" and "properties" in child:
            yield from walk(child, f"{path}.{key}")
        if child.get("type") == "array" and "properties" in resolve(child.get("items", {})):
            yield from walk(resolve(child["items"]), f"{path}.{key}[]")


def test_it_is_draft_07_and_closed_at_the_top():
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert SCHEMA["type"] == "object" and SCHEMA["additionalProperties"] is False


def test_every_block_with_declared_keys_is_closed():
    for path, block in walk(SCHEMA):
        assert block.get("additionalProperties") is False, path or "(top)"


def test_every_value_in_values_yaml_is_declared_and_described():
    def check(values: dict[str, Any], schema: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            declared = schema.get("properties", {}).get(key)
            assert declared is not None, f"{path}{key} is in values.yaml but not in values.schema.json"
            assert declared.get("description") or resolve(declared).get("description"), f"{path}{key}"
            declared = resolve(declared)
            if isinstance(value, dict) and "properties" in declared:
                check(value, declared, f"{path}{key}.")

    check(VALUES, SCHEMA, "")


def test_every_declared_key_is_described():
    def check(node: dict[str, Any], path: str) -> None:
        for key, child in node.get("properties", {}).items():
            assert child.get("description") or resolve(child).get("description"), f"{path}{key}"
            check(resolve(child), f"{path}{key}.")
            check(resolve(resolve(child).get("items", {})), f"{path}{key}[].")

    check(SCHEMA, "")


def test_the_monitoring_block_is_declared_as_values_yaml_has_it():
    monitoring = SCHEMA["properties"]["monitoring"]["properties"]
    assert set(monitoring) == {"serviceMonitor", "podMonitor", "grafanaDashboard"}
    assert set(monitoring["serviceMonitor"]["properties"]) == {"enabled", "interval", "labels"}
    assert set(monitoring["grafanaDashboard"]["properties"]) == {"enabled", "labels"}


def test_gpu_resource_names_are_the_operators():
    gpu = SCHEMA["definitions"]["gpuResource"]
    known, mig = gpu["anyOf"]
    assert known["enum"] == list(KNOWN_GPU_RESOURCES)
    assert mig["pattern"] == MIG_RESOURCE_PATTERN
    assert SCHEMA["properties"]["config"]["properties"]["gpuResources"]["items"] == {
        "$ref": "#/definitions/gpuResource"
    }


def test_config_keys_are_the_operators_configuration():
    declared = set(SCHEMA["properties"]["config"]["properties"])
    aliases = {field.alias or name: name for name, field in OperatorConfig.model_fields.items()}
    assert declared <= set(aliases), declared - set(aliases)
    settable = {alias for alias, name in aliases.items() if name not in SET_BY_THE_CHART}
    assert settable == declared, settable ^ declared
    OperatorConfig.model_validate(VALUES["config"])  # the defaults are a configuration the operator takes


def pattern(*path: str) -> re.Pattern[str]:
    node: dict[str, Any] = SCHEMA
    for key in path:
        node = resolve(node["properties"][key]) if key != "[]" else resolve(node["items"])
    return re.compile(node["pattern"])


@pytest.mark.parametrize(
    ("path", "good", "bad"),
    [
        (("image", "repository"), ["ghcr.io/kubetune/operator", "localhost:5000/op", "registry.local/a/b_c/d--e", "op"],
         ["Ghcr.io/BAD/x", "ghcr.io//x", "ghcr.io/x:1", "ghcr.io/x/", "-x", "a b"]),
        (("image", "tag"), ["", "0.1.0", "v1_2-rc.3", "latest"], [":1", ".1", "-1", "a/b", "x" * 129]),
        (("config", "trainerImage"), ["ghcr.io/kubetune/trainer:0.1.0", "trainer", "reg:5000/t@sha256:" + "a" * 64],
         ["ghcr.io/kubetune/trainer:", "ghcr.io/Kubetune/trainer:1", "t@sha256:abc"]),
        (("watchNamespaces", "[]"), ["ml", "team-a", "a1"], ["Team", "-a", "a_b", "a.b"]),
        (("monitoring", "serviceMonitor", "interval"), ["30s", "1m", "1h30m", "500ms"], ["30", "soon", "1d", ""]),
    ],
)  # fmt: skip
def test_patterns(path, good, bad):
    compiled = pattern(*path)
    for value in good:
        assert compiled.search(value), (path, value)
    for value in bad:
        assert not compiled.search(value), (path, value)


def test_ports_and_replicas_are_bounded():
    port = SCHEMA["definitions"]["port"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    for key in ("livenessPort",):
        assert SCHEMA["properties"][key]["$ref"] == "#/definitions/port"
    assert SCHEMA["properties"]["metrics"]["properties"]["port"]["$ref"] == "#/definitions/port"
    assert SCHEMA["properties"]["replicaCount"]["minimum"] == 0
    assert SCHEMA["definitions"]["pullPolicy"]["enum"] == ["Always", "IfNotPresent", "Never"]
