"""ORPO, SimPO and KTO: each loss against the paper's formula computed here by hand, the data they
learn from, and training on the tiny model that moves the chosen (or good) replies above the others,
through the trainer's own loop, with an adapter that reloads."""

import csv
import json
import math

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.api.finetunejob import DatasetSpec, OrpoSettings  # noqa: E402
from kubetune_trainer import preference  # noqa: E402
from kubetune_trainer.data import (  # noqa: E402
    IGNORE,
    PreferenceExample,
    UnpairedExample,
    build_datasets,
    collate_preference,
    collate_unpaired,
    pair_mismatched,
)
from kubetune_trainer.tiny_model import build_tiny_model  # noqa: E402

END = "<|im_end|>"  # the tiny tokenizer's EOS


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- the losses, against the papers' formulas --------------------------------------------------


def test_orpo_matches_the_odds_ratio_formula():
    chosen, rejected, lam = [-0.5, -2.0, -1e-3], [-1.5, -0.3, -4.0], 0.2
    losses, log_odds = preference.orpo_losses(torch.tensor(chosen), torch.tensor(rejected), beta=lam)
    for i, (w, lo) in enumerate(zip(chosen, rejected, strict=True)):
        odds_w = math.exp(w) / (1 - math.exp(w))  # P(y|x) / (1 - P(y|x)), P the per-token mean probability
        odds_l = math.exp(lo) / (1 - math.exp(lo))
        log_or = math.log(odds_w / odds_l)
        assert log_odds[i].item() == pytest.approx(log_or, rel=1e-5)
        assert losses[i].item() == pytest.approx(-w - lam * math.log(sigmoid(log_or)), rel=1e-5)


def test_orpo_stays_finite_for_a_certain_reply():
    chosen = torch.tensor([0.0, -1e-9], requires_grad=True)  # P(y) = 1: log(1 - P) would be -inf
    losses, _ = preference.orpo_losses(chosen, torch.tensor([-2.0, -2.0]), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


@pytest.mark.parametrize("x", [-1e-6, -1e-3, -0.5, -0.7, -1.0, -5.0, -40.0])
def test_log1m_exp_is_accurate_at_both_ends(x):
    assert preference.log1m_exp(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(
        math.log(1 - math.exp(x)), rel=1e-9
    )


def test_simpo_matches_the_formula_with_its_margin():
    chosen, rejected, beta, ratio = [-0.5, -2.0], [-1.5, -0.3], 2.5, 0.4
    losses, margin = preference.simpo_losses(torch.tensor(chosen), torch.tensor(rejected), beta, ratio)
    gamma = beta * ratio
    for i, (w, lo) in enumerate(zip(chosen, rejected, strict=True)):
        assert margin[i].item() == pytest.approx(beta * w - beta * lo, rel=1e-6)
        assert losses[i].item() == pytest.approx(-math.log(sigmoid(beta * w - beta * lo - gamma)), rel=1e-5)


def test_simpo_gamma_is_a_margin_to_clear():
    same = torch.tensor([-1.0])
    without, _ = preference.simpo_losses(same, same, beta=2.0, gamma_beta_ratio=0.0)
    assert without.item() == pytest.approx(math.log(2))
    with_gamma, _ = preference.simpo_losses(same, same, beta=2.0, gamma_beta_ratio=0.5)
    assert with_gamma.item() == pytest.approx(math.log(1 + math.exp(1.0)))  # -log sigmoid(-gamma), gamma = 1
    cleared, _ = preference.simpo_losses(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma_beta_ratio=0.5)
    assert cleared.item() == pytest.approx(math.log(2))  # beta * (avg_w - avg_l) = gamma exactly


def kto(policy, reference, kl_policy, kl_reference, desirable, beta=0.5, wd=1.0, wu=1.5):
    return preference.kto_losses(
        torch.tensor(policy, requires_grad=True),
        torch.tensor(reference),
        torch.tensor(kl_policy, requires_grad=True),
        torch.tensor(kl_reference),
        torch.tensor(desirable),
        beta,
        wd,
        wu,
    )


def test_kto_matches_the_formula():
    policy, reference = [-3.0, -5.0, -2.0], [-4.0, -4.5, -2.5]
    kl_policy, kl_reference = [-6.0, -7.0, -8.0], [-6.5, -7.5, -8.0]
    desirable, beta, wd, wu = [True, False, False], 0.5, 1.0, 1.5
    losses, rewards, z0 = kto(policy, reference, kl_policy, kl_reference, desirable, beta, wd, wu)
    expected_z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_reference, strict=True)) / 3)
    assert z0.item() == pytest.approx(expected_z0)
    for i, good in enumerate(desirable):
        r = policy[i] - reference[i]
        want = wd * (1 - sigmoid(beta * (r - expected_z0))) if good else wu * (1 - sigmoid(beta * (expected_z0 - r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert rewards[i].item() == pytest.approx(beta * r)


def test_kto_reference_point_is_clamped_at_zero_and_not_trained_through():
    losses, _, z0 = kto([-3.0, -3.0], [-3.0, -3.0], [-9.0, -9.0], [-5.0, -5.0], [True, False])
    assert z0.item() == 0.0  # the mismatched pairs say KL < 0: clamped
    assert losses.tolist() == pytest.approx([0.5, 1.5 * 0.5])  # r = z0 = 0: sigmoid(0) halves each weight
    kl_policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    losses, _, z0 = preference.kto_losses(
        policy,
        torch.tensor([-3.0, -3.0]),
        kl_policy,
        torch.tensor([-3.0, -3.0]),
        torch.tensor([True, False]),
        0.5,
        1,
        1,
    )
    assert z0.item() == pytest.approx(1.5)
    losses.sum().backward()
    assert kl_policy.grad is None and policy.grad is not None


# --- length normalisation, through a model -------------------------------------------------------


class Uniform(torch.nn.Module):
    """A causal LM that gives every next token the same probability 1/V."""

    def __init__(self, vocab=16):
        super().__init__()
        self.vocab = vocab
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab) * self.scale
        return type("Out", (), {"logits": logits})


def test_rewards_are_per_token_so_long_replies_get_no_premium():
    pair = PreferenceExample([1, 2], chosen_ids=[3, 4, 5, 6, 7, 8], rejected_ids=[9, 10])
    batch = collate_preference([pair], pad_id=0)
    chosen, rejected = preference.average_logps(Uniform(), batch)
    assert chosen.item() == pytest.approx(-math.log(16)) and rejected.item() == pytest.approx(-math.log(16))
    total, count, stats = preference.simpo_loss_sum(Uniform(), batch, beta=2.0, gamma_beta_ratio=0.0)
    assert count == 1 and total.item() == pytest.approx(math.log(2))  # the sums differ 3x; the averages don't
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    total, _, stats = preference.orpo_loss_sum(Uniform(), batch, beta=0.1)
    assert stats["log_odds_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(math.log(16) + 0.1 * math.log(2), rel=1e-5)


# --- the unpaired format -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("objectives") / "tiny")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def unpaired_spec(**kw):
    return DatasetSpec(**{"uri": "file:///data/feedback.jsonl", "format": "unpaired-preference", **kw})


def test_unpaired_rows_become_masked_examples_with_mismatched_replies(tok, tmp_path):
    rows = [
        {"prompt": "Is the sky blue?", "completion": " Yes.", "label": True},
        {"prompt": [{"role": "user", "content": "Greet me."}], "completion": "Go away.", "label": False},
        {"prompt": "Q?", "completion": " A.", "label": "true"},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _, report = build_datasets(unpaired_spec(packing=True), path, tok, seed=0)
    assert report.bad_rows == 0 and report.train_examples == 3
    assert all(isinstance(e, UnpairedExample) for e in train)  # never packed
    by_prompt = {tok.decode(e.input_ids[: e.prompt_length]): e for e in train}
    plain = by_prompt["Is the sky blue?"]
    assert plain.desirable and tok.decode(plain.input_ids[plain.prompt_length :]) == " Yes." + END
    assert plain.labels == [IGNORE] * plain.prompt_length + plain.input_ids[plain.prompt_length :]
    convo = by_prompt["<|im_start|>user\nGreet me.<|im_end|>\n<|im_start|>assistant\n"]
    assert not convo.desirable and tok.decode(convo.input_ids[convo.prompt_length :]) == "Go away." + END
    assert by_prompt["Q?"].desirable
    # each example's KL reply is the next one's reply, in the shuffled order
    replies = [e.input_ids[e.prompt_length :] for e in train]
    assert [e.mismatched_ids for e in train] == replies[1:] + replies[:1]
    assert report.train_tokens == sum(len(r) for r in replies)


def test_evaluating_on_unpaired_data_compares_answers_with_the_thumbs_up_replies_only(tok, tmp_path):
    from kubetune_trainer.evaluation import task_for

    rows = [
        {"prompt": "Is the sky blue?", "completion": " Yes.", "label": True},
        {"prompt": "Greet me.", "completion": " Go away.", "label": False},
        {"prompt": "Q?", "completion": " A.", "label": True},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _, _ = build_datasets(unpaired_spec(), path, tok, seed=0)
    reference = tmp_path / "reference.txt"
    reference.write_text("Some plain English text to measure perplexity on.")
    task = task_for(
        "unpaired-preference", examples, tok, reference=reference, max_examples=8, max_new_tokens=4,
        context=64, source="train split",
    )  # fmt: skip
    assert sorted(item.reference for item in task.items) == ["A.", "Yes."]


def test_unpaired_bad_rows_say_why(tok, tmp_path):
    rows = [
        {"prompt": "A?", "completion": "B.", "label": "maybe"},
        {"prompt": "A?", "completion": "B."},
        {"prompt": "A?", "completion": "", "label": True},
        {"prompt": "A?", "completion": "B.", "label": 2},
        {"prompt": "A?", "completion": "B.", "label": False},
        {"prompt": "A?", "completion": "C.", "label": 1},
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _, report = build_datasets(unpaired_spec(max_bad_row_fraction=1.0), path, tok, seed=0)
    assert report.bad_examples == [
        "row 1: 'label' must be true or false, not 'maybe'",
        "row 2: missing 'label'",
        "row 3: empty 'completion'",
        "row 4: 'label' must be true or false, not 2",
    ]
    assert sorted(e.desirable for e in train) == [False, True]
    with pytest.raises(ValueError, match=r"4 of 6 rows \(66.7%\) are not usable as unpaired-preference data"):
        build_datasets(unpaired_spec(), path, tok, seed=0)


def test_unpaired_from_csv_and_truncation(tok, tmp_path):
    long = " ".join(["word"] * 40)
    path = tmp_path / "feedback.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion", "label"])
        writer.writeheader()
        writer.writerow({"prompt": long, "completion": " Good " + long, "label": True})  # written as "True"
        writer.writerow({"prompt": "Short?", "completion": " No.", "label": "FALSE"})
    train, _, report = build_datasets(unpaired_spec(max_seq_length=16), path, tok, seed=0)
    assert report.bad_rows == 0 and report.truncated == 1
    cut = next(e for e in train if e.desirable)
    assert len(cut.input_ids) <= 16 and tok.decode(cut.input_ids[cut.prompt_length :]).startswith(" Good")
    assert all(e.prompt_length + len(e.mismatched_ids) <= 16 for e in train)


def test_collate_unpaired_pads_both_halves_to_one_width():
    batch = [
        UnpairedExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4], [0, 1, 2, 3], True, 2, mismatched_ids=[7, 8, 9]),
        UnpairedExample([5, 6, 7], [IGNORE, 6, 7], [0, 1, 2], False, 1, mismatched_ids=[3]),
    ]
    out = collate_unpaired(batch, pad_id=0)
    assert all(t.shape == (2, 5) for k, t in out.items() if k != "desirable")
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]]
    assert out["kl_input_ids"].tolist() == [[1, 2, 7, 8, 9], [5, 3, 0, 0, 0]]
    assert out["kl_labels"].tolist() == [[IGNORE, IGNORE, 7, 8, 9], [IGNORE, 3, IGNORE, IGNORE, IGNORE]]
    assert out["kl_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["desirable"].tolist() == [True, False]


# --- training the tiny model ---------------------------------------------------------------------


@pytest.fixture
def policy(model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pairs(tok):
    eos = [tok.eos_token_id]
    return [
        PreferenceExample(ids(tok, "Q: backups? A:"), ids(tok, " kept thirty days.") + eos, ids(tok, " never.") + eos),
        PreferenceExample(ids(tok, "Q: billing? A:"), ids(tok, " on the first.") + eos, ids(tok, " whenever.") + eos),
    ]


def fit(model, loss_fn, batch, steps=15, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        total, count, stats = loss_fn(model, batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    return stats


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda model, batch: preference.orpo_loss_sum(model, batch, beta=0.1),
        lambda model, batch: preference.simpo_loss_sum(model, batch, beta=2.0, gamma_beta_ratio=0.25),
    ],
    ids=["orpo", "simpo"],
)
def test_training_raises_the_chosen_over_rejected_margin(policy, tok, loss_fn):
    batch = collate_preference(pairs(tok), tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = preference.average_logps(policy, batch)
    before = (chosen - rejected).mean().item()
    stats = fit(policy, loss_fn, batch)
    with torch.no_grad():
        chosen, rejected = preference.average_logps(policy, batch)
    assert (chosen - rejected).mean().item() > before + 0.5
    assert (chosen > rejected).all() and stats["reward_accuracy"] == 1.0


def feedback(tok):
    eos = [tok.eos_token_id]
    examples = []
    for prompt, reply, good in [
        ("Q: backups? A:", " kept thirty days.", True),
        ("Q: backups? A:", " never kept at all.", False),
        ("Q: billing? A:", " on the first day.", True),
        ("Q: billing? A:", " whenever we like.", False),
    ]:
        p, r = ids(tok, prompt), ids(tok, reply) + eos
        examples.append(UnpairedExample(p + r, [IGNORE] * len(p) + r, list(range(len(p + r))), good, len(p)))
    pair_mismatched(examples, max_len=64)
    return examples


def test_kto_raises_good_rewards_over_bad(policy, tok):
    batch = collate_unpaired(feedback(tok), tok.pad_token_id)
    total, count, stats = preference.kto_loss_sum(policy, batch, 0.1, 1.0, 1.0)
    assert count == 4 and total.item() / count == pytest.approx(0.5, abs=1e-5)  # policy == reference: sigmoid(0)
    assert stats["kl"] == 0.0 and stats["desirable_reward"] == pytest.approx(0.0, abs=1e-6)
    stats = fit(policy, lambda m, b: preference.kto_loss_sum(m, b, 0.1, 1.0, 1.0), batch, steps=20)
    assert stats["desirable_reward"] - stats["undesirable_reward"] > 0.5, stats
    assert stats["desirable_reward"] > 0 > stats["undesirable_reward"]
    total, count, _ = preference.kto_loss_sum(policy, batch, 0.1, 1.0, 1.0)
    assert total.item() / count < 0.45


# --- whole jobs: train, save, reload -------------------------------------------------------------

PREFERENCES = "examples/data/support-preferences.jsonl"
FEEDBACK = "examples/data/support-feedback.jsonl"


def run_job(tmp_path, objective, data, data_format, steps, **settings):
    from kubetune_trainer import train
    from tests.examples import REPO
    from tests.trainer.support import make_config

    model = build_tiny_model(tmp_path / "tiny")
    config = make_config(model, tmp_path, steps=steps, learningRate="5e-3")
    config.spec.objective = objective
    config.spec.dataset.format = data_format
    config.spec.dataset.uri = f"file://{REPO}/{data}"
    for name, value in settings.items():
        setattr(config.spec, name, value)
    assert train.run_training(config) == 0
    report = json.loads((tmp_path / "output" / "report.json").read_text())
    return model, report


def reloaded(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize(
    "objective, settings",
    [("orpo", {"orpo": OrpoSettings(beta=1.0)}), ("simpo", {})],  # lambda 1: 20 steps are not only SFT
    ids=["orpo", "simpo"],
)
def test_a_paired_job_trains_saves_and_reloads(tmp_path, objective, settings):
    from transformers import AutoTokenizer

    from tests.examples import REPO

    model_dir, report = run_job(tmp_path, objective, PREFERENCES, "preference", steps=20, **settings)
    history = report["history"]
    evals = [e["eval_loss"] for e in history if e.get("eval_loss") is not None]
    assert evals[-1] < history[0]["loss"], history
    tok = AutoTokenizer.from_pretrained(model_dir)
    train_set, _, _ = build_datasets(
        DatasetSpec(uri="file:///x", format="preference", max_seq_length=96), REPO / PREFERENCES, tok, seed=0
    )
    batch = collate_preference(train_set[:16], tok.pad_token_id)
    tuned = reloaded(model_dir, tmp_path / "output" / "adapter")
    with torch.no_grad():
        chosen, rejected = preference.average_logps(tuned, batch)
        with tuned.disable_adapter():
            base_chosen, base_rejected = preference.average_logps(tuned, batch)
    assert (chosen - rejected).mean() > (base_chosen - base_rejected).mean() + 0.25
    assert (chosen > rejected).float().mean() >= max(0.75, (base_chosen > base_rejected).float().mean() + 0.2)


def test_a_kto_job_trains_saves_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    from kubetune.api.finetunejob import KtoSettings
    from tests.examples import REPO

    model_dir, report = run_job(tmp_path, "kto", FEEDBACK, "unpaired-preference", steps=20, kto=KtoSettings(beta=0.5))
    history = report["history"]
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy == reference at step 1: 1 - sigmoid(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = DatasetSpec(uri="file:///x", format="unpaired-preference", max_seq_length=96)
    examples, _, _ = build_datasets(data, REPO / FEEDBACK, tok, seed=0)
    batch = collate_unpaired(examples[:24], tok.pad_token_id)
    tuned = reloaded(model_dir, tmp_path / "output" / "adapter")
    with torch.no_grad():
        _, _, stats = preference.kto_loss_sum(tuned, batch, 0.5, 1.0, 1.0)
    # the base scores every reply 0 (r = 0): the reloaded adapter ranks good replies above bad ones
    assert stats["desirable_reward"] - stats["undesirable_reward"] > 0.1, stats
