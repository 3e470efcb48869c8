"""The one rule for every URI kubetune accepts: from a spec, from a trainer's result, from status.

`uri_problem(uri, schemes)` says in one line what is wrong with a URI, or None. The offline validator
(`validation.py`), the operator (before a URI from status reaches a pod or a request) and the serving
runtime's allow-list all call it, so a URI refused in one place is refused everywhere.

What it refuses, in every scheme: control characters (NUL, newline, C1, U+2028/2029), backslashes
and their %-escapes, `.` and `..` segments (also percent-encoded), an empty or malformed authority,
and names Kubernetes or the store would not accept (a claim or ConfigMap that is not a DNS
subdomain, a ConfigMap key outside `[-._a-zA-Z0-9]`, an S3 bucket outside its naming rules, an
hf:// id that is not ORG/NAME). For http(s) it also refuses hosts that point back into the
node: loopback, link-local (the cloud metadata service at 169.254.169.254), the unspecified
address, `localhost`, the metadata host names, and numeric host spellings other than dotted
decimal (`2852039166`, `0xa9.254.169.254`), which resolvers would read as those addresses. Private
ranges stay allowed: in-cluster object stores live there. Only the text is examined; nothing is
resolved or contacted.

The first checks are also the API server's (`uri_rules`): the same regular expressions run in
Python and, as CEL `matches()`, in the CRD, with the same messages, so `kubetune validate` and
`kubectl apply` refuse `pvc://x/../../proc/self` and `configmap://../key` in the same words.
"""

import ipaddress
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from .rules import Rule

# Bounds on strings keep the API server's CEL cost estimate finite (see common.py).
MAX_URI = 2048

# --- the rules the API server enforces too (RE2 and Python `re` read these patterns alike) -------

# C0 controls (NUL, tab, newline, ...), DEL and C1, the Unicode line and paragraph separators and
# the backslash, raw or percent-encoded (the non-ASCII ones are real characters: RE2 has no `\u`).
CONTROL_PATTERN = r"[\x00-\x1f\x7f-\x9f\\" + "\u2028\u2029" + r"]|%[01][0-9A-Fa-f]|%7[Ff]|%5[Cc]"
# A `.` or `..` segment (also %2e-encoded) anywhere after the scheme: in the path, and as the
# authority (`configmap://../key`), ended by `/`, `?`, `#` or the end.
DOT_SEGMENT_PATTERN = r"/(\.|%2[Ee]){1,2}([/?#]|$)"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN_PATTERN = rf"{_LABEL}(\.{_LABEL})*"
CONFIGMAP_KEY_PATTERN = r"[-._a-zA-Z0-9]+"
MAX_DNS_SUBDOMAIN = 253
PVC_PATTERN = rf"^pvc://{DNS_SUBDOMAIN_PATTERN}(/|$)"
CONFIGMAP_PATTERN = rf"^configmap://{DNS_SUBDOMAIN_PATTERN}/{CONFIGMAP_KEY_PATTERN}$"
# The authority of a pvc:// or configmap:// URI longer than a DNS subdomain may be.
LONG_NAME_PATTERN = rf"^(pvc|configmap)://[^/]{{{MAX_DNS_SUBDOMAIN + 1},}}"

CONTROL_MESSAGE = "control characters (NUL, newline, ...) and backslashes, also %-encoded, are not allowed in a URI"
DOT_SEGMENT_MESSAGE = "'.' and '..' are not allowed as segments of a URI; name the file from the root of its volume"
PVC_MESSAGE = (
    "write pvc://CLAIM/PATH, CLAIM a PersistentVolumeClaim name "
    f"(a DNS subdomain: at most {MAX_DNS_SUBDOMAIN} lowercase letters, digits, '-' and '.')"
)
CONFIGMAP_MESSAGE = (
    "write configmap://NAME/KEY, NAME a ConfigMap name (a DNS subdomain: at most "
    f"{MAX_DNS_SUBDOMAIN} lowercase letters, digits, '-' and '.') and KEY of letters, digits, '-', '_' and '.'"
)

_CONTROL = re.compile(CONTROL_PATTERN)
_DOT_SEGMENT = re.compile(DOT_SEGMENT_PATTERN)
_PVC = re.compile(PVC_PATTERN)
_CONFIGMAP = re.compile(CONFIGMAP_PATTERN)
_LONG_NAME = re.compile(LONG_NAME_PATTERN)

# --- the rest of the rule (offline, the operator and the serving runtime) --------------------------

DNS_SUBDOMAIN_RE = re.compile(rf"^{DNS_SUBDOMAIN_PATTERN}$")
CONFIGMAP_KEY_RE = re.compile(rf"^{CONFIGMAP_KEY_PATTERN}$")
S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HF_PART_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# Host names that always mean this node or its cloud's metadata service.
NODE_LOCAL_HOSTS = ("localhost", "metadata", "metadata.google.internal", "instance-data")
# Only digits, dots, hex letters and x: a number some resolver reads as an address.
_NUMERIC_HOST = re.compile(r"^(0[xX][0-9A-Fa-f]*|[0-9]+)(\.(0[xX][0-9A-Fa-f]*|[0-9]+))*\.?$")

EXAMPLES = {
    "pvc": "pvc://CLAIM/PATH",
    "configmap": "configmap://NAME/KEY",
    "s3": "s3://BUCKET/PATH",
    "hf": "hf://ORG/NAME",
    "http": "http://HOST/PATH",
    "https": "https://HOST/PATH",
    "file": "file:///PATH",
}


def shared_problem(uri: str) -> str | None:
    """The part of the rule the API server enforces too (`uri_rules`): the same message, or None."""
    if _CONTROL.search(uri):
        return CONTROL_MESSAGE
    if _DOT_SEGMENT.search(uri):
        return DOT_SEGMENT_MESSAGE
    if uri.startswith("pvc://") and (not _PVC.search(uri) or _LONG_NAME.search(uri)):
        return PVC_MESSAGE
    if uri.startswith("configmap://") and (not _CONFIGMAP.search(uri) or _LONG_NAME.search(uri)):
        return CONFIGMAP_MESSAGE
    return None


def uri_problem(uri: str, schemes: tuple[str, ...] | None = None) -> str | None:
    """What is wrong with `uri` (one line, naming the URI), or None when it is acceptable.
    `schemes`: the schemes this field takes (default: every scheme kubetune knows)."""
    allowed = schemes or tuple(EXAMPLES)
    if not isinstance(uri, str) or not uri:
        return "the URI is empty"
    shown = repr(uri[:80]) + ("..." if len(uri) > 80 else "")
    if len(uri) > MAX_URI:
        return f"{shown}: longer than {MAX_URI} characters"
    if _CONTROL.search(uri) or _CONTROL.search(unquote(uri)):
        return f"{shown}: {CONTROL_MESSAGE}"
    scheme, sep, _ = uri.partition("://")
    if not sep or scheme not in EXAMPLES:
        return f"{shown}: not a URI kubetune reads; write one of {', '.join(EXAMPLES[s] for s in allowed)}"
    if scheme not in allowed:
        return f"{shown}: {scheme}:// is not accepted here; write one of {', '.join(EXAMPLES[s] for s in allowed)}"
    shared = shared_problem(uri)
    if shared:
        return f"{shown}: {shared}"
    try:
        parts = urlsplit(uri)
        port = parts.port if scheme in ("http", "https") else None
    except ValueError as error:
        return f"{shown}: {error}"
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        if scheme not in ("http", "https"):
            return f"{shown}: '?' and '#' have no meaning in a {scheme}:// URI"
    authority, segments = parts.netloc, [unquote(s) for s in parts.path.split("/")]
    if any(s in ("..", ".") for s in segments) or authority in ("..", "."):
        return f"{shown}: {DOT_SEGMENT_MESSAGE}"
    path = [s for s in segments if s]
    if scheme == "pvc":
        if not _dns_subdomain(authority):
            return f"{shown}: {PVC_MESSAGE}"
    elif scheme == "configmap":
        if not _dns_subdomain(authority) or len(path) != 1 or not CONFIGMAP_KEY_RE.match(path[0]):
            return f"{shown}: {CONFIGMAP_MESSAGE}"
    elif scheme == "s3":
        if not S3_BUCKET_RE.match(authority) or ".." in authority:
            return (
                f"{shown}: the bucket name must be 3-63 lowercase letters, digits, '.' or '-'; write s3://BUCKET/PATH"
            )
    elif scheme == "hf":
        if len([authority, *path]) < 2 or not all(HF_PART_RE.match(p) for p in [authority, *path]):
            return f"{shown}: write hf://ORG/NAME"
    elif scheme in ("http", "https"):
        if "@" in authority or not HOST_RE.match(authority) or ".." in authority or port == 0:
            return f"{shown}: write {scheme}://HOST/PATH (no user or password in the URI)"
        node_local = node_local_host(parts.hostname or "")
        if node_local:
            return f"{shown}: {node_local}"
    elif scheme == "file":
        if authority not in ("", "localhost") or not parts.path.startswith("/"):
            return f"{shown}: file:// needs an absolute path, with three slashes (file:///data/x)"
    return None


def node_local_host(host: str) -> str | None:
    """Why an http(s) host must not be fetched from a pod (it reaches the node itself or its cloud's
    metadata service), or None. `host` as urlsplit's `hostname` gives it: lowercase, no brackets."""
    name = host.rstrip(".").lower()
    if name in NODE_LOCAL_HOSTS or name.endswith(".localhost"):
        return f"{host!r} is this node or its metadata service; name a host that serves the data"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if _NUMERIC_HOST.match(name):
            return f"{host!r} is a number, not a host name; write IPv4 addresses as four decimal numbers (10.0.0.5)"
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_link_local or address.is_unspecified:
        return (
            f"{host!r} is a loopback, link-local or unspecified address (the node itself, or the metadata "
            "service at 169.254.169.254); name a host that serves the data"
        )
    return None


def _dns_subdomain(name: str) -> bool:
    return 0 < len(name) <= MAX_DNS_SUBDOMAIN and bool(DNS_SUBDOMAIN_RE.match(name))


# --- the same rules as CEL, for the CRD --------------------------------------------------------------


def cel_string(text: str) -> str:
    """`text` as a single-quoted CEL string literal (backslashes doubled, non-ASCII as \\u escapes)."""
    out = []
    for char in text:
        if char in ("\\", "'"):
            out.append("\\" + char)
        elif " " <= char <= "~":
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}")
    return "'" + "".join(out) + "'"


def uri_rules(field: str, attribute: str, optional: bool = False) -> tuple[Rule, ...]:
    """The CEL rules (with their Python twins) that a model carrying a URI in `field` (camelCase;
    `attribute` is its Python name) puts in the CRD: the shared part of `uri_problem`.

    Each rule runs `matches()` over a string of at most MAX_URI characters, which keeps the API
    server's cost estimate within its budget also for a list of 256 adapters."""
    value = f"self.{field}"
    guard = f"!has({value}) || " if optional else ""

    def rule(cel: str, message: str, refused: Callable[[str], bool]) -> Rule:
        def check(model: Any) -> bool:
            uri = getattr(model, attribute)
            return uri is None or not refused(uri)

        return Rule(cel=guard + cel, message=message, check=check, field_path=f".{field}")

    return (
        rule(f"!{value}.matches({cel_string(CONTROL_PATTERN)})", CONTROL_MESSAGE, lambda u: bool(_CONTROL.search(u))),
        rule(
            f"!{value}.matches({cel_string(DOT_SEGMENT_PATTERN)})",
            DOT_SEGMENT_MESSAGE,
            lambda u: bool(_DOT_SEGMENT.search(u)),
        ),
        rule(
            f"!{value}.startsWith('pvc://') || ({value}.matches({cel_string(PVC_PATTERN)}) && "
            f"!{value}.matches({cel_string(LONG_NAME_PATTERN)}))",
            PVC_MESSAGE,
            lambda u: u.startswith("pvc://") and (not _PVC.search(u) or bool(_LONG_NAME.search(u))),
        ),
        rule(
            f"!{value}.startsWith('configmap://') || ({value}.matches({cel_string(CONFIGMAP_PATTERN)}) && "
            f"!{value}.matches({cel_string(LONG_NAME_PATTERN)}))",
            CONFIGMAP_MESSAGE,
            lambda u: u.startswith("configmap://") and (not _CONFIGMAP.search(u) or bool(_LONG_NAME.search(u))),
        ),
    )
