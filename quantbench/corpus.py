"""The shipped offline corpus (a leaf module): six public-domain Austen novels, each file checked against the
sha256 recorded in ``corpora/manifest.json`` (train = Emma, Mansfield Park, Northanger Abbey, Sense and
Sensibility; validation = Persuasion; test = Pride and Prejudice)."""
from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from importlib import resources

from quantbench.errors import ConfigError, UnavailableError

SHIPPED = ("austen",)


@lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads(resources.files("quantbench").joinpath("corpora/manifest.json").read_text())


@lru_cache(maxsize=8)
def text(name: str, split: str) -> str:
    """Text of a shipped corpus split (its files joined with a blank line)."""
    if name not in SHIPPED:
        raise ConfigError(f"{name!r} is not a shipped corpus; shipped: {', '.join(SHIPPED)}")
    entry = manifest()[name]
    if split not in entry["splits"]:
        raise ConfigError(f"corpus {name!r} has no split {split!r}; splits: {', '.join(entry['splits'])}")
    parts = []
    for fname in entry["splits"][split]:
        raw = resources.files("quantbench").joinpath(f"corpora/{fname}").read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry["sha256"][fname]:
            raise UnavailableError(f"shipped corpus file {fname} is corrupted (sha256 mismatch); reinstall quantbench")
        parts.append(gzip.decompress(raw).decode("utf-8"))
    return "\n\n".join(parts)
