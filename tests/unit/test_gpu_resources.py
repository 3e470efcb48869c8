"""GPU resource names: the operator's `gpuResources` (chart value config.gpuResources) lists the
extended resources workloads may request GPUs under, from the names vendors' device plugins
register. A FineTuneJob outside it is refused at admission (Admitted=False, reason NotAllowed) in
one line naming the setting; a misspelt name in the operator's own configuration stops it at start-up."""

from datetime import UTC, datetime

import pytest

from kubetune.api import AdapterDeployment, FineTuneJob
from kubetune_operator.config import ENV_VARS, KNOWN_GPU_RESOURCES, OperatorConfig, is_known_gpu_resource
from kubetune_operator.finetunejob import admission as a
from kubetune_operator.render_common import gpu_resource_problem

pytestmark = pytest.mark.unit

DEFAULT = OperatorConfig()


def job(gpu_resource: str | None = None, gpus: int = 1) -> FineTuneJob:
    resources = {"gpusPerNode": gpus, **({"gpuResource": gpu_resource} if gpu_resource else {})}
    return FineTuneJob.model_validate({
        "metadata": {"name": "tiny", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "model": {"uri": "pvc://models/tiny"},
            "dataset": {"uri": "pvc://data/chat.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 5},
            "resources": resources,
            "output": {"uri": "pvc://out/tiny"},
        },
    })  # fmt: skip


def adapter_deployment(gpu_resource: str, gpus: int = 1) -> AdapterDeployment:
    return AdapterDeployment.model_validate({
        "metadata": {"name": "serve", "namespace": "ml", "uid": "u-2"},
        "spec": {
            "baseModel": {"uri": "pvc://models/tiny"},
            "runtime": "builtin",
            "adapters": [{"name": "a", "uri": "pvc://out/tiny"}],
            "resources": {"gpusPerReplica": gpus, "gpuResource": gpu_resource},
        },
    })  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [*KNOWN_GPU_RESOURCES, "nvidia.com/mig-1g.5gb", "nvidia.com/mig-3g.40gb", "nvidia.com/mig-7g.141gb",
     "nvidia.com/mig-1g.10gb+me", "nvidia.com/mig-1g.23gb+me.all", "nvidia.com/mig-1g.23gb-me"],
)  # fmt: skip
def test_vendor_names_are_known(name):
    assert is_known_gpu_resource(name)
    assert OperatorConfig(gpu_resources=(name,)).gpu_resources == (name,)


@pytest.mark.parametrize(
    "name",
    ["nvidia.com/gpus", "nvidia.com/GPU", "cpu", "memory", "nvidia.com/mig-9g.5gb", "nvidia.com/mig-1g",
     "nvidia.com/mig-1g.5gb\n", "example.com/gpu", "amd.com/gpu ", ""],
)  # fmt: skip
def test_other_names_stop_the_operator_at_start_up(name):
    assert not is_known_gpu_resource(name)
    with pytest.raises(ValueError, match="unknown GPU resource name"):
        OperatorConfig(gpu_resources=("nvidia.com/gpu", name))


def test_a_misspelt_name_in_the_environment_is_named_with_its_variable():
    with pytest.raises(ValueError, match=r"KUBETUNE_OPERATOR_GPU_RESOURCES: .*\['nvidia.com/gpus'\]"):
        OperatorConfig.from_env({"KUBETUNE_OPERATOR_GPU_RESOURCES": "amd.com/gpu,nvidia.com/gpus"})


def test_the_list_comes_from_the_environment_or_the_file(tmp_path):
    config = OperatorConfig.from_env({"KUBETUNE_OPERATOR_GPU_RESOURCES": "nvidia.com/gpu, amd.com/gpu"})
    assert config.gpu_resources == ("nvidia.com/gpu", "amd.com/gpu")
    assert ENV_VARS["gpu_resources"] == "KUBETUNE_OPERATOR_GPU_RESOURCES"
    path = tmp_path / "config.yaml"
    path.write_text("gpuResources: [habana.ai/gaudi]\n")
    assert OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)}).gpu_resources == ("habana.ai/gaudi",)
    path.write_text("gpuResources: []\n")
    with pytest.raises(ValueError, match="gpu_resources"):
        OperatorConfig.from_env({"KUBETUNE_CONFIG": str(path)})
    assert DEFAULT.gpu_resources == ("nvidia.com/gpu",)


def test_a_job_requesting_an_unlisted_resource_is_not_admitted():
    result = a.admit(job("amd.com/gpu"), DEFAULT)
    assert not result.admitted and result.reason == "NotAllowed"
    assert "'amd.com/gpu'" in result.message and "config.gpuResources" in result.message
    assert "['nvidia.com/gpu']" in result.message and "\n" not in result.message


def test_a_listed_resource_is_admitted():
    assert a.admit(job(), DEFAULT).admitted
    amd = OperatorConfig(gpu_resources=("nvidia.com/gpu", "amd.com/gpu"))
    assert a.admit(job("amd.com/gpu"), amd).admitted
    assert not a.admit(job("nvidia.com/gpu"), OperatorConfig(gpu_resources=("amd.com/gpu",))).admitted


def test_a_job_without_gpus_is_not_held_to_the_list():
    # gpuResource defaults to nvidia.com/gpu: a CPU job on an AMD-only cluster requests none of it.
    assert a.admit(job(gpus=0), OperatorConfig(gpu_resources=("amd.com/gpu",))).admitted
    assert gpu_resource_problem("amd.com/gpu", 0, DEFAULT) is None


def test_the_same_check_serves_adapter_deployments():
    ad = adapter_deployment("gpu.intel.com/xe", gpus=2)
    problem = gpu_resource_problem(ad.spec.resources.gpu_resource, ad.spec.resources.gpus_per_replica, DEFAULT)
    assert problem is not None and "'gpu.intel.com/xe'" in problem
    # status.py reads "not allowed by the operator" as reason NotAllowed.
    assert "not allowed by the operator" in problem
    intel = OperatorConfig(gpu_resources=("gpu.intel.com/xe",))
    assert gpu_resource_problem(ad.spec.resources.gpu_resource, 2, intel) is None


def test_an_absurd_name_is_cut_short_in_the_message():
    problem = gpu_resource_problem("x" * 5000, 1, DEFAULT)
    assert problem is not None and len(problem) < 400


def test_an_adapter_deployment_on_an_unlisted_resource_is_not_rendered_and_reads_not_allowed():
    from kubetune_operator.adapterdeployment.render import RenderError, render_adapterdeployment
    from kubetune_operator.adapterdeployment.status import refused_status

    with pytest.raises(RenderError) as refused:
        render_adapterdeployment(adapter_deployment("amd.com/gpu", gpus=1), DEFAULT)
    assert "'amd.com/gpu' is not allowed by the operator" in str(refused.value)
    status = refused_status({}, 1, str(refused.value), datetime(2026, 1, 2, tzinfo=UTC))
    reasons = {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}
    assert reasons["Available"] == ("False", "NotAllowed") and reasons["Stalled"] == ("True", "NotAllowed"), reasons
    amd = OperatorConfig(gpu_resources=("amd.com/gpu",))
    assert render_adapterdeployment(adapter_deployment("amd.com/gpu", gpus=1), amd).deployment
