"""The CRDs in crds/ on a real API server: accepted, and admitting exactly what `kubetune validate` admits.

* crds/ is applied with `kubectl apply --server-side` (the `crds` fixture): the API server checks the
  structural schemas, the defaults and the CEL rules' cost estimates.
* Every example in examples/ is created, and the server's defaulted spec is the offline model's.
* Every invalid example rejected at `admission` is refused by the server with its `expect` words
  (CEL messages verbatim, the batch rule's messageExpression included); every one rejected by
  `validation` (kubetune's semantic checks) is accepted by the server: that is the split.
* Transition rules (immutable fields, resources only while suspended), the status subresource,
  printer columns, short names, the category, `kubectl explain`, and the Helm chart.

Examples name their own namespace (ml, team-a, default); they are created in a test namespace
instead, from their exact text minus the `metadata.namespace` line, so kubectl parses the YAML
as a user's kubectl would (PyYAML and Go YAML disagree on e.g. unquoted 2e-4).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from kubetune.api import AdapterDeploymentSpec, FineTuneJobSpec, check_file, parse
from kubetune.api.evaluation import COMPARED, SCALARS, SIDES
from tests.examples import invalid_examples, valid_examples

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RESOURCE = {"FineTuneJob": "finetunejobs.kubetune.io", "AdapterDeployment": "adapterdeployments.kubetune.io"}
FTJ_COLUMNS = ["NAME", "METHOD", "PHASE", "PROGRESS", "LOSS", "TOKENS/S", "AGE"]
ADEP_COLUMNS = ["NAME", "RUNTIME", "READY", "ADAPTERS", "AGE"]
ADEP_WIDE_COLUMNS = ["NAME", "RUNTIME", "READY", "ADAPTERS", "ENDPOINT", "AGE"]

ADMISSION = [e for e in invalid_examples() if e.rejected_by == "admission"]
VALIDATION = [e for e in invalid_examples() if e.rejected_by == "validation"]
# Examples whose words are the same offline and on the server: the CEL rules (x-kubernetes-validations).
CEL_RULE = [e for e in ADMISSION if e.offline == e.server]

MINIMAL_FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"uri": "pvc://datasets/chat.jsonl", "format": "chat"},
        "hyperparameters": {"epochs": 1},
        "output": {"uri": "pvc://adapters/minimal"},
    },
}
MINIMAL_ADEP = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "AdapterDeployment",
    "metadata": {"name": "minimal"},
    "spec": {"baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
}


# ------------------------------------------------------------------------------------------------
# Helpers.


def without_namespace(text: str) -> str:
    """The manifest text with the `  namespace:` line of each top-level `metadata:` block removed."""
    out, in_metadata = [], False
    for line in text.splitlines(keepends=True):
        if line[:1] not in (" ", "#", "\n", ""):
            in_metadata = line.startswith("metadata:")
        elif in_metadata and re.match(r"  namespace:", line):
            continue
        out.append(line)
    stripped = "".join(out)
    for doc in yaml.safe_load_all(stripped):
        if doc:
            assert "namespace" not in doc.get("metadata", {}), f"could not strip metadata.namespace from:\n{text}"
    return stripped


def manifest(path: Path) -> str:
    return without_namespace(path.read_text())


def prune_empty(value):
    """Drop empty dicts and lists (the API server does not store defaults that are empty collections)."""
    if isinstance(value, dict):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [prune_empty(v) for v in value]
    return value


# A CRD's root-level rules (the metadata.name rules) may not name a fieldPath inside metadata: the
# API server reports them on the object itself, which it writes `<nil>`; offline they are on metadata.name.
SERVER_PATH = {"metadata.name": "<nil>"}


def server_errors(stderr: str) -> list[tuple[str, str]]:
    """(field path, message) of each `PATH: Invalid value: "object": MESSAGE` the API server reported."""
    return re.findall(r'(?:^|\* |is invalid: )(\S+): Invalid value: "object": (.*)$', stderr, re.M)


def cel_runtime_errors(stderr: str) -> list[str]:
    """Lines where a CEL rule failed to evaluate (e.g. `no such key`), instead of evaluating to false."""
    return [line for line in stderr.splitlines() if "evaluating rule" in line or "no such key" in line]


def get_obj(cluster, kind: str, name: str, ns: str) -> dict | None:
    return cluster.get(RESOURCE[kind], name, ns)


def table(cluster, *args: str) -> tuple[list[str], dict[str, list[str]]]:
    """`kubectl get ARGS` as (header, {name: cells}); empty cells are dropped, as whitespace splits."""
    lines = cluster.kubectl("get", *args).stdout.splitlines()
    return lines[0].split(), {line.split()[0]: line.split() for line in lines[1:]}


def merge_patch(cluster, kind: str, name: str, ns: str, patch: dict, *extra: str) -> subprocess.CompletedProcess:
    return cluster.kubectl(
        "patch", RESOURCE[kind], name, "-n", ns, "--type=merge", "-p", json.dumps(patch), *extra, check=False
    )


def create(cluster, ns: str, obj: dict | str) -> subprocess.CompletedProcess:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return cluster.kubectl("create", "--validate=strict", "-n", ns, "-f", "-", input=text, check=False)


def rule(spec_model, field_path: str):
    (found,) = [r for r in spec_model.cel_rules if r.field_path == field_path and r.check is None]
    return found


# ------------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def ns(cluster, crds):
    name = cluster.create_namespace("t-admission-")
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="module")
def applied(cluster, ns):
    """Every valid example, applied once with `kubectl apply --server-side`: {path: CompletedProcess}."""
    return {
        path: cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=manifest(path), check=False)
        for path in valid_examples()
    }


@pytest.fixture
def ftj(cluster, ns):
    """A freshly created minimal FineTuneJob (running: not suspended); yields its name."""
    name = f"job-{uuid.uuid4().hex[:8]}"
    obj = json.loads(json.dumps(MINIMAL_FTJ))
    obj["metadata"]["name"] = name
    r = create(cluster, ns, obj)
    assert r.returncode == 0, r.stderr
    yield name
    cluster.kubectl("delete", RESOURCE["FineTuneJob"], name, "-n", ns, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------------
# The CRDs.


def test_crds_are_established_without_warnings(cluster, crds):
    assert sorted(crds) == sorted(RESOURCE.values())
    for name in crds:
        crd = cluster.get("crd", name)
        for type_ in ("NamesAccepted", "Established"):
            assert cluster.condition(crd, type_)["status"] == "True", crd["status"]
    again = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(REPO / "crds"))
    assert again.stderr.strip() == "", f"the API server warned about crds/:\n{again.stderr}"


# ------------------------------------------------------------------------------------------------
# Valid examples.


@pytest.mark.parametrize("path", valid_examples(), ids=lambda p: p.name)
def test_valid_example_is_created_with_the_offline_defaults(cluster, ns, applied, path):
    r = applied[path]
    assert r.returncode == 0, f"the API server rejected {path.name}:\n{r.stderr}"
    for checked in check_file(path):
        stored = get_obj(cluster, checked.kind, checked.name, ns)
        assert stored is not None, f"{checked.kind}/{checked.name} was not created"
        assert prune_empty(stored["spec"]) == prune_empty(checked.obj.to_wire()["spec"])


def test_get_shows_printer_columns_short_names_and_category(cluster, ns, applied):
    failed = {p.name: r.stderr for p, r in applied.items() if r.returncode}
    assert not failed
    objects = [c for path in valid_examples() for c in check_file(path)]
    jobs = {c.name: c.obj for c in objects if c.kind == "FineTuneJob"}
    deployments = {c.name: c.obj for c in objects if c.kind == "AdapterDeployment"}

    header, rows = table(cluster, "ftj", "-n", ns)
    assert header == FTJ_COLUMNS
    assert set(rows) == set(jobs)
    for name, job in jobs.items():
        assert rows[name][1] == job.spec.method.type  # METHOD; PHASE .. TOKENS/S empty without status

    header, rows = table(cluster, "adep", "-n", ns)
    assert header == ADEP_COLUMNS
    assert {name: cells[1] for name, cells in rows.items()} == {n: d.spec.runtime for n, d in deployments.items()}
    assert table(cluster, "adep", "-n", ns, "-o", "wide")[0] == ADEP_WIDE_COLUMNS

    for alias in ("finetunejob", "finetunejobs", "finetunejobs.kubetune.io"):
        assert set(table(cluster, alias, "-n", ns)[1]) == set(jobs)
    for alias in ("adapterdeployment", "adapterdeployments", "adapterdeployments.kubetune.io"):
        assert set(table(cluster, alias, "-n", ns)[1]) == set(deployments)

    in_category = cluster.kubectl("get", "kubetune", "-n", ns, "-o", "name").stdout.split()
    assert sorted(in_category) == sorted(
        [f"finetunejob.kubetune.io/{n}" for n in jobs] + [f"adapterdeployment.kubetune.io/{n}" for n in deployments]
    )


# ------------------------------------------------------------------------------------------------
# Invalid examples.


@pytest.mark.parametrize("example", ADMISSION, ids=lambda e: e.path.name)
def test_admission_example_is_rejected_by_the_api_server(cluster, ns, example):
    text = manifest(example.path)
    (checked,) = check_file(example.path)
    # `create --validate=strict` (kubectl's default) reports unknown fields as `unknown field "spec.x"`;
    # server-side apply would say `.spec.x: field not declared in schema`.
    r = create(cluster, ns, text)
    assert r.returncode != 0, f"the API server accepted {example.path.name}"
    for expected in example.server:
        assert expected in r.stderr
    assert not cel_runtime_errors(r.stderr), f"a CEL rule failed to evaluate:\n{r.stderr}"
    assert get_obj(cluster, checked.kind, checked.name, ns) is None

    applied = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=text, check=False)
    assert applied.returncode != 0, f"server-side apply accepted {example.path.name}"
    assert get_obj(cluster, checked.kind, checked.name, ns) is None


@pytest.mark.parametrize("example", CEL_RULE, ids=lambda e: e.path.name)
def test_cel_message_is_the_offline_message_verbatim(cluster, ns, example):
    """The words `kubetune validate` prints are exactly the API server's (messageExpression included)."""
    (checked,) = check_file(example.path)
    r = create(cluster, ns, manifest(example.path))
    messages = [message for _, message in server_errors(r.stderr)]
    for problem in checked.problems:
        assert problem.message in messages, r.stderr


@pytest.mark.parametrize(
    ("batch", "micro", "nodes", "gpus", "world"), [(36, 3, 2, 4, 8), (10, 4, 1, 0, 1), (100, 7, 3, 5, 15)]
)
def test_batch_rule_message_expression_matches_python(cluster, ns, batch, micro, nodes, gpus, world):
    """The CEL messageExpression and the Python `describe` build the same words from the object."""
    obj = json.loads(json.dumps(MINIMAL_FTJ))
    obj["metadata"]["name"] = "batch"
    obj["spec"]["hyperparameters"] = {"epochs": 1, "globalBatchSize": batch, "microBatchSize": micro}
    obj["spec"]["resources"] = {"nodes": nodes, "gpusPerNode": gpus}
    expected = (
        f"hyperparameters.globalBatchSize ({batch}) must be a multiple of microBatchSize ({micro})"
        f" x world size ({world})"
    )
    assert [(p.path, p.message) for p in parse(obj).problems] == [("spec", expected)]
    r = create(cluster, ns, obj)
    assert r.returncode != 0
    assert server_errors(r.stderr) == [("spec", expected)], r.stderr


@pytest.mark.parametrize("example", CEL_RULE, ids=lambda e: e.path.name)
def test_cel_error_names_the_offline_field_path(cluster, ns, example):
    """`kubetune validate` and the API server put the error on the same field."""
    (checked,) = check_file(example.path)
    r = create(cluster, ns, manifest(example.path))
    errors = server_errors(r.stderr)
    for problem in checked.problems:
        assert (SERVER_PATH.get(problem.path, problem.path), problem.message) in errors, r.stderr


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.name)
def test_every_invalid_example_is_refused_offline_and_where_the_split_says(cluster, ns, example):
    """`kubetune validate` refuses every file in examples/invalid; the API server refuses every one
    marked `admission` (schema, CEL, list keys), so the two agree on what the server holds."""
    (checked,) = check_file(example.path)
    assert not checked.ok, f"kubetune validate accepted {example.path.name}"
    r = cluster.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        ns,
        "-f",
        "-",
        input=manifest(example.path),
        check=False,
    )
    assert (r.returncode != 0) == (example.rejected_by == "admission"), r.stderr


HOSTILE_URIS = [
    "pvc://datasets/../../../proc/self",
    "pvc://datasets/%2e%2e/x",
    "pvc://../x",
    "configmap://../key",
    "configmap://cm/../key",
    "configmap://Chat_Data/key",
    "pvc://Payroll_DB/x",
    "pvc://datasets/a\nb",
    "pvc://datasets/a\u0000b",
    "pvc://datasets/a\\b",
    "pvc://datasets/a%0ab",
    "pvc://datasets/a\u2028b",
    "pvc://" + "a" * 254 + "/x",
]


@pytest.mark.parametrize("uri", HOSTILE_URIS, ids=lambda u: repr(u)[:50])
@pytest.mark.parametrize("where", ["model", "dataset", "validation", "output", "adapter", "baseModel"])
def test_hostile_uris_are_refused_by_both_in_the_same_words(cluster, ns, uri, where):
    if where in ("adapter", "baseModel"):
        obj = json.loads(json.dumps(MINIMAL_ADEP))
        if where == "adapter":
            obj["spec"]["adapters"] = [{"name": "a", "uri": uri}]
            path = "spec.adapters[0].uri"
        else:
            obj["spec"]["baseModel"]["uri"] = uri
            path = "spec.baseModel.uri"
    else:
        obj = json.loads(json.dumps(MINIMAL_FTJ))
        target = {"model": "model", "dataset": "dataset", "output": "output"}
        if where == "validation":
            obj["spec"]["dataset"]["validation"] = {"uri": uri}
            path = "spec.dataset.validation.uri"
        else:
            obj["spec"][target[where]]["uri"] = uri
            path = f"spec.{target[where]}.uri"
    offline = [(p.path, p.message) for p in parse(obj).problems]
    assert offline and all(p == path for p, _ in offline), offline
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert r.returncode != 0, f"the API server accepted {uri!r} in {path}"
    assert not cel_runtime_errors(r.stderr), r.stderr
    assert offline[0] in server_errors(r.stderr), r.stderr


PARITY_URIS = [
    "pvc://datasets/a/b...c/d..e/.hidden",
    "pvc://my.claim-1/x",
    "pvc://x",
    "pvc://x/",
    "pvc://x.",
    "pvc://x:80/a",
    "pvc:///x",
    "pvc://" + "a" * 253 + "/x",
    "configmap://cm.v1/train_set-2.json",
    "configmap://cm/",
    "configmap://cm",
    "configmap://cm/a b",
    "configmap://" + "a" * 253 + "/k",
    "https://example.com/..?x=1",
    "https://example.com/a/...",
    "https://example.com/a%2E%2e/b",
    "https://example.com/a%7fb",
    "https://example.com/a%7Eb",
    "s3://bucket/dir/./x",
    "hf://org/name",
    "pvc://datasets/données.jsonl",
    "pvc://datasets/a\u0085b",
    "pvc://datasets/a\u2029b",
]


@pytest.mark.parametrize("uri", PARITY_URIS, ids=lambda u: repr(u)[:50])
def test_the_api_server_and_the_python_twin_draw_the_same_line(cluster, ns, uri):
    """For URIs near the edges of the rules, the server refuses exactly what `shared_problem` refuses."""
    from kubetune.api.uris import shared_problem

    obj = json.loads(json.dumps(MINIMAL_FTJ))
    obj["metadata"]["name"] = "parity"
    obj["spec"]["dataset"]["uri"] = uri
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    expected = shared_problem(uri)
    assert not cel_runtime_errors(r.stderr), r.stderr
    if expected is None:
        assert r.returncode == 0, r.stderr
    else:
        assert ("spec.dataset.uri", expected) in server_errors(r.stderr), r.stderr


def test_many_adapters_with_long_uris_stay_within_the_cel_budget(cluster, ns):
    """256 adapters (the list's maxItems) with URIs near maxLength: the rules evaluate, the object is admitted."""
    obj = json.loads(json.dumps(MINIMAL_ADEP))
    obj["metadata"]["name"] = "many-adapters"
    long_path = "/".join(["segment"] * 250)
    obj["spec"]["maxAdapters"] = 256
    obj["spec"]["adapters"] = [{"name": f"a{i}", "uri": f"pvc://adapters/{i}/{long_path}"} for i in range(256)]
    assert parse(obj).ok
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["FineTuneJob", "AdapterDeployment"])
@pytest.mark.parametrize("name", ["my.job", "1job", "a" * 56, "a" * 60, "a" * 64, "ok-name", "a" * 55])
def test_names_are_refused_by_both_alike(cluster, ns, kind, name):
    obj = json.loads(json.dumps(MINIMAL_FTJ if kind == "FineTuneJob" else MINIMAL_ADEP))
    obj["metadata"]["name"] = name
    offline = [p.message for p in parse(obj).problems]
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert (r.returncode != 0) == bool(offline), (offline, r.stderr)
    for message in offline:
        assert ("<nil>", message) in server_errors(r.stderr), r.stderr


@pytest.mark.parametrize("example", VALIDATION, ids=lambda e: e.path.name)
def test_validation_example_is_accepted_by_the_api_server(cluster, ns, example):
    """Semantic checks (URI schemes, module names) are kubetune's, not the schema's: the server admits these."""
    r = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", input=manifest(example.path), check=False)
    assert r.returncode == 0, r.stderr
    (checked,) = check_file(example.path)
    assert get_obj(cluster, checked.kind, checked.name, ns) is not None


# ------------------------------------------------------------------------------------------------
# Defaults.


def test_minimal_finetunejob_gets_the_model_defaults(cluster, ns):
    r = create(cluster, ns, MINIMAL_FTJ)
    assert r.returncode == 0, r.stderr
    spec = get_obj(cluster, "FineTuneJob", "minimal", ns)["spec"]
    assert spec["method"] == {"type": "lora"}
    assert spec["objective"] == "sft"
    assert spec["resources"] == {"nodes": 1, "gpusPerNode": 1, "gpuResource": "nvidia.com/gpu"}
    assert spec["distributed"] == {"strategy": "auto", "offload": "none"}
    h = spec["hyperparameters"]
    assert h["learningRate"] == "2e-4"  # a string, as the schema says
    assert (h["scheduler"], h["globalBatchSize"], h["microBatchSize"], h["precision"]) == ("cosine", 16, 1, "bf16")
    assert spec["dataset"]["maxSeqLength"] == 2048 and spec["dataset"]["chatTemplate"] == "tokenizer"
    assert spec["runPolicy"] == {"backoffLimit": 3, "suspend": False}
    assert spec["checkpointing"] == {"everySteps": 200, "keep": 2}
    assert prune_empty(spec) == prune_empty(FineTuneJobSpec.model_validate(MINIMAL_FTJ["spec"]).to_wire())


def test_minimal_adapterdeployment_gets_the_model_defaults(cluster, ns):
    """An AdapterDeployment with no adapters yet is valid offline; the server must admit it too."""
    r = create(cluster, ns, MINIMAL_ADEP)
    assert r.returncode == 0, r.stderr
    spec = get_obj(cluster, "AdapterDeployment", "minimal", ns)["spec"]
    assert (spec["runtime"], spec["replicas"], spec["maxAdapters"]) == ("builtin", 1, 8)
    assert prune_empty(spec) == prune_empty(AdapterDeploymentSpec.model_validate(MINIMAL_ADEP["spec"]).to_wire())


# ------------------------------------------------------------------------------------------------
# Transition rules.

IMMUTABLE = {
    "model": {"model": {"uri": "hf://Qwen/Qwen2.5-1.5B-Instruct"}},
    "method": {"method": {"type": "full"}},
    "dataset": {"dataset": {"uri": "pvc://datasets/other.jsonl"}},
    "objective": {"objective": "dpo"},
    "hyperparameters": {"hyperparameters": {"epochs": 2}},
    "output": {"output": {"uri": "pvc://adapters/elsewhere"}},
}


@pytest.mark.parametrize("field", IMMUTABLE)
def test_immutable_spec_field(cluster, ns, ftj, field):
    message = rule(FineTuneJobSpec, f".{field}").message
    assert message.startswith(f"spec.{field} is immutable")
    r = merge_patch(cluster, "FineTuneJob", ftj, ns, {"spec": IMMUTABLE[field]})
    assert r.returncode != 0
    assert (f"spec.{field}", message) in server_errors(r.stderr), r.stderr
    assert get_obj(cluster, "FineTuneJob", ftj, ns)["metadata"]["generation"] == 1


def test_method_type_and_hyperparameter_changes_are_rejected(cluster, ns, ftj):
    for patch, field in (
        ({"method": {"type": "qlora"}}, "method"),
        ({"hyperparameters": {"epochs": None, "maxSteps": 100}}, "hyperparameters"),
        ({"hyperparameters": {"learningRate": "1e-4"}}, "hyperparameters"),
    ):
        r = merge_patch(cluster, "FineTuneJob", ftj, ns, {"spec": patch})
        assert r.returncode != 0 and f"spec.{field} is immutable" in r.stderr, (patch, r.stderr)


def test_mutable_fields_and_metadata_can_change(cluster, ns, ftj):
    for patch in (
        {"spec": {"runPolicy": {"suspend": True}}},
        {"spec": {"runPolicy": {"backoffLimit": 5}}},
        {"spec": {"checkpointing": {"keep": 3}}},
        {"metadata": {"labels": {"team": "a"}}},
    ):
        r = merge_patch(cluster, "FineTuneJob", ftj, ns, patch)
        assert r.returncode == 0, (patch, r.stderr)
    spec = get_obj(cluster, "FineTuneJob", ftj, ns)["spec"]
    assert spec["runPolicy"] == {"suspend": True, "backoffLimit": 5}
    assert spec["checkpointing"]["keep"] == 3


def test_resources_change_only_while_suspended_before_and_after(cluster, ns, ftj):
    message = rule(FineTuneJobSpec, ".resources").message

    def patch(spec: dict) -> subprocess.CompletedProcess:
        return merge_patch(cluster, "FineTuneJob", ftj, ns, {"spec": spec})

    def rejected(r: subprocess.CompletedProcess) -> bool:
        return r.returncode != 0 and ("spec.resources", message) in server_errors(r.stderr)

    def gpus() -> int:
        return get_obj(cluster, "FineTuneJob", ftj, ns)["spec"]["resources"]["gpusPerNode"]

    assert rejected(r := patch({"resources": {"gpusPerNode": 2}})), r.stderr  # running
    assert rejected(r := patch({"resources": {"nodeSelector": {"pool": "a"}}})), r.stderr
    # Suspended before and after: suspending in the same patch is not enough, nor is resuming.
    assert rejected(r := patch({"resources": {"gpusPerNode": 2}, "runPolicy": {"suspend": True}})), r.stderr
    assert patch({"runPolicy": {"suspend": True}}).returncode == 0
    assert (r := patch({"resources": {"gpusPerNode": 2}})).returncode == 0, r.stderr  # suspended
    assert gpus() == 2
    assert rejected(r := patch({"resources": {"gpusPerNode": 4}, "runPolicy": {"suspend": False}})), r.stderr
    assert (r := patch({"runPolicy": {"suspend": False}})).returncode == 0, r.stderr  # resume
    assert rejected(r := patch({"resources": {"gpusPerNode": 1}})), r.stderr
    assert gpus() == 2


def test_adapterdeployment_base_model_is_immutable_and_adapters_are_not(cluster, ns):
    obj = json.loads(json.dumps(MINIMAL_ADEP))
    obj["metadata"]["name"] = "immutable-base"
    obj["spec"]["adapters"] = [{"name": "a", "uri": "pvc://adapters/a"}]
    assert (r := create(cluster, ns, obj)).returncode == 0, r.stderr
    r = merge_patch(
        cluster,
        "AdapterDeployment",
        "immutable-base",
        ns,
        {"spec": {"baseModel": {"uri": "hf://Qwen/Qwen2.5-7B-Instruct"}}},
    )
    assert ("spec.baseModel", rule(AdapterDeploymentSpec, ".baseModel").message) in server_errors(r.stderr), r.stderr
    adapters = [{"name": "a", "uri": "pvc://adapters/a"}, {"name": "b", "fromJob": "support-bot"}]
    assert (
        r := merge_patch(cluster, "AdapterDeployment", "immutable-base", ns, {"spec": {"adapters": adapters}})
    ).returncode == 0, r.stderr


REQUIRE_REFUSED = [
    ({"fromJob": "support-bot", "require": [{"metric": "bleu.delta", "min": 0.1}]}, "unknown metric: use exactMatch"),
    ({"fromJob": "support-bot", "require": [{"metric": "rougeL.gain", "min": 0.1}]}, "unknown metric: use exactMatch"),
    ({"fromJob": "support-bot", "require": [{"metric": "rougeL", "min": 0.1}]}, "unknown metric: use exactMatch"),
    ({"uri": "pvc://adapters/a", "require": [{"metric": "rougeL.delta", "min": 0.1}]}, "require applies to fromJob"),
    ({"fromJob": "support-bot", "require": [{"metric": "rougeL.delta"}]}, "a requirement needs min, max or both"),
]


@pytest.mark.parametrize(
    ("adapter", "words"), REQUIRE_REFUSED, ids=["unknown-family", "unknown-side", "no-side", "on-a-uri", "no-bound"]
)
def test_promotion_rules_the_api_server_refuses_with_the_offline_words(cluster, ns, adapter, words):
    """`require`: only metrics the trainer reports, only on fromJob adapters, each with a bound."""
    obj = json.loads(json.dumps(MINIMAL_ADEP))
    obj["metadata"]["name"] = f"gate-{uuid.uuid4().hex[:8]}"
    obj["spec"]["adapters"] = [{"name": "v1", **adapter}]
    offline = [p.message for p in parse(obj).problems]
    assert len(offline) == 1 and offline[0].startswith(words), offline
    r = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    assert r.returncode != 0
    assert offline[0] in [message for _, message in server_errors(r.stderr)], r.stderr
    assert not cel_runtime_errors(r.stderr), r.stderr


def test_promotion_rules_on_every_metric_are_admitted(cluster, ns):
    obj = json.loads(json.dumps(MINIMAL_ADEP))
    obj["metadata"]["name"] = "gates"
    metrics = [f"{m}.{side}" for m in COMPARED for side in SIDES] + list(SCALARS)
    obj["spec"]["adapters"] = [
        {"name": "v1", "fromJob": "support-bot", "require": [{"metric": m, "min": -1} for m in metrics[:16]]},
        {"name": "v2", "fromJob": "support-bot", "require": [{"metric": m, "max": 5} for m in metrics[16:]]},
        {"name": "v3", "fromJob": "support-bot", "require": [{"metric": "rougeL.delta", "min": 0.05, "max": 1}]},
    ]
    assert parse(obj).ok, parse(obj).problems
    r = create(cluster, ns, obj)
    assert r.returncode == 0, r.stderr
    stored = get_obj(cluster, "AdapterDeployment", "gates", ns)["spec"]["adapters"]
    assert stored[2]["require"] == [{"metric": "rougeL.delta", "min": 0.05, "max": 1}]


# ------------------------------------------------------------------------------------------------
# The status subresource.


def test_status_is_written_only_through_the_status_subresource(cluster, ns, ftj):
    status = {
        "phase": "Running",
        "progress": {"step": 35, "totalSteps": 100, "percent": 35},
        "metrics": {"trainLoss": 1.25, "tokensPerSecond": 4321.5},
    }

    r = merge_patch(cluster, "FineTuneJob", ftj, ns, {"status": status})
    assert r.returncode == 0, r.stderr
    assert "status" not in get_obj(cluster, "FineTuneJob", ftj, ns), "status written through the main resource"

    r = merge_patch(
        cluster, "FineTuneJob", ftj, ns, {"status": status, "spec": {"image": "ignored:1"}}, "--subresource=status"
    )
    assert r.returncode == 0, r.stderr
    stored = get_obj(cluster, "FineTuneJob", ftj, ns)
    assert stored["status"] == status
    assert "image" not in stored["spec"], "spec written through the status subresource"
    assert stored["metadata"]["generation"] == 1

    header, rows = table(cluster, "ftj", ftj, "-n", ns)
    assert header == FTJ_COLUMNS
    assert rows[ftj][:6] == [ftj, "lora", "Running", "35", "1.25", "4321.5"]

    r = merge_patch(cluster, "FineTuneJob", ftj, ns, {"status": {"phase": "Exploded"}}, "--subresource=status")
    assert r.returncode != 0 and 'status.phase: Unsupported value: "Exploded"' in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------
# kubectl explain.


def explain(cluster, path: str) -> str:
    # The OpenAPI document can lag the CRD's Established condition by a moment.
    r = cluster.wait_for(
        lambda: (lambda r: r if r.returncode == 0 else None)(cluster.kubectl("explain", path, check=False)),
        f"kubectl explain {path}",
    )
    return " ".join(r.stdout.split())


def test_explain_shows_the_model_descriptions(cluster, crds):
    method = explain(cluster, "finetunejob.spec.method")
    assert "Which weights are trained (LoRA by default)." in method
    spec = explain(cluster, "finetunejob.spec")
    for name, info in FineTuneJobSpec.model_fields.items():
        assert " ".join(info.description.split()) in spec, name
    lr = explain(cluster, "finetunejob.spec.hyperparameters.learningRate")
    assert "FIELD: learningRate <string>" in lr
    assert 'Peak learning rate, as a string ("2e-4"): the Kubernetes API avoids floats.' in lr
    assert "Adapters to serve." in explain(cluster, "adapterdeployment.spec.adapters")


# ------------------------------------------------------------------------------------------------
# The Helm chart.


def test_helm_chart_lints_and_renders(helm):
    lint = helm("lint", "--strict", "helm/kubetune")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "0 chart(s) failed" in lint.stdout

    rendered = helm("template", "kubetune", "helm/kubetune")
    assert rendered.returncode == 0, rendered.stderr
    assert all(doc.get("kind") for doc in yaml.safe_load_all(rendered.stdout) if doc)

    with_crds = helm("template", "kubetune", "helm/kubetune", "--include-crds")
    assert with_crds.returncode == 0, with_crds.stderr
    crds = [doc for doc in yaml.safe_load_all(with_crds.stdout) if doc and doc["kind"] == "CustomResourceDefinition"]
    expected = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
    assert sorted(crds, key=lambda d: d["metadata"]["name"]) == expected
