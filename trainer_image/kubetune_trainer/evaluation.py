"""After training: the tuned model against the base model, on the same held-out examples.

    exact_match, token_f1, rouge_l        a generated answer against its reference (pure functions)
    held_out_examples, generation_items   held-out examples → what to ask and what to expect
    evaluate                              one model object: the base first, then with the tuned weights
    evaluate_after_training               rank 0, after the adapter is published: never fails the job

Task metrics (chat, instruction and completion data): the prompt is the example without its last
answer, the reference is that answer; each model answers greedily, at most `maxNewTokens` tokens,
and the answer is scored with SQuAD's exact match and token F1 (normalized: lowercase, no
punctuation, no articles, single spaces) and ROUGE-L's F-measure (longest common subsequence of
tokens, tokenized as Google's rouge-score does by default: lowercase, every run of characters outside
[a-z0-9] a space, no stemming). Preference data: the share of pairs whose chosen reply gets a higher
mean per-token log-probability than the rejected one, and the mean difference. Text data has no
answers to compare: only the forgetting check runs.

Forgetting check: perplexity on a reference text that is not training data (by default
data/reference.txt, general-English prose written for the project), in windows of the training
context, for both models; `forgettingRatio` is tuned / base.

The metric functions are written here rather than imported: each is a few lines, and the libraries
that provide them cost more than they save in a training image. rouge-score ships only as an sdist
and pulls nltk and absl for one longest-common-subsequence; Hugging Face's `evaluate` pulls
`datasets` (and pandas, pyarrow's dataset layer, fsspec) and loads metrics as scripts. The functions
follow those implementations exactly (tests/unit/test_evaluation_metrics.py checks hand-computed
values), so scores compare with numbers people get from them.

What is measured is what was published: rank 0 loads the base model from spec.model and applies the
adapter from the output location (or, for a full fine-tune, loads the saved model), on its own
device, after training. That works the same whatever the strategy trained it (DDP, FSDP, DeepSpeed,
QLoRA). One copy of the weights at a time: the base is measured first, then the adapter is applied
to that same model object (rather than measuring the base with the adapter switched off by PEFT's
`disable_adapter()`, whose path differs per method: prompt and prefix tuning change `generate`
itself); a full fine-tune's saved model replaces the base. An evaluation that fails leaves a note
and the finished training stands.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.logs import log

REFERENCE_TEXT = Path(__file__).parent / "data" / "reference.txt"
MAX_REFERENCE_TOKENS = 16384  # the forgetting check's cost is bounded whatever referenceUri holds
MAX_REFERENCE_BYTES = 4 * 1024 * 1024
GENERATION_BATCH = 8
PREFERENCE_BATCH = 2  # pairs per forward pass: whole logits are held, unlike training's fused loss
PERPLEXITY_WINDOW = 2048  # tokens per forward pass on the reference text, at most (logits: window x vocab)
MAX_NOTES = 8
NOTE_LIMIT = 300
TASK_METRICS = ("exactMatch", "tokenF1", "rougeL")
PREFERENCE_METRICS = ("preferenceAccuracy", "rewardMargin")

# --- metrics (pure) ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over normalized words (a bag: repeated words count as often as both sides have
    them). Either side empty: 1.0 when both are, else 0.0."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lowercase, every run outside [a-z0-9] a separator, no stemming."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1, as rouge-score's `fmeasure`); 0.0 when either side has no tokens."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def task_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L over the pairs."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return {}
    return {
        name: sum(score(p, r) for p, r in pairs) / len(pairs)
        for name, score in (("exactMatch", exact_match), ("tokenF1", token_f1), ("rougeL", rouge_l))
    }


def preference_scores(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, float]:
    """From mean per-token log-probabilities of each pair's replies: the share of pairs where the
    chosen one is more likely, and the mean margin chosen - rejected."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    if not margins:
        return {}
    return {
        "preferenceAccuracy": sum(m > 0 for m in margins) / len(margins),
        "rewardMargin": sum(margins) / len(margins),
    }


def comparison(base: float | None, tuned: float | None) -> dict[str, float]:
    """{base, tuned, delta} rounded for reading; a side that was not measured is left out."""
    out = {side: _round(value) for side, value in (("base", base), ("tuned", tuned)) if _finite(value)}
    if _finite(base) and _finite(tuned):
        out["delta"] = _round(tuned - base)  # type: ignore[operator]
    return out


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _round(value: float | None) -> float:
    return float(f"{value:.6g}")


# --- held-out examples → prompts and references --------------------------------------------------


@dataclass
class GenerationItem:
    """A prompt (token ids, ready for the model) and the answer expected after it."""

    prompt_ids: list[int]
    reference: str


def unpack(examples: list) -> list:
    """Packed sequences split back into their examples, where position_ids restart at 0 (a pack's
    first token of each example is masked, but that token is always prompt, never an answer)."""
    from .data import Example

    out = []
    for example in examples:
        starts = [i for i, p in enumerate(example.position_ids) if p == 0] or [0]
        for start, end in zip(starts, [*starts[1:], len(example.input_ids)], strict=True):
            out.append(
                Example(example.input_ids[start:end], example.labels[start:end], example.position_ids[start:end])
            )
    return out


def last_answer_span(labels: list[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of trained tokens (the last assistant turn), or None."""
    from .data import IGNORE

    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE), None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def generation_items(examples: list, tokenizer, limit: int) -> list[GenerationItem]:
    """The first `limit` examples as prompts (everything before the last answer) and references (that
    answer, decoded without special tokens: the template's end-of-turn token is not part of it)."""
    items = []
    for example in unpack(examples):
        span = last_answer_span(example.labels)
        if span is None or span[0] == 0:
            continue
        reference = tokenizer.decode(example.input_ids[span[0] : span[1]], skip_special_tokens=True).strip()
        if reference:
            items.append(GenerationItem(example.input_ids[: span[0]], reference))
        if len(items) >= limit:
            break
    return items


def held_out_examples(dataset_spec, path: Path, tokenizer, uri: str) -> list:
    """A separate evaluation file (spec.evaluation.uri) in file order, encoded by the training data's
    own code in the dataset's format (bad rows counted and refused as there), neither split nor
    packed; refusals are the data code's one-line ValueErrors naming `uri`."""
    from . import data

    encode = data._Encoder(dataset_spec, tokenizer)
    return data._encode_rows(data._records(path, uri), encode, data._Tally(), "row", uri, dataset_spec)


def reference_ids(path: Path, tokenizer, name: str | None = None) -> tuple[list[int], bool]:
    """The reference text's token ids (at most MAX_REFERENCE_TOKENS), and whether it was cut;
    refusals name it as `name` (the URI the user wrote), else by its path."""
    path, name = Path(path), name or str(path)
    if path.is_dir():
        raise ValueError(f"{name}: the reference text must be a file, not a folder")
    with path.open("rb") as stream:
        raw = stream.read(MAX_REFERENCE_BYTES + 1)
    text = raw[:MAX_REFERENCE_BYTES].decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{name}: the reference text is empty")
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    cut = len(raw) > MAX_REFERENCE_BYTES or len(ids) > MAX_REFERENCE_TOKENS
    return ids[:MAX_REFERENCE_TOKENS], cut


# --- measuring one model -------------------------------------------------------------------------


@dataclass
class Task:
    """What to measure, the same for both models."""

    items: list[GenerationItem] = field(default_factory=list)
    pairs: list = field(default_factory=list)  # data.PreferenceExample
    reference: list[int] = field(default_factory=list)
    context: int = 2048  # longest sequence the model is given (prompt + answer, a perplexity window)
    max_new_tokens: int = 64
    notes: list[str] = field(default_factory=list)

    @property
    def examples(self) -> int:
        return len(self.items) or len(self.pairs)


@dataclass
class Measurement:
    scores: dict[str, float]
    tokens_generated: int = 0
    answers: list[str] = field(default_factory=list)


def stop_tokens(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation_config ones
    (chat models often end a turn with a token other than EOS, e.g. Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if isinstance(i, int))


def answer_length(generated: list[int], stops: list[int]) -> int:
    """Tokens of a generated row up to and including its first stop token (the rest is padding)."""
    for i, token in enumerate(generated):
        if token in stops:
            return i + 1
    return len(generated)


def generate_answers(model, tokenizer, items: list[GenerationItem], max_new_tokens: int, context: int, device):
    """Greedy answers, batched and left-padded; (answers, tokens generated)."""
    import torch

    stops, pad = stop_tokens(model, tokenizer), tokenizer.pad_token_id
    pad = pad if pad is not None else stops[0]
    keep = max(1, context - max_new_tokens)  # a long prompt keeps its end, nearest the answer
    answers, generated_tokens = [], 0
    for start in range(0, len(items), GENERATION_BATCH):
        prompts = [item.prompt_ids[-keep:] for item in items[start : start + GENERATION_BATCH]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        for row in output[:, width:].tolist():
            length = answer_length(row, stops)
            generated_tokens += length
            answers.append(tokenizer.decode(row[:length], skip_special_tokens=True).strip())
    return answers, generated_tokens


def preference_logps(model, pairs: list, pad_id: int, device) -> tuple[list[float], list[float]]:
    """Mean per-token log-probability of each pair's chosen and rejected reply."""
    import torch

    from .data import collate_preference
    from .dpo import both_sides

    chosen, rejected = [], []
    for start in range(0, len(pairs), PREFERENCE_BATCH):
        collated = collate_preference(pairs[start : start + PREFERENCE_BATCH], pad_id)
        batch = {k: v.to(device) for k, v in collated.items()}
        with torch.no_grad():
            sums = both_sides(model, batch)
        for side, total, out in zip(("chosen", "rejected"), sums, (chosen, rejected), strict=True):
            counts = (batch[f"{side}_labels"][:, 1:] != -100).sum(-1).clamp(min=1)
            out.extend((total.float() / counts).tolist())
    return chosen, rejected


def perplexity(model, ids: list[int], context: int, device) -> float | None:
    """exp(mean next-token loss) over the text in consecutive windows of `context` tokens (at most
    PERPLEXITY_WINDOW)."""
    import torch
    import torch.nn.functional as F

    context = max(2, min(context, PERPLEXITY_WINDOW))
    total, count = 0.0, 0
    for start in range(0, len(ids), context):
        window = ids[start : start + context]
        if len(window) < 2:
            continue
        tensor = torch.tensor([window], device=device)
        with torch.no_grad():
            logits = model(input_ids=tensor, attention_mask=torch.ones_like(tensor), use_cache=False).logits
        logits = logits[:, -tensor.shape[1] :]  # prompt tuning prepends virtual-token logits
        total += float(F.cross_entropy(logits[0, :-1].float(), tensor[0, 1:], reduction="sum"))
        count += len(window) - 1
    return math.exp(total / count) if count else None


def measure(model, tokenizer, task: Task, device) -> Measurement:
    """Everything `task` asks of one model."""
    model.eval()
    result = Measurement({})
    if task.items:
        answers, result.tokens_generated = generate_answers(
            model, tokenizer, task.items, task.max_new_tokens, task.context, device
        )
        result.answers = answers
        result.scores.update(task_scores(answers, [item.reference for item in task.items]))
    if task.pairs:
        result.scores.update(preference_scores(*preference_logps(model, task.pairs, tokenizer.pad_token_id, device)))
    if task.reference:
        value = perplexity(model, task.reference, task.context, device)
        if value is not None:
            result.scores["perplexity"] = value
    return result


def evaluate(
    load_base: Callable[[], Any],
    tune: Callable[[Any], Any] | None,
    tokenizer,
    task: Task,
    device,
    on_tuned: Callable[[Any], tuple[dict, list[str]]] | None = None,
) -> dict:
    """The base model measured, then `tune(base)` (the adapter applied to that same model object, or
    the fine-tuned model loaded in its place) measured on the same task; an EvaluationResult as a
    camelCase dict. Without `tune` only the base is measured. `on_tuned(model)` runs on the tuned
    model before it is released (the benchmarks): its scores go to `benchmarks`, its notes to `notes`."""
    started = time.monotonic()
    models = [load_base()]  # one model at a time: `tune` gets the only reference to the base
    base = measure(models[0], tokenizer, task, device)
    tuned, scores = None, {}
    if tune is not None:
        models.append(tune(models.pop()))
        tuned = measure(models[0], tokenizer, task, device)
        if on_tuned is not None:
            scores, notes = on_tuned(models[0])
            task.notes.extend(notes)
    models.clear()
    _release_memory()
    names = [n for n in (*TASK_METRICS, *PREFERENCE_METRICS, "perplexity") if n in base.scores]
    metrics = {n: comparison(base.scores[n], tuned.scores.get(n) if tuned else None) for n in names}
    result: dict[str, Any] = {
        "examples": task.examples,
        "seconds": round(time.monotonic() - started, 2),
        "tokensGenerated": base.tokens_generated + (tuned.tokens_generated if tuned else 0),
        "metrics": metrics,
        "notes": clipped_notes(task.notes),
    }
    ratio = forgetting_ratio(base.scores.get("perplexity"), tuned.scores.get("perplexity") if tuned else None)
    if ratio is not None:
        result["forgettingRatio"] = ratio
    if scores:
        result["benchmarks"] = scores
    return result


def forgetting_ratio(base: float | None, tuned: float | None) -> float | None:
    """Perplexity tuned / base on the reference text: above 1, the tuned model finds general text
    less likely than the base did."""
    if not (_finite(base) and _finite(tuned)) or not base:
        return None
    return _round(tuned / base)  # type: ignore[operator]


def clipped_notes(notes: list[str]) -> list[str]:
    return [n if len(n) <= NOTE_LIMIT else n[: NOTE_LIMIT - 3] + "..." for n in notes[:MAX_NOTES]]


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the task, from a job's spec -----------------------------------------------------------------


def task_for(
    data_format: str,
    examples: list,
    tokenizer,
    *,
    reference: Path,
    reference_name: str | None = None,
    max_examples: int,
    max_new_tokens: int,
    context: int,
    source: str | None,
) -> Task:
    """What to measure for data of `data_format`: generation items or preference pairs from
    `examples` (the first `max_examples`), and the reference text's ids. `source` says where the
    examples came from, for the note when there are none (None: none were asked for)."""
    task = Task(context=context, max_new_tokens=max_new_tokens)
    if data_format == "preference":
        task.pairs = list(examples[:max_examples])
    elif data_format == "text":
        task.notes.append("text data has no reference answers: task metrics skipped, only perplexity measured")
    elif data_format == "unpaired-preference":
        # A thumbs-down reply is what not to say: only the thumbs-up ones are references to match.
        task.items = generation_items([e for e in examples if e.desirable], tokenizer, max_examples)
    else:
        task.items = generation_items(examples, tokenizer, max_examples)
    if data_format != "text" and not task.examples and source is not None:
        task.notes.append(f"no held-out examples ({source}): task metrics skipped")
    task.reference, cut = reference_ids(reference, tokenizer, reference_name)
    if cut:
        task.notes.append(f"reference text cut to its first {len(task.reference)} tokens")
    return task


def evaluate_after_training(
    spec,
    *,
    model_dir: Path,
    tuned_dir: Callable[[], Path],
    tokenizer,
    eval_set: list | None,
    device,
    cache_dir: Path,
    local: bool,
) -> dict | None:
    """The evaluation of a finished job, on rank 0: None when spec.evaluation.enabled is false; else
    an EvaluationResult dict, logged as one `evaluation` line. Any failure becomes a result with only
    a note (and an `evaluation_failed` log line): the adapter is published, the training stands.

    `tuned_dir` returns the published adapter's local folder (a full fine-tune: the saved model)."""
    settings = spec.evaluation
    if not settings.enabled:
        return None
    started = time.monotonic()
    _release_memory()  # what training left behind, before the published weights are loaded
    try:
        result = _evaluate_job(spec, model_dir, tuned_dir, tokenizer, eval_set, device, cache_dir, local)
    except Exception as error:  # noqa: BLE001 - an evaluation must never fail a finished training
        from kubetune.logs import first_line

        _release_memory()
        message = first_line(error)
        log("evaluation_failed", message=message, seconds=round(time.monotonic() - started, 2))
        return {"notes": clipped_notes([f"evaluation failed: {message}"])}
    result["seconds"] = round(time.monotonic() - started, 2)  # the held-out data and the text included
    log("evaluation", **summary(result))
    return result


def summary(result: dict) -> dict:
    """The `evaluation` log line: cost first, then each metric's base → tuned."""
    line = {k: result.get(k) for k in ("examples", "seconds", "tokensGenerated", "forgettingRatio")}
    for name, values in result.get("metrics", {}).items():
        line[name] = values
    if result.get("benchmarks"):
        line["benchmarks"] = result["benchmarks"]
    if result.get("notes"):
        line["notes"] = result["notes"]
    return line


def _evaluate_job(spec, model_dir, tuned_dir, tokenizer, eval_set, device, cache_dir, local) -> dict:
    from kubetune import storage

    from . import methods

    settings = spec.evaluation
    cache = Path(cache_dir)
    on_tuned, early_notes = _benchmarks_hook(settings.benchmarks, tokenizer, device, cache, local)
    source = "the validation split"
    examples = eval_set or []
    if settings.uri:
        path = storage.resolve_input(settings.uri, cache_dir=cache, local=local)
        examples, source = held_out_examples(spec.dataset, path, tokenizer, settings.uri), settings.uri
    elif not examples:
        source = "no validation split: set dataset.validation or evaluation.uri"
    reference = (
        storage.resolve_input(settings.reference_uri, cache_dir=cache, local=local)
        if settings.reference_uri
        else REFERENCE_TEXT
    )
    on_gpu = getattr(device, "type", str(device)) == "cuda"

    def load_base():
        model = methods.load_base_model(model_dir, spec, on_gpu=on_gpu)  # QLoRA: quantized, as trained
        return model if spec.method.type == "qlora" else model.to(device)

    context = min(spec.dataset.max_seq_length, _positions(model_dir) or spec.dataset.max_seq_length)
    task = task_for(
        spec.dataset.format,
        examples,
        tokenizer,
        reference=reference,
        reference_name=settings.reference_uri,
        max_examples=settings.max_examples,
        max_new_tokens=settings.max_new_tokens,
        context=context,
        source=source,
    )
    task.notes[:0] = early_notes
    full = spec.method.type == "full"

    def tune(base):
        folder = tuned_dir()
        if full:
            del base
            _release_memory()
            return methods.load_base_model(folder, spec, on_gpu=on_gpu).to(device)
        return attach_adapter(base, folder)

    return evaluate(load_base, tune, tokenizer, task, device, on_tuned)


def _benchmarks_hook(bench, tokenizer, device, cache: Path, local: bool):
    """(a function running spec.evaluation.benchmarks on the tuned model, notes), or (None, notes).
    The task folder is fetched first, before any model is loaded: a wrong taskUri costs nothing."""
    if bench is None:
        return None, []
    from kubetune import storage

    from . import benchmarks

    task_dir = None
    if bench.task_uri:
        try:
            task_dir = benchmarks.fetch_tasks(bench.task_uri, cache_dir=cache, local=local)
        except (storage.StorageError, benchmarks.BenchmarkError) as error:
            return None, [f"benchmarks skipped: {error}"]

    def run(model) -> tuple[dict, list[str]]:
        scores, notes, _ = benchmarks.run_benchmarks(
            model, tokenizer, bench, device, task_dir, batch_size=8, cache_dir=cache / "benchmarks"
        )
        return scores, notes

    return run, []


def attach_adapter(base, adapter_dir: Path):
    """The base model with the saved adapter applied (PEFT injects it into the same object)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)


def _positions(model_dir: Path) -> int | None:
    """The model's longest supported sequence (config.json's max_position_embeddings), if it says."""
    import json

    try:
        value = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 1 else None


# --- `kubetune eval`: the same evaluation on this machine ----------------------------------------

_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, EOFError)


def _loaded(what: str, uri: str, load: Callable[[], Any]) -> Any:
    """`load()`, with a folder transformers or PEFT cannot read turned into one line naming it."""
    from kubetune.logs import first_line

    try:
        return load()
    except Exception as error:
        if not isinstance(error, _LOAD_ERRORS) and type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{what} {uri}: cannot be loaded ({first_line(error)})") from None


def evaluate_local(
    *,
    model: str,
    adapter: str | None,
    data: str | None,
    data_format: str,
    max_examples: int,
    max_new_tokens: int,
    reference: str | None,
    cache_dir: Path,
) -> dict:
    """`kubetune eval`: base model `model` against `adapter` (a PEFT adapter folder, or a fine-tuned
    model folder) on the first `max_examples` rows of `data`, and on the reference text. Inputs that
    are missing or unusable raise StorageError or ValueError with one line naming the option."""
    import torch

    from kubetune import storage
    from kubetune.api.finetunejob import DatasetSpec

    from . import methods

    if max_examples < 1 or max_new_tokens < 1:
        raise ValueError("--max-examples and --max-new-tokens must be at least 1")
    model_dir = storage.local_input(model, cache_dir, "--model")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model}: not a model folder (no config.json)")
    adapter_dir = storage.local_input(adapter, cache_dir, "--adapter") if adapter else None
    full = adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file()
    if adapter_dir is not None and full and not (adapter_dir / "config.json").is_file():
        raise ValueError(
            f"--adapter {adapter}: neither an adapter folder (adapter_config.json) nor a model folder (config.json)"
        )
    reference_path = storage.local_input(reference, cache_dir, "--reference") if reference else REFERENCE_TEXT
    data_path = storage.local_input(data, cache_dir, "--data") if data else None
    tokenizer = _loaded("--model", model, lambda: methods.load_tokenizer(model_dir))
    context = min(2048, _positions(model_dir) or 2048)
    examples: list = []
    if data_path is not None:
        spec = DatasetSpec.model_validate({"uri": data_path.resolve().as_uri(), "format": data_format})
        spec = spec.model_copy(update={"max_seq_length": context})
        examples = held_out_examples(spec, data_path, tokenizer, data)
    task = task_for(
        data_format,
        examples,
        tokenizer,
        reference=reference_path,
        reference_name=reference,
        max_examples=max_examples,
        max_new_tokens=max_new_tokens,
        context=context,
        source=data,
    )
    if data_path is None:
        task.notes.append("no --data: task metrics skipped, only perplexity measured")
    if adapter_dir is None:
        task.notes.append("no --adapter: the base model alone")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    def load(folder: Path, what: str, uri: str):
        from transformers import AutoModelForCausalLM

        return _loaded(what, uri, lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)).to(device)

    def tune(base):
        assert adapter_dir is not None and adapter is not None
        if full:
            del base
            _release_memory()
            return load(adapter_dir, "--adapter", adapter)
        return _loaded("--adapter", adapter, lambda: attach_adapter(base, adapter_dir))

    return evaluate(lambda: load(model_dir, "--model", model), tune if adapter_dir else None, tokenizer, task, device)


def render_table(result: dict) -> str:
    """The result as people read it: metric | base | tuned | delta, perplexity last, then the
    forgetting ratio, the cost and the notes."""
    metrics = result.get("metrics", {})
    names = [n for n in metrics if n != "perplexity"] + (["perplexity"] if "perplexity" in metrics else [])
    rows = [("metric", "base", "tuned", "delta")]
    rows += [(n, *(_cell(metrics[n].get(side)) for side in ("base", "tuned", "delta"))) for n in names]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(_aligned(row, widths)).rstrip() for row in rows]
    ratio = result.get("forgettingRatio")
    lines.append(f"forgetting ratio (perplexity tuned / base): {_cell(ratio)}")
    lines.append(
        f"examples: {result.get('examples', 0)}  seconds: {result.get('seconds', 0)}  "
        f"tokens generated: {result.get('tokensGenerated', 0)}"
    )
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def _aligned(row: tuple[str, ...], widths: list[int]) -> list[str]:
    """The metric's name left-aligned, the numbers right-aligned."""
    return [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
