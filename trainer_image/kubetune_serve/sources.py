"""Where an adapter may come from, and how its files reach this process.

A runtime load (`/v1/load_lora_adapter`) names a `lora_path` chosen by whoever holds the admin key.
It is only read when it passes the one URI rule of the API (`kubetune.api.uris.uri_problem`) and
starts with a prefix the operator allowed (`--allow-source`: the claims and buckets the
AdapterDeployment declares). Adapters given at startup (`--adapter`, `--adapters-file`) are the
deployment's own configuration: they skip the allow-list but not the URI rule.

Every refusal of a source (not allowed, traversal, missing, unreadable, too big, a symlink out of
its volume) is the same `SourceRefused`, with the same status and message: a client learns nothing
about which paths exist. The details go to the server log only.

`fetch` copies the adapter into a private staging folder before anything reads it: a download is
capped in bytes and stops when the load is cancelled (its timeout), a mounted folder is copied file
by file (regular files only), so the weights hashed are the weights attached, and nothing slow
(a network volume, S3, the Hub) runs while the engine's lock is held. No redirect is followed:
runtime loads never take http(s)://, S3 requests go to the configured endpoint only, and the Hub's
client fetches from the Hub.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kubetune.api.uris import uri_problem
from kubetune.contract import COMPLETE_MARKER, pvc_mount_path
from kubetune.logs import log

from .errors import EngineError

ADAPTER_SCHEMES = ("pvc", "s3", "hf", "file")
REFUSED_MESSAGE = "adapter source not found or not allowed"
MAX_FILES = 256  # an adapter is a config, a weights file and a tokenizer: more is not an adapter
_CHUNK = 1024 * 1024


class SourceRefused(EngineError):
    """A source this server will not read. The message is always the same; `detail` is for the log."""

    def __init__(self, detail: str):
        super().__init__(REFUSED_MESSAGE, 404, "NotFoundError")
        self.detail = detail


class LoadCancelled(Exception):
    """The load's deadline passed: whatever it fetched is thrown away."""


def parse_prefixes(values: Iterable[str]) -> tuple[str, ...]:
    """`--allow-source` values, and KUBETUNE_SERVE_ALLOWED_SOURCES split on newlines and commas."""
    prefixes: list[str] = []
    for value in values:
        for part in value.replace(",", "\n").splitlines():
            if part.strip() and part.strip() not in prefixes:
                prefixes.append(part.strip())
    return tuple(prefixes)


def prefix_problem(prefix: str) -> str | None:
    """What is wrong with an allowed prefix (it must be a valid adapter URI itself), or None."""
    return uri_problem(prefix, ADAPTER_SCHEMES)


def under_prefix(uri: str, prefix: str) -> bool:
    """`uri` is `prefix` itself or lies below it at a `/` boundary: pvc://data/adapters/ and
    pvc://data/adapters both allow pvc://data/adapters/x, neither allows pvc://data/adapters-evil."""
    if uri == prefix or uri.rstrip("/") == prefix.rstrip("/"):
        return True
    return uri.startswith(prefix.rstrip("/") + "/")


def check_source(uri: str, allowed: tuple[str, ...] | None) -> str | None:
    """The allowed prefix `uri` lies below (None for a startup adapter, `allowed=None`: the URI rule
    only), or SourceRefused. The prefix also confines what a mounted source may link to."""
    problem = uri_problem(uri, ADAPTER_SCHEMES)
    if problem:
        raise SourceRefused(problem)
    if allowed is None:
        return None
    prefix = next((p for p in allowed if under_prefix(uri, p)), None)
    if prefix is None:
        raise SourceRefused(f"{uri!r} is below no --allow-source prefix")
    return prefix


# --- fetching --------------------------------------------------------------------------------------


class Budget:
    """Bytes left for one adapter, and the load's cancellation, checked at every chunk."""

    def __init__(self, max_bytes: int, cancelled: Callable[[], bool] | None = None):
        self.left, self.max_bytes, self.cancelled = max_bytes, max_bytes, cancelled or (lambda: False)

    def take(self, size: int) -> None:
        if self.cancelled():
            raise LoadCancelled()
        self.left -= size
        if self.left < 0:
            raise SourceRefused(f"larger than --max-adapter-bytes ({self.max_bytes})")

    def copy(self, read: Callable[[int], bytes], out: Path) -> None:
        with open(out, "xb") as sink:
            while chunk := read(_CHUNK):
                self.take(len(chunk))
                sink.write(chunk)


def fetch(
    uri: str,
    staging_root: Path,
    max_bytes: int,
    cancelled: Callable[[], bool] | None = None,
    within: str | None = None,
) -> Path:
    """The adapter at `uri` (already checked) copied into a new folder under `staging_root`; for a
    pvc:// or file:// source, nothing outside `within` (its allowed prefix; None: its volume) is read,
    whatever the symlinks say. The caller removes the folder once the adapter is attached; it is
    removed here on failure."""
    staging_root.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="adapter-", dir=staging_root))
    budget = Budget(max_bytes, cancelled)
    try:
        scheme = uri.partition("://")[0]
        if scheme in ("pvc", "file"):
            root, path = _mounted(uri, within)
            _copy_tree(path, root, dest, budget)
        elif scheme == "s3":
            _s3_fetch(uri, dest, budget)
        elif scheme == "hf":
            _hf_fetch(uri, dest, budget)
        else:
            raise SourceRefused(f"{scheme}:// is not an adapter source")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _local_path(uri: str) -> Path:
    """Where a pvc:// or file:// URI lies on this machine (not resolved)."""
    parts = urlsplit(uri)
    segments = [unquote(p) for p in parts.path.split("/") if p]
    if parts.scheme == "pvc":
        return Path(pvc_mount_path(parts.netloc)).joinpath(*segments)
    return Path("/").joinpath(*segments)


def _mounted(uri: str, within: str | None) -> tuple[Path, Path]:
    """(the folder it must stay in, the adapter's path) of a pvc:// or file:// URI, both resolved:
    the allowed prefix's folder, else the claim's mount (pvc://) or / (file://)."""
    path = _local_path(uri)
    if within is not None:
        root = _local_path(within)
    elif uri.startswith("pvc://"):
        root = Path(pvc_mount_path(urlsplit(uri).netloc))
    else:
        root = Path("/")
    try:
        root, path = root.resolve(strict=True), path.resolve(strict=True)
    except (OSError, RuntimeError) as error:
        raise SourceRefused(f"{uri}: {error}") from None
    if not path.is_relative_to(root):
        raise SourceRefused(f"{uri}: resolves to {path}, outside its volume {root}")
    return root, path


def _copy_tree(source: Path, root: Path, dest: Path, budget: Budget) -> None:
    """Regular files of `source` (a folder, or one file) into `dest`, none outside `root`, within budget.
    FIFOs, devices and sockets are refused: reading one could block forever or never end."""
    try:
        files = _regular_files(source, root)
    except OSError as error:
        raise SourceRefused(f"{source}: {error}") from None
    for relative, path in files:
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "rb", opener=_nonblocking_opener) as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise SourceRefused(f"{path}: not a regular file")
                os.set_blocking(handle.fileno(), True)
                budget.copy(handle.read, target)
        except OSError as error:
            raise SourceRefused(f"{path}: {error}") from None


def _nonblocking_opener(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO swapped in after the listing must not wait for a writer
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))


def _regular_files(source: Path, root: Path) -> list[tuple[Path, Path]]:
    if source.is_file():
        return [(Path(source.name), source)]
    found: list[tuple[Path, Path]] = []
    for folder, subfolders, names in os.walk(source, followlinks=False):
        for name in [*names, *subfolders]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = path.resolve(strict=True)
                if not target.is_relative_to(root):
                    raise SourceRefused(f"{path}: a link out of its volume ({target})")
                if target.is_dir():
                    raise SourceRefused(f"{path}: a link to a folder")
                mode = target.stat().st_mode
                path = target
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise SourceRefused(f"{path}: not a regular file")
            found.append((Path(folder).relative_to(source) / name, path))
            if len(found) > MAX_FILES:
                raise SourceRefused(f"{source}: more than {MAX_FILES} files")
    if not found:
        raise SourceRefused(f"{source}: no files")
    return found


def _s3_fetch(uri: str, dest: Path, budget: Budget) -> None:
    """Every object under s3://BUCKET/PREFIX, sizes summed from the listing before any download and
    counted again while reading. One attempt per request, bounded timeouts: a stalled endpoint costs
    a load its deadline, never a worker forever."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=30,
        s3={"addressing_style": "path"} if endpoint else {},
    )
    try:
        client = boto3.client("s3", endpoint_url=endpoint, config=config)
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=MAX_FILES + 1)
        objects = [(o["Key"], int(o.get("Size", 0))) for o in listing.get("Contents", [])]
        if listing.get("IsTruncated") or len(objects) > MAX_FILES:
            raise SourceRefused(f"{uri}: more than {MAX_FILES} objects")
        if not objects:
            raise SourceRefused(f"{uri}: no objects")
        total = sum(size for _, size in objects)
        if total > budget.max_bytes:
            raise SourceRefused(f"{uri}: {total} bytes, more than --max-adapter-bytes ({budget.max_bytes})")
        for key, _ in objects:
            relative = key[len(prefix) :].strip("/") if prefix else key
            if not relative or relative == COMPLETE_MARKER:
                continue
            problem = uri_problem(f"s3://{bucket}/{relative}", ("s3",))
            if problem:
                raise SourceRefused(f"{uri}: object {key!r}: {problem}")
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                budget.copy(body.read, target)
            finally:
                body.close()
    except (BotoCoreError, ClientError) as error:
        raise SourceRefused(f"{uri}: {type(error).__name__}: {error}") from None


def _hf_fetch(uri: str, dest: Path, budget: Budget) -> None:
    """hf://ORG/NAME[/PATH]: the files' sizes come from the Hub's listing and are summed against the
    cap before any download; the download goes into `dest`, then is measured again."""
    from huggingface_hub import HfApi, snapshot_download

    parts = urlsplit(uri)
    segments = [parts.netloc, *[p for p in parts.path.split("/") if p]]
    repo, subpath = f"{segments[0]}/{segments[1]}", "/".join(segments[2:])
    token = os.environ.get("HF_TOKEN") or None
    try:
        info = HfApi().model_info(repo, files_metadata=True, token=token, timeout=30)
        files = [s for s in info.siblings or [] if not subpath or s.rfilename.startswith(subpath + "/")]
        if not files or len(files) > MAX_FILES:
            raise SourceRefused(f"{uri}: {len(files)} files")
        total = sum(s.size or 0 for s in files)
        if total > budget.max_bytes or any(s.size is None for s in files):
            raise SourceRefused(f"{uri}: {total} bytes (or unknown sizes), cap {budget.max_bytes}")
        budget.take(0)
        snapshot_download(
            repo,
            revision=info.sha,
            local_dir=dest,
            token=token,
            allow_patterns=[f"{subpath}/*"] if subpath else None,
        )
    except SourceRefused:
        raise
    except Exception as error:  # huggingface_hub's many errors: all one refusal to the client
        raise SourceRefused(f"{uri}: {type(error).__name__}: {error}") from None
    measured = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    budget.take(measured)
    if subpath:
        inner = dest.joinpath(*subpath.split("/"))
        for child in inner.iterdir():
            child.rename(dest / child.name)


def log_refusal(error: SourceRefused, name: str, uri: str) -> None:
    log("adapter_source_refused", name=name, uri=uri[:512], detail=error.detail)
