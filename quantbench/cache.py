"""Content-keyed on-disk cache: ``<cache>/<kind>/<key>.pt`` with a ``.sha256`` sidecar, written atomically.

Every reused file is checked before use: an entry whose bytes do not match its sidecar (truncated, bit-flipped,
half-written) is logged, removed and rebuilt, never used. The same primitives (:func:`write_checked`,
:func:`read_checked`) keep the per-block checkpoints of ``quantbench.layerwise``. Caching is optional: an entry that
cannot be written (a full disk, no permission) is a warning, its temporary file is removed and the run goes on
without it. Temporary files of writers that died (``<name>.tmp<pid>``) are removed when the cache is first opened
in a process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SWEPT: set[Path] = set()
_TMP = re.compile(r"\.tmp(\d+)$")


def cache_root() -> Path:
    """Where the caches live (``$QUANTBENCH_CACHE``, default ``~/.cache/quantbench``), without creating it."""
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def keep_benchmarks_out_of_the_checkout(config) -> None:
    """pytest-benchmark creates its storage (default ``./.benchmarks``) in every session: point it into the cache
    unless the user chose one (called from the ``pytest_configure`` of tests/ and bench/)."""
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + str(cache_root() / "benchmarks")


def cache_dir() -> Path:
    """Root of quantbench's on-disk caches (:func:`cache_root`), created; the first call per process and root
    removes stale temporary files (:func:`sweep_stale`)."""
    d = cache_root()
    d.mkdir(parents=True, exist_ok=True)
    if d not in _SWEPT:
        _SWEPT.add(d)
        sweep_stale(d, recursive=True)
    return d


def key_of(ident: dict) -> str:
    """Short sha256 of the canonical JSON of ``ident`` (what makes an entry what it is)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


# ---- temporary files: <name>.tmp<pid>, renamed into place; those of dead writers are swept


def tmp_path(path: Path) -> Path:
    """Where a writer of ``path`` puts its bytes before renaming them into place."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(root: Path, recursive: bool = False) -> int:
    """Remove the temporary files and folders (``*.tmp<pid>``) under ``root`` whose writer is no longer running;
    the number removed."""
    n = 0
    for p in (root.rglob("*.tmp*") if recursive else root.glob("*.tmp*")):
        m = _TMP.search(p.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            n += 1
        except OSError:
            continue
    if n:
        log.info("removed %d temporary file(s) of killed writers under %s", n, root)
    return n


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (a reader sees the old file or the new one, never half of one).
    On any failure (``OSError`` of a full disk, torch's ``RuntimeError`` from a failed stream, an interrupt) the
    temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".sha256")


def write_checked(path: Path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically, then the sha256 of exactly those bytes to ``<path>.sha256``
    (a crash between the two leaves a mismatch, which :func:`read_checked` treats as damage)."""
    digest: list[str] = []

    def save(tmp: Path) -> None:
        torch.save(obj, tmp)
        digest.append(sha256_file(tmp))

    atomic_write(path, save)
    atomic_write_text(_sidecar(path), digest[0])


def remove_checked(path: Path) -> None:
    for f in (path, _sidecar(path)):
        f.unlink(missing_ok=True)


def read_checked(path: Path, what: str):
    """The object in ``path`` if its bytes match its sidecar and it loads (``weights_only``), else None: a damaged
    or unreadable entry is logged and removed with its sidecar, so it is rebuilt, never used."""
    try:
        want = _sidecar(path).read_text().strip()
        if want != sha256_file(path):
            raise ValueError("sha256 mismatch with its .sha256")
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("%s %s is damaged (%s); removed, rebuilding", what, path, e)
        remove_checked(path)
        return None


def enabled() -> bool:
    """False under ``QUANTBENCH_NO_CACHE=1`` (the bench's ``--no-cache``): every entry is rebuilt and not stored."""
    return os.environ.get("QUANTBENCH_NO_CACHE", "0") in ("", "0")


def entries(kind: str | None = None) -> list[Path]:
    """The cache's entries (``.pt`` files), of one kind or all; the converted model folders are not entries."""
    root = cache_dir()
    return sorted(p for p in (root / kind if kind else root).glob("**/*.pt") if p.is_file())


def clean(kind: str | None = None) -> tuple[int, int]:
    """Delete every file of one kind (e.g. ``plans``, ``model-manifests``), or every entry and its checksum; (files
    removed, bytes freed). The converted model folders stay."""
    n = size = 0
    files = sorted(p for p in (cache_dir() / kind).rglob("*") if p.is_file()) if kind else \
        [f for p in entries() for f in (p, _sidecar(p))] + sorted((cache_dir() / "model-manifests").glob("*.json"))
    for f in files:
        if f.exists():
            size += f.stat().st_size
            f.unlink()
            n += 1
    root = cache_dir() / kind if kind else cache_dir()
    for d in sorted((d for d in root.glob("**/") if d != root), key=lambda d: -len(d.parts)):
        if not any(d.iterdir()):  # e.g. a checkpoint folder emptied above
            d.rmdir()
    return n, size


def load(kind: str, key: str, what: str):
    """The entry ``kind/key`` if present, intact and the cache is on, else None (a damaged entry is logged and
    removed)."""
    path = cache_dir() / kind / f"{key}.pt"
    if not (enabled() and path.exists()):
        return None
    obj = read_checked(path, f"{what} cache")
    if obj is not None:
        log.info("%s from cache %s", what, path.name)
    return obj


def save(kind: str, key: str, obj) -> bool:
    """Store ``obj`` as ``kind/key`` (atomically, with its checksum), unless the cache is switched off; a write
    that fails (full disk, permissions) is a warning, leaves nothing behind and returns False."""
    if not enabled():
        return False
    path = cache_dir() / kind / f"{key}.pt"
    try:
        write_checked(path, obj)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed stream as RuntimeError
        remove_checked(path)
        log.warning("could not write cache entry %s (%s); going on without caching it", path, _reason(e))
        return False
    return True


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]


def load_or_build(kind: str, key: str, build: Callable[[], object], what: str, use_cache: bool = True):
    """The entry ``kind/key`` if present and intact, else ``build()`` (stored unless ``use_cache`` is False or the
    cache is switched off, :func:`enabled`)."""
    obj = load(kind, key, what) if use_cache else None
    if obj is None:
        obj = build()
        if use_cache:
            save(kind, key, obj)
    return obj
