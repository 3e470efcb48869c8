"""render/adapterdeployment.py: the Deployment and Service of an AdapterDeployment."""

import pytest

from kubetune_operator.api.adapterdeployment import AdapterDeployment
from kubetune_operator.config import OperatorConfig
from kubetune_operator.render.adapterdeployment import adapter_path, endpoint, render_adapterdeployment
from kubetune_operator.render.common import RenderError

CONFIG = OperatorConfig()


def make(**spec) -> AdapterDeployment:
    wire = {"baseModel": {"uri": "pvc://models/base"}, "resources": {"gpusPerReplica": 0}, **spec}
    return AdapterDeployment.model_validate({"metadata": {"name": "support", "namespace": "ml", "uid": "u-1"},
                                             "spec": wire})


def container(objects) -> dict:
    return objects.deployment["spec"]["template"]["spec"]["containers"][0]


def test_builtin_deployment_and_service():
    objects = render_adapterdeployment(make(replicas=2, adapters=[{"name": "legal", "uri": "pvc://adapters/legal"}]),
                                       CONFIG)
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
    assert "--adapter" not in c["command"]  # adapters are loaded at run time
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] and mounts["/mnt/pvc/adapters"]["readOnly"]
    assert "/scratch" in mounts
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert endpoint("support", "ml", 8000) == "http://support.ml.svc:8000/v1"


def test_adapter_set_does_not_change_the_pod_template():
    a = render_adapterdeployment(make(adapters=[{"name": "a", "uri": "pvc://models/a"}]), CONFIG).deployment
    b = render_adapterdeployment(make(adapters=[{"name": "b", "uri": "pvc://models/b"},
                                                {"name": "c", "fromJob": "job"}]), CONFIG).deployment
    assert a["spec"]["template"] == b["spec"]["template"]
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]


def test_vllm_command_env_and_gpus():
    ad = make(runtime="vllm", resources={"gpusPerReplica": 1}, maxAdapters=4, maxLoraRank=32)
    c = container(render_adapterdeployment(ad, CONFIG))
    assert c["command"][:4] == ["vllm", "serve", "/mnt/pvc/models/base", "--enable-lora"]
    assert c["command"][c["command"].index("--max-loras") + 1] == "4"
    assert c["command"][c["command"].index("--max-lora-rank") + 1] == "32"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert adapter_path("vllm", "pvc://adapters/x/y") == "/mnt/pvc/adapters/x/y"
    assert adapter_path("builtin", "pvc://adapters/x") == "pvc://adapters/x"


def test_vllm_cannot_read_s3_and_uid_is_required():
    with pytest.raises(RenderError, match="s3"):
        render_adapterdeployment(make(runtime="vllm", baseModel={"uri": "s3://b/m"}, resources={"gpusPerReplica": 1}),
                                 CONFIG)
    ad = make()
    ad.metadata.uid = None
    with pytest.raises(RenderError, match="uid"):
        render_adapterdeployment(ad, CONFIG)


def test_resolved_job_claims_are_mounted():
    objects = render_adapterdeployment(make(), CONFIG, ["pvc://outputs/job-1"])
    paths = [m["mountPath"] for m in container(objects)["volumeMounts"]]
    assert "/mnt/pvc/outputs" in paths
