"""bench/train_speed.py's own logic: which rows run where, the table and its ratios, the targets,
and how a row's process becomes a record. Nothing here trains (the script imports torch lazily)."""

import argparse
import json
import sys

import pytest

from bench import train_speed as ts


def args_for(*argv: str, cuda: bool = False) -> argparse.Namespace:
    p = ts.parser()
    return ts.resolve(p.parse_args(list(argv)), cuda, p)


def ok(row: str, tokens_per_s: float, peak_gib: float, device_type: str = "cpu", loss: float = 11.9) -> dict:
    label = next(r.label for r in ts.ROWS if r.name == row)
    return {
        "row": row,
        "label": label,
        "status": "ok",
        "tokens_per_s": tokens_per_s,
        "peak_bytes": int(peak_gib * 2**30),
        "peak_kind": "peak RSS of the row's process (ru_maxrss)",
        "step_s": 4096 / tokens_per_s,
        "first_step_s": 1.0,
        "loss": loss,
        "device_type": device_type,
    }


# --- --rows ---------------------------------------------------------------------------------------


def test_rows_are_returned_in_table_order_whatever_order_they_are_given_in():
    assert ts.parse_rows("kubetune, hf,hf-gc") == ["hf", "hf-gc", "kubetune"]
    assert ts.parse_rows("all") == list(ts.ROW_NAMES)
    assert ts.parse_rows(None) is None


@pytest.mark.parametrize("text", ["hf,unsloth", "", ",", "HF"])
def test_an_unknown_row_is_a_usage_error_naming_the_rows(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        args_for("--rows", text)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--rows: unknown row" in err and "qlora-kubetune" in err


def test_the_rows_are_the_issues_table_plus_ours_and_the_qlora_pair():
    assert ts.ROW_NAMES == (
        "hf",
        "hf-gc",
        "liger",
        "liger-gc",
        "compile",
        "liger-compile",
        "kubetune",
        "kubetune-gc",
        "qlora-hf",
        "qlora-kubetune",
    )


# --- which rows run where -------------------------------------------------------------------------


def test_on_cpu_every_row_is_listed_and_those_that_cannot_run_say_why():
    planned = dict((row.name, why) for row, why in ts.plan_rows(None, "cpu"))
    assert list(planned) == list(ts.ROW_NAMES)  # never silently dropped
    for name in ("liger", "liger-gc", "liger-compile"):
        assert "CUDA" in planned[name]
    assert "opt-in" in planned["compile"]
    runnable = [name for name, why in planned.items() if why is None]
    assert runnable == ["hf", "hf-gc", "kubetune", "kubetune-gc", "qlora-hf", "qlora-kubetune"]


def test_compile_runs_on_cpu_when_asked_for_but_liger_still_cannot():
    planned = dict((row.name, why) for row, why in ts.plan_rows(ts.parse_rows("compile,liger-compile"), "cpu"))
    assert planned["compile"] is None
    assert "CUDA" in planned["liger-compile"]


def test_on_cuda_every_row_runs_and_rows_not_asked_for_are_not_listed():
    assert all(why is None for _, why in ts.plan_rows(None, "cuda"))
    assert [row.name for row, _ in ts.plan_rows(["hf", "kubetune"], "cuda")] == ["hf", "kubetune"]


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_follow_the_device():
    cpu = args_for()
    assert (cpu.device, cpu.preset, cpu.warmup, cpu.steps, cpu.rows) == ("cpu", "small", 1, 2, None)
    gpu = args_for(cuda=True)
    assert (gpu.device, gpu.preset, gpu.warmup, gpu.steps) == ("cuda", "1b", 3, 10)
    assert args_for("--warmup", "0", "--steps", "5", "--preset", "tiny").steps == 5


def test_the_presets_are_the_anchors_shape_and_the_issues_cpu_configuration():
    one_b, small = ts.PRESETS["1b"], ts.PRESETS["small"]
    assert (one_b.hidden, one_b.intermediate, one_b.layers, one_b.heads, one_b.kv_heads) == (2048, 8192, 16, 32, 8)
    assert (one_b.vocab, one_b.micro_batch, one_b.seq_length) == (128_256, 4, 2048)
    assert (small.hidden, small.intermediate, small.layers, small.heads, small.kv_heads) == (1024, 2816, 8, 16, 4)
    assert (small.vocab, small.micro_batch, small.seq_length) == (128_256, 4, 1024)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "no CUDA GPU"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--micro-batch", "0"], "--micro-batch must be >= 1"),
    ],
)
def test_mistakes_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        args_for(*argv)
    assert message in capsys.readouterr().err


def test_overrides_change_the_batch_but_not_the_model():
    shape = ts.shape_of(args_for("--micro-batch", "2", "--seq-length", "256"))
    assert (shape.micro_batch, shape.seq_length, shape.hidden, shape.vocab) == (2, 256, 1024, 128_256)


# --- the table ------------------------------------------------------------------------------------


def test_ratio_formatting():
    assert ts.ratio(45, 30) == "1.50x"
    assert ts.ratio(1, 3) == "0.33x"
    assert ts.ratio(None, 3) == "-"
    assert ts.ratio(3, None) == "-"
    assert ts.ratio(3, 0) == "-"
    assert ts.gib(3 * 2**30) == "3.00" and ts.gib(None) == "-"


def test_table_gives_each_row_as_ratios_of_hf_and_keeps_rows_that_did_not_run():
    records = [
        ok("hf", 100.0, 14.0),
        ok("kubetune", 120.0, 5.6),
        ts.not_run(ts.ROWS[2], "Liger Kernel's Triton kernels need a CUDA GPU"),
        ts.not_run(ts.ROWS[7], "exit 1: MemoryError", "failed"),
    ]
    lines = ts.table(records)
    hf, ours, liger, failed = (
        next(line for line in lines if line.startswith(f"| {name} |"))
        for name in ("hf", "kubetune", "liger", "kubetune-gc")
    )
    assert hf.endswith("| 1.00x | 1.00x |")
    assert ours.endswith("| 1.20x | 0.40x |")
    assert "| 120.0 | 5.60 |" in ours
    assert "NOT RUN: Liger Kernel's Triton kernels need a CUDA GPU" in liger
    assert "FAILED: exit 1: MemoryError" in failed
    assert any("ru_maxrss" in line for line in lines)


def test_without_the_hf_row_there_are_no_ratios():
    line = ts.table([ok("kubetune", 120.0, 5.6)])[2]
    assert line.endswith("| - | - |")


def test_ours_are_compared_with_their_own_baseline_and_with_hf():
    records = [ok("hf", 100, 14), ok("hf-gc", 80, 8), ok("kubetune-gc", 100, 4), ok("qlora-hf", 50, 10)]
    lines = ts.comparisons(records)
    assert "kubetune-gc vs hf-gc: tokens/s 1.25x, peak 0.50x" in lines
    assert "kubetune-gc vs hf: tokens/s 1.00x, peak 0.29x" in lines
    assert not any(line.startswith("kubetune vs") or line.startswith("qlora-kubetune") for line in lines)


def test_cpu_targets_are_checked_against_the_issue():
    met = ts.targets([ok("hf", 100, 14.2), ok("kubetune", 101, 6.0)], "small")
    assert met == ["target kubetune tokens/s >= 1.00x hf: met (1.01x)", "target kubetune peak <= 0.45x hf: met (0.42x)"]
    missed = ts.targets([ok("hf", 100, 14.2), ok("kubetune", 99, 8.3)], "small")
    assert missed == [
        "target kubetune tokens/s >= 1.00x hf: MISSED (0.99x)",
        "target kubetune peak <= 0.45x hf: MISSED (0.58x)",
    ]
    assert ts.targets([ok("hf", 100, 14.2), ok("kubetune", 99, 8.3)], "tiny") == []


def test_gpu_targets_are_absolute_memory_and_twice_hfs_speed():
    records = [
        ok("hf", 30_000, 33.6, "cuda"),
        ok("kubetune", 61_000, 17.0, "cuda"),
        ok("kubetune-gc", 40_000, 4.6, "cuda"),
    ]
    assert ts.targets(records, "1b") == [
        "target kubetune tokens/s >= 2.00x hf: met (2.03x)",
        "target kubetune peak <= 18 GiB: met (17.00 GiB)",
        "target kubetune-gc peak <= 4.5 GiB: MISSED (4.60 GiB)",
    ]


# --- a row's process ------------------------------------------------------------------------------


def test_a_row_whose_process_fails_is_a_failed_row_with_its_last_line(monkeypatch, tmp_path):
    script = "import sys; sys.stderr.write('loading\\nMemoryError: boom\\n'); sys.exit(3)"
    monkeypatch.setattr(ts, "child_command", lambda *_: [sys.executable, "-c", script])
    record = ts.run_row(ts.ROWS[0], args_for("--rows", "hf"), tmp_path)
    assert record == {
        "row": "hf",
        "label": "HF + PEFT eager",
        "status": "failed",
        "reason": "exit 3: MemoryError: boom",
    }


def test_a_row_that_runs_past_its_timeout_is_a_failed_row(monkeypatch, tmp_path):
    monkeypatch.setattr(ts, "child_command", lambda *_: [sys.executable, "-c", "import time; time.sleep(30)"])
    record = ts.run_row(ts.ROWS[0], args_for("--row-timeout", "1"), tmp_path)
    assert record["status"] == "failed" and "--row-timeout 1 s" in record["reason"]


def test_a_rows_record_is_read_back_from_the_file_it_wrote(monkeypatch, tmp_path):
    written = ok("hf", 100, 14)
    out = tmp_path / "hf.json"
    script = f"import json, pathlib; pathlib.Path({str(out)!r}).write_text(json.dumps({written!r}))"
    monkeypatch.setattr(ts, "child_command", lambda *_: [sys.executable, "-c", script])
    record = ts.run_row(ts.ROWS[0], args_for(), tmp_path)
    assert record.pop("wall_s") >= 0
    assert record == json.loads(json.dumps(written))


def test_the_child_is_given_the_parents_settings(tmp_path):
    args = args_for("--preset", "tiny", "--warmup", "0", "--steps", "4", "--micro-batch", "2", "--profile")
    command = ts.child_command(ts.ROWS[6], args, tmp_path / "o.json", tmp_path)
    text = " ".join(command)
    for part in ("--row kubetune", "--preset tiny", "--device cpu", "--warmup 0", "--steps 4", "--micro-batch 2"):
        assert part in text
    assert "--profile kubetune" in text
    assert "--profile" not in " ".join(ts.child_command(ts.ROWS[0], args, tmp_path / "o.json", tmp_path))
