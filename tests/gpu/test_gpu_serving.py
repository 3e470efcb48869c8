"""The engine of `kubetune serve` on a CUDA GPU (bf16 by default there): the base and each adapter
answer as transformers + PEFT do on the same GPU, also with requests for different adapters in
flight at once.

Reported as NOT RUN on machines without a GPU (see tests/conftest.py)."""

import threading

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")

from kubetune_serve.engine import Engine, Sampling  # noqa: E402

PROMPT = "How long are backups kept?"
MAX_TOKENS = 16


def random_adapter(tiny_model, path, seed):
    """A LoRA adapter with random (not zero) weights: it changes the answers without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(path)
    return path


def prompt_ids(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def offline_answer(tiny_model, adapter, ids, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to("cuda")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        output = model.eval().generate(
            torch.tensor([ids], device="cuda"),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def test_the_engine_on_the_gpu_answers_as_peft_does(tiny_model, tmp_path):
    adapters = {name: random_adapter(tiny_model, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    engine = Engine(str(tiny_model), "tiny", cache_dir=tmp_path / "cache", device="auto")
    engine.load_base()
    assert engine.device.type == "cuda" and engine.base.dtype == torch.bfloat16
    for name, path in adapters.items():
        engine.load_adapter(name, str(path))
    ids = prompt_ids(engine.tokenizer)
    expected = {"tiny": offline_answer(tiny_model, None, ids, engine.tokenizer)}
    expected |= {name: offline_answer(tiny_model, path, ids, engine.tokenizer) for name, path in adapters.items()}
    assert len(set(expected.values())) == 3, expected

    greedy = Sampling(max_tokens=MAX_TOKENS, temperature=0)
    for name in expected:
        assert engine.generate(name, ids, greedy).text.strip() == expected[name]

    answers: dict[int, tuple[str, str]] = {}

    def ask(index, name):
        answers[index] = (name, engine.generate(name, ids, greedy).text.strip())

    threads = [threading.Thread(target=ask, args=(i, ("a", "b", "tiny")[i % 3])) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(text == expected[name] for name, text in answers.values()), answers
    assert torch.cuda.max_memory_allocated() > 0
