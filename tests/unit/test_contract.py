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
