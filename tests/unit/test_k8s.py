"""The thin REST client, against a local fake API server: the bearer token is sent whichever key
the kubernetes loaders stored it under, 404 reads as absent, 409 AlreadyExists as "already there",
and other errors carry the API's reason and message."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes
import pytest

from kubetune_operator import k8s


class FakeApi:
    def __init__(self):
        self.requests: list[tuple[str, str, dict, object]] = []
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
        if path.startswith("/missing"):
            return 404, {"kind": "Status", "reason": "NotFound", "message": "not found"}
        if method == "POST" and path.startswith("/exists"):
            return 409, {"kind": "Status", "reason": "AlreadyExists", "message": "already exists"}
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
    assert client.create("/new", {"kind": "ConfigMap"}) is True and client.create("/exists", {}) is False
    assert client.delete("/missing/x") is False
    with pytest.raises(k8s.ApiError) as error:
        client.merge_patch("/stale", {"status": {}})
    assert (error.value.status, error.value.reason) == (409, "Conflict")
    method, _, headers, body = api.requests[-1]
    assert method == "PATCH" and headers["Content-Type"] == k8s.MERGE_PATCH and body == {"status": {}}


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
    assert k8s.finetunejob_path("ml", "f") == "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/f"
