"""The data pipeline: files of every type and format become correctly masked, truncated, split and packed examples."""

import copy
import hashlib
import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
pa = pytest.importorskip("pyarrow", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
import pyarrow.parquet as pq  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kubetune.api.finetunejob import DatasetSpec  # noqa: E402
from kubetune_trainer.data import CHATML_TEMPLATE as CHAT_TEMPLATE  # noqa: E402
from kubetune_trainer.data import (  # noqa: E402
    IGNORE,
    Example,
    PreferenceExample,
    build_datasets,
    chat_template_for,
    collate,
    collate_preference,
    pack,
    read_records,
)
from kubetune_trainer.tiny_model import build_tiny_model  # noqa: E402

SUFFIXES = ["jsonl", "json", "csv", "parquet"]
END = "<|im_end|>"  # the tiny tokenizer's end of turn, and its EOS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def untagged(tok):
    """The same tokenizer with a ChatML template lacking {% generation %} tags, as most real models have."""
    other = copy.deepcopy(tok)
    other.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    return other


def spec(fmt="chat", **kw):
    return DatasetSpec(**{"uri": "file:///data/train.jsonl", "format": fmt, **kw})


def tolerant(fmt="chat", **kw):
    """A spec for tests about counting bad rows: any fraction of them is skipped, none refuses the data."""
    return spec(fmt, max_bad_row_fraction=1.0, **kw)


def write(path, rows):
    """Write rows as the suffix says; CSV cells hold nested values as JSON text, as exports do."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        import csv

        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    elif suffix == ".parquet":
        keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes its columns from row 1
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    else:
        raise AssertionError(suffix)
    return path


def runs(tok, labels):
    """Decoded text of each contiguous run of label-carrying tokens."""
    out, current = [], []
    for label in [*labels, IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            out.append(tok.decode(current))
            current = []
    return out


def trained_text(tok, example):
    return "".join(runs(tok, example.labels))


def chat(*turns):
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def texts(n, words=6):
    return [{"text": " ".join(f"word{i}" for _ in range(words))} for i in range(n)]


# --- formats x file types ------------------------------------------------------------------------

FORMAT_ROWS = {
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello there."}]},
    ],
    "instruction": [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hello.", "output": "Hello."},
    ],
    "completion": [
        {"prompt": "The store opens at", "completion": " eight."},
        {"prompt": "Two plus two is", "completion": " four."},
    ],
    "text": [{"text": "The store opens at eight."}, {"text": "Returns take two weeks."}],
}
TRAINED = {
    "chat": {"Paris." + END, "Hello there." + END},
    "instruction": {"chat" + END, "Hello." + END},
    "completion": {" eight." + END, " four." + END},
    "text": {"The store opens at eight." + END, "Returns take two weeks." + END},
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_every_format_from_every_file_type(tok, tmp_path, fmt, suffix):
    path = write(tmp_path / f"train.{suffix}", FORMAT_ROWS[fmt])
    train, evaluation, report = build_datasets(spec(fmt), path, tok, seed=0)
    assert evaluation is None
    assert (report.rows, report.bad_rows, report.train_examples) == (2, 0, 2), report.bad_examples
    assert {trained_text(tok, e) for e in train} == TRAINED[fmt]
    for e in train:
        assert len(e.input_ids) == len(e.labels) == len(e.position_ids)
        assert e.position_ids == list(range(len(e.input_ids)))
    assert report.train_tokens == sum(sum(label != IGNORE for label in e.labels) for e in train)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_preference_from_every_file_type(tok, tmp_path, suffix):
    rows = [
        {"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No."},
        {"prompt": [{"role": "user", "content": "Greet me."}], "chosen": "Hello!", "rejected": "Go away."},
    ]
    if suffix == "parquet":  # one column must have one type: the conversation prompt goes in as JSON text
        rows[1]["prompt"] = json.dumps(rows[1]["prompt"])
    path = write(tmp_path / f"pref.{suffix}", rows)
    train, _, report = build_datasets(spec("preference", packing=True), path, tok, seed=0)
    assert report.bad_rows == 0 and report.train_examples == 2
    assert all(isinstance(e, PreferenceExample) for e in train)  # never packed
    by_prompt = {tok.decode(e.prompt_ids): e for e in train}
    plain = by_prompt["Is the sky blue?"]
    assert tok.decode(plain.chosen_ids) == " Yes." + END and tok.decode(plain.rejected_ids) == " No." + END
    convo = by_prompt["<|im_start|>user\nGreet me.<|im_end|>\n<|im_start|>assistant\n"]
    assert tok.decode(convo.chosen_ids) == "Hello!" + END and tok.decode(convo.rejected_ids) == "Go away." + END
    assert report.train_tokens == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in train)


def test_preference_bad_pairs_and_truncation(tok, tmp_path):
    long = " ".join(["word"] * 40)
    rows = [
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},
        {"prompt": "Q?", "chosen": "A.", "rejected": 3},
        {"prompt": long, "chosen": " Good answer " + long, "rejected": " Bad answer " + long},
    ]
    path = write(tmp_path / "p.jsonl", rows)
    train, _, report = build_datasets(tolerant("preference", max_seq_length=16), path, tok, seed=0)
    assert report.bad_rows == 2 and report.truncated == 1
    assert report.bad_examples == [
        "row 1: chosen and rejected are identical",
        "row 2: 'rejected' must be a string, not int",
    ]
    (e,) = train
    assert len(e.prompt_ids) + len(e.chosen_ids) <= 16 and len(e.prompt_ids) + len(e.rejected_ids) <= 16
    assert tok.decode(e.prompt_ids).endswith("word") and tok.decode(e.chosen_ids).startswith(" Good")


def test_collate_preference_masks_the_prompt_and_pads(tok):
    batch = [PreferenceExample([1, 2, 3], [4, 5], [6]), PreferenceExample([7], [8, 9, 10, 11], [12, 13])]
    out = collate_preference(batch, pad_id=0)
    assert set(out) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    assert all(t.shape == (2, 5) for t in out.values())  # one width for both sides
    assert out["chosen_input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]
    assert out["chosen_labels"].tolist() == [[IGNORE] * 3 + [4, 5], [IGNORE, 8, 9, 10, 11]]
    assert out["rejected_input_ids"].tolist() == [[1, 2, 3, 6, 0], [7, 12, 13, 0, 0]]
    assert out["rejected_labels"].tolist() == [[IGNORE] * 3 + [6, IGNORE], [IGNORE, 12, 13, IGNORE, IGNORE]]
    assert out["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]


# --- reading -------------------------------------------------------------------------------------


def test_json_data_wrapper_and_folders(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert read_records(tmp_path / "wrapped.json") == [{"text": "a"}, {"text": "b"}]
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "part-1.parquet", [{"text": "c"}])
    write(folder / "part-0.jsonl", [{"text": "a"}, {"text": "b"}])
    (folder / "README.md").write_text("not data")
    (folder / ".part-2.jsonl").write_text('{"text": "hidden"}\n')
    assert read_records(folder) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]


def test_unreadable_files_name_the_path(tmp_path):
    cases = {
        "data.txt": "hello",
        "broken.json": "[{",
        "scalar.json": "42",
        "garbage.parquet": "not parquet at all",
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=name):
            read_records(tmp_path / name)
    with pytest.raises(ValueError, match="missing.jsonl"):
        read_records(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .* files"):
        read_records(empty)


# --- masking -------------------------------------------------------------------------------------

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are a shop assistant."},
        {"role": "user", "content": "When do you open?"},
        {"role": "assistant", "content": "At eight o'clock."},
        {"role": "user", "content": "And on Sunday?"},
        {"role": "assistant", "content": "We are closed on Sunday.\n"},
    ]
}
ASSISTANT_RUNS = ["At eight o'clock." + END, "We are closed on Sunday.\n" + END]


def test_chat_loss_is_only_on_assistant_tokens(tok, tmp_path):
    (e,), _, _ = build_datasets(spec(), write(tmp_path / "c.jsonl", [CONVERSATION]), tok, seed=0)
    assert runs(tok, e.labels) == ASSISTANT_RUNS
    assert all(label in (IGNORE, token) for label, token in zip(e.labels, e.input_ids, strict=True))
    assert tok.decode(e.input_ids) == tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)


def test_fallback_masking_without_generation_tags_gives_the_same_labels(tok, untagged, tmp_path):
    path = write(tmp_path / "c.jsonl", [CONVERSATION, FORMAT_ROWS["chat"][1]])
    assert "{% generation %}" not in untagged.chat_template
    tagged_train, _, _ = build_datasets(spec(), path, tok, seed=0)
    fallback_train, _, report = build_datasets(spec(), path, untagged, seed=0)
    assert report.bad_rows == 0
    assert [(e.input_ids, e.labels) for e in fallback_train] == [(e.input_ids, e.labels) for e in tagged_train]
    by_length = sorted(fallback_train, key=lambda e: len(e.input_ids))
    assert runs(untagged, by_length[0].labels) == ["Hello there." + END]
    assert runs(untagged, by_length[1].labels) == ASSISTANT_RUNS


def test_fallback_refuses_a_template_that_does_not_render_incrementally(untagged, tmp_path):
    untagged.chat_template = "{{ messages | length }}" + untagged.chat_template  # a prefix that changes per turn
    with pytest.raises(ValueError, match="renders message 1 differently"):
        build_datasets(spec(), write(tmp_path / "c.jsonl", [chat("hi", "hello")]), untagged, seed=0)


def test_instruction_input_goes_into_the_user_message(tok, tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
    (e,), _, _ = build_datasets(spec("instruction"), write(tmp_path / "i.jsonl", rows), tok, seed=0)
    assert tok.decode(e.input_ids) == (
        "<|im_start|>user\nTranslate to French.\n\ncat<|im_end|>\n<|im_start|>assistant\nchat<|im_end|>\n"
    )
    assert runs(tok, e.labels) == ["chat" + END]


def test_completion_and_text_labels(tok, tmp_path):
    rows = [{"prompt": "The store opens at", "completion": " eight."}]
    (e,), _, _ = build_datasets(spec("completion"), write(tmp_path / "c.jsonl", rows), tok, seed=0)
    prompt_len = len(tok.encode("The store opens at"))
    assert e.labels[:prompt_len] == [IGNORE] * prompt_len and IGNORE not in e.labels[prompt_len:]
    assert tok.decode(e.input_ids) == "The store opens at eight." + END
    (t,), _, _ = build_datasets(spec("text"), write(tmp_path / "t.jsonl", texts(1)), tok, seed=0)
    assert t.labels == t.input_ids and t.input_ids[-1] == tok.eos_token_id


def test_named_templates(tok):
    assert chat_template_for("tokenizer", tok) is None
    assert "{% generation %}" in chat_template_for("chatml", tok)
    assert "<|eot_id|>" in chat_template_for("llama3", tok)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chatTemplate"):
        chat_template_for("tokenizer", bare)


def test_llama3_template_masks_the_assistant(tok, tmp_path):
    (e,), _, _ = build_datasets(
        spec(chat_template="llama3"), write(tmp_path / "c.jsonl", [chat("hi", " Hello. ")]), tok, seed=0
    )
    assert runs(tok, e.labels) == ["Hello.<|eot_id|>"]  # content is trimmed, as Meta's template does


# --- truncation and bad rows ---------------------------------------------------------------------


def test_truncation_is_counted_and_untrainable_rows_dropped(tok, tmp_path):
    long_answer = chat("hi", " ".join(["eight"] * 40))
    long_question = chat(" ".join(["when"] * 40), "At eight.")
    rows = [long_answer, long_question, chat("hi", "Hello.")]
    train, _, report = build_datasets(tolerant(max_seq_length=24), write(tmp_path / "c.jsonl", rows), tok, seed=0)
    assert report.truncated == 1 and report.bad_rows == 1 and len(train) == 2
    assert report.bad_examples == ["row 2: no trainable tokens after truncation to maxSeqLength 24"]
    assert all(len(e.input_ids) <= 24 and len(e.labels) <= 24 for e in train)
    assert trained_text(tok, max(train, key=lambda e: len(e.input_ids))).startswith("eight eight")


def test_bad_rows_are_counted_with_row_numbers_and_the_run_goes_on(tok, tmp_path):
    lines = [
        json.dumps(chat("hi", "Hello.")),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "wrong format"}),
        json.dumps({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}),
        json.dumps(chat("bye", "Goodbye.")),
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    train, _, report = build_datasets(tolerant(), path, tok, seed=0)
    assert (report.rows, report.bad_rows, report.train_examples) == (8, 6, 2)
    assert report.bad_examples == [
        "row 2: no assistant message",
        "row 3: line 3: invalid JSON (Expecting property name enclosed in double quotes)",
        "row 4: message 1 has empty content",
        "row 5: line 5: not a JSON object",
        "row 6: missing 'messages'",
    ]  # only the first five are kept
    assert {trained_text(tok, e) for e in train} == {"Hello." + END, "Goodbye." + END}


def test_all_bad_rows_raise_with_the_reasons(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", [{"txt": "typo"}, {"text": ""}])
    with pytest.raises(ValueError, match=r"row 1: missing 'text'; row 2: empty 'text'") as caught:
        build_datasets(spec("text", uri=path.as_uri()), path, tok, seed=0)
    assert "t.jsonl" in str(caught.value)


# --- packing -------------------------------------------------------------------------------------


def test_packing(tok, tmp_path):
    rows = texts(12, words=3) + [{"text": "a much longer line of text " * 3}]
    path = write(tmp_path / "t.jsonl", rows)
    unpacked, _, plain_report = build_datasets(spec("text", max_seq_length=32), path, tok, seed=3)
    packed, _, report = build_datasets(spec("text", max_seq_length=32, packing=True), path, tok, seed=3)
    assert len(packed) < len(unpacked) and report.train_examples == len(unpacked) == 13
    assert all(len(p.input_ids) <= 32 for p in packed)
    # Same examples, same (shuffled) order, split wherever position_ids restart.
    segments = []
    for p in packed:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids)
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert starts[0] == 0
        for a, b in zip(starts, [*starts[1:], len(p.input_ids)], strict=True):
            assert p.position_ids[a:b] == list(range(b - a))
            assert p.labels[a] == IGNORE  # not predicted from the previous example's last token
            segments.append((p.input_ids[a:b], p.labels[a + 1 : b]))
    assert segments == [(e.input_ids, e.labels[1:]) for e in unpacked]
    # Only the boundary tokens lose their labels.
    boundary = sum(e.labels[0] != IGNORE for e in unpacked)
    assert report.train_tokens == plain_report.train_tokens - boundary > 0


def test_packed_batch_attention_stays_within_each_example(model_dir, tok):
    """What `pack` documents: restarting position_ids isolate examples only without attention_mask and cache."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    first, second = (Example(ids, ids, list(range(len(ids)))) for ids in map(tok.encode, ["one two", "three four"]))
    (packed,) = pack([first, second], 64)
    batch = collate([packed, second], pad_id=tok.pad_token_id)  # a second, padded row
    n = len(first.input_ids)
    with torch.no_grad():
        alone = model(torch.tensor([second.input_ids])).logits[0]
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert torch.allclose(isolated[0, n:], alone, atol=1e-5)
    assert torch.allclose(isolated[1, : len(second.input_ids)], alone, atol=1e-5)
    assert not torch.allclose(leaky[0, n:], alone, atol=1e-5)  # a 2-D attention_mask switches the detection off


# --- splits, shuffling, fingerprint --------------------------------------------------------------


def test_validation_fraction_is_deterministic_per_seed(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", texts(20))
    split = spec("text", validation={"fraction": 0.25})

    def run(seed):
        train, evaluation, report = build_datasets(split, path, tok, seed=seed)
        assert (report.train_examples, report.eval_examples) == (len(train), len(evaluation)) == (15, 5)
        return [tok.decode(e.input_ids) for e in train], [tok.decode(e.input_ids) for e in evaluation]

    train, evaluation = run(1)
    assert run(1) == (train, evaluation)
    assert sorted(train + evaluation) == sorted(row["text"] + END for row in texts(20))
    other_train, other_eval = run(2)
    assert set(other_eval) != set(evaluation) and other_train != train
    two = write(tmp_path / "two.jsonl", texts(2))
    (only,), (held,), _ = build_datasets(spec("text", validation={"fraction": 0.1}), two, tok, seed=0)
    assert only.input_ids != held.input_ids  # even a tiny fraction holds out one example


def test_training_order_is_shuffled_by_seed(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", texts(10))

    def order(seed):
        return [tok.decode(e.input_ids) for e in build_datasets(spec("text"), path, tok, seed=seed)[0]]

    file_order = [row["text"] + END for row in texts(10)]
    assert order(0) == order(0) != order(1)
    assert order(0) != file_order and sorted(order(1)) == sorted(file_order)


def test_validation_file(tok, tmp_path):
    train_path = write(tmp_path / "train.jsonl", texts(4))
    val_path = write(tmp_path / "val.csv", texts(3) + [{"text": ""}])
    val_spec = tolerant("text", validation={"uri": "s3://bucket/val.csv"})
    train, evaluation, report = build_datasets(val_spec, train_path, tok, seed=0, validation_path=val_path)
    assert (len(train), len(evaluation)) == (4, 3)
    assert (report.rows, report.bad_rows, report.bad_examples) == (8, 1, ["validation row 4: empty 'text'"])
    assert report.fingerprint == hashlib.sha256(train_path.read_bytes() + val_path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="validation"):
        build_datasets(val_spec, train_path, tok, seed=0)


def test_fingerprint_is_stable_and_follows_the_bytes(tok, tmp_path):
    path = write(tmp_path / "t.jsonl", texts(3))
    first = build_datasets(spec("text"), path, tok, seed=0)[2].fingerprint
    assert build_datasets(spec("text", packing=True), path, tok, seed=9)[2].fingerprint == first
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[12] ^= 1  # one bit in the text
    path.write_bytes(bytes(data))
    assert build_datasets(spec("text"), path, tok, seed=0)[2].fingerprint != first


# --- collate -------------------------------------------------------------------------------------


def test_collate_right_pads_and_masks(tok):
    batch = [
        Example([5, 6, 7], [IGNORE, 6, 7], [0, 1, 2]),
        Example([8, 9, 10, 11, 12], [8, 9, 10, 11, 12], [0, 1, 0, 1, 2]),  # a pack of two
    ]
    out = collate(batch, pad_id=tok.pad_token_id)
    assert set(out) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in out.values())
    pad = tok.pad_token_id
    assert out["input_ids"].tolist() == [[5, 6, 7, pad, pad], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [8, 9, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]  # pads continue, packs restart
    with pytest.raises(ValueError):
        collate([], pad_id=pad)
