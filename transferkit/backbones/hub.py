"""Backbones from the Hugging Face Hub: ``backbone.uri: hf://<org>/<name>[@<revision>]``.

``fetch_hub`` resolves the revision to a commit, lists the repository at that commit, lets
the caller choose the files (fetch_backbone's own selection: safetensors unless pickles are
allowed, never other frameworks' weights), downloads only those with ``huggingface_hub``
into the backbone cache, checks every file against the hash the Hub named it by, and hands
back a folder holding exactly the chosen files, read from then on like any local folder.

The cache is the Hub's own layout (``models--org--name/snapshots/<commit>/`` over
``blobs/<sha256 or git sha1>``): a commit fetched once is served from it without a
download, branch and tag names are remembered in ``refs/`` for offline use.

Where and as whom comes from the environment, never from the config (which is stored with
every run): ``HF_ENDPOINT`` (a mirror), ``HF_TOKEN`` (gated or private repositories),
``HF_HUB_OFFLINE`` (the cache only) and ``HF_HUB_ETAG_TIMEOUT`` (seconds to wait for the
Hub's answers, 10 by default), read at each call.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from transferkit import storage
from transferkit.config import PipelineConfig, split_hub_uri
from transferkit.errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
DEFAULT_TIMEOUT = 10.0  # seconds; huggingface_hub's own default for metadata requests
CACHE_FOLDER = "hf"  # under fetch_backbone's cache_dir
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` URI."""

    repo_id: str  # "org/name" or "name"
    revision: str  # as written after '@'; "main" when none was

    @property
    def pinned(self) -> bool:
        """Whether the revision is a full commit hash (immutable)."""
        return _is_commit(self.revision)


@dataclass(frozen=True)
class HubSnapshot:
    """What ``fetch_hub`` fetched: a folder of the chosen files at one commit."""

    folder: Path
    commit: str
    files: list[str]


@dataclass(frozen=True)
class _Environment:
    endpoint: str
    offline: bool
    timeout: float

    @classmethod
    def read(cls) -> _Environment:
        # Read here, not at import (as huggingface_hub does): a process may set them later.
        env = os.environ
        offline = any(
            env.get(k, "").strip().lower() in _TRUE
            for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
        try:
            timeout = float(env.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT)
        except ValueError:
            raise BackboneError(
                f"HF_HUB_ETAG_TIMEOUT={env['HF_HUB_ETAG_TIMEOUT'][:40]!r} is not a number of "
                "seconds; set it to e.g. 10 or unset it"
            ) from None
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return cls(endpoint=endpoint, offline=offline, timeout=timeout)


def is_hub_uri(uri: str) -> bool:
    """Whether ``uri`` names a Hugging Face Hub model (``hf://…``)."""
    return uri[:5].lower() == "hf://"


def parse_hub_uri(uri: str) -> HubRef:
    """``hf://org/name@revision`` → ``HubRef("org/name", "revision")``.

    Raises:
        BackboneError: not a well-formed Hub id (config validation refuses it first).
    """
    try:
        repo_id, revision = split_hub_uri(uri)
    except ValueError as exc:
        raise BackboneError(f"backbone.uri: {exc}") from None
    return HubRef(repo_id, revision or DEFAULT_REVISION)


def refuse_bare_hub_ids(config: PipelineConfig, source: str) -> None:
    """``transferkit validate``'s check that a backbone.uri without a scheme that reads like
    a Hub id (``bert-base-uncased``, ``org/name``) is a local path that exists. Not part of
    config validation, which must not look at this machine's files (pods validate configs
    whose local paths exist only elsewhere).

    Raises:
        ConfigError: one line with the hf:// spelling to use.
    """
    uris = [("backbone.uri", config.backbone.uri)]
    if config.backbone_selection is not None:
        uris = [
            (f"backbone_selection.candidates[{i}].uri", c.uri)
            for i, c in enumerate(config.backbone_selection.candidates)
        ]
    for key, uri in uris:
        if "://" in uri or uri.startswith((".", "~")) or Path(uri).exists():
            continue
        try:
            split_hub_uri("hf://" + uri)
        except ValueError:
            continue  # not a Hub id either: fetch says the path does not exist
        raise ConfigError(
            f"{source}: {key} '{uri}' is no local file or folder; for the Hugging Face Hub "
            f"model write hf://{uri} (a local path: check it exists here)"
        )


def hub_cache(cache_dir: Path | None) -> Path:
    """Where Hub downloads are kept: ``<cache_dir>/hf``, or without a backbone cache the
    user's own Hugging Face cache (``HF_HUB_CACHE``, ~/.cache/huggingface/hub), so models
    already downloaded there are reused."""
    if cache_dir is not None:
        return Path(cache_dir) / CACHE_FOLDER
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def fetch_hub(
    uri: str,
    scratch: Path,
    cache_dir: Path | None,
    select: Callable[[list[str]], list[str]],
) -> HubSnapshot:
    """Fetch the chosen files of a Hub model at its resolved commit.

    Args:
        uri: ``hf://<org>/<name>[@<revision>]``.
        scratch: an empty folder; the returned ``folder`` is made in it (hard links into
            the cache where possible, else copies).
        cache_dir: the backbone cache (see ``hub_cache``).
        select: the repository's file names (hidden ones left out) → the names to fetch;
            it raises to refuse the model (no weights, only pickles, …).

    Returns:
        The folder, the commit the revision resolved to, and the names in it.

    Raises:
        BackboneError: one line naming the model and the fix: offline and not cached, the
            Hub unreachable (transient), repository not found or gated, unknown revision,
            a cached file that does not match its hash.
    """
    ref = parse_hub_uri(uri)
    env = _Environment.read()
    cache = hub_cache(cache_dir)
    repo_dir = _repo_dir(cache, ref)
    if env.offline:
        commit, names = _cached_listing(uri, ref, cache, repo_dir)
    else:
        commit, names = _resolve(uri, ref, env, cache)
    keep = select([n for n in names if not n.startswith(".")])
    for name in keep:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or not parts:
            raise BackboneError(
                f"{uri}: the Hub lists a file '{name[:200]}' outside the repository; refusing "
                "it — check HF_ENDPOINT points at a real Hub"
            )
    if not env.offline:
        _download(uri, ref, env, cache, commit, keep)
        if not ref.pinned:
            with storage.atomic_file(repo_dir / "refs" / ref.revision) as tmp:
                tmp.write_text(commit)  # the Hub's layout: offline runs resolve it from here
    snapshot = repo_dir / "snapshots" / commit
    missing = [n for n in keep if not (snapshot / n).is_file()]
    if missing:
        raise BackboneError(
            f"{uri}: the backbone cache {cache} holds commit {commit[:12]} without "
            f"{missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
            f"{' and HF_HUB_OFFLINE is set' if env.offline else ''}; fetch it once with "
            "the Hub reachable (HF_HUB_OFFLINE unset)"
        )
    folder = scratch / "model"
    for name in keep:
        real = _verified(uri, repo_dir, snapshot, name)
        storage.link_or_copy(real, folder / name)
    log.info("%s: commit %s, %d files (cache %s)", uri, commit, len(keep), cache)
    return HubSnapshot(folder=folder, commit=commit, files=sorted(keep))


def source_stamp(uri: str, cache_dir: Path | None = None) -> str:
    """The content stamp of a Hub backbone (what ``storage.stamp`` is for other sources):
    the commit its revision points at now, from the Hub, or offline from the cache; a
    pinned commit is its own stamp (no request).

    Raises:
        BackboneError: as ``fetch_hub``.
    """
    ref = parse_hub_uri(uri)
    if ref.pinned:
        return ref.revision
    env = _Environment.read()
    cache = hub_cache(cache_dir)
    if env.offline:
        return _cached_listing(uri, ref, cache, _repo_dir(cache, ref))[0]
    return _resolve(uri, ref, env, cache)[0]


def _repo_dir(cache: Path, ref: HubRef) -> Path:
    return cache / ("models--" + ref.repo_id.replace("/", "--"))  # the Hub cache's naming


def _is_commit(revision: str) -> bool:
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _resolve(uri: str, ref: HubRef, env: _Environment, cache: Path) -> tuple[str, list[str]]:
    """The commit the revision points at and the repository's file names, from the Hub."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=env.endpoint).model_info(
            ref.repo_id, revision=ref.revision, timeout=env.timeout
        )
    except Exception as exc:
        raise _hub_error(uri, ref, env, cache, exc) from None
    if not info.sha or not _is_commit(info.sha) or info.siblings is None:
        raise BackboneError(
            f"{uri}: {env.endpoint} answered without a commit or file list; it is not a "
            "Hugging Face Hub — check HF_ENDPOINT"
        )
    return info.sha, sorted(s.rfilename for s in info.siblings)


def _cached_listing(uri: str, ref: HubRef, cache: Path, repo_dir: Path) -> tuple[str, list[str]]:
    """Offline: the commit and file names the cache remembers for the revision."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    commit = ref.revision
    if not ref.pinned:
        ref_file = repo_dir / "refs" / ref.revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else ""
    snapshot = repo_dir / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        raise BackboneError(
            f"{uri}: not in the backbone cache {cache}, and HF_HUB_OFFLINE is set so it "
            "cannot be downloaded; unset HF_HUB_OFFLINE to fetch it once, or fill that cache "
            "on a machine that reaches the Hub"
        )
    try:
        tree = get_cached_repo_tree(ref.repo_id, revision=commit, cache_dir=cache)
        return commit, sorted(f.path for f in tree)
    except CachedRepoTreeNotFoundError:  # filled by hf_hub_download alone: what is there
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")]
        return commit, sorted(n for n in names if (snapshot / n).is_file())


def _download(
    uri: str, ref: HubRef, env: _Environment, cache: Path, commit: str, keep: list[str]
) -> None:
    """Download the chosen files at the commit into the cache (cached ones are not)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            ref.repo_id,
            revision=commit,
            cache_dir=cache,
            allow_patterns=[glob.escape(n) for n in keep],  # exact names, nothing else
            endpoint=env.endpoint,
            etag_timeout=env.timeout,
            max_workers=4,
        )
    except Exception as exc:
        raise _hub_error(uri, ref, env, cache, exc) from None


def _verified(uri: str, repo_dir: Path, snapshot: Path, name: str) -> Path:
    """The cached file behind ``name``, checked against the hash its blob is named by (the
    Hub's sha256 for LFS files, the git blob sha1 for the others)."""
    entry = snapshot / name
    real = entry.resolve()
    if not entry.is_symlink():
        return real  # a cache on a filesystem without links: the Hub's copy, unnamed
    blobs = (repo_dir / "blobs").resolve()
    if real.parent != blobs:
        raise BackboneError(
            f"{uri}: cached {name} links outside its blobs folder ({real}); delete "
            f"{repo_dir} and fetch again"
        )
    expected = real.name
    if len(expected) == 64:
        actual = storage.sha256_file(real)
    elif len(expected) == 40:
        actual = _git_blob_sha1(real)
    else:
        return real
    if actual != expected:
        raise BackboneError(
            f"{uri}: cached {name} does not match its hash (content {actual[:12]}, expected "
            f"{expected[:12]}); the cache is corrupt — delete {repo_dir} and fetch again"
        )
    return real


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_error(uri: str, ref: HubRef, env: _Environment, cache: Path, exc: Exception) -> Exception:
    """One line naming the model and the fix for what huggingface_hub raised."""
    import httpx2
    from huggingface_hub import get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = env.endpoint
    status = _status(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        return BackboneError(
            f"{uri}: huggingface_hub is in offline mode (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE was set when it was imported); unset both to fetch the "
            "model from the Hub"
        )
    if isinstance(exc, GatedRepoError):
        token = "HF_TOKEN's account has no access" if get_token() else "no HF_TOKEN is set"
        return BackboneError(
            f"{uri}: '{ref.repo_id}' is a gated model and {token}; accept its conditions on "
            f"its page at {where} and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return BackboneError(
            f"{uri}: '{ref.repo_id}' has no revision '{ref.revision}' at {where}; give an "
            "existing branch, tag or commit after '@', or none for main"
        )
    if isinstance(exc, RepositoryNotFoundError) or status in (401, 403):
        token = "with HF_TOKEN" if get_token() else "without a token (HF_TOKEN unset)"
        return BackboneError(
            f"{uri}: no model '{ref.repo_id}' at {where} readable {token}; check the "
            "name, or set HF_TOKEN to a token that can read the private repository"
        )
    if isinstance(exc, RemoteEntryNotFoundError):
        return BackboneError(
            f"{uri}: {where} lists a file of '{ref.repo_id}' it does not serve; retry later",
            transient=True,
        )
    if isinstance(exc, httpx2.TransportError | LocalEntryNotFoundError | ConnectionError):
        cached = _repo_dir(cache, ref) / "refs" / ref.revision
        hint = (
            "; it is in the backbone cache: HF_HUB_OFFLINE=1 uses that copy"
            if cached.is_file() or ref.pinned
            else ""
        )
        return BackboneError(
            f"{uri}: the Hub at {where} cannot be reached ({type(exc).__name__}: "
            f"{_short(exc)}); check the network, or HF_ENDPOINT if you use a mirror{hint}",
            transient=True,
        )
    if isinstance(exc, HfHubHTTPError):
        return BackboneError(
            f"{uri}: the Hub at {where} answered {status} ({_short(exc)}); "
            + ("retry later" if status in (429, None) or status >= 500 else "check the id"),
            transient=status in (429, None) or status >= 500,
        )
    return exc  # not the Hub's answer: a bug or the machine (disk full), raised as it is


def _status(exc: Exception) -> Any:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:160] + ("…" if len(text) > 160 else "")
