"""Every option of a run checked before any work (no model weight loaded, no data tokenized, nothing written).

:func:`check_device` and :func:`check_run` raise :class:`~quantbench.errors.ConfigError` (or ``UnavailableError``)
with one line that says what to do. The checks read the model's geometry from its config alone
(:func:`quantbench.models.geometry_of`): group sizes against every linear's input width, sequence lengths against
the model's context, the method's own shape needs (:meth:`quantbench.method.Method.check_model`, e.g. QuaRot's
Hadamard sizes), calibration sizes and corpus, backend and device. The bench (``bench/conftest.py``) runs them for
every case while it builds the grid; :func:`quantbench.runner.run` runs them again for API callers.
"""
from __future__ import annotations

import math

import torch

from quantbench import models
from quantbench.data import CORPORA, GENERATED
from quantbench.errors import ConfigError, UnavailableError
from quantbench.registry import BACKENDS


def check_device(device: str) -> str:
    """``device`` normalised (``cuda`` -> ``cuda``, ``cuda:1``), or an error when it is not one this machine has."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda[:index]") from None
    if d.type == "cpu":
        return "cpu"
    if d.type != "cuda":
        raise ConfigError(f"device {device!r} is not supported: use cpu or cuda[:index]")
    if not torch.cuda.is_available():
        raise UnavailableError(f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}, "
                               f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise UnavailableError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                               f"(0..{torch.cuda.device_count() - 1})")
    return device


def check_calibration(calib: dict, context: int | None, model: str) -> None:
    """The calibration set a method will read: corpus known, ``nsamples >= 1``, ``2 <= seqlen <= context``."""
    corpus, n, seqlen = calib.get("corpus"), calib.get("nsamples"), calib.get("seqlen")
    if corpus is not None and corpus not in (*CORPORA, GENERATED):
        raise ConfigError(f"unknown calibration corpus {corpus!r} (--calib); known: {', '.join([*CORPORA, GENERATED])}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"--nsamples {n}: calibration needs at least one window")
    if seqlen is not None and (not isinstance(seqlen, int) or seqlen < 2):
        raise ConfigError(f"--calib-seqlen {seqlen}: calibration windows need at least 2 tokens")
    if seqlen is not None and context and seqlen > context:
        raise ConfigError(f"calibration windows of {seqlen} tokens (--calib-seqlen, or the method's recipe when it "
                          f"is not given) are longer than {model}'s context of {context} tokens "
                          f"(max_position_embeddings); pass --calib-seqlen {context} or less")


def check_groups(geo, scheme, model: str) -> None:
    """A group size must divide the input width of every quantized linear (weights and per-group activations)."""
    widths = geo.linear_inputs()
    for what, spec in (("weight", scheme.w), ("activation", scheme.a)):
        if spec is None or spec.granularity != "group":
            continue
        bad = [(r, w) for r, w in widths.items() if w % spec.group_size]
        if bad:
            g = math.gcd(*widths.values())
            divisors = [d for d in (32, 64, 128, 256) if g % d == 0 and d <= g]
            raise ConfigError(
                f"{what} group size {spec.group_size} does not divide the input width of "
                f"{', '.join(f'{r}_proj ({w})' for r, w in bad)} in {model}; use a divisor of {g}"
                f"{' (e.g. ' + ', '.join(map(str, divisors)) + ')' if divisors else ''} or per-channel (no g)")


def check_attention(geo, scheme, model: str) -> None:
    """Q/K/V quantization needs post-RoPE Q/K/V reachable through transformers' attention interface (not BLOOM)."""
    qkv = [t.upper() for t in "qkv" if getattr(scheme, t) is not None]
    if qkv and not geo.ROUTES_ATTENTION:
        raise ConfigError(f"{model} ({geo.FAMILY}) computes its attention scores itself (ALiBi), so {'/'.join(qkv)} "
                          f"cannot be quantized here; drop {'/'.join(t.lower() for t in qkv)} from --scheme "
                          f"{scheme.name} (linears and their inputs can be: e.g. w4a4)")


def check_run(method, scheme, *, model: str, device: str, backend: str, calibration: dict | None,
              tasks=(), geometry=None) -> None:
    """Everything about one (method, scheme, model) run that can be known before it starts; ``calibration``: the
    merged recipe the method will read (None: it reads none), ``geometry``: :func:`models.geometry_of` when the
    caller has it."""
    check_device(device)
    BACKENDS.get(backend)
    geo = geometry or models.geometry_of(model)
    check_groups(geo, scheme, model)
    check_attention(geo, scheme, model)
    method.check_model(geo, scheme)
    if calibration is not None:
        check_calibration(calibration, geo.context, model)
    for task in tasks:
        seqlen = task.config.get("seqlen")
        if seqlen and geo.context and seqlen > geo.context:
            raise ConfigError(f"{task.name}: --seqlen {seqlen} is longer than {model}'s context of {geo.context} "
                              f"tokens (max_position_embeddings); use --seqlen {geo.context} or less")
