"""Semantic validation: what the CRD's schema and CEL rules cannot express.

`validate()` is the one place these checks live; the CLI, the operator (at admission) and the
trainer (before loading anything) all call it. Each Problem names the field and says how to fix it.
"""

import difflib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .adapterdeployment import AdapterDeployment, AdapterRef
from .finetunejob import FineTuneJob, FineTuneJobSpec, MethodSpec, gguf_model_problem
from .merging import MergeSource
from .names import name_problems
from .uris import node_local_host, uri_problem


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


MODEL_SCHEMES = ("hf", "pvc", "s3", "file")
DATASET_SCHEMES = ("hf", "pvc", "s3", "https", "http", "configmap", "file")
OUTPUT_SCHEMES = ("pvc", "s3", "file")
ADAPTER_SCHEMES = ("hf", "pvc", "s3", "file")

# Linear-layer names of the architectures people fine-tune (Llama, Mistral, Qwen, Gemma, Phi,
# GPT-2/NeoX/Falcon, Mixtral experts, ...). A name outside this list is almost always a typo that
# PEFT would only report after the model has been downloaded.
KNOWN_TARGET_MODULES = frozenset(
    {
        "all-linear",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "qkv_proj",
        "gate_up_proj",
        "dense",
        "fc1",
        "fc2",
        "out_proj",
        "c_attn",
        "c_proj",
        "c_fc",
        "query_key_value",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "query",
        "key",
        "value",
        "Wqkv",
        "W_pack",
        "w1",
        "w2",
        "w3",
        "wo",
        "wi",
        "wq",
        "wk",
        "wv",
        "in_proj",
        "x_proj",
        "lm_head",
        "embed_tokens",
    }
)

# Normalisation layers' names in the common families (Llama/Qwen/Mistral, Gemma, GPT-2, Falcon, Qwen3's
# per-head q/k norms): lnTuning targets these, never linear layers.
KNOWN_NORM_MODULES = frozenset(
    {
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
        "final_layernorm",
        "layernorm",
        "ln_1",
        "ln_2",
        "ln_f",
        "ln_attn",
        "ln_mlp",
        "attention_norm",
        "ffn_norm",
        "q_norm",
        "k_norm",
    }
)
NORM_HINT = "input_layernorm, post_attention_layernorm, norm"


def validate(obj: FineTuneJob | AdapterDeployment, local: bool = False) -> list[Problem]:
    """Problems with an already-parsed object. `local` is True for `kubetune train` on this
    machine, where file:// URIs are allowed."""
    if isinstance(obj, FineTuneJob):
        return validate_finetunejob(obj.spec, local)
    return validate_adapterdeployment(obj, local)


def validate_finetunejob(spec: FineTuneJobSpec, local: bool = False) -> list[Problem]:
    problems = [
        *check_uri("spec.model.uri", spec.model.uri, MODEL_SCHEMES, local),
        *check_uri("spec.dataset.uri", spec.dataset.uri, DATASET_SCHEMES, local),
        *check_uri("spec.output.uri", spec.output.uri, OUTPUT_SCHEMES, local),
    ]
    if spec.dataset.validation and spec.dataset.validation.uri:
        problems += check_uri("spec.dataset.validation.uri", spec.dataset.validation.uri, DATASET_SCHEMES, local)
    problems += check_evaluation(spec, local)
    if "gguf" in spec.output.exports and (why := gguf_model_problem(spec.model.uri)):
        problems.append(Problem("spec.output.export", why))
    method = spec.method
    if method.type in ("lora", "qlora", "dora"):
        problems += check_target_modules("spec.method.lora.targetModules", method.effective_lora().target_modules)
    if method.adalora:
        problems += check_target_modules("spec.method.adalora.targetModules", method.adalora.target_modules)
    if method.ia3:
        problems += check_target_modules("spec.method.ia3.targetModules", method.ia3.target_modules)
    for block, settings in method_target_blocks(method):
        problems += check_target_modules(f"spec.method.{block}.targetModules", settings.target_modules)
    if method.ln_tuning:
        problems += check_norm_modules("spec.method.lnTuning.targetModules", method.ln_tuning.target_modules)
    if method.type == "prefixTuning" and method.virtual_tokens and method.virtual_tokens.init_text:
        problems.append(
            Problem(
                "spec.method.virtualTokens.initText",
                "initText only applies to promptTuning; remove it for prefixTuning",
            )
        )
    problems += check_strategy(spec)
    if spec.objective == "dpo" and spec.method.type == "full":
        problems.append(
            Problem(
                "spec.method.type",
                "dpo uses the base model as its frozen reference, so it needs an adapter method "
                "(lora, qlora, dora, ...), not full",
            )
        )
    lr = spec.hyperparameters.lr
    if not 0 < lr <= 1:
        problems.append(
            Problem(
                "spec.hyperparameters.learningRate",
                f"{lr:g} is outside (0, 1]; typical values are 1e-5 (full) to 2e-4 (LoRA)",
            )
        )
    if spec.resources.gpus_per_node == 0 and spec.hyperparameters.precision == "fp16":
        problems.append(
            Problem(
                "spec.hyperparameters.precision", "fp16 needs a GPU; use bf16 or fp32 when resources.gpusPerNode is 0"
            )
        )
    if spec.resources.gpus_per_node == 0 and spec.distributed.strategy == "fsdp" and spec.distributed.offload == "cpu":
        problems.append(Problem("spec.distributed.offload", "offload cpu means nothing without GPUs; set offload none"))
    return problems


def validate_adapterdeployment(obj: AdapterDeployment, local: bool = False) -> list[Problem]:
    spec = obj.spec
    problems = check_uri("spec.baseModel.uri", spec.base_model.uri, MODEL_SCHEMES, local)
    seen: dict[str, int] = {}
    for index, adapter in enumerate(spec.adapters):
        if adapter.name in seen:
            # The API server's words for a second entry with the same key in a listType=map list.
            key = json.dumps({"name": adapter.name}, separators=(",", ":"))
            problems.append(
                Problem(
                    f"spec.adapters[{index}]",
                    f"Duplicate value: {key}: adapter names must be unique "
                    f"(spec.adapters[{seen[adapter.name]}] has it too)",
                )
            )
        seen.setdefault(adapter.name, index)
        sources: list[tuple[str, AdapterRef | MergeSource]] = [(f"spec.adapters[{index}]", adapter)]
        if adapter.merge is not None:
            sources += [(f"spec.adapters[{index}].merge.sources[{j}]", s) for j, s in enumerate(adapter.merge.sources)]
        for at, source in sources:
            if source.uri:
                problems += check_uri(f"{at}.uri", source.uri, ADAPTER_SCHEMES, local)
            if source.from_job and name_problems("FineTuneJob", source.from_job):
                problems.append(Problem(f"{at}.fromJob", f"{source.from_job!r} is not a FineTuneJob name"))
    return problems


def validate_metadata(kind: str, metadata: Any, local: bool = False) -> list[Problem]:
    """Problems with the name of an object of `kind`, as the API server (the CRD's root rules) and
    the operator see them. A local run (`kubetune train`) needs no name, but one it is given must
    be valid: the same manifest is applied to a cluster later."""
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if local and name in (None, ""):
        return []
    return [Problem("metadata.name", message) for message in name_problems(kind, name)]


def check_strategy(spec: FineTuneJobSpec) -> list[Problem]:
    """Method and strategy pairs the trainer cannot run (auto always picks one that works)."""
    strategy, method = spec.distributed.strategy, spec.method.type
    if method == "adalora" and strategy not in ("auto", "ddp"):
        return [
            Problem(
                "spec.distributed.strategy",
                f"adalora needs whole gradients to reallocate ranks; use ddp or auto, not {strategy}",
            )
        ]
    if method == "qlora" and strategy in ("fsdp", "deepspeed-zero3"):
        return [
            Problem(
                "spec.distributed.strategy",
                f"qlora's 4-bit weights cannot be sharded by {strategy}; use ddp, deepspeed-zero2 or auto",
            )
        ]
    return []


def check_evaluation(spec: FineTuneJobSpec, local: bool) -> list[Problem]:
    """What the evaluation after training reads, and where the trackers report: the same URI rules
    as the dataset; an MLflow server on this node (loopback, metadata names) only for local runs."""
    evaluation, problems = spec.evaluation, []
    benchmarks = evaluation.benchmarks
    for path, uri in (
        ("spec.evaluation.uri", evaluation.uri),
        ("spec.evaluation.referenceUri", evaluation.reference_uri),
        ("spec.evaluation.benchmarks.taskUri", benchmarks.task_uri if benchmarks else None),
    ):
        if uri:
            problems += check_uri(path, uri, DATASET_SCHEMES, local)
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is not None:
        problem = uri_problem(mlflow.tracking_uri, ("http", "https"))
        host = urlsplit(mlflow.tracking_uri).hostname or ""
        if problem and not (local and node_local_host(host)):  # a tracking server on this machine
            problems.append(Problem("spec.tracking.mlflow.trackingUri", problem))
    return problems


def check_uri(path: str, uri: str, schemes: tuple[str, ...], local: bool) -> list[Problem]:
    """`uri_problem` for the field at `path`, plus where file:// makes sense (local runs only)."""
    scheme = uri.partition("://")[0] if "://" in uri else urlsplit(uri).scheme
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes if s != "file")
        return [Problem(path, f"{uri!r}: scheme must be one of {allowed} (file:// for local runs)")]
    if scheme == "file" and not local:
        return [
            Problem(
                path,
                f"{uri!r}: file:// only works with `kubetune train` on your machine; in a cluster use pvc:// or s3://",
            )
        ]
    problem = uri_problem(uri, schemes)
    return [Problem(path, problem)] if problem else []


def method_target_blocks(method: MethodSpec) -> list[tuple[str, Any]]:
    """The linear-layer adapter blocks the spec sets (loha, lokr, vera, oft, hra, fourierft), by API name."""
    blocks = {
        "loha": method.loha,
        "lokr": method.lokr,
        "vera": method.vera,
        "oft": method.oft,
        "hra": method.hra,
        "fourierft": method.fourierft,
    }
    return [(name, settings) for name, settings in blocks.items() if settings is not None]


def check_norm_modules(path: str, modules: list[str]) -> list[Problem]:
    """lnTuning trains normalisation layers: a linear layer's name there is a mistake worth one line."""
    problems = []
    for name in modules:
        if name in KNOWN_TARGET_MODULES:
            problems.append(
                Problem(path, f"{name!r} is not a normalisation layer; lnTuning trains layers such as {NORM_HINT}")
            )
        elif name not in KNOWN_NORM_MODULES:
            close = difflib.get_close_matches(name, sorted(KNOWN_NORM_MODULES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(Problem(path, f"unknown normalisation layer {name!r}; {hint}use names like {NORM_HINT}"))
    return problems


def check_target_modules(path: str, modules: list[str]) -> list[Problem]:
    problems = []
    if "all-linear" in modules and len(modules) > 1:
        problems.append(Problem(path, "all-linear already covers every linear layer; list it alone"))
    for name in modules:
        if name not in KNOWN_TARGET_MODULES:
            close = difflib.get_close_matches(name, sorted(KNOWN_TARGET_MODULES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(
                Problem(path, f"unknown module {name!r}; {hint}use all-linear or names like q_proj, v_proj, down_proj")
            )
    return problems
