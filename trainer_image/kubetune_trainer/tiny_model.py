"""A tiny Llama-style causal LM with a tokenizer trained offline: what the demo and the tests train.

It is an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template), so every loading path in the trainer and the server
is the real one. Nothing is downloaded. The same seed gives byte-identical files.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .data import CHATML_TEMPLATE

BOS, EOS, IM_START, PAD = "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD]


@dataclass(frozen=True)
class TinyModelConfig:
    arch: str = "llama"
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as current Llama/Qwen models have
    max_positions: int = 2048


def bundled_corpus() -> str:
    return (Path(__file__).parent / "data" / "tiny_corpus.txt").read_text()


def train_tokenizer(vocab_size: int, extra_text: str = ""):
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) trained on the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = bundled_corpus() + extra_text
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,  # with {% generation %}: loss masks come from the template
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_model(config: TinyModelConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.arch != "llama":
        raise ValueError(f"unknown architecture {config.arch!r}; supported: llama")
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # A wider init than the usual 0.02: with a frozen random output head, 0.02 caps the logit
        # range so low that no adapter could lower the loss much below log(vocab).
        initializer_range=0.1,
        dtype="float32",
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config)


def build_tiny_model(out: Path, config: TinyModelConfig = TinyModelConfig()) -> Path:
    """Write the model folder to `out` atomically (a complete folder or none at all)."""
    out = Path(out)
    tokenizer = train_tokenizer(config.vocab_size)
    model = build_model(config, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the folder is shared (PVCs, images)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
