"""Helpers the unit tier's tests share (no fixtures): a minimal FineTuneJob spec and dotted overrides."""

MINIMAL = {
    "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
    "dataset": {"uri": "pvc://data/chat.jsonl", "format": "chat"},
    "hyperparameters": {"epochs": 1},
    "output": {"uri": "pvc://adapters/out"},
}


def spec(**overrides) -> dict:
    out = {key: dict(value) for key, value in MINIMAL.items()}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out
