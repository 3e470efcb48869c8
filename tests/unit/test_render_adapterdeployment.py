"""adapterdeployment/render.py: the adapters ConfigMap, Deployment and Service of an AdapterDeployment."""

import base64
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.adaptersfile import PATH_IN_POD, parse_adapters_file
from kubetune_operator import keys
from kubetune_operator.adapterdeployment.render import VLLM_LAUNCHER, adapter_path, endpoint, render_adapterdeployment
from kubetune_operator.config import OperatorConfig
from kubetune_operator.render_common import RenderError

CONFIG = OperatorConfig()


def make(**spec) -> AdapterDeployment:
    wire = {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}, **spec}
    return AdapterDeployment.model_validate(
        {"metadata": {"name": "support", "namespace": "ml", "uid": "u-1"}, "spec": wire}
    )


def container(objects) -> dict:
    return objects.deployment["spec"]["template"]["spec"]["containers"][0]


def test_builtin_deployment_and_service():
    objects = render_adapterdeployment(
        make(replicas=2, adapters=[{"name": "legal", "uri": "pvc://adapters/legal"}]), CONFIG
    )
    dep, svc = objects.deployment, objects.service
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "support"
    for obj in (dep, svc):
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("AdapterDeployment", "u-1", True)
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container(objects)
    assert c["command"][:4] == ["kubetune", "serve", "--model", "pvc://models/base"]
    assert "--adapter" not in c["command"]  # adapters are loaded at run time ...
    assert c["command"][c["command"].index("--adapters-file") + 1] == PATH_IN_POD  # ... from the ConfigMap
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/live"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] and mounts["/mnt/pvc/adapters"]["readOnly"]
    assert "/scratch" in mounts
    assert mounts["/etc/kubetune/adapters"] == {
        "name": "adapters",
        "mountPath": "/etc/kubetune/adapters",
        "readOnly": True,
    }  # the folder: a subPath would never update
    [volume] = [v for v in pod["volumes"] if v["name"] == "adapters"]
    assert volume["configMap"] == {"name": "support-adapters", "optional": True}
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert endpoint("support", "ml", 8000) == "http://support.ml.svc:8000/v1"


def test_adapter_set_does_not_change_the_pod_template():
    a = render_adapterdeployment(make(adapters=[{"name": "a", "uri": "pvc://models/a"}]), CONFIG)
    b = render_adapterdeployment(
        make(adapters=[{"name": "b", "uri": "s3://bucket/b"}, {"name": "c", "fromJob": "job"}]),
        CONFIG,
        {"c": "pvc://models/job/adapter"},
        {"c": "pvc://models/job/adapter"},
    )
    assert a.deployment["spec"]["template"] == b.deployment["spec"]["template"]
    assert a.deployment["metadata"]["annotations"] == b.deployment["metadata"]["annotations"]
    # ... though the allow-list did change: it reaches the runtime through the ConfigMap, by reference.
    assert a.adapters["data"]["allowed-sources"] != b.adapters["data"]["allowed-sources"]


def test_vllm_command_env_and_gpus():
    ad = make(runtime="vllm", resources={"gpusPerReplica": 1}, maxAdapters=4, maxLoraRank=32)
    c = container(render_adapterdeployment(ad, CONFIG))
    assert c["command"][:4] == ["python3", "-c", VLLM_LAUNCHER, PATH_IN_POD]
    assert c["command"][4:8] == ["vllm", "serve", "/mnt/pvc/models/base", "--enable-lora"]
    assert c["command"][c["command"].index("--max-loras") + 1] == "4"
    assert c["command"][c["command"].index("--max-lora-rank") + 1] == "32"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert adapter_path("vllm", "pvc://adapters/x/y") == "/mnt/pvc/adapters/x/y"
    assert adapter_path("builtin", "pvc://adapters/x") == "pvc://adapters/x"


def test_vllm_cannot_read_s3_and_uid_is_required():
    with pytest.raises(RenderError, match="s3"):
        render_adapterdeployment(
            make(runtime="vllm", baseModel={"uri": "s3://b/m"}, resources={"gpusPerReplica": 1}), CONFIG
        )
    ad = make()
    ad.metadata.uid = None
    with pytest.raises(RenderError, match="uid"):
        render_adapterdeployment(ad, CONFIG)


def test_resolved_job_claims_are_mounted():
    objects = render_adapterdeployment(
        make(adapters=[{"name": "tuned", "fromJob": "job-1"}]), CONFIG, {"tuned": "pvc://outputs/job-1"}
    )
    paths = [m["mountPath"] for m in container(objects)["volumeMounts"]]
    assert "/mnt/pvc/outputs" in paths


def test_the_adapters_configmap_lists_what_each_runtime_loads():
    spec = {
        "adapters": [
            {"name": "legal", "uri": "pvc://adapters/legal"},
            {"name": "tuned", "fromJob": "job"},
            {"name": "waiting", "fromJob": "other"},
            {"name": "remote", "uri": "s3://bucket/remote"},
        ]
    }
    resolved = {"tuned": "pvc://outputs/job/adapter"}
    builtin = render_adapterdeployment(make(**spec), CONFIG, resolved).adapters
    assert builtin["metadata"]["name"] == "support-adapters"
    assert builtin["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert parse_adapters_file(builtin["data"]["adapters.json"]) == {
        "legal": "pvc://adapters/legal",
        "tuned": "pvc://outputs/job/adapter",
        "remote": "s3://bucket/remote",
    }
    vllm = render_adapterdeployment(make(runtime="vllm", resources={"gpusPerReplica": 1}, **spec), CONFIG, resolved)
    assert parse_adapters_file(vllm.adapters["data"]["adapters.json"]) == {  # s3:// is refused by the load instead
        "legal": "/mnt/pvc/adapters/legal",
        "tuned": "/mnt/pvc/outputs/job/adapter",
    }
    assert [o["kind"] for o in vllm.all()] == ["Secret", "NetworkPolicy", "ConfigMap", "Service", "Deployment"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            {"adapters": [{"name": "a", "path": "/mnt/pvc/x/a"}, {"name": "b", "path": "org/b"}]},
            ["serve", "m", "--lora-modules", "a=/mnt/pvc/x/a", "b=org/b"],
        ),
        ({"adapters": []}, ["serve", "m"]),
        (None, ["serve", "m"]),  # the ConfigMap is optional: no file, no adapters
    ],
)
def test_the_vllm_launcher_turns_the_file_into_lora_modules(tmp_path, content, expected):
    path = tmp_path / "adapters.json"
    if content is not None:
        path.write_text(json.dumps(content))
    printer = [sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))"]
    result = subprocess.run(
        [sys.executable, "-c", VLLM_LAUNCHER, str(path), *printer, "serve", "m"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout) == expected


# --- access: the admin key, the user's key, the allow-list ---------------------------------------


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def arg(command, flag):
    return command[command.index(flag) + 1] if flag in command else None


def test_the_admin_key_secret_is_owned_labelled_and_holds_the_derived_key():
    objects = render_adapterdeployment(make(), CONFIG)
    secret = objects.admin_key
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    assert secret["metadata"]["name"] == "support-admin-key" and secret["metadata"]["namespace"] == "ml"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    [ref] = secret["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("AdapterDeployment", "u-1", True)
    key = base64.b64decode(secret["data"]["admin-key"]).decode()
    assert key == keys.admin_key(CONFIG, "ml", "support", "u-1") and len(key) == 64
    # the key is in no object but the Secret
    for obj in (objects.deployment, objects.adapters, objects.service, objects.network_policy):
        assert key not in json.dumps(obj)


def test_the_builtin_runtime_reads_the_admin_key_from_a_mounted_file():
    c = container(render_adapterdeployment(make(), CONFIG))
    assert arg(c["command"], "--admin-key-file") == "/etc/kubetune/admin-key/admin-key"
    assert "--api-key-file" not in c["command"] and "--api-key" not in c["command"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/kubetune/admin-key"]["readOnly"] is True
    pod = render_adapterdeployment(make(), CONFIG).deployment["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mounts["/etc/kubetune/admin-key"]["name"]]
    assert volume["secret"]["secretName"] == "support-admin-key"
    assert volume["secret"]["items"] == [{"key": "admin-key", "path": "admin-key"}]
    assert "VLLM_API_KEY" not in env(c)


def with_user_key(ad):
    """`ad` with spec.apiKeySecretRef {name: user-key, key: token}: through the API model where it
    has the field, else set on the parsed spec as the model will carry it."""
    try:
        return AdapterDeployment.model_validate(
            {**ad.model_dump(by_alias=True, exclude_none=True),
             "spec": {**ad.spec.model_dump(by_alias=True, exclude_none=True),
                      "apiKeySecretRef": {"name": "user-key", "key": "token"}}}
        )  # fmt: skip
    except ValueError:
        object.__setattr__(ad.spec, "api_key_secret_ref", SimpleNamespace(name="user-key", key="token"))
        return ad


def test_a_users_api_key_is_mounted_and_required_by_the_builtin_runtime():
    objects = render_adapterdeployment(with_user_key(make()), CONFIG)
    c = container(objects)
    assert arg(c["command"], "--api-key-file") == "/etc/kubetune/api-key/api-key"
    assert arg(c["command"], "--admin-key-file") == "/etc/kubetune/admin-key/admin-key"
    pod = objects.deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    [volume] = [v for v in pod["volumes"] if v["name"] == mounts["/etc/kubetune/api-key"]]
    assert volume["secret"]["secretName"] == "user-key"
    assert volume["secret"]["items"] == [{"key": "token", "path": "api-key"}]


def test_vllm_takes_the_admin_key_or_the_users_as_its_one_key():
    vllm = make(runtime="vllm", resources={"gpusPerReplica": 1})
    c = container(render_adapterdeployment(vllm, CONFIG))
    assert env(c)["VLLM_API_KEY"] == {"secretKeyRef": {"name": "support-admin-key", "key": "admin-key"}}
    assert "--admin-key-file" not in c["command"] and "KUBETUNE_SERVE_ALLOWED_SOURCES" not in env(c)
    user = with_user_key(make(runtime="vllm", resources={"gpusPerReplica": 1}))
    c = container(render_adapterdeployment(user, CONFIG))
    assert env(c)["VLLM_API_KEY"] == {"secretKeyRef": {"name": "user-key", "key": "token"}}


def test_the_allow_list_is_the_declared_claims_and_buckets_and_each_jobs_own_output():
    ad = make(
        adapters=[
            {"name": "legal", "uri": "pvc://adapters/legal"},
            {"name": "remote", "uri": "s3://bucket/remote"},
            {"name": "hub", "uri": "hf://org/adapter"},
            {"name": "tuned", "fromJob": "job"},  # its job exists: its output is allowed before it finishes
            {"name": "later", "fromJob": "not-yet"},  # no job yet: nothing
        ]
    )
    objects = render_adapterdeployment(ad, CONFIG, {}, {"tuned": "pvc://outputs/job/adapter"})
    assert objects.adapters["data"]["allowed-sources"].splitlines() == [
        "hf://org/adapter",
        "pvc://adapters/",
        "pvc://outputs/job/adapter",
        "s3://bucket/",
    ]
    assert env(container(objects))["KUBETUNE_SERVE_ALLOWED_SOURCES"] == {
        "configMapKeyRef": {"name": "support-adapters", "key": "allowed-sources", "optional": True}
    }
    mounted = [m["mountPath"] for m in container(objects)["volumeMounts"]]
    assert "/mnt/pvc/outputs" in mounted  # the job's claim, ready for its adapter
    assert render_adapterdeployment(make(), CONFIG).adapters["data"]["allowed-sources"] == ""


HOSTILE = ["http://169.254.169.254/latest/meta-data/", "pvc://x/../../../proc/self", "pvc://payroll-db-data/"]


@pytest.mark.parametrize("uri", HOSTILE)
def test_a_resolved_uri_outside_its_jobs_output_reaches_no_mount_file_or_allow_list(uri):
    """Finding 7: the reconciler passes status.adapter.uri here; checked again in the renderer."""
    ad = make(adapters=[{"name": "tuned", "fromJob": "job"}])
    objects = render_adapterdeployment(ad, CONFIG, {"tuned": uri}, {"tuned": "pvc://outputs/job/adapter"})
    assert parse_adapters_file(objects.adapters["data"]["adapters.json"]) == {}
    assert objects.adapters["data"]["allowed-sources"] == "pvc://outputs/job/adapter\n"
    pod = objects.deployment["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models", "outputs"}
    assert uri not in json.dumps(objects.deployment)


@pytest.mark.parametrize("uri", HOSTILE[:2])
def test_a_uri_breaking_the_rules_is_left_out_even_without_a_job_bound(uri):
    objects = render_adapterdeployment(make(adapters=[{"name": "t", "fromJob": "job"}]), CONFIG, {"t": uri})
    assert parse_adapters_file(objects.adapters["data"]["adapters.json"]) == {}
    assert uri not in json.dumps(objects.deployment) and "proc" not in json.dumps(objects.deployment)


def test_a_spec_uri_breaking_the_rules_is_checked_again_before_rendering():
    """Admission refuses it; an object stored before that rule existed is still not rendered into a pod."""
    ad = make(adapters=[{"name": "a", "uri": "pvc://adapters/a"}])
    object.__setattr__(ad.spec.adapters[0], "uri", "pvc://adapters/../../proc/self")
    objects = render_adapterdeployment(ad, CONFIG)
    assert "proc" not in json.dumps(objects.deployment) and "proc" not in json.dumps(objects.adapters)


# --- the NetworkPolicy ---------------------------------------------------------------------------


def test_the_network_policy_admits_only_this_namespace_and_the_operator_on_the_serving_port():
    objects = render_adapterdeployment(make(service={"port": 8080}), CONFIG, operator_ns="kubetune-system")
    policy = objects.network_policy
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["metadata"]["name"] == "support-serving" and policy["metadata"]["namespace"] == "ml"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": objects.deployment["spec"]["selector"]["matchLabels"]}
    assert spec["podSelector"]["matchLabels"] == objects.service["spec"]["selector"]
    assert spec["policyTypes"] == ["Ingress"]  # egress open: hf:// and s3:// endpoints have no fixed IPs
    [rule] = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [
        {"podSelector": {}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetune-system"}},
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"}
            },
        },
    ]


def test_configured_metrics_scrapers_reach_the_serving_port():
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    config = CONFIG.model_copy(update={"metrics_scrapers": (prometheus,)})
    [rule] = render_adapterdeployment(make(), config, operator_ns="").network_policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}, prometheus]


def test_without_the_operators_namespace_only_this_namespace_is_admitted():
    [rule] = render_adapterdeployment(make(), CONFIG, operator_ns="").network_policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {}}]


def test_a_service_exposed_outside_the_cluster_admits_anyone_on_its_port_only():
    [rule] = render_adapterdeployment(make(service={"type": "LoadBalancer"}), CONFIG).network_policy["spec"]["ingress"]
    assert rule == {"ports": [{"protocol": "TCP", "port": 8000}]}
