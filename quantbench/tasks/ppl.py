"""GPTQ-protocol perplexity (GPTQ ``datautils.py`` + ``llama_eval``, as all four reference repos use it): non-overlapping seqlen windows, mean token CE per window over the
seqlen-1 shifted targets, PPL = exp(mean over windows). No BOS per window. Batch-size independent: each window's
loss is computed on its own row, batching only groups rows.

The interval (``quantbench.uncertainty``): each window's NLL is also summed per 256-token segment of targets and kept
in the record, so the PPL can be bootstrapped over windows (or segments, with fewer than 8 windows) and two
configurations compared window by window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantbench import data, uncertainty
from quantbench.errors import ConfigError, NumericalError
from quantbench.quant import widen
from quantbench.registry import TASKS
from quantbench.tasks.base import Task

DEFAULT_SPLIT = {"austen": "test", "wikitext2": "test", "c4": "validation"}


class PerplexityTask(Task):
    metrics = ("ppl",)

    def prepare(self, tokenizer) -> None:
        c = self.config
        windows = data.ppl_windows(tokenizer, c["corpus"], c["split"], c["seqlen"], c.get("variant"))
        self.windows = windows[: c["max_windows"]] if c["max_windows"] else windows

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        if getattr(self, "windows", None) is None:
            self.prepare(tokenizer)
        segments: list = []
        losses = window_losses(model, self.windows, self.run_options.get("batch_size", 1), desc=self.name,
                               segments=segments)
        value = math.exp(losses.mean().item())
        items = uncertainty.ppl_items([s for s, _ in segments], [c for _, c in segments],
                                      data.windows_digest(self.windows))
        self.items = {"ppl": items}
        self.intervals = {"ppl": uncertainty.interval(items)}
        return {"ppl": value}


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
                  segments: list | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (fp32), shape ``[n]``. With ``segments`` (a list), also append
    per window ``(NLL sums, token counts)`` of its consecutive :data:`~quantbench.uncertainty.SEGMENT`-token target
    segments (float64 sums of the same fp32 token losses)."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[i : i + batch_size].to(device)
        logits = widen(model(input_ids=ids, use_cache=False).logits)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(ce.mean(1).cpu())
        if segments is not None:
            for row in ce.detach().cpu().double():
                parts = row.split(uncertainty.SEGMENT)
                segments.append(([p.sum().item() for p in parts], [len(p) for p in parts]))
    losses = torch.cat(out)
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise NumericalError(f"{desc}: the model's loss is NaN/inf on {len(bad)} of {len(losses)} windows (first: "
                             f"window {bad[0]}); the logits are not finite")
    return losses


@TASKS.register("ppl")
def make_ppl(corpus: str, seqlen: int = 2048, max_windows: int = 0, split: str | None = None,
             variant: str | None = None, batch_size: int = 1, **_) -> PerplexityTask:
    if corpus not in data.CORPORA:
        raise ConfigError(f"unknown perplexity corpus {corpus!r}; known: "
                          f"{', '.join('ppl-' + c for c in data.CORPORA)}")
    if seqlen < 2 or max_windows < 0 or batch_size < 1:
        raise ConfigError("perplexity needs seqlen >= 2, max_windows >= 0 (0 = all), batch_size >= 1")
    split = split or DEFAULT_SPLIT[corpus]
    if corpus == "c4":
        variant = variant or "duquant-seed20"
    where = f"{corpus}-{split}" + (f"/{variant}" if variant else "")
    protocol = f"ppl/gptq/{where}/seqlen{seqlen}" + (f"/first{max_windows}windows" if max_windows else "")
    config = {"kind": "ppl", "corpus": corpus, "split": split, "seqlen": seqlen, "max_windows": max_windows,
              "variant": variant}
    return PerplexityTask(f"ppl-{corpus}", protocol, config, {"batch_size": batch_size})
