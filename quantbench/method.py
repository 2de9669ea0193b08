"""The method interface: ``Method().quantize(loaded_model, scheme, calib) -> QuantizedModel`` (a plan)."""
from __future__ import annotations

from quantbench.data import Calibration
from quantbench.models import LoadedModel
from quantbench.plan import QuantizedModel
from quantbench.quant import DEFAULT_SPECS, QuantScheme, QuantSpec


class Method:
    """Base class. Subclasses register with ``@METHODS.register(name)`` and set:

    - ``defaults``: the grid/granularity each tensor gets when a scheme string names only bits;
    - ``needs_calibration``: whether ``quantize`` reads ``calib.windows`` (it enters the config hash only then);
    - ``quantizes``: False for the floating-point baseline, whose scheme is always w16a16.
    """

    defaults: dict[str, QuantSpec] = DEFAULT_SPECS
    needs_calibration = False
    quantizes = True

    def quantize(self, lm: LoadedModel, scheme: QuantScheme, calib: Calibration | None) -> QuantizedModel:
        raise NotImplementedError
