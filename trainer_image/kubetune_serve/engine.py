"""The model behind `kubetune serve`: one base model, LoRA adapters added and removed at runtime,
and generation one request at a time (at most `max_queued` more waiting: 429 past that). No HTTP
here: errors are `EngineError`s that carry the status and the OpenAI error type the API answers with.

Adapters live in one PEFT model wrapped around the base (`load_adapter`, `delete_adapter`,
`set_adapter`); a request for the base runs with the adapters disabled. Generation on one model is
not thread-safe and switching adapters changes the model, so both happen under one lock. Public
adapter names (anything a client may put in `model`) map to internal PEFT names, which must be
valid module names and must not collide with PEFT's own prefixes.

A load is two steps: `prepare_adapter` (no lock: check the source, copy it into a private staging
folder within the size cap, check config and weights) and `attach` (under the lock: PEFT reads the
staged, local files). So a slow or hostile source never holds up generation, and the weights hashed
are the weights served. Content that can never load (not LoRA, too wide, another base, unreadable
weights) is a 422. `stalled_for` tells /health whether the work holding the lock still moves.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.storage import StorageError, resolve_input, sha256_of

from .errors import EngineError
from .sources import check_source, fetch
from .text import TextTracker

__all__ = ["Adapter", "Engine", "EngineError", "Generation", "Prepared", "Sampling"]


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


@dataclass
class Prepared:
    """An adapter fetched into a private staging folder and checked, waiting for `Engine.attach`."""

    name: str
    uri: str
    path: Path
    rank: int
    sha256: str | None


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


def too_many_waiting(most: int) -> EngineError:
    """The request queue is full: 429 with Retry-After, so that clients (and load balancers) back off
    instead of piling up requests that would time out in the queue anyway."""
    return EngineError(
        f"too many requests waiting for the model (at most {most} queue); retry later", 429, "RateLimitError"
    )


def resolve(uri: str, cache_dir: Path) -> Path:
    """A local folder for the base model given as a URI (hf://, pvc://, s3://, file://) or a plain path."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"{uri}: does not exist on this machine")
        return path
    return resolve_input(uri, cache_dir=cache_dir, local=True)


def invalid_adapter(message: str) -> EngineError:
    """Adapter content that can never load here (not LoRA, too wide, another base, bad weights): 422,
    so the operator marks the adapter Failed instead of retrying."""
    return EngineError(message, 422, "UnprocessableEntityError")


def one_line(text: str, path: Path, uri: str, limit: int = 300) -> str:
    """An error from a library as one line for a client: the staging folder shown as the URI it came from."""
    flat = " ".join(str(text).replace(str(path), uri).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def adapter_rank(config: dict) -> int:
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def read_adapter_config(path: Path, uri: str, max_lora_rank: int) -> dict:
    """adapter_config.json of a LoRA adapter whose rank fits `max_lora_rank`, or an EngineError."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise invalid_adapter(f"{uri}: not a LoRA adapter (no adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise invalid_adapter(f"{uri}: unreadable adapter_config.json ({one_line(error, path, uri, 120)})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise invalid_adapter(f"{uri}: only LoRA adapters can be served, this is a {str(kind)[:40]} adapter")
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
    ):
        self.model_uri, self.served_name, self.cache_dir = model_uri, served_name, Path(cache_dir)
        self.max_queued = max_queued
        self.max_adapters, self.max_lora_rank = max_adapters, max_lora_rank
        self.max_adapter_bytes = max_adapter_bytes
        self.staging_dir = self.cache_dir / "adapter-staging"
        self.device_name, self.dtype_name = device, dtype
        self.created = int(time.time())
        self.base = self.tokenizer = None
        self.max_model_len: int | None = None
        self._peft = None  # the PeftModel around `base` while at least one adapter is loaded
        self._adapters: dict[str, Adapter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        # Generation requests waiting for the lock and running under it: the in-flight gauge an
        # autoscaler reads, and the bound on the queue.
        self._counts = threading.Lock()
        self._waiting = self._running = 0
        # For /health: when the work holding the lock last moved (a token, the start of an attach).
        self._progress_at: float | None = None
        self._attaching_since: float | None = None

    # --- loading ---------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.base is not None

    def load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(self.model_uri, self.cache_dir)
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
        with self._lock:
            self.tokenizer, self.base = tokenizer, model

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
        return Prepared(name, uri, path, adapter_rank(config), digest)

    def attach(self, prepared: Prepared, *, replace: bool = False) -> Adapter:
        """The only step of a load under the lock: PEFT reads the staged (local) files into the model.
        The staging folder is removed afterwards, loaded or not."""
        try:
            with self._lock:
                self._attaching_since = time.monotonic()
                try:
                    same = self._check_room(prepared.name, prepared.uri, replace)
                    if same is not None:
                        return same
                    adapter = Adapter(
                        prepared.name,
                        prepared.uri,
                        prepared.path,
                        prepared.rank,
                        f"kubetune_adapter_{next(self._ids)}",
                        prepared.sha256,
                    )
                    self._attach(adapter)
                    old = self._adapters.pop(prepared.name, None)
                    if old is not None:
                        self._detach(old)
                    self._adapters[prepared.name] = adapter
                    return adapter
                finally:
                    self._attaching_since = None
        finally:
            self.discard(prepared)

    @staticmethod
    def discard(prepared: Prepared) -> None:
        shutil.rmtree(prepared.path, ignore_errors=True)

    def unload_adapter(self, name: str | None) -> None:
        if not name:
            raise EngineError("'lora_name' must be provided.", 400, "InvalidUserInput")
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise not_found(f"The lora adapter '{name}' cannot be found.")
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

    def _attach(self, adapter: Adapter) -> None:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.base, str(adapter.path), adapter_name=adapter.internal, is_trainable=False
                ).eval()
            else:
                self._peft.load_adapter(str(adapter.path), adapter_name=adapter.internal, is_trainable=False)
        except Exception as error:
            self._undo_attach(adapter)
            detail = one_line(f"{type(error).__name__}: {error}", adapter.path, adapter.uri, 200)
            raise invalid_adapter(f"adapter {adapter.name} could not be loaded from {adapter.uri}: {detail}") from None

    def _undo_attach(self, adapter: Adapter) -> None:
        if self._peft is not None:
            if adapter.internal in self._peft.peft_config:
                self._detach(adapter)
            return
        _strip_adapter_layers(self.base)  # PeftModel.from_pretrained failed after injecting layers

    def _detach(self, adapter: Adapter) -> None:
        self._peft.delete_adapter(adapter.internal)
        if not self._peft.peft_config:  # PEFT cannot run with no adapter at all: back to the plain model
            self.base = self._peft.unload()
            self._peft = None

    # --- what is served --------------------------------------------------------------------------

    def adapters(self) -> list[Adapter]:
        with self._lock:
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
        return self._waiting + self._running

    @contextmanager
    def _queued(self) -> Iterator[None]:
        """Hold the model as one of at most `max_queued` waiting requests; 429 when the queue is full."""
        with self._counts:
            if self._waiting >= self.max_queued:
                raise too_many_waiting(self.max_queued)
            self._waiting += 1
        acquired = False
        try:
            acquired = self._lock.acquire()
        finally:
            with self._counts:
                self._waiting -= 1
                self._running += 1 if acquired else 0
        try:
            yield
        finally:
            with self._counts:
                self._running -= 1
            self._lock.release()

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if self.max_model_len and prompt_tokens + max_tokens > self.max_model_len:
            raise EngineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion."
            )

    def generate(
        self,
        model: str,
        prompt_ids: list[int],
        sampling: Sampling,
        *,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """Generate with the base (`model` = the served name) or an adapter, one request at a time."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        self._require_loaded()
        self.check_length(len(prompt_ids), sampling.max_tokens)

        engine = self

        called = time.monotonic()
        first_token: list[float] = []

        class _Until(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                engine._progress_at = time.monotonic()
                if not first_token:
                    first_token.append(engine._progress_at - called)
                stop = tracker.done or (cancelled is not None and cancelled())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        with self._queued(), self._in_progress():
            queued = time.monotonic() - called
            if model != self.served_name and model not in self._adapters:
                raise model_not_found(model)
            if cancelled is not None and cancelled():  # the client left while waiting for the lock
                return Generation("", "abort", len(prompt_ids), 0, queued)
            eos_ids = [] if sampling.ignore_eos else self._eos_ids
            tracker = TextTracker(self.tokenizer, sampling.stop, eos_ids, on_text)
            input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            options = dict(
                max_new_tokens=sampling.max_tokens,
                eos_token_id=self._eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=tracker,
                stopping_criteria=StoppingCriteriaList([_Until()]),
            )
            if sampling.temperature > 0:
                options.update(
                    do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0
                )
            else:
                options.update(do_sample=False)
            if sampling.ignore_eos:
                options.update(min_new_tokens=sampling.max_tokens)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.no_grad(), self._using(self._adapters.get(model)) as network:
                network.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
        finish, first = tracker.finish_reason or "length", first_token[0] if first_token else None
        return Generation(tracker.text, finish, len(prompt_ids), len(tracker.token_ids), queued, first)

    @contextmanager
    def _in_progress(self) -> Iterator[None]:
        self._progress_at = time.monotonic()
        try:
            yield
        finally:
            self._progress_at = None

    def stalled_for(self) -> float:
        """Seconds the work holding the lock (a generation, an attach) has made no progress; 0 when idle.
        /health turns 503 when this grows past its bound: the replica is wedged, not busy."""
        now = time.monotonic()
        marks = [t for t in (self._progress_at, self._attaching_since) if t is not None]
        return max((now - t for t in marks), default=0.0)

    @contextmanager
    def _using(self, adapter: Adapter | None) -> Iterator[object]:
        if self._peft is None:
            yield self.base
        elif adapter is None:
            with self._peft.disable_adapter():
                yield self._peft
        else:
            self._peft.set_adapter(adapter.internal)
            yield self._peft


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
