"""The operator's allow-lists: which images and PriorityClasses a FineTuneJob author may pick.
Refused as Admitted=False reason NotAllowed, in one line naming the value and the chart value that
governs it; the renderer refuses the same (a last line of defence)."""

import pytest

from kubetune.api import FineTuneJob
from kubetune_operator.config import ENV_VARS, OperatorConfig
from kubetune_operator.finetunejob import admission as a
from kubetune_operator.finetunejob import status as s
from kubetune_operator.finetunejob.render import render_finetunejob
from kubetune_operator.render_common import RenderError, image_problem, priority_class_problem

pytestmark = pytest.mark.unit


def job(image=None, priority=None) -> FineTuneJob:
    resources = {"gpusPerNode": 0, **({"priorityClassName": priority} if priority else {})}
    return FineTuneJob.model_validate({
        "metadata": {"name": "tiny", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "model": {"uri": "pvc://models/tiny"},
            "dataset": {"uri": "pvc://data/chat.jsonl", "format": "chat"},
            "hyperparameters": {"maxSteps": 5},
            "resources": resources,
            "output": {"uri": "pvc://out/tiny"},
            **({"image": image} if image else {}),
        },
    })  # fmt: skip


DEFAULT = OperatorConfig()


@pytest.mark.parametrize(
    "image",
    [
        None,
        "ghcr.io/kubetune/trainer:0.2.0",
        "ghcr.io/kubetune/trainer@sha256:" + "a" * 64,
        "ghcr.io/kubetune/serve:0.1.0",
    ],
)
def test_the_projects_own_images_are_allowed_by_default(image):
    assert image_problem(image, DEFAULT) is None
    assert a.admit(job(image), DEFAULT).admitted


@pytest.mark.parametrize(
    "image",
    ["docker.io/evil/miner:latest", "ghcr.io/kubetune/trainer-evil:1", "ghcr.io/kubetune/trainerx", "ghcr.io/kubetune"],
)
def test_another_image_is_not_admitted(image):
    result = a.admit(job(image), DEFAULT)
    assert not result.admitted and result.reason == "NotAllowed"
    assert image in result.message and "allowedImages" in result.message and "\n" not in result.message
    with pytest.raises(RenderError, match="allowedImages"):
        render_finetunejob(job(image), DEFAULT)


def test_the_allow_list_is_the_operators_own_setting():
    config = OperatorConfig(allowed_images=("registry.local/ml/",))
    assert a.admit(job("registry.local/ml/trainer:7"), config).admitted
    assert not a.admit(job("ghcr.io/kubetune/trainer:0.2.0"), config).admitted
    assert a.admit(job(), config).admitted  # the operator's own trainer image is always allowed
    assert a.admit(job("anything/at:all"), OperatorConfig(allowed_images=("*",))).admitted


@pytest.mark.parametrize("priority", ["system-node-critical", "system-cluster-critical", "system-anything"])
def test_system_priority_classes_are_refused_unless_listed(priority):
    result = a.admit(job(priority=priority), DEFAULT)
    assert not result.admitted and result.reason == "NotAllowed"
    assert priority in result.message and "allowedPriorityClasses" in result.message
    listed = OperatorConfig(allowed_priority_classes=(priority,))
    assert a.admit(job(priority=priority), listed).admitted


def test_any_other_priority_class_unless_a_list_is_given():
    assert priority_class_problem("batch-low", DEFAULT) is None
    assert a.admit(job(priority="batch-low"), DEFAULT).admitted
    only = OperatorConfig(allowed_priority_classes=("batch-high",))
    assert not a.admit(job(priority="batch-low"), only).admitted
    assert a.admit(job(priority="batch-high"), only).admitted


def test_a_refusal_for_not_allowed_is_looked_at_again_when_the_spec_changes():
    assert "NotAllowed" in s.ADMISSION_REASONS


def test_allow_lists_and_the_admin_key_from_the_environment():
    config = OperatorConfig.from_env({
        "KUBETUNE_OPERATOR_ALLOWED_IMAGES": "registry.local/a/, registry.local/b:1",
        "KUBETUNE_OPERATOR_ALLOWED_PRIORITY_CLASSES": "high,low",
        "KUBETUNE_OPERATOR_ADMIN_KEY": "s3cret",
        "KUBETUNE_OPERATOR_NAMESPACE": "kubetune-system",
    })  # fmt: skip
    assert config.allowed_images == ("registry.local/a/", "registry.local/b:1")
    assert config.allowed_priority_classes == ("high", "low")
    assert config.admin_key_secret == "s3cret" and config.operator_namespace == "kubetune-system"
    assert ENV_VARS["admin_key_secret"] == "KUBETUNE_OPERATOR_ADMIN_KEY"
    assert "s3cret" not in repr(config)  # never in a log line


def test_default_allow_list_follows_the_configured_images():
    config = OperatorConfig(trainer_image="registry.local/t/trainer:1", serving_image="registry.local/s/serve:1")
    assert config.image_allow_list == ("registry.local/t/trainer", "registry.local/s/serve")
    assert image_problem("registry.local/t/trainer:2", config) is None
    assert image_problem("ghcr.io/kubetune/trainer:0.1.0", config) is not None
