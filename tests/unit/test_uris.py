"""uris.uri_problem, the one URI rule of spec, status and serving, and its CEL twin in the CRDs.

Addresses such as 169.254.169.254 appear here only as strings that must be refused; nothing here
resolves or connects (the `no_network` fixture fails the test if anything tries).
"""

import re
import socket

import pytest

from kubetune.api import uris
from kubetune.api.adapterdeployment import AdapterRef
from kubetune.api.common import ModelSource
from kubetune.api.finetunejob import DatasetSpec, OutputSpec, ValidationSplit
from kubetune.api.uris import (
    CONFIGMAP_MESSAGE,
    CONTROL_MESSAGE,
    DOT_SEGMENT_MESSAGE,
    PVC_MESSAGE,
    cel_string,
    shared_problem,
    uri_problem,
    uri_rules,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"uri_problem tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


GOOD = [
    ("hf://Qwen/Qwen2.5-0.5B-Instruct", None),
    ("hf://datasets/org/name", None),
    ("pvc://models/llama/8b", None),
    ("pvc://models", None),
    ("pvc://my.claim-1/a/b...c/d..e/.hidden", None),
    ("s3://my-bucket/a/b", None),
    ("s3://my.bucket.v2/a", None),
    ("configmap://chat-data/chat.jsonl", None),
    ("configmap://cm.v1/train_set-2.json", None),
    ("https://example.com/data/chat.jsonl?version=2", None),
    ("https://10.0.0.5:9000/data/chat.jsonl", None),
    ("http://192.168.1.20/d.jsonl", None),
    ("https://172.16.0.1/d.jsonl", None),
    ("https://minio.storage.svc.cluster.local:9000/bucket/key", None),
    ("https://[2001:db8::1]/d.jsonl", None),
    ("file:///data/x", None),
    ("file://localhost/data/x", None),
    ("pvc://claim/name with spaces.jsonl", None),
    ("pvc://claim/données.jsonl", None),
]


@pytest.mark.parametrize("uri, schemes", GOOD)
def test_good_uris_are_accepted(uri, schemes):
    assert uri_problem(uri, schemes) is None


BAD = [
    # path traversal, in every spelling
    ("pvc://x/../../../proc/self", DOT_SEGMENT_MESSAGE),
    ("pvc://x/a/..", DOT_SEGMENT_MESSAGE),
    ("pvc://x/./a", DOT_SEGMENT_MESSAGE),
    ("pvc://x/%2e%2e/a", DOT_SEGMENT_MESSAGE),
    ("pvc://x/%2E./a", DOT_SEGMENT_MESSAGE),
    ("pvc://x/.%2e", DOT_SEGMENT_MESSAGE),
    ("s3://bucket/a/../b", DOT_SEGMENT_MESSAGE),
    ("hf://org/../name", DOT_SEGMENT_MESSAGE),
    ("https://example.com/a/../b", DOT_SEGMENT_MESSAGE),
    ("https://example.com/..?x=1", DOT_SEGMENT_MESSAGE),
    ("file:///data/../etc/passwd", DOT_SEGMENT_MESSAGE),
    ("configmap://../key", DOT_SEGMENT_MESSAGE),
    ("configmap://./key", DOT_SEGMENT_MESSAGE),
    ("pvc://../etc", DOT_SEGMENT_MESSAGE),
    # control characters and backslashes, raw or %-encoded
    ("pvc://x/a\x00b", CONTROL_MESSAGE),
    ("pvc://x/a\nb", CONTROL_MESSAGE),
    ("pvc://x/a\rb", CONTROL_MESSAGE),
    ("pvc://x/a\tb", CONTROL_MESSAGE),
    ("pvc://x/a\x7fb", CONTROL_MESSAGE),
    ("pvc://x/a\x85b", CONTROL_MESSAGE),
    ("pvc://x/a\u2028b", CONTROL_MESSAGE),
    ("pvc://x/a\\b", CONTROL_MESSAGE),
    ("pvc://x/a%00b", CONTROL_MESSAGE),
    ("pvc://x/a%0Ab", CONTROL_MESSAGE),
    ("pvc://x/a%5cb", CONTROL_MESSAGE),
    ("https://example.com/a%0d%0aHost:%20evil", CONTROL_MESSAGE),
    # claim and ConfigMap names
    ("pvc://Payroll_DB/x", PVC_MESSAGE),
    ("pvc://-x/a", PVC_MESSAGE),
    ("pvc://x./a", PVC_MESSAGE),
    ("pvc://a..b/x", PVC_MESSAGE),
    ("pvc:///x", PVC_MESSAGE),
    ("pvc://x:80/a", PVC_MESSAGE),
    ("pvc://" + "a" * 254 + "/x", PVC_MESSAGE),
    ("configmap://cm", CONFIGMAP_MESSAGE),
    ("configmap://cm/", CONFIGMAP_MESSAGE),
    ("configmap://cm/a/b", CONFIGMAP_MESSAGE),
    ("configmap://cm/k ey", CONFIGMAP_MESSAGE),
    ("configmap://CM/key", CONFIGMAP_MESSAGE),
    ("configmap://" + "a" * 254 + "/key", CONFIGMAP_MESSAGE),
    # the rest
    ("", "empty"),
    ("models/llama", "not a URI kubetune reads"),
    ("ftp://h/x", "not a URI kubetune reads"),
    ("PVC://x/y", "not a URI kubetune reads"),
    ("s3://A/x", "bucket name"),
    ("s3://ab/x", "bucket name"),
    ("s3://a..b/x", "bucket name"),
    ("hf://justone", "write hf://ORG/NAME"),
    ("hf://org/na me", "write hf://ORG/NAME"),
    ("pvc://x/a?b", "'?' and '#' have no meaning"),
    ("https://user:pw@example.com/x", "no user or password"),
    ("https://example.com:99999/x", "Port out of range"),
    ("https:///x", "write https://HOST/PATH"),
    ("file://data/x", "file:// needs an absolute path"),
    ("pvc://x/" + "a" * 2048, "longer than 2048"),
]


@pytest.mark.parametrize("uri, words", BAD, ids=lambda v: repr(v)[:60] if isinstance(v, str) else None)
def test_bad_uris_are_refused_in_one_line_naming_the_uri(uri, words):
    problem = uri_problem(uri)
    assert problem is not None, f"{uri!r} accepted"
    assert words in problem
    assert "\n" not in problem and len(problem) < 400
    if uri:
        assert problem.startswith(repr(uri[:80]))


NODE_LOCAL = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://169.254.170.2/v2/credentials",
    "https://127.0.0.1/d.jsonl",
    "https://127.8.9.10:8080/d.jsonl",
    "https://0.0.0.0/d.jsonl",
    "https://[::1]/d.jsonl",
    "https://[::]/d.jsonl",
    "https://[fe80::1]/d.jsonl",
    "https://[FE80::a:b]/d.jsonl",
    "https://[::ffff:169.254.169.254]/x",
    "https://[::ffff:127.0.0.1]/x",
    "https://localhost/d.jsonl",
    "https://LOCALHOST:9000/d.jsonl",
    "https://api.localhost/d.jsonl",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254 as one number
    "http://0xa9fea9fe/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://0251.0376.0251.0376/",
    "http://127.1/",
    "http://0/",
]


@pytest.mark.parametrize("uri", NODE_LOCAL)
@pytest.mark.parametrize("scheme_of_field", [("http", "https"), None])
def test_http_urls_into_the_node_or_its_metadata_service_are_refused(uri, scheme_of_field):
    problem = uri_problem(uri, scheme_of_field)
    assert problem is not None, f"{uri!r} accepted"
    assert "name a host that serves the data" in problem or "not a host name" in problem


@pytest.mark.parametrize(
    "host",
    ["10.0.0.5", "172.16.3.4", "192.168.0.1", "100.64.0.1", "8.8.8.8", "[2001:db8::1]", "[fd00::1]", "s3.local.lan"],
)
def test_private_and_public_addresses_are_allowed(host):
    """In-cluster object stores live in private ranges; only the node and its metadata service are off limits."""
    assert uri_problem(f"https://{host}/data.jsonl", ("https",)) is None


def test_schemes_of_the_field_are_enforced_and_named():
    problem = uri_problem("s3://bucket/x", ("hf", "pvc"))
    assert problem is not None and "s3:// is not accepted here; write one of hf://ORG/NAME, pvc://CLAIM/PATH" in problem


def test_non_strings_are_a_problem_not_an_exception():
    assert uri_problem(None) == "the URI is empty"  # type: ignore[arg-type]
    assert uri_problem(42) == "the URI is empty"  # type: ignore[arg-type]


def test_long_uris_are_shown_shortened():
    problem = uri_problem("pvc://x/" + "a" * 3000)
    assert problem is not None and len(problem) < 200 and "..." in problem


# --- the CEL twin ------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, words", BAD + [(u, "") for u, _ in GOOD])
def test_the_shared_rule_is_part_of_uri_problem(uri, words):
    """Whatever the API server refuses (shared_problem), uri_problem refuses with the same words."""
    shared = shared_problem(uri)
    if shared is not None:
        problem = uri_problem(uri)
        assert problem is not None and problem.endswith(shared)


@pytest.mark.parametrize("model", [ModelSource, DatasetSpec, ValidationSplit, OutputSpec, AdapterRef])
def test_every_model_with_a_uri_carries_the_rules(model):
    messages = {r.message for r in model.cel_rules if r.field_path == ".uri"}
    assert {CONTROL_MESSAGE, DOT_SEGMENT_MESSAGE, PVC_MESSAGE, CONFIGMAP_MESSAGE} <= messages


def test_rules_check_the_same_patterns_as_their_cel():
    """Each rule's CEL embeds, as a CEL string, a pattern the Python twin uses."""
    rules = uri_rules("uri", "uri")
    patterns = [uris.CONTROL_PATTERN, uris.DOT_SEGMENT_PATTERN, uris.PVC_PATTERN, uris.CONFIGMAP_PATTERN]
    for rule, pattern in zip(rules, patterns, strict=True):
        assert f"self.uri.matches({cel_string(pattern)})" in rule.cel
        re.compile(pattern)
    optional = uri_rules("uri", "uri", optional=True)
    assert all(r.cel.startswith("!has(self.uri) || ") for r in optional)


def test_cel_strings_escape_what_cel_would_read_otherwise():
    assert cel_string("a'b\\c") == "'a\\'b\\\\c'"
    assert cel_string("[\u2028]") == "'[\\u2028]'"
    assert cel_string(r"\x00") == "'\\\\x00'"


@pytest.mark.parametrize(
    "uri, refused",
    [
        ("pvc://x/../../../proc/self", True),
        ("configmap://../key", True),
        ("pvc://x/a\nb", True),
        ("pvc://Payroll_DB/x", True),
        ("configmap://cm/a/b", True),
        ("pvc://adapters/run-1/adapter", False),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", False),
        ("configmap://cm/chat.jsonl", False),
    ],
)
def test_model_twins_refuse_at_parse_time(uri, refused):
    from pydantic import ValidationError

    try:
        OutputSpec.model_validate({"uri": uri})
    except ValidationError:
        assert refused, uri
    else:
        assert not refused, uri
