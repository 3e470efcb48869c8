"""Continuous batching in the serving engine, on the tiny model: requests for the base model and for
several adapters (ranks 4 to 16, attention, MLP and output-head targets, rsLoRA, and a DoRA adapter, which is
served grouped by adapter) generated together give each the tokens it gets alone and the tokens
PEFT's own `generate` gives; streaming, stop strings and seeds keep working in a batch; an unload
waits for the requests using the adapter, and refuses new ones at once."""

import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_serve.engine import Engine, EngineError, Sampling  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nHow long are backups kept?<|im_end|>\n<|im_start|>assistant\n",
    "hello",
    "The quick brown fox jumps over the lazy dog and keeps running",
]
ADAPTERS = {  # name: LoraConfig keyword arguments
    "attn-r4": dict(r=4, target_modules=["q_proj", "v_proj", "lm_head"]),
    "all-r16": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-rs8": dict(r=8, target_modules=["gate_proj", "down_proj"], use_rslora=True),
    "dora-r8": dict(r=8, target_modules=["q_proj", "v_proj"], use_dora=True),
}
GREEDY = Sampling(max_tokens=20, temperature=0, ignore_eos=True)


def make_adapter(tiny: Path, out: Path, seed: int, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    config = LoraConfig(lora_alpha=2 * lora["r"], init_lora_weights=False, **lora)
    model = get_peft_model(base, config)
    if lora.get("use_dora"):  # a magnitude that is not the weight's own norm, so DoRA changes the output
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.data.mul_(1.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching-adapters")
    return {
        name: make_adapter(tiny_model, root / name, seed, **lora) for seed, (name, lora) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def engine(tiny_model, adapters, tmp_path_factory) -> Engine:
    served = Engine(str(tiny_model), "tiny", cache_dir=tmp_path_factory.mktemp("batching-cache"), max_adapters=8)
    served.load_base()
    for name, path in adapters.items():
        served.load_adapter(name, f"file://{path}")
    return served


def peft_tokens(tiny: Path, adapter: Path | None, prompt_ids: list[int], steps: int) -> list[int]:
    """What PEFT's own model gives with transformers' greedy generate (the reference)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_plain_lora_is_grouped_and_dora_is_served_by_adapter(engine):
    grouping = {adapter.name: adapter.grouping for adapter in engine.adapters()}
    assert grouping == {
        "attn-r4": "grouped",
        "all-r16": "grouped",
        "mlp-rs8": "grouped",
        "dora-r8": "by adapter (DoRA adapter)",
    }


def test_a_mixed_batch_gives_every_request_what_it_gets_alone_and_what_peft_gives(engine, tiny_model, adapters):
    models = ["tiny", *ADAPTERS]
    jobs = [(model, prompt) for prompt in PROMPTS for model in models]
    alone = {job: engine.generate(job[0], engine.encode(job[1]), GREEDY) for job in jobs}
    pending = {job: engine.start(job[0], engine.encode(job[1]), GREEDY) for job in jobs}
    together = {job: waiting.result() for job, waiting in pending.items()}
    for job in jobs:
        assert together[job].text == alone[job].text, job
        assert together[job].completion_tokens == alone[job].completion_tokens == GREEDY.max_tokens
    assert len({alone[(model, PROMPTS[0])].text for model in models}) == len(models)  # each adapter counts
    ids = engine.encode(PROMPTS[0])
    for name in ADAPTERS:
        reference = engine.decode(peft_tokens(tiny_model, adapters[name], ids, GREEDY.max_tokens))
        assert alone[(name, PROMPTS[0])].text == reference, name
    assert alone[("tiny", PROMPTS[0])].text == engine.decode(peft_tokens(tiny_model, None, ids, GREEDY.max_tokens))


def test_streaming_stop_strings_and_seeds_hold_in_a_batch(engine):
    ids = engine.encode(PROMPTS[0])
    free = engine.generate("attn-r4", ids, Sampling(max_tokens=30, temperature=0))
    stop = free.text[5:8]
    assert stop and stop not in free.text[:5]
    seeded = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    seeded_alone = engine.generate("all-r16", ids, seeded).text
    pieces: dict[int, list[str]] = {0: [], 1: []}
    runs = [
        engine.start("attn-r4", ids, Sampling(max_tokens=30, temperature=0, stop=[stop]), on_text=pieces[0].append),
        engine.start("tiny", ids, Sampling(max_tokens=30, temperature=0), on_text=pieces[1].append),
        engine.start("all-r16", ids, seeded),
        engine.start("mlp-rs8", ids, Sampling(max_tokens=30, temperature=1.0)),  # a sampled neighbour
    ]
    stopped, base, seeded_batched, _ = (run.result() for run in runs)
    assert stopped.text == free.text[: free.text.index(stop)] and stopped.finish_reason == "stop"
    assert "".join(pieces[0]) == stopped.text and "".join(pieces[1]) == base.text
    assert len(pieces[1]) > 1  # streamed piece by piece, not at the end
    assert seeded_batched.text == seeded_alone


def test_an_unload_waits_for_the_requests_using_the_adapter_and_refuses_new_ones(engine, adapters):
    ids = engine.encode(PROMPTS[1])
    engine.load_adapter("leaving", f"file://{adapters['attn-r4']}")
    expected = engine.generate("leaving", ids, Sampling(max_tokens=200, temperature=0, ignore_eos=True)).text
    first_piece = threading.Event()
    running = engine.start(
        "leaving", ids, Sampling(max_tokens=200, temperature=0, ignore_eos=True), on_text=lambda _: first_piece.set()
    )
    assert first_piece.wait(60)
    unloading = threading.Thread(target=engine.unload_adapter, args=("leaving",))
    unloading.start()
    for _ in range(500):  # bounded: until the name is gone for new requests
        if "leaving" not in {adapter.name for adapter in engine.adapters()}:
            break
        threading.Event().wait(0.01)
    with pytest.raises(EngineError) as refused:
        engine.start("leaving", ids, GREEDY)
    assert refused.value.status == 404
    finished = running.result()
    unloading.join(60)
    assert not unloading.is_alive()
    assert finished.text == expected and finished.completion_tokens == 200  # it ran to the end, with its adapter
    assert "leaving" not in {adapter.name for adapter in engine.adapters()}
