"""The tiny model: an ordinary Hugging Face folder, deterministic, loadable offline, trainable on CPU."""

import hashlib

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kubetune_trainer.tiny_model import TinyModelConfig, build_tiny_model  # noqa: E402


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_folder_has_the_usual_files(tiny):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny / name).is_file(), name
    assert not list(tiny.parent.glob(".model.*")), "staging folder left behind"


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", TinyModelConfig(seed=1))
    assert digest(again / "model.safetensors") == digest(tiny / "model.safetensors")
    assert digest(again / "tokenizer.json") == digest(tiny / "tokenizer.json")
    assert digest(other / "model.safetensors") != digest(tiny / "model.safetensors")


def test_loads_offline_and_is_small(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert 1000 <= len(tokenizer) <= 2048
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tokenizer.decode(tokenizer("How do I reset my password?")["input_ids"]) == "How do I reset my password?"


def test_chat_template_renders_and_masks_the_assistant(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello there.<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "Hello there.<|im_end|>"


def test_a_few_cpu_steps_reduce_the_loss(tiny):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    batch = tokenizer(["The store opens at eight o'clock every weekday."], return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
