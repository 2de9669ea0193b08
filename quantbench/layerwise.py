"""The layer-wise runner (design §6): capture block-0 inputs once, then visit the blocks one at a time.

GPTQ (``gptq_utils.py::gptq_fwrd``), OmniQuant, DuQuant and norm-tweaking all follow this pattern: run the
calibration windows through the embeddings, stop at the first decoder block, and for each block

1. let the method work on the block (collect statistics through hooks, optimise, quantize), then
2. push the inputs through the (now quantized) block to get the next block's inputs.

Only the block being visited needs to sit on the compute device; the others stay where they are (the model can
live on the CPU while a 70B block is on the GPU). Decoder blocks are called with the keyword arguments the
model itself passed to block 0 (position embeddings, mask), so no decoder layer is re-implemented.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.adapters import LlamaAdapter
from quantbench.cache import atomic_save

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


def _move_kwargs(kw: dict, device) -> dict:
    def mv(v):
        if torch.is_tensor(v):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(x) for x in v)
        return v

    return {k: mv(v) for k, v in kw.items()}


class Layerwise:
    """Block-by-block traversal of ``adapter``'s decoder over calibration ``windows`` (``[n, seqlen]`` ids).

    ``for i, block in runner: ...`` visits each block with ``runner.inputs`` holding its inputs; when the loop body
    returns, the inputs are propagated through the block as it then is (or replaced by what the body passed to
    :meth:`set_outputs`). ``feed`` runs the block over all inputs with hooks and stops each pass as soon as the
    hooked modules have been called. With ``fp_stream`` a second, floating-point stream is kept beside the
    quantized one (OmniQuant): ``runner.fp_targets`` is the untouched block's output on ``runner.fp_inputs``,
    computed before the body runs.
    """

    def __init__(self, adapter: LlamaAdapter, windows: torch.Tensor, device: str | torch.device = "cpu",
                 desc: str = "calibrate", fp_stream: bool = False):
        self.adapter, self.device, self.desc = adapter, torch.device(device), desc
        self.inputs, self.kwargs = self._capture(windows)
        self.fp_inputs = list(self.inputs) if fp_stream else None
        self.fp_targets: list[torch.Tensor] | None = None
        self._outputs: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _capture(self, windows: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        model, first = self.adapter.model, self.adapter.blocks[0]
        seen: list[torch.Tensor] = []
        kwargs: dict = {}

        def grab(_mod, args, kw):
            seen.append(args[0] if args else kw["hidden_states"])
            if not kwargs:
                kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values")})
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for w in tqdm(windows, desc=f"{self.desc}: embed", leave=False):
                try:
                    model(w[None].to(model.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        kwargs["use_cache"] = False
        return [x.to(self.device) for x in seen], _move_kwargs(kwargs, self.device)

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        blocks = self.adapter.blocks
        for i in tqdm(range(len(blocks)), desc=self.desc):
            block = blocks[i]
            home = next(block.parameters()).device
            block.to(self.device)
            if self.fp_inputs is not None:
                self.fp_targets = self.forward(block, self.fp_inputs)
            self._outputs = None
            yield i, block
            self.inputs = self._outputs if self._outputs is not None else self.forward(block)
            if self.fp_inputs is not None:
                self.fp_inputs = self.fp_targets
            block.to(home)
            log.debug("%s: block %d done", self.desc, i)

    def set_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Use ``outputs`` as the next block's inputs instead of re-running the block after the body."""
        self._outputs = outputs

    @torch.no_grad()
    def forward(self, block: nn.Module, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs for ``inputs`` (default: the current inputs), one window at a time."""
        return [block(x, **self.kwargs) for x in (self.inputs if inputs is None else inputs)]

    @torch.no_grad()
    def feed(self, block: nn.Module, hooks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> None:
        """Call ``hooks[m](input of m)`` for every window; each pass stops once all hooked modules have run."""
        count = [0]

        def make(fn):
            def hook(_mod, args, _out):
                fn(args[0])
                count[0] += 1
                if count[0] == len(hooks):
                    raise _Stop

            return hook

        handles = [m.register_forward_hook(make(fn)) for m, fn in hooks.items()]
        try:
            for x in self.inputs:
                count[0] = 0
                try:
                    block(x, **self.kwargs)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()


def _cpu(x):
    if torch.is_tensor(x):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


class BlockCheckpoint:
    """What a method needs to redo a finished block without calibrating it again (nested dicts/lists of tensors and
    numbers), one file per block written atomically when the block is done; a killed run resumes after the last
    finished block (design §6). Files: ``<cache>/checkpoints/<tag>-<key>/<block>.pt``, ``key`` naming the run's
    calibration identity (config hash, device, torch, code: ``planstore.calibration_key``); the folder is removed
    once the method finishes. Only an unbroken run of blocks from 0 is resumed: a damaged file and everything after
    it are calibrated again. Finished blocks live on disk only (a 70B run does not hold them in memory); ``key``
    None writes nothing."""

    def __init__(self, tag: str, key: str | None):
        from quantbench.models import cache_dir

        self.dir = cache_dir() / "checkpoints" / f"{tag}-{key}" if key else None
        self.blocks: dict[int, dict] = {}
        if self.dir is None or not self.dir.is_dir():
            return
        i = 0
        while (f := self.dir / f"{i}.pt").exists():
            try:
                self.blocks[i] = torch.load(f, weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged checkpoint is rebuilt, never trusted
                log.warning("checkpoint %s unreadable (%s); calibrating from block %d", f, e, i)
                break
            i += 1
        for f in self.dir.glob("*.pt"):  # after a gap or a damaged file: stale
            if not (f.stem.isdigit() and int(f.stem) in self.blocks):
                f.unlink()
        if self.blocks:
            log.info("resuming from %s: blocks 0-%d already calibrated", self.dir, len(self.blocks) - 1)

    def save(self, i: int, state: dict) -> None:
        if self.dir is not None:
            atomic_save(self.dir / f"{i}.pt", _cpu(state))

    def done(self) -> None:
        """The method finished: the checkpoint is no longer needed."""
        if self.dir is not None and self.dir.is_dir():
            shutil.rmtree(self.dir)
