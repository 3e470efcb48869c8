"""The kubetune operator: two controllers built alike, for FineTuneJob and AdapterDeployment.

It depends only on the core package `kubetune` (API models, contract, planner), never on the
trainer or the serving runtime. The house:

- `main.py`: `kubetune operator` (`Options`, `run_operator`): kopf.run with liveness and metrics.
- `handlers.py`: every handler in `registry.REGISTRY`: login, startup (the `state.OperatorState`
  and the resync loops), cleanup, plus both kinds' handlers.
- `finetunejob/`, `adapterdeployment/`: one folder per kind, each with `handlers.py` (thin kopf
  handlers and the kind's index), `reconcile.py` (read, call the pure modules, write), `render.py`
  (the children as plain dicts) and `status.py` (the status from what was read); FineTuneJob adds
  `admission.py` (spec and GPU-memory checks, the plan) and `jobsync.py` (keeping a Job in step),
  AdapterDeployment `adapters.py` (which adapters each replica must load or unload).
- Shared: `k8s.py` (the one API client; children are written with its server-side `apply`),
  `writes.py` (children checked to be ours and applied; status patches and Events), `resync.py`
  (the periodic loop fed by kopf indices; no timers, so no finalizers), `replicas.py` (the HTTP
  client of serving replicas), `scrape.py` (rank 0's training metrics), `conditions.py`,
  `render_common.py`, `config.py` (`OperatorConfig`), `metrics.py` (the operator's own Prometheus
  metrics), `state.py`.

render, status, admission, jobsync, adapters, conditions, config and render_common are pure: they
import neither kopf nor kubernetes nor httpx, and are unit-tested without a cluster.
"""
