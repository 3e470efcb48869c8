"""Adapter merging's checks: which adapter configs `merge_problem` refuses, and why, in one line; and
`kubetune merge` turning each user mistake into exit 2 and one line on stderr, before any model loads."""

import json
import subprocess
import sys

import pytest

from kubetune_serve.merging import default_weights, merge_problem, merged_rank


def lora(r=8, targets=("q_proj", "v_proj"), **extra):
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), **extra}


@pytest.mark.parametrize(
    ("method", "density"),
    [("linear", None), ("cat", None), ("ties", 0.5), ("dare_linear", 1.0), ("dare_ties", 0.1)],
)
def test_two_loras_of_one_rank_and_targets_merge_with_every_method(method, density):
    assert merge_problem([lora(), lora()], [0.5, 0.5], method, density) is None
    assert merge_problem([lora(), lora(targets=("v_proj", "q_proj"))], None, method, density) is None


@pytest.mark.parametrize(
    ("configs", "weights", "method", "density", "fragment"),
    [
        ([lora()], None, "linear", None, "at least 2 source adapters, got 1"),
        ([lora()] * 17, None, "linear", None, "at most 16"),
        ([lora(), lora()], [1.0], "linear", None, "1 weights for 2 sources"),
        ([lora(), lora()], [1.0, float("nan")], "linear", None, "weight 2 is 'nan', not a finite number"),
        ([lora(), lora()], [1.0, 1e9], "cat", None, "weight 2 is 1000000000.0; weights lie between -100 and 100"),
        ([lora(), lora()], [0.0, 0.0], "cat", None, "every weight is 0"),
        ([lora(), lora()], None, "svd", None, "unknown merge method 'svd'; use one of linear, cat, ties"),
        ([lora(), lora()], None, "ties", None, "ties needs a density"),
        ([lora(), lora()], None, "dare_ties", 0.0, "density 0.0 is not in (0, 1]"),
        ([lora(), lora()], None, "dare_linear", 1.5, "density 1.5 is not in (0, 1]"),
        ([lora(), lora()], None, "linear", 0.5, "density applies to ties, dare_linear, dare_ties only"),
        ([lora(), {"peft_type": "LOHA", "r": 8}], None, "cat", None, "source 2: a LOHA adapter; only LoRA"),
        ([lora(use_dora=True), lora()], None, "cat", None, "source 1: a DoRA adapter"),
        (
            [lora(), lora(modules_to_save=["lm_head"])],
            None,
            "cat",
            None,
            'source 2: trains whole modules (["lm_head"])',
        ),
        ([lora(), lora(lora_bias=True)], None, "cat", None, "source 2: trains LoRA biases"),
        ([lora(init_lora_weights="pissa_niter_4"), lora()], None, "cat", None, "changes the base weights"),
        ([lora(), lora(r=0)], None, "cat", None, "source 2: adapter_config.json has no valid rank"),
        ([lora(), lora(r="eight")], None, "cat", None, "source 2: adapter_config.json has no valid rank"),
        ([lora(), ["not", "a", "dict"]], None, "cat", None, "source 2: adapter_config.json is not a JSON object"),
        ([lora(), lora(targets=())], None, "cat", None, "source 2: adapter_config.json names no target_modules"),
        ([lora(), lora(targets=("q_proj",))], None, "cat", None, "source 2 adapts other modules than source 1"),
        ([lora(r=8), lora(r=4)], None, "linear", None, "linear needs sources of one rank, these have ranks [8, 4]"),
        ([lora(r=8), lora(r=8, rank_pattern={"q_proj": 16})], None, "ties", 0.5, "ranks [8, 16]"),
    ],
)
def test_what_cannot_be_merged_is_one_line_that_says_why(configs, weights, method, density, fragment):
    problem = merge_problem(configs, weights, method, density)
    assert problem is not None and fragment in problem, problem
    assert "\n" not in problem and len(problem) < 300


def test_cat_takes_any_ranks_and_its_rank_is_their_sum_bounded_by_max_rank():
    configs = [lora(r=8), lora(r=4)]
    assert merge_problem(configs, None, "cat", None) is None
    assert merged_rank(configs, "cat") == 12
    assert merged_rank(configs, "ties") == 8
    assert merge_problem(configs, None, "cat", None, max_rank=12) is None
    assert "rank 12 (cat of ranks [8, 4]) exceeds maxLoraRank 8" in merge_problem(
        configs, None, "cat", None, max_rank=8
    )


def test_default_weights_keep_each_source_at_its_trained_strength():
    assert default_weights("cat", 2) == [1.0, 1.0]
    assert default_weights("ties", 3) == [1.0, 1.0, 1.0]
    assert default_weights("dare_ties", 2) == [1.0, 1.0]
    assert default_weights("linear", 4) == [0.25] * 4  # the summed A factors count each source 4 times
    assert default_weights("dare_linear", 2) == [0.5, 0.5]


# --- `kubetune merge`: user mistakes ------------------------------------------------------------


def adapter_folder(path, config):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def merge(*args):
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "merge", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def folders(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {
        "model": str(model),
        "a": str(adapter_folder(tmp_path / "a", lora())),
        "b": str(adapter_folder(tmp_path / "b", lora())),
        "r4": str(adapter_folder(tmp_path / "r4", lora(r=4))),
        "loha": str(adapter_folder(tmp_path / "loha", {"peft_type": "LOHA", "r": 8, "target_modules": ["q_proj"]})),
        "empty": str((tmp_path / "empty").mkdir() or tmp_path / "empty"),
        "tmp": tmp_path,
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--adapter", "{a}", "--adapter", "{tmp}/nope", "--method", "cat"], "--adapter {tmp}/nope: no such file"),
        (["--adapter", "{a}", "--adapter", "file://{tmp}/nope", "--method", "cat"], "--adapter file://{tmp}/nope"),
        (["--adapter", "{a}", "--adapter", "{empty}", "--method", "cat"], "not an adapter folder"),
        (["--adapter", "{a}", "--method", "linear"], "at least 2 source adapters, got 1"),
        (["--adapter", "{a}", "--adapter", "{b}", "--weight", "1", "--method", "cat"], "1 weights for 2 sources"),
        (["--adapter", "{a}", "--adapter", "{b}", "--weight", "1", "--weight", "nan", "--method", "cat"], "finite"),
        (["--adapter", "{a}", "--adapter", "{r4}", "--method", "linear"], "ranks [8, 4]; use cat"),
        (["--adapter", "{a}", "--adapter", "{loha}", "--method", "cat"], "source 2: a LOHA adapter"),
        (["--adapter", "{a}", "--adapter", "{b}", "--method", "ties"], "ties needs a density"),
        (["--adapter", "{a}", "--adapter", "{b}", "--method", "ties", "--density", "2"], "not in (0, 1]"),
        (["--adapter", "{a}", "--adapter", "{b}", "--method", "cat", "-o", "{model}"], "is not an adapter folder"),
    ],
)
def test_a_user_mistake_exits_2_with_one_line(folders, args, fragment):
    filled = [arg.format(**folders) for arg in args]
    if "-o" not in filled:
        filled += ["-o", str(folders["tmp"] / "merged")]
    result = merge("--model", folders["model"], *filled)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubetune merge: "), result.stderr
    assert fragment.format(**folders) in lines[0]
    assert not (folders["tmp"] / "merged").exists()


def test_merge_is_listed_with_its_options():
    result = merge("--help")
    assert result.returncode == 0
    for option in ("--model", "--adapter", "--weight", "--method", "--density", "--out", "dare_ties"):
        assert option in result.stdout
