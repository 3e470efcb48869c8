"""spec.output.export: what may be exported, with which method and model, and what the trainer reports."""

import pydantic
import pytest

from kubetune.api import FineTuneJobSpec, crdgen
from kubetune.api.finetunejob import (
    EXPORT_METHOD_RULE,
    UNMERGEABLE_METHODS,
    OutputSpec,
    gguf_architecture_problem,
    gguf_model_problem,
)
from kubetune.api.kinds import FINETUNEJOB
from kubetune.contract import MAX_EXPORTED_FILES, TrainerResult, gguf_file_name
from tests.unit.support import spec

OUTPUT = "pvc://adapters/out"


def output(**fields) -> OutputSpec:
    return OutputSpec.model_validate({"uri": OUTPUT, **fields})


def rejection(**fields) -> str:
    with pytest.raises(pydantic.ValidationError) as error:
        output(**fields)
    return str(error.value)


def test_nothing_is_exported_by_default():
    assert output().exports == ()
    assert output().gguf_types() == []
    assert output().to_wire() == {"uri": OUTPUT, "mergeWeights": False, "export": []}


@pytest.mark.parametrize(
    "fields, exports",
    [
        ({"export": ["merged"]}, ("merged",)),
        ({"mergeWeights": True}, ("merged",)),  # the older spelling means the same
        ({"mergeWeights": True, "export": ["merged"]}, ("merged",)),
        ({"export": ["gguf"]}, ("gguf",)),
        ({"export": ["gguf", "merged"]}, ("merged", "gguf")),  # merged first: gguf reads the merged weights
        ({"mergeWeights": True, "export": ["gguf"]}, ("merged", "gguf")),
    ],
)
def test_what_is_exported(fields, exports):
    assert output(**fields).exports == exports


def test_gguf_is_f16_unless_types_are_given():
    assert output(export=["gguf"]).gguf_types() == ["f16"]
    assert output(export=["gguf"], gguf={"types": ["q8_0", "f16"]}).gguf_types() == ["q8_0", "f16"]
    assert output(export=["merged"]).gguf_types() == []


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"export": ["gguf", "gguf"]}, "output.export lists an entry twice"),
        ({"export": ["gguf"], "gguf": {"types": ["f16", "f16"]}}, "output.gguf.types lists an entry twice"),
        (
            {"export": ["merged"], "gguf": {"types": ["f16"]}},
            "output.gguf is only allowed when output.export lists gguf",
        ),
        ({"export": ["onnx"]}, "Input should be 'merged' or 'gguf'"),
        ({"export": ["gguf"], "gguf": {"types": ["q4_k"]}}, "Input should be 'f16' or 'q8_0'"),
        ({"export": ["gguf"], "gguf": {"types": []}}, "at least 1 item"),
        ({"export": ["gguf"], "gguf": {"kinds": ["f16"]}}, "Extra inputs are not permitted"),
    ],
)
def test_mistakes_are_refused_in_one_line(fields, message):
    assert message in rejection(**fields)


def job(method: str, **output_fields) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec(**{"method.type": method, "output": {"uri": OUTPUT, **output_fields}}))


@pytest.mark.parametrize("method", UNMERGEABLE_METHODS)
@pytest.mark.parametrize("fields", [{"export": ["gguf"]}, {"export": ["merged"]}, {"mergeWeights": True}])
def test_soft_prompt_methods_have_nothing_to_merge(method, fields):
    with pytest.raises(pydantic.ValidationError, match="prefixTuning and promptTuning train soft prompts"):
        job(method, **fields)
    assert "\n" not in EXPORT_METHOD_RULE.message


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3", "adalora", "full"])
def test_methods_that_change_weights_export(method):
    assert EXPORT_METHOD_RULE.check(job(method, export=["merged", "gguf"]))


@pytest.mark.parametrize("method", UNMERGEABLE_METHODS)
def test_soft_prompts_without_export_are_fine(method):
    assert EXPORT_METHOD_RULE.check(job(method))


def test_the_method_rule_speaks_cel_about_the_same_fields():
    cel = EXPORT_METHOD_RULE.cel
    assert "self.output.mergeWeights" in cel and "size(self.output.export) > 0" in cel
    assert "self.method.type in ['prefixTuning', 'promptTuning']" in cel
    assert EXPORT_METHOD_RULE.field_path == ".output"


def test_the_crd_carries_the_output_rules():
    spec_schema = crdgen.crd(FINETUNEJOB)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    out = spec_schema["properties"]["output"]
    rules = {rule["rule"]: rule for rule in out["x-kubernetes-validations"]}
    assert rules["self.export.all(x, self.export.exists_one(y, y == x))"]["fieldPath"] == ".export"
    assert "!has(self.gguf) || 'gguf' in self.export" in rules
    assert out["properties"]["export"]["items"]["enum"] == ["merged", "gguf"]
    assert out["properties"]["export"]["maxItems"] == 2
    types = out["properties"]["gguf"]["properties"]["types"]
    assert types["items"]["enum"] == ["f16", "q8_0"] and types["default"] == ["f16"]


@pytest.mark.parametrize(
    "uri, family",
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", "qwen"),
        ("hf://google/gemma-2-2b-it", "gemma"),
        ("hf://microsoft/Phi-3-mini-4k-instruct", "phi"),
        ("hf://mistralai/Mixtral-8x7B-v0.1", "mixtral"),
    ],
)
def test_models_llama_cpp_reads_as_another_architecture_are_named(uri, family):
    problem = gguf_model_problem(uri)
    assert problem and f"looks like {family}," in problem and "convert_hf_to_gguf.py" in problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    "uri",
    ["hf://meta-llama/Llama-3.1-8B-Instruct", "hf://mistralai/Mistral-7B-v0.3", "pvc://models/qwen", "s3://b/m"],
)
def test_llama_family_and_unnamed_models_pass_validation(uri):
    assert gguf_model_problem(uri) is None  # pvc:// and s3:// models: the trainer reads config.json first


def test_architectures_from_config_json():
    assert gguf_architecture_problem(["LlamaForCausalLM"]) is None
    assert gguf_architecture_problem(["MistralForCausalLM"]) is None
    problem = gguf_architecture_problem(["Qwen2ForCausalLM"])
    assert problem and "not Qwen2ForCausalLM" in problem
    assert "no architecture in config.json" in (gguf_architecture_problem(None) or "")


def result(adapter: dict) -> TrainerResult:
    return TrainerResult.model_validate({"phase": "Succeeded", "adapter": {"uri": OUTPUT + "/adapter", **adapter}})


def gguf_entry(kind: str = "f16", **fields) -> dict:
    return {"type": kind, "uri": f"{OUTPUT}/{gguf_file_name(kind)}", "sizeBytes": 1234, "sha256": "a" * 64, **fields}


def test_the_result_lists_the_gguf_files():
    wire = result({"gguf": [gguf_entry("f16"), gguf_entry("q8_0")]}).to_wire()
    assert [entry["uri"] for entry in wire["adapter"]["gguf"]] == [
        f"{OUTPUT}/model-f16.gguf",
        f"{OUTPUT}/model-q8_0.gguf",
    ]
    assert wire["adapter"]["gguf"][0] == gguf_entry("f16")


def test_a_result_without_exports_says_nothing_about_them():
    assert "gguf" not in result({}).to_wire()["adapter"]


def test_unusable_file_entries_are_dropped_not_the_result():
    hostile = [gguf_entry(), gguf_entry("Q8 0"), gguf_entry(sizeBytes=-1), "x", None, gguf_entry(uri="u" * 5000)]
    parsed = result({"gguf": hostile})
    assert parsed.adapter is not None and parsed.adapter.uri == OUTPUT + "/adapter"
    assert [file.type for file in parsed.adapter.gguf or []] == ["f16"]
    assert result({"gguf": "model.gguf"}).adapter.gguf is None  # type: ignore[union-attr]


def test_only_the_first_few_entries_are_read():
    many = [gguf_entry() for _ in range(1000)]
    assert len(result({"gguf": many}).adapter.gguf or []) == MAX_EXPORTED_FILES  # type: ignore[union-attr]
