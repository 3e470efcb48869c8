"""The kopf handlers of the operator (FineTuneJob), registered in their own registry.

Handlers are thin: they read, call the pure core (admission, render, status, scrape), and write.
`kubetune operator` runs them with `kopf.run(registry=REGISTRY)`; tests run them in-process with
`kopf.testing.KopfRunner(["run", "--standalone", ...], registry=REGISTRY)`.

No handler needs a finalizer (there is no on-delete work: owner references let the garbage
collector remove the ConfigMap, Service and Job), and periodic work runs in the operator's own
resync loop rather than a kopf timer, because kopf puts a finalizer on every object a timer or
daemon watches; a FineTuneJob can therefore always be deleted, operator running or not.
"""

import kopf

REGISTRY = kopf.OperatorRegistry()

from . import adapterdeployment, finetunejob, runtime, workload  # noqa: E402,F401  (registration by import)

__all__ = ["REGISTRY"]
