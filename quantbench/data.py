"""Corpora, GPTQ-protocol perplexity windows and seeded calibration windows.

Hub corpora (``wikitext2``, ``c4``) follow the reference repos exactly (GPTQ ``datautils.py``, as DuQuant,
OmniQuant and QuaRot vendor it); the shipped offline corpus ``austen`` (:mod:`quantbench.corpus`) is named
honestly and never passed off as WikiText2.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import random

import torch

from quantbench import generate, hub
from quantbench.cache import key_of, load_or_build
from quantbench.corpus import SHIPPED
from quantbench.corpus import manifest as corpus_manifest
from quantbench.corpus import text as corpus_text
from quantbench.errors import ConfigError, UnavailableError
from quantbench.models import tokenizer_hash

log = logging.getLogger(__name__)

HUB = ("wikitext2", "c4")
CORPORA = SHIPPED + HUB
# C4 validation subsets differ between the reference repos (a classic source of mismatched numbers): name the one used.
C4_VARIANTS = {
    "duquant-seed20": 20,  # Hsu1023/DuQuant datautils.py::get_c4: 256 random docs >= seqlen tokens, random.seed(20)
    "omniquant-seed0": 0,  # OpenGVLab/OmniQuant datautils.py::get_c4 (the GPTQ original), random.seed(0)
    "quarot-first1100": None,  # spcl/QuaRot data_utils.py::get_c4_new: ' '.join(first 1100 docs)[:256*seqlen]
}
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def _hub_dataset(path: str, **kwargs):
    """``datasets.load_dataset`` that never waits on retries: when a fast probe finds no hub, it runs in offline
    mode (a cached copy still loads) and an uncached dataset fails at once with what to do."""
    import datasets  # start-up time: datasets takes ~1 s to import, and only hub corpora need it

    what = f"{path} {kwargs.get('name') or kwargs.get('data_files') or ''}".strip()
    online = hub.reachable()
    try:
        with contextlib.nullcontext() if online else hub.offline_mode():
            return datasets.load_dataset(path, **kwargs)
    except Exception as e:  # datasets raises ConnectionError / FileNotFoundError / DatasetNotFoundError offline
        if not online:
            raise UnavailableError(
                f"dataset {what} is not available: the hub cannot be reached (offline or HF_DATASETS_OFFLINE=1) "
                f"and it is not in the datasets cache. With network, run once to cache it; offline, use the "
                f"shipped corpus (e.g. --tasks ppl-austen).") from None
        raise UnavailableError(f"could not load dataset {what}: {e}") from e


def _texts(corpus: str, split: str) -> list[str]:
    if corpus == "wikitext2":
        return _hub_dataset("wikitext", name="wikitext-2-raw-v1", split=split)["text"]
    if corpus == "c4":
        if split not in C4_FILES:
            raise ConfigError(f"c4 has splits {tuple(C4_FILES)}, not {split!r}")
        return _hub_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)["text"]
    raise ConfigError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")


def _encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as the reference repos make them: one call, the tokenizer's own special tokens."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


_IDS: dict[tuple[str, str, str], torch.Tensor] = {}


def joined_ids(tokenizer, corpus: str, split: str) -> torch.Tensor:
    """The whole split joined with "\\n\\n" (GPTQ protocol), tokenized once per process and tokenizer content (the
    shipped corpus: once per machine, in the ``eval-ids`` cache)."""
    key = (tokenizer_hash(tokenizer), corpus, split)
    if key not in _IDS:
        if corpus in SHIPPED:  # also on disk, keyed by tokenizer and corpus content: workers and reruns skip it
            ident = {"tokenizer": key[0], "source": corpus_manifest()[corpus], "split": split, "joined": "\n\n"}
            _IDS[key] = load_or_build("eval-ids", key_of(ident), lambda: _encode(tokenizer, corpus_text(corpus, split)),
                                      f"{corpus}/{split} token ids")
        else:
            _IDS[key] = _encode(tokenizer, "\n\n".join(_texts(corpus, split)))
    return _IDS[key]


def ppl_windows(tokenizer, corpus: str, split: str = "test", seqlen: int = 2048, variant: str | None = None):
    """Non-overlapping evaluation windows ``[n, seqlen]`` (tail dropped), as in all four reference repos.

    For ``c4`` the ``variant`` (see :data:`C4_VARIANTS`) picks the subset; the split is always validation.
    """
    if corpus == "c4":
        return _c4_eval_windows(tokenizer, seqlen, variant or "duquant-seed20")
    if variant:
        raise ConfigError(f"corpus {corpus!r} has no variants (only c4 does: {', '.join(C4_VARIANTS)})")
    ids = joined_ids(tokenizer, corpus, split)
    n = ids.numel() // seqlen
    if n == 0:
        raise ConfigError(f"{corpus}/{split} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].clone().view(n, seqlen)  # a copy: the memoised ids stay untouched


def _c4_eval_windows(tokenizer, seqlen: int, variant: str) -> torch.Tensor:
    if variant not in C4_VARIANTS:
        raise ConfigError(f"unknown c4 variant {variant!r}; known: {', '.join(C4_VARIANTS)}")
    docs = _texts("c4", "validation")
    if C4_VARIANTS[variant] is None:
        ids = _encode(tokenizer, " ".join(docs[:1100]))[: 256 * seqlen]
        return ids[: (ids.numel() // seqlen) * seqlen].view(-1, seqlen)
    return _random_doc_windows(tokenizer, docs, 256, seqlen, random.Random(C4_VARIANTS[variant]))


def _random_doc_windows(tokenizer, docs, n: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """GPTQ ``get_c4``: pick random docs with >= seqlen tokens, one random window each."""
    out = []
    for _ in range(n):
        while True:
            ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() >= seqlen:
                break
        i = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
        out.append(ids[i : i + seqlen])
    return torch.stack(out)


def calibration_windows(tokenizer, corpus: str, nsamples: int = 128, seqlen: int = 2048, seed: int = 0):
    """Seeded random calibration windows ``[nsamples, seqlen]`` (``datautils.py::get_wikitext2`` / ``get_c4``).

    Reference seeds: DuQuant/OmniQuant 2, QuaRot 0; the caller records which one it used.
    """
    rng = random.Random(seed)
    if corpus == "c4":
        return _random_doc_windows(tokenizer, _texts("c4", "train"), nsamples, seqlen, rng)
    ids = joined_ids(tokenizer, corpus, "train")
    if ids.numel() <= seqlen + 1:
        raise ConfigError(f"{corpus}/train has {ids.numel()} tokens, too few for {seqlen}-token windows")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i : i + seqlen] for i in starts])


def windows_digest(windows: torch.Tensor) -> str:
    """Content hash of a set of token windows (goes into calibration ids and results)."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


GENERATED = "generated"  # calibration text generated by the model itself (quantbench.generate)


class Calibration:
    """Lazily built calibration windows: methods that need none (RTN) never tokenize anything."""

    def __init__(self, tokenizer, corpus: str = "austen", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                 lm=None):
        if corpus not in CORPORA and corpus != GENERATED:
            raise ConfigError(f"unknown calibration corpus {corpus!r}; known: {', '.join([*CORPORA, GENERATED])}")
        if corpus == GENERATED and lm is None:
            raise ConfigError("the 'generated' calibration corpus needs the model that generates it")
        self.tokenizer, self.corpus, self.nsamples, self.seqlen, self.seed = tokenizer, corpus, nsamples, seqlen, seed
        self.lm = lm
        self._windows = None

    @property
    def windows(self) -> torch.Tensor:
        if self._windows is None:
            log.info("building %d x %d calibration windows from %s (seed %d)", self.nsamples, self.seqlen,
                     self.corpus, self.seed)
            if self.corpus == GENERATED:
                self._windows = generate.generated_windows(self.lm, self.nsamples, self.seqlen, self.seed)
            else:
                self._windows = self._cached_windows()
        return self._windows

    def _cached_windows(self) -> torch.Tensor:
        """:func:`calibration_windows` through the content-keyed cache: key = tokenizer content + corpus content
        (the shipped files' sha256, or the hub dataset and file named) + count, length and seed."""
        source = corpus_manifest()[self.corpus] if self.corpus in SHIPPED else \
            {"wikitext2": "wikitext/wikitext-2-raw-v1/train", "c4": "allenai/c4/" + C4_FILES["train"]}[self.corpus]
        ident = {"tokenizer": tokenizer_hash(self.tokenizer), "source": source, **self.config()}
        return load_or_build("calib-windows", key_of(ident), lambda: calibration_windows(
            self.tokenizer, self.corpus, self.nsamples, self.seqlen, self.seed), "calibration windows")

    def config(self) -> dict:
        """What identifies this calibration set (goes into config hashes and results)."""
        if self.corpus == GENERATED:
            g = generate
            split = f"self-generated (first token {g.FILTERS[0]}: {','.join(g.LANGUAGES)}; greedy to {g.GREEDY_TO}; " \
                    f"top-k {g.TOP_K})"
        else:
            split = "train" if self.corpus != "c4" else "train:" + C4_FILES["train"]
        return {"corpus": self.corpus, "split": split, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed}
