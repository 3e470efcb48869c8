"""The model behind `kubetune serve`: one base model, LoRA adapters added and removed at runtime,
and generation continuously batched (`batching.Batcher`: up to `max_running` requests share each
forward pass, each row with its own adapter or none; at most `max_queued` more wait, 429 past that).
No HTTP here: errors are `EngineError`s that carry the status and the OpenAI error type the API
answers with.

Adapters live in one PEFT model wrapped around the base (`load_adapter`, `delete_adapter`); plain
LoRA adapters are also stacked per layer for the grouped path (`grouped.py`), and the others (DoRA,
LoRA biases, `modules_to_save`, ...) are served grouped by adapter, in forwards of their own. Forward
passes run on the batcher's thread, one step at a time under the model lock; attaching or detaching
an adapter takes the lock between two steps (and goes first: the stepper waits while it is asked
for). An adapter being unloaded or replaced is detached once the requests using it have finished
(`DRAIN_SECONDS` at most); new requests for it are refused at once. Public adapter names (anything
a client may put in `model`) map to internal PEFT names, which must be valid module names and must
not collide with PEFT's own prefixes.

A load is two steps: `prepare_adapter` (no lock: check the source, copy it into a private staging
folder within the size cap, check config and weights) and `attach` (under the lock: PEFT reads the
staged, local files). So a slow or hostile source never holds up generation, and the weights hashed
are the weights served. Content that can never load (not LoRA, too wide, another base, unreadable
weights) is a 422. `stalled_for` tells /health whether the work holding the lock still moves.

A merged adapter (a `merge:` path, `kubetune.api.merging`: an AdapterDeployment adapter with `merge`)
loads the same way: `prepare_adapter` checks every source against the allow-list before fetching any,
stages each within one shared size cap and checks it as an ordinary adapter (config, maxLoraRank,
fit to the base), then asks `merging.merge_problem` whether they merge that way (the
merged rank within maxLoraRank too). `attach` loads the sources under temporary internal names,
builds the merged adapter with PEFT's add_weighted_adapter (`add_merged_adapter`) and deletes the
sources, all under the lock: the merge is then an ordinary LoRA adapter (grouped per row, served by
name), and a failure leaves no temporary adapter behind. Its `uri` is the merge path, so another
merge under the same name (other sources or weights) replaces it like another URI.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.api.merging import MergePlan, is_merge_path, parse_merge_path
from kubetune.storage import local_input, sha256_of

from .batching import Batcher, Row
from .errors import EngineError
from .grouped import Rows, groupable_problem, rebuild
from .merging import adapter_rank, add_merged_adapter, merge_problem, merged_rank
from .sources import check_source, fetch
from .text import TextTracker

__all__ = ["Adapter", "Engine", "EngineError", "Generation", "Pending", "Prepared", "Sampling"]

DRAIN_SECONDS = 60.0  # how long an unload waits for the requests still using the adapter


def not_found(message: str) -> EngineError:
    return EngineError(message, 404, "NotFoundError")


def model_not_found(name: str) -> EngineError:
    return not_found(f"The model `{name}` does not exist.")


@dataclass
class Adapter:
    name: str
    uri: str
    path: Path
    rank: int
    internal: str
    sha256: str | None = None  # of the weights file, as a FineTuneJob reports its adapter
    created: int = field(default_factory=lambda: int(time.time()))
    lane: str | None = None  # None: served by the grouped path; else its own forwards (see `grouping`)
    grouping: str = "grouped"  # how its requests are batched, as /v1/models shows it
    detached: bool = False  # unloaded from the model: requests still holding it end with a 404


@dataclass
class Prepared:
    """An adapter fetched into a private staging folder and checked, waiting for `Engine.attach`."""

    name: str
    uri: str
    path: Path
    rank: int
    sha256: str | None
    peft_type: str = "LORA"
    merge: MergePlan | None = None  # a merged adapter: its plan, and its sources staged under `path`
    parts: tuple[Path, ...] = ()


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    queued_seconds: float = 0.0  # waiting for the model, before the prompt was read
    first_token_seconds: float | None = None  # from the call to the first generated token


@dataclass
class Pending:
    """A request in the batcher: `result()` waits for its Generation (or raises its EngineError)."""

    row: Row
    batcher: Batcher

    def result(self) -> Generation:
        row = self.row
        while not row.done.wait(1.0):
            if not self.batcher.alive:
                raise EngineError("internal error: the generation thread stopped", 500, "InternalServerError")
        if row.error is not None:
            raise row.error
        tracker = row.tracker
        return Generation(
            tracker.text, row.finish or "length", len(row.prompt), len(tracker.token_ids), row.queued, row.first_token
        )


def invalid_adapter(message: str) -> EngineError:
    """Adapter content that can never load here (not LoRA, too wide, another base, bad weights): 422,
    so the operator marks the adapter Failed instead of retrying."""
    return EngineError(message, 422, "UnprocessableEntityError")


def one_line(text: str, path: Path, uri: str, limit: int = 300) -> str:
    """An error from a library as one line for a client: the staging folder shown as the URI it came from."""
    flat = " ".join(str(text).replace(str(path), uri).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# PEFT types served besides LoRA: adapters whose layers PEFT injects into the base model (so the
# model's own forward applies them), each served grouped by adapter, in forwards of its own.
OTHER_SERVED_TYPES = ("LOHA", "LOKR", "VERA", "OFT", "HRA", "FOURIERFT", "LN_TUNING")


def read_adapter_config(path: Path, uri: str, max_lora_rank: int) -> dict:
    """adapter_config.json of a LoRA adapter whose rank fits `max_lora_rank` (or of one of the
    OTHER_SERVED_TYPES, whose `r` is no LoRA rank: maxLoraRank does not apply), or an EngineError."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise invalid_adapter(f"{uri}: not a LoRA adapter (no adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise invalid_adapter(f"{uri}: unreadable adapter_config.json ({one_line(error, path, uri, 120)})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") not in ("LORA", *OTHER_SERVED_TYPES):
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise invalid_adapter(
            f"{uri}: only LoRA, {', '.join(OTHER_SERVED_TYPES)} adapters can be served, "
            f"this is a {str(kind)[:40]} adapter"
        )
    if config.get("peft_type", "LORA") != "LORA":
        return config
    try:
        rank = adapter_rank(config)
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise invalid_adapter(f"{uri}: adapter_config.json has no valid rank (r, rank_pattern)") from None
    if rank > max_lora_rank:
        raise invalid_adapter(f"adapter rank {rank} exceeds maxLoraRank {max_lora_rank}")
    return config


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def weights_sha256(path: Path) -> str | None:
    """SHA-256 of the adapter's weights file: the digest a FineTuneJob reports in status.adapter."""
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    return sha256_of(file) if file else None


def weight_mismatches(model, path: Path, uri: str = "") -> list[str]:
    """What in the adapter's weights does not fit `model`: absent modules and wrong shapes.

    Read from the safetensors header only, before PEFT touches the model: an adapter trained on
    another base is refused cleanly instead of failing halfway into the model.
    """
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        return []  # a .bin adapter: PEFT's own checks apply
    try:
        return _mismatches(model, file)
    except Exception as error:  # not a safetensors file, truncated header
        raise invalid_adapter(
            f"{uri or 'the adapter'}: unreadable adapter_model.safetensors ({one_line(error, path, uri, 120)})"
        ) from None


def _mismatches(model, file: Path) -> list[str]:
    from safetensors import safe_open

    problems = []
    with safe_open(str(file), framework="pt") as weights:
        for key in weights.keys():
            module_name, found, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if not found:
                continue  # modules_to_save and other full weights: PEFT's own checks apply
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                problems.append(f"the base model has no module {module_name}")
                continue
            shape = weights.get_slice(key).get_shape()
            expected = _expected_dim(module, kind)
            got = shape[1] if kind.startswith(("A.", "embedding_A")) else shape[0]
            if expected is not None and len(shape) >= 2 and got != expected:
                problems.append(f"{key} has shape {list(shape)}, {module_name} has size {expected}")
    return problems


def _expected_dim(module, kind: str) -> int | None:
    if kind.startswith("A."):
        return getattr(module, "in_features", None)
    if kind.startswith("B."):
        return getattr(module, "out_features", None)
    if kind.startswith("embedding_A"):
        return getattr(module, "num_embeddings", None)
    if kind.startswith("embedding_B"):
        return getattr(module, "embedding_dim", None)
    return None


class Engine:
    """The base model, its adapters, and generation, for one served model name."""

    def __init__(
        self,
        model_uri: str,
        served_name: str,
        *,
        cache_dir: Path,
        max_adapters: int = 8,
        max_lora_rank: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        max_adapter_bytes: int = 2 * 1024**3,
        max_queued: int = 64,
        max_running: int = 32,
    ):
        self.model_uri, self.served_name, self.cache_dir = model_uri, served_name, Path(cache_dir)
        self.max_queued, self.max_running = max_queued, max_running
        self.max_adapters, self.max_lora_rank = max_adapters, max_lora_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.staging_dir = self.cache_dir / "adapter-staging"
        self.device_name, self.dtype_name = device, dtype
        self.created = int(time.time())
        self.base = self.tokenizer = None
        self.max_model_len: int | None = None
        self._peft = None  # the PeftModel around `base` while at least one adapter is loaded
        self._adapters: dict[str, Adapter] = {}  # by public name: what requests may ask for
        self._attached: dict[str, Adapter] = {}  # by PEFT name: in the model (draining ones too)
        self._slots: dict[str, int] = {}  # PEFT name -> slot of the grouped path's stacks
        self._rows = Rows()
        self._batcher: Batcher | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the model: one step, or one attach/detach, at a time
        self._turn = threading.Condition()  # attach/detach go before the next step
        self._wanted = 0
        # For /health: when the work holding the lock last moved (a step, the start of an attach).
        self._progress_at: float | None = None
        self._attaching_since: float | None = None

    # --- loading ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.base is not None

    def load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = local_input(self.model_uri, self.cache_dir, "--model")
        self.device = torch.device(_pick_device(self.device_name))
        dtype = _pick_dtype(self.dtype_name, self.device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        eos = {tokenizer.eos_token_id}
        configured = model.generation_config.eos_token_id
        eos.update(configured if isinstance(configured, list) else [configured])
        self._eos_ids = sorted(i for i in eos if i is not None)
        self.max_model_len = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
        batcher = Batcher(
            self._forward,
            self._step,
            self._eos_ids,
            self.device,
            model.dtype,
            max_running=self.max_running,
            max_queued=self.max_queued,
        )
        with self._exclusive():
            self.tokenizer, self.base, self._batcher = tokenizer, model, batcher

    def load_adapter(self, name: str, uri: str, *, replace: bool = False) -> Adapter:
        """Load a trusted adapter (the command line, the adapters file) now: `prepare_adapter` with no
        allow-list, then `attach`. With `replace`, swap it for an adapter of that name already loaded."""
        prepared = self.prepare_adapter(name, uri, replace=replace)
        if isinstance(prepared, Adapter):
            return prepared
        return self.attach(prepared, replace=replace)

    def prepare_adapter(
        self,
        name: str,
        uri: str,
        *,
        replace: bool = False,
        allowed: tuple[str, ...] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Prepared | Adapter:
        """Everything slow of a load, without the lock: check the source (against `allowed`, the
        runtime allow-list, unless None), copy it into a staging folder, read and check its config
        and weights. Returns the loaded Adapter when `name` already serves `uri` (nothing to do)."""
        if not name or not uri:
            raise EngineError("Both 'lora_name' and 'lora_path' must be provided.", 400, "InvalidUserInput")
        self._require_loaded()
        same = self._check_room(name, uri, replace)  # fail fast, before any download (checked again in attach)
        if same is not None:
            return same
        if is_merge_path(uri):
            return self._prepare_merge(name, uri, allowed, cancelled)
        prefix = check_source(uri, allowed)
        path = fetch(uri, self.staging_dir, self.max_adapter_bytes, cancelled, within=prefix)
        try:
            config = read_adapter_config(path, uri, self.max_lora_rank)
            problems = weight_mismatches(self.base, path, uri)
            if problems:
                declared = str(config.get("base_model_name_or_path") or "another model")[:200]
                raise invalid_adapter(
                    f"adapter {name} does not fit base model {self.served_name} (it was trained on {declared}): "
                    + "; ".join(problems[:3])
                    + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
                )
            digest = weights_sha256(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        kind = str(config.get("peft_type", "LORA"))
        return Prepared(name, uri, path, adapter_rank(config) if kind == "LORA" else 0, digest, kind)

    def _prepare_merge(
        self, name: str, uri: str, allowed: tuple[str, ...] | None, cancelled: Callable[[], bool] | None
    ) -> Prepared:
        """`prepare_adapter` for a merge path: every source allowed, staged (one size cap for all) and
        checked as an adapter of its own, then the merge itself (`merge_problem`)."""
        try:
            plan = parse_merge_path(uri)
        except ValueError as error:
            raise EngineError(f"adapter {name}: {error}", 400, "InvalidUserInput") from None
        prefixes = [check_source(source, allowed) for source in plan.uris]  # all, before any download
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="merge-", dir=self.staging_dir))
        try:
            parts, configs, left = [], [], self.max_adapter_bytes
            for source, prefix in zip(plan.uris, prefixes, strict=True):
                part = fetch(source, folder, left, cancelled, within=prefix)
                left -= _size(part)
                configs.append(read_adapter_config(part, source, self.max_lora_rank))
                problems = weight_mismatches(self.base, part, source)
                if problems:
                    raise invalid_adapter(
                        f"adapter {name}: merge source {source} does not fit base model {self.served_name}: "
                        + "; ".join(problems[:3])
                    )
                parts.append(part)
            problem = merge_problem(configs, plan.weight_list, plan.method, plan.density, max_rank=self.max_lora_rank)
            if problem:
                raise invalid_adapter(f"adapter {name} cannot be merged ({plan.method}): {problem}")
            rank = merged_rank(configs, plan.method)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Prepared(name, uri, folder, rank, None, "LORA", merge=plan, parts=tuple(parts))

    def attach(self, prepared: Prepared, *, replace: bool = False) -> Adapter:
        """The only step of a load under the lock: PEFT reads the staged (local) files into the model.
        The staging folder is removed afterwards, loaded or not."""
        try:
            with self._exclusive():
                self._attaching_since = time.monotonic()
                try:
                    same = self._check_room(prepared.name, prepared.uri, replace)
                    if same is not None:
                        return same
                    self._check_type(prepared)
                    adapter = Adapter(
                        prepared.name,
                        prepared.uri,
                        prepared.path,
                        prepared.rank,
                        f"kubetune_adapter_{next(self._ids)}",
                        prepared.sha256,
                    )
                    if prepared.merge is not None:
                        self._attach_merged(adapter, prepared)
                    else:
                        self._attach(adapter)
                    old = self._adapters.pop(prepared.name, None)
                    self._adapters[prepared.name] = adapter
                finally:
                    self._attaching_since = None
        finally:
            self.discard(prepared)
        if old is not None:  # replaced: the requests already using the old one finish with it
            self._retire(old)
        return adapter

    @staticmethod
    def discard(prepared: Prepared) -> None:
        shutil.rmtree(prepared.path, ignore_errors=True)

    def unload_adapter(self, name: str | None) -> None:
        if not name:
            raise EngineError("'lora_name' must be provided.", 400, "InvalidUserInput")
        with self._exclusive():
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise not_found(f"The lora adapter '{name}' cannot be found.")
        self._retire(adapter)

    def _retire(self, adapter: Adapter) -> None:
        """Detach an adapter no request may ask for any more, once the requests using it are done."""
        if self._batcher is not None:
            self._batcher.wait_unused(adapter, DRAIN_SECONDS)
        with self._exclusive():
            self._detach(adapter)

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise EngineError(
                "the base model is still loading; retry when /ready answers 200", 503, "ServiceUnavailableError"
            )

    def _check_room(self, name: str, uri: str, replace: bool) -> Adapter | None:
        """Whether `name` may be loaded from `uri` now (decided under the lock in `attach`; `prepare_adapter`
        looks first without it, so a load that cannot fit fails before any download); the adapter itself
        when it is already loaded from that very URI and not to be replaced: loading it again changes nothing."""
        if name == self.served_name:
            raise EngineError(
                f"'{name}' is the base model's name; give the adapter another lora_name", 400, "InvalidUserInput"
            )
        if name in self._adapters:
            if replace:
                return None
            if self._adapters[name].uri == uri:
                return self._adapters[name]
            raise EngineError(f"The lora adapter '{name}' has already been loaded.", 400, "InvalidUserInput")
        if len(self._adapters) >= self.max_adapters:
            raise EngineError(
                f"cannot load adapter '{name}': {len(self._adapters)} adapters are loaded, "
                f"the most this server keeps (maxAdapters {self.max_adapters}); unload one first",
                reason="full",
            )
        return None

    def _check_type(self, prepared: Prepared) -> None:
        """PEFT keeps adapters of one type in a model: an adapter of another type than the ones
        loaded is refused (400: the operator marks it Failed with these words; the deployment mixes
        types, which asking again cannot fix) until they are unloaded."""
        if self._peft is None:
            return
        loaded = _peft_type(self._peft)
        if prepared.peft_type != loaded:
            raise EngineError(
                f"cannot load adapter '{prepared.name}': it is a {prepared.peft_type} adapter and this server "
                f"holds {loaded} adapters; a model serves one adapter type at a time: unload those, or serve "
                "it from another deployment",
                reason="conflict",
            )

    def _attach(self, adapter: Adapter) -> None:
        try:
            self._peft_load(adapter.path, adapter.internal)
        except Exception as error:
            self._undo_attach(adapter)
            detail = one_line(f"{type(error).__name__}: {error}", adapter.path, adapter.uri, 200)
            raise invalid_adapter(f"adapter {adapter.name} could not be loaded from {adapter.uri}: {detail}") from None
        self._register(adapter)

    def _peft_load(self, path: Path, internal: str) -> None:
        """PEFT reads the adapter in `path` into the model as `internal` (the first one wraps the base)."""
        from peft import PeftModel

        if self._peft is None:
            model = PeftModel.from_pretrained(self.base, str(path), adapter_name=internal, is_trainable=False)
            self._peft = model.eval()
        else:
            self._peft.load_adapter(str(path), adapter_name=internal, is_trainable=False)

    def _register(self, adapter: Adapter) -> None:
        """An attached adapter joins the grouped path, or gets a lane of its own when it cannot."""
        problem = _not_lora(self._peft, adapter.internal) or groupable_problem(self._peft, adapter.internal)
        if problem:
            adapter.lane, adapter.grouping = adapter.internal, f"by adapter ({problem})"
        self._attached[adapter.internal] = adapter
        self._regroup()

    def _attach_merged(self, adapter: Adapter, prepared: Prepared) -> None:
        """Load the staged sources under temporary names, add the merge as `adapter.internal`, delete
        the sources (whatever happened): the model ends with the merged adapter or as it was."""
        plan = prepared.merge
        assert plan is not None
        temporary = [f"{adapter.internal}_source_{i}" for i in range(len(prepared.parts))]
        loaded: list[str] = []
        try:
            for part, internal in zip(prepared.parts, temporary, strict=True):
                self._peft_load(part, internal)
                loaded.append(internal)
            add_merged_adapter(self._peft, adapter.internal, temporary, plan.weight_list, plan.method, plan.density)
        except Exception as error:
            self._drop_internal([*temporary, adapter.internal], first_failed=not loaded)
            self._regroup()
            detail = one_line(f"{type(error).__name__}: {error}", prepared.path, "the merge", 200)
            raise invalid_adapter(f"adapter {adapter.name} could not be merged ({plan.method}): {detail}") from None
        self._drop_internal(temporary)
        self._register(adapter)

    def _drop_internal(self, internals: list[str], first_failed: bool = False) -> None:
        """Delete these PEFT adapters where they are in the model; back to the plain model when none
        is left (or, `first_failed`, when the very first load failed halfway into the base)."""
        if self._peft is None:
            if first_failed:
                _strip_adapter_layers(self.base)
            return
        for internal in internals:
            if internal in self._peft.peft_config:
                self._peft.delete_adapter(internal)
        if not self._peft.peft_config:
            self.base = self._peft.unload()
            self._peft = None

    def _regroup(self) -> None:
        """Slots for the attached plain-LoRA adapters, and every LoRA layer's stack of them."""
        grouped = [internal for internal, adapter in self._attached.items() if adapter.lane is None]
        self._slots = {internal: slot for slot, internal in enumerate(grouped)}
        if self._peft is not None:
            rebuild(self.base, self._rows, self._slots)

    def _undo_attach(self, adapter: Adapter) -> None:
        if self._peft is not None:
            if adapter.internal in self._peft.peft_config:
                self._detach(adapter)
            return
        _strip_adapter_layers(self.base)  # PeftModel.from_pretrained failed after injecting layers

    def _detach(self, adapter: Adapter) -> None:
        adapter.detached = True
        self._attached.pop(adapter.internal, None)
        self._peft.delete_adapter(adapter.internal)
        if not self._peft.peft_config:  # PEFT cannot run with no adapter at all: back to the plain model
            self.base = self._peft.unload()
            self._peft = None
        self._regroup()

    # --- what is served --------------------------------------------------------------------------

    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def has_model(self, name: str) -> bool:
        return name == self.served_name or name in self._adapters

    def check_model(self, name: str) -> None:
        self._require_loaded()
        if not self.has_model(name):
            raise model_not_found(name)

    # --- generation ------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        self._require_loaded()
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        self._require_loaded()
        if not self.tokenizer.chat_template:
            raise EngineError(f"the model {self.served_name} has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as error:  # the template's own checks (roles, alternation)
            raise EngineError(f"the chat template refused the messages: {error}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def in_flight(self) -> int:
        """Generation requests waiting or running now."""
        return self._batcher.in_flight if self._batcher is not None else 0

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if self.max_model_len and prompt_tokens + max_tokens > self.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )

    def start(
        self,
        model: str,
        prompt_ids: list[int],
        sampling: Sampling,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Pending:
        """Queue a generation with the base (`model` = the served name) or an adapter; `on_text` gets
        its text piece by piece, from the batcher's thread. 429 when the queue is full."""
        self._require_loaded()
        if not prompt_ids:
            raise EngineError("the prompt is empty: give at least one token")
        if sampling.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1")
        self.check_length(len(prompt_ids), sampling.max_tokens)
        adapter = None
        if model != self.served_name:
            adapter = self._adapters.get(model)
            if adapter is None:
                raise model_not_found(model)
        eos_ids = [] if sampling.ignore_eos else self._eos_ids
        tracker = TextTracker(self.tokenizer, sampling.stop, eos_ids, on_text)
        row = Row(list(prompt_ids), sampling, adapter, tracker, cancelled)
        self._batcher.submit(row)
        return Pending(row, self._batcher)

    def generate(self, model: str, prompt_ids: list[int], sampling: Sampling, **options) -> Generation:
        """`start` and wait for the result."""
        return self.start(model, prompt_ids, sampling, **options).result()

    # --- the batcher's side: one step at a time, under the model lock ------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The model to ourselves between two steps (attach, detach): the stepper waits while we ask."""
        with self._turn:
            self._wanted += 1
        try:
            self._lock.acquire()
        finally:
            with self._turn:
                self._wanted -= 1
                self._turn.notify_all()
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _step(self) -> Iterator[None]:
        import torch

        with self._turn:
            self._turn.wait_for(lambda: self._wanted == 0)
        with self._lock, self._in_progress(), torch.inference_mode():
            yield

    def _forward(self, lane: str | None, rows: list[Row], cache, ids, positions, mask):
        """One pass over a lane's rows (batching.Batcher calls it under `_step`): the last position's logits."""
        import torch

        if lane is not None:
            self._peft.set_adapter(lane)
        elif self._peft is not None:
            slots = [self._slots.get(row.adapter.internal, -1) if row.adapter else -1 for row in rows]
            if any(slot >= 0 for slot in slots):
                self._rows.set(True, torch.tensor(slots, dtype=torch.long, device=self.device))
            else:
                self._rows.set(True)  # the base model's rows only: no delta to add
        try:
            with self._adapters_off(lane):
                output = self.base(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        finally:
            self._rows.set(False)
        return output.logits[:, -1]

    @contextmanager
    def _adapters_off(self, lane: str | None) -> Iterator[None]:
        """The base model's rows (lane None) with non-LoRA adapters loaded: their layers apply PEFT's
        active adapter to every row, so they are switched off (LoRA layers take the grouped path, which
        adds only the rows' own deltas)."""
        if lane is not None or self._peft is None or _peft_type(self._peft) == "LORA":
            yield
            return
        with self._peft.disable_adapter():
            yield

    @contextmanager
    def _in_progress(self) -> Iterator[None]:
        self._progress_at = time.monotonic()
        try:
            yield
        finally:
            self._progress_at = None

    def stalled_for(self) -> float:
        """Seconds the work holding the lock (a step, an attach) has made no progress; 0 when idle.
        /health turns 503 when this grows past its bound: the replica is wedged, not busy."""
        now = time.monotonic()
        marks = [t for t in (self._progress_at, self._attaching_since) if t is not None]
        return max((now - t for t in marks), default=0.0)


def _size(folder: Path) -> int:
    """Bytes of the regular files under a staged folder (what `fetch` took of the size cap)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _type_name(kind) -> str:
    """PEFT's PeftType (a str enum) as its name: LORA, LOHA, ..."""
    return str(getattr(kind, "value", kind))


def _peft_type(peft_model) -> str:
    return _type_name(peft_model.peft_type)


def _not_lora(peft_model, internal: str) -> str:
    """Why the adapter `internal` is not for the grouped path because it is no LoRA adapter ("" if it is)."""
    name = _type_name(peft_model.peft_config[internal].peft_type)
    return "" if name == "LORA" else f"a {name} adapter: only LoRA adapters are grouped"


def _pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pick_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _strip_adapter_layers(model) -> None:
    """Put back the original layers where PEFT injected adapter layers (after a failed first load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in model.__dict__:
            delattr(model, attribute)
