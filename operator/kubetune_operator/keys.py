"""The admin key of each AdapterDeployment's serving replicas, derived, never stored by the operator.

The serving runtime takes load and unload requests only with `Authorization: Bearer <admin key>`
(its `--admin-key-file`). The operator puts that key in a Secret it owns, mounted into the pods,
and sends it with every call. It has no right to read Secrets (and must not get one), so it never
reads the key back: it computes it again, whenever it needs it, as

    HMAC-SHA256(master secret, "kubetune.io/adapterdeployment-admin-key\\0" namespace "\\0" name "\\0" uid)

The uid makes a recreated namesake get a new key, so a Secret left over from the old object opens
nothing. The master secret is the operator's configuration `admin_key_secret` (env
KUBETUNE_OPERATOR_ADMIN_KEY, which the chart fills from a Secret it generates once); when it is
empty the operator makes a random one per process, and the Secrets it applies change with each
restart: the replicas re-read the mounted file when the kubelet refreshes it, and until then the
operator's calls get 401 and are retried.
"""

import hashlib
import hmac
import secrets
from typing import Any

DOMAIN = b"kubetune.io/adapterdeployment-admin-key"
MASTER_BYTES = 32
_process_master = secrets.token_hex(MASTER_BYTES)  # used only when the configuration has none


def master_secret(config: Any) -> str:
    """The configured master secret, or this process's random one when none is set. A pydantic
    SecretStr is unwrapped (its str() is asterisks)."""
    configured = getattr(config, "admin_key_secret", "") or ""
    if hasattr(configured, "get_secret_value"):
        configured = configured.get_secret_value()
    return str(configured) if configured else _process_master


def derive_admin_key(master: str, namespace: str, name: str, uid: str) -> str:
    """The admin key of one AdapterDeployment (64 hex characters). Fields are NUL-separated, and a
    NUL cannot occur in a Kubernetes name or uid, so no two objects share an input."""
    if not master:
        raise ValueError("the master secret is empty")
    message = b"\0".join([DOMAIN, namespace.encode(), name.encode(), uid.encode()])
    return hmac.new(master.encode(), message, hashlib.sha256).hexdigest()


def admin_key(config: Any, namespace: str, name: str, uid: str) -> str:
    """The admin key of the AdapterDeployment namespace/name with this uid, under `config`."""
    return derive_admin_key(master_secret(config), namespace, name, uid)


def authorization(key: str) -> dict[str, str]:
    """The request header that carries `key`."""
    return {"Authorization": f"Bearer {key}"}
