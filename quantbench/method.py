"""The method interface: ``Method(**options).quantize(loaded_model, scheme, calib) -> QuantizedModel`` (a plan)."""
from __future__ import annotations

from typing import ClassVar

from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.models import LoadedModel
from quantbench.plan import QuantizedModel
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
    - ``choices``: allowed values of string options;
    - ``needs_calibration``: whether ``quantize`` reads ``calib.windows`` (it enters the config hash only then);
    - ``calib_defaults``: the reference recipe's calibration windows (count, length, seed) when the user names none;
    - ``quantizes``: False for the floating-point baseline, whose scheme is always w16a16.
    """

    name: ClassVar[str] = "?"
    defaults: ClassVar[dict[str, QuantSpec]] = DEFAULT_SPECS
    options: ClassVar[dict[str, object]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    needs_calibration: ClassVar[bool] = False
    calib_defaults: ClassVar[dict] = {"nsamples": 128, "seqlen": 2048, "seed": 0}  # GPTQ/QuaRot: 128 x 2048, seed 0
    quantizes: ClassVar[bool] = True

    def __init__(self, seed: int = 0, device: str = "cpu", **opts):
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"method {self.name!r} has no option {', '.join(unknown)}; its options: {known}")
        self.seed, self.device = seed, device
        self.run_key: str | None = None  # the run's config hash, set by the runner (names per-block checkpoints)
        self.opts = {k: _coerce(k, opts.get(k, d), d) for k, d in self.options.items()}
        for k, allowed in self.choices.items():
            if self.opts[k] not in allowed:
                raise ConfigError(f"option {k}={self.opts[k]!r} of {self.name!r}: choose one of {', '.join(allowed)}")

    def specs(self) -> dict[str, QuantSpec]:
        """Quantizer conventions for this instance (a method may adjust them by option, e.g. paper clip ratios)."""
        return self.defaults

    def quantize(self, lm: LoadedModel, scheme: QuantScheme, calib: Calibration | None) -> QuantizedModel:
        raise NotImplementedError
