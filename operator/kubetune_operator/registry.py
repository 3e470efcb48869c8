"""The operator's kopf registry, its own rather than kopf's global one, so tests can run the
operator in-process (`kopf.testing.KopfRunner(..., registry=REGISTRY)`).

The handlers register themselves into it when their modules are imported: `kubetune_operator.handlers`
imports them all. This module imports nothing of the operator, so no handler module imports back
the module that imports it.
"""

import kopf

REGISTRY = kopf.OperatorRegistry()
