"""GGUF export: the merged model as one file that llama.cpp, Ollama and LM Studio load as it is.

A GGUF file is a header of typed key/values (the architecture's hyperparameters, the tokenizer, the
chat template) followed by named tensors. This module writes Llama-family models (Hugging Face
`LlamaForCausalLM`, `MistralForCausalLM`) as llama.cpp's `llama` architecture, from a saved
Hugging Face folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json): the
merged model the trainer has just written, or a full fine-tune's weights. Tensors are read one at
a time from the safetensors files and written one at a time, so a 70B export needs the memory of
its largest tensor, not of the model.

What a conversion must get right, and where it is done here:

* names: Hugging Face's `model.layers.N.self_attn.q_proj.weight` is llama.cpp's
  `blk.N.attn_q.weight` (`tensor_name`); a tensor with no llama.cpp name stops the export rather
  than being dropped;
* rotary embeddings: Hugging Face's Llama rotates the two halves of each head
  (`rotate_half`), llama.cpp rotates adjacent pairs, so the rows of the query and key projections
  are reordered within each head (`rope_permute`; `rope_unpermute` undoes it);
* Llama 3.1's long-context rope is a per-frequency factor table, written as `rope_freqs.weight`
  (`llama3_rope_factors`);
* storage: norms (1-D) stay float32 as llama.cpp expects; matrices are f16, or q8_0 (blocks of 32
  weights sharing one f16 scale) where a row divides into blocks, else f16;
* the tokenizer: byte-level BPE vocabularies (GPT-2 and Llama 3 style: `tokenizer.ggml.model`
  gpt2, with merges and the pre-tokenizer's name), special tokens as control tokens, bos/eos/pad
  ids, and the chat template, without the `{% generation %}` markers only Hugging Face's
  renderer knows (they mark the assistant's tokens for training and render nothing).

The `gguf` package (llama.cpp's own reader and writer) is imported only by `write_gguf`: everything
before it is pure, and the trainer checks a model before it trains (`gguf_problem`).
"""

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune import storage
from kubetune.api.finetunejob import gguf_architecture_problem
from kubetune.contract import gguf_file_name

ARCHITECTURE = "llama"
# llama.cpp's `general.file_type` (enum llama_ftype): what most of the file's matrices are.
FILE_TYPES = {"f16": 1, "q8_0": 7}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the layout of the quantized blocks
Q8_0_BLOCK = 32
# llama.cpp's token types (enum llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# Byte-level pre-tokenizers llama.cpp knows by name: GPT-2's built-in split, and Llama 3's regex.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_VOCAB = 1 << 20  # tokens: the largest vocabularies in use have about 262k
MAX_CHAT_TEMPLATE = 256 * 1024  # characters: a template is a page of Jinja, not a file of data
_GENERATION_TAG = re.compile(r"{%-?\s*(?:end)?generation\s*-?%}")

_LAYER_TENSORS = {
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
_MODEL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class ExportError(ValueError):
    """The model cannot be written as GGUF; the message says why and what to do instead."""


# --- the model's hyperparameters -----------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The config.json values a llama.cpp `llama` model is described by."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    rope_scaling: dict | None

    @classmethod
    def from_config(cls, config: dict) -> "LlamaShape":
        """From config.json, which is the user's file: a missing or malformed value is an ExportError."""
        problem = gguf_architecture_problem(config.get("architectures"))
        if problem:
            raise ExportError(problem)
        try:
            shape = cls._read(config)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            raise ExportError(
                f"config.json does not describe a Llama model ({type(error).__name__}: {error})"
            ) from None
        if shape.head_dim % 2 or shape.heads % shape.kv_heads or min(shape.layers, shape.vocab_size) < 1:
            raise ExportError(
                f"config.json describes no Llama model llama.cpp can run: head_dim {shape.head_dim}, "
                f"{shape.heads} heads, {shape.kv_heads} key/value heads"
            )
        return shape

    @classmethod
    def _read(cls, config: dict) -> "LlamaShape":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        # transformers 5 keeps rope settings in rope_parameters; older configs at the top level.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            context_length=int(config.get("max_position_embeddings") or 2048),
            rope_theta=float(theta),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_scaling=scaling,
        )


def model_metadata(shape: LlamaShape, name: str, gguf_type: str) -> dict[str, Any]:
    """The `general.*` and `llama.*` keys llama.cpp reads to build the graph (general.architecture
    is the writer's own). Integers are written as uint32, floats as float32."""
    arch = ARCHITECTURE
    keys: dict[str, Any] = {
        "general.name": name,
        "general.file_type": FILE_TYPES[gguf_type],
        f"{arch}.vocab_size": shape.vocab_size,
        f"{arch}.context_length": shape.context_length,
        f"{arch}.embedding_length": shape.hidden_size,
        f"{arch}.block_count": shape.layers,
        f"{arch}.feed_forward_length": shape.intermediate_size,
        f"{arch}.attention.head_count": shape.heads,
        f"{arch}.attention.head_count_kv": shape.kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": shape.rms_norm_eps,
        f"{arch}.rope.freq_base": shape.rope_theta,
        f"{arch}.rope.dimension_count": shape.head_dim,
    }
    if gguf_type != "f16":
        keys["general.quantization_version"] = QUANTIZATION_VERSION
    if shape.head_dim != shape.hidden_size // shape.heads:  # e.g. Mistral NeMo: heads wider than hidden/heads
        keys[f"{arch}.attention.key_length"] = shape.head_dim
        keys[f"{arch}.attention.value_length"] = shape.head_dim
    scaling = shape.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        keys[f"{arch}.rope.scaling.type"] = "linear"
        keys[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif kind not in (None, "llama3"):  # llama3's factors travel as the rope_freqs tensor
        raise ExportError(
            f"rope scaling {kind!r} has no GGUF export here (default, linear and llama3 do); "
            "export merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return keys


def llama3_rope_factors(shape: LlamaShape) -> np.ndarray:
    """Llama 3.1's per-frequency divisors of the rotary frequencies (llama.cpp's rope_freqs):
    high frequencies (short wavelengths) are kept, low ones divided by `factor`, and the band
    between interpolated smoothly, as Meta's reference `apply_scaling` defines."""
    scaling = shape.rope_scaling or {}
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    frequencies = 1.0 / shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float64) / shape.head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = (original / wavelengths - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, between))
    return factors.astype(np.float32)


# --- tensors -------------------------------------------------------------------------------------


def tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor; None for buffers that are not weights
    (rotary inverse frequencies); ExportError for a tensor llama.cpp's `llama` has no place for."""
    if hf_name in _MODEL_TENSORS:
        return _MODEL_TENSORS[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    match = _LAYER_NAME.match(hf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    raise ExportError(
        f"tensor {hf_name!r} has no place in llama.cpp's llama architecture; "
        "export merged and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the output rows of a query or key projection from Hugging Face's half-split rotary
    layout to llama.cpp's interleaved one. Within each head of `d` rows, HF pairs row i with row
    i + d/2; llama.cpp pairs rows 2i and 2i + 1. So row i of the first half goes to 2i and row i of
    the second half to 2i + 1 (for keys, `heads` is the number of key/value heads)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `rope_permute`: llama.cpp's interleaved rows back to Hugging Face's layout."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_heads(hf_name: str, shape: LlamaShape) -> int | None:
    """The heads whose rows `rope_permute` reorders: queries' and keys' weights and biases; else None."""
    if ".self_attn.q_proj." in hf_name:
        return shape.heads
    if ".self_attn.k_proj." in hf_name:
        return shape.kv_heads
    return None


def gguf_weight(hf_name: str, weight: np.ndarray, shape: LlamaShape) -> np.ndarray:
    """A tensor's values as llama.cpp expects them (float32; queries and keys reordered)."""
    values = np.asarray(weight, dtype=np.float32)
    heads = rope_heads(hf_name, shape)
    return values if heads is None else rope_permute(values, heads)


def storage_type(tensor_shape: tuple[int, ...], gguf_type: str) -> str:
    """How a tensor is stored: 1-D tensors (norms, rope factors) as f32, matrices as `gguf_type`;
    q8_0 needs rows that divide into blocks of 32 (others fall back to f16)."""
    if len(tensor_shape) < 2:
        return "f32"
    if gguf_type == "q8_0" and tensor_shape[-1] % Q8_0_BLOCK:
        return "f16"
    return gguf_type


def stored_bytes(tensor_shape: tuple[int, ...], kind: str) -> int:
    """The size of a tensor in the file: f32 4 bytes a value, f16 2, q8_0 34 per block of 32."""
    count = math.prod(tensor_shape)
    if kind == "q8_0":
        return count // Q8_0_BLOCK * (2 + Q8_0_BLOCK)
    return count * (4 if kind == "f32" else 2)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: where its values come from (a safetensors file and key, or nothing
    for the computed rope factors), its GGUF name, shape (numpy order) and storage type."""

    source: Path | None
    hf_name: str
    name: str
    shape: tuple[int, ...]
    kind: str


def tensor_plan(folder: Path, shape: LlamaShape, gguf_type: str) -> list[PlannedTensor]:
    """Every tensor to write, in file order, from the safetensors headers alone (no values read),
    plus the rope factors when Llama 3 scaling needs them."""
    from safetensors import safe_open

    plan = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = tensor_name(key)
                if name is not None:
                    dims = tuple(weights.get_slice(key).get_shape())
                    heads = rope_heads(key, shape)
                    if heads is not None and dims[0] != heads * shape.head_dim:
                        raise ExportError(
                            f"{key} has {dims[0]} rows, not {heads} heads x {shape.head_dim} as config.json says"
                        )
                    plan.append(PlannedTensor(path, key, name, dims, storage_type(dims, gguf_type)))
    if not plan:
        raise ExportError(f"{folder}: no *.safetensors weights to export")
    if _uses_llama3_rope(shape):
        plan.append(PlannedTensor(None, "", "rope_freqs.weight", (shape.head_dim // 2,), "f32"))
    return plan


def planned_values(tensor: PlannedTensor, shape: LlamaShape) -> np.ndarray:
    """The float32 values of one planned tensor, as llama.cpp expects them, read alone from its
    file (bf16 has no numpy type: torch reads it and widens it)."""
    if tensor.source is None:
        return llama3_rope_factors(shape)
    from safetensors import safe_open

    with safe_open(str(tensor.source), framework="pt") as weights:
        return gguf_weight(tensor.hf_name, weights.get_tensor(tensor.hf_name).float().numpy(), shape)


def _uses_llama3_rope(shape: LlamaShape) -> bool:
    scaling = shape.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type")) == "llama3"


# --- the tokenizer -------------------------------------------------------------------------------


def tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` keys and the chat template, from tokenizer.json, tokenizer_config.json
    and chat_template.jinja. The token list is padded to the embedding's row count with unused
    `[PADn]` tokens (llama.cpp wants one token per row). Only byte-level BPE vocabularies are
    written: a SentencePiece one (tokenizer.model, Llama 2) stops the export with that reason."""
    tokenizer = _read_json(folder / "tokenizer.json")
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ExportError(f"a vocabulary of {vocab_size} tokens is beyond any model ({MAX_VOCAB} at most)")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(tokenizer):
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (Llama 3 style); this one is "
            f"{model.get('type', 'unknown')} without byte-level pre-tokenization (SentencePiece, Llama 2 style): "
            "export merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    ids: dict[int, str] = {int(i): token for token, i in (model.get("vocab") or {}).items()}
    special: set[int] = set()
    for added in tokenizer.get("added_tokens") or []:
        ids[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    if ids and (max(ids) >= vocab_size or min(ids) < 0):
        raise ExportError(
            f"the tokenizer has token id {max(ids) if max(ids) >= vocab_size else min(ids)} but the model's "
            f"embedding has {vocab_size} rows; resize the embedding to the tokenizer before exporting"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = ids.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(UNUSED if token is None else CONTROL if i in special else NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        if not added.get("special"):
            types[int(added["id"])] = USER_DEFINED
    by_text = {token: i for i, token in ids.items()}
    keys: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer(tokenizer),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [_merge_text(merge) for merge in model.get("merges") or []],
    }
    for role in ("bos", "eos", "pad", "unk"):
        token_id = by_text.get(_token_text(config.get(f"{role}_token")))
        if token_id is not None:
            keys[f"tokenizer.ggml.{role}_token_id"] = token_id
    keys["tokenizer.ggml.add_bos_token"] = _adds_bos(tokenizer, config)
    if isinstance(config.get("add_eos_token"), bool):
        keys["tokenizer.ggml.add_eos_token"] = config["add_eos_token"]
    template = chat_template(folder, config)
    if template:
        keys["tokenizer.chat_template"] = template
    return keys


def chat_template(folder: Path, config: dict) -> str | None:
    """The default chat template, for llama.cpp's renderer: chat_template.jinja (transformers 5),
    else tokenizer_config.json's (a string, or the one named "default" of a list); None without one."""
    path = folder / "chat_template.jinja"
    template = path.read_text()[: MAX_CHAT_TEMPLATE + 1] if path.is_file() else config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        return None
    if len(template) > MAX_CHAT_TEMPLATE:
        raise ExportError(f"the chat template is over {MAX_CHAT_TEMPLATE} characters; no GGUF carries one that long")
    return _GENERATION_TAG.sub("", template)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path.name} is missing from the model folder; a GGUF export needs it")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ExportError(f"{path.name} is not readable JSON ({type(error).__name__})") from None
    return value if isinstance(value, dict) else {}


def _pre_tokenizer_parts(tokenizer: dict) -> list[dict]:
    """The pre-tokenizer's steps: the members of a Sequence, or the one step."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    return [part for part in parts if isinstance(part, dict)]


def _byte_level(tokenizer: dict) -> bool:
    return any(part.get("type") == "ByteLevel" for part in _pre_tokenizer_parts(tokenizer))


def _pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name of the regex that splits text before BPE: `gpt2` for GPT-2's built-in split
    (ByteLevel with use_regex), `llama-bpe` for Llama 3's; another one stops the export, since
    llama.cpp would split differently and the model would see tokens it was not trained on."""
    parts = _pre_tokenizer_parts(tokenizer)
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt2"
    splits = [part for part in parts if part.get("type") == "Split"]
    patterns = [(split.get("pattern") or {}).get("Regex") for split in splits]
    if patterns == [LLAMA3_SPLIT]:
        return "llama-bpe"
    raise ExportError(
        "the tokenizer's pre-tokenizer is neither GPT-2's nor Llama 3's, and llama.cpp would split text "
        "differently; export merged and convert it with llama.cpp's convert_hf_to_gguf.py"
    )


def _adds_bos(tokenizer: dict, config: dict) -> bool:
    """Whether encoding a prompt starts it with the bos token, as transformers does it: the
    tokenizer config's explicit add_bos_token, else the post-processor's template (Llama 3 puts
    bos there); llama.cpp must do the same or every prompt differs from training by one token."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    processor = tokenizer.get("post_processor") or {}
    steps = (processor.get("processors") or []) if processor.get("type") == "Sequence" else [processor]
    bos = _token_text(config.get("bos_token"))
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return bos is not None and (first.get("SpecialToken") or {}).get("id") == bos
    return False


def _merge_text(merge: Any) -> str:
    """tokenizers writes a merge as "a b" (older files) or ["a", "b"] (newer); GGUF as "a b"."""
    return " ".join(merge) if isinstance(merge, list) else str(merge)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --- checks and writing ----------------------------------------------------------------------------


def gguf_problem(model_dir: Path) -> str | None:
    """Why the model in `model_dir` cannot be exported as GGUF, or None: its architecture, rope
    and tokenizer, checked from config.json and the tokenizer files before any training."""
    try:
        shape = LlamaShape.from_config(_read_json(model_dir / "config.json"))
        model_metadata(shape, "check", "f16")
        tokenizer_metadata(model_dir, shape.vocab_size)
    except ExportError as error:
        return str(error)
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a tokenizer file of another shape
        return f"the tokenizer files cannot be read for a GGUF export ({type(error).__name__}: {error})"
    return None


def write_gguf(folder: Path, out: Path, gguf_type: str, name: str) -> Path:
    """Write the Hugging Face model in `folder` as one GGUF file `out` of type `gguf_type` (f16,
    q8_0): the metadata, then the tensor directory, then each tensor as it is read and encoded."""
    try:
        import gguf
    except ImportError as error:
        raise ExportError("the gguf package is not installed in this trainer image") from error

    shape = LlamaShape.from_config(_read_json(folder / "config.json"))
    metadata = {**model_metadata(shape, name, gguf_type), **tokenizer_metadata(folder, shape.vocab_size)}
    plan = tensor_plan(folder, shape, gguf_type)
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    writer = gguf.GGUFWriter(str(out), ARCHITECTURE)
    try:
        for key, value in metadata.items():
            _add_value(writer, key, value)
        for tensor in plan:
            dtype = np.dtype(np.float32 if tensor.kind == "f32" else np.float16)
            nbytes = stored_bytes(tensor.shape, tensor.kind)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes, raw_dtype=qtype[tensor.kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan:
            writer.write_tensor_data(_encoded(gguf, planned_values(tensor, shape), tensor.kind))
    finally:
        writer.close()
    return out


def _encoded(gguf: Any, values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "q8_0":
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    return np.ascontiguousarray(values, dtype=np.float32 if kind == "f32" else np.float16)


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One key in GGUF's type system: bool, uint32, float32, string, or an array of one of them."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def publish_gguf(
    folder: Path, types: list[str], output: storage.OutputLocation, cache_dir: Path, name: str
) -> list[dict]:
    """Write each requested type beside the adapter (`model-TYPE.gguf`, published atomically) and
    return their descriptions for the result."""
    published = []
    for gguf_type in types:
        staging = Path(tempfile.mkdtemp(prefix="gguf-", dir=cache_dir))
        try:
            path = write_gguf(folder, staging / gguf_file_name(gguf_type), gguf_type, name)
            size, digest = path.stat().st_size, storage.sha256_of(path)
            uri = output.publish_file(path, gguf_file_name(gguf_type))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        published.append({"type": gguf_type, "uri": uri, "sizeBytes": size, "sha256": digest})
    return published
