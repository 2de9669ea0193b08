"""The layer-wise runner: the one block lifecycle every block-wise method runs through (:func:`run_blocks`).

GPTQ (``gptq_utils.py::gptq_fwrd``), OmniQuant, DuQuant and norm-tweaking all follow this pattern: run the
calibration windows through the embeddings, stop at the first decoder block, and for each block

1. let the method work on the block (collect statistics through hooks, optimise, quantize): its ``step``, or,
   when a killed run left this block's checkpoint, its ``restore`` from that state;
2. push the inputs through the (now quantized) block to get the next block's inputs.

The runner owns everything around the step: capturing block-0 inputs, moving one block at a time to the compute
device (the model can live on the CPU while a 70B block is on the GPU), the FP stream some methods train against,
the per-block checkpoints of :class:`BlockCheckpoint` (a killed run resumes after its last finished block), timing,
progress and the block's attention plan (:meth:`BlockContext.quantized_attention`). Decoder blocks are called with
the keyword arguments the model itself passed to block 0 (position embeddings, mask), so no decoder layer is
re-implemented.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.adapters import Adapter
from quantbench.cache import cache_dir, read_checked, remove_checked, write_checked
from quantbench.errors import NumericalError
from quantbench.plan import QuantizedModel
from quantbench.simulate import attention_plans, swapped

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


class _Recorded(nn.Module):
    """Stands in for a sub-layer during a pass: returns ``outputs[window]`` (``fn(inputs[window])`` with ``fn``,
    recording what it returns)."""

    def __init__(self, window: list[int], outputs: list, fn=None, inputs: list | None = None):
        super().__init__()
        self.window, self.outputs, self.fn, self.inputs = window, outputs, fn, inputs

    def forward(self, *args, **kwargs):
        j = self.window[0]
        if self.fn is None:
            return self.outputs[j]
        out = self.fn(self.inputs[j])
        self.outputs[j] = out
        return out


@dataclass
class _Sublayer:
    """One sub-layer the replay can skip: its path in the block, the linears that must be final before its ``last``
    linear's input stops changing, and ``output(last, x)``, what the sub-layer returns given that input."""

    path: str
    before: frozenset
    last: str
    output: Callable
    last_input: list | None = None
    recorded: list | None = None


REPLAY_BYTES = 8 << 30  # the most the replay holds per block (beyond it a sub-layer is recomputed as before)


class _Replay:
    """Sub-layer replay inside one block step (:meth:`BlockContext.replay`).

    A step that finalizes the block's linears group by group (GPTQ's true-sequential ``[k, v, q], [o], [up, gate],
    [down]``) runs the block once per group, and each run recomputes sub-layers whose output stopped changing.
    Here, for the attention (q/k/v before o) and the MLP (gate/up before down): once the linears before the last
    one are final (:meth:`BlockContext.settled`), the next pass records the last linear's input on every window;
    once the last linear is final too, the next pass computes the sub-layer's output from that input
    (the output functions of ``adapter.replay_parts()``) and records it; later passes take the recorded output.
    Every replayed value is what the same modules gave on the same window earlier in the step, so the outputs are
    bit-identical to full passes (``tests/test_gptq.py``). It holds one hidden-size and one intermediate-size tensor
    per window (up to :data:`REPLAY_BYTES`; the MLP is recomputed beyond it)."""

    def __init__(self, adapter: Adapter, block: nn.Module, inputs: list[torch.Tensor]):
        self.block, self.n, self.paths = block, len(inputs), adapter.LINEARS
        self.settled: set[str] = set()
        mlp_bytes = sum(x.numel() // x.shape[-1] for x in inputs) * adapter.intermediate_size * inputs[0].element_size()
        self.parts = [_Sublayer(path, before, last, fn) for path, before, last, fn in adapter.replay_parts()
                      if last != adapter.MLP_OUT or mlp_bytes <= REPLAY_BYTES]

    @contextlib.contextmanager
    def during(self, window: list[int]):
        """One pass over the step's windows; ``window[0]`` is the index of the window being run."""
        with contextlib.ExitStack() as stack:
            after = [self._enter(p, window, stack) for p in self.parts]
            yield
        for done in after:
            done()

    def _enter(self, part: _Sublayer, window: list[int], stack: contextlib.ExitStack) -> Callable[[], None]:
        """Set up ``part`` for one pass; returns what to do once the pass is over."""
        if part.recorded is not None:
            stack.enter_context(swapped(self.block, {part.path: _Recorded(window, part.recorded)}))
            return lambda: None
        last = self.block.get_submodule(self.paths[part.last])
        if part.last_input is not None and part.last in self.settled:
            out: list = [None] * self.n
            fn = functools.partial(part.output, last)
            stack.enter_context(swapped(self.block, {part.path: _Recorded(window, out, fn, part.last_input)}))

            def keep():
                if all(o is not None for o in out):
                    part.recorded, part.last_input = out, None
            return keep
        if part.last_input is None and part.before <= self.settled and part.last not in self.settled:
            seen: list = [None] * self.n

            def grab(_mod, args):
                seen[window[0]] = args[0]

            stack.callback(last.register_forward_pre_hook(grab, prepend=True).remove)  # before a feed's stop

            def keep():
                if all(x is not None for x in seen):
                    part.last_input = seen
            return keep
        return lambda: None


class _Layerwise:
    """Block-by-block traversal of ``adapter``'s decoder over calibration ``windows`` (``[n, seqlen]`` ids), used by
    :func:`run_blocks` only.

    ``for i, block in runner: ...`` visits each block with ``runner.inputs`` holding its inputs; when the loop body
    returns, the inputs are propagated through the block as it then is (or replaced by what the body passed to
    :meth:`set_outputs`). With ``fp_stream`` a second, floating-point stream is kept beside the quantized one
    (OmniQuant): ``runner.fp_targets`` is the untouched block's output on ``runner.fp_inputs``, computed before
    the body runs.
    """

    def __init__(self, adapter: Adapter, windows: torch.Tensor, device: str | torch.device = "cpu",
                 desc: str = "calibrate", fp_stream: bool = False):
        self.adapter, self.device, self.desc = adapter, torch.device(device), desc
        self.inputs, self.kwargs = self._capture(windows)
        self.fp_inputs = list(self.inputs) if fp_stream else None
        self.fp_targets: list[torch.Tensor] | None = None
        self._outputs: list[torch.Tensor] | None = None
        self.replay: _Replay | None = None  # set by BlockContext.replay for one step

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
        _check_finite(seen, f"{self.desc}: the input of block 0 (the embeddings' output)")
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
            _check_finite(self.inputs, f"{self.desc}: the output of block {i} ({self.adapter.block_prefix(i)[:-1]})")
            if self.fp_inputs is not None:
                self.fp_inputs = self.fp_targets
            block.to(home)
            log.debug("%s: block %d done", self.desc, i)

    def set_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Use ``outputs`` as the next block's inputs instead of re-running the block after the body."""
        self._outputs = outputs

    def _replaying(self, inputs: list[torch.Tensor] | None, window: list[int]) -> contextlib.AbstractContextManager:
        """The step's replay around one pass (the quantized stream only: ``inputs`` None), if the step has one."""
        return self.replay.during(window) if self.replay is not None and inputs is None else contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, block: nn.Module, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs for ``inputs`` (default: the current inputs), one window at a time."""
        window, out = [0], []
        with self._replaying(inputs, window):
            for j, x in enumerate(self.inputs if inputs is None else inputs):
                window[0] = j
                out.append(self.adapter.block_output(block(x, **self.kwargs)))
        return out

    @torch.no_grad()
    def feed(self, block: nn.Module, hooks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> None:
        """Call ``hooks[m](input of m)`` for every window; each pass stops once all hooked modules have been
        reached, before the last of them computes (its output is never read)."""
        count = [0]

        def make(fn):
            def hook(_mod, args):
                fn(args[0])
                count[0] += 1
                if count[0] == len(hooks):
                    raise _Stop

            return hook

        handles = [m.register_forward_pre_hook(make(fn)) for m, fn in hooks.items()]
        window = [0]
        try:
            with self._replaying(None, window):
                for j, x in enumerate(self.inputs):
                    window[0], count[0] = j, 0
                    try:
                        block(x, **self.kwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()


def _check_finite(xs: list[torch.Tensor], what: str) -> None:
    """NaN/inf in the calibration stream is an error that names where it appeared (no method recovers from it)."""
    for j, x in enumerate(xs):
        if not torch.isfinite(x).all():
            raise NumericalError(f"{what} has NaN/inf values on calibration window {j}")


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
    numbers), one file per block written atomically with a sha256 sidecar when the block is done; a killed run
    resumes after the last finished block. Files: ``<cache>/checkpoints/<tag>-<key>/<block>.pt`` (+ ``.sha256``),
    ``key`` naming the run's calibration identity (config hash, device, torch, code:
    ``planstore.calibration_key``); the folder is removed once the method finishes. Only an unbroken run of intact
    blocks from 0 is resumed: a damaged file (its bytes do not match its checksum, or it does not load) is logged
    and it and everything after it are removed and calibrated again. Finished blocks live on disk only (a 70B run
    does not hold them in memory); ``key`` None writes nothing. A checkpoint that cannot be written (full disk) is a
    warning: the run goes on without checkpoints."""

    def __init__(self, tag: str, key: str | None):
        self.dir = cache_dir() / "checkpoints" / f"{tag}-{key}" if key else None
        self.blocks: dict[int, dict] = {}
        if self.dir is None or not self.dir.is_dir():
            return
        i = 0
        while (f := self.dir / f"{i}.pt").exists():
            state = read_checked(f, f"checkpoint of block {i}")
            if state is None:
                break
            self.blocks[i] = state
            i += 1
        for f in [*self.dir.glob("*.pt"), *self.dir.glob("*.sha256")]:  # after a gap or a damaged file: stale
            if not (f.stem.isdigit() and int(f.stem) in self.blocks):
                f.unlink(missing_ok=True)
        if self.blocks:
            log.info("resuming from %s: blocks 0-%d already calibrated", self.dir, len(self.blocks) - 1)

    def save(self, i: int, state: dict) -> None:
        if self.dir is None:
            return
        try:
            write_checked(self.dir / f"{i}.pt", _cpu(state))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed stream as RuntimeError
            remove_checked(self.dir / f"{i}.pt")
            log.warning("could not write the checkpoint of block %d to %s (%s); going on without checkpoints", i,
                        self.dir, getattr(e, "strerror", None) or str(e).splitlines()[0])
            self.done()
            self.dir = None

    def done(self) -> None:
        """The method finished: the checkpoint is no longer needed."""
        if self.dir is not None and self.dir.is_dir():
            shutil.rmtree(self.dir)


@dataclass
class BlockContext:
    """What a method's per-block step sees: block ``index`` of the decoder, its ``inputs`` (the quantized stream,
    one tensor per calibration window or the method's own reduction of them), the keyword arguments the model
    passed to its blocks, and with ``fp_stream`` the FP block's outputs on the FP stream (``fp_targets``). A step
    that already computed the block's outputs sets ``outputs``; otherwise the runner runs the block as the step
    left it."""

    index: int
    block: nn.Module
    qm: QuantizedModel
    runner: _Layerwise = field(repr=False)
    fp_targets: list[torch.Tensor] | None = None
    outputs: list[torch.Tensor] | None = None

    @property
    def inputs(self) -> list[torch.Tensor]:
        return self.runner.inputs

    @inputs.setter
    def inputs(self, value: list[torch.Tensor]) -> None:
        self.runner.inputs = value

    @property
    def kwargs(self) -> dict:
        return self.runner.kwargs

    @property
    def prefix(self) -> str:
        """The block's qualified name with a trailing dot (``model.layers.3.``)."""
        return self.qm.adapter.block_prefix(self.index)

    def forward(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs on ``inputs`` (default: :attr:`inputs`), one window at a time."""
        return self.runner.forward(self.block, inputs)

    def apply(self, x: torch.Tensor, kwargs: dict | None = None) -> torch.Tensor:
        """The block's hidden states on one input ``x`` (with grad if enabled; ``kwargs`` default: the model's)."""
        return self.qm.adapter.block_output(self.block(x, **(self.kwargs if kwargs is None else kwargs)))

    def feed(self, hooks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> None:
        """Call ``hooks[m](input of m)`` for every input; each pass stops once all hooked modules have been reached."""
        self.runner.feed(self.block, hooks)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """For the duration, passes over :attr:`inputs` skip recomputing what :meth:`settled` linears fixed
        (:class:`_Replay`). Only for a step that changes nothing in the block but the linears it declares settled,
        in the order q/k/v, o (true-sequential GPTQ)."""
        self.runner.replay = _Replay(self.qm.adapter, self.block, self.inputs)
        try:
            yield
        finally:
            self.runner.replay = None

    def settled(self, roles) -> None:
        """The linears of ``roles`` are final for the rest of the step (used by :meth:`replay`; a no-op outside it)."""
        if self.runner.replay is not None:
            self.runner.replay.settled.update(roles)

    def quantized_attention(self) -> contextlib.AbstractContextManager:
        """For the duration, the block's attention runs with its :class:`~quantbench.plan.AttentionPlan`."""
        return attention_plans(self.qm.model, {self.qm.adapter.attention(self.block): self.qm.attention.get(self.index)})


@dataclass
class BlockRun:
    """What :func:`run_blocks` reports: the blocks restored from checkpoints, the mean seconds per calibrated block
    and the whole run's seconds."""

    resumed: list[int]
    per_block_s: float
    wall_s: float


def run_blocks(qm: QuantizedModel, windows: torch.Tensor, step: Callable[[BlockContext], dict | None],
               restore: Callable[[BlockContext, dict], None] | None = None, *, key: str | None = None,
               tag: str = "calibrate", device: str | torch.device = "cpu", fp_stream: bool = False) -> BlockRun:
    """Visit every decoder block of ``qm``'s model over the calibration ``windows``: ``step(ctx)`` calibrates block
    ``ctx.index`` and returns what redoes it without calibrating (its checkpoint state: nested dicts/lists of
    tensors and numbers), ``restore(ctx, state)`` redoes it from that state.

    With ``key`` (the run's calibration key, :func:`quantbench.planstore.calibration_key`) each finished block's
    state is written to ``checkpoints/<tag>-<key>/<i>.pt`` and a re-run restores the unbroken prefix of finished
    blocks instead of calibrating them; the folder is removed when the last block is done."""
    t0 = time.perf_counter()
    ckpt = BlockCheckpoint(tag, key)
    if ckpt.blocks and restore is None:
        raise ValueError(f"{tag}: checkpointed blocks but no restore step")
    runner = _Layerwise(qm.adapter, windows, device, desc=tag, fp_stream=fp_stream)
    resumed, times = [], []
    for i, block in runner:
        ctx = BlockContext(i, block, qm, runner, runner.fp_targets)
        tb = time.perf_counter()
        if i in ckpt.blocks:
            restore(ctx, ckpt.blocks[i])
            resumed.append(i)
        else:
            state = step(ctx)
            ckpt.save(i, state if state is not None else {})
            times.append(time.perf_counter() - tb)
        if ctx.outputs is not None:
            runner.set_outputs(ctx.outputs)
    ckpt.done()
    out = BlockRun(resumed, sum(times) / max(len(times), 1), time.perf_counter() - t0)
    log.info("%s: %d blocks in %.1fs (%.2fs per calibrated block%s)", tag, len(qm.adapter.blocks), out.wall_s,
             out.per_block_s, f"; blocks {resumed[0]}-{resumed[-1]} restored from checkpoints" if resumed else "")
    return out
