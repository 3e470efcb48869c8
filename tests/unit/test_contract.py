"""The operator↔trainer contract: one definition, used by both sides."""

import ast
import json
import subprocess
import sys

import pytest

from kubetune import contract
from kubetune.contract import TERMINATION_LIMIT, TrainerResult
from tests.examples import REPO

pytestmark = pytest.mark.unit

SHA = "a" * 64


def succeeded(**extra) -> TrainerResult:
    return TrainerResult.model_validate(
        {
            "phase": "Succeeded",
            "adapter": {"uri": "pvc://out/run/adapter", "sizeBytes": 12, "sha256": SHA},
            "metrics": {"trainLoss": 0.5, "tokensPerSecond": 100.0},
            "steps": 20,
            "plan": {"worldSize": 2, "strategy": "ddp", "microBatch": 1, "gradAccumulation": 4},
            "data": {"fingerprint": "f" * 64, "badRows": 0},
            **extra,
        }
    )


def test_what_the_trainer_writes_the_operator_reads_back_unchanged():
    result = succeeded()
    parsed, error = TrainerResult.parse(result.termination_message())
    assert error == "" and parsed == result
    assert json.loads(result.termination_message())["adapter"]["sizeBytes"] == 12  # camelCase on the wire


def test_the_termination_message_stays_under_the_kubelets_limit_and_keeps_the_adapter():
    huge = succeeded(data={"fingerprint": "f" * 5000, "badRows": 1})
    text = huge.termination_message()
    assert len(text.encode()) < TERMINATION_LIMIT
    parsed, _ = TrainerResult.parse(text)
    assert parsed is not None and parsed.adapter == huge.adapter and parsed.data is None


def test_a_failure_keeps_its_reason_and_a_clipped_message():
    text = TrainerResult.failed("InvalidInput", "bad row " * 2000).termination_message()
    parsed, _ = TrainerResult.parse(text)
    assert parsed is not None and parsed.phase == "Failed" and parsed.reason == "InvalidInput"
    assert len(text.encode()) < TERMINATION_LIMIT


@pytest.mark.parametrize(
    "message, words",
    [
        ("", "no termination message"),
        ("Traceback (most recent call last):", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"phase": "Done"}', "phase"),
        (json.dumps({"phase": "Succeeded", "adapter": {"sha256": "nothex"}}), "adapter.sha256"),
        (json.dumps({"phase": "Succeeded", "steps": -1}), "steps"),
        ('{"phase": "Succeeded", "x": "' + "y" * TERMINATION_LIMIT + '"}', "longer than"),
    ],
)
def test_untrusted_pod_output_is_refused_with_a_reason(message, words):
    parsed, error = TrainerResult.parse(message)
    assert parsed is None and words in error


def test_unknown_keys_from_another_trainer_version_are_ignored():
    parsed, error = TrainerResult.parse(json.dumps({"phase": "Succeeded", "newField": {"x": 1}}))
    assert error == "" and parsed is not None


def test_the_adapter_lives_under_the_output_uri():
    assert contract.adapter_uri("pvc://out/run/") == "pvc://out/run/adapter"


def test_mount_paths_follow_the_environment_the_operator_sets(monkeypatch):
    monkeypatch.delenv(contract.PVC_ROOT_ENV, raising=False)
    assert contract.pvc_mount_path("data") == f"{contract.PVC_ROOT}/data"
    monkeypatch.setenv(contract.PVC_ROOT_ENV, "/tmp/claims")
    assert contract.pvc_mount_path("data") == "/tmp/claims/data"


def test_the_contract_constants_are_written_once():
    """No string literal in product code repeats a mount root, env name, file name or output folder
    of the contract: every side imports them from kubetune.contract."""
    names = [
        "PVC_ROOT",
        "CONFIGMAP_ROOT",
        "PVC_ROOT_ENV",
        "CONFIGMAP_ROOT_ENV",
        "CONFIG_DIR",
        "CONFIG_KEY",
        "CONFIG_PATH",
        "SCRATCH",
        "TERMINATION_LOG",
        "COMPLETE_MARKER",
        "REPORT_FILE",
        "CHECKPOINTS_DIR",
        "ENV_NNODES",
        "ENV_NODE_RANK",
        "ENV_NPROC_PER_NODE",
        "ENV_MASTER_ADDR",
        "ENV_MASTER_PORT",
    ]
    values = {getattr(contract, name) for name in names}
    copies = []
    for folder in ("core", "operator", "trainer_image", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "core/kubetune/contract.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in values:
                    copies.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert copies == []


def test_the_operator_image_can_read_the_contract_without_torch_or_boto3():
    code = (
        "import sys, kubetune.contract, kubetune.storage, kubetune.planning; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'boto3', 'kopf', 'kubernetes'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- hostile termination messages: never an exception, always a reason ---------------------------

HOSTILE_MESSAGES = [
    "[" * 2000 + "]" * 2000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    '{"phase": "Succeeded", "x": ' + "[" * 1500 + "]" * 1500 + "}",
    '{"phase": "Succeeded", "steps": 1' + "0" * 5000 + "}",
    '{"phase": "Succeeded", "steps": 1e999}',
    '{"phase": "Succeeded", "steps": 100000000000000000000000}',
    '{"phase": "Succeeded", "adapter": {"uri": "pvc://out/run/adapter", "sizeBytes": 1000000000000000000000}}',
    '{"phase": "Succeeded", "metrics": {"evalLoss": NaN}, "totalParams": -Infinity}',
    '{"phase": ["Succeeded"]}',
    '{"phase": "Failed", "reason": {"x": 1}}',
    "\x00\xff\ud800",
    "null",
    "1e999",
]


@pytest.mark.parametrize("message", HOSTILE_MESSAGES, ids=range(len(HOSTILE_MESSAGES)))
def test_hostile_termination_messages_give_a_one_line_reason_and_never_raise(message):
    parsed, error = TrainerResult.parse(message)
    if parsed is None:
        assert error and "\n" not in error and len(error) <= 1000
    else:  # what was kept is within the limits of the status it goes into
        assert json.dumps(parsed.to_wire(), allow_nan=False)


def test_every_number_that_is_kept_is_finite_and_fits_in_an_int64():
    parsed, error = TrainerResult.parse(
        '{"phase": "Succeeded", "metrics": {"evalLoss": Infinity, "trainLoss": -Infinity, "tokensPerSecond": 3}}'
    )
    assert parsed is not None and parsed.metrics.to_status() == {"tokensPerSecond": 3.0}
    assert TrainerResult.parse('{"phase": "Succeeded", "steps": 9223372036854775808}')[0] is None


def test_strings_from_the_pod_are_clipped():
    parsed, _ = TrainerResult.parse(json.dumps({"phase": "Failed", "reason": "R" * 1000, "message": "m" * 2500}))
    assert parsed is not None and len(parsed.reason or "") <= contract.MAX_REASON
    assert len(parsed.message or "") <= contract.MAX_RESULT_MESSAGE


def test_random_bytes_and_random_json_never_raise():
    """A deterministic fuzz over truncations, byte flips and nesting of real results."""
    import random

    rng = random.Random(14)
    seeds = [succeeded().termination_message(), TrainerResult.failed("InvalidInput", "x").termination_message()]
    alphabet = '[]{}":,0123456789.eE+-nultrfaNIy\\ \n\x00'
    for _ in range(2000):
        text = rng.choice(seeds)
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(text) + 1)
            text = text[:where] + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) + text[where:]
        if rng.random() < 0.1:
            depth = rng.randint(100, 5000)
            text = "[" * depth + text + "]" * depth
        parsed, error = TrainerResult.parse(text)
        assert (parsed is None) == bool(error)


def test_property_based_parse_never_raises():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
        max_leaves=30,
    )
    documents = st.fixed_dictionaries(
        {"phase": st.sampled_from(["Succeeded", "Failed", "x"])},
        optional={"adapter": json_values, "metrics": json_values, "steps": json_values, "reason": json_values},
    )

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
    @hypothesis.given(st.one_of(st.text(max_size=300), documents.map(json.dumps)))
    def check(text):
        parsed, error = TrainerResult.parse(text)
        assert (parsed is None) == bool(error)

    check()
