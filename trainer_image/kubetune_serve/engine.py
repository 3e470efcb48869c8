"""The model behind `kubetune serve`: one base model, LoRA adapters added and removed at runtime,
and generation one request at a time. No HTTP here: errors are `EngineError`s that carry the
status and the OpenAI error type the API answers with.

Adapters live in one PEFT model wrapped around the base (`load_adapter`, `delete_adapter`,
`set_adapter`); a request for the base runs with the adapters disabled. Generation on one model is
not thread-safe and switching adapters changes the model, so both happen under one lock. Public
adapter names (anything a client may put in `model`) map to internal PEFT names, which must be
valid module names and must not collide with PEFT's own prefixes.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.storage import StorageError, resolve_input, sha256_of

from .text import TextTracker


class EngineError(Exception):
    """A request the engine refuses: `status` and `type` are what the API answers with."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.status, self.type = message, status, type


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
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def resolve(uri: str, cache_dir: Path) -> Path:
    """A local folder for a model or adapter given as a URI (hf://, pvc://, s3://, file://) or a plain path."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"{uri}: does not exist on this machine")
        return path
    return resolve_input(uri, cache_dir=cache_dir, local=True)


def adapter_rank(config: dict) -> int:
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def read_adapter_config(path: Path, uri: str, max_lora_rank: int) -> dict:
    """adapter_config.json of a LoRA adapter whose rank fits `max_lora_rank`, or an EngineError."""
    file = path / "adapter_config.json"
    if not file.is_file():
        raise not_found(f"No adapter found for {uri}: {file} does not exist")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise EngineError(f"{uri}: unreadable adapter_config.json ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise EngineError(f"{uri}: only LoRA adapters can be served, this is a {kind} adapter")
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        raise EngineError(f"adapter rank {rank} exceeds maxLoraRank {max_lora_rank}")
    return config


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def weights_sha256(path: Path) -> str | None:
    """SHA-256 of the adapter's weights file: the digest a FineTuneJob reports in status.adapter."""
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    return sha256_of(file) if file else None


def weight_mismatches(model, path: Path) -> list[str]:
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
        raise EngineError(f"unreadable adapter weights {file}: {error}") from None


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
    ):
        self.model_uri, self.served_name, self.cache_dir = model_uri, served_name, Path(cache_dir)
        self.max_adapters, self.max_lora_rank = max_adapters, max_lora_rank
        self.device_name, self.dtype_name = device, dtype
        self.created = int(time.time())
        self.base = self.tokenizer = None
        self.max_model_len: int | None = None
        self._peft = None  # the PeftModel around `base` while at least one adapter is loaded
        self._adapters: dict[str, Adapter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

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
        """Load `uri` as adapter `name`; with `replace`, swap it for an adapter of that name already loaded."""
        if not name or not uri:
            raise EngineError("Both 'lora_name' and 'lora_path' must be provided.", 400, "InvalidUserInput")
        self._require_loaded()
        self._check_room(name, replace)  # fail fast, before any download
        try:
            path = resolve(uri, self.cache_dir)
        except StorageError as error:
            status = 404 if "does not exist" in str(error) else 400
            raise EngineError(
                f"No adapter found for {uri}: {error}" if status == 404 else str(error),
                status,
                "NotFoundError" if status == 404 else "BadRequestError",
            ) from None
        config = read_adapter_config(path, uri, self.max_lora_rank)
        digest = weights_sha256(path)
        with self._lock:
            self._check_room(name, replace)
            problems = weight_mismatches(self.base, path)
            if problems:
                declared = config.get("base_model_name_or_path") or "another model"
                raise EngineError(
                    f"adapter {name} does not fit base model {self.served_name} (it was trained on {declared}): "
                    + "; ".join(problems[:3])
                    + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
                )
            adapter = Adapter(name, uri, path, adapter_rank(config), f"kubetune_adapter_{next(self._ids)}", digest)
            self._attach(adapter)
            old = self._adapters.pop(name, None)
            if old is not None:
                self._detach(old)
            self._adapters[name] = adapter
        return adapter

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

    def _check_room(self, name: str, replace: bool) -> None:
        if name == self.served_name:
            raise EngineError(
                f"'{name}' is the base model's name; give the adapter another lora_name", 400, "InvalidUserInput"
            )
        if name in self._adapters:
            if replace:
                return
            raise EngineError(f"The lora adapter '{name}' has already been loaded.", 400, "InvalidUserInput")
        if len(self._adapters) >= self.max_adapters:
            raise EngineError(
                f"cannot load adapter '{name}': {len(self._adapters)} adapters are loaded, "
                f"the most this server keeps (maxAdapters {self.max_adapters}); unload one first"
            )

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
            raise EngineError(f"adapter {adapter.name} could not be loaded from {adapter.uri}: {error}") from None

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

        class _Until(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = tracker.done or (cancelled is not None and cancelled())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        with self._lock:
            if model != self.served_name and model not in self._adapters:
                raise model_not_found(model)
            tracker = TextTracker(self.tokenizer, sampling.stop, self._eos_ids, on_text)
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
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.no_grad(), self._using(self._adapters.get(model)) as network:
                network.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
        return Generation(tracker.text, tracker.finish_reason or "length", len(prompt_ids), len(tracker.token_ids))

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
