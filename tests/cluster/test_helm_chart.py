"""The Helm chart: lints, renders objects the API server accepts, refuses bad values with the schema's
message, installs an operator of two replicas with leader election, and gives its service account
what the operator does and nothing more (`kubectl auth can-i` against the installed release)."""

import base64
import json
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune_operator.config import OperatorConfig
from tests.cluster.fixtures import helm_runner

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = "helm/kubetune"  # relative to REPO, where helm runs

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
    # A stuck workload's reason: the Job controller's, the scheduler's and the kubelet's events.
    ("", "events", "get"), ("", "events", "list"), ("", "events", "watch"),
]  # fmt: skip
# Leader election (kubetune_operator/leader.py: GET, POST, PUT of one Lease), in the release namespace only.
LEASES = [("coordination.k8s.io", "leases", verb) for verb in ("get", "create", "update")]
# What the operator must never do: read a Secret, or grant itself (or anyone) more.
FORBIDDEN = [
    ("", "secrets", "get"), ("", "secrets", "list"), ("", "secrets", "watch"),
    ("rbac.authorization.k8s.io", "roles", "create"), ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ("rbac.authorization.k8s.io", "clusterroles", "create"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
    ("rbac.authorization.k8s.io", "roles", "bind"), ("rbac.authorization.k8s.io", "roles", "escalate"),
]  # fmt: skip
# Every optional feature of the chart on at once.
EVERYTHING = (
    "replicaCount=3", "podAntiAffinity=hard", "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true", "monitoring.grafanaDashboard.enabled=true",
    "config.gpuResources={nvidia.com/gpu,nvidia.com/mig-1g.10gb,amd.com/gpu}", "adminKey=k3y-of-my-own",
    "imagePullSecrets[0].name=registry", "config.allowedImages={registry.local/ml/}",
)  # fmt: skip
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}  # their CRDs are not in the test cluster
# What kopf needs beyond the watched namespaces: discovering its CRDs and the namespaces themselves.
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}


def grants(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def render(helm, *sets: str) -> list[dict]:
    args = ["template", "kubetune", CHART, "--namespace", "kubetune-system"]
    for value in sets:
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def is_lease_rbac(doc: dict) -> bool:
    return doc["metadata"]["name"].endswith("-leader-election")


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
    roles = {d["metadata"]["namespace"]: d for d in all_of_kind(docs, "Role") if not is_lease_rbac(d)}
    bindings = {d["metadata"]["namespace"]: d for d in all_of_kind(docs, "RoleBinding") if not is_lease_rbac(d)}
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


@pytest.mark.parametrize("features", ["cluster-wide", "watch-namespaces", "everything"])
def test_the_api_server_accepts_the_rendered_objects(helm, cluster, crds, namespace, features):
    sets = {"cluster-wide": (), "watch-namespaces": (f"watchNamespaces={{{namespace}}}",), "everything": EVERYTHING}
    docs = [doc for doc in render(helm, *sets[features]) if doc["kind"] not in PROMETHEUS_OPERATOR_KINDS]
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


# --- lint, and every feature rendered ------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("features", ["defaults", "everything"])
def test_helm_lint(helm, strict, features):
    args = ["lint", CHART, *(["--strict"] if strict else [])]
    for value in EVERYTHING if features == "everything" else ():
        args += ["--set", value]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_every_optional_feature_renders(helm):
    docs = render(helm, *EVERYTHING)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("PodMonitor") == 2 and "ServiceMonitor" in kinds and "PodDisruptionBudget" in kinds
    dashboards = [d for d in all_of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == 1 and dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3 and pod["imagePullSecrets"] == [{"name": "registry"}]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in pod["affinity"]["podAntiAffinity"]
    [operator_config] = [d["data"]["config.yaml"] for d in all_of_kind(docs, "ConfigMap") if d not in dashboards]
    config = OperatorConfig.model_validate(yaml.safe_load(operator_config))
    assert config.gpu_resources == ("nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "amd.com/gpu")


def test_the_default_install_is_highly_available(helm):
    docs = render(helm)
    deployment = by_kind(docs, "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    container = pod["containers"][0]
    lease = f"--leader-elect-lease={deployment['metadata']['name']}"
    assert "--leader-elect" in container["args"] and lease in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Replicas prefer different nodes (and zones) but never stay unscheduled for it.
    [preferred] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
    [spread] = pod["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["labelSelector"]["matchLabels"] == labels
    budget = by_kind(docs, "PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 1 and budget["selector"]["matchLabels"].items() <= labels.items()


def test_the_lease_role_is_in_the_release_namespace_and_names_the_lease(helm):
    docs = render(helm, "watchNamespaces={ml}")
    [role] = [d for d in all_of_kind(docs, "Role") if is_lease_rbac(d)]
    [binding] = [d for d in all_of_kind(docs, "RoleBinding") if is_lease_rbac(d)]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubetune-system"
    for group, resource, verb in LEASES:
        assert grants(role["rules"], group, resource, verb), verb
    lease = by_kind(docs, "Deployment")["metadata"]["name"]
    named = [rule for rule in role["rules"] if set(rule["verbs"]) & {"get", "update"}]
    assert named and all(rule.get("resourceNames") == [lease] for rule in named)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    for other in all_of_kind(docs, "ClusterRole") + [r for r in all_of_kind(docs, "Role") if not is_lease_rbac(r)]:
        assert not any("leases" in rule["resources"] for rule in other["rules"]), other["metadata"]


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={ml,team-a}",), EVERYTHING])
def test_the_operator_cannot_grant_itself_more(helm, sets):
    docs = render(helm, *sets)
    for role in all_of_kind(docs, "ClusterRole") + all_of_kind(docs, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group, resource, verb in FORBIDDEN:
            assert not grants(role["rules"], group, resource, verb), (role["metadata"]["name"], resource, verb)


def test_one_replica_without_leader_election(helm):
    docs = render(helm, "replicaCount=1", "leaderElection.enabled=false")
    deployment = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(arg.startswith("--leader-elect") for arg in args)
    assert all_of_kind(docs, "PodDisruptionBudget") == [] and not any(
        is_lease_rbac(d) for d in all_of_kind(docs, "Role")
    )
    assert all_of_kind(render(helm, "replicaCount=1"), "PodDisruptionBudget") == []  # nothing to keep available


def render_json(helm, *sets_json: str) -> list[dict]:
    args = ["template", "kubetune", CHART, "--namespace", "kubetune-system"]
    for value in sets_json:
        args += ["--set-json", value]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_placement_values_replace_the_defaults(helm):
    pod = by_kind(render(helm, "podAntiAffinity=none", "topologySpreadConstraints=null"), "Deployment")
    assert "affinity" not in pod["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod["spec"]["template"]["spec"]
    selector = {"matchLabels": {"app": "mine"}}
    own = {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "rack", "labelSelector": selector}]}
    spread = {"maxSkew": 2, "topologyKey": "rack", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector}
    docs = render_json(
        helm, f"affinity.podAntiAffinity={json.dumps(own)}", f"topologySpreadConstraints=[{json.dumps(spread)}]"
    )
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["affinity"] == {"podAntiAffinity": own}  # the chart's soft anti-affinity steps aside
    assert pod["topologySpreadConstraints"] == [spread]  # a selector of its own is kept


# --- bad values fail `helm install` with the schema's message ----------------------------------------

SCHEMA_FAILED = "values don't meet the specifications of the schema(s)"
MUST_BE_ONE_OF = "value must be one of"
# --set value (or a whole flag), then what stderr must say: the schema's words (or the chart's own, for what a
# schema cannot compare), naming the value at fault.
BAD_VALUES = {
    "negative-replicas": ("replicaCount=-1", "at '/replicaCount': minimum: got -1, want 0"),
    "replicas-misspelt": ("replicas=2", "additional properties 'replicas' not allowed"),
    "repository-upper-case": (
        "image.repository=ghcr.io/KubeTune/operator",
        "at '/image/repository': 'ghcr.io/KubeTune/operator' does not match pattern",
    ),
    "repository-empty-path": (
        "image.repository=ghcr.io//operator",
        "at '/image/repository': 'ghcr.io//operator' does not match pattern",
    ),
    "tag-with-colon": ("image.tag=:0.2", "at '/image/tag': ':0.2' does not match pattern"),
    "trainer-image": ("config.trainerImage=ghcr.io/kubetune/trainer:", "at '/config/trainerImage': "),
    "gpu-resource-typo": (
        "config.gpuResources={nvidia.com/gpus}",
        f"at '/config/gpuResources/0': {MUST_BE_ONE_OF} 'nvidia.com/gpu', 'amd.com/gpu'",
    ),
    "gpu-resource-vendor": (
        "config.gpuResources={example.com/gpu}",
        "'example.com/gpu' does not match pattern '^nvidia\\\\.com/mig-",
    ),
    "gpu-resources-empty": ("--set-json=config.gpuResources=[]", "at '/config/gpuResources': minItems: got 0, want 1"),
    "mig-profile": ("config.gpuResources={nvidia.com/mig-9g.5gb}", "'nvidia.com/mig-9g.5gb' does not match pattern"),
    "metrics-port": ("metrics.port=70000", "at '/metrics/port': maximum: got 70,000, want 65,535"),
    "liveness-port": ("livenessPort=0", "at '/livenessPort': minimum: got 0, want 1"),
    "master-port": ("config.masterPort=-1", "at '/config/masterPort': minimum: got -1, want 1"),
    "pull-policy": (
        "image.pullPolicy=Sometimes",
        f"at '/image/pullPolicy': {MUST_BE_ONE_OF} 'Always', 'IfNotPresent', 'Never'",
    ),
    "workload-pull-policy": ("config.imagePullPolicy=always", f"at '/config/imagePullPolicy': {MUST_BE_ONE_OF}"),
    "namespace-name": ("watchNamespaces={Team-A}", "at '/watchNamespaces/0': 'Team-A' does not match pattern"),
    "not-a-boolean": ("networkPolicy.enabled=yes", "at '/networkPolicy/enabled': got string, want boolean"),
    "monitor-interval": (
        "monitoring.podMonitor.interval=30",
        "at '/monitoring/podMonitor/interval': got number, want string",
    ),
    "set-by-the-chart": ("config.namespaces={ml}", "additional properties 'namespaces' not allowed"),
    "two-replicas-no-election": (
        "leaderElection.enabled=false",
        "replicaCount is 2 but leaderElection.enabled is false",
    ),
    "same-ports": ("livenessPort=8000", "metrics.port and livenessPort are both 8000"),
}
NOT_SCHEMA = {"two-replicas-no-election", "same-ports"}  # template checks: the chart's own `fail`


@pytest.fixture(scope="module")
def bad_values_namespace(cluster):
    """One namespace for every bad-value install: none of them gets as far as creating anything."""
    namespace = cluster.create_namespace("kt-bad-")
    yield namespace
    cluster.delete_namespace(namespace)


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_bad_value_fails_helm_install_with_the_schemas_message(helm, bad_values_namespace, case):
    namespace = bad_values_namespace
    setting, message = BAD_VALUES[case]
    release = f"bad-{uuid.uuid4().hex[:8]}"
    flags = [setting] if setting.startswith("--") else ["--set", setting]
    result = helm("install", release, CHART, "--namespace", namespace, *flags)
    try:
        assert result.returncode != 0, f"helm install accepted {setting}"
        assert message in result.stderr, result.stderr
        assert (SCHEMA_FAILED in result.stderr) is (case not in NOT_SCHEMA), result.stderr
        assert "panic" not in result.stderr and len(result.stderr.splitlines()) < 12
    finally:
        if result.returncode == 0:
            helm("uninstall", release, "--namespace", namespace, "--wait")


# --- a real install: two replicas, and what its service account may do ---------------------------


class Installed:
    """A release installed into its own namespace, watching `watched` (empty: every namespace)."""

    def __init__(self, cluster, run, release: str, namespace: str, watched: list[str], outside: str) -> None:
        self.cluster, self.run, self.release, self.namespace = cluster, run, release, namespace
        self.watched, self.outside = watched, outside
        self.fullname = f"{release}-operator"
        self.user = f"system:serviceaccount:{namespace}:{self.fullname}"

    def can(self, verb: str, group: str, resource: str, namespace: str, name: str = "") -> bool:
        what = f"{resource}.{group}" if group else resource
        if name:
            what += f"/{name}"
        result = self.cluster.kubectl("auth", "can-i", verb, what, "--as", self.user, "-n", namespace, check=False)
        assert result.stdout.strip() in ("yes", "no"), result.stderr
        return result.stdout.strip() == "yes"


@pytest.fixture(scope="module", params=["watch-namespaces", "cluster-wide"])
def installed(request, cluster, crds, tmp_path_factory):
    """`helm install` of the chart with its defaults (two replicas, leader election), the CRDs being
    there already (Helm skips them); uninstalled, and its namespaces deleted, afterwards."""
    run = helm_runner(cluster, tmp_path_factory.mktemp("helm"))
    namespaces = [cluster.create_namespace("kt-rel-"), cluster.create_namespace("kt-ml-"),
                  cluster.create_namespace("kt-other-")]  # fmt: skip
    release_ns, watched_ns, outside = namespaces
    watched = [watched_ns] if request.param == "watch-namespaces" else []
    release = f"kt{uuid.uuid4().hex[:8]}"
    args = ["install", release, CHART, "--namespace", release_ns, "--wait", "--timeout", "90s"]
    if watched:
        args += ["--set", f"watchNamespaces={{{watched_ns}}}"]
    result = run(*args, timeout=120)
    try:
        assert result.returncode == 0, result.stderr
        yield Installed(cluster, run, release, release_ns, watched or [watched_ns], outside if watched else "")
    finally:
        run("uninstall", release, "--namespace", release_ns, "--wait", "--timeout", "60s", timeout=90)
        for namespace in namespaces:
            cluster.delete_namespace(namespace)


def test_helm_install_runs_two_replicas_with_a_disruption_budget(installed):
    cluster, namespace, name = installed.cluster, installed.namespace, installed.fullname
    deployment = cluster.get("deployment", name, namespace)
    assert deployment["spec"]["replicas"] == 2 and deployment["status"].get("readyReplicas") == 2
    budget = cluster.get("poddisruptionbudget", name, namespace)
    assert budget is not None and budget["spec"]["minAvailable"] == 1
    cluster.wait_for(lambda: budget_allows(cluster, namespace, name), f"PodDisruptionBudget {name} observed", 30)
    selector = f"app.kubernetes.io/instance={installed.release},app.kubernetes.io/component=operator"
    pods = cluster.pods(namespace, selector)
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Running"}
    status = installed.run("status", installed.release, "--namespace", namespace)
    assert "get finetunejobs -w" in status.stdout and f"get lease {name}" in status.stdout


def budget_allows(cluster, namespace: str, name: str) -> bool:
    status = (cluster.get("poddisruptionbudget", name, namespace) or {}).get("status", {})
    return status.get("currentHealthy") == 2 and status.get("disruptionsAllowed") == 1


def test_the_service_account_can_do_what_the_operator_does(installed):
    for namespace in installed.watched:
        for group, resource, verb in NEEDED:
            if (group, resource) not in CLUSTER_SCOPED:
                assert installed.can(verb, group, resource, namespace), (namespace, group, resource, verb)
    for group, resource in CLUSTER_SCOPED:
        assert installed.can("watch", group, resource, ""), resource
    assert installed.can("create", "coordination.k8s.io", "leases", installed.namespace)
    for verb in ("get", "update"):
        assert installed.can(verb, "coordination.k8s.io", "leases", installed.namespace, installed.fullname)


def test_the_service_account_cannot_read_secrets_grant_itself_more_or_touch_other_leases(installed):
    for namespace in [*installed.watched, installed.namespace]:
        for group, resource, verb in FORBIDDEN:
            assert not installed.can(verb, group, resource, namespace), (namespace, resource, verb)
        assert not installed.can("create", "rbac.authorization.k8s.io", "clusterroles", ""), "clusterroles"
    for namespace in [*installed.watched, "kube-system"]:
        for group, resource, verb in LEASES:
            assert not installed.can(verb, group, resource, namespace, "any-lease"), (namespace, verb)
    assert not installed.can("update", "coordination.k8s.io", "leases", installed.namespace, "another-lease")
    if installed.outside:  # watching one namespace: nothing of the operator's elsewhere
        for group, resource, verb in NEEDED:
            if (group, resource) not in CLUSTER_SCOPED:
                assert not installed.can(verb, group, resource, installed.outside), (group, resource, verb)


def test_an_upgrade_from_an_operator_without_election_replaces_it_before_starting_leaders(cluster, crds, tmp_path):
    """Chart 0.1.0 ran one replica without leader election: the upgrade's rollout must stop it before
    the electing replicas start (Recreate), or it would reconcile beside the new leader. The next
    rollout, from electing replicas, is a rolling one."""
    run = helm_runner(cluster, tmp_path)
    namespace = cluster.create_namespace("kt-up-")
    release = f"kt{uuid.uuid4().hex[:8]}"
    common = [release, CHART, "--namespace", namespace, "--wait", "--timeout", "90s"]
    name = f"{release}-operator"
    try:
        steps = [
            ("install", ["--set", "replicaCount=1", "--set", "leaderElection.enabled=false"], "Recreate"),
            # The chart's defaults (helm upgrade with no values would reuse the release's last ones).
            ("upgrade", ["--reset-values"], "Recreate"),  # replaces the non-electing operator
            ("upgrade", ["--reset-values", "--set", "podAnnotations.rolled=again"], "RollingUpdate"),
        ]
        for verb, sets, strategy in steps:
            result = run(verb, *common, *sets, timeout=120)
            assert result.returncode == 0, result.stderr
            deployment = cluster.get("deployment", name, namespace)
            assert deployment["spec"]["strategy"]["type"] == strategy, (verb, sets)
        assert deployment["spec"]["replicas"] == 2
    finally:
        run("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s", timeout=90)
        cluster.delete_namespace(namespace)
