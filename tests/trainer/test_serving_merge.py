"""Merged adapters in the builtin runtime (an AdapterDeployment adapter with `merge`): built by PEFT's
add_weighted_adapter when the replica loads it, from the adapters file or the operator's HTTP load,
served by name like any LoRA adapter, replaced in place when its merge changes, refused in one line
when its sources do not merge, and never leaving a source behind in the model."""

import json
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
httpx = pytest.importorskip("httpx", reason="NOT RUN: serving tests need httpx (the [dev] extra)")
pytest.importorskip("fastapi", reason="NOT RUN: serving tests need the [serve] extra")

from kubetune.api.adaptersfile import render_adapters_file  # noqa: E402
from kubetune.api.merging import MergePlan  # noqa: E402
from kubetune_serve.adapters_file import AdaptersFileSync  # noqa: E402
from kubetune_serve.engine import Engine, Sampling  # noqa: E402
from kubetune_serve.metrics import ServingMetrics  # noqa: E402
from tests.trainer.support import (  # noqa: E402
    API_KEY,
    chat_text,
    free_port,
    load,
    serve_command,
    stop,
    subprocess_env,
    wait_until_ready,
)

PROMPT_IDS = [5, 17, 42, 8, 99, 3]


def lora(tiny, out, rank, seed):
    """A LoRA adapter of the tiny model with random (non-zero) factors: a distinct, visible update."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20.0)  # big enough to change what the tiny model says
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """The tiny model; adapters a and b (rank 4) and c (rank 8), in one folder of their own."""
    root = tmp_path_factory.mktemp("merge")
    made = {n: lora(tiny_model, root / n, rank, seed) for n, rank, seed in (("a", 4, 1), ("b", 4, 2), ("c", 8, 3))}
    return tiny_model, made


def merge_path(adapters, method, names, weights=None, density=None):
    return MergePlan(method, tuple(f"file://{adapters[n]}" for n in names), weights, density).path


def reference_logits(tiny, adapters, names, weights, method, density):
    """The merge built directly with PEFT, as anyone would in memory, and its logits on PROMPT_IDS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapters[names[0]], adapter_name="s0")
    for i, name in enumerate(names[1:], 1):
        model.load_adapter(adapters[name], adapter_name=f"s{i}")
    sources = [f"s{i}" for i in range(len(names))]
    model.add_weighted_adapter(sources, weights, "merged", combination_type=method, density=density)
    model.set_adapter("merged")
    with torch.no_grad():
        return model.eval()(torch.tensor([PROMPT_IDS])).logits[0]


def served_logits(engine, name):
    """The engine's model with the adapter `name` active (PEFT's own forward, between two steps)."""
    internal = next(a.internal for a in engine.adapters() if a.name == name)
    with engine._exclusive(), torch.no_grad():
        engine._peft.set_adapter(internal)
        return engine._peft(torch.tensor([PROMPT_IDS])).logits[0]


def internal_names(engine):
    return set(engine._peft.peft_config) if engine._peft is not None else set()


def write(path, entries):
    temporary = path.with_suffix(".tmp")
    temporary.write_text(render_adapters_file(entries))
    os.replace(temporary, path)


def test_a_merge_in_the_adapters_file_is_built_served_replaced_and_refused_cleanly(adapters, tmp_path):
    tiny, made = adapters
    engine = Engine(str(tiny), "tiny", cache_dir=tmp_path / "cache", max_adapters=4, max_lora_rank=16)
    engine.load_base()
    path = tmp_path / "adapters.json"
    sync = AdaptersFileSync(engine, path, ServingMetrics(), interval=0.1)
    ties = merge_path(made, "ties", ["a", "b"], (0.7, 0.3), 0.5)
    bad = merge_path(made, "linear", ["a", "c"])  # ranks 4 and 8: linear needs one rank
    write(path, [("a", f"file://{made['a']}"), ("ab", ties), ("bad", bad)])
    assert sync.sync_once()

    served = {a.name: a for a in engine.adapters()}
    assert set(served) == {"a", "ab"} and served["ab"].uri == ties and served["ab"].rank == 4
    assert served["ab"].lane is None, "a merged LoRA adapter is stacked for per-row serving like any other"
    message = sync.failed["bad"]
    assert "\n" not in message and "linear needs sources of one rank" in message and "[4, 8]" in message
    assert internal_names(engine) == {served["a"].internal, served["ab"].internal}, "no source left behind"
    expected = reference_logits(tiny, made, ["a", "b"], [0.7, 0.3], "ties", 0.5)
    torch.testing.assert_close(served_logits(engine, "ab"), expected)
    plain = reference_logits(tiny, made, ["a", "a"], [0.5, 0.5], "cat", None)  # a's own update, merged with itself
    assert not torch.allclose(expected, plain, atol=1e-3), "the merge must differ from its first source"

    # Per row, through the batcher: the merge answers by name, as PEFT's forward says it should.
    greedy = Sampling(max_tokens=6, temperature=0)
    assert engine.generate("ab", PROMPT_IDS, greedy).text != engine.generate("a", PROMPT_IDS, greedy).text

    # Other weights for the same name: replaced in place, the old merge gone, the other adapter kept.
    swapped = merge_path(made, "ties", ["a", "b"], (0.3, 0.7), 0.5)
    write(path, [("a", f"file://{made['a']}"), ("ab", swapped)])
    assert sync.sync_once()
    served = {a.name: a for a in engine.adapters()}
    assert served["ab"].uri == swapped and "bad" not in sync.failed
    torch.testing.assert_close(
        served_logits(engine, "ab"), reference_logits(tiny, made, ["a", "b"], [0.3, 0.7], "ties", 0.5)
    )
    assert internal_names(engine) == {served["a"].internal, served["ab"].internal}

    write(path, [("a", f"file://{made['a']}")])
    assert sync.sync_once() and [a.name for a in engine.adapters()] == ["a"]
    assert internal_names(engine) == {served["a"].internal}


def test_a_merge_failing_at_any_step_leaves_the_model_as_it_was(adapters, tmp_path, monkeypatch):
    """Refused before anything is attached (the merged rank), or failing inside PEFT after the sources
    were loaded: no PEFT layer, source or staging folder stays; adapters already served keep serving."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    import kubetune_serve.engine

    tiny, made = adapters
    engine = Engine(str(tiny), "tiny", cache_dir=tmp_path / "cache", max_adapters=3, max_lora_rank=16)
    engine.load_base()
    staging = tmp_path / "cache" / "adapter-staging"
    too_wide = merge_path(made, "cat", ["a", "c", "c"])  # rank 4 + 8 + 8 = 20 > maxLoraRank 16
    with pytest.raises(Exception, match="exceeds maxLoraRank 16"):
        engine.load_adapter("wide", too_wide)
    assert engine._peft is None and not any(isinstance(m, BaseTunerLayer) for m in engine.base.modules())
    assert not any(staging.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kubetune_serve.engine, "add_merged_adapter", broken)
    with pytest.raises(Exception, match=r"adapter ab could not be merged \(cat\): RuntimeError: out of memory"):
        engine.load_adapter("ab", merge_path(made, "cat", ["a", "b"]))
    assert engine._peft is None and not any(isinstance(m, BaseTunerLayer) for m in engine.base.modules())

    engine.load_adapter("a", f"file://{made['a']}")
    [plain] = engine.adapters()
    with pytest.raises(Exception, match="out of memory"):
        engine.load_adapter("ab", merge_path(made, "cat", ["a", "b"]))
    assert internal_names(engine) == {plain.internal} and [a.name for a in engine.adapters()] == ["a"]
    assert engine.generate("a", PROMPT_IDS, Sampling(max_tokens=2, temperature=0)).completion_tokens == 2
    assert not any(staging.iterdir())


def test_the_server_builds_merges_from_the_file_and_from_the_operators_load(adapters, tmp_path):
    tiny, made = adapters
    port = free_port()
    adapters_file = tmp_path / "adapters.json"
    ties = merge_path(made, "ties", ["a", "b"], (0.7, 0.3), 0.5)
    write(adapters_file, [("ab", ties), ("bad", merge_path(made, "linear", ["a", "c"]))])
    log = tmp_path / "serve.log"
    command = serve_command(
        tiny, port, "--served-model-name", "tiny", "--max-adapters", "3", "--max-lora-rank", "16",
        "--cache-dir", str(tmp_path / "cache"), "--adapters-file", str(adapters_file),
        "--allow-source", f"file://{made['a'].parent}/", "--api-key", API_KEY,
    )  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:
        wait_until_ready(client, process, log)
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["ab"]["root"] == ties and cards["ab"]["parent"] == "tiny"
        assert chat_text(client, "ab")
        health = client.get("/health").json()
        failed = health["adaptersFile"]["failed"]
        assert list(failed) == ["bad"] and "linear needs sources of one rank" in failed["bad"]

        # The operator's load carries the same merge path; its sources pass the allow-list.
        cat = merge_path(made, "cat", ["a", "b"], (1.0, 1.0))
        response = load(client, "cat", cat)
        assert response.status_code == 200, response.text
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["cat"]["root"] == cat and chat_text(client, "cat")
        elsewhere = shutil.copytree(made["b"], tmp_path / "b-elsewhere")  # the same adapter, not in the allowed place
        outside = merge_path({"a": made["a"], "x": elsewhere}, "cat", ["a", "x"])
        response = load(client, "outside", outside)
        assert response.status_code == 404 and "not found or not allowed" in response.json()["error"]["message"]
        assert "outside" not in {card["id"] for card in client.get("/v1/models").json()["data"]}
    finally:
        client.close()
        stop(process)
    assert json.loads(adapters_file.read_text())["adapters"][0]["merge"]["method"] == "ties"
