"""Storage: every URI scheme the trainer reads and writes, against real local servers.

https:// is served by `http.server` and s3:// by moto's S3-compatible server, both on 127.0.0.1;
hf:// uses a Hugging Face cache laid out on disk with HF_HUB_OFFLINE=1. Nothing leaves this machine.
"""

import hashlib
import http.server
import threading
from collections import Counter
from pathlib import Path

import pytest

from kubetune import contract, storage
from kubetune.storage import (
    COMPLETE_MARKER,
    StorageError,
    open_output,
    pvc_mount_path,
    resolve_input,
    sha256_of,
)
from tests.trainer.support import keys, make_folder, tree

pytestmark = [pytest.mark.trainer, pytest.mark.usefixtures("isolated_env")]


def kill(*args):
    raise OSError("killed")


# --- file://, pvc://, configmap:// ---------------------------------------------------------------


def test_file_uri_resolves_only_for_local_runs(tmp_path):
    data = tmp_path / "my data.jsonl"
    data.write_text("{}\n")
    assert resolve_input(data.as_uri(), cache_dir=tmp_path / "cache", local=True) == data
    with pytest.raises(StorageError, match=r"file:///.*only works with `kubetune train`.*use pvc:// or s3://"):
        resolve_input(data.as_uri(), cache_dir=tmp_path / "cache")
    with pytest.raises(StorageError, match=r"file:///nowhere/x\.jsonl: .* does not exist"):
        resolve_input("file:///nowhere/x.jsonl", cache_dir=tmp_path / "cache", local=True)


def test_pvc_uri_resolves_under_the_mount_root(pvc_root, tmp_path):
    make_folder(pvc_root / "data" / "models" / "tiny", {"config.json": b"{}"})
    assert resolve_input("pvc://data/models/tiny", cache_dir=tmp_path) == pvc_root / "data" / "models" / "tiny"
    with pytest.raises(StorageError, match=r"pvc://data/models/missing: .* does not exist; check the claim"):
        resolve_input("pvc://data/models/missing", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"pvc://other/x: claim 'other' is not mounted"):
        resolve_input("pvc://other/x", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"'\.\.' is not allowed"):
        resolve_input("pvc://data/../../etc/passwd", cache_dir=tmp_path)


def test_pvc_mount_path_is_shared_with_the_operator(monkeypatch):
    monkeypatch.delenv("KUBETUNE_PVC_ROOT", raising=False)
    assert contract.PVC_ROOT == "/mnt/pvc"
    assert pvc_mount_path("train-data") == "/mnt/pvc/train-data"
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", "/tmp/claims")
    assert pvc_mount_path("train-data") == "/tmp/claims/train-data"


def test_configmap_uri_reads_the_mounted_key(tmp_path, monkeypatch):
    root = tmp_path / "configmaps"
    make_folder(root / "faq", {"train.jsonl": b'{"q": 1}\n'})
    monkeypatch.setenv("KUBETUNE_CONFIGMAP_ROOT", str(root))
    assert resolve_input("configmap://faq/train.jsonl", cache_dir=tmp_path).read_bytes() == b'{"q": 1}\n'
    with pytest.raises(StorageError, match=r"configmap://faq/eval.jsonl: .*has that key"):
        resolve_input("configmap://faq/eval.jsonl", cache_dir=tmp_path)
    monkeypatch.delenv("KUBETUNE_CONFIGMAP_ROOT")
    assert storage.configmap_mount_path("faq") == "/etc/kubetune/configmaps/faq"


def test_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(StorageError, match=r"ftp://x/y: unsupported scheme"):
        resolve_input("ftp://x/y", cache_dir=tmp_path)


# --- https:// ----------------------------------------------------------------------------------


class FileServer(http.server.ThreadingHTTPServer):
    """Serves `files`; `truncate_first` paths send half a body (then close) on their first request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files: dict[str, bytes] = {}
        self.truncate_first: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.hits: Counter[str] = Counter()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.hits[self.path] += 1
        if self.path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.truncate_first and server.hits[self.path] == 1:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_https_downloads_once_and_reuses_the_cache(http_server, tmp_path):
    body = b'{"messages": []}\n' * 50_000  # ~850 KB: several streamed chunks
    http_server.files["/sets/train.jsonl"] = body
    uri = http_server.url("/sets/train.jsonl")
    first = resolve_input(uri, cache_dir=tmp_path)
    second = resolve_input(uri, cache_dir=tmp_path)
    assert first == second and first.name == "train.jsonl" and first.read_bytes() == body
    assert http_server.hits["/sets/train.jsonl"] == 1


def test_https_errors_name_the_uri(http_server, tmp_path):
    uri = http_server.url("/missing.jsonl")
    with pytest.raises(StorageError, match=rf"{uri}: the server answered HTTP 404"):
        resolve_input(uri, cache_dir=tmp_path)
    assert not list((tmp_path / "inputs").iterdir()), "a failed download left something in the cache"


def test_interrupted_download_is_never_taken_as_complete(http_server, tmp_path):
    body = bytes(range(256)) * 4000
    http_server.files["/flaky.bin"] = body
    http_server.truncate_first.add("/flaky.bin")
    uri = http_server.url("/flaky.bin")
    with pytest.raises(StorageError, match=rf"{uri}: download failed"):
        resolve_input(uri, cache_dir=tmp_path)
    assert resolve_input(uri, cache_dir=tmp_path).read_bytes() == body
    assert http_server.hits["/flaky.bin"] == 2
    assert len(list((tmp_path / "inputs").iterdir())) == 1, "partial download left behind"


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://[::1]:9/x", "file:///etc/passwd", "http://2852039166/"],
)
def test_a_redirect_to_a_refused_address_is_never_followed(http_server, tmp_path, monkeypatch, target):
    """Finding 7's https side: the spec's URL passed admission, but its server could bounce the pod
    anywhere; each redirect target is checked by the spec's own URI rule before anything connects."""
    import socket

    http_server.redirects["/bounce.jsonl"] = target
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        assert address[0] in ("127.0.0.1", "::1") and address[1] == http_server.server_address[1], address
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    uri = http_server.url("/bounce.jsonl")
    with pytest.raises(StorageError, match=rf"{uri}: the server redirects to a refused address"):
        resolve_input(uri, cache_dir=tmp_path)
    assert not list((tmp_path / "inputs").iterdir())


def test_a_download_over_the_size_cap_stops_and_leaves_nothing(http_server, tmp_path, monkeypatch):
    http_server.files["/huge.jsonl"] = b"x" * 300_000
    monkeypatch.setenv("KUBETUNE_MAX_DOWNLOAD_BYTES", "100000")
    uri = http_server.url("/huge.jsonl")
    with pytest.raises(StorageError, match=rf"{uri}: larger than 100000 bytes"):
        resolve_input(uri, cache_dir=tmp_path)
    assert not list((tmp_path / "inputs").iterdir()), "a refused download left something in the cache"


# --- hf:// -------------------------------------------------------------------------------------


def test_hf_offline_miss_names_the_uri_and_says_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StorageError, match=r"hf://acme/absent: .*the hub is offline \(HF_HUB_OFFLINE=1\)"):
        resolve_input("hf://acme/absent", cache_dir=tmp_path)


def populate_hf_cache(hub: Path, repo_folder: str, files: dict[str, bytes], ref: str = "main") -> str:
    """The layout huggingface_hub writes: blobs/, snapshots/<commit>/ (links to blobs) and refs/<branch>."""
    commit = hashlib.sha1(repo_folder.encode()).hexdigest()
    repo = hub / repo_folder
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def test_hf_served_from_a_prepopulated_cache(tmp_path, monkeypatch):
    from huggingface_hub import scan_cache_dir

    hub = tmp_path / "hf-home" / "hub"
    files = {"config.json": b'{"model_type": "llama"}', "sub/extra.txt": b"x"}
    commit = populate_hf_cache(hub, "models--acme--tiny", files)
    populate_hf_cache(hub, "datasets--acme--chat", {"train.jsonl": b"{}\n"})
    assert {r.repo_id for r in scan_cache_dir(hub).repos} == {"acme/tiny", "acme/chat"}  # a layout HF recognises
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = resolve_input("hf://acme/tiny", cache_dir=tmp_path)
    assert folder == hub / "models--acme--tiny" / "snapshots" / commit
    assert tree(folder) == files
    assert resolve_input("hf://acme/tiny", cache_dir=tmp_path, revision=commit) == folder
    assert resolve_input("hf://acme/tiny/sub/extra.txt", cache_dir=tmp_path).read_bytes() == b"x"
    assert resolve_input("hf://datasets/acme/chat", cache_dir=tmp_path).joinpath("train.jsonl").is_file()
    with pytest.raises(StorageError, match=r"hf://acme/tiny at revision 'v2': .*offline"):
        resolve_input("hf://acme/tiny", cache_dir=tmp_path, revision="v2")


# --- s3:// -------------------------------------------------------------------------------------


def test_s3_input_single_object_and_prefix(s3, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="sets/train.jsonl", Body=b"{}\n")
    client.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="models/tiny/weights/model.safetensors", Body=b"w" * 10_000)
    client.put_object(Bucket=bucket, Key="models/tiny-other/config.json", Body=b"not me")

    data = resolve_input(f"s3://{bucket}/sets/train.jsonl", cache_dir=tmp_path)
    assert data.name == "train.jsonl" and data.read_bytes() == b"{}\n"
    model = resolve_input(f"s3://{bucket}/models/tiny", cache_dir=tmp_path)
    assert tree(model) == {"config.json": b"{}", "weights/model.safetensors": b"w" * 10_000}

    client.delete_object(Bucket=bucket, Key="sets/train.jsonl")  # a completed download is reused
    assert resolve_input(f"s3://{bucket}/sets/train.jsonl", cache_dir=tmp_path).read_bytes() == b"{}\n"
    with pytest.raises(StorageError, match=rf"s3://{bucket}/sets/absent.jsonl: no object or prefix"):
        resolve_input(f"s3://{bucket}/sets/absent.jsonl", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-kt/x: the bucket does not exist"):
        resolve_input("s3://no-such-bucket-kt/x", cache_dir=tmp_path)


def test_s3_output_publish_list_fetch_delete(s3, tmp_path):
    client, bucket = s3
    out = open_output(f"s3://{bucket}/runs/job1", cache_dir=tmp_path / "cache")
    staging = out.local_dir()
    assert staging.is_dir() and str(staging).startswith(str(tmp_path / "cache"))
    adapter = make_folder(staging / "adapter", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"a" * 5000})

    assert out.publish_dir(adapter, "adapter") == f"s3://{bucket}/runs/job1/adapter"
    assert keys(client, bucket, "runs/job1/adapter/") == [
        "runs/job1/adapter/_COMPLETE",
        "runs/job1/adapter/adapter_config.json",
        "runs/job1/adapter/adapter_model.safetensors",
    ]
    for step in ("step-000100", "step-000200"):
        out.publish_dir(make_folder(tmp_path / step, {"state.pt": step.encode()}), f"checkpoints/{step}")
    client.put_object(Bucket=bucket, Key="runs/job1/checkpoints/step-000300/state.pt", Body=b"half")  # no marker
    assert out.list_complete("checkpoints") == ["checkpoints/step-000100", "checkpoints/step-000200"]
    assert out.list_complete("") == ["adapter"]

    fetched = out.fetch_dir("adapter", tmp_path / "fetched")
    assert tree(fetched) == tree(adapter) and sha256_of(fetched) == sha256_of(adapter)
    with pytest.raises(StorageError, match=r"checkpoints/step-000300: no complete folder"):
        out.fetch_dir("checkpoints/step-000300", tmp_path / "nope")

    out.delete("checkpoints/step-000100")
    assert keys(client, bucket, "runs/job1/checkpoints/step-000100/") == []
    assert out.list_complete("checkpoints") == ["checkpoints/step-000200"]

    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    assert out.publish_file(report, "report.json") == f"s3://{bucket}/runs/job1/report.json"
    assert client.get_object(Bucket=bucket, Key="runs/job1/report.json")["Body"].read() == b'{"ok": true}'


def test_s3_publish_over_an_existing_folder_replaces_it_wholly(s3, tmp_path):
    client, bucket = s3
    out = open_output(f"s3://{bucket}/out", cache_dir=tmp_path)
    out.publish_dir(make_folder(tmp_path / "v1", {"a.bin": b"1", "old-only.bin": b"1"}), "adapter")
    out.publish_dir(make_folder(tmp_path / "v2", {"a.bin": b"2"}), "adapter")
    assert keys(client, bucket, "out/adapter/") == ["out/adapter/_COMPLETE", "out/adapter/a.bin"]
    assert tree(out.fetch_dir("adapter", tmp_path / "got")) == {"a.bin": b"2"}


# --- pvc:// and file:// outputs ------------------------------------------------------------------


def test_pvc_output_publish_list_fetch_delete(pvc_root, tmp_path):
    out = open_output("pvc://data/runs/job1", cache_dir=tmp_path / "cache")
    assert out.local_dir() == pvc_root / "data" / "runs" / "job1"
    src = make_folder(tmp_path / "adapter", {"adapter_config.json": b"{}", "weights/w.bin": b"w"})

    assert out.publish_dir(src, "adapter") == "pvc://data/runs/job1/adapter"
    published = out.local_dir() / "adapter"
    assert (published / COMPLETE_MARKER).is_file()
    assert tree(published).keys() == {"_COMPLETE", "adapter_config.json", "weights/w.bin"}
    assert out.fetch_dir("adapter", tmp_path / "unused") == published
    assert sha256_of(published) == sha256_of(src)

    for step in ("step-000200", "step-000100"):
        out.publish_dir(make_folder(tmp_path / step, {"state.pt": b"s"}), f"checkpoints/{step}")
    assert out.list_complete("checkpoints") == ["checkpoints/step-000100", "checkpoints/step-000200"]
    out.delete("checkpoints/step-000100")
    assert out.list_complete("checkpoints") == ["checkpoints/step-000200"]
    assert [p.name for p in (out.local_dir() / "checkpoints").iterdir()] == ["step-000200"]

    report = tmp_path / "report.json"
    report.write_text("{}")
    assert out.publish_file(report, "report.json") == "pvc://data/runs/job1/report.json"
    assert (out.local_dir() / "report.json").read_text() == "{}"
    assert sorted(p.name for p in out.local_dir().iterdir()) == ["adapter", "checkpoints", "report.json"]


def test_publish_over_an_existing_folder_replaces_it_wholly(pvc_root, tmp_path):
    out = open_output("pvc://data/out", cache_dir=tmp_path)
    out.publish_dir(make_folder(tmp_path / "v1", {"a.bin": b"1", "old-only.bin": b"1"}), "adapter")
    out.publish_dir(make_folder(tmp_path / "v2", {"a.bin": b"2"}), "adapter")
    assert tree(out.local_dir() / "adapter").keys() == {"_COMPLETE", "a.bin"}
    assert (out.local_dir() / "adapter" / "a.bin").read_bytes() == b"2"
    assert [p.name for p in out.local_dir().iterdir()] == ["adapter"], "temporary folders left behind"


def test_crashed_publish_and_delete_are_not_complete(pvc_root, tmp_path, monkeypatch):
    out = open_output("pvc://data/out", cache_dir=tmp_path)
    checkpoints = out.local_dir() / "checkpoints"
    make_folder(checkpoints / ".step-000300.publishing-dead", {"state.pt": b"s", COMPLETE_MARKER: b"{}"})
    make_folder(checkpoints / "step-000400", {"state.pt": b"copied by hand, never marked"})
    assert out.list_complete("checkpoints") == []

    out.publish_dir(make_folder(tmp_path / "good", {"state.pt": b"s"}), "checkpoints/step-000500")
    with monkeypatch.context() as patch, pytest.raises(OSError, match="killed"):
        patch.setattr(storage.os, "rename", kill)
        out.delete("checkpoints/step-000500")  # dies after removing the marker, before the folder goes
    assert out.list_complete("checkpoints") == []

    out.publish_dir(make_folder(tmp_path / "again", {"state.pt": b"t"}), "checkpoints/step-000300")
    assert out.list_complete("checkpoints") == ["checkpoints/step-000300"]
    assert not (checkpoints / ".step-000300.publishing-dead").exists(), "leftover of the crashed publish kept"


def test_failed_publish_leaves_the_previous_folder(pvc_root, tmp_path, monkeypatch):
    out = open_output("pvc://data/out", cache_dir=tmp_path)
    out.publish_dir(make_folder(tmp_path / "v1", {"a.bin": b"1"}), "adapter")
    monkeypatch.setattr(storage, "_fsync_tree", kill)
    with pytest.raises(OSError, match="killed"):
        out.publish_dir(make_folder(tmp_path / "v2", {"a.bin": b"2"}), "adapter")
    assert (out.local_dir() / "adapter" / "a.bin").read_bytes() == b"1"
    assert out.list_complete("") == ["adapter"]
    assert [p.name for p in out.local_dir().iterdir()] == ["adapter"]


def test_output_errors(pvc_root, tmp_path):
    with pytest.raises(StorageError, match=r"pvc://unmounted/out: claim 'unmounted' is not mounted"):
        open_output("pvc://unmounted/out", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"file:///tmp/out: file:// only works with `kubetune train`"):
        open_output("file:///tmp/out", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"https://x/y: outputs can only go to pvc:// or s3://"):
        open_output("https://x/y", cache_dir=tmp_path)
    out = open_output("pvc://data/out", cache_dir=tmp_path)
    with pytest.raises(StorageError, match=r"not a valid name"):
        out.publish_dir(tmp_path, "../escape")


def test_file_output_for_local_runs(tmp_path):
    out = open_output((tmp_path / "out").as_uri(), cache_dir=tmp_path / "cache", local=True)
    out.publish_dir(make_folder(tmp_path / "src", {"x": b"1"}), "adapter")
    assert out.list_complete("") == ["adapter"]
    assert (tmp_path / "out" / "adapter" / "x").read_bytes() == b"1"


# --- sha256_of ---------------------------------------------------------------------------------


def test_sha256_of_files_and_directories(tmp_path):
    files = {"b.bin": b"2" * 3_000_000, "a/c.txt": b"3", "a.txt": b"1"}
    one = make_folder(tmp_path / "one", files)
    two = make_folder(tmp_path / "two", dict(reversed(files.items())))
    assert sha256_of(one / "b.bin") == hashlib.sha256(files["b.bin"]).hexdigest()
    assert sha256_of(one) == sha256_of(two)
    (two / COMPLETE_MARKER).write_text("{}")
    assert sha256_of(one) == sha256_of(two), "the marker is not content"
    (two / "a.txt").rename(two / "a2.txt")
    assert sha256_of(one) != sha256_of(two), "names are part of the digest"
    (one / "a.txt").write_bytes(b"changed")
    assert sha256_of(one) != sha256_of(make_folder(tmp_path / "three", files))
