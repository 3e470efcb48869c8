"""Admission: what the operator accepts, what it refuses with which words, and the plan it records.
Every valid example is admitted; the file:// example is refused as InvalidSpec; a 70B full
fine-tune on one GPU is refused as InsufficientGpuMemory with advice."""

import pytest

from kubetune.api import FineTuneJob, check_file
from kubetune.planning import method_trainable_params
from kubetune_operator.config import OperatorConfig
from kubetune_operator.finetunejob import admission as a
from kubetune_operator.finetunejob.render import render_finetunejob
from tests.examples import EXAMPLES, valid_examples


def example(name: str, **metadata) -> FineTuneJob:
    [job] = [c.obj for c in check_file(EXAMPLES / name, local=True) if c.kind == "FineTuneJob"]
    job.metadata.namespace = job.metadata.namespace or "default"
    job.metadata.uid = "u-1"
    for key, value in metadata.items():
        setattr(job.metadata, key, value)
    return job


def minimal(model="hf://meta-llama/Llama-3.1-70B", method="lora", gpus=1, annotations=None, **spec) -> FineTuneJob:
    return FineTuneJob.model_validate({
        "metadata": {"name": "big", "namespace": "ml", "uid": "u-1", "annotations": annotations or {}},
        "spec": {
            "model": {"uri": model},
            "dataset": {"uri": "s3://data/chat.jsonl", "format": "chat"},
            "method": {"type": method},
            "hyperparameters": {"epochs": 1, "globalBatchSize": 16},
            "resources": {"gpusPerNode": gpus, **spec.pop("resources", {})},
            "output": {"uri": "s3://adapters/big"},
            **spec,
        },
    })  # fmt: skip


@pytest.mark.parametrize("path", [p.name for p in valid_examples() if "kind: FineTuneJob" in p.read_text()])
def test_every_valid_example_is_admitted_and_renders_with_its_plan(path):
    job = example(path)
    result = a.admit(job)
    assert result.admitted, result.message
    render_finetunejob(job, OperatorConfig(), result.plan)  # the plan's world size matches the spec


def test_file_uri_is_invalid_spec_with_the_validators_words():
    job = FineTuneJob.model_validate(
        {
            **example("lora-chat.yaml").to_wire(),
            "spec": {**example("lora-chat.yaml").to_wire()["spec"], "model": {"uri": "file:///home/me/models/llama"}},
        }
    )
    result = a.admit(job)
    assert not result.admitted and result.reason == "InvalidSpec"
    assert "spec.model.uri: 'file:///home/me/models/llama': file:// only works with `kubetune train`" in result.message


def test_full_70b_on_one_gpu_is_refused_with_advice():
    result = a.admit(minimal(method="full"))
    assert not result.admitted and result.reason == "InsufficientGpuMemory"
    assert "80 GiB" in result.message and "qlora" in result.message and "fsdp over" in result.message
    assert result.plan.total_params == 70_553_706_496


def test_lora_on_8b_is_admitted_with_a_plan():
    result = a.admit(minimal(model="hf://meta-llama/Llama-3.1-8B-Instruct"))
    assert result.admitted and result.plan.strategy == "ddp" and result.plan.world_size == 1
    assert 15_000_000 < result.plan.trainable_params < 60_000_000  # r=16 on all linear layers of Llama-8B
    assert result.plan.estimated_gpu_memory_gib < 80


@pytest.mark.parametrize(
    ("uri", "total"),
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
        ("hf://Qwen/Qwen2.5-7B", 7_615_616_512),
        ("hf://Qwen/Qwen2.5-Coder-1.5B", 1_543_714_304),
        ("hf://Qwen/Qwen2.5-32B-Instruct", 32_763_876_352),
        ("hf://mistralai/Mistral-7B-Instruct-v0.3", 7_241_732_096),
        ("hf://meta-llama/Llama-3.1-70B-Instruct", 70_553_706_496),
    ],
)
def test_well_known_models(uri, total):
    arch = a.known_architecture(uri)
    assert arch is not None and arch.shape.total_params == total


def test_an_unknown_model_is_admitted_without_the_memory_check():
    result = a.admit(minimal(model="pvc://models/tiny-llama", method="full"))
    assert result.admitted and "without a GPU memory check" in result.message
    assert a.MODEL_PARAMS_ANNOTATION in result.message
    assert result.plan.world_size == 1 and result.plan.total_params is None


def test_the_annotation_states_the_models_size():
    result = a.admit(minimal(model="pvc://models/big", method="full", annotations={a.MODEL_PARAMS_ANNOTATION: "70B"}))
    assert not result.admitted and result.reason == "InsufficientGpuMemory"
    bad = a.admit(minimal(model="pvc://models/big", annotations={a.MODEL_PARAMS_ANNOTATION: "huge"}))
    assert bad.admitted and "is not a parameter count" in bad.message


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("7B", 7_000_000_000),
        ("1.5b", 1_500_000_000),
        ("494M", 494_000_000),
        ("7e9", 7_000_000_000),
        ("8030261248", 8_030_261_248),
        ("", None),
        ("-1", None),
    ],
)
def test_parse_param_count(text, count):
    assert a.parse_param_count(text) == count


def test_gpu_memory_from_the_node_selector_and_the_annotation():
    def on(product):
        return minimal(resources={"nodeSelector": {a.GPU_PRODUCT_LABEL: product}})

    assert a.gpu_memory_gib(on("Tesla-T4"))[0] == 16.0
    assert a.gpu_memory_gib(on("NVIDIA-A100-SXM4-80GB"))[0] == 80.0
    assert a.gpu_memory_gib(on("NVIDIA-H100-80GB-HBM3"))[0] == 80.0
    assert a.gpu_memory_gib(minimal(annotations={a.GPU_MEMORY_ANNOTATION: "141"}))[0] == 141.0
    assert a.gpu_memory_gib(minimal())[0] == a.DEFAULT_GPU_MEMORY_GIB


def test_cpu_jobs_are_never_refused_for_memory():
    result = a.admit(minimal(method="full", gpus=0, hyperparameters={"epochs": 1, "precision": "fp32"}))
    assert result.admitted and result.plan.estimated_gpu_memory_gib is None


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "adalora", "ia3", "prefixTuning", "promptTuning"])
def test_adapter_methods_train_a_small_fraction(method):
    job = minimal(model="hf://meta-llama/Llama-3.1-8B", method=method)
    arch = a.known_architecture(job.spec.model.uri)
    assert 0 < a.trainable_params(job, arch) < arch.shape.total_params / 20


@pytest.mark.parametrize("method", ["loha", "lokr", "vera", "oft", "hra", "fourierft", "lnTuning"])
def test_the_newer_adapter_methods_are_counted_by_the_planners_exact_formulas(method):
    job = minimal(model="hf://meta-llama/Llama-3.1-8B", method=method)
    arch = a.known_architecture(job.spec.model.uri)
    counted = a.trainable_params(job, arch)
    assert counted == method_trainable_params(job.spec.method, arch.decoder)
    assert 0 < counted < arch.shape.total_params / 20
    assert a.admit(job).plan.trainable_params == counted


# --- hostile annotations -------------------------------------------------------------------------

HOSTILE_COUNTS = ["1e999", "1e400", "nan", "NaN", "inf", "-1", "0", "abc", "9" * 400, "1" + "0" * 5000, "1e15T",
                  "7B" * 100, "", " ", "\x00"]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE_COUNTS, ids=range(len(HOSTILE_COUNTS)))
def test_a_hostile_model_params_annotation_is_a_clear_problem_never_an_exception(text):
    assert a.parse_param_count(text) is None
    result = a.admit(minimal(model="pvc://models/big", annotations={a.MODEL_PARAMS_ANNOTATION: text}))
    assert result.admitted and "not a parameter count" in result.message  # admitted without the memory check
    assert "\n" not in result.message and len(result.message) < 1000


@pytest.mark.parametrize("text", ["inf", "1e999", "nan", "-5", "0", "1e300", "abc"])
def test_a_hostile_gpu_memory_annotation_is_ignored(text):
    budget, source = a.gpu_memory_gib(minimal(annotations={a.GPU_MEMORY_ANNOTATION: text}))
    assert budget == a.DEFAULT_GPU_MEMORY_GIB and "annotation" not in source
    a.admit(minimal(annotations={a.GPU_MEMORY_ANNOTATION: text}))  # never raises
