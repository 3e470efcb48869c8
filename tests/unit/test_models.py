"""The API models: defaults, wire format, and cross-field rules with the words users see."""

import pytest
from pydantic import ValidationError

from kubetune.api import FineTuneJob, FineTuneJobSpec
from kubetune.api.adapterdeployment import AdapterDeploymentSpec
from kubetune.api.common import parse_quantity
from tests.unit.support import MINIMAL, spec


def error_text(raw: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(raw)
    return str(caught.value)


def test_hyperparameters_may_be_left_out_and_mean_one_epoch_with_the_defaults():
    raw = {key: value for key, value in MINIMAL.items() if key != "hyperparameters"}
    parsed = FineTuneJobSpec.model_validate(raw)
    assert parsed.hyperparameters == FineTuneJobSpec.model_validate(spec(**{"hyperparameters": {}})).hyperparameters
    assert parsed.hyperparameters.epoch_count == 1 and parsed.hyperparameters.max_steps is None
    assert parsed.hyperparameters.global_batch_size == 16


def test_minimal_spec_gets_the_documented_defaults():
    parsed = FineTuneJobSpec.model_validate(MINIMAL)
    assert parsed.method.type == "lora"
    assert parsed.method.effective_lora().target_modules == ["all-linear"]
    assert parsed.hyperparameters.lr == 2e-4
    assert parsed.distributed.strategy == "auto"
    assert parsed.resources.world_size == 1
    assert parsed.checkpointing.every_steps == 200 and parsed.checkpointing.keep == 2


def test_wire_format_is_camel_case_and_round_trips():
    parsed = FineTuneJobSpec.model_validate(spec(**{"dataset.maxSeqLength": 512, "method.type": "qlora"}))
    wire = parsed.to_wire()
    assert wire["dataset"]["maxSeqLength"] == 512
    assert "max_seq_length" not in str(wire)
    assert "quantization" not in wire["method"]  # unset optionals stay unset
    assert FineTuneJobSpec.model_validate(wire) == parsed


def test_python_names_are_accepted_too():
    parsed = FineTuneJobSpec.model_validate(spec(**{"hyperparameters.learning_rate": 1e-4}))
    assert parsed.hyperparameters.learning_rate == "0.0001"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"method.type": "lora", "method.quantization": {"bits": 4}},
            "method.quantization is only allowed with method.type qlora",
        ),
        (
            {"method.type": "full", "method.lora": {"r": 8}},
            "method.lora is only allowed with method.type lora, qlora, dora",
        ),
        ({"hyperparameters.maxSteps": 10}, "set at most one of hyperparameters.epochs and hyperparameters.maxSteps"),
        (
            {
                "hyperparameters.globalBatchSize": 12,
                "hyperparameters.microBatchSize": 2,
                "resources.nodes": 2,
                "resources.gpusPerNode": 4,
            },
            "hyperparameters.globalBatchSize (12) must be a multiple of microBatchSize (2) x world size (8)",
        ),
        ({"objective": "dpo"}, "objective dpo needs dataset.format preference"),
        ({"dpo": {"beta": 0.2}}, "spec.dpo is only allowed with objective dpo"),
        ({"distributed.strategy": "ddp", "distributed.offload": "cpu"}, "distributed.offload cpu needs strategy fsdp"),
        ({"dataset.validation": {}}, "dataset.validation needs exactly one of fraction or uri"),
        ({"method.type": "adalora", "method.adalora": {"initR": 4, "targetR": 8}}, "targetR must not exceed initR"),
        ({"resources.memory": "lots"}, "'lots' is not a Kubernetes quantity"),
        ({"hyperparameters.learningRate": "fast"}, "String should match pattern"),
        ({"method.type": "lorax"}, "Input should be 'full', 'lora'"),
    ],
)
def test_rules_reject_with_their_message(overrides, message):
    assert message in error_text(spec(**overrides))


def test_cpu_training_counts_as_world_size_one_per_node():
    parsed = FineTuneJobSpec.model_validate(
        spec(
            **{
                "resources.nodes": 3,
                "resources.gpusPerNode": 0,
                "hyperparameters.globalBatchSize": 6,
                "hyperparameters.microBatchSize": 2,
            }
        )
    )
    assert parsed.resources.world_size == 3


def test_whole_object_parses_with_status_and_metadata():
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "x", "namespace": "ml", "uid": "123", "resourceVersion": "9"},
            "spec": MINIMAL,
            "status": {
                "phase": "Running",
                "plan": {"estimatedGpuMemoryGiB": 17.9},
                "conditions": [{"type": "Admitted", "status": "True"}],
            },
        }
    )
    assert job.status.plan.estimated_gpu_memory_gib == 17.9
    assert job.to_wire()["status"]["plan"] == {"estimatedGpuMemoryGiB": 17.9}


def test_adapter_names_must_be_dns_labels():
    with pytest.raises(ValidationError, match="String should match pattern"):
        AdapterDeploymentSpec.model_validate(
            {"baseModel": {"uri": "hf://a/b"}, "adapters": [{"name": "Bad_Name", "uri": "pvc://a/b"}]}
        )


@pytest.mark.parametrize("text, value", [("64Gi", 64 * 2**30), ("500m", 0.5), ("8", 8), (4, 4), ("1.5G", 1.5e9)])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == pytest.approx(value)
