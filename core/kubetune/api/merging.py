"""Adapter merging: the combinations PEFT's `add_weighted_adapter` builds, shared by the CLI and the API.

Declaratively, an AdapterDeployment adapter may be `merge: {method, sources, weights, density}`
instead of `fromJob` or `uri` (`AdapterMerge`). Each source is written like an adapter of its own
(`MergeSource`: `fromJob` or `uri`), and the merged adapter's `require` rules gate each fromJob
source, so a merge is gated, trusted and allow-listed exactly as the adapters it combines would be.
The replica builds the merged adapter when it loads it; only the builtin runtime can (vLLM has no
merging).

Once every source is resolved to a URI, the operator hands the merge to the replicas as one string,
its `merge:` path (`MergePlan.path`): canonical JSON of the method, the source URIs, the weights and
the density. It is what the adapters file's entry stands for, what the operator's load sends as
`lora_path`, and what the replica reports back as the adapter's `root` in /v1/models: so a merge
whose sources or weights change is a new path, and the adapter is replaced like one whose URI changed.
The path is read from the network (a load with the admin key), so `parse_merge_path` bounds it all.
"""

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeGuard, get_args

from pydantic import Field

from .common import MAX_NAME, ApiModel, Rule
from .uris import MAX_URI, uri_rules

# linear: a weighted sum of the low-rank products (same rank); cat: the LoRA factors side by side (rank = the
# sum); ties / dare_*: task-vector merges that trim or randomly drop small deltas first (`density` keeps that share).
MergeMethod = Literal["linear", "cat", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = get_args(MergeMethod)
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # the methods that trim deltas, and so need a density
MIN_SOURCES, MAX_SOURCES = 2, 8
MAX_WEIGHT = 10.0  # |weight|: a negative weight subtracts a task (task arithmetic); beyond ten is a typo
# A source's uri is shorter than an adapter's (MAX_URI): the URI rules' regular expressions run on up to
# 256 adapters x 8 sources, and the API server's cost estimate of each rule (and of the whole schema)
# must stay within its budget; 1024 was measured over it. Longer locations: serve the adapter by uri.
MAX_SOURCE_URI = 256
MERGE_PREFIX = "merge:"
MAX_MERGE_PATH = MAX_SOURCES * (MAX_URI + 64) + 256

Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]


class MergeSource(ApiModel):
    """One adapter a merge combines, named as an adapter is: a FineTuneJob in this namespace, or a URI."""

    from_job: str | None = Field(
        default=None,
        max_length=MAX_NAME,
        description="A FineTuneJob in this namespace; usable once it has Succeeded, from its status.adapter.uri.",
    )
    uri: str | None = Field(
        default=None, max_length=MAX_SOURCE_URI, description="pvc://CLAIM/PATH, s3://BUCKET/PATH or hf://ORG/NAME."
    )

    cel_rules: ClassVar = (
        Rule(
            cel="has(self.fromJob) != has(self.uri)",
            message="each merge source needs exactly one of fromJob or uri",
            check=lambda s: (s.from_job is None) != (s.uri is None),
        ),
        *uri_rules("uri", "uri", optional=True),
    )


class AdapterMerge(ApiModel):
    """An adapter built on the replica from others with PEFT's add_weighted_adapter (builtin runtime only)."""

    method: MergeMethod = Field(
        description=(
            "linear: a weighted sum (the sources must have one rank); cat: the LoRA factors side by side "
            "(rank = the sum of the sources' ranks, which maxLoraRank bounds); ties, dare_linear, dare_ties: "
            "task-vector merges that keep only a `density` share of each source's deltas before summing "
            "(TIES trims the smallest and resolves sign conflicts; DARE drops at random and rescales)."
        )
    )
    sources: list[MergeSource] = Field(
        min_length=MIN_SOURCES,
        max_length=MAX_SOURCES,
        description=f"The adapters combined ({MIN_SOURCES} to {MAX_SOURCES}), each a fromJob or a uri.",
    )
    weights: list[Weight] | None = Field(
        default=None,
        max_length=MAX_SOURCES,
        description=(
            "One weight per source, in order; a negative weight subtracts that source's task. Default: every "
            "source at the strength it was trained at (1/n each for linear and dare_linear, which also sum "
            "the A factors; 1.0 each for the others)."
        ),
    )
    density: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="The share of each source's deltas kept, in (0, 1]: required by ties and dare_*, only by them.",
    )

    cel_rules: ClassVar = (
        Rule(
            cel="!has(self.weights) || size(self.weights) == size(self.sources)",
            message="merge.weights needs one weight per source",
            check=lambda m: m.weights is None or len(m.weights) == len(m.sources),
            field_path=".weights",
        ),
        Rule(
            cel="!has(self.density) || self.method in ['ties', 'dare_linear', 'dare_ties']",
            message="merge.density applies to ties, dare_linear and dare_ties only",
            check=lambda m: m.density is None or m.method in DENSITY_METHODS,
            field_path=".density",
        ),
        Rule(
            cel="has(self.density) || !(self.method in ['ties', 'dare_linear', 'dare_ties'])",
            message="merge.density is required by ties, dare_linear and dare_ties: the share of deltas kept, in (0, 1]",
            check=lambda m: m.density is not None or m.method not in DENSITY_METHODS,
        ),
    )


# --- the resolved merge, as the replicas get it ----------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """A merge whose sources are URIs: what a replica builds (`path` is how it travels)."""

    method: str
    uris: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # None: the merge's default weights
    density: float | None = None

    def wire(self) -> dict[str, Any]:
        """The adapters file's `merge` block."""
        out: dict[str, Any] = {"method": self.method, "sources": list(self.uris)}
        if self.weights is not None:
            out["weights"] = list(self.weights)
        if self.density is not None:
            out["density"] = self.density
        return out

    @property
    def weight_list(self) -> list[float] | None:
        """The weights as the merge functions take them (None: their defaults)."""
        return None if self.weights is None else list(self.weights)

    @property
    def path(self) -> str:
        """The canonical `merge:` path: equal plans give equal strings, any change another one."""
        return MERGE_PREFIX + json.dumps(self.wire(), sort_keys=True, separators=(",", ":"))


def is_merge_path(text: str) -> bool:
    return text.startswith(MERGE_PREFIX)


def plan_problem(plan: MergePlan) -> str | None:
    """What is wrong with a merge plan as one line (the API's rules, for plans read from a file or the
    network), or None. The source URIs are checked by their readers (the URI rules, the allow-list)."""
    if plan.method not in METHODS:
        return f"merge method must be one of {', '.join(METHODS)}"
    if not MIN_SOURCES <= len(plan.uris) <= MAX_SOURCES:
        return f"a merge needs {MIN_SOURCES} to {MAX_SOURCES} sources, not {len(plan.uris)}"
    if any(not isinstance(u, str) or not u or len(u) > MAX_URI for u in plan.uris):
        return f"each merge source must be a URI of 1 to {MAX_URI} characters"
    weights = plan.weights if plan.weights is not None else ()
    if plan.weights is not None and len(weights) != len(plan.uris):
        return "a merge needs one weight per source"
    if any(not _number(w) or not math.isfinite(w) or abs(w) > MAX_WEIGHT for w in weights):
        return f"merge weights must be numbers within ±{MAX_WEIGHT:g}"
    if plan.density is not None and plan.method not in DENSITY_METHODS:
        return "merge density applies to ties, dare_linear and dare_ties only"
    if plan.method in DENSITY_METHODS and (not _number(plan.density) or not 0 < float(plan.density or 0) <= 1):
        return f"merge method {plan.method} needs a density in (0, 1]"
    return None


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plan_from_wire(block: Any) -> MergePlan:
    """A MergePlan from an adapters file's `merge` block (or a `merge:` path's JSON); ValueError says
    in one line what is wrong."""
    if not isinstance(block, dict) or set(block) - {"method", "sources", "weights", "density"}:
        raise ValueError('a merge is {"method": ..., "sources": [URI, ...], "weights": [...], "density": ...}')
    sources, weights = block.get("sources"), block.get("weights")
    if not isinstance(sources, list) or len(sources) > MAX_SOURCES:
        raise ValueError(f"a merge needs a list of {MIN_SOURCES} to {MAX_SOURCES} sources")
    if weights is not None and (not isinstance(weights, list) or len(weights) > MAX_SOURCES):
        raise ValueError("merge weights must be a list of numbers, one per source")
    method, density = block.get("method"), block.get("density")
    plan = MergePlan(
        str(method)[:32],
        tuple(sources),
        None if weights is None else tuple(float(w) if _number(w) else w for w in weights),
        float(density) if _number(density) else density,
    )
    problem = plan_problem(plan)
    if problem:
        raise ValueError(problem)
    return plan


def parse_merge_path(text: str) -> MergePlan:
    """The plan a `merge:` path names; ValueError (one line) for anything else, also an oversized or
    too deeply nested one: the path may come from the network."""
    if not is_merge_path(text):
        raise ValueError(f"not a merge path (it starts with {MERGE_PREFIX!r})")
    if len(text) > MAX_MERGE_PATH:
        raise ValueError(f"merge path longer than {MAX_MERGE_PATH} characters")
    try:
        block = json.loads(text[len(MERGE_PREFIX) :])
    except (ValueError, RecursionError):
        raise ValueError("merge path is not JSON") from None
    return plan_from_wire(block)
