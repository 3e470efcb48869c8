"""`kubetune upload`: the target URI, where files are staged and published, the pod and claim
manifests, the kubectl calls, and the shell scripts the pod runs (run here with sh and tar on a
folder standing in for the volume)."""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune import __version__
from kubetune.cli import main
from kubetune.storage import StorageError
from kubetune.upload import (
    Destination,
    Kubectl,
    Result,
    Target,
    claim_manifest,
    commit_script,
    default_image,
    destination,
    extract_script,
    fatal_reason,
    last_warning,
    local_files,
    local_tar_args,
    new_token,
    one_line,
    parse_target,
    pending_reason,
    pod_manifest,
    pod_name,
    sha256_of,
    verify_script,
)

pytestmark = pytest.mark.unit


# --- the target URI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, claim, path",
    [
        ("pvc://kubetune-data/models/tiny-llama", "kubetune-data", "models/tiny-llama"),
        ("pvc://kubetune-data/datasets/support-chat.jsonl", "kubetune-data", "datasets/support-chat.jsonl"),
        ("pvc://data/models/tiny-llama/", "data", "models/tiny-llama"),
        ("pvc://data/./models//x", "data", "models/x"),
        ("pvc://data", "data", ""),
        ("pvc://data/", "data", ""),
    ],
)
def test_a_pvc_uri_names_a_claim_and_a_path_relative_to_its_root(uri, claim, path):
    target = parse_target(uri)
    assert (target.claim, target.path) == (claim, path)
    assert target.uri == f"pvc://{claim}/{path}"


@pytest.mark.parametrize(
    "uri, words",
    [
        ("pvc:///models/x", "missing the claim name"),
        ("pvc://data/../x", "'..' is not allowed"),
        ("pvc://data/models/../../etc", "'..' is not allowed"),
        ("pvc://data//etc/passwd", "not absolute"),
        ("/data/models/x", "must be pvc://CLAIM/PATH"),
        ("s3://bucket/models/x", "must be pvc://CLAIM/PATH"),
        ("data/models", "must be pvc://CLAIM/PATH"),
        ("pvc://Kubetune_Data/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://data/x?y=1", "not allowed in the path"),
        ("pvc://data/x#frag", "not allowed in the path"),
    ],
)
def test_uris_outside_a_claim_are_refused_with_the_reason(uri, words):
    with pytest.raises(StorageError) as error:
        parse_target(uri)
    assert words in str(error.value) and uri in str(error.value)


# --- destinations: a directory's contents become PATH, a file is written as PATH -----------------


def test_a_directory_is_staged_beside_its_destination_and_replaces_it():
    dest = destination(Target("data", "models/tiny-llama"), is_dir=True, token="ab1c2")
    assert dest.final == "/data/models/tiny-llama"
    assert dest.staging == "/data/models/tiny-llama.upload-tmp-ab1c2"  # same volume: rename(2) is atomic
    assert dest.aside == "/data/models/tiny-llama.upload-old-ab1c2"
    assert dest.is_dir and not dest.is_root


def test_a_file_is_staged_in_a_hidden_folder_of_its_parent():
    dest = destination(Target("data", "datasets/chat.jsonl"), is_dir=False, token="ab1c2")
    assert dest.final == "/data/datasets/chat.jsonl"
    assert dest.staging == "/data/datasets/.chat.jsonl.upload-tmp-ab1c2"
    assert not dest.is_dir and not dest.is_root


def test_a_directory_can_go_to_the_claims_root_but_a_file_cannot():
    root = destination(Target("data", ""), is_dir=True, token="ab1c2")
    assert root.is_root and root.final == "/data" and root.staging == "/data/.upload-tmp-ab1c2"
    with pytest.raises(StorageError, match="a file needs a path on the claim"):
        destination(Target("data", ""), is_dir=False, token="ab1c2")


def test_tokens_and_pod_names_are_short_dns_labels():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) > 1
    for token in tokens:
        assert len(token) == 5 and token.isalnum() and token == token.lower()
        assert pod_name(token) == f"kubetune-upload-{token}"


# --- manifests -----------------------------------------------------------------------------------


def test_the_pod_mounts_the_claim_at_data_and_runs_unprivileged():
    pod = pod_manifest("kubetune-upload-ab1c2", "ns1", "kubetune-data", "img:1", 120)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert pod["metadata"] == {
        "name": "kubetune-upload-ab1c2",
        "namespace": "ns1",
        "labels": {"app.kubernetes.io/name": "kubetune-upload", "app.kubernetes.io/part-of": "kubetune"},
    }
    assert spec["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "kubetune-data"}}]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert container["image"] == "img:1" and container["command"] == ["sleep", "120"]
    assert spec["restartPolicy"] == "Never"
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 1000 and pod_security["runAsGroup"] == 1000
    assert "fsGroup" not in pod_security  # the kubelet would chown the whole volume
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}


def test_a_new_claim_is_read_write_once_with_the_size_and_optional_class():
    claim = claim_manifest("kubetune-data", "ns1", "5Gi", None)
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == "kubetune-data" and claim["metadata"]["namespace"] == "ns1"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}
    assert claim_manifest("c", "ns1", "2Gi", "fast")["spec"]["storageClassName"] == "fast"


def test_the_default_image_is_the_operator_image_of_this_version_unless_the_env_says(monkeypatch):
    monkeypatch.delenv("KUBETUNE_UPLOAD_IMAGE", raising=False)
    assert default_image() == f"ghcr.io/kubetune/operator:{__version__}"
    monkeypatch.setenv("KUBETUNE_UPLOAD_IMAGE", "registry.local/tools:1")
    assert default_image() == "registry.local/tools:1"


# --- kubectl arguments ---------------------------------------------------------------------------


def test_kubeconfig_context_and_namespace_go_on_every_call():
    kubectl = Kubectl("/bin/kubectl", kubeconfig="/k/config", context="kind").in_namespace("ns1")
    assert kubectl.args("get", "pod", "p") == [
        "/bin/kubectl",
        "--kubeconfig",
        "/k/config",
        "--context",
        "kind",
        "--namespace",
        "ns1",
        "get",
        "pod",
        "p",
    ]
    assert kubectl.exec_args("p", "echo hi", stdin=True)[-7:] == ["exec", "-i", "p", "--", "sh", "-c", "echo hi"]
    assert "-i" not in kubectl.exec_args("p", "echo hi")


def test_without_flags_kubectl_uses_its_own_configuration():
    assert Kubectl("kubectl").args("get", "pvc") == ["kubectl", "get", "pvc"]


# --- pod status ----------------------------------------------------------------------------------


def test_an_image_that_cannot_be_pulled_is_fatal_with_its_reason():
    pod = {
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:1"'}}}
            ],
        }
    }
    assert fatal_reason(pod) == 'ImagePullBackOff: Back-off pulling image "x:1"'
    creating = {"status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "Creating"}}}]}}
    assert fatal_reason(creating) is None
    assert pending_reason(creating) == "Creating"


def test_an_unscheduled_pod_says_why_and_the_newest_warning_event_is_picked():
    pod = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes\nfree"}
            ],
        }
    }
    assert fatal_reason(pod) is None
    assert pending_reason(pod) == "Unschedulable: 0/2 nodes; free"
    events = {
        "items": [
            {"type": "Warning", "reason": "Old", "message": "a", "lastTimestamp": "2025-01-01T00:00:00Z"},
            {"type": "Normal", "reason": "Scheduled", "message": "b", "lastTimestamp": "2025-01-03T00:00:00Z"},
            {"type": "Warning", "reason": "Failed", "message": "c", "lastTimestamp": "2025-01-02T00:00:00Z"},
        ]
    }
    assert last_warning(events) == "Failed: c"
    assert last_warning({"items": []}) is None


def test_kubectl_errors_become_one_line_without_the_exec_trailer():
    assert one_line("x is a directory\ncommand terminated with exit code 3\n") == "x is a directory"
    assert one_line("a\n\n  b  \n") == "a; b"
    assert len(one_line("x" * 1000)) == 400


def test_the_summary_line():
    result = Result(6, 880 * 1024, Target("kubetune-data", "models/tiny-llama"), "ns1", created=True)
    assert result.summary() == (
        "uploaded 6 files (0.9 MiB) to pvc://kubetune-data/models/tiny-llama in namespace ns1 (claim created)"
    )
    assert "(claim existing)" in Result(1, 0, Target("c", "f"), "ns1", created=False).summary()


# --- local files ---------------------------------------------------------------------------------


def make_model(folder: Path) -> Path:
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}\n')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "tokenizer" / "tokenizer.json").write_text("{}\n")
    return folder


def test_a_directorys_files_are_listed_sorted_relative_with_links_followed(tmp_path):
    model = make_model(tmp_path / "model")
    blob = tmp_path / "blob"
    blob.write_text("linked\n")
    (model / "linked.txt").symlink_to(blob)
    files = local_files(model)
    assert [f.name for f in files] == ["config.json", "linked.txt", "model.safetensors", "tokenizer/tokenizer.json"]
    assert files[1].size == len("linked\n")
    (file,) = local_files(model / "config.json")
    assert file.name == "config.json" and file.size == len('{"a": 1}\n')


def test_missing_empty_and_broken_sources_are_refused(tmp_path):
    with pytest.raises(StorageError, match="no such file or directory"):
        local_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="holds no files"):
        local_files(tmp_path / "empty")
    model = make_model(tmp_path / "model")
    (model / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StorageError, match="broken symbolic link"):
        local_files(model)


# --- the pod's scripts, run here on a folder standing in for the volume --------------------------


def sh(script: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", script], input=stdin, capture_output=True, check=False)


def upload_here(src: Path, target: Target, volume: Path, token: str = "ab1c2") -> Destination:
    """What `upload` does in the pod, with `volume` as /data: extract, verify, commit."""
    files = local_files(src)
    dest = destination(target, src.is_dir(), token, mount=str(volume))
    listing = volume.parent / f"list-{token}"
    listing.write_text("".join(f"{f.name}\0" for f in files))
    stream = subprocess.run(
        local_tar_args(src if src.is_dir() else src.parent, listing), capture_output=True, check=True
    ).stdout
    extracted = sh(extract_script(dest, target.uri), stream)
    assert extracted.returncode == 0, extracted.stderr
    names = "".join(f"{f.name}\n" for f in files).encode()
    digests = sh(verify_script(dest), names).stdout.decode().split()
    assert digests == [sha256_of(f.path) for f in files]
    committed = sh(commit_script(dest, files[0].name), names if dest.is_root else b"")
    assert committed.returncode == 0, committed.stderr
    return dest


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_directory_replaces_the_old_one_whole_and_is_readable_by_everyone(tmp_path):
    volume = tmp_path / "volume"
    old = volume / "models" / "tiny-llama"
    old.mkdir(parents=True)
    (old / "stale.bin").write_text("from the previous upload\n")
    model = make_model(tmp_path / "model")
    os.chmod(model / "config.json", 0o600)  # private here; trainer pods run as other uids

    upload_here(model, Target("data", "models/tiny-llama"), volume)

    assert tree(old) == tree(model)  # the stale file went with the old directory
    assert sorted(p.name for p in (volume / "models").iterdir()) == ["tiny-llama"]  # no staging left behind
    for path in [old, *old.rglob("*")]:
        mode = path.stat().st_mode
        assert mode & stat.S_IROTH, path
        assert not path.is_dir() or mode & stat.S_IXOTH, path


def test_uploading_the_same_directory_twice_leaves_one_copy(tmp_path):
    volume = tmp_path / "volume"
    model = make_model(tmp_path / "model")
    upload_here(model, Target("data", "models/m"), volume, token="first")
    upload_here(model, Target("data", "models/m"), volume, token="again")
    assert tree(volume) == {f"models/m/{name}": digest for name, digest in tree(model).items()}


def test_a_file_is_written_as_path_whatever_its_local_name(tmp_path):
    volume = tmp_path / "volume"
    local = tmp_path / "support-chat-v2.jsonl"
    local.write_text('{"messages": []}\n')
    upload_here(local, Target("data", "datasets/chat.jsonl"), volume)
    assert (volume / "datasets" / "chat.jsonl").read_text() == '{"messages": []}\n'
    assert sorted(p.name for p in (volume / "datasets").iterdir()) == ["chat.jsonl"]


def test_a_file_does_not_replace_a_directory_nor_a_directory_a_file(tmp_path):
    volume = tmp_path / "volume"
    (volume / "models" / "m").mkdir(parents=True)
    (volume / "data.jsonl").write_text("keep\n")
    file_target = destination(Target("data", "models/m"), False, "ab1c2", mount=str(volume))
    refused = sh(extract_script(file_target, "pvc://data/models/m"))
    assert refused.returncode == 3 and b"pvc://data/models/m is a directory on the claim" in refused.stderr
    dir_target = destination(Target("data", "data.jsonl"), True, "ab1c2", mount=str(volume))
    refused = sh(extract_script(dir_target, "pvc://data/data.jsonl"))
    assert refused.returncode == 3 and b"is a file on the claim" in refused.stderr
    assert (volume / "data.jsonl").read_text() == "keep\n"


def test_a_directory_at_the_claims_root_is_merged_file_by_file(tmp_path):
    volume = tmp_path / "volume"
    (volume / "models").mkdir(parents=True)
    (volume / "models" / "other.bin").write_text("someone else's\n")
    (volume / "config.json").write_text("old\n")
    upload_here(make_model(tmp_path / "model"), Target("data", ""), volume)
    assert (volume / "models" / "other.bin").read_text() == "someone else's\n"
    assert (volume / "config.json").read_text() == '{"a": 1}\n'
    assert (volume / "tokenizer" / "tokenizer.json").exists()
    assert not [p for p in volume.iterdir() if "upload-tmp" in p.name]


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, words",
    [
        ("pvc://data/../etc", "'..' is not allowed"),
        ("pvc:///models/x", "missing the claim name"),
        ("/data/models/x", "must be pvc://CLAIM/PATH"),
    ],
)
def test_a_bad_target_is_one_line_and_exit_2(target, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # refused before any kubectl call
    model = make_model(tmp_path / "model")
    assert main(["upload", str(model), target]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("kubetune upload: ") and words in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_options_and_sources_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # refused before any kubectl call
    model = make_model(tmp_path / "model")
    cases = [
        (["upload", str(tmp_path / "missing"), "pvc://data/x"], "no such file or directory"),
        (["upload", str(model / "config.json"), "pvc://data"], "a file needs a path on the claim"),
        (["upload", str(model), "pvc://data/x", "--size", "lots"], "is not a storage size"),
        (["upload", str(model), "pvc://data/x", "--timeout", "0"], "--timeout must be a positive"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_without_kubectl_on_path_the_error_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert main(["upload", str(make_model(tmp_path / "model")), "pvc://data/models/m"]) == 2
    assert capsys.readouterr().err == (
        "kubetune upload: kubectl not found on PATH; install it (https://kubernetes.io/docs/tasks/tools/) or fix PATH\n"
    )


FAKE_KUBECTL = """#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
while args and args[0].startswith("--"):
    args = args[2:]
if args[:2] == ["get", "persistentvolumeclaim"]:
    print(json.dumps({{"metadata": {{"name": args[2]}}}}))
elif args[:2] == ["get", "pod"]:
    print(json.dumps({{"status": {{"phase": "Running"}}}}))
elif args[0] == "exec":
    sys.stdin.buffer.read()
    sys.exit("tar: /data/models: Cannot mkdir: Permission denied\\ncommand terminated with exit code 2")
"""


def test_a_failed_transfer_deletes_the_pod_and_every_call_honours_kubeconfig_and_context(tmp_path, capsys, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["upload", str(make_model(tmp_path / "model")), "pvc://data/models/m", "-n", "ns1"]

    assert main([*argv, "--kubeconfig", "/k/config", "--context", "kind", "--image", "img:1"]) == 2

    err = capsys.readouterr().err
    assert err.startswith("kubetune upload: writing to pvc://data/models/m failed: tar: /data/models: Cannot mkdir")
    assert "uid 1000 without fsGroup" in err and err.count("\n") == 1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(call[:6] == ["--kubeconfig", "/k/config", "--context", "kind", "--namespace", "ns1"] for call in calls)
    verbs = [call[6] for call in calls]
    assert verbs[:3] == ["get", "create", "get"]  # the claim exists: only the pod is created
    assert verbs[-1] == "delete" and calls[-1][7:9] == ["pod", calls[-1][8]] and "--wait=false" in calls[-1]
    assert calls[-1][8].startswith("kubetune-upload-")
    assert calls[-2][-1].startswith("rm -rf /data/models/m.upload-tmp-")  # the staging folder is removed
