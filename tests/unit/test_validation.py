"""Semantic validation: what CEL cannot check, with the field and the fix in every message."""

import pytest

from kubetune.api import FineTuneJobSpec, parse, validate
from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.validation import (
    ADAPTER_SCHEMES,
    DATASET_SCHEMES,
    MODEL_SCHEMES,
    OUTPUT_SCHEMES,
    check_target_modules,
    check_uri,
    validate_finetunejob,
)
from tests.unit.support import spec


def problems(local=False, **overrides):
    return [str(p) for p in validate_finetunejob(FineTuneJobSpec.model_validate(spec(**overrides)), local)]


def test_a_good_spec_has_no_problems():
    assert problems() == []


@pytest.mark.parametrize(
    "uri, schemes, local, message",
    [
        ("pvc://Bad_Claim/x", ("pvc",), False, "CLAIM a PersistentVolumeClaim name (a DNS subdomain"),
        ("s3://A/x", ("s3",), False, "the bucket name must be 3-63 lowercase letters"),
        ("pvc:///x", ("pvc",), False, "write pvc://CLAIM/PATH"),
        ("configmap://data", ("configmap",), False, "write configmap://NAME/KEY"),
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


def test_what_the_evaluation_reads_and_the_tracking_server_are_checked():
    metadata = "http://169.254.169.254/"
    found = problems(**{"tracking.mlflow.trackingUri": metadata, "evaluation.referenceUri": "file:///ref.txt"})
    assert any(p.startswith("spec.tracking.mlflow.trackingUri: ") and "metadata service" in p for p in found)
    assert any(p.startswith("spec.evaluation.referenceUri: ") and "file:// only works" in p for p in found)
    assert problems(**{"evaluation.benchmarks": {"tasks": ["qa"], "taskUri": "file:///tasks"}})[0].startswith(
        "spec.evaluation.benchmarks.taskUri: 'file:///tasks': file:// only works"
    )
    # `kubetune train` on this machine may report to a tracking server on this machine.
    assert problems(local=True, **{"tracking.mlflow.trackingUri": "http://127.0.0.1:5000"}) == []
    assert problems(**{"tracking.mlflow.trackingUri": "https://mlflow.ml.svc:5000"}) == []


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


# --- every URI field goes through uris.uri_problem, with its path (issue 14, finding 7) ----------

FTJ_URI_FIELDS = {
    "spec.model.uri": ("model.uri", MODEL_SCHEMES),
    "spec.dataset.uri": ("dataset.uri", DATASET_SCHEMES),
    "spec.dataset.validation.uri": ("dataset.validation", DATASET_SCHEMES),
    "spec.output.uri": ("output.uri", OUTPUT_SCHEMES),
}


def ftj(**overrides) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job"},
        "spec": spec(**overrides),
    }


def adep(adapters: list[dict], base: str = "hf://a/b", name: str = "serve") -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": base}, "adapters": adapters},
    }


def paths_and_messages(doc: dict, local: bool = False) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in parse(doc, local).problems]


def ftj_with_uri(path: str, uri: str) -> dict:
    key, _ = FTJ_URI_FIELDS[path]
    return ftj(**{key: {"uri": uri} if key == "dataset.validation" else uri})


HOSTILE_URIS = [
    "pvc://x/../../../proc/self",
    "pvc://x/a/%2e%2e/b",
    "pvc://x/./a",
    "pvc://../etc",
    "pvc://Payroll_DB/x",
    "pvc://x/a\\b",
    "pvc://x/a\nb",
    "pvc://x/a\x00b",
    "pvc://x/a%00b",
    "configmap://../key",
    "configmap://cm/../key",
    "configmap://cm/a/b",
    "configmap://cm/k ey",
    "s3://bucket/a/../b",
    "hf://org/../name",
]


@pytest.mark.parametrize("path", list(FTJ_URI_FIELDS))
@pytest.mark.parametrize("uri", HOSTILE_URIS)
def test_hostile_uris_are_refused_in_every_field_of_a_finetunejob(path, uri):
    scheme = uri.partition("://")[0]
    found = paths_and_messages(ftj_with_uri(path, uri))
    assert found, f"{uri!r} accepted in {path}"
    assert all(p == path for p, _ in found), found
    if scheme in FTJ_URI_FIELDS[path][1]:
        assert "scheme must be one of" not in found[0][1]


@pytest.mark.parametrize("uri", HOSTILE_URIS)
def test_hostile_uris_are_refused_in_an_adapterdeployment(uri):
    assert [p for p, _ in paths_and_messages(adep([{"name": "a", "uri": uri}]))] == ["spec.adapters[0].uri"]
    assert [p for p, _ in paths_and_messages(adep([], base=uri))] == ["spec.baseModel.uri"]


def test_the_reported_traversal_and_configmap_names_are_refused_with_the_api_servers_words():
    assert paths_and_messages(ftj(**{"dataset.uri": "pvc://x/../../../proc/self"})) == [
        (
            "spec.dataset.uri",
            "'.' and '..' are not allowed as segments of a URI; name the file from the root of its volume",
        )
    ]
    ((path, message),) = paths_and_messages(ftj(**{"dataset.uri": "configmap://../key"}))
    assert path == "spec.dataset.uri" and message.startswith("'.' and '..' are not allowed")


@pytest.mark.parametrize(
    "uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://127.0.0.1/d.jsonl",
        "https://[::1]/d.jsonl",
        "https://[fe80::1]/d.jsonl",
        "https://0.0.0.0/d.jsonl",
        "https://localhost:8080/d.jsonl",
        "http://2852039166/d.jsonl",
    ],
)
def test_dataset_urls_that_point_into_the_node_are_refused(uri):
    ((path, message),) = paths_and_messages(ftj(**{"dataset.uri": uri}))
    assert path == "spec.dataset.uri" and uri[:20] in message


@pytest.mark.parametrize(
    "uri",
    ["https://10.0.0.5:9000/data/chat.jsonl", "https://minio.storage.svc/d.jsonl", "configmap://cm.v1/chat.jsonl"],
)
def test_in_cluster_dataset_locations_stay_valid(uri):
    assert paths_and_messages(ftj(**{"dataset.uri": uri})) == []


def test_every_uri_field_of_both_kinds_is_validated():
    """A URI field added to a model without a check here would let anything through: list them."""
    from kubetune.api.adapterdeployment import AdapterRef
    from kubetune.api.common import ModelSource
    from kubetune.api.finetunejob import DatasetSpec, OutputSpec, ValidationSplit
    from kubetune.api.merging import MergeSource

    checked = {ModelSource, DatasetSpec, ValidationSplit, OutputSpec, AdapterRef, MergeSource}
    for model in checked:
        assert any(r.field_path == ".uri" and r.check for r in model.cel_rules), model.__name__
    assert set(ADAPTER_SCHEMES) <= {"hf", "pvc", "s3", "file"}


# --- names (finding 8) ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["FineTuneJob", "AdapterDeployment"])
@pytest.mark.parametrize(
    "name, words",
    [
        ("my.job", "no dots"),
        ("1job", "start with a letter"),
        ("Job", "lowercase letters"),
        ("job-", "end with a letter or digit"),
        ("a" * 64, "at most"),
        (None, "metadata.name is required"),
        ("", "metadata.name is required"),
    ],
)
def test_names_the_operator_cannot_use_are_refused_offline(kind, name, words):
    doc = ftj() if kind == "FineTuneJob" else adep([])
    doc["metadata"] = {} if name is None else {"name": name}
    found = paths_and_messages(doc)
    assert found and all(path == "metadata.name" for path, _ in found), found
    assert any(words in message for _, message in found), found


def test_a_finetunejob_name_leaves_room_for_its_service_suffix():
    from kubetune.api.names import NAME_RULES

    limit = NAME_RULES["FineTuneJob"].max_length
    assert limit == 63 - len("-workers") == 55
    doc = ftj()
    doc["metadata"]["name"] = "a" * limit
    assert paths_and_messages(doc) == []
    doc["metadata"]["name"] = "a" * 60
    assert paths_and_messages(doc) == [("metadata.name", NAME_RULES["FineTuneJob"].length_message)]
    served = adep([], name="a" * 60)
    assert paths_and_messages(served) == []


def test_the_name_rule_is_the_operators():
    """The operator's own rule (render.name_problems) refuses exactly the names validate refuses."""
    from kubetune_operator.finetunejob.render import name_problems as operator_name_problems

    for name in ["ok", "my.job", "1job", "a" * 55, "a" * 56, "a" * 60, "x-", None]:
        doc = ftj()
        doc["metadata"] = {"name": name}
        assert bool(paths_and_messages(doc)) == bool(operator_name_problems(name, nodes=512)), name


def test_a_local_run_needs_no_name_but_a_given_one_must_be_valid():
    doc = ftj(**{"model.uri": "file:///m", "output.uri": "file:///o"})
    doc["metadata"] = {}
    assert paths_and_messages(doc, local=True) == []
    doc["metadata"] = {"name": "a.b"}
    assert [p for p, _ in paths_and_messages(doc, local=True)] == ["metadata.name"]


def test_a_fromjob_must_be_a_finetunejob_name():
    found = paths_and_messages(adep([{"name": "a", "fromJob": "a" * 60}]))
    assert found == [("spec.adapters[0].fromJob", f"{'a' * 60!r} is not a FineTuneJob name")]


# --- adapters with the same name (finding 8) ------------------------------------------------------


def test_two_adapters_of_the_same_name_are_refused_as_the_api_server_does():
    found = paths_and_messages(
        adep([{"name": "a", "uri": "pvc://x/1"}, {"name": "b", "uri": "pvc://x/2"}, {"name": "a", "fromJob": "job"}])
    )
    assert len(found) == 1
    path, message = found[0]
    assert path == "spec.adapters[2]"
    assert (
        message.startswith('Duplicate value: {"name":"a"}: adapter names must be unique')
        and "spec.adapters[0]" in message
    )


def test_merge_sources_are_checked_like_adapters():
    raw = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "merged", "namespace": "ml"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "adapters": [
                {
                    "name": "both",
                    "merge": {
                        "method": "linear",
                        "sources": [{"uri": "ftp://adapters/a"}, {"fromJob": "Not_A_Name"}],
                    },
                }
            ],
        },
    }
    problems = [str(p) for p in validate(AdapterDeployment.model_validate(raw))]
    assert any(p.startswith("spec.adapters[0].merge.sources[0].uri:") for p in problems), problems
    assert any(p.startswith("spec.adapters[0].merge.sources[1].fromJob:") for p in problems), problems
