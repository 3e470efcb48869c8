"""Property tests of the request bodies of `kubetune serve` (`kubetune_serve.schemas`): whatever JSON
a client sends, parsing it either gives a request or raises pydantic's ValidationError (the API's
400), never anything else; and what parses stays within the bounds generation relies on (finding 3
of the hardening issue: hostile requests must be refused before they cost anything)."""

import math

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="NOT RUN: property tests need hypothesis (the [dev] extra)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from kubetune_serve.schemas import (  # noqa: E402
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)

pytestmark = pytest.mark.unit

MODELS = (CompletionRequest, ChatCompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30,
)
FIELDS = (
    "model prompt messages role content max_tokens max_completion_tokens temperature top_p top_k n stop seed "
    "stream stream_options include_usage user echo logprobs add_generation_prompt ignore_eos lora_name "
    "lora_path load_inplace lora_int_id"
).split()
# bodies that use the real field names, so validation goes past the first missing field
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=12)


def parse(model, body):
    """The model or None; anything but a ValidationError fails the test."""
    try:
        return model.model_validate(body)
    except ValidationError:
        return None


def check_bounds(request) -> None:
    if isinstance(request, (CompletionRequest, ChatCompletionRequest)):
        assert 1 <= request.n <= 16
        assert request.max_tokens is None or 1 <= request.max_tokens < 2**31
        assert request.seed is None or -(2**63) <= request.seed and request.seed + 16 < 2**63
        assert request.top_k is None or -1 <= request.top_k < 2**31
        assert request.temperature is None or (math.isfinite(request.temperature) and 0 <= request.temperature <= 2)
        assert request.top_p is None or 0 < request.top_p <= 1
        assert all(isinstance(stop, str) for stop in request.stop_list())
        assert isinstance(request.ignore_eos, bool)
    if isinstance(request, ChatCompletionRequest):
        assert request.messages and all(isinstance(m.role, str) for m in request.messages)


@SETTINGS
@given(st.sampled_from(MODELS), json_values)
def test_any_json_value_parses_or_is_a_validation_error(model, body):
    request = parse(model, body)
    if request is not None:
        check_bounds(request)


@SETTINGS
@given(st.sampled_from(MODELS), bodies)
def test_bodies_with_the_real_field_names_parse_or_are_validation_errors(model, body):
    request = parse(model, body)
    if request is not None:
        check_bounds(request)


@SETTINGS
@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_seeds_that_parse_fit_torch(seed):
    request = parse(CompletionRequest, {"prompt": "x", "seed": seed})
    if request is not None:
        import_free_bound = 2**64  # torch.manual_seed takes [-2**63, 2**64); a request adds up to n-1
        assert -(2**63) <= request.seed and request.seed + 15 < import_free_bound
