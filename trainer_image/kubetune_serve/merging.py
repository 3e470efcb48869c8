"""Adapter merging: several LoRA adapters of one base model combined into one, with PEFT's
`add_weighted_adapter`. `kubetune merge` writes the result as an ordinary adapter folder
(`merge_to_folder`); the serving runtime builds it in memory when a replica loads a merged adapter
(`add_merged_adapter`). Both refuse, in one line and before anything is loaded, sources that cannot
be merged that way (`merge_problem`).

What each method computes (PEFT 0.21, per adapted module; s_i is source i's scaling alpha/r):

* `cat`: the sources' factors side by side, A = [w_1 s_1 A_1; ...], B = [B_1 ... B_n], so the update
  BA is exactly sum_i w_i s_i B_i A_i. Ranks may differ; the merged rank is their sum.
* `linear`: A and B are each a weighted sum, A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i.
  The product holds cross terms B_i A_j, so this is exact only when the sources share their A
  factors, which is nearly so for adapters trained from the same initialisation (kubetune seeds it
  with `hyperparameters.seed`, the same for every job by default). Equal ranks.
* `ties`: on A and B separately, each source keeps its `density` share of largest-magnitude entries,
  each entry takes the sign with the larger total, and the entries that agree with it are averaged
  (TIES-merging, Yadav et al. 2023). Equal ranks.
* `dare_linear` / `dare_ties`: each source keeps a random `density` share of its entries, rescaled by
  1/density (DARE, Yu et al. 2023), then summed as `linear` or sign-elected as `ties`. The draw is
  seeded (`DARE_SEED`), so every replica that merges the same sources builds the same adapter.

Only LoRA merges: PEFT combines LoRA factors, and has no such operation for the other adapter types.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api.merging import DENSITY_METHODS, METHODS, MergeMethod
from kubetune.logs import first_line

EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")  # all but `cat`
MAX_SOURCES = 16
MAX_WEIGHT = 100.0  # |weight|: far beyond any useful merge, small enough that nothing overflows
MAX_CONFIG_BYTES = 1024 * 1024  # an adapter_config.json is a few kilobytes
DARE_SEED = 0
# LoRA initialisations that change the base model's weights when an adapter with that config is injected
# (PiSSA, CorDA, OLoRA) or expect other base weights (LoftQ): the merged adapter would be built on, or
# for, a base that is not the one loaded.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")


def default_weights(method: str, count: int) -> list[float]:
    """The weights when none are given: every source at the strength it was trained at.

    `cat`, `ties` and `dare_ties` apply each weight once to its source's update (ties averages where
    sources agree instead of adding), so 1.0 each keeps every source's update whole. `linear` and
    `dare_linear` sum the A factors too: for sources trained from the same initialisation, sum_j A_j is
    about n times one A, so 1/n each gives sum_i B_i A_i, the sum of the sources' updates, as `cat` does.
    """
    if method in ("linear", "dare_linear"):
        return [1.0 / count] * count
    return [1.0] * count


def adapter_rank(config: dict[str, Any]) -> int:
    """The rank PEFT allocates for an adapter: `r`, or the largest of its rank_pattern."""
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def merged_rank(configs: Sequence[dict[str, Any]], method: str) -> int:
    ranks = [adapter_rank(config) for config in configs]
    return sum(ranks) if method == "cat" else max(ranks)


def merge_problem(
    configs: Sequence[Any],
    weights: Sequence[Any] | None,
    method: str,
    density: float | None,
    *,
    max_rank: int | None = None,
) -> str | None:
    """Why adapters with these adapter_config.json dicts cannot be merged with `method`, in one line
    (sources are numbered from 1, in the order given), or None when they can. `weights` None means
    `default_weights`; `max_rank` (a server's maxLoraRank) bounds the merged adapter's rank."""
    if method not in METHODS:
        return f"unknown merge method {str(method)[:40]!r}; use one of {', '.join(METHODS)}"
    if len(configs) < 2:
        return f"a merge needs at least 2 source adapters, got {len(configs)}"
    if len(configs) > MAX_SOURCES:
        return f"a merge takes at most {MAX_SOURCES} source adapters, got {len(configs)}"
    problem = _weights_problem(weights, len(configs)) or _density_problem(method, density)
    if problem:
        return problem
    for number, config in enumerate(configs, 1):
        problem = _source_problem(config)
        if problem:
            return f"source {number}: {problem}"
    first = _targets(configs[0])
    for number, config in enumerate(configs[1:], 2):
        if _targets(config) != first:
            return (
                f"source {number} adapts other modules than source 1 ({_shown(config.get('target_modules'))} "
                f"vs {_shown(configs[0].get('target_modules'))}); merge adapters trained with the same targetModules"
            )
    ranks = [adapter_rank(config) for config in configs]
    if method in EQUAL_RANK_METHODS and len(set(ranks)) > 1:
        return f"{method} needs sources of one rank, these have ranks {ranks}; use cat, which takes any ranks"
    rank = merged_rank(configs, method)
    if max_rank is not None and rank > max_rank:
        return f"the merged adapter's rank {rank} ({method} of ranks {ranks}) exceeds maxLoraRank {max_rank}"
    return None


def _weights_problem(weights: Sequence[Any] | None, count: int) -> str | None:
    if weights is None:
        return None
    if len(weights) != count:
        return f"{len(weights)} weights for {count} sources; give one weight per source, in the same order, or none"
    for number, weight in enumerate(weights, 1):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            return f"weight {number} is {str(weight)[:40]!r}, not a finite number"
        if abs(weight) > MAX_WEIGHT:
            return f"weight {number} is {weight}; weights lie between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}"
    if not any(weights):
        return "every weight is 0: the merged adapter would do nothing"
    return None


def _density_problem(method: str, density: float | None) -> str | None:
    if method not in DENSITY_METHODS:
        if density is not None:
            return f"density applies to {', '.join(DENSITY_METHODS)} only, not to {method}; leave it out"
        return None
    if density is None:
        return f"{method} needs a density, the share of each source's entries kept, in (0, 1] (0.5 is common)"
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        return f"density {str(density)[:40]} is not in (0, 1]; it is the share of each source's entries kept"
    return None


def _source_problem(config: Any) -> str | None:
    """What in one adapter's config rules it out of any merge."""
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        return f"a {str(kind)[:40]} adapter; only LoRA adapters can be merged (PEFT merges LoRA factors)"
    try:
        rank = adapter_rank(config)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return "adapter_config.json has no valid rank (r, rank_pattern)"
    if rank < 1:
        return "adapter_config.json has no valid rank (r, rank_pattern)"
    if config.get("use_dora"):
        return "a DoRA adapter; its magnitude vectors cannot be merged, only plain LoRA factors"
    if config.get("lora_bias"):
        return "trains LoRA biases (lora_bias), which PEFT does not merge"
    if config.get("target_parameters"):
        return "adapts parameters (target_parameters), which PEFT does not merge"
    if config.get("modules_to_save"):
        return f"trains whole modules ({_shown(config['modules_to_save'])}), which cannot be merged"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        return f"saved with init_lora_weights={init[:40]!r}, which changes the base weights; save it converted to LoRA"
    targets = config.get("target_modules")
    if not isinstance(targets, str | list) or not targets:
        return "adapter_config.json names no target_modules"
    return None


def _targets(config: dict[str, Any]) -> str | frozenset[str]:
    targets = config.get("target_modules")
    return targets if isinstance(targets, str) else frozenset(str(t) for t in targets or ())


def _shown(value: Any) -> str:
    text = json.dumps(sorted(value) if isinstance(value, list | set) else value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --- in memory: the serving runtime's path ----------------------------------------------------


def add_merged_adapter(
    peft_model: Any,
    name: str,
    sources: list[str],
    weights: list[float] | None,
    method: MergeMethod,
    density: float | None,
) -> None:
    """Add adapter `name` to `peft_model`, merged from its loaded adapters `sources` (the sources stay;
    delete them when no longer needed). Raises ValueError with `merge_problem`'s line when they cannot
    be merged, and when `name` is taken. Not thread-safe: the caller holds the model's lock."""
    import torch
    from peft.tuners.lora import LoraLayer

    if name in peft_model.peft_config:
        raise ValueError(f"an adapter named {name!r} is already loaded")
    missing = [source for source in sources if source not in peft_model.peft_config]
    if missing:
        raise ValueError(f"source adapters not loaded: {', '.join(missing)}")
    configs = [_config_dict(peft_model.peft_config[source]) for source in sources]
    problem = merge_problem(configs, weights, method, density)
    if problem:
        raise ValueError(problem)
    chosen = list(weights) if weights is not None else default_weights(method, len(sources))
    devices = sorted({p.device.index or 0 for p in peft_model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # DARE's draw, seeded without disturbing anyone's RNG
        torch.manual_seed(DARE_SEED)
        peft_model.add_weighted_adapter(
            adapters=list(sources), weights=chosen, adapter_name=name, combination_type=method, density=density
        )
    # PEFT gives the merged adapter lora_alpha = r because the sources' scalings are already in its
    # factors: its own scaling must be 1. The rest of the config is source 1's, so an rsLoRA source
    # would make it alpha/sqrt(r) = sqrt(r); undo that, in the layers and in the config saved.
    config = peft_model.peft_config[name]
    if getattr(config, "use_rslora", False):
        config.use_rslora = False
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and name in module.scaling:
                module.scaling[name] = 1.0


def _config_dict(config: Any) -> dict[str, Any]:
    """A loaded PeftConfig as adapter_config.json holds it (enums as their values, sets as lists)."""
    raw = config.to_dict()
    raw["peft_type"] = getattr(raw.get("peft_type"), "value", raw.get("peft_type"))
    if isinstance(raw.get("target_modules"), set):
        raw["target_modules"] = sorted(raw["target_modules"])
    return dict(raw)


# --- to a folder: `kubetune merge` ------------------------------------------------------------


def read_adapter_config(folder: Path, what: str) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, or a ValueError naming `what` (the option as written)."""
    file = Path(folder) / "adapter_config.json"
    if not file.is_file():
        raise ValueError(f"{what}: not an adapter folder (no adapter_config.json)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{what}: adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{what}: unreadable adapter_config.json ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what}: adapter_config.json is not a JSON object")
    return config


def merge_to_folder(
    base_model: str | Path,
    sources: Sequence[Path],
    weights: Sequence[float] | None,
    method: MergeMethod,
    density: float | None,
    out: Path,
    *,
    labels: Sequence[str] | None = None,
) -> Path:
    """Merge the adapter folders `sources` (adapters of `base_model`, a model folder) and write only the
    merged adapter, with the first source's tokenizer (the base's when it has none), to `out`: an
    ordinary PEFT adapter folder, published whole or not at all. `labels` name the sources in errors
    (the URIs as the user wrote them). Raises ValueError (or StorageError) with one line on bad input,
    before anything is loaded when the configs alone show it."""
    base_dir = Path(base_model)
    names = list(labels) if labels is not None else [str(source) for source in sources]
    configs = [read_adapter_config(Path(source), name) for source, name in zip(sources, names, strict=True)]
    problem = merge_problem(configs, None if weights is None else list(weights), method, density)
    if problem:
        raise ValueError(problem)
    out = Path(out).absolute()
    _check_out(out)
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"{base_model}: not a model folder (no config.json)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune import storage

    base = _loaded(str(base_model), lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval())
    model = _with_sources(base, sources, names)
    # The merged adapter is "default", which PEFT saves at the folder's root (others go in a subfolder).
    add_merged_adapter(
        model, "default", _source_names(len(sources)), None if weights is None else list(weights), method, density
    )
    tokenizer_dir = next((Path(s) for s in sources if (Path(s) / "tokenizer_config.json").is_file()), base_dir)
    tokenizer = _loaded(str(tokenizer_dir), lambda: AutoTokenizer.from_pretrained(tokenizer_dir))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.staging-", dir=out.parent) as staging:
        model.save_pretrained(staging, selected_adapters=["default"], safe_serialization=True)
        tokenizer.save_pretrained(staging)
        location = storage.open_output(out.parent.as_uri(), cache_dir=Path(staging), local=True)
        location.publish_dir(Path(staging), out.name)
    return out


def _source_names(count: int) -> list[str]:
    return [f"source-{number}" for number in range(1, count + 1)]


def _with_sources(base: Any, sources: Sequence[Path], labels: Sequence[str]) -> Any:
    """The base with every source loaded as adapter source-N."""
    from peft import PeftModel

    names = _source_names(len(sources))
    model = _loaded(
        labels[0], lambda: PeftModel.from_pretrained(base, sources[0], adapter_name=names[0], is_trainable=False)
    )
    for source, name, label in zip(sources[1:], names[1:], labels[1:], strict=True):
        _loaded(label, lambda s=source, n=name: model.load_adapter(s, adapter_name=n, is_trainable=False))
    return model


def _check_out(out: Path) -> None:
    """`out` is replaced whole: refuse a file, or a folder that holds something other than an adapter."""
    if out.is_file():
        raise ValueError(f"-o {out}: is a file; name a folder for the merged adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").is_file():
        raise ValueError(f"-o {out}: exists and is not an adapter folder; name a new folder (it is replaced whole)")


_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, EOFError, RuntimeError)


def _loaded(what: str, load: Any) -> Any:
    """`load()`, with a folder transformers or PEFT cannot read (or an adapter of another base: a
    RuntimeError on shapes) turned into one line naming it."""
    try:
        return load()
    except Exception as error:
        if not isinstance(error, _LOAD_ERRORS) and type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{what}: cannot be loaded ({first_line(error)})") from None
