"""The preference objectives in the API: orpo, simpo and kto beside sft and dpo, each with its own
settings block and the dataset format it learns from, the same words from Python and from CEL."""

from types import SimpleNamespace

import cel
import pytest
from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec
from kubetune.api.finetunejob import OBJECTIVE_FORMATS, KtoSettings, OrpoSettings, SimpoSettings
from tests.unit.support import spec

PREFERENCE = {"dataset.format": "preference"}
UNPAIRED = {"dataset.format": "unpaired-preference"}


def error_text(raw: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(raw)
    return str(caught.value)


def objective_rules():
    """The spec-level rules about objectives, formats and settings blocks (not the transition rules)."""
    words = ("objective", "data needs", "is only allowed with objective")
    return [r for r in FineTuneJobSpec.cel_rules if r.check is not None and any(w in r.message for w in words)]


@pytest.mark.parametrize(
    "overrides, settings",
    [
        ({"objective": "orpo", **PREFERENCE, "orpo": {"beta": 0.25}}, ("orpo", OrpoSettings(beta=0.25))),
        (
            {"objective": "simpo", **PREFERENCE, "simpo": {"beta": 2.5, "gammaBetaRatio": 0.55}},
            ("simpo", SimpoSettings(beta=2.5, gamma_beta_ratio=0.55)),
        ),
        (
            {"objective": "kto", **UNPAIRED, "kto": {"desirableWeight": 0.75}},
            ("kto", KtoSettings(beta=0.1, desirable_weight=0.75, undesirable_weight=1.0)),
        ),
    ],
)
def test_each_objective_takes_its_own_settings(overrides, settings):
    parsed = FineTuneJobSpec.model_validate(spec(**overrides))
    name, expected = settings
    assert getattr(parsed, name) == expected
    assert FineTuneJobSpec.model_validate(parsed.to_wire()) == parsed


def test_defaults_are_the_papers_and_trls():
    assert OrpoSettings().beta == 0.1  # TRL ORPOConfig
    assert (SimpoSettings().beta, SimpoSettings().gamma_beta_ratio) == (2.0, 0.25)  # the SimPO authors' config
    kto = KtoSettings()
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight) == (0.1, 1.0, 1.0)  # TRL KTOConfig
    bare = FineTuneJobSpec.model_validate(spec(objective="simpo", **PREFERENCE))
    assert bare.simpo is None  # the trainer uses SimpoSettings() then; the wire stays as written
    assert "simpo" not in bare.to_wire()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "orpo"}, "objective orpo needs dataset.format preference"),
        ({"objective": "simpo", **UNPAIRED}, "objective simpo needs dataset.format preference"),
        ({"objective": "kto", **PREFERENCE}, "objective kto needs dataset.format unpaired-preference"),
        ({"objective": "kto"}, "objective kto needs dataset.format unpaired-preference"),
        ({"objective": "dpo"}, "objective dpo needs dataset.format preference"),
        (PREFERENCE, "preference data needs objective dpo, orpo or simpo"),
        (UNPAIRED, "unpaired-preference data needs objective kto"),
        ({"objective": "dpo", **UNPAIRED}, "objective dpo needs dataset.format preference"),
        (
            {"objective": "orpo", **PREFERENCE, "simpo": {"beta": 2.0}},
            "spec.simpo is only allowed with objective simpo",
        ),
        ({"objective": "simpo", **PREFERENCE, "orpo": {}}, "spec.orpo is only allowed with objective orpo"),
        ({"objective": "dpo", **PREFERENCE, "kto": {}}, "spec.kto is only allowed with objective kto"),
        ({"objective": "kto", **UNPAIRED, "dpo": {}}, "spec.dpo is only allowed with objective dpo"),
        ({"objective": "kto", **UNPAIRED, "method.type": "full"}, "objective kto uses the base model as its frozen"),
        ({"objective": "orpo", **PREFERENCE, "orpo": {"beta": 0}}, "greater than 0"),
        ({"objective": "simpo", **PREFERENCE, "simpo": {"gammaBetaRatio": -1}}, "greater than or equal to 0"),
        ({"objective": "kto", **UNPAIRED, "kto": {"undesirableWeight": 0}}, "greater than 0"),
        ({"objective": "kto", **UNPAIRED, "kto": {"gamma": 1}}, "Extra inputs are not permitted"),
        ({"objective": "ppo"}, "Input should be 'sft', 'dpo', 'orpo', 'simpo' or 'kto'"),
    ],
)
def test_rules_reject_with_their_message(overrides, message):
    assert message in error_text(spec(**overrides))


def test_reference_free_objectives_allow_a_full_fine_tune():
    for objective in ("orpo", "simpo"):
        FineTuneJobSpec.model_validate(spec(objective=objective, **PREFERENCE, **{"method.type": "full"}))


def test_every_objective_has_a_format_and_a_settings_block():
    assert set(OBJECTIVE_FORMATS) == {"dpo", "orpo", "simpo", "kto"}
    fields = FineTuneJobSpec.model_fields
    assert all(objective in fields for objective in OBJECTIVE_FORMATS)


CASES = [
    (objective, data_format, block, method)
    for objective in ("sft", "dpo", "orpo", "simpo", "kto")
    for data_format in ("chat", "preference", "unpaired-preference")
    for block in (None, "orpo", "kto")
    for method in ("lora", "full")
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_cel_and_python_agree(case):
    """What the API server admits (the CEL, evaluated on the wire object) is what `kubetune
    validate` admits (the Python twin of each rule, and the model as a whole)."""
    objective, data_format, block, method = case
    raw = spec(objective=objective, **{"dataset.format": data_format, "method.type": method})
    if block:
        raw[block] = {"beta": 0.1}
    view = SimpleNamespace(
        objective=objective,
        dataset=SimpleNamespace(format=data_format),
        method=SimpleNamespace(type=method),
        **{name: raw.get(name) for name in OBJECTIVE_FORMATS},
    )
    rules = objective_rules()
    assert len(rules) == 11
    by_cel = [cel.evaluate(rule.cel, {"self": raw}) is True for rule in rules]
    by_python = [rule.check(view) for rule in rules]
    assert by_cel == by_python
    try:
        FineTuneJobSpec.model_validate(raw)
        parsed = True
    except ValidationError:
        parsed = False
    assert parsed == all(by_python)
