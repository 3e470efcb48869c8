"""The Helm chart: lints, renders objects the API server accepts, and configures the operator it installs."""

import base64
import json

import pytest
import yaml

from kubetune_operator.config import OperatorConfig

pytestmark = pytest.mark.cluster

# What the operator calls (kubetune_operator/k8s.py, writes.py and the kinds' reconcile.py): children
# are read, then server-side applied (PATCH, which creates an absent object too).
NEEDED = [
    ("kubetune.io", "finetunejobs", "watch"), ("kubetune.io", "finetunejobs/status", "patch"),
    ("kubetune.io", "adapterdeployments", "watch"), ("kubetune.io", "adapterdeployments/status", "patch"),
    ("", "configmaps", "create"), ("", "services", "create"), ("batch", "jobs", "create"), ("batch", "jobs", "patch"),
    ("batch", "jobs", "delete"), ("apps", "deployments", "create"), ("", "pods", "list"), ("", "events", "create"),
    ("", "configmaps", "get"), ("", "configmaps", "patch"), ("", "services", "get"), ("", "services", "patch"),
    ("batch", "jobs", "get"), ("apps", "deployments", "get"), ("apps", "deployments", "patch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"), ("", "namespaces", "watch"),
    ("networking.k8s.io", "networkpolicies", "get"), ("networking.k8s.io", "networkpolicies", "patch"),
    ("networking.k8s.io", "networkpolicies", "create"), ("networking.k8s.io", "networkpolicies", "delete"),
    ("", "secrets", "create"), ("", "secrets", "patch"), ("", "secrets", "delete"),
    ("autoscaling", "horizontalpodautoscalers", "get"), ("autoscaling", "horizontalpodautoscalers", "patch"),
    ("autoscaling", "horizontalpodautoscalers", "delete"), ("policy", "poddisruptionbudgets", "get"),
    ("policy", "poddisruptionbudgets", "patch"), ("policy", "poddisruptionbudgets", "delete"),
]  # fmt: skip
# What kopf needs beyond the watched namespaces: discovering its CRDs and the namespaces themselves.
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}


def grants(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def render(helm, *sets: str) -> list[dict]:
    args = ["template", "kubetune", "helm/kubetune", "--namespace", "kubetune-system"]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def all_of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def test_the_rendered_config_is_what_the_operator_reads(helm, tmp_path):
    docs = render(helm, "watchNamespaces={ml,team-a}", "config.trainerImage=registry.local/trainer:1")
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    config = OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})
    assert config.namespaces == ("ml", "team-a")
    assert config.trainer_image == "registry.local/trainer:1"
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBETUNE_CONFIG", "value": "/etc/kubetune-operator/config.yaml"} in container["env"]
    assert container["args"][0] == "operator"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_rbac_covers_what_the_operator_does(helm):
    rules = by_kind(render(helm), "ClusterRole")["rules"]
    for group, resource, verb in NEEDED:
        assert grants(rules, group, resource, verb), (group, resource, verb)


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={ml,team-a}",)])
def test_the_operator_never_reads_secrets(helm, sets):
    docs = render(helm, *sets)
    for role in all_of_kind(docs, "ClusterRole") + all_of_kind(docs, "Role"):
        for verb in ("get", "list", "watch", "*"):
            assert not grants(role["rules"], "", "secrets", verb), (role["kind"], verb)


def test_watched_namespaces_get_roles_and_the_cluster_role_only_reads_crds_and_namespaces(helm):
    docs = render(helm, "watchNamespaces={ml,team-a}")
    cluster_rules = by_kind(docs, "ClusterRole")["rules"]
    granted = {(g, r) for rule in cluster_rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == CLUSTER_SCOPED
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in cluster_rules)
    roles = {d["metadata"]["namespace"]: d for d in all_of_kind(docs, "Role")}
    bindings = {d["metadata"]["namespace"]: d for d in all_of_kind(docs, "RoleBinding")}
    assert set(roles) == set(bindings) == {"ml", "team-a"}
    account = by_kind(docs, "ServiceAccount")["metadata"]
    for namespace, role in roles.items():
        for group, resource, verb in NEEDED:
            if (group, resource) not in CLUSTER_SCOPED:
                assert grants(role["rules"], group, resource, verb), (namespace, group, resource, verb)
        binding = bindings[namespace]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}  # fmt: skip
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                        "namespace": account["namespace"]}]  # fmt: skip


def test_allow_lists_namespace_and_admin_key_reach_the_operator(helm, tmp_path):
    docs = render(helm, "config.allowedImages={registry.local/ml/}", "config.allowedPriorityClasses={batch}")
    path = tmp_path / "config.yaml"
    path.write_text(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    config = OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})
    assert config.allowed_images == ("registry.local/ml/",) and config.allowed_priority_classes == ("batch",)
    assert config.network_policies is True
    defaults = OperatorConfig.from_env({"KUBETUNE_CONFIG": str(_config_file(render(helm), tmp_path))})
    assert defaults.image_allow_list == ("ghcr.io/kubetune/trainer", "ghcr.io/kubetune/serve")
    assert defaults.allowed_priority_classes == ()
    env = {e["name"]: e for e in by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_OPERATOR_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    secret = by_kind(docs, "Secret")
    assert env["KUBETUNE_OPERATOR_ADMIN_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "key"}
    }
    assert len(base64.b64decode(secret["data"]["key"])) == 48
    assert secret["data"]["key"] != by_kind(render(helm), "Secret")["data"]["key"]  # random, not a constant
    chosen = by_kind(render(helm, "adminKey=my-own-key"), "Secret")["data"]["key"]
    assert base64.b64decode(chosen) == b"my-own-key"


def _config_file(docs: list[dict], tmp_path) -> object:
    path = tmp_path / "defaults.yaml"
    path.write_text(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    return path


def test_the_operators_own_network_policy_opens_only_its_ports(helm):
    docs = render(helm)
    policy = by_kind(docs, "NetworkPolicy")
    template = by_kind(docs, "Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    [rule] = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == ports and "from" not in rule
    assert all_of_kind(render(helm, "networkPolicy.enabled=false"), "NetworkPolicy") == []


@pytest.mark.parametrize("watch", [False, True], ids=["cluster-wide", "watch-namespaces"])
def test_the_api_server_accepts_the_rendered_objects(helm, cluster, crds, namespace, watch):
    docs = render(helm, *([f"watchNamespaces={{{namespace}}}"] if watch else []))
    for doc in docs:
        if doc["metadata"].get("namespace"):
            doc["metadata"]["namespace"] = namespace
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] += f"-{namespace}"  # dry run; never clash with another test's
            if doc["kind"] == "ClusterRoleBinding":
                doc["roleRef"]["name"] += f"-{namespace}"
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=json.dumps({"kind": "List", "apiVersion": "v1", "items": docs})
    )
    assert result.returncode == 0, result.stderr
