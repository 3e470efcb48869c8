"""adapterdeployment/render.py: the adapters ConfigMap, Deployment and Service of an AdapterDeployment."""

import json
import subprocess
import sys

import pytest

from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.adaptersfile import PATH_IN_POD, parse_adapters_file
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
    a = render_adapterdeployment(make(adapters=[{"name": "a", "uri": "pvc://models/a"}]), CONFIG).deployment
    b = render_adapterdeployment(
        make(adapters=[{"name": "b", "uri": "pvc://models/b"}, {"name": "c", "fromJob": "job"}]), CONFIG
    ).deployment
    assert a["spec"]["template"] == b["spec"]["template"]
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]


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
    assert [o["kind"] for o in vllm.all()] == ["ConfigMap", "Service", "Deployment"]


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
