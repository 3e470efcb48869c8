"""Merged adapters of an AdapterDeployment (`merge`): the API and its rules (CEL and their Python twins),
the `merge:` path the replicas get, the adapters file, and how the operator resolves, renders and
reports them; plus runtime vllm refusing a fromJob adapter whose method it cannot serve."""

import json
import re
from datetime import UTC, datetime

import pydantic
import pytest

from kubetune.api import crdgen
from kubetune.api.adapterdeployment import AdapterDeployment
from kubetune.api.adaptersfile import parse_adapters_file, render_adapters_file
from kubetune.api.kinds import ADAPTERDEPLOYMENT
from kubetune.api.merging import MAX_MERGE_PATH, MAX_SOURCE_URI, MergePlan, is_merge_path, parse_merge_path
from kubetune_operator.adapterdeployment.adapters import (
    ADAPTER_REJECTED,
    UNSERVABLE,
    UNTRUSTED,
    WAITING_FOR_JOB,
    Replica,
    job_names,
    job_sources,
    plan_actions,
    resolve,
    with_runtime_path,
)
from kubetune_operator.adapterdeployment.render import (
    ALLOWED_SOURCES_KEY,
    readable_path,
    render_adapterdeployment,
    resolved_adapters,
)
from kubetune_operator.adapterdeployment.status import Observed, adapter_statuses, derive_status
from kubetune_operator.config import OperatorConfig

A, B = "pvc://out/a/adapter", "pvc://out/b/adapter"


def merge(**fields):
    return {"method": "linear", "sources": [{"fromJob": "a"}, {"fromJob": "b"}], **fields}


def deployment(adapters, runtime="builtin"):
    spec = {"baseModel": {"uri": "pvc://models/base"}, "runtime": runtime, "adapters": adapters}
    spec["resources"] = {"gpusPerReplica": 1 if runtime == "vllm" else 0}
    return AdapterDeployment.model_validate({"metadata": {"name": "s", "namespace": "ml", "uid": "u"}, "spec": spec})


def refusal(adapters, runtime="builtin") -> str:
    with pytest.raises(pydantic.ValidationError) as caught:
        deployment(adapters, runtime)
    return str(caught.value)


# --- the API ---------------------------------------------------------------------------------------


def test_a_merge_of_fromjob_and_uri_sources_is_an_adapter():
    spec = deployment(
        [
            {
                "name": "both",
                "require": [{"metric": "evalLoss", "max": 2}],
                "merge": {
                    "method": "ties",
                    "sources": [{"fromJob": "a"}, {"uri": B}],
                    "weights": [0.7, 0.3],
                    "density": 0.5,
                },
            }
        ]
    ).spec
    merged = spec.adapters[0].merge
    assert merged.method == "ties" and merged.weights == [0.7, 0.3] and merged.density == 0.5
    assert spec.adapters[0].require[0].metric == "evalLoss" and merged.sources[1].uri == B


@pytest.mark.parametrize(
    "adapter, words",
    [
        ({"fromJob": "a", "merge": merge()}, "each adapter needs exactly one of fromJob or uri or merge"),
        ({"uri": A, "merge": merge()}, "each adapter needs exactly one of fromJob or uri or merge"),
        ({}, "each adapter needs exactly one of fromJob or uri or merge"),
        ({"merge": merge(sources=[{"fromJob": "a"}])}, "at least 2 items"),
        ({"merge": merge(sources=[{"fromJob": f"j{i}"} for i in range(9)])}, "at most 8 items"),
        ({"merge": merge(weights=[1.0])}, "merge.weights needs one weight per source"),
        ({"merge": merge(weights=[1.0, 11])}, "less than or equal to 10"),
        ({"merge": merge(density=0.5)}, "merge.density applies to ties, dare_linear and dare_ties only"),
        ({"merge": merge(method="dare_ties")}, "merge.density is required by ties, dare_linear and dare_ties"),
        ({"merge": merge(method="ties", density=0)}, "greater than 0"),
        ({"merge": merge(method="ties", density=1.5)}, "less than or equal to 1"),
        ({"merge": merge(method="svd")}, "'linear', 'cat', 'ties', 'dare_linear' or 'dare_ties'"),
        ({"merge": merge(sources=[{"fromJob": "a", "uri": A}, {"uri": B}])}, "exactly one of fromJob or uri"),
        ({"merge": merge(sources=[{"uri": A, "require": [{"metric": "evalLoss", "max": 1}]}, {"uri": B}])},
         "require"),  # a source has no rules of its own: the merge's apply to each fromJob source
        ({"uri": A, "require": [{"metric": "evalLoss", "max": 1}]},
         "require applies to fromJob adapters and merges only"),
        ({"merge": merge(sources=[{"uri": "pvc://adapters/" + "x" * 250}, {"uri": B}])}, "at most 256 characters"),
        ({"merge": merge(sources=[{"uri": "pvc://out/../x"}, {"uri": B}])}, "'.' and '..' are not allowed"),
    ],
)  # fmt: skip
def test_merge_mistakes_are_refused_in_words(adapter, words):
    assert words in refusal([{"name": "m", **adapter}])


def test_runtime_vllm_refuses_merged_adapters_and_says_why():
    assert "runtime vllm cannot serve merged adapters: vLLM has no adapter merging" in refusal(
        [{"name": "m", "merge": merge()}], runtime="vllm"
    )
    deployment([{"name": "plain", "uri": A}], runtime="vllm")  # what vLLM can serve stays fine


def rules_at(path: str) -> dict[str, dict]:
    node = crdgen.crd(ADAPTERDEPLOYMENT)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return {rule["message"]: rule for rule in node.get("x-kubernetes-validations", [])}


def test_the_crd_carries_the_same_rules_in_cel():
    adapter = rules_at("spec.adapters.[]")
    one = adapter["each adapter needs exactly one of fromJob or uri or merge"]["rule"]
    assert "has(self.merge)" in one and "has(self.fromJob)" in one and "has(self.uri)" in one
    merged = rules_at("spec.adapters.[].merge")
    assert merged["merge.weights needs one weight per source"]["rule"] == (
        "!has(self.weights) || size(self.weights) == size(self.sources)"
    )
    assert (
        "self.method in ['ties', 'dare_linear', 'dare_ties']"
        in merged["merge.density applies to ties, dare_linear and dare_ties only"]["rule"]
    )
    source = rules_at("spec.adapters.[].merge.sources.[]")
    assert "each merge source needs exactly one of fromJob or uri" in source
    assert any(rule.get("fieldPath") == ".uri" for rule in source.values()), "merge sources carry the URI rules"
    spec = rules_at("spec")
    vllm = next(r for m, r in spec.items() if m.startswith("runtime vllm cannot serve merged adapters"))
    assert vllm["rule"] == "self.runtime != 'vllm' || self.adapters.all(a, !has(a.merge))"
    schema = crdgen.crd(ADAPTERDEPLOYMENT)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    sources = schema["properties"]["spec"]["properties"]["adapters"]["items"]["properties"]["merge"]["properties"]
    assert (sources["sources"]["minItems"], sources["sources"]["maxItems"]) == (2, 8)
    # The URI rules' regular expressions run on up to 256 x 8 source URIs: a shorter bound keeps each
    # rule's estimated cost within the API server's per-rule budget.
    assert sources["sources"]["items"]["properties"]["uri"]["maxLength"] == MAX_SOURCE_URI == 256


# --- the merge path and the adapters file ------------------------------------------------------------


def test_the_merge_path_is_canonical_and_round_trips():
    plan = MergePlan("ties", (A, B), (0.7, 0.3), 0.5)
    again = MergePlan("ties", (A, B), (0.7, 0.3), 0.5)
    assert plan.path == again.path and is_merge_path(plan.path)
    assert parse_merge_path(plan.path) == plan
    assert MergePlan("ties", (A, B), (0.3, 0.7), 0.5).path != plan.path, "other weights: another path"
    assert MergePlan("ties", (B, A), (0.7, 0.3), 0.5).path != plan.path, "the order of sources matters"
    assert parse_merge_path(MergePlan("linear", (A, B)).path).weights is None  # the merge's default weights


@pytest.mark.parametrize(
    "text, words",
    [
        ("merge:{", "not JSON"),
        ("merge:" + "[" * 100000, "longer than"),
        ("merge:" + "[" * 5000 + "]" * 5000, "not JSON"),
        ('merge:{"method": "svd", "sources": ["pvc://a/x", "pvc://a/y"]}', "merge method must be one of"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x"]}', "2 to 8 sources"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", 3]}', "each merge source must be a URI"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", "pvc://a/y"], "weights": [1]}', "one weight per source"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", "pvc://a/y"], "weights": [1, "x"]}', "within ±10"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", "pvc://a/y"], "weights": [1, 1e400]}', "within ±10"),
        ('merge:{"method": "ties", "sources": ["pvc://a/x", "pvc://a/y"]}', "needs a density in (0, 1]"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", "pvc://a/y"], "density": 0.5}', "density applies to"),
        ('merge:{"method": "cat", "sources": ["pvc://a/x", "pvc://a/y"], "extra": 1}', "a merge is {"),
        ("pvc://a/x", "not a merge path"),
    ],
)
def test_merge_paths_from_the_network_are_bounded_and_checked(text, words):
    assert len("merge:" + "[" * 100000) > MAX_MERGE_PATH
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_merge_path(text)


def test_the_adapters_file_carries_a_merge_as_its_block_and_gives_it_back_as_its_path():
    plan = MergePlan("dare_ties", (A, B), (1.0, 0.5), 0.4)
    text = render_adapters_file([("plain", A), ("both", plan.path)])
    entries = json.loads(text)["adapters"]
    assert entries[0] == {"name": "plain", "path": A}
    assert entries[1] == {
        "name": "both",
        "merge": {"method": "dare_ties", "sources": [A, B], "weights": [1.0, 0.5], "density": 0.4},
    }
    assert parse_adapters_file(text) == {"plain": A, "both": plan.path}
    bad = json.dumps({"adapters": [{"name": "x", "merge": {"method": "cat", "sources": [A]}}]})
    with pytest.raises(ValueError, match=re.escape("adapters[0].merge: a merge needs 2 to 8 sources")):
        parse_adapters_file(bad)


# --- the operator: resolving -------------------------------------------------------------------------


def job(name, uri=None, succeeded=True, method=None, evaluation=None):
    status = {"conditions": [{"type": "Succeeded", "status": "True" if succeeded else "False"}]}
    if uri:
        status["adapter"] = {"uri": uri}
    if evaluation is not None:
        status["evaluation"] = evaluation
    spec = {"output": {"uri": f"pvc://out/{name}"}, **({"method": method} if method else {})}
    return {"spec": spec, "status": status}


JOBS = {"a": job("a", A), "b": job("b", B)}


def test_a_merge_whose_sources_are_ready_wants_its_merge_path():
    adapter = {"name": "ab", "merge": merge(method="ties", weights=[0.7, 0.3], density=0.5)}
    [want] = resolve([adapter], JOBS)
    assert want.uri == MergePlan("ties", (A, B), (0.7, 0.3), 0.5).path and not want.problem
    [by_uri] = resolve([{"name": "ab", "merge": merge(sources=[{"fromJob": "a"}, {"uri": "hf://org/x"}])}], JOBS)
    assert parse_merge_path(by_uri.uri).uris == (A, "hf://org/x")


def test_a_source_not_ready_keeps_the_merge_pending_and_names_it():
    jobs = {"a": JOBS["a"], "b": job("b", succeeded=False)}
    jobs["b"]["status"]["conditions"] = []
    [want] = resolve([{"name": "ab", "merge": merge()}], jobs)
    assert want.uri is None and want.reason == WAITING_FOR_JOB
    assert want.pending == "merge.sources[1] (FineTuneJob b): waiting for FineTuneJob b to succeed"
    [missing] = resolve([{"name": "ab", "merge": merge()}], {"a": JOBS["a"]})
    assert "merge.sources[1] (FineTuneJob b): waiting for FineTuneJob b to exist" in missing.pending
    [status] = adapter_statuses([want], [Replica("p", "u", loaded={})])
    assert status["state"] == "Pending" and "FineTuneJob b" in status["message"]


def test_a_source_failing_the_merges_require_rule_rejects_the_merge():
    evaluation = {"examples": 4, "metrics": {"rougeL": {"base": 0.2, "tuned": 0.21, "delta": 0.01}}}
    good = {"examples": 4, "metrics": {"rougeL": {"base": 0.2, "tuned": 0.3, "delta": 0.1}}}
    jobs = {"a": job("a", A, evaluation=good), "b": job("b", B, evaluation=evaluation)}
    rules = [{"metric": "rougeL.delta", "min": 0.05}]
    [want] = resolve([{"name": "ab", "require": rules, "merge": merge()}], jobs)
    assert want.uri is None and want.reason == ADAPTER_REJECTED
    assert want.rejected.startswith("merge.sources[1] (FineTuneJob b): FineTuneJob b fails require: rougeL.delta")


def test_an_untrusted_source_fails_the_merge():
    jobs = {"a": JOBS["a"], "b": job("b", "pvc://elsewhere/x")}  # not under where job b publishes
    [want] = resolve([{"name": "ab", "merge": merge()}], jobs)
    assert want.reason == UNTRUSTED and want.problem.startswith("merge.sources[1] (FineTuneJob b): ")
    [status] = adapter_statuses([want], [])
    assert status["state"] == "Failed" and "is not under its output" in status["message"]


def test_a_merge_is_loaded_replaced_and_reported_like_any_adapter():
    [want] = [with_runtime_path(w, "builtin") for w in resolve([{"name": "ab", "merge": merge()}], JOBS)]
    replica = Replica("p", "u", loaded={})
    assert [(a.verb, a.uri) for a in plan_actions([want], [replica])] == [("load", want.uri)]
    replica.loaded = {"ab": want.uri}
    [status] = adapter_statuses([want], [replica])
    assert status["state"] == "Loaded" and "uri" not in status, "a merge's path is longer than status.uri holds"
    changed = [w for w in resolve([{"name": "ab", "merge": merge(weights=[0.5, 1.0])}], JOBS)]
    assert [a.verb for a in plan_actions(changed, [replica])] == ["unload", "load"], "replaced like a moved URI"
    refused = Replica("p", "u", loaded={}, failed={"ab": (want.uri, "adapter ab cannot be merged (linear): ...")})
    [status] = adapter_statuses([want], [refused])
    assert status["state"] == "Failed" and status["message"].startswith("adapter ab cannot be merged")


def test_merge_sources_are_fetched_allowed_mounted_and_written_to_the_adapters_file():
    adapters = [{"name": "ab", "merge": merge(sources=[{"fromJob": "a"}, {"uri": "pvc://shared/x"}])}]
    assert job_names(adapters) == {"a"}
    sources = job_sources(adapters, JOBS)
    assert sources == {"ab.merge.sources[0]": "pvc://out/a/adapter"}
    [want] = resolve(adapters, JOBS)
    ad = deployment(adapters)
    assert resolved_adapters(ad.spec, {"ab": want.uri}, sources) == [("ab", want.uri)]
    objects = render_adapterdeployment(ad, OperatorConfig(), {"ab": want.uri}, sources, "kubetune")
    entry = json.loads(objects.adapters["data"]["adapters.json"])["adapters"][0]
    assert entry == {"name": "ab", "merge": {"method": "linear", "sources": [A, "pvc://shared/x"]}}
    assert objects.adapters["data"][ALLOWED_SOURCES_KEY].split() == ["pvc://out/a/adapter", "pvc://shared/"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in objects.deployment["spec"]["template"]["spec"][
        "volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert {"out", "shared"} <= claims
    broken = MergePlan("linear", (A, "pvc://out/../etc")).path
    assert resolved_adapters(ad.spec, {"ab": broken}, sources) == [], "every source passes the URI rules"
    elsewhere = MergePlan("linear", ("pvc://out/b/adapter", "pvc://shared/x")).path  # source 0 is not job a's
    assert resolved_adapters(ad.spec, {"ab": elsewhere}, sources) == [], "each source under its job's output"
    assert readable_path("vllm", want.uri) is None


# --- runtime vllm and what a FineTuneJob trains ------------------------------------------------------


@pytest.mark.parametrize("method", [{"type": "dora"}, {"type": "ia3"}, {"type": "full"}])
def test_vllm_fails_a_fromjob_adapter_whose_method_it_cannot_serve(method):
    jobs = {"a": job("a", A, method=method)}
    [want] = resolve([{"name": "x", "fromJob": "a"}], jobs, "vllm")
    assert want.uri is None and want.reason == UNSERVABLE
    assert want.problem.startswith("FineTuneJob a: runtime vllm serves LoRA adapters (lora, qlora) only")
    [status] = adapter_statuses([want], [])
    assert status["state"] == "Failed" and "use runtime builtin" in status["message"]
    [builtin] = resolve([{"name": "x", "fromJob": "a"}], jobs, "builtin")
    assert builtin.uri == A, "the builtin runtime serves it"


def test_what_vllm_cannot_serve_degrades_as_a_failed_adapter_not_as_an_untrusted_source():
    [unservable] = resolve([{"name": "x", "fromJob": "a"}], {"a": job("a", A, method={"type": "dora"})}, "vllm")
    [untrusted] = resolve([{"name": "y", "fromJob": "b"}], {"b": job("b", "pvc://elsewhere/x")}, "vllm")
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def degraded(wanted):
        status = derive_status({}, Observed("s", "ml", 8000, 1, 1, 1, 1, 1, True, wanted, [], now))
        return next((c["reason"], c["message"]) for c in status["conditions"] if c["type"] == "Degraded")

    reason, message = degraded([unservable])
    assert reason == "AdapterFailed" and "x: FineTuneJob a: runtime vllm serves LoRA adapters" in message
    assert degraded([unservable, untrusted])[0] == "UntrustedAdapterSource"


def test_vllm_loads_lora_jobs_and_refuses_others_before_they_finish():
    [lora] = resolve([{"name": "x", "fromJob": "a"}], {"a": job("a", A, method={"type": "qlora"})}, "vllm")
    assert lora.uri == A
    running = job("a", method={"type": "loha"})
    running["status"]["conditions"] = []
    [early] = resolve([{"name": "x", "fromJob": "a"}], {"a": running}, "vllm")
    assert early.reason == UNSERVABLE, "no need to wait for a job whose adapter vLLM will refuse anyway"
