"""DPO: the loss is right at the start (policy == reference) and training separates the pairs."""

import math

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_trainer import dpo  # noqa: E402
from kubetune_trainer.data import PreferenceExample, collate_preference  # noqa: E402
from kubetune_trainer.tiny_model import build_tiny_model  # noqa: E402


def test_losses_match_the_formulas():
    policy = (torch.tensor([-1.0]), torch.tensor([-3.0]))
    reference = (torch.tensor([-2.0]), torch.tensor([-2.0]))  # margin = beta * (1 - (-1)) = 2 beta
    sigmoid, margin = dpo.preference_losses(policy, reference, beta=0.5, loss_type="sigmoid")
    assert margin.item() == pytest.approx(1.0)
    assert sigmoid.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    ipo, _ = dpo.preference_losses(policy, reference, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.0 / 0.5 - 1 / (2 * 0.5)) ** 2)
    hinge, _ = dpo.preference_losses(policy, reference, beta=0.5, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.0)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(tmp_path_factory.mktemp("dpo") / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    return peft.get_peft_model(model, config), tokenizer


def pairs(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [
        PreferenceExample(ids("Q: backups? A:"), ids(" kept thirty days."), ids(" never kept at all.")),
        PreferenceExample(ids("Q: billing? A:"), ids(" on the first day."), ids(" whenever we like.")),
    ]


def test_at_initialisation_policy_equals_reference(policy):
    model, tokenizer = policy
    batch = collate_preference(pairs(tokenizer), tokenizer.pad_token_id)
    loss_sum, count, stats = dpo.dpo_loss_sum(model, batch, beta=0.1, loss_type="sigmoid")
    assert count == 2
    assert loss_sum.item() / count == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts as a no-op
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_training_prefers_the_chosen_replies(policy):
    model, tokenizer = policy
    batch = collate_preference(pairs(tokenizer), tokenizer.pad_token_id)
    with model.disable_adapter(), torch.no_grad():
        base_before = dpo.both_sides(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(15):
        loss_sum, count, stats = dpo.dpo_loss_sum(model, batch, beta=0.1, loss_type="sigmoid")
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss_sum.item() / count
    assert loss_sum.item() / count < first * 0.7
    assert stats["reward_accuracy"] == 1.0 and stats["reward_margin"] > 0
    # the reference really is the frozen base: with the adapter off, nothing moved
    with model.disable_adapter(), torch.no_grad():
        base_after = dpo.both_sides(model, batch)
    assert all(torch.allclose(b, a) for b, a in zip(base_before, base_after, strict=True))
    with torch.no_grad():
        policy_after = dpo.both_sides(model, batch)
    assert not torch.allclose(policy_after[0], base_after[0])


def test_a_dpo_job_trains_end_to_end(tmp_path):
    import json

    from kubetune_trainer import train
    from tests.examples import REPO
    from tests.trainer.support import make_config

    model = build_tiny_model(tmp_path / "tiny")
    config = make_config(model, tmp_path, steps=30, learningRate="5e-3")
    config.spec.objective = "dpo"
    config.spec.dataset.format = "preference"
    config.spec.dataset.uri = f"file://{REPO}/examples/data/support-preferences.jsonl"
    assert train.run_training(config) == 0
    history = json.loads((tmp_path / "output" / "report.json").read_text())["history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    evals = [entry["eval_loss"] for entry in history if entry.get("eval_loss") is not None]
    assert evals[-1] < 0.5 * math.log(2), evals  # prefers the right answers on held-out pairs
