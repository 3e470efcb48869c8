"""Evaluation: what a FineTuneJob measures after training, and the rules an AdapterDeployment gates on.

One vocabulary, used by the trainer (which measures), the operator (which copies the result into
`status.evaluation` and checks promotion rules against it) and the CRDs (which refuse a rule that
names no metric):

* compared metrics, measured for the base model and the tuned one on the same held-out examples,
  each `{base, tuned, delta}` (delta = tuned - base): `exactMatch`, `tokenF1`, `rougeL` (greedy
  generations against the references), and for preference data `preferenceAccuracy` (the share of
  pairs where the model gives the chosen answer a higher log-probability than the rejected one) and
  `rewardMargin` (the mean difference of those log-probabilities, per token);
* `perplexity` on a reference text that is not training data, `{base, tuned, delta}`, and
  `forgettingRatio` = tuned / base perplexity there (above 1: the tuned model forgot some of what the
  base knew);
* `evalLoss` and `trainLoss`, the job's final losses (status.metrics);
* `benchmarks`: lm-evaluation-harness scores of the tuned model, task -> metric -> value.

A rule names one of them as `rougeL.delta`, `exactMatch.tuned`, `perplexity.tuned`,
`forgettingRatio`, `evalLoss`, `trainLoss` or `benchmarks.TASK.METRIC` (`benchmarks.arc_easy.acc,none`),
with a `min` and/or a `max`. A task name holding a dot cannot be named in a rule (the metric is
what follows the last dot).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field

from .common import ApiModel, Rule

COMPARED = ("exactMatch", "tokenF1", "rougeL", "preferenceAccuracy", "rewardMargin", "perplexity")
SIDES = ("base", "tuned", "delta")
SCALARS = ("forgettingRatio", "evalLoss", "trainLoss")
BENCHMARK_NAME = "[A-Za-z0-9_.-]{1,100}"  # an lm-eval task name (BenchmarksSpec.tasks)
BENCHMARK_METRIC = "[A-Za-z0-9_,-]{1,64}"  # an lm-eval metric key, with its filter: "acc,none"
# "[.]", not "\.": the same text is a Python regex and a CEL string literal (where "\." is no escape).
METRIC_PATTERN = (
    "^(("
    + "|".join(COMPARED)
    + ")[.]("
    + "|".join(SIDES)
    + ")|"
    + "|".join(SCALARS)
    + f"|benchmarks[.]{BENCHMARK_NAME}[.]{BENCHMARK_METRIC})$"
)
_METRIC = re.compile(METRIC_PATTERN)


class Comparison(ApiModel):
    """One metric for the base model and the tuned one, on the same examples."""

    base: float | None = Field(default=None, description="The base model's value.")
    tuned: float | None = Field(default=None, description="The tuned model's (base + adapter) value.")
    delta: float | None = Field(default=None, description="tuned - base.")


class EvaluationResult(ApiModel):
    """What the trainer measured after training (FineTuneJob status.evaluation)."""

    examples: int | None = Field(default=None, ge=0, description="Held-out examples scored.")
    seconds: float | None = Field(default=None, ge=0, description="How long the evaluation took.")
    tokens_generated: int | None = Field(default=None, ge=0, description="Tokens generated, base and tuned together.")
    metrics: dict[str, Comparison] = Field(
        default_factory=dict,
        max_length=16,
        description="exactMatch, tokenF1, rougeL (generated answers against the references), "
        "preferenceAccuracy and rewardMargin (preference data), perplexity (on the reference text).",
    )
    forgetting_ratio: float | None = Field(
        default=None, description="Perplexity on the reference text, tuned / base: above 1, something was forgotten."
    )
    benchmarks: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        max_length=20,
        description="lm-evaluation-harness scores of the tuned model: task -> metric -> value.",
    )
    notes: list[str] = Field(
        default_factory=list, max_length=8, description="What was not measured, and why (no validation split, ...)."
    )


def metric_problem(name: str) -> str | None:
    """Why `name` is not a metric a rule may name, or None."""
    if _METRIC.match(name):
        return None
    return (
        f"unknown metric {name[:80]!r}: use one of "
        + ", ".join(f"{m}.base|tuned|delta" for m in COMPARED)
        + ", "
        + ", ".join(SCALARS)
        + ", benchmarks.TASK.METRIC"
    )


class Requirement(ApiModel):
    """A promotion rule: the adapter's FineTuneJob must have measured `metric` within [min, max]."""

    metric: str = Field(max_length=64, description="e.g. rougeL.delta, exactMatch.tuned, forgettingRatio, evalLoss.")
    min: float | None = Field(default=None, description="The lowest value allowed.")
    max: float | None = Field(default=None, description="The highest value allowed.")

    cel_rules: ClassVar = (
        Rule(
            cel=f"self.metric.matches('{METRIC_PATTERN}')",
            message="unknown metric: use exactMatch, tokenF1, rougeL, preferenceAccuracy, rewardMargin or perplexity "
            "with .base, .tuned or .delta, or forgettingRatio, evalLoss, trainLoss, benchmarks.TASK.METRIC",
            check=lambda r: metric_problem(r.metric) is None,
        ),
        Rule(
            cel="has(self.min) || has(self.max)",
            message="a requirement needs min, max or both",
            check=lambda r: r.min is not None or r.max is not None,
        ),
    )


def metric_value(name: str, evaluation: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> float | None:
    """The value of metric `name` in a FineTuneJob's status (its `evaluation` and `metrics`), or None."""
    evaluation, metrics = evaluation or {}, metrics or {}
    if name == "forgettingRatio":
        value = evaluation.get("forgettingRatio")
    elif name in ("evalLoss", "trainLoss"):
        value = metrics.get(name)
    elif name.startswith("benchmarks."):
        task, _, metric = name.removeprefix("benchmarks.").rpartition(".")
        scores = (evaluation.get("benchmarks") or {}).get(task)
        value = scores.get(metric) if isinstance(scores, Mapping) else None
    else:
        family, _, side = name.partition(".")
        compared = (evaluation.get("metrics") or {}).get(family)
        value = compared.get(side) if isinstance(compared, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def unmet(
    requirements: list[Requirement], evaluation: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None
) -> list[str]:
    """The rules a job's measurements fail, one line each (empty: promotable). A metric the job did
    not measure fails its rule: an unmeasured adapter is not shown to be good enough."""
    failures = []
    for rule in requirements:
        value = metric_value(rule.metric, evaluation, metrics)
        bounds = " and ".join(
            part for part in (f"min {rule.min:g}" if rule.min is not None else "",
                              f"max {rule.max:g}" if rule.max is not None else "") if part
        )  # fmt: skip
        if value is None:
            failures.append(f"{rule.metric} was not measured by the job (required: {bounds})")
        elif (rule.min is not None and value < rule.min) or (rule.max is not None and value > rule.max):
            failures.append(f"{rule.metric} is {value:.4g}, required {bounds}")
    return failures
