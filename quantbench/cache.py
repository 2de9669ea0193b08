"""Content-keyed on-disk cache: ``<cache>/<kind>/<key>.pt`` with a ``.sha256`` sidecar, written atomically.

A truncated or altered entry fails its checksum, is logged and rebuilt, never silently used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch


log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of quantbench's on-disk caches (``$QUANTBENCH_CACHE``, default ``~/.cache/quantbench``)."""
    d = Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def key_of(ident: dict) -> str:
    """Short sha256 of the canonical JSON of ``ident`` (what makes an entry what it is)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_save(path: Path, obj, checksum: bool = False) -> str | None:
    """``torch.save`` to a temporary file renamed into place (a reader never sees half a file); with ``checksum``,
    the sha256 of exactly what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    digest = _digest(tmp) if checksum else None
    os.replace(tmp, path)
    return digest


def _write(path: Path, obj) -> None:
    digest = atomic_save(path, obj, checksum=True)
    check = path.with_suffix(".sha256")
    tmp_check = check.with_name(f"{check.name}.tmp{os.getpid()}")
    tmp_check.write_text(digest)
    os.replace(tmp_check, check)


def enabled() -> bool:
    """False under ``QUANTBENCH_NO_CACHE=1`` (the bench's ``--no-cache``): every entry is rebuilt and not stored."""
    return os.environ.get("QUANTBENCH_NO_CACHE", "0") in ("", "0")


def entries(kind: str | None = None) -> list[Path]:
    """The cache's entries (``.pt`` files), of one kind or all; the converted model folders are not entries."""
    root = cache_dir()
    return sorted(p for p in (root / kind if kind else root).glob("**/*.pt") if p.is_file())


def clean(kind: str | None = None) -> tuple[int, int]:
    """Delete the entries (and their checksums) of one kind or all; (files removed, bytes freed)."""
    n = size = 0
    for p in entries(kind):
        for f in (p, p.with_suffix(".sha256")):
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
    """The entry ``kind/key`` if present, intact and the cache is on, else None (a damaged entry is logged)."""
    path = cache_dir() / kind / f"{key}.pt"
    if not (enabled() and path.exists()):
        return None
    try:
        if path.with_suffix(".sha256").read_text().strip() != _digest(path):
            raise ValueError("checksum mismatch")
        obj = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("%s cache %s is damaged (%s); rebuilding", what, path, e)
        return None
    log.info("%s from cache %s", what, path.name)
    return obj


def save(kind: str, key: str, obj) -> None:
    """Store ``obj`` as ``kind/key`` (atomically, with its checksum), unless the cache is switched off."""
    if enabled():
        _write(cache_dir() / kind / f"{key}.pt", obj)


def load_or_build(kind: str, key: str, build: Callable[[], object], what: str, use_cache: bool = True):
    """The entry ``kind/key`` if present and intact, else ``build()`` (stored unless ``use_cache`` is False or the
    cache is switched off, :func:`enabled`)."""
    obj = load(kind, key, what) if use_cache else None
    if obj is None:
        obj = build()
        if use_cache:
            save(kind, key, obj)
    return obj
