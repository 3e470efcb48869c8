"""The per-AdapterDeployment admin key: recomputable from the master secret and the object alone,
different for every object, namesake and master."""

import hashlib
import hmac
from types import SimpleNamespace

import pytest

from kubetune_operator import keys


def test_the_key_is_hmac_sha256_of_the_object_under_the_master():
    key = keys.derive_admin_key("master", "team-a", "chat", "uid-1")
    message = b"kubetune.io/adapterdeployment-admin-key\0team-a\0chat\0uid-1"
    assert key == hmac.new(b"master", message, hashlib.sha256).hexdigest()
    assert len(key) == 64


def test_the_same_input_gives_the_same_key_and_any_change_another():
    base = keys.derive_admin_key("m", "ns", "chat", "u1")
    assert keys.derive_admin_key("m", "ns", "chat", "u1") == base
    others = {
        keys.derive_admin_key("m2", "ns", "chat", "u1"),
        keys.derive_admin_key("m", "ns2", "chat", "u1"),
        keys.derive_admin_key("m", "ns", "chat2", "u1"),
        keys.derive_admin_key("m", "ns", "chat", "u2"),  # a recreated namesake
        keys.derive_admin_key("m", "n", "schat", "u1"),  # fields are separated, not concatenated
    }
    assert base not in others and len(others) == 5


def test_the_configured_master_is_used_and_an_empty_one_falls_back_to_the_process_secret():
    configured = SimpleNamespace(admin_key_secret="from-the-chart")
    assert keys.admin_key(configured, "ns", "a", "u") == keys.derive_admin_key("from-the-chart", "ns", "a", "u")
    for config in (SimpleNamespace(admin_key_secret=""), SimpleNamespace()):  # unset, or an older config
        key = keys.admin_key(config, "ns", "a", "u")
        assert key == keys.admin_key(config, "ns", "a", "u")  # stable within the process
        assert key == keys.derive_admin_key(keys._process_master, "ns", "a", "u")
    assert len(keys._process_master) == 2 * keys.MASTER_BYTES


def test_a_secret_str_master_is_unwrapped():
    from pydantic import SecretStr

    config = SimpleNamespace(admin_key_secret=SecretStr("from-the-chart"))
    assert keys.admin_key(config, "ns", "a", "u") == keys.derive_admin_key("from-the-chart", "ns", "a", "u")


def test_an_empty_master_is_refused():
    with pytest.raises(ValueError):
        keys.derive_admin_key("", "ns", "a", "u")


def test_the_authorization_header():
    assert keys.authorization("k") == {"Authorization": "Bearer k"}
