"""The one rule for every URI kubetune accepts: from a spec, from a trainer's result, from status.

`uri_problem(uri, schemes)` says in one line what is wrong with a URI, or None. The offline validator
(`validation.py`), the operator (before a URI from status reaches a pod or a request) and the serving
runtime's allow-list all call it, so a URI refused in one place is refused everywhere.

What it refuses, in every scheme: control characters (NUL, newline, ...), backslashes, `..` and `.`
path segments (also percent-encoded), an empty or malformed authority, and names Kubernetes or the
store would not accept (a claim or ConfigMap that is not a DNS subdomain, a ConfigMap key outside
`[-._a-zA-Z0-9]`, an S3 bucket outside its naming rules, an hf:// id that is not ORG/NAME).
"""

import re
from urllib.parse import unquote, urlsplit

from .common import MAX_URI

DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CONFIGMAP_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HF_PART_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")

EXAMPLES = {
    "pvc": "pvc://CLAIM/PATH",
    "configmap": "configmap://NAME/KEY",
    "s3": "s3://BUCKET/PATH",
    "hf": "hf://ORG/NAME",
    "http": "http://HOST/PATH",
    "https": "https://HOST/PATH",
    "file": "file:///PATH",
}


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
        return f"{shown}: control characters and backslashes are not allowed in a URI"
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in EXAMPLES:
        return f"{shown}: not a URI kubetune reads; write one of {', '.join(EXAMPLES[s] for s in allowed)}"
    if scheme not in allowed:
        return f"{shown}: {scheme}:// is not accepted here; write one of {', '.join(EXAMPLES[s] for s in allowed)}"
    try:
        parts = urlsplit(uri)
    except ValueError as error:
        return f"{shown}: {error}"
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        if scheme not in ("http", "https"):
            return f"{shown}: '?' and '#' have no meaning in a {scheme}:// URI"
    authority, segments = parts.netloc, [unquote(s) for s in parts.path.split("/")]
    if any(s in ("..", ".") for s in segments) or ".." in authority:
        return f"{shown}: '.' and '..' are not allowed in the path; name the file from the root of its volume"
    path = [s for s in segments if s]
    if scheme == "pvc":
        if not _dns_subdomain(authority):
            return f"{shown}: the claim name must be a DNS subdomain (lowercase letters, digits, '-', '.'); write pvc://CLAIM/PATH"
    elif scheme == "configmap":
        if not _dns_subdomain(authority) or len(path) != 1 or not CONFIGMAP_KEY_RE.match(path[0]):
            return f"{shown}: write configmap://NAME/KEY (NAME a DNS subdomain, KEY of letters, digits, '-', '_', '.')"
    elif scheme == "s3":
        if not S3_BUCKET_RE.match(authority) or ".." in authority:
            return (
                f"{shown}: the bucket name must be 3-63 lowercase letters, digits, '.' or '-'; write s3://BUCKET/PATH"
            )
    elif scheme == "hf":
        if len([authority, *path]) < 2 or not all(HF_PART_RE.match(p) for p in [authority, *path]):
            return f"{shown}: write hf://ORG/NAME"
    elif scheme in ("http", "https"):
        if "@" in authority or not authority or not HOST_RE.match(authority):
            return f"{shown}: write {scheme}://HOST/PATH (no user or password in the URI)"
    elif scheme == "file":
        if authority not in ("", "localhost") or not parts.path.startswith("/"):
            return f"{shown}: file:// needs an absolute path, with three slashes (file:///data/x)"
    return None


def _dns_subdomain(name: str) -> bool:
    return 0 < len(name) <= 253 and bool(DNS_SUBDOMAIN_RE.match(name))
