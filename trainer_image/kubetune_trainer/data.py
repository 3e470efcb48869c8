"""The data pipeline: a dataset file already on local disk → tokenized training and evaluation examples.

    read_records   file or folder (.jsonl, .json, .csv, .parquet) → raw rows
    build_datasets rows → Example / PreferenceExample / UnpairedExample lists for train and eval, plus a DataReport
    collate, collate_preference, collate_unpaired   examples → right-padded tensors for one step

Real datasets have broken rows. A broken row is counted and reported ("row N: reason"), never a
crash, so one bad line in a million does not kill a multi-hour job. A dataset whose broken rows are
more than `dataset.maxBadRowFraction` of it (1% by default) is refused with a few of them quoted:
that is a wrong file, not a few broken lines. So is a text file in UTF-16 or UTF-32 (said as much,
rather than as a pile of undecodable rows), a dataset with no usable row at all, and a
configuration that cannot work (no chat template, no EOS token). Refusals are ValueErrors that
name the dataset's URI; untrusted content (a row nested 200,000 levels deep, a huge line) is a
bad row or a refusal, never a RecursionError or MemoryError out of here.

Everything here is deterministic for a given file, tokenizer and seed: the same inputs give the
same examples in the same order, and `DataReport.fingerprint` identifies the data in report.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError

IGNORE = -100  # the label PyTorch's cross-entropy (and every HF causal LM) skips
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_BAD_EXAMPLES = 5  # bad rows kept in report.json
MAX_QUOTED_ROWS = 3  # bad rows quoted in the error that refuses a dataset
REASON_LIMIT = 100  # characters of one bad row's reason: reasons may quote the row's own content
_SNIFF_BYTES = 4096
_TEXT_SUFFIXES = (".jsonl", ".json", ".csv")

# ChatML (Qwen, many fine-tunes). `{% generation %}` marks what the assistant says, so the loss
# can be masked to it exactly; the newline after <|im_end|> is layout, not something to learn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 instruct layout (content trimmed, as Meta's template does), with generation tags.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# --- results ------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training sequence (one example, or several packed together)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE (-100) where the loss is masked: prompt tokens, padding, pack boundaries
    position_ids: list[int]  # 0.. per example; restart at 0 for each example inside a pack


@dataclass
class PreferenceExample:
    """One DPO pair: the same prompt with a preferred and a dispreferred reply."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class UnpairedExample(Example):
    """One KTO example: a prompt and a single reply labelled good (`desirable`) or bad, with no pair.

    As an Example it is prompt + reply with the prompt's labels masked, so whatever reads examples
    (token counts, the evaluation's prompts and references) reads it too. `mismatched_ids` is another
    example's reply, fitted after this prompt: KTO estimates the policy's KL from the reference on
    such mismatched (prompt, reply) pairs (`pair_mismatched`)."""

    desirable: bool = True
    prompt_length: int = 0
    mismatched_ids: list[int] = field(default_factory=list)


PREFERENCE_FORMATS = ("preference", "unpaired-preference")  # never packed: their losses are per example
_LABELS = {"true": True, "false": False, "1": True, "0": False}


@dataclass
class DataReport:
    """What the data turned into; goes into report.json so a run says exactly what it trained on."""

    fingerprint: str  # sha256 over the raw bytes of the training file(s), then the validation file(s)
    rows: int  # rows read, training and validation files together
    bad_rows: int
    bad_examples: list[str]  # the first MAX_BAD_EXAMPLES, each "row N: reason" clipped to REASON_LIMIT
    train_examples: int  # examples, before packing
    eval_examples: int
    train_tokens: int  # tokens the loss sees in train (labels != -100, after packing's boundary masks)
    truncated: int  # examples cut to maxSeqLength and kept


# --- reading files ------------------------------------------------------------------------------


class BadRecord(dict):
    """A row that could not even be parsed (e.g. a JSON Lines line that is not JSON).

    It stays in the list, in place, so row numbers still match the file and `build_datasets` counts
    it as a bad row with `reason` instead of the whole read failing.
    """

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (a list, or {"data": [...]}), .csv or .parquet file, chosen by suffix.

    A folder reads every supported file in it (not hidden ones, not sub-folders), sorted by name, as
    one dataset, as sharded exports (part-0000.parquet, ...) come. Raises ValueError naming the path
    when the file is missing, of an unknown type, or unreadable as a whole; a single bad JSON Lines
    line or non-object item becomes a BadRecord instead.
    """
    path = Path(path)
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise ValueError(f"{path}: folder holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        records: list[dict] = []
        for file in files:
            records.extend(_read_file(file, where=f"{file.name} "))
        return records
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return _read_file(path)


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
    )


def _read_file(path: Path, where: str = "") -> list[dict]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if path.suffix.lower() in _TEXT_SUFFIXES and (encoding := wide_encoding(path)):
        raise ValueError(f"{path}: the file is {encoding}; convert it to UTF-8 (iconv -f {encoding} -t UTF-8)")
    try:
        return reader(path, where)
    except (ValueError, OSError, csv.Error) as e:  # pyarrow's errors are ValueError/OSError subclasses
        raise ValueError(f"{path}: cannot read as {path.suffix[1:]}: {_clip(str(e), 300)}") from e
    except RecursionError:
        raise ValueError(f"{path}: cannot read as {path.suffix[1:]}: nested too deeply") from None
    except MemoryError:
        raise ValueError(f"{path}: cannot read as {path.suffix[1:]}: too large to hold in memory") from None


def wide_encoding(path: Path) -> str | None:
    """ "UTF-16" or "UTF-32" when a text file is in one of them (its byte order mark, or, without one,
    NUL bytes in a quarter or more of its start, which UTF-8 text does not have), else None. Read as
    UTF-8 such a file is mostly undecodable rows; saying what it is tells the user what to do."""
    try:
        with open(path, "rb") as stream:
            start = stream.read(_SNIFF_BYTES)
    except OSError:
        return None  # the reader meets the same error and reports it
    if start.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    nuls = start.count(0)
    if len(start) < 2 or nuls * 4 < len(start):
        return None
    return "UTF-32" if nuls * 10 >= len(start) * 6 else "UTF-16"


def _clip(text: str, limit: int = REASON_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_jsonl(path: Path, where: str) -> list[dict]:
    rows: list[dict] = []
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for lineno, line in enumerate(data.split(b"\n"), 1):  # split on \n only: line numbers as editors count
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:  # includes UnicodeDecodeError
            rows.append(BadRecord(f"{where}line {lineno}: invalid JSON ({getattr(e, 'msg', e)})"))
            continue
        except RecursionError:  # e.g. [[[[...]]]] 200,000 deep: the parser recurses once per level
            rows.append(BadRecord(f"{where}line {lineno}: JSON nested too deeply"))
            continue
        rows.append(value if isinstance(value, dict) else BadRecord(f"{where}line {lineno}: not a JSON object"))
    return rows


def _read_json(path: Path, where: str) -> list[dict]:
    value = json.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise ValueError('expected a list of objects or {"data": [...]}')
    return [
        v if isinstance(v, dict) else BadRecord(f"{where}item {i}: not a JSON object") for i, v in enumerate(value, 1)
    ]


def _read_csv(path: Path, where: str) -> list[dict]:
    # The default 128 KiB cell limit is smaller than many documents; raising it is process-wide but harmless.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open(newline="", encoding="utf-8-sig") as f:
        return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f)]


def _read_parquet(path: Path, where: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


_READERS: dict[str, Callable[[Path, str], list[dict]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def fingerprint(*paths: Path | None) -> str:
    """sha256 of the raw bytes of every file, in order (a folder: its data files sorted by name).

    Same bytes, same fingerprint, whatever the tokenizer or seed: `cat train.jsonl val.jsonl | sha256sum`
    gives the same value for a file pair.
    """
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        for file in _data_files(path) if path.is_dir() else [path]:
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


# --- chat templates -----------------------------------------------------------------------------


def chat_template_for(name: str, tokenizer) -> str | None:
    """The template for `dataset.chatTemplate`: None means the tokenizer's own, which must exist."""
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; set spec.dataset.chatTemplate to chatml or llama3")
        return None
    try:
        return _NAMED_TEMPLATES[name]
    except KeyError:
        expected = ", ".join(["tokenizer", *_NAMED_TEMPLATES])
        raise ValueError(f"unknown chat template {name!r}; expected one of {expected}") from None


class _BadRow(ValueError):
    """A reason why one row cannot become an example; counted, never fatal on its own."""


class _ChatRenderer:
    """Renders conversations with a chat template and finds the assistant's tokens in them."""

    def __init__(self, tokenizer, template_name: str):
        self.tokenizer = tokenizer
        self.template = chat_template_for(template_name, tokenizer)
        self.tagged = bool(_GENERATION_TAG.search(tokenizer.get_chat_template(self.template)))

    def ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=add_generation_prompt, return_dict=False
            )
        )

    def example(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and labels that keep only what the assistant says."""
        if self.tagged:
            out = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = list(out["input_ids"])
            return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"], strict=True)]
        return self._masked_by_rendering(messages)

    def _masked_by_rendering(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """The fallback for templates without `{% generation %}` tags (most real model templates).

        Assistant turn i spans from the end of messages[:i] rendered with the generation prompt to the
        end of messages[:i+1]; both must be token prefixes of the whole conversation. Trailing
        whitespace tokens (ChatML's newline after <|im_end|>) are layout and stay masked, so the
        labels match what a tagged template gives.
        """
        ids = self.ids(messages)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise _BadRow(
                    "the conversation starts with an assistant message; without {% generation %} tags in the "
                    "chat template its start cannot be found"
                )
            start = self._prefix_length(ids, messages[:i], i, add_generation_prompt=True)
            end = self._trim_whitespace(ids, start, self._prefix_length(ids, messages[: i + 1], i))
            labels[start:end] = ids[start:end]
        return ids, labels

    def prompt_and_reply(self, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
        """A preference prompt rendered up to the assistant header, and the reply's tokens after it."""
        full = self.ids([*prompt, {"role": "assistant", "content": reply}])
        start = self._prefix_length(full, prompt, len(prompt), add_generation_prompt=True)
        return full[:start], full[start : self._trim_whitespace(full, start, len(full))]

    def _prefix_length(self, full: list[int], messages: list[dict], turn: int, add_generation_prompt=False) -> int:
        part = self.ids(messages, add_generation_prompt=add_generation_prompt)
        if full[: len(part)] != part:
            raise _BadRow(
                f"the chat template renders message {turn} differently inside the whole conversation, so the "
                "assistant tokens cannot be found; use a template with {% generation %} tags (chatTemplate: chatml)"
            )
        return len(part)

    def _trim_whitespace(self, ids: list[int], start: int, end: int) -> int:
        while end > start and not self.tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
        return end


# --- rows → examples ----------------------------------------------------------------------------


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _BadRow(f"missing {key!r}")
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty {key!r}")
    return value


def _maybe_json_list(value: Any) -> Any:
    """CSV cells are strings: a list of messages arrives as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # left as text: then not a list of messages, a bad row
            return value
    return value


def _message(raw: Any, i: int) -> dict:
    """One message as {role, content}; ShareGPT's {from, value} is mapped (human→user, gpt→assistant)."""
    if not isinstance(raw, dict):
        raise _BadRow(f"message {i} is not an object")
    if raw.get("role") is not None:
        role, content = raw["role"], raw.get("content")
        if role not in _ROLES:
            raise _BadRow(f"message {i} has unknown role {role!r}")
    elif raw.get("from") is not None:
        role, content = _SHAREGPT_ROLES.get(raw["from"]), raw.get("value")
        if role is None:
            raise _BadRow(f"message {i} has unknown speaker {raw['from']!r}")
    else:
        raise _BadRow(f"message {i} has no role")
    if not isinstance(content, str):
        raise _BadRow(f"message {i} content must be a string, not {type(content).__name__}")
    if not content.strip():
        raise _BadRow(f"message {i} has empty content")
    return {"role": role, "content": content}


def _messages(raw: Any, key: str) -> list[dict]:
    raw = _maybe_json_list(raw)
    if not isinstance(raw, list) or not raw:
        raise _BadRow(f"{key!r} must be a non-empty list of messages")
    return [_message(m, i) for i, m in enumerate(raw)]


def _conversation(row: dict) -> list[dict]:
    # The first of the two keys with a value (a CSV row has both columns, one of them empty).
    key = next((k for k in ("messages", "conversations") if row.get(k) not in (None, "")), None)
    if key is None:
        raise _BadRow("missing 'messages'")
    messages = _messages(row[key], key)
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no assistant message")
    return messages


class _Encoder:
    """Turns one row of the configured format into one example (or raises _BadRow)."""

    def __init__(self, spec, tokenizer):
        self.format = spec.format
        self.max_len = spec.max_seq_length
        self.tokenizer = tokenizer
        self._template_name = spec.chat_template
        self._renderer: _ChatRenderer | None = None
        if self.format in ("chat", "instruction"):
            self._renderer = _ChatRenderer(tokenizer, spec.chat_template)  # a missing template fails the job now
        if self.format in ("completion", "text", *PREFERENCE_FORMATS) and tokenizer.eos_token_id is None:
            raise ValueError(f"format {self.format} appends the EOS token, but the tokenizer has none")

    @property
    def chat(self) -> _ChatRenderer:
        if self._renderer is None:  # preference data only needs a template when a prompt is a message list
            try:
                self._renderer = _ChatRenderer(self.tokenizer, self._template_name)
            except ValueError as e:
                raise _BadRow(f"prompt is a list of messages but {e}") from None
        return self._renderer

    def __call__(self, row: dict) -> tuple[Example | PreferenceExample, bool]:
        if self.format == "preference":
            return self._preference(row)
        if self.format == "unpaired-preference":
            return self._unpaired(row)
        ids, labels = getattr(self, f"_format_{self.format}")(row)
        truncated = len(ids) > self.max_len
        ids, labels = ids[: self.max_len], labels[: self.max_len]
        if all(label == IGNORE for label in labels):
            after = f" after truncation to maxSeqLength {self.max_len}" if truncated else ""
            raise _BadRow(f"no trainable tokens{after}")
        return Example(ids, labels, list(range(len(ids)))), truncated

    def _format_chat(self, row):
        return self.chat.example(_conversation(row))

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def _format_instruction(self, row):
        instruction, output, extra = _text(row, "instruction"), _text(row, "output"), row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _BadRow(f"'input' must be a string, not {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return self.chat.example([{"role": "user", "content": user}, {"role": "assistant", "content": output}])

    def _format_completion(self, row):
        # Encoded apart so the boundary is exact; the prompt gets the tokenizer's usual specials (BOS).
        prompt = self._encode(_text(row, "prompt"), special=True)
        completion = self._encode(_text(row, "completion"), special=False) + [self.tokenizer.eos_token_id]
        return prompt + completion, [IGNORE] * len(prompt) + completion

    def _format_text(self, row):
        ids = self._encode(_text(row, "text"), special=True) + [self.tokenizer.eos_token_id]
        return ids, list(ids)

    def _preference(self, row) -> tuple[PreferenceExample, bool]:
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        if chosen == rejected:
            raise _BadRow("chosen and rejected are identical")
        prompt = _maybe_json_list(row.get("prompt"))
        if isinstance(prompt, list):  # a conversation: rendered with the chat template up to the assistant header
            messages = _messages(prompt, "prompt")
            prompt_ids, chosen_ids = self.chat.prompt_and_reply(messages, chosen)
            _, rejected_ids = self.chat.prompt_and_reply(messages, rejected)
        else:  # plain text: concatenated as in the completion format
            prompt_ids = self._encode(_text(row, "prompt"), special=True)
            eos = [self.tokenizer.eos_token_id]
            chosen_ids = self._encode(chosen, special=False) + eos
            rejected_ids = self._encode(rejected, special=False) + eos
        return self._truncate_pair(prompt_ids, chosen_ids, rejected_ids)

    def _truncate_pair(self, prompt, chosen, rejected) -> tuple[PreferenceExample, bool]:
        """Fit prompt + each reply into maxSeqLength.

        The prompt keeps its end (nearest the reply) and gives up at most half the budget to long
        replies; the replies keep their beginnings.
        """
        budget, longest = self.max_len, max(len(chosen), len(rejected))
        truncated = len(prompt) + longest > budget
        if truncated:
            keep = min(len(prompt), max(budget // 2, budget - longest))
            prompt = prompt[len(prompt) - keep :]
            chosen, rejected = chosen[: budget - keep], rejected[: budget - keep]
            if chosen == rejected:
                raise _BadRow(f"chosen and rejected are identical after truncation to maxSeqLength {budget}")
        return PreferenceExample(prompt, chosen, rejected), truncated

    def _unpaired(self, row) -> tuple[UnpairedExample, bool]:
        """{prompt, completion, label}: the prompt as in preference data (text, or a list of messages
        rendered up to the assistant header), the completion as one reply, truncated as a pair is."""
        completion, desirable = _text(row, "completion"), _label(row)
        prompt = _maybe_json_list(row.get("prompt"))
        if isinstance(prompt, list):
            prompt_ids, reply_ids = self.chat.prompt_and_reply(_messages(prompt, "prompt"), completion)
        else:
            prompt_ids = self._encode(_text(row, "prompt"), special=True)
            reply_ids = self._encode(completion, special=False) + [self.tokenizer.eos_token_id]
        if not reply_ids:
            raise _BadRow("the completion renders to no tokens")
        fitted, truncated = self._truncate_pair(prompt_ids, reply_ids, [])
        ids = fitted.prompt_ids + fitted.chosen_ids
        labels = [IGNORE] * len(fitted.prompt_ids) + fitted.chosen_ids
        example = UnpairedExample(ids, labels, list(range(len(ids))), desirable, len(fitted.prompt_ids))
        return example, truncated


def _label(row: dict) -> bool:
    """KTO's label: a JSON boolean, or (CSV cells are strings) true/false/1/0."""
    value = row.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    if value is None:
        raise _BadRow("missing 'label'")
    shown = repr(value) if isinstance(value, str | int | float) else type(value).__name__
    raise _BadRow(f"'label' must be true or false, not {_clip(shown, 40)}")


def pair_mismatched(examples: list[UnpairedExample], max_len: int) -> None:
    """Give each example the reply of the next one (the last gets the first's), cut to fit after its
    own prompt in `max_len` tokens: the mismatched pairs of KTO's KL estimate. Done once on the
    shuffled list, so it is fixed for a seed and works whatever the micro-batch size (a batch of one
    has no other reply to mismatch with)."""
    for i, example in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        example.mismatched_ids = other.input_ids[other.prompt_length :][: max_len - example.prompt_length]


# --- the whole dataset --------------------------------------------------------------------------


@dataclass
class _Tally:
    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    truncated: int = 0


def _encode_rows(records: list[dict], encode: _Encoder, tally: _Tally, label: str, source: str, spec) -> list:
    """Examples of the usable rows of one file (or folder); the others are counted in `tally`.
    Refuses the file when no row is usable, or more than spec.max_bad_row_fraction of them are not."""
    examples, reasons, bad = [], [], 0
    for n, record in enumerate(records, 1):
        tally.rows += 1
        try:
            if isinstance(record, BadRecord):
                raise _BadRow(record.reason)
            example, truncated = encode(record)
        except (_BadRow, TemplateError) as e:  # a template may raise_exception() on e.g. non-alternating roles
            reason = _clip(f"{label} {n}: {e}")
            bad += 1
            tally.bad_rows += 1
            if len(tally.bad_examples) < MAX_BAD_EXAMPLES:
                tally.bad_examples.append(reason)
            if len(reasons) < MAX_QUOTED_ROWS:
                reasons.append(reason)
            continue
        tally.truncated += truncated
        examples.append(example)
    if not records:
        raise ValueError(f"{source}: no rows")
    quoted = "; ".join(reasons)
    if not examples:
        raise ValueError(f"{source}: none of the {len(records)} rows is usable as {encode.format} data: {quoted}")
    if bad > spec.max_bad_row_fraction * len(records):
        raise ValueError(
            f"{source}: {bad} of {len(records)} rows ({bad / len(records):.1%}) are not usable as {encode.format} "
            f"data, more than dataset.maxBadRowFraction allows ({spec.max_bad_row_fraction:g}): {quoted}; "
            "fix or remove those rows, or raise maxBadRowFraction"
        )
    return examples


def _records(path: Path, uri: str) -> list[dict]:
    """read_records, with its refusals naming the URI the user wrote (pvc://CLAIM/PATH, hf://...)
    rather than the local path it was mounted or downloaded at."""
    try:
        return read_records(path)
    except ValueError as e:
        raise ValueError(str(e).replace(str(path), uri.rstrip("/"))) from None


def _eval_size(n: int, fraction: float) -> int:
    """round(n * fraction), but at least 1 and leaving at least 1 for training."""
    return 0 if n < 2 else min(n - 1, max(1, round(n * fraction)))


def pack(examples: Iterable[Example], max_len: int) -> list[Example]:
    """Concatenate examples, in the given order, into sequences of at most max_len tokens (next-fit).

    Inside a pack each example keeps its own position_ids (0, 1, ...), and the label of each
    example's first token is masked: the model predicts label i from token i-1, which would be the
    previous example's last token. That token's label is also never trained without packing (the
    shift drops it), so packing changes no trainable target.

    Attention (transformers 5.23, checked by tests/trainer/test_data.py): Llama-style models turn
    restarting position_ids into a block-diagonal causal mask (masking_utils.create_causal_mask →
    find_packed_sequence_indices) for sdpa, eager and flex attention, so tokens stay within their
    example; but only when the model is called with attention_mask=None and without a KV cache.
    Passing collate's 2-D attention_mask (even all ones) or leaving use_cache on (config.use_cache
    is True by default and LlamaModel then builds a DynamicCache even in training) switches the
    detection off, and every token then attends to the earlier examples in its pack. flash_attention_2
    derives varlen boundaries from position_ids only for batch size 1 without an attention_mask
    (modeling_flash_attention_utils._is_packed_sequence). So call packed batches as
    model(input_ids=..., labels=..., position_ids=..., use_cache=False): right padding makes the
    dropped mask harmless, since under a causal mask no real token sees the pads after it.
    """
    packs: list[Example] = []
    current: list[Example] = []
    length = 0
    for example in examples:
        if current and length + len(example.input_ids) > max_len:
            packs.append(_join(current))
            current, length = [], 0
        current.append(example)
        length += len(example.input_ids)
    if current:
        packs.append(_join(current))
    return packs


def _join(parts: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE, *part.labels[1:]]
        positions += range(len(part.input_ids))
    return Example(ids, labels, positions)


def _trained_tokens(examples: list) -> int:
    if examples and isinstance(examples[0], PreferenceExample):
        return sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return sum(sum(label != IGNORE for label in e.labels) for e in examples)


def build_datasets(
    spec, train_path: Path, tokenizer, *, seed: int, validation_path: Path | None = None
) -> tuple[list[Example] | list[PreferenceExample], list[Example] | list[PreferenceExample] | None, DataReport]:
    """Read, validate, tokenize, mask, truncate, split, shuffle and (optionally) pack a dataset.

    `spec` is a DatasetSpec. Evaluation data is `validation_path` (a file in the same format, for
    validation.uri), else a seeded random `validation.fraction` of the usable examples, else None.
    The training list is shuffled with `seed` (before packing, so packs mix examples); the same
    seed gives the same split and order. Preference data (paired or not) is never packed.
    """
    if spec.validation is not None and spec.validation.uri and validation_path is None:
        raise ValueError("dataset.validation.uri is set but no validation file was given")
    encode = _Encoder(spec, tokenizer)
    tally = _Tally()
    train = _encode_rows(_records(train_path, spec.uri), encode, tally, "row", spec.uri, spec)
    rng = random.Random(seed)
    rng.shuffle(train)
    evaluation = None
    if validation_path is not None:
        source = (spec.validation and spec.validation.uri) or str(validation_path)
        rows = _records(validation_path, source)
        evaluation = _encode_rows(rows, encode, tally, "validation row", source, spec)
    elif spec.validation is not None and spec.validation.fraction:
        k = _eval_size(len(train), spec.validation.fraction)
        evaluation, train = train[:k], train[k:]
    train_examples, eval_examples = len(train), len(evaluation or [])
    if spec.format == "unpaired-preference":
        pair_mismatched(train, spec.max_seq_length)
        pair_mismatched(evaluation or [], spec.max_seq_length)
    if spec.packing and spec.format not in PREFERENCE_FORMATS:
        train = pack(train, spec.max_seq_length)
        evaluation = pack(evaluation, spec.max_seq_length) if evaluation is not None else None
    report = DataReport(
        fingerprint=fingerprint(train_path, validation_path),
        rows=tally.rows,
        bad_rows=tally.bad_rows,
        bad_examples=tally.bad_examples,
        train_examples=train_examples,
        eval_examples=eval_examples,
        train_tokens=_trained_tokens(train),
        truncated=tally.truncated,
    )
    return train, evaluation, report


# --- batches ------------------------------------------------------------------------------------


def _pad(rows: list[list[int]], width: int, value: int) -> list[list[int]]:
    return [row + [value] * (width - len(row)) for row in rows]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence: input_ids, labels, attention_mask, position_ids.

    Pads get label -100 and attention_mask 0. Their position_ids continue counting from the last
    token, so an unpacked batch has no position restart that transformers could mistake for packing
    (see `pack` for how to call the model on packed batches).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    positions = []
    for e in batch:
        last = e.position_ids[-1] if e.position_ids else -1
        positions.append(e.position_ids + list(range(last + 1, last + 1 + width - len(e.position_ids))))
    return {
        "input_ids": torch.tensor(_pad([e.input_ids for e in batch], width, pad_id), dtype=torch.long),
        "labels": torch.tensor(_pad([e.labels for e in batch], width, IGNORE), dtype=torch.long),
        "attention_mask": torch.tensor(_pad([[1] * len(e.input_ids) for e in batch], width, 0), dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


def collate_preference(batch: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* tensors (input_ids, labels, attention_mask) for DPO.

    Each sequence is prompt + reply, with the prompt's labels -100. Chosen and rejected are padded
    to one common width, so a trainer can concatenate them into a single forward pass.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in batch)
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        replies = [getattr(e, f"{side}_ids") for e in batch]
        ids = [e.prompt_ids + reply for e, reply in zip(batch, replies, strict=True)]
        labels = [[IGNORE] * len(e.prompt_ids) + reply for e, reply in zip(batch, replies, strict=True)]
        out[f"{side}_input_ids"] = torch.tensor(_pad(ids, width, pad_id), dtype=torch.long)
        out[f"{side}_labels"] = torch.tensor(_pad(labels, width, IGNORE), dtype=torch.long)
        out[f"{side}_attention_mask"] = torch.tensor(_pad([[1] * len(r) for r in ids], width, 0), dtype=torch.long)
    return out


def collate_unpaired(batch: list[UnpairedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO's batch: input_ids, labels, attention_mask of prompt + reply; the same three prefixed
    kl_ for prompt + mismatched reply; and `desirable` (bool, one per example). Both halves are
    padded to one width, so a reference pass can run them as one batch."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    mismatched = [e.input_ids[: e.prompt_length] + e.mismatched_ids for e in batch]
    width = max(max(len(e.input_ids) for e in batch), max(len(ids) for ids in mismatched))
    kl_labels = [[IGNORE] * e.prompt_length + e.mismatched_ids for e in batch]
    return {
        "input_ids": torch.tensor(_pad([e.input_ids for e in batch], width, pad_id), dtype=torch.long),
        "labels": torch.tensor(_pad([e.labels for e in batch], width, IGNORE), dtype=torch.long),
        "attention_mask": torch.tensor(_pad([[1] * len(e.input_ids) for e in batch], width, 0), dtype=torch.long),
        "kl_input_ids": torch.tensor(_pad(mismatched, width, pad_id), dtype=torch.long),
        "kl_labels": torch.tensor(_pad(kl_labels, width, IGNORE), dtype=torch.long),
        "kl_attention_mask": torch.tensor(_pad([[1] * len(ids) for ids in mismatched], width, 0), dtype=torch.long),
        "desirable": torch.tensor([e.desirable for e in batch], dtype=torch.bool),
    }
