"""Where the trainer and the serving runtime read models, datasets and adapters, and where the
trainer writes adapters, reports and checkpoints.

One module owns every URI scheme of the API (checked offline by `kubetune.api.validation`), so the
training loop and the serving engine only ever see local paths. Only the standard library is
imported here; each remote backend (httpx, huggingface_hub, boto3) is imported when a URI needs it:

* inputs: `resolve_input(uri)` returns a local file or directory. Remote content is downloaded once
  into `cache_dir`, into a temporary folder renamed into place only when complete, so a download killed
  halfway is never mistaken for a finished one.
* outputs: `open_output(uri)` returns an `OutputLocation`; its `probe()` proves it writable before
  any work is done, so a read-only or impossible output fails a job in seconds, not after training.
  Folders are published whole or not at all,
  and a folder counts as published only when it holds a `_COMPLETE` marker, written last. The marker
  means the same on a PVC, a local disk and S3, so resuming from "the newest complete checkpoint" is
  one rule everywhere.

Schemes: hf://ORG/NAME[/PATH], pvc://CLAIM/PATH, s3://BUCKET/PATH, file:///PATH (local runs only),
http(s)://HOST/PATH and configmap://NAME/KEY (datasets). Every failure is a `StorageError` whose
message names the URI and says what to do about it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from .contract import COMPLETE_MARKER, PVC_ROOT_ENV, configmap_mount_path, pvc_mount_path

_CHUNK = 1024 * 1024
_TRUE = {"1", "on", "yes", "true"}


def local_cache() -> Path:
    """Where local runs keep downloads, runs and staging: $KUBETUNE_CACHE or ~/.cache/kubetune."""
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


class StorageError(Exception):
    """A URI that cannot be read or written. The message names the URI and what to do."""


class OutputNotWritable(StorageError):
    """The output location refuses writes for a reason a retry cannot change: a read-only volume, a
    path under a file, a bucket that does not exist or denies access (see `OutputLocation.probe`)."""


# --- Inputs ------------------------------------------------------------------------------------


def local_input(uri: str, cache_dir: Path, what: str) -> Path:
    """A local path for a URI (file://, pvc://, s3://, hf://, https://) or a plain path, as the CLI's
    commands and a local `kubetune serve` take them; a missing one is a StorageError that names
    `what` (the option) and what was written."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"{what} {uri}: no such file or folder")
        return path
    try:
        return resolve_input(uri, cache_dir=cache_dir, local=True)
    except StorageError as error:
        raise StorageError(f"{what} {error}") from None


def resolve_input(uri: str, *, cache_dir: Path, revision: str | None = None, local: bool = False) -> Path:
    """A local path (file or directory) holding the content of `uri`.

    Mounted schemes (pvc, configmap, file) are read in place. Remote ones (s3, http, https) are
    downloaded once into `cache_dir`, keyed by uri and revision. hf:// goes through the Hugging Face
    cache (HF_HUB_CACHE / HF_HOME), which transformers shares and which can be pre-populated for
    offline use (HF_HUB_OFFLINE=1).
    """
    scheme = _scheme(uri)
    if scheme == "file":
        return _existing(_file_path(uri, local), uri, "check the path exists on this machine")
    if scheme == "pvc":
        return _existing(
            _pvc_path(uri), uri, "check the claim holds that path (paths are relative to the claim's root)"
        )
    if scheme == "configmap":
        return _existing(
            _configmap_path(uri), uri, "check the ConfigMap exists in the job's namespace and has that key"
        )
    if scheme == "hf":
        return _hf_snapshot(uri, revision)
    if scheme == "s3":
        bucket, key = _s3_split(uri)
        return _cached_download(uri, revision, Path(cache_dir), lambda dest: _s3_download(uri, bucket, key, dest))
    if scheme in ("http", "https"):
        return _cached_download(uri, revision, Path(cache_dir), lambda dest: _http_download(uri, dest))
    raise StorageError(
        f"{uri}: unsupported scheme {scheme!r}; use hf://, pvc://, s3://, https://, configmap:// or file://"
    )


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme
    if not scheme:
        raise StorageError(f"{uri!r}: not a URI; write it as SCHEME://..., e.g. pvc://CLAIM/PATH or s3://BUCKET/PATH")
    return scheme


def _existing(path: Path, uri: str, hint: str) -> Path:
    if not path.exists():
        raise StorageError(f"{uri}: {path} does not exist; {hint}")
    return path


def _relative_parts(uri: str, path: str) -> tuple[str, ...]:
    """The components of a path inside a claim/bucket; '..' is refused so a URI cannot escape its root."""
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise StorageError(f"{uri}: '..' is not allowed in the path; name the file from the root of its volume")
    return parts


def _file_path(uri: str, local: bool) -> Path:
    """file:// is only meaningful on the machine that wrote the URI: a pod has no such path."""
    if not local:
        raise StorageError(
            f"{uri}: file:// only works with `kubetune train` on your machine; in a cluster use pvc:// or s3://"
        )
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise StorageError(f"{uri}: file:// needs an absolute path, with three slashes (file:///data/x)")
    return Path(unquote(parsed.path))


def _pvc_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: missing the claim name; write pvc://CLAIM/PATH")
    mount = Path(pvc_mount_path(parsed.netloc))
    if not mount.is_dir():
        raise StorageError(
            f"{uri}: claim {parsed.netloc!r} is not mounted at {mount}; check the PersistentVolumeClaim exists "
            f"in the job's namespace (outside a cluster, set {PVC_ROOT_ENV} to a folder holding {parsed.netloc}/)"
        )
    return mount.joinpath(*_relative_parts(uri, parsed.path))


def _configmap_path(uri: str) -> Path:
    parsed = urlparse(uri)
    parts = _relative_parts(uri, parsed.path)
    if not parsed.netloc or not parts:
        raise StorageError(f"{uri}: write configmap://NAME/KEY")
    return Path(configmap_mount_path(parsed.netloc)).joinpath(*parts)


# --- Download cache ------------------------------------------------------------------------------


def _cached_download(uri: str, revision: str | None, cache_dir: Path, fetch: Callable[[Path], None]) -> Path:
    """Run `fetch(dest)` once per (uri, revision) and return the cached result.

    The entry folder appears (by rename) only after `fetch` returned, so its existence means
    "complete". A download that fails is removed; one that was killed leaves only a `.partial-`
    folder, which is never read. Two processes racing on one entry both succeed: the loser of the
    rename throws its copy away and uses the winner's.
    """
    name = _basename(uri)
    entry = cache_dir / "inputs" / f"{_digest(uri, revision or '')[:24]}-{name}"
    if entry.is_dir():
        return entry / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    try:
        fetch(staging / name)
        os.rename(staging, entry)
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry / name


def _basename(uri: str) -> str:
    """A readable, filesystem-safe name for the download that keeps the extension (data.jsonl)."""
    last = urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1] or urlparse(uri).netloc
    return re.sub(r"[^A-Za-z0-9._-]", "_", unquote(last)).lstrip(".") or "content"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# --- http(s) ------------------------------------------------------------------------------------


MAX_REDIRECTS = 5
MAX_DOWNLOAD_BYTES_ENV = "KUBETUNE_MAX_DOWNLOAD_BYTES"
MAX_DOWNLOAD_BYTES = 64 * 2**30  # a dataset over https; the scratch volume is the real bound


def _http_download(uri: str, dest: Path) -> None:
    """Stream one file to `dest`; the whole body is never held in memory, and never more than
    KUBETUNE_MAX_DOWNLOAD_BYTES (default 64 GiB) of it. Redirects are followed by hand, at most
    five, each target checked by the same URI rule as the spec (`uris.uri_problem`) before anything
    connects to it: a public URL cannot bounce the pod to the node's metadata address or loopback."""
    import httpx

    from .api.uris import uri_problem

    limit = int(os.environ.get(MAX_DOWNLOAD_BYTES_ENV) or MAX_DOWNLOAD_BYTES)
    url = uri
    try:
        with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(30.0, read=300.0)) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        target = str(response.url.join(response.headers.get("location", "")))
                        problem = uri_problem(target, ("https", "http"))
                        if problem:
                            raise StorageError(f"{uri}: the server redirects to a refused address: {problem}")
                        url = target
                        continue
                    if response.status_code >= 400:
                        raise StorageError(
                            f"{uri}: the server answered HTTP {response.status_code}; check the URL is right and "
                            "publicly readable (private data belongs in pvc:// or s3://)"
                        )
                    _write_capped(response.iter_bytes(_CHUNK), dest, limit, uri)
                    return
    except httpx.HTTPError as error:
        raise StorageError(
            f"{uri}: download failed ({error.__class__.__name__}: {error}); check the URL and the network"
        ) from error
    raise StorageError(f"{uri}: more than {MAX_REDIRECTS} redirects")


def _write_capped(chunks: Iterator[bytes], dest: Path, limit: int, uri: str) -> None:
    written = 0
    with open(dest, "wb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > limit:
                raise StorageError(
                    f"{uri}: larger than {limit} bytes ({MAX_DOWNLOAD_BYTES_ENV}); put large data on pvc:// or s3://"
                )
            out.write(chunk)


# --- Hugging Face Hub ------------------------------------------------------------------------------


def _hf_snapshot(uri: str, revision: str | None) -> Path:
    """A snapshot folder of hf://ORG/NAME (hf://datasets/ORG/NAME for a dataset repo), or a path in it.

    The environment is read now, not at import, so HF_HUB_OFFLINE/HF_HOME set by the caller count.
    """
    from huggingface_hub import snapshot_download

    repo_type, repo_id, subpath = _hf_parts(uri)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    try:
        folder = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision or "main",
            cache_dir=_hf_cache_dir(),
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline,
            allow_patterns=[subpath, f"{subpath}/*"] if subpath else None,
        )
    except Exception as error:  # huggingface_hub has many error types; each gets a StorageError below
        raise _hf_error(uri, revision, offline, error) from error
    return _existing(
        Path(folder).joinpath(*subpath.split("/")) if subpath else Path(folder),
        uri,
        "check the path exists in the repository at that revision",
    )


def _hf_parts(uri: str) -> tuple[str, str, str]:
    parsed = urlparse(uri)
    parts = [parsed.netloc, *_relative_parts(uri, parsed.path)]
    repo_type = "model"
    if parts[0] in ("datasets", "models"):
        repo_type = parts.pop(0).removesuffix("s")
    if len(parts) < 2 or not parts[0]:
        raise StorageError(f"{uri}: write hf://ORG/NAME (or hf://datasets/ORG/NAME for a dataset repository)")
    return repo_type, f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def _hf_cache_dir() -> str:
    """The Hugging Face cache folder, resolved as huggingface_hub does but from the current env."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _hf_error(uri: str, revision: str | None, offline: bool, error: Exception) -> StorageError:
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    if offline:
        return StorageError(
            f"{uri}{at}: not in the local Hugging Face cache ({_hf_cache_dir()}) and the hub is offline "
            "(HF_HUB_OFFLINE=1); download it into HF_HOME beforehand (`hf download ORG/NAME`) or unset HF_HUB_OFFLINE"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return StorageError(
            f"{uri}: revision {revision!r} does not exist; use a branch, tag or commit of the repository"
        )
    if isinstance(error, errors.GatedRepoError):
        return StorageError(
            f"{uri}: the repository is gated; accept its terms on the Hub and put your HF_TOKEN in the secretRef"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return StorageError(
            f"{uri}: no such repository, or it is private; check the name or put an HF_TOKEN in the secretRef"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return StorageError(
            f"{uri}{at}: the Hugging Face Hub could not be reached and the files are not cached; "
            f"check the network ({error})"
        )
    return StorageError(f"{uri}{at}: download from the Hugging Face Hub failed ({error.__class__.__name__}: {error})")


# --- S3 -----------------------------------------------------------------------------------------


def _s3_client() -> Any:
    """A client for the endpoint in AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, Ceph, ...) or AWS itself.

    Credentials and region come from the usual AWS environment variables. Custom endpoints get
    path-style addressing, which every S3-compatible server understands.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"} if endpoint else {}
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _s3_split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: missing the bucket; write s3://BUCKET/PATH")
    key = "/".join(_relative_parts(uri, parsed.path))
    return parsed.netloc, key + ("/" if parsed.path.endswith("/") and key else "")


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's exceptions into StorageErrors that say what to check."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except NoCredentialsError as error:
        raise StorageError(
            f"{uri}: no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (via secretRef)"
        ) from error
    except EndpointConnectionError as error:
        raise StorageError(
            f"{uri}: cannot reach the S3 endpoint ({error}); check AWS_ENDPOINT_URL and the network"
        ) from error
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: the bucket does not exist; create it or fix the name") from error
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{uri}: access denied ({code}); check the credentials and the bucket policy") from error
        raise StorageError(f"{uri}: S3 request failed ({code}: {error})") from error
    except BotoCoreError as error:
        raise StorageError(f"{uri}: S3 request failed ({error})") from error


_S3_REFUSALS = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
    }
)


def _s3_refusal(error: BaseException | None) -> bool:
    """Whether botocore's `error` is a refusal a retry cannot change (credentials, bucket, policy)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return True
    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code", "") in _S3_REFUSALS


def _s3_keys(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def _s3_object_exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def _s3_download(uri: str, bucket: str, key: str, dest: Path) -> None:
    """Download one object to the file `dest`, or every object under the prefix into the folder `dest`."""
    client = _s3_client()
    with _s3_errors(uri):
        if key and not key.endswith("/") and _s3_object_exists(client, bucket, key):
            client.download_file(bucket, key, str(dest))
            return
        prefix = key.rstrip("/") + "/" if key else ""
        if not _s3_download_prefix(client, uri, bucket, prefix, dest):
            raise StorageError(f"{uri}: no object or prefix with that name in bucket {bucket!r}; check the path")


def _s3_download_prefix(client: Any, uri: str, bucket: str, prefix: str, dest: Path) -> int:
    """Mirror every object under `prefix` (except the `_COMPLETE` marker) into `dest`; return how many."""
    count = 0
    for key in _s3_keys(client, bucket, prefix):
        relative = key[len(prefix) :]
        if not relative or relative.endswith("/") or relative == COMPLETE_MARKER:
            continue  # folder placeholders and our own marker are not content
        target = dest.joinpath(*_relative_parts(f"{uri} (object {key})", relative))
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
        count += 1
    dest.mkdir(parents=True, exist_ok=True)
    return count


# --- Outputs ------------------------------------------------------------------------------------


class OutputLocation(ABC):
    """Where a job's adapter, report.json and checkpoints go; see `open_output`.

    Names (`"adapter"`, `"checkpoints/step-000200"`) are paths relative to the location. A published
    folder is complete when it holds a `_COMPLETE` marker, which is written last and removed first.
    """

    uri: str
    # Whether `local_dir()` is one folder seen by every node of a multi-node run (a ReadWriteMany
    # volume) or each node's own disk. In the second case a folder written by several nodes is
    # published in phases: `begin_dir` once, `upload_part` from every node, `finish_dir` once.
    local_dir_shared: bool

    @abstractmethod
    def local_dir(self) -> Path:
        """A real directory to write into (shared by the nodes when `local_dir_shared`)."""
        ...

    @abstractmethod
    def publish_dir(self, src: Path, name: str) -> str:
        """Publish the folder `src` as <location>/<name>, whole or not at all; return its URI."""
        ...

    @abstractmethod
    def begin_dir(self, name: str) -> None:
        """Start publishing <location>/<name> in parts: it stops counting as complete (the marker goes
        first) and whatever it held is removed. Called once, before any `upload_part`."""
        ...

    @abstractmethod
    def upload_part(self, src: Path, name: str) -> list[str]:
        """Add the files of the folder `src` to the unfinished <location>/<name> (several callers,
        e.g. one per node, may add theirs at once); return their relative paths. Writes no marker."""
        ...

    @abstractmethod
    def finish_dir(self, name: str, files: list[str]) -> str:
        """Mark <location>/<name> complete, once every part is in: `files` are the relative paths every
        `upload_part` returned, and each must be there, or StorageError (and no marker). Returns its URI."""
        ...

    @abstractmethod
    def publish_file(self, src: Path, name: str) -> str:
        """Publish one file as <location>/<name>, atomically; return its URI."""
        ...

    @abstractmethod
    def list_complete(self, prefix: str) -> list[str]:
        """Names (relative to the location, e.g. "checkpoints/step-000200") of the complete folders directly
        under `prefix`, sorted; usable as they are with `fetch_dir` and `delete`."""
        ...

    @abstractmethod
    def fetch_dir(self, name: str, dest: Path) -> Path:
        """A local path holding the complete published folder `name`. Where that means downloading
        into `dest`, a `dest` that already holds a copy of this very publication is returned as it is."""
        ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the published folder `name`; it stops counting as complete before any file goes."""
        ...

    @abstractmethod
    def probe(self) -> None:
        """Write and remove a small hidden object (`.kubetune-probe-*`) at the location: raises
        OutputNotWritable when the location refuses writes for good, StorageError when it may be
        passing (an endpoint that does not answer). Names only the user's URI, not a mount path."""
        ...

    def _join(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def _probe_name() -> str:
    return f".kubetune-probe-{uuid.uuid4().hex[:12]}"


def open_output(uri: str, *, cache_dir: Path, local: bool = False) -> OutputLocation:
    """The OutputLocation for spec.output.uri (pvc://, s3://, or file:// for local runs)."""
    scheme = _scheme(uri)
    if scheme == "file":
        return LocalOutput(uri, _file_path(uri, local))
    if scheme == "pvc":
        return LocalOutput(uri, _pvc_path(uri))
    if scheme == "s3":
        bucket, key = _s3_split(uri)
        return S3Output(uri, bucket, key, Path(cache_dir))
    raise StorageError(f"{uri}: outputs can only go to pvc:// or s3:// (file:// for local runs)")


def _check_name(uri: str, name: str) -> PurePosixPath:
    """Names are plain relative paths; a leading dot is reserved for our temporary folders."""
    path = PurePosixPath(name)
    if (
        not path.parts
        or path.is_absolute()
        or any(p in ("..", COMPLETE_MARKER) or p.startswith(".") for p in path.parts)
    ):
        raise StorageError(
            f"{uri}: {name!r} is not a valid name inside an output location (relative, no '..' or leading '.')"
        )
    return path


def _marker_text(name: str, files: int) -> str:
    """The marker's content; `id` makes every publication's marker unique (see `S3Output.fetch_dir`)."""
    return (
        json.dumps({"name": name, "files": files, "publishedAt": datetime.now(UTC).isoformat(), "id": uuid.uuid4().hex})
        + "\n"
    )


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file under `folder`, sorted, without a top-level marker."""
    files = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()]
    return sorted((rel, p) for rel, p in files if rel != COMPLETE_MARKER)


class LocalOutput(OutputLocation):
    """pvc:// or file://: a directory on a mounted volume, written in place."""

    local_dir_shared = True  # a pvc:// claim is mounted on every node; file:// runs have one machine

    def __init__(self, uri: str, root: Path):
        self.uri = uri
        self.root = root

    def local_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def probe(self) -> None:
        """What every publish does, in small: create the folder, write a temporary file, rename it,
        delete it. The error's text (strerror) is kept, its file name (the in-pod path) is not."""
        probe = self.root / _probe_name()
        staging = probe.with_name(probe.name + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(staging, "xb") as handle:
                handle.write(b"kubetune output probe\n")
                os.fsync(handle.fileno())
            os.replace(staging, probe)
            probe.unlink()
        except OSError as error:
            for leftover in (staging, probe):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
            raise OutputNotWritable(
                f"{self.uri}: the output location is not writable ({error.strerror or type(error).__name__}); "
                "it must be a folder the job can create and write (a volume mounted read-write, not a file)"
            ) from None

    def publish_dir(self, src: Path, name: str) -> str:
        """Copy into a hidden sibling, mark it complete, then rename it into place.

        Replacing an existing folder renames the old one away first (see `_swap_in`).
        """
        target = self._path(name)
        if Path(src).resolve() == target.resolve():
            _write_marker(target, name)  # written in place by the caller: only mark it complete
            return self._join(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(target)
        staging = _sibling(target, "publishing")
        try:
            shutil.copytree(src, staging, ignore=lambda d, names: [COMPLETE_MARKER] if Path(d) == Path(src) else [])
            _fsync_tree(staging)
            _write_marker(staging, name)
            _swap_in(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._join(name)

    def begin_dir(self, name: str) -> None:
        """In place: the folder is unmarked (then removed) first, so it is never complete meanwhile."""
        self.delete(name)
        self._path(name).mkdir(parents=True, exist_ok=True)

    def upload_part(self, src: Path, name: str) -> list[str]:
        target = self._path(name)
        files = _files_under(Path(src))
        for relative, path in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
            _fsync_file(destination)
        for sub in {(target / relative).parent for relative, _ in files}:
            _fsync_dir(sub)
        return [relative for relative, _ in files]

    def finish_dir(self, name: str, files: list[str]) -> str:
        target = self._path(name)
        missing = sorted(set(files) - {relative for relative, _ in _files_under(target)})
        if missing:
            raise StorageError(f"{self._join(name)}: not marked complete, {len(missing)} files missing ({missing[:3]})")
        _write_marker(target, name)
        return self._join(name)

    def publish_file(self, src: Path, name: str) -> str:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _sibling(target, "publishing")
        try:
            shutil.copyfile(src, staging)
            _fsync_file(staging)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return self._join(name)

    def list_complete(self, prefix: str) -> list[str]:
        folder = self._path(prefix) if prefix.strip("/") else self.root
        if not folder.is_dir():
            return []
        base = PurePosixPath(prefix.strip("/")) if prefix.strip("/") else PurePosixPath()
        return sorted(
            str(base / child.name)
            for child in folder.iterdir()
            if not child.name.startswith(".") and (child / COMPLETE_MARKER).is_file()
        )

    def fetch_dir(self, name: str, dest: Path) -> Path:
        target = self._path(name)
        if not (target / COMPLETE_MARKER).is_file():
            raise StorageError(f"{self._join(name)}: no complete folder there (no {COMPLETE_MARKER} marker)")
        return target

    def delete(self, name: str) -> None:
        """Remove the marker (synced), rename the folder away, then delete it: an interrupted
        delete leaves an incomplete or hidden folder, never a complete-looking half."""
        target = self._path(name)
        if not target.exists():
            return
        (target / COMPLETE_MARKER).unlink(missing_ok=True)
        _fsync_dir(target)
        doomed = _sibling(target, "deleting")
        os.rename(target, doomed)
        _fsync_dir(target.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        _remove_leftovers(target)

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*_check_name(self.uri, name).parts)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`. A directory cannot be renamed over a non-empty one, so an existing
    `target` is first renamed away: readers see the old folder, nothing, or the new one."""
    old = None
    if target.exists():
        old = _sibling(target, "deleting")
        os.rename(target, old)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A hidden temporary name next to `target` (same filesystem, so rename is atomic)."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _remove_leftovers(target: Path) -> None:
    """Delete temporary siblings of `target` left by a publish or delete that was killed."""
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        if not leftover.name.rsplit(".", 1)[-1].startswith(("publishing-", "deleting-")):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _write_marker(folder: Path, name: str) -> None:
    marker = folder / COMPLETE_MARKER
    marker.write_text(_marker_text(name, len(_files_under(folder))))
    _fsync_file(marker)
    _fsync_dir(folder)


def _fsync_tree(folder: Path) -> None:
    """Flush every copied file before the marker can claim the folder is complete."""
    for _, path in _files_under(folder):
        _fsync_file(path)
    for sub in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Output(OutputLocation):
    """s3://BUCKET/PREFIX: files are staged locally, then uploaded; the marker object goes last.

    The staging folder (`local_dir`) is in this node's cache, not shared with other nodes: a folder
    written by several nodes is published with `begin_dir`, one `upload_part` per node, `finish_dir`.
    """

    local_dir_shared = False

    def __init__(self, uri: str, bucket: str, key: str, cache_dir: Path):
        self.uri = uri
        self.bucket = bucket
        self.prefix = key.rstrip("/") + "/" if key else ""
        self.cache_dir = cache_dir
        self._client = None

    def local_dir(self) -> Path:
        folder = self.cache_dir / "outputs" / f"{_digest(self.uri)[:24]}-{_basename(self.uri)}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def probe(self) -> None:
        """A PUT and a DELETE of one small object under the prefix. Missing credentials, a missing
        bucket or a denied write are the job's configuration (OutputNotWritable); an endpoint that
        does not answer may be passing (StorageError, retried)."""
        key = self.prefix + _probe_name()
        try:
            with _s3_errors(self.uri):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"kubetune output probe\n")
                self.client.delete_object(Bucket=self.bucket, Key=key)
        except StorageError as error:
            if _s3_refusal(error.__cause__):
                raise OutputNotWritable(f"{error}; the output location is not writable") from None
            raise

    def publish_dir(self, src: Path, name: str) -> str:
        """Unmark and empty, upload every file, then mark complete: the phased publish with one part.

        While this runs the folder has no marker, so readers treat it as absent rather than see a mix.
        """
        self.begin_dir(name)
        return self.finish_dir(name, self.upload_part(src, name))

    def begin_dir(self, name: str) -> None:
        """Delete the marker, then every object under the name (a stale or half-written earlier try)."""
        base = self._key(name) + "/"
        with _s3_errors(self._join(name)):
            self.client.delete_object(Bucket=self.bucket, Key=base + COMPLETE_MARKER)
            self._delete_keys(list(_s3_keys(self.client, self.bucket, base)))

    def upload_part(self, src: Path, name: str) -> list[str]:
        base = self._key(name) + "/"
        files = _files_under(Path(src))
        with _s3_errors(self._join(name)):
            for relative, path in files:
                self.client.upload_file(str(path), self.bucket, base + relative)
        return [relative for relative, _ in files]

    def finish_dir(self, name: str, files: list[str]) -> str:
        """Check every expected object is there (a part that failed or never came leaves the folder
        unmarked), then write the marker."""
        base = self._key(name) + "/"
        with _s3_errors(self._join(name)):
            present = {key[len(base) :] for key in _s3_keys(self.client, self.bucket, base)}
            missing = sorted(set(files) - present)
            if missing:
                raise StorageError(
                    f"{self._join(name)}: not marked complete, {len(missing)} files missing ({missing[:3]})"
                )
            self.client.put_object(
                Bucket=self.bucket, Key=base + COMPLETE_MARKER, Body=_marker_text(name, len(set(files))).encode()
            )
        return self._join(name)

    def publish_file(self, src: Path, name: str) -> str:
        """An S3 PUT (multipart too) becomes visible only once complete, so no temporary name is needed."""
        with _s3_errors(self._join(name)):
            self.client.upload_file(str(src), self.bucket, self._key(name))
        return self._join(name)

    def list_complete(self, prefix: str) -> list[str]:
        base = self._key(prefix) + "/" if prefix.strip("/") else self.prefix
        names = []
        with _s3_errors(self._join(prefix)):
            for key in _s3_keys(self.client, self.bucket, base):
                child, _, rest = key[len(base) :].partition("/")
                if rest == COMPLETE_MARKER and child:
                    names.append(str(PurePosixPath(prefix.strip("/") or ".") / child).removeprefix("./"))
        return sorted(names)

    def fetch_dir(self, name: str, dest: Path) -> Path:
        """Download into a hidden sibling of `dest`, then rename it into place (replacing `dest`).

        Beside `dest`, `.NAME._COMPLETE` keeps a copy of the marker it was downloaded under (each
        publication's marker is unique): when it matches the marker now published, `dest` is returned
        without downloading again (a restarted pod, or the other ranks of a node after the first).
        Concurrent calls for one `dest` are the caller's to avoid (one process per node fetches).
        """
        uri = self._join(name)
        base = self._key(name) + "/"
        dest = Path(dest)
        record = dest.parent / f".{dest.name}.{COMPLETE_MARKER}"
        with _s3_errors(uri):
            marker = self._marker(base + COMPLETE_MARKER)
        if marker is None:
            raise StorageError(f"{uri}: no complete folder there (no {COMPLETE_MARKER} marker object)")
        if dest.is_dir() and record.is_file() and record.read_bytes() == marker:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)  # dest is about to change: it no longer matches any marker
        staging = _sibling(dest, "publishing")
        try:
            with _s3_errors(uri):
                _s3_download_prefix(self.client, uri, self.bucket, base, staging)
                if self._marker(base + COMPLETE_MARKER) != marker:  # republished meanwhile: a mix
                    raise StorageError(f"{uri}: the folder was published again during the download; retry")
            _swap_in(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record.write_bytes(marker)  # a torn write cannot match a marker: the next call downloads again
        return dest

    def _marker(self, key: str) -> bytes | None:
        """The marker object's content, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return body
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def delete(self, name: str) -> None:
        base = self._key(name) + "/"
        with _s3_errors(self._join(name)):
            self.client.delete_object(Bucket=self.bucket, Key=base + COMPLETE_MARKER)
            self._delete_keys(list(_s3_keys(self.client, self.bucket, base)))

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _s3_client()
        return self._client

    def _key(self, name: str) -> str:
        return self.prefix + str(_check_name(self.uri, name.strip("/")))

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


# --- Digests ------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, or of a directory: every file's relative path and content digest, in
    sorted order. A top-level `_COMPLETE` marker is left out, so a published copy hashes like its source."""
    path = Path(path)
    if path.is_file():
        return str(_file_sha256(path).hexdigest())
    if not path.is_dir():
        raise StorageError(f"{path}: cannot hash, no such file or directory")
    total = hashlib.sha256()
    for relative, file in _files_under(path):
        total.update(relative.encode() + b"\0")
        total.update(_file_sha256(file).digest())
    return total.hexdigest()


def _file_sha256(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest
