"""Semantic validation: what CEL cannot check, with the field and the fix in every message."""

import pytest

from kubetune.api import FineTuneJobSpec, validate
from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.validation import check_target_modules, check_uri, validate_finetunejob
from tests.unit.support import spec


def problems(local=False, **overrides):
    return [str(p) for p in validate_finetunejob(FineTuneJobSpec.model_validate(spec(**overrides)), local)]


def test_a_good_spec_has_no_problems():
    assert problems() == []


@pytest.mark.parametrize(
    "uri, schemes, local, message",
    [
        ("pvc://Bad_Claim/x", ("pvc",), False, "'Bad_Claim' is not a valid PersistentVolumeClaim name"),
        ("s3://A/x", ("s3",), False, "'A' is not a valid S3 bucket name"),
        ("pvc:///x", ("pvc",), False, "missing the claim name after pvc://"),
        ("configmap://data", ("configmap",), False, "name the key too, configmap://NAME/KEY"),
        ("gs://bucket/x", ("hf", "s3"), False, "scheme must be one of hf://, s3://"),
        ("file:///data/x", ("file",), False, "file:// only works with `kubetune train`"),
        ("file://data/x", ("file",), True, "file:// needs an absolute path"),
    ],
)
def test_uri_problems(uri, schemes, local, message):
    (problem,) = check_uri("spec.x", uri, schemes, local)
    assert message in str(problem) and str(problem).startswith("spec.x: ")


@pytest.mark.parametrize(
    "uri", ["hf://Qwen/Qwen2.5-0.5B", "pvc://models/llama/8b", "s3://my-bucket/a/b", "https://x.io/d.jsonl"]
)
def test_good_uris(uri):
    assert check_uri("spec.x", uri, ("hf", "pvc", "s3", "https"), local=False) == []


def test_file_uris_are_fine_locally():
    assert problems(local=True, **{"model.uri": "file:///models/tiny", "output.uri": "file:///tmp/out"}) == []


def test_target_module_typos_get_a_suggestion():
    (problem,) = check_target_modules("p", ["q_proj", "gate_prj"])
    assert "unknown module 'gate_prj'; did you mean 'gate_proj'?" in str(problem)
    assert "list it alone" in str(check_target_modules("p", ["all-linear", "q_proj"])[0])


def test_learning_rate_out_of_range():
    assert any("outside (0, 1]" in p for p in problems(**{"hyperparameters.learningRate": "3"}))


def test_fp16_needs_a_gpu():
    found = problems(**{"resources.gpusPerNode": 0, "hyperparameters.precision": "fp16"})
    assert found == [
        "spec.hyperparameters.precision: fp16 needs a GPU; use bf16 or fp32 when resources.gpusPerNode is 0"
    ]


def test_adapter_uris_are_checked():
    obj = AdapterDeployment.model_validate(
        {"spec": {"baseModel": {"uri": "hf://a/b"}, "adapters": [{"name": "x", "uri": "ftp://h/a"}]}}
    )
    assert [p.path for p in validate(obj)] == ["spec.adapters[0].uri"]


@pytest.mark.parametrize(
    "method, strategy, message",
    [
        ("adalora", "fsdp", "adalora needs whole gradients to reallocate ranks; use ddp or auto, not fsdp"),
        ("qlora", "deepspeed-zero3", "qlora's 4-bit weights cannot be sharded by deepspeed-zero3"),
    ],
)
def test_method_and_strategy_pairs_the_trainer_cannot_run(method, strategy, message):
    found = problems(
        **{
            "method.type": method,
            "distributed.strategy": strategy,
            "resources.gpusPerNode": 2,
            "hyperparameters.globalBatchSize": 4,
        }
    )
    assert any(p.startswith("spec.distributed.strategy: " + message) for p in found), found


def test_auto_is_always_fine():
    assert problems(**{"method.type": "qlora", "distributed.strategy": "auto"}) == []
