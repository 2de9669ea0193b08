"""The method interface: ``Method(**options).quantize(loaded_model, scheme, calib, key=None) -> QuantizedModel``.

A method returns a plan (:mod:`quantbench.plan`); block-wise methods supply per-block steps to the layer-wise
runner (:func:`quantbench.layerwise.run_blocks`), which owns the block lifecycle. ``key`` names the run's
calibration (:func:`quantbench.planstore.calibration_key`): with it, finished blocks are checkpointed and a killed
run resumes. docs/architecture.md has the recipe for a new method.
"""
from __future__ import annotations

from typing import ClassVar

from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.models import LoadedModel
from quantbench.plan import QuantizedModel, plain_plan
from quantbench.quant import DEFAULT_SPECS, QuantScheme, QuantSpec


def _coerce(key: str, value, default):
    """Options arrive as strings from the command line; convert them to the default's type."""
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"option {key}={value!r} is not a boolean (true/false)")
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}={value!r} is not a {type(default).__name__}") from None


class Method:
    """Base class. Subclasses register with ``@METHODS.register(name)`` and set:

    - ``defaults``: the grid/granularity each tensor gets when a scheme string names only bits;
    - ``options``: method settings and their defaults (the reference code's); every one is recorded and hashed;
    - ``neutral``: options added after records were published, each with the value that reproduces those records;
      at that value the option stays out of the run identity (:meth:`identity_options`), so published config
      hashes stay valid (the records still list every option);
    - ``choices``: allowed values of string options;
    - ``ranges``: inclusive ``(low, high)`` bounds of numeric options (None: open); an option's default is always
      allowed (e.g. ``-1``: "the reference value");
    - ``needs_calibration``: whether ``quantize`` reads ``calib.windows`` (it enters the config hash only then);
    - ``calib_defaults``: the reference recipe's calibration windows (count, length, seed) when the user names none;
    - ``quantizes``: False for the floating-point baseline, whose scheme is always w16a16;
    - ``headline``: the scheme the method is known by (``--scheme headline``; its paper's main table);
    - ``weight_only``: False where weight-only schemes lie outside the method's reference scope (it exists to
      quantize activations: SmoothQuant, DuQuant); such a run still works, is logged as such, and the overview
      page marks those cells ``n/a`` instead of leaving them to be filled;
    - ``role``: what the method can be in a pipeline (``quantbench.pipeline``): a ``transform`` (rewrites the model
      and builds the plan: :meth:`prepare`), a ``weights`` quantizer (:meth:`quantize_weights`, and one block at a
      time: :meth:`quantize_block`), a ``plugin`` that runs after a base, or ``method`` (whole, not composable);
    - ``modifies``: the parts of the model (``adapters.PARTS``: embed, norms, linears, final_norm, lm_head) whose
      tensors ``quantize`` may change; a cached plan stores exactly those (``quantbench.planstore``), and
      ``tests/test_planstore.py`` checks every method changes nothing outside them.

    ``quantize`` is ``prepare`` then ``quantize_weights`` unless a method overrides it.
    """

    name: ClassVar[str] = "?"
    defaults: ClassVar[dict[str, QuantSpec]] = DEFAULT_SPECS
    options: ClassVar[dict[str, object]] = {}
    neutral: ClassVar[dict[str, object]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    ranges: ClassVar[dict[str, tuple]] = {}
    needs_calibration: ClassVar[bool] = False
    calib_defaults: ClassVar[dict] = {"nsamples": 128, "seqlen": 2048, "seed": 0}  # GPTQ/QuaRot: 128 x 2048, seed 0
    quantizes: ClassVar[bool] = True
    headline: ClassVar[str] = "w4a16"
    weight_only: ClassVar[bool] = True  # weight-only (a16) schemes are in the method's reference scope
    role: ClassVar[str] = "method"
    modifies: ClassVar[tuple[str, ...]] = ()
    weights_label: ClassVar[str | None] = None  # method_info["weights"] (default: the name)

    def __init__(self, seed: int = 0, device: str = "cpu", **opts):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"method {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        self.seed, self.device = seed, device
        self.opts = {k: _coerce(k, opts.get(k, d), d) for k, d in self.options.items()}
        for k, allowed in self.choices.items():
            if self.opts[k] not in allowed:
                raise ConfigError(f"option {k}={self.opts[k]!r} of {self.name!r}: choose one of {', '.join(allowed)}")
        for k, (lo, hi) in self.ranges.items():
            v = self.opts[k]
            if v != self.options[k] and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
                d = self.options[k]
                outside = (lo is not None and d < lo) or (hi is not None and d > hi)
                raise ConfigError(f"option {k}={v!r} of {self.name!r} must be {span}"
                                  + (f" (or {d}, its default: the reference value)" if outside else ""))

    @classmethod
    def headline_for(cls, model) -> str:
        """The headline scheme on ``model`` (a name or folder): :attr:`headline`, unless the model decides it
        (``load``: the checkpoint's own scheme)."""
        return cls.headline

    def identity_options(self) -> dict:
        """The options that enter the config hash: all of them but a ``neutral`` one at its neutral value."""
        return {k: v for k, v in self.opts.items() if not (k in self.neutral and v == self.neutral[k])}

    def check_model(self, geometry, scheme: QuantScheme) -> None:
        """Raise :class:`ConfigError` when this method cannot run ``scheme`` on a model of ``geometry`` (an adapter
        over the bare config: widths, heads, context); called before any weight loads (``quantbench.validate``).
        Group sizes are checked for every method there; this hook is for a method's own shape needs."""

    def restructure(self, lm: LoadedModel):
        """Change the module structure of ``lm``'s model the way :meth:`quantize` does (QuaRot on LayerNorm models:
        the norms become RMSNorms), so a cached plan's tensors load into it; returns the function that undoes it."""
        return lambda: None

    def specs(self) -> dict[str, QuantSpec]:
        """Quantizer conventions for this instance (a method may adjust them by option, e.g. paper clip ratios)."""
        return self.defaults

    def prepare(self, lm: LoadedModel, scheme: QuantScheme, calib: Calibration | None) -> QuantizedModel:
        """The plan before weights are quantized (transforms folded, online transforms planned)."""
        return plain_plan(lm, scheme, weights=self.weights_label or self.name)

    def quantize_weights(self, qm: QuantizedModel, spec: QuantSpec, calib: Calibration | None,
                         key: str | None = None) -> None:
        """Quantize every planned weight."""
        raise NotImplementedError(f"{self.name} has no separate weight quantizer")

    def quantize_block(self, qm: QuantizedModel, spec: QuantSpec, ctx) -> None:
        """Quantize the planned weights of one block inside a caller's layer-wise pass (norm-tweaking):
        ``ctx`` is its :class:`quantbench.layerwise.BlockContext`, the block's current inputs in ``ctx.inputs``."""
        raise NotImplementedError(f"{self.name} has no per-block weight quantizer")

    def quantize(self, lm: LoadedModel, scheme: QuantScheme, calib: Calibration | None,
                 key: str | None = None) -> QuantizedModel:
        qm = self.prepare(lm, scheme, calib)
        if scheme.w:
            self.quantize_weights(qm, scheme.w, calib, key=key)
        return qm
