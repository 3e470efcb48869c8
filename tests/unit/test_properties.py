"""Property tests: no input, however odd, makes the manifest loader, the validator, the URI rule or
the termination-message parser raise anything but the project's own error types.

The contract each one keeps:

- `yamlsafe.load_all(text)` / `load_path(path)`: the documents, or `ManifestError` (a ValueError)
  with one line; never RecursionError, MemoryError, TypeError, yaml's own errors, or a hang.
- `manifest.parse(doc)`: never raises; whatever `doc` is, a `Checked` whose problems say what is
  wrong (`validate()` runs inside it on every object that parses).
- `uris.uri_problem(uri, schemes)`: never raises; None or one line (no newline). What the API
  server's rules refuse (`shared_problem`), it refuses too.
- `contract.TrainerResult.parse(text)`: never raises; (result, "") or (None, one line).

With hypothesis (a dev dependency) the inputs are generated and shrunk; without it, the same
properties run over a fixed, seeded sample, so the tier never skips them silently.
"""

import json
import random
import string
from typing import Any

import pytest

from kubetune.api import uris
from kubetune.api.manifest import Checked, parse
from kubetune.api.yamlsafe import ManifestError, load_all
from kubetune.contract import TrainerResult
from tests.unit.support import spec

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - depends on the environment
    st = None

SETTINGS = {
    "max_examples": 200,
    "deadline": None,
    "derandomize": True,
    "database": None,
}

# --- the properties ----------------------------------------------------------------------------------


def loader_property(text: str) -> None:
    try:
        documents = load_all(text)
    except ManifestError as error:
        assert "\n" not in str(error) and str(error)
        return
    for document in documents:
        checked = parse(document)
        assert isinstance(checked, Checked)


def parse_property(doc: Any) -> None:
    checked = parse(doc)
    assert isinstance(checked, Checked)
    for problem in checked.problems:
        assert isinstance(problem.path, str) and isinstance(problem.message, str)
    if checked.ok:
        assert checked.obj is not None
        checked.obj.to_wire()


def uri_property(uri: str) -> None:
    problem = uris.uri_problem(uri)
    assert problem is None or (isinstance(problem, str) and "\n" not in problem)
    for schemes in (("pvc",), ("http", "https"), ("hf", "pvc", "s3", "file")):
        uris.uri_problem(uri, schemes)
    if uris.shared_problem(uri) is not None:
        assert problem is not None, f"the API server refuses {uri!r} but uri_problem accepts it"


def trainer_result_property(text: str) -> None:
    result, why = TrainerResult.parse(text)
    if result is None:
        assert isinstance(why, str) and why and "\n" not in why
    else:
        assert why == ""


# --- inputs ------------------------------------------------------------------------------------------

YAML_PIECES = [
    "a: 1\n",
    "- x\n",
    "&a [1, 2]\n",
    "*a\n",
    "b: *a\n",
    "---\n",
    "...\n",
    "{",
    "}",
    "[",
    "]",
    ":",
    "? ",
    "!!str ",
    "!!python/name:os.system ",
    "<<: *a\n",
    "'",
    '"',
    "\\",
    "\t",
    "  ",
    "\n",
    "#",
    "%YAML 1.1\n",
    "|\n",
    ">-\n",
    "2026-02-31",
    "1e999",
    "0x1F",
    ".inf",
    "~",
    "null",
    "\x00",
    "\ufeff",
    "é",
    "kind: FineTuneJob\n",
    "apiVersion: kubetune.io/v1alpha1\n",
    "metadata: {name: x}\n",
    "spec: {}\n",
]

URI_PIECES = [
    "pvc://",
    "configmap://",
    "s3://",
    "hf://",
    "https://",
    "http://",
    "file://",
    "ftp://",
    "/",
    "//",
    ".",
    "..",
    "%2e",
    "%2E",
    "%00",
    "%0a",
    "%5c",
    "%",
    "?",
    "#",
    "@",
    ":",
    "[",
    "]",
    "::1",
    "169.254.169.254",
    "127.0.0.1",
    "0x7f",
    "localhost",
    "a",
    "A",
    "_",
    "-",
    "\\",
    "\n",
    "\x00",
    "\u2028",
    "\x85",
    "é",
    " ",
    "claim",
    "key.json",
]


def random_text(rng: random.Random, pieces: list[str], n: int) -> str:
    alphabet = string.printable + "\x00\x85\u2028é"
    out = []
    for _ in range(rng.randint(0, n)):
        out.append(rng.choice(pieces) if rng.random() < 0.85 else rng.choice(alphabet))
    return "".join(out)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randint(0, 7 if depth < 6 else 4)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**70, 1.5, float("inf"), float("nan"), -0.0])
    if choice in (3, 4):
        return random_text(rng, URI_PIECES + YAML_PIECES, 8)
    if choice == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["uri", "name", "spec", "metadata", "kind", "apiVersion", "adapters", "fromJob", "model", "dataset"]
    return {
        rng.choice(keys) if rng.random() < 0.7 else random_text(rng, URI_PIECES, 4): random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def mutated_manifest(rng: random.Random) -> dict[str, Any]:
    """A valid FineTuneJob or AdapterDeployment with one field replaced by something random."""
    if rng.random() < 0.5:
        doc: dict[str, Any] = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "job"},
            "spec": spec(),
        }
    else:
        doc = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "serve"},
            "spec": {"baseModel": {"uri": "hf://a/b"}, "adapters": [{"name": "a", "uri": "pvc://x/a"}]},
        }
    node: Any = doc
    path = []
    while isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(sorted(node))
        path.append(key)
        if not isinstance(node[key], dict | list) or rng.random() < 0.3:
            node[key] = random_json(rng)
            return doc
        node = node[key] if isinstance(node[key], dict) else node[key][0] if node[key] else {}
    if isinstance(node, dict):
        node[random_text(rng, URI_PIECES, 3) or "x"] = random_json(rng)
    return doc


# --- seeded samples (always run) ---------------------------------------------------------------------

SAMPLES = 300


def test_loader_seeded_sample():
    rng = random.Random(14)
    for _ in range(SAMPLES):
        loader_property(random_text(rng, YAML_PIECES, 40))


def test_parse_seeded_sample():
    rng = random.Random(8)
    for _ in range(SAMPLES):
        parse_property(random_json(rng))
        parse_property(mutated_manifest(rng))


def test_uri_seeded_sample():
    rng = random.Random(7)
    for _ in range(SAMPLES * 3):
        uri_property(random_text(rng, URI_PIECES, 12))


def test_trainer_result_seeded_sample():
    rng = random.Random(6)
    for _ in range(SAMPLES):
        trainer_result_property(json.dumps(random_json(rng)))
        trainer_result_property(random_text(rng, ["{", "}", "[", "]", '"', ":", ",", "1e999", "NaN", "Infinity"], 60))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 2000 + "]" * 2000,
        "{" * 2000,
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"evalLoss": Infinity}',
        '{"evalLoss": NaN, "trainLoss": -Infinity}',
        '{"metrics": {"trainLoss": 1e999}}',
        "9" * 5000,
        "\x00",
        "\ud800",
        '"' + "a" * 100_000 + '"',
    ],
    ids=lambda t: repr(t)[:30],
)
def test_trainer_result_known_hostile_messages(text):
    trainer_result_property(text)


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": "x", "spec": 1},
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": ["x"]}, "spec": {}},
        {"apiVersion": "kubetune.io/v1alpha1", "kind": {"a": 1}},
        {"apiVersion": ["kubetune.io/v1alpha1"], "kind": "FineTuneJob"},
        {1: 2, None: 3},
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "spec": {"adapters": [None, 1, "a"]}},
        [1, 2, 3],
        "text",
        None,
        3.5,
    ],
    ids=lambda d: repr(d)[:40],
)
def test_parse_known_odd_documents(doc):
    parse_property(doc)


# --- hypothesis (when installed) ---------------------------------------------------------------------

if st is not None:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(["uri", "name", "spec", "metadata", "kind", "apiVersion", "adapters"])
                | st.text(max_size=8),
                children,
                max_size=4,
            )
        ),
        max_leaves=30,
    )
    manifests = st.fixed_dictionaries(
        {
            "apiVersion": st.just("kubetune.io/v1alpha1"),
            "kind": st.sampled_from(["FineTuneJob", "AdapterDeployment"]),
            "metadata": st.fixed_dictionaries({"name": st.text(max_size=70)}) | json_values,
            "spec": json_values,
        }
    )

    @settings(**SETTINGS, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(YAML_PIECES) | st.characters(), max_size=60).map("".join))
    def test_loader_never_raises_but_manifest_error(text):
        loader_property(text)

    @settings(**SETTINGS)
    @given(json_values | manifests)
    def test_parse_and_validate_never_raise(doc):
        parse_property(doc)

    @settings(**SETTINGS)
    @given(st.lists(st.sampled_from(URI_PIECES) | st.characters(), max_size=30).map("".join))
    def test_uri_problem_never_raises(uri):
        uri_property(uri)

    @settings(**SETTINGS)
    @given(st.text(max_size=300) | json_values.map(json.dumps))
    def test_trainer_result_parse_never_raises(text):
        trainer_result_property(text)
