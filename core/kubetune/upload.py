"""`kubetune upload SRC pvc://CLAIM/PATH`: put local files onto a PersistentVolumeClaim, where
FineTuneJobs and AdapterDeployments read them as pvc://CLAIM/PATH.

Everything goes through the `kubectl` binary (no Kubernetes client library in the core):

1. the claim is created when missing (ReadWriteOnce, --size, --storage-class);
2. a short-lived pod mounts it at /data and sleeps; files are streamed into it with
   `tar -c | kubectl exec -i POD -- tar -x`, into a staging folder next to the destination;
3. every file's sha256 is compared with the local one, in the staging folder;
4. the staging folder (or file) is renamed into place, so a reader sees the old content or the new,
   never half of it: a directory replaces the directory at PATH; a file replaces the file at PATH;
   a directory uploaded to the claim's root is merged into it file by file;
5. the pod is deleted, whatever happened.

The pure parts (target URI, destinations, manifests, shell scripts, kubectl arguments) are separate
from `upload()`, which runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from . import __version__
from .api.common import DNS_LABEL, DNS_SUBDOMAIN, QUANTITY_RE, parse_quantity
from .storage import StorageError

MOUNT = "/data"
UID = 1000
DEFAULT_SIZE = "2Gi"
DEFAULT_TIMEOUT = 300
IMAGE_ENV = "KUBETUNE_UPLOAD_IMAGE"
POD_PREFIX = "kubetune-upload-"
POD_LABELS = {"app.kubernetes.io/name": "kubetune-upload", "app.kubernetes.io/part-of": "kubetune"}
CLAIM_LABELS = {"app.kubernetes.io/created-by": "kubetune-upload", "app.kubernetes.io/part-of": "kubetune"}
# Waiting reasons that will not go away by waiting longer.
FATAL_WAITING = {
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
}
KUBECTL_TIMEOUT = 60  # seconds, for every kubectl call that is not the transfer itself
_TOKEN_CHARS = string.ascii_lowercase + string.digits


def default_image() -> str:
    """$KUBETUNE_UPLOAD_IMAGE, else the operator image of this version (uid 1000, with tar and sha256sum)."""
    return os.environ.get(IMAGE_ENV) or f"ghcr.io/kubetune/operator:{__version__}"


# --- The target URI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """pvc://CLAIM/PATH, PATH relative to the claim's root ('' for the root itself)."""

    claim: str
    path: str

    @property
    def uri(self) -> str:
        return f"pvc://{self.claim}/{self.path}"


def parse_target(uri: str) -> Target:
    """The claim and the path of `uri`; a StorageError for anything that is not a plain pvc:// URI
    inside its claim."""
    parsed = urlparse(uri)
    if parsed.scheme != "pvc" or "://" not in uri:
        raise StorageError(f"{uri!r}: the destination must be pvc://CLAIM/PATH")
    if not parsed.netloc:
        raise StorageError(f"{uri!r}: missing the claim name; write pvc://CLAIM/PATH")
    if not re.match(DNS_LABEL, parsed.netloc) or len(parsed.netloc) > 63:
        raise StorageError(
            f"{uri!r}: {parsed.netloc!r} is not a valid PersistentVolumeClaim name (lowercase letters, digits and '-')"
        )
    if parsed.params or parsed.query or parsed.fragment:
        raise StorageError(f"{uri!r}: ';', '?' and '#' are not allowed in the path")
    return Target(parsed.netloc, _relative_path(uri, parsed.path))


def _relative_path(uri: str, path: str) -> str:
    if path.startswith("//"):
        raise StorageError(f"{uri!r}: the path must be relative to the claim's root, not absolute")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"{uri!r}: '..' is not allowed in the path; name it from the root of the claim")
    if any("\n" in part or "\0" in part for part in parts):
        raise StorageError(f"{uri!r}: the path contains a newline or NUL character")
    return "/".join(parts)


# --- Local files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    name: str  # relative path inside the upload, '/'-separated
    path: Path
    size: int


def local_files(src: Path) -> list[LocalFile]:
    """The regular files to upload, sorted by name: `src` itself, or every file under it (symbolic
    links followed, as the trainer would read them). Empty directories are not uploaded."""
    if not src.exists():
        raise StorageError(f"{src}: no such file or directory")
    if src.is_file():
        return [LocalFile(src.name, src, src.stat().st_size)]
    if not src.is_dir():
        raise StorageError(f"{src}: not a regular file or directory")
    files = sorted(_walk(src, src, set()), key=lambda file: file.name)
    if not files:
        raise StorageError(f"{src}: the directory holds no files to upload")
    return files


def _walk(root: Path, folder: Path, seen: set[tuple[int, int]]) -> Iterator[LocalFile]:
    info = folder.stat()
    if (info.st_dev, info.st_ino) in seen:
        raise StorageError(f"{folder}: symbolic link loop; upload a directory without one")
    seen = seen | {(info.st_dev, info.st_ino)}
    for entry in sorted(folder.iterdir()):
        name = entry.relative_to(root).as_posix()
        if "\n" in name:
            raise StorageError(f"{entry!r}: file names with a newline cannot be uploaded")
        if entry.is_dir():
            yield from _walk(root, entry, seen)
        elif entry.is_file():
            yield LocalFile(name, entry, entry.stat().st_size)
        elif entry.is_symlink():
            raise StorageError(f"{entry}: broken symbolic link; fix or remove it before uploading")
        else:
            raise StorageError(f"{entry}: not a regular file (socket, fifo or device); remove it before uploading")


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# --- Where the files go in the pod ---------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """Paths inside the upload pod. tar extracts into `staging`; `commit_script` moves it to `final`."""

    final: str  # /data/PATH
    staging: str  # a folder on the same volume, renamed (or emptied) into place
    aside: str  # where a replaced directory waits while the new one is renamed in ('' for files and the root)
    is_dir: bool
    is_root: bool = False


def destination(target: Target, is_dir: bool, token: str, mount: str = MOUNT) -> Destination:
    """Where a directory (its contents become PATH) or a file (written as PATH) is staged and published.
    `token` makes the staging names unique to one upload."""
    final = str(PurePosixPath(mount, target.path))
    if not is_dir:
        if not target.path:
            raise StorageError(f"{target.uri}: a file needs a path on the claim, e.g. pvc://{target.claim}/NAME")
        parent, name = posixpath_split(final)
        return Destination(final, f"{parent}/.{name}.upload-tmp-{token}", "", False)
    if not target.path:
        return Destination(final, f"{final}/.upload-tmp-{token}", "", True, is_root=True)
    return Destination(final, f"{final}.upload-tmp-{token}", f"{final}.upload-old-{token}", True)


def posixpath_split(path: str) -> tuple[str, str]:
    pure = PurePosixPath(path)
    return str(pure.parent), pure.name


def extract_script(dest: Destination, uri: str) -> str:
    """Reads a tar stream on stdin into the staging folder, readable by every uid."""
    q = shlex.quote
    guard = ""
    if not dest.is_dir:
        guard = f"if [ -d {q(dest.final)} ]; then echo {q(f'{uri} is a directory on the claim')} >&2; exit 3; fi; "
    elif not dest.is_root:
        guard = (
            f"if [ -e {q(dest.final)} ] && [ ! -d {q(dest.final)} ]; "
            f"then echo {q(f'{uri} is a file on the claim, not a directory')} >&2; exit 3; fi; "
        )
    staging = q(dest.staging)
    return (
        f"set -e; umask 022; {guard}"
        f"mkdir -p {staging} && tar -x --no-same-owner -m -C {staging} && chmod -R a+rX {staging}"
    )


def verify_script(dest: Destination) -> str:
    """Reads relative file names on stdin, one a line, and prints the sha256 of each, in order."""
    return (
        f"set -e; cd {shlex.quote(dest.staging)}; "
        'while IFS= read -r f; do h=$(sha256sum < "$f"); echo "${h%% *}"; done'
    )


def commit_script(dest: Destination, local_name: str = "") -> str:
    """Moves the staged content into place with rename(2), so readers never see half of it.

    A directory replaces the one at PATH (the old one is moved aside, then removed); a file replaces
    the file at PATH; at the claim's root, each file (names on stdin) replaces its namesake.
    """
    q = shlex.quote
    if dest.is_root:
        return (
            f"set -e; umask 022; cd {q(dest.staging)}; "
            f"root={q(dest.final)}; "
            "while IFS= read -r f; do "
            'case "$f" in */*) mkdir -p "$root/${f%/*}";; esac; '
            'if [ -d "$root/$f" ]; then echo "$f is a directory on the claim" >&2; exit 3; fi; '
            'mv -f "./$f" "$root/$f"; done; '
            f"cd /; rm -rf {q(dest.staging)}"
        )
    if dest.is_dir:
        final, aside = q(dest.final), q(dest.aside)
        return (
            f"set -e; if [ -e {final} ] || [ -L {final} ]; then mv {final} {aside}; fi; "
            f"mv {q(dest.staging)} {final}; rm -rf {aside}"
        )
    staged = f"{dest.staging}/{local_name}"
    return (
        f"set -e; if [ -d {q(dest.final)} ]; then echo {q(f'{dest.final} is a directory')} >&2; exit 3; fi; "
        f"mv -f {q(staged)} {q(dest.final)}; rmdir {q(dest.staging)}"
    )


def cleanup_script(dest: Destination) -> str:
    return f"rm -rf {shlex.quote(dest.staging)}"


# --- Manifests -----------------------------------------------------------------------------------


def claim_manifest(claim: str, namespace: str, size: str, storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace, "labels": dict(CLAIM_LABELS)},
        "spec": spec,
    }


def pod_name(token: str) -> str:
    return POD_PREFIX + token


def new_token() -> str:
    return "".join(secrets.choice(_TOKEN_CHARS) for _ in range(5))


def pod_manifest(name: str, namespace: str, claim: str, image: str, timeout: int) -> dict[str, Any]:
    """A pod that mounts the claim at /data and sleeps `timeout` seconds, as uid 1000 with no
    privileges (it passes the "restricted" Pod Security Standard). No fsGroup: the kubelet would
    chown every file of the volume."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(POD_LABELS)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "upload",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sleep", str(timeout)],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                    "volumeMounts": [{"name": "data", "mountPath": MOUNT}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


# --- Pod status ----------------------------------------------------------------------------------


def pod_phase(pod: dict[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def fatal_reason(pod: dict[str, Any]) -> str | None:
    """Why the pod will never run (an image that cannot be pulled, a bad container config), or None."""
    for status in pod.get("status", {}).get("containerStatuses", []):
        waiting = status.get("state", {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            return _reason_line(waiting)
        terminated = status.get("state", {}).get("terminated")
        if terminated:
            return f"the container exited ({_reason_line(terminated)})"
    if pod_phase(pod) in ("Failed", "Succeeded"):
        return f"the pod ended ({pod.get('status', {}).get('reason') or pod_phase(pod)})"
    return None


def pending_reason(pod: dict[str, Any]) -> str:
    """Why the pod is not running yet: a container's waiting reason, else the scheduler's message."""
    status = pod.get("status", {})
    for container in status.get("containerStatuses", []):
        waiting = container.get("state", {}).get("waiting")
        if waiting:
            return _reason_line(waiting)
    for condition in status.get("conditions", []):
        if condition.get("type") == "PodScheduled" and condition.get("status") != "True":
            return _reason_line(condition)
    return pod_phase(pod)


def _reason_line(fields: dict[str, Any]) -> str:
    reason, message = fields.get("reason") or "", one_line(str(fields.get("message") or ""))
    return f"{reason}: {message}" if reason and message else reason or message or "unknown"


def last_warning(events: dict[str, Any]) -> str | None:
    """The newest Warning event's reason and message, from `kubectl get events -o json`."""
    warnings = [e for e in events.get("items", []) if e.get("type") == "Warning"]
    if not warnings:
        return None
    newest = max(warnings, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return _reason_line(newest)


def one_line(text: str, limit: int = 400) -> str:
    """kubectl's (or a script's) stderr as one line, without kubectl exec's "command terminated" trailer."""
    parts = [part.strip() for part in text.strip().splitlines() if part.strip()]
    if len(parts) > 1 and parts[-1].startswith("command terminated with exit code"):
        parts.pop()
    line = "; ".join(parts)
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- kubectl -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kubectl:
    """Argument lists for the `kubectl` binary, with --kubeconfig/--context on every call."""

    binary: str = "kubectl"
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None

    def args(self, *rest: str) -> list[str]:
        flags = [self.binary]
        if self.kubeconfig:
            flags += ["--kubeconfig", self.kubeconfig]
        if self.context:
            flags += ["--context", self.context]
        if self.namespace:
            flags += ["--namespace", self.namespace]
        return flags + list(rest)

    def in_namespace(self, namespace: str) -> Kubectl:
        return Kubectl(self.binary, self.kubeconfig, self.context, namespace)

    def exec_args(self, pod: str, script: str, stdin: bool = False) -> list[str]:
        return self.args("exec", *(["-i"] if stdin else []), pod, "--", "sh", "-c", script)

    def run(self, *rest: str, input: str | None = None, timeout: float = KUBECTL_TIMEOUT) -> str:
        """kubectl's stdout; a StorageError with kubectl's message when it fails."""
        result = _run(self.args(*rest), input, timeout)
        if result.returncode != 0:
            raise StorageError(f"kubectl {rest[0]} failed: {one_line(result.stderr) or f'exit {result.returncode}'}")
        return result.stdout

    def get_json(self, *rest: str) -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        result = _run(self.args("get", *rest, "-o", "json"), None, KUBECTL_TIMEOUT)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise StorageError(f"kubectl get {' '.join(rest)} failed: {one_line(result.stderr)}")
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded


def _run(args: list[str], input: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise StorageError(f"kubectl did not answer within {timeout:.0f}s: {shlex.join(args[1:4])} ...") from error


def find_kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise StorageError(
            "kubectl not found on PATH; install it (https://kubernetes.io/docs/tasks/tools/) or fix PATH"
        )
    return found


def local_tar_args(src: Path, list_file: Path) -> list[str]:
    """tar writing the files named in `list_file` (NUL-separated, relative to `src`) to stdout, links followed."""
    return ["tar", "-c", "-h", "-f", "-", "-C", str(src), "--null", "-T", str(list_file)]


# --- The upload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    src: Path
    uri: str
    namespace: str | None = None
    size: str = DEFAULT_SIZE
    storage_class: str | None = None
    image: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    timeout: int = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Result:
    files: int
    size: int
    target: Target
    namespace: str
    created: bool

    def summary(self) -> str:
        files = "1 file" if self.files == 1 else f"{self.files} files"
        claim = "claim created" if self.created else "claim existing"
        return (
            f"uploaded {files} ({self.size / 2**20:.1f} MiB) to {self.target.uri} "
            f"in namespace {self.namespace} ({claim})"
        )


def check_options(options: Options) -> None:
    if not QUANTITY_RE.match(options.size) or parse_quantity(options.size) <= 0:
        raise ValueError(f"--size {options.size!r} is not a storage size (examples: 2Gi, 500Mi)")
    if options.storage_class is not None and not re.match(DNS_SUBDOMAIN, options.storage_class):
        raise ValueError(f"--storage-class {options.storage_class!r} is not a valid StorageClass name")
    if options.namespace is not None and not re.match(DNS_LABEL, options.namespace):
        raise ValueError(f"--namespace {options.namespace!r} is not a valid namespace name")
    if options.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, not {options.timeout}")


def upload(options: Options, say: Callable[[str], None] = print) -> Result:
    """Copy options.src onto the claim; see the module's docstring for the steps."""
    check_options(options)
    target = parse_target(options.uri)
    src = options.src.expanduser()
    files = local_files(src)
    total = sum(file.size for file in files)
    token = new_token()
    dest = destination(target, src.is_dir(), token)
    kubectl = Kubectl(find_kubectl(), options.kubeconfig, options.context)
    namespace = options.namespace or current_namespace(kubectl)
    kubectl = kubectl.in_namespace(namespace)
    created = ensure_claim(kubectl, target.claim, namespace, options, total, say)
    try:
        with upload_pod(kubectl, token, target.claim, options, say) as pod:
            transfer(kubectl, pod, src, files, dest, target, options.timeout)
    except BaseException:
        if created:  # leave nothing behind: a claim made with a wrong --storage-class would be reused
            _run(kubectl.args("delete", "pvc", target.claim, "--wait=false"), None, KUBECTL_TIMEOUT)
            say(f"deleted PersistentVolumeClaim {target.claim}, created for this upload")
        raise
    return Result(len(files), total, target, namespace, created)


def current_namespace(kubectl: Kubectl) -> str:
    """The namespace of the kubeconfig's current context, else default."""
    return kubectl.run("config", "view", "--minify", "-o", "jsonpath={..namespace}").strip() or "default"


def ensure_claim(
    kubectl: Kubectl, claim: str, namespace: str, options: Options, total: int, say: Callable[[str], None]
) -> bool:
    """Creates the claim when it does not exist; True when it did not."""
    existing = kubectl.get_json("persistentvolumeclaim", claim)
    if existing is not None:
        if existing.get("metadata", {}).get("deletionTimestamp"):
            raise StorageError(f"claim {claim!r} in namespace {namespace} is being deleted; wait, then upload again")
        return False
    if total > parse_quantity(options.size):
        raise ValueError(f"the files take {total / 2**20:.1f} MiB, more than --size {options.size}; raise --size")
    manifest = claim_manifest(claim, namespace, options.size, options.storage_class)
    result = _run(kubectl.args("create", "-f", "-"), json.dumps(manifest), KUBECTL_TIMEOUT)
    if result.returncode != 0:
        if "AlreadyExists" in result.stderr:  # created meanwhile by someone else
            return False
        raise StorageError(f"cannot create claim {claim!r} in namespace {namespace}: {one_line(result.stderr)}")
    storage_class = options.storage_class or "the cluster's default"
    say(f"created PersistentVolumeClaim {claim} ({options.size}, ReadWriteOnce, storage class {storage_class})")
    return True


@contextmanager
def upload_pod(kubectl: Kubectl, token: str, claim: str, options: Options, say: Callable[[str], None]) -> Iterator[str]:
    """A running upload pod, deleted on the way out whatever happens (errors, Ctrl-C)."""
    name = pod_name(token)
    manifest = pod_manifest(
        name, kubectl.namespace or "default", claim, options.image or default_image(), options.timeout
    )
    try:
        kubectl.run("create", "-f", "-", input=json.dumps(manifest))
        say(f"waiting for pod {name} to start (at most {options.timeout}s)")
        wait_running(kubectl, name, claim, options.timeout)
        yield name
    finally:
        _run(kubectl.args("delete", "pod", name, "--wait=false", "--ignore-not-found"), None, KUBECTL_TIMEOUT)


def wait_running(kubectl: Kubectl, name: str, claim: str, timeout: int) -> None:
    deadline = time.monotonic() + timeout
    pod: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pod = kubectl.get_json("pod", name) or {}
        if pod_phase(pod) == "Running":
            return
        fatal = fatal_reason(pod)
        if fatal:
            raise StorageError(f"upload pod {name} cannot start: {fatal}")
        time.sleep(0.5)
    why = pending_reason(pod)
    for kind, obj in (("pod", name), ("persistentvolumeclaim", claim)):
        warning = last_warning(kubectl.get_json("events", "--field-selector", f"involvedObject.name={obj}") or {})
        if warning and warning.partition(": ")[2] not in why:
            why += f"; {kind} {obj}: {warning}"
    raise StorageError(f"upload pod {name} not running after {timeout}s: {why}")


def transfer(
    kubectl: Kubectl, pod: str, src: Path, files: list[LocalFile], dest: Destination, target: Target, timeout: int
) -> None:
    """Stream, verify and publish; the staging folder is removed when any step fails."""
    names = "".join(f"{file.name}\n" for file in files)
    try:
        stream(kubectl, pod, src, files, dest, target)
        verify(kubectl, pod, files, dest, names, timeout)
        exec_script(kubectl, pod, commit_script(dest, files[0].name), names if dest.is_root else None, timeout)
    except BaseException:
        _run(kubectl.exec_args(pod, cleanup_script(dest)), None, KUBECTL_TIMEOUT)
        raise


def stream(kubectl: Kubectl, pod: str, src: Path, files: list[LocalFile], dest: Destination, target: Target) -> None:
    """`tar -c` here piped into `tar -x` in the pod."""
    tar_dir = src if src.is_dir() else src.parent
    env = {**os.environ, "COPYFILE_DISABLE": "1"}  # macOS tar: no ._ resource-fork files
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listing, tempfile.TemporaryFile("w+") as tar_err:
        listing.write("".join(f"{file.name}\0" for file in files))
        listing.flush()
        tar = subprocess.Popen(
            local_tar_args(tar_dir, Path(listing.name)), stdout=subprocess.PIPE, stderr=tar_err, env=env
        )
        assert tar.stdout is not None
        remote = subprocess.Popen(
            kubectl.exec_args(pod, extract_script(dest, target.uri), stdin=True),
            stdin=tar.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        tar.stdout.close()  # kubectl holds the pipe now: tar stops when kubectl does
        try:
            _, remote_err = remote.communicate()
        finally:
            tar_rc = tar.wait()
        if remote.returncode != 0:
            raise StorageError(f"writing to {target.uri} failed: {_explain(remote_err)}")
        if tar_rc != 0:
            tar_err.seek(0)
            raise StorageError(f"reading {src} failed: {one_line(tar_err.read())}")


def _explain(stderr: str) -> str:
    message = one_line(stderr) or "kubectl exec failed"
    if "Permission denied" in stderr:
        message += f" (the upload pod runs as uid {UID} without fsGroup: the volume must be writable by it)"
    return message


def verify(kubectl: Kubectl, pod: str, files: list[LocalFile], dest: Destination, names: str, timeout: int) -> None:
    """The sha256 of every staged file in the pod equals the local one (names sorted, relative)."""
    remote = exec_script(kubectl, pod, verify_script(dest), names, timeout).split()
    remote += [""] * (len(files) - len(remote))
    for file, digest in zip(files, remote, strict=False):
        if sha256_of(file.path) != digest:
            raise StorageError(f"{file.name}: the copy on the claim differs from {file.path} (sha256); upload again")


def exec_script(kubectl: Kubectl, pod: str, script: str, stdin: str | None, timeout: float) -> str:
    result = _run(kubectl.exec_args(pod, script, stdin=stdin is not None), stdin, timeout)
    if result.returncode != 0:
        raise StorageError(f"in upload pod {pod}: {_explain(result.stderr)}")
    return result.stdout
