"""Who may call what on the serving runtime (kubetune_serve.access), without a server."""

from kubetune_serve.access import DISABLED_MESSAGE, Access, Key

ADMIN, API = Key("admin-secret"), Key("api-secret")


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_the_admin_key_lists_but_never_infers_when_users_have_their_own_key():
    access = Access(admin=ADMIN, api=API)
    assert access.problem("/v1/models", bearer("admin-secret")) is None  # the operator's listing
    assert access.problem("/v1/models/tiny", bearer("admin-secret")) is None
    assert access.problem("/v1/completions", bearer("admin-secret"))[0] == 401
    assert access.problem("/v1/chat/completions", bearer("admin-secret"))[0] == 401
    assert access.problem("/v1/completions", bearer("api-secret")) is None
    assert access.problem("/v1/models", None)[0] == 401
    assert access.problem("/v1/modelsX", bearer("admin-secret"))[0] == 401  # a prefix is not the path


def test_admin_endpoints_take_either_key_and_are_closed_without_one():
    access = Access(admin=ADMIN, api=API)
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert access.problem(path, bearer("admin-secret")) is None
        assert access.problem(path, bearer("api-secret")) is None
        assert access.problem(path, bearer("guess"))[0] == 401
        assert access.problem(path, None) == access.problem(path, bearer("guess"))
    assert Access().problem("/v1/load_lora_adapter", None) == (403, DISABLED_MESSAGE)
    assert Access(allow_unauthenticated_admin=True).problem("/v1/load_lora_adapter", None) is None


def test_without_an_api_key_inference_and_listing_stay_open_and_probes_always_do():
    access = Access(admin=ADMIN)
    assert access.problem("/v1/completions", None) is None
    assert access.problem("/v1/models", None) is None
    for probe in ("/health", "/ready", "/live", "/metrics"):
        assert Access(admin=ADMIN, api=API).problem(probe, None) is None
