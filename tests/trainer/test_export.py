"""GGUF export of the merged model: names, rope layout, metadata and tokenizer, then the file itself,
read back with llama.cpp's own reader (the `gguf` package) and compared tensor by tensor."""

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_trainer import export  # noqa: E402
from kubetune_trainer.export import ExportError, LlamaShape  # noqa: E402


def needs_gguf():
    return pytest.importorskip(
        "gguf", reason="NOT RUN: GGUF round trip needs the gguf package (llama.cpp's reader and writer)"
    )


def shape_of(folder) -> LlamaShape:
    return LlamaShape.from_config(json.loads((folder / "config.json").read_text()))


# --- the rotary layout ---------------------------------------------------------------------------


def interleaved_rope(x, position: int, theta: float):
    """llama.cpp's rope (GGML_ROPE_TYPE_NORMAL): adjacent pairs (2i, 2i+1) rotate by position x theta^(-2i/d)."""
    d = x.shape[-1]
    angles = position * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angles.cos() - odd * angles.sin()
    out[..., 1::2] = odd * angles.cos() + even * angles.sin()
    return out


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (2, 1)])
def test_permuted_projections_give_llama_cpp_the_attention_scores_of_the_hugging_face_model(heads, kv_heads):
    """The permutation is right iff llama.cpp's interleaved rope on the permuted weights gives every
    query-key score the Hugging Face model computes with its half-split rope on the originals."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    head_dim, hidden, theta = 8, 32, 10000.0
    wq = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    wk = torch.randn(kv_heads * head_dim, hidden, dtype=torch.float64)
    x_q, x_k = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    p_q, p_k = 7, 3

    def hf_rotated(weight, x, n, position):
        v = (weight @ x).view(1, n, 1, head_dim)
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.cat([position * inv_freq] * 2)
        rotated, _ = apply_rotary_pos_emb(v, v, angles.cos()[None, None], angles.sin()[None, None], unsqueeze_dim=1)
        return rotated.view(n, head_dim)

    def cpp_rotated(weight, x, n, position):
        permuted = torch.from_numpy(export.rope_permute(weight.numpy(), n))
        return interleaved_rope((permuted @ x).view(n, head_dim), position, theta)

    group = heads // kv_heads
    hf_q, hf_k = hf_rotated(wq, x_q, heads, p_q), hf_rotated(wk, x_k, kv_heads, p_k)
    cpp_q, cpp_k = cpp_rotated(wq, x_q, heads, p_q), cpp_rotated(wk, x_k, kv_heads, p_k)
    hf_scores = torch.stack([hf_q[h] @ hf_k[h // group] for h in range(heads)])
    cpp_scores = torch.stack([cpp_q[h] @ cpp_k[h // group] for h in range(heads)])
    assert torch.allclose(hf_scores, cpp_scores, atol=1e-9)
    # ... and not by accident: the unpermuted weights under llama.cpp's rope give other scores.
    plain_q = interleaved_rope((wq @ x_q).view(heads, head_dim), p_q, theta)
    plain_k = interleaved_rope((wk @ x_k).view(kv_heads, head_dim), p_k, theta)
    plain = torch.stack([plain_q[h] @ plain_k[h // group] for h in range(heads)])
    assert not torch.allclose(hf_scores, plain, atol=1e-3)


def test_unpermute_undoes_permute():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = export.rope_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        assert np.array_equal(export.rope_unpermute(permuted, heads), weight)


# --- names, metadata, tokenizer ------------------------------------------------------------------


def test_every_tiny_llama_tensor_has_its_llama_cpp_name(tiny_model):
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as weights:
        names = {key: export.tensor_name(key) for key in weights.keys()}  # noqa: SIM118
    assert names["model.embed_tokens.weight"] == "token_embd.weight"
    assert names["model.norm.weight"] == "output_norm.weight"
    assert names["lm_head.weight"] == "output.weight"
    expected = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in (0, 1):
        for hf, cpp in expected.items():
            assert names[f"model.layers.{layer}.{hf}.weight"] == f"blk.{layer}.{cpp}.weight"
    assert len(set(names.values())) == len(names) == 3 + 2 * len(expected)


def test_a_tensor_llama_cpp_has_no_place_for_stops_the_export():
    assert export.tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None  # a buffer, not a weight
    with pytest.raises(ExportError, match="'model.layers.0.mlp.experts.0.w1.weight' has no place"):
        export.tensor_name("model.layers.0.mlp.experts.0.w1.weight")


def test_model_metadata_is_what_llama_cpp_reads(tiny_model):
    keys = export.model_metadata(shape_of(tiny_model), "support", "q8_0")
    assert keys == {
        "general.name": "support",
        "general.file_type": 7,
        "general.quantization_version": 2,
        "llama.vocab_size": 1024,
        "llama.context_length": 2048,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 16,
    }
    assert export.model_metadata(shape_of(tiny_model), "support", "f16")["general.file_type"] == 1


def test_llama3_rope_factors_reproduce_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_parameters=rope, architectures=["LlamaForCausalLM"]
    )
    shape = LlamaShape.from_config(config.to_dict())
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim)
    factors = export.llama3_rope_factors(shape)
    assert factors.shape == (shape.head_dim // 2,) and factors.dtype == np.float32
    assert {1.0, 32.0} <= set(factors.tolist())  # some frequencies kept, some divided, some between
    assert np.allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert "llama.rope.scaling.type" not in export.model_metadata(shape, "x", "f16")  # it travels as a tensor


def test_rope_scaling_llama_cpp_is_not_told_about_is_refused():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    with pytest.raises(ExportError, match="rope scaling 'yarn' has no GGUF export here"):
        export.model_metadata(LlamaShape.from_config(config), "x", "f16")


def test_the_tokenizer_and_chat_template_travel_in_the_metadata(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    keys = export.tokenizer_metadata(tiny_model, 1024)
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "gpt2"
    assert keys["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(1024)))
    special = set(tokenizer.all_special_ids)
    assert keys["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(1024)]
    merges = json.loads((tiny_model / "tokenizer.json").read_text())["model"]["merges"]
    assert keys["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert keys["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert keys["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert keys["tokenizer.ggml.pad_token_id"] == tokenizer.pad_token_id
    assert keys["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds no bos: nor may llama.cpp
    assert tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id


def test_the_chat_template_renders_as_hugging_face_renders_it(tiny_model):
    """Without the {% generation %} markers only Hugging Face's renderer knows, and with the same text."""
    import jinja2
    from transformers import AutoTokenizer

    template = export.tokenizer_metadata(tiny_model, 1024)["tokenizer.chat_template"]
    assert "generation" not in template.replace("add_generation_prompt", "")
    messages = [{"role": "user", "content": "How long are backups kept?"}, {"role": "assistant", "content": "30 days."}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    expected = AutoTokenizer.from_pretrained(tiny_model).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected


def model_copy(tiny_model, tmp_path, config_changes=None, tokenizer_changes=None):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name, changes in (("config.json", config_changes), ("tokenizer.json", tokenizer_changes)):
        if changes:
            document = json.loads((folder / name).read_text())
            document.update(changes)
            (folder / name).write_text(json.dumps(document))
    return folder


def test_the_tiny_llama_can_be_exported(tiny_model):
    assert export.gguf_problem(tiny_model) is None


@pytest.mark.parametrize(
    "config, tokenizer, message",
    [
        ({"architectures": ["Qwen2ForCausalLM"]}, None, "GGUF export writes Llama-family models"),
        (
            None,
            {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}},
            "GGUF export writes byte-level BPE tokenizers",
        ),
        (
            None,
            {
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": "\\s+"}},
                        {"type": "ByteLevel", "use_regex": False},
                    ],
                }
            },
            "neither GPT-2's nor Llama 3's",
        ),
        ({"vocab_size": 512}, None, "the tokenizer has token id 1023 but the model's embedding has 512 rows"),
    ],
)
def test_what_cannot_be_exported_is_said_before_training(tiny_model, tmp_path, config, tokenizer, message):
    problem = export.gguf_problem(model_copy(tiny_model, tmp_path, config, tokenizer))
    assert problem is not None and message in problem and "\n" not in problem


def test_llama3_pre_tokenizer_is_named_llama_bpe(tiny_model, tmp_path):
    split = {"type": "Split", "pattern": {"Regex": export.LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    folder = model_copy(
        tiny_model, tmp_path, None, {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}}
    )
    assert export.tokenizer_metadata(folder, 1024)["tokenizer.ggml.pre"] == "llama-bpe"


def test_storage_types_and_sizes():
    assert export.storage_type((64,), "q8_0") == "f32"
    assert export.storage_type((128, 64), "q8_0") == "q8_0"
    assert export.storage_type((128, 48), "q8_0") == "f16"  # 48 is not a whole number of blocks
    assert export.storage_type((128, 48), "f16") == "f16"
    assert export.stored_bytes((128, 64), "q8_0") == 128 * 2 * 34
    assert export.stored_bytes((128, 64), "f16") == 128 * 64 * 2
    assert export.stored_bytes((64,), "f32") == 256


# --- the file, read back ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_model(tiny_model, tmp_path_factory):
    """The tiny Llama with a LoRA adapter of random (non-zero) weights on every linear layer, merged
    and saved as the trainer saves it."""
    needs_gguf()  # only the round trips use it
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {name: value.clone() for name, value in base.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    merged = get_peft_model(base, config).merge_and_unload()
    folder = tmp_path_factory.mktemp("merged")
    merged.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    weights = {name: value.detach().float().numpy() for name, value in merged.state_dict().items()}
    changed = [name for name in weights if not np.array_equal(weights[name], before[name].float().numpy())]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed
    return folder, weights


def gguf_names(weights: dict) -> dict[str, str]:
    """Hugging Face name -> GGUF name, for the tensors that are weights."""
    return {hf: name for hf in weights if (name := export.tensor_name(hf)) is not None}


def read_back(path):
    gguf = needs_gguf()
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return gguf, fields, {tensor.name: tensor for tensor in reader.tensors}


def as_hf(name: str, values: np.ndarray, shape: LlamaShape) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return export.rope_unpermute(values, shape.heads)
    if name.endswith("attn_k.weight"):
        return export.rope_unpermute(values, shape.kv_heads)
    return values


def test_f16_round_trip_is_exact(merged_model, tmp_path):
    folder, weights = merged_model
    needs_gguf()
    path = export.write_gguf(folder, tmp_path / "model-f16.gguf", "f16", "support")
    gguf, fields, tensors = read_back(path)
    shape = shape_of(folder)
    assert set(tensors) == set(gguf_names(weights).values())
    for hf_name, name in gguf_names(weights).items():
        tensor, expected = tensors[name], weights[hf_name]
        if expected.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(tensor.data), expected), hf_name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            values = as_hf(tensor.name, np.asarray(tensor.data), shape)
            assert values.shape == expected.shape, hf_name
            assert np.array_equal(values, expected.astype(np.float16)), hf_name
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 1
    for key, value in export.model_metadata(shape, "support", "f16").items():
        assert fields[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    tokenizer = export.tokenizer_metadata(folder, shape.vocab_size)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert fields[key] == tokenizer[key], key
    assert fields["tokenizer.ggml.token_type"] == tokenizer["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert "{% generation %}" not in fields["tokenizer.chat_template"]


def test_q8_0_round_trip_is_within_half_a_step_of_every_block(merged_model, tmp_path):
    folder, weights = merged_model
    needs_gguf()
    path = export.write_gguf(folder, tmp_path / "model-q8_0.gguf", "q8_0", "support")
    gguf, fields, tensors = read_back(path)
    shape = shape_of(folder)
    assert fields["general.file_type"] == 7 and fields["general.quantization_version"] == 2
    assert path.stat().st_size < 0.6 * sum(4 * value.size for value in weights.values())
    assert set(tensors) == set(gguf_names(weights).values())
    for hf_name, name in gguf_names(weights).items():
        tensor, expected = tensors[name], weights[hf_name]
        if expected.ndim == 1:
            assert np.array_equal(np.asarray(tensor.data), expected), hf_name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, hf_name
        values = as_hf(tensor.name, gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), shape)
        assert values.shape == expected.shape, hf_name
        blocks = expected.reshape(-1, export.Q8_0_BLOCK)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one quantization step per block
        error = np.abs(values.reshape(-1, export.Q8_0_BLOCK) - blocks)
        # Rounding to the nearest step (half a step), plus the step itself stored as f16 (relative
        # error 2^-11, times at most 127 steps).
        assert (error <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), hf_name
        assert error.max() > 0  # quantized, not stored as it was


def test_the_trainer_exports_merged_and_gguf_beside_the_adapter(tiny_model, tmp_path):
    """`kubetune train` of a job with export [merged, gguf]: the merged folder, one GGUF per type
    published under the output, and the result naming each with its size and digest."""
    import hashlib
    import subprocess
    import sys

    from tests.trainer.support import write_config

    needs_gguf()
    config = make_config_with_export(tiny_model, tmp_path, ["merged", "gguf"], gguf={"types": ["f16", "q8_0"]})
    path = write_config(config, tmp_path / "c.json")
    command = [sys.executable, "-m", "kubetune", "train", "-f", str(path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    output = tmp_path / "output"
    result = json.loads((tmp_path / "termination-log").read_text())["adapter"]
    assert result["mergedUri"].endswith("/output/merged") and (output / "merged" / "_COMPLETE").is_file()
    assert [entry["type"] for entry in result["gguf"]] == ["f16", "q8_0"]
    for entry in result["gguf"]:
        file = output / f"model-{entry['type']}.gguf"
        assert entry["uri"].endswith(f"/output/model-{entry['type']}.gguf")
        assert entry["sizeBytes"] == file.stat().st_size
        assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    _, _, tensors = read_back(output / "model-f16.gguf")
    from safetensors.torch import load_file

    merged = load_file(str(output / "merged" / "model.safetensors"))
    down = tensors["blk.1.ffn_down.weight"]
    assert np.array_equal(
        np.asarray(down.data), merged["model.layers.1.mlp.down_proj.weight"].numpy().astype(np.float16)
    )
    assert not list(output.glob(".*"))  # no staging left behind


def test_a_merged_export_without_gguf_needs_no_gguf_package(tiny_model, tmp_path):
    """export [merged] is what mergeWeights always was: the merged folder, no GGUF file."""
    from kubetune_trainer import train

    config = make_config_with_export(tiny_model, tmp_path, ["merged"])
    assert train.run_training(config) == 0
    result = json.loads((tmp_path / "termination-log").read_text())["adapter"]
    assert result["mergedUri"].endswith("/output/merged") and "gguf" not in result
    assert (tmp_path / "output" / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "output").glob("*.gguf"))


def make_config_with_export(tiny_model, tmp_path, exports, **output):
    from tests.trainer.support import make_config

    config = make_config(tiny_model, tmp_path, steps=3, every_save=1000)
    fields = {"uri": config.spec.output.uri, "export": exports, **output}
    config.spec.output = config.spec.output.model_validate(fields)
    return config
