"""The thin REST client, against a local fake API server: the bearer token is sent whichever key
the kubernetes loaders stored it under, 404 reads as absent, `apply` is a server-side apply by the
operator's field manager, and errors carry the API's reason and message."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
import kubernetes
import pytest

from kubetune_operator import k8s, writes


class FakeApi:
    def __init__(self):
        self.requests: list[tuple[str, str, dict, object]] = []
        self.stored: dict[str, dict] = {}  # path → what a GET answers
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = fake.route(self.command, self.path)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method, path):
        if method == "GET" and path in self.stored:
            return 200, self.stored[path]
        if path.startswith("/missing") or (method == "GET" and "/namespaces/missing/" in path):
            return 404, {"kind": "Status", "reason": "NotFound", "message": "not found"}
        if method == "PATCH" and path.startswith("/stale"):
            return 409, {"kind": "Status", "reason": "Conflict", "message": "the object has been modified"}
        if path.startswith("/list"):
            return 200, {"items": [{"metadata": {"name": "a"}}]}
        return 200, {"metadata": {"name": "x"}}

    def client(self, **api_key):
        configuration = kubernetes.client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}")
        configuration.api_key.update(api_key)
        return k8s.Client(configuration)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    fake = FakeApi()
    yield fake
    fake.close()


@pytest.mark.parametrize("key", ["authorization", "BearerToken"])
def test_the_token_is_sent_whichever_key_holds_it(api, key):
    api.client(**{key: "Bearer s3cret"}).get("/api/v1/namespaces/ml/pods/p")
    assert api.requests[-1][2]["Authorization"] == "Bearer s3cret"


def test_reads_creates_and_errors(api):
    client = api.client()
    assert client.get("/ok") == {"metadata": {"name": "x"}} and client.get("/missing/x") is None
    assert client.list("/list", "a=b") == [{"metadata": {"name": "a"}}]
    assert api.requests[-1][1] == "/list?labelSelector=a%3Db"
    assert client.delete("/missing/x") is False
    with pytest.raises(k8s.ApiError) as error:
        client.merge_patch("/stale", {"status": {}})
    assert (error.value.status, error.value.reason) == (409, "Conflict")
    method, _, headers, body = api.requests[-1]
    assert method == "PATCH" and headers["Content-Type"] == k8s.MERGE_PATCH and body == {"status": {}}


def test_children_are_applied_server_side(api):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "ml", "name": "c"}, "data": {"k": "v"}}
    assert api.client().apply(cm) == {"metadata": {"name": "x"}}  # the object as stored
    method, path, headers, body = api.requests[-1]
    assert (method, body) == ("PATCH", cm)
    assert path == "/api/v1/namespaces/ml/configmaps/c?fieldManager=kubetune-operator&force=true"
    assert headers["Content-Type"] == k8s.APPLY_PATCH == "application/apply-patch+yaml"


def test_connection_info_for_kopf():
    configuration = kubernetes.client.Configuration(host="https://api:6443")
    configuration.api_key["authorization"] = "Bearer t0k"
    info = k8s.connection_info(configuration)
    assert (info["server"], info["scheme"], info["token"]) == ("https://api:6443", "Bearer", "t0k")


def test_object_paths():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "ml", "name": "c"}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"namespace": "ml", "name": "j"}}
    assert k8s.object_path(cm) == "/api/v1/namespaces/ml/configmaps"
    assert k8s.object_path(job, "j") == "/apis/batch/v1/namespaces/ml/jobs/j"
    assert k8s.kubetune_path("FineTuneJob", "ml", "f") == "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/f"
    assert k8s.kubetune_path("AdapterDeployment", "ml") == "/apis/kubetune.io/v1alpha1/namespaces/ml/adapterdeployments"
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"namespace": "ml", "name": "d"}}
    assert k8s.object_path(deployment, "d") == "/apis/apps/v1/namespaces/ml/deployments/d"
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"namespace": "ml"}}
    assert k8s.object_path(policy, "p") == "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/p"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"namespace": "ml"}}
    assert k8s.object_path(secret, "s") == "/api/v1/namespaces/ml/secrets/s"


def test_a_child_is_applied_only_over_nothing_or_its_owners_object(api):
    """writes.ensure_child: an absent child is applied (created), the owner's own is applied over,
    and a namesake that is not the owner's (another's, or one being deleted) is never taken over."""
    client = api.client()
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "missing", "name": "c"}}
    assert writes.ensure_child(client, cm, "u-1", "FineTuneJob") == {"metadata": {"name": "x"}}
    assert [r[0] for r in api.requests] == ["GET", "PATCH"]  # 404, then the apply

    path = "/api/v1/namespaces/ml/configmaps/c"
    cm = {**cm, "metadata": {"namespace": "ml", "name": "c"}}
    ours = {"metadata": {"name": "c", "resourceVersion": "1", "ownerReferences": [{"uid": "u-1", "controller": True}]}}
    api.stored[path] = ours
    assert writes.existing_child(client, cm, "u-1", "FineTuneJob") == ours
    writes.ensure_child(client, cm, "u-1", "FineTuneJob")
    assert api.requests[-1][:2] == ("PATCH", f"{path}?fieldManager=kubetune-operator&force=true")
    for stored in ({**ours, "metadata": {**ours["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}},
                   {"metadata": {"name": "c", "ownerReferences": [{"uid": "u-0", "controller": True}]}}):  # fmt: skip
        api.stored[path] = stored
        before = len(api.requests)
        with pytest.raises(kopf.TemporaryError, match="not this FineTuneJob's"):
            writes.ensure_child(client, cm, "u-1", "FineTuneJob")
        assert [r[0] for r in api.requests[before:]] == ["GET"]


def test_the_client_keeps_a_connection_for_every_thread_that_may_call(api):
    """One kept-alive connection per handler or runner thread: with the library's default (5 per
    CPU, 10 on two cores) a busy operator dropped connections and paid a TLS handshake for each
    new one ("Connection pool is full, discarding connection")."""
    client = api.client()
    assert client.api.rest_client.pool_manager.connection_pool_kw["maxsize"] >= k8s.POOL_SIZE >= 24
