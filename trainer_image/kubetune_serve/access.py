"""Who may call what: OpenAI's `Authorization: Bearer KEY`, with two keys.

* The admin key (`--admin-key-file`) protects `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`:
  what this process reads and serves. The operator holds it.
* The api key (`--api-key-file` or `--api-key`), when set, protects inference and `/v1/models`, and
  is also accepted on the admin endpoints (one key is enough on a laptop).
* The admin key is also accepted on `/v1/models` (not on inference): the operator lists what each
  replica serves, and must not be locked out by the user's key.
* `/health`, `/ready`, `/live` and `/metrics` stay open: the kubelet and Prometheus carry no key.

With neither key the admin endpoints answer 403 unless `--allow-unauthenticated-admin` (a laptop,
the local demo). Key files are re-read when their mtime changes: a Kubernetes Secret volume is
updated in place, and a rotated key must work without a restart. A key file that is configured but
missing or empty matches nothing (fails closed). Keys are compared with `hmac.compare_digest`; a
missing and a wrong key get the same 401, with `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from kubetune.logs import log

ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
LISTING_PATHS = "/v1/models"  # and /v1/models/{id}: the api key, or the operator's admin key
OPEN_PATHS = frozenset({"/health", "/ready", "/live", "/metrics"})
MAX_KEY_BYTES = 4096
DISABLED_MESSAGE = "adapter loading over HTTP is disabled: start with --admin-key-file or --api-key"
UNAUTHORIZED_MESSAGE = "a valid API key is required: send Authorization: Bearer KEY"


class KeyFile:
    """A key kept in a file, re-read when the file's mtime (or size, or inode) changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._key: str | None = None
        self._lock = threading.Lock()

    def current(self) -> str | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        with self._lock:
            if stamp != self._stamp:
                self._key = self._read()
                self._stamp = stamp
            return self._key

    def _read(self) -> str | None:
        try:
            with open(self.path, "rb") as handle:
                text = handle.read(MAX_KEY_BYTES + 1)
        except OSError as error:
            log("api_key_unreadable", path=str(self.path), error=type(error).__name__)
            return None
        key = text.decode("utf-8", "replace").strip()
        if not key or len(text) > MAX_KEY_BYTES:
            log("api_key_unusable", path=str(self.path), reason="empty" if not key else "too long")
            return None
        return key


@dataclass
class Key:
    """A key given on the command line or in the environment."""

    value: str

    def current(self) -> str | None:
        return self.value.strip() or None


@dataclass
class Access:
    admin: KeyFile | Key | None = None
    api: KeyFile | Key | None = None
    allow_unauthenticated_admin: bool = False

    def problem(self, path: str, authorization: str | None) -> tuple[int, str] | None:
        """(status, message) refusing a request for `path` with this Authorization header, or None."""
        if path in OPEN_PATHS:
            return None
        admin_too = path in ADMIN_PATHS or (self.api is not None and _is_listing(path))
        accepted = [k for k in ((self.admin, self.api) if admin_too else (self.api,)) if k is not None]
        if not accepted:
            if path in ADMIN_PATHS and not self.allow_unauthenticated_admin:
                return 403, DISABLED_MESSAGE
            return None
        presented = bearer(authorization)
        if presented is not None and any(matches(presented, key.current()) for key in accepted):
            return None
        return 401, UNAUTHORIZED_MESSAGE


def _is_listing(path: str) -> bool:
    return path == LISTING_PATHS or path.startswith(LISTING_PATHS + "/")


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def matches(presented: str, key: str | None) -> bool:
    if key is None:
        return False  # configured but unreadable: fails closed
    return hmac.compare_digest(presented.encode("utf-8", "replace"), key.encode("utf-8", "replace"))


def from_args(
    admin_key_file: str | None, api_key_file: str | None, api_key: str | None, allow_unauthenticated_admin: bool
) -> Access:
    """The Access of `kubetune serve`'s flags (the CLI has already merged their environment variables)."""
    api: KeyFile | Key | None = None
    if api_key_file:
        api = KeyFile(Path(api_key_file))
    elif api_key:
        api = Key(api_key)
    return Access(
        admin=KeyFile(Path(admin_key_file)) if admin_key_file else None,
        api=api,
        allow_unauthenticated_admin=allow_unauthenticated_admin,
    )
