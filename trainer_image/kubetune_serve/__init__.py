"""`kubetune serve`: the builtin runtime of AdapterDeployment.

One base model (transformers, CPU or GPU) behind an OpenAI-compatible API, with LoRA adapters added
and removed at runtime through vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, so the
operator drives this server and vLLM the same way. Requests pick the base or an adapter with the
OpenAI `model` field.

* `engine`: the model, the adapter registry and generation (no HTTP).
* `text`: generated tokens to text: stop strings and streaming deltas.
* `app`: the FastAPI routes; `schemas`: their request bodies.
* `metrics`: Prometheus metrics; `server`: `run(args)`, what the CLI calls.
* `access`: the admin and api keys (`Authorization: Bearer`); `sources`: which adapter URIs a
  runtime load may read (`--allow-source`) and how they are fetched, capped; `loads`: the pool
  that runs runtime loads off the request path, with a deadline; `errors`: `EngineError`.
"""
