"""Declarative composition: ``--method quarot+gptq+normtweak`` = a transform, then a weight quantizer, then a
plug-in, sharing one calibration set (as norm-tweaking's authors feed one loader to GPTQ and the tweak loop).

Each part is a registered method with a ``role`` (:class:`quantbench.method.Method`): ``transform`` methods
(quarot, smoothquant) rewrite the model and build the plan and bring their own weight rounding (RTN) for when no
weight quantizer follows; ``weights`` methods (rtn, gptq) quantize the planned weights, whole or one block at a time;
a ``plugin`` (normtweak) drives its own block-wise pass and asks the base to quantize each block. Whole methods
(duquant, omniquant, fp16) do not compose. The pipeline's options are the union of its parts' options, its
quantizer conventions the first part's, its calibration recipe the last part's that reads one, and what it
changes in the model (``Method.modifies``) the union of its parts'.

:func:`resolve` is how a name becomes a method class: a registered name, or a composition built here.
"""
from __future__ import annotations

from quantbench.errors import ConfigError
from quantbench.method import Method
from quantbench.registry import METHODS

ORDER = ("transform", "weights", "plugin")
_BUILT: dict[str, type] = {}


def _parts(name: str) -> list[type]:
    names = [p.strip() for p in name.split("+")]
    if len(names) < 2 or not all(names):
        raise ConfigError(f"malformed method pipeline {name!r}: write parts joined by '+', e.g. gptq+normtweak")
    classes = [METHODS.get(n) for n in names]
    whole = [n for n, c in zip(names, classes) if c.role not in ORDER]
    if whole:
        composable = ", ".join(sorted(n for n, c in METHODS.items() if isinstance(c, type) and c.role in ORDER))
        raise ConfigError(f"{', '.join(whole)} cannot be part of a pipeline (a whole method); composable: {composable}")
    roles = [c.role for c in classes]
    if roles != sorted(roles, key=ORDER.index):
        raise ConfigError(f"pipeline {name!r}: transforms first, then one weight quantizer, then plug-ins "
                          f"(got {' + '.join(f'{n} ({r})' for n, r in zip(names, roles))})")
    for role, what in (("transform", "transforms"), ("weights", "weight quantizers"), ("plugin", "plug-ins")):
        found = [n for n, r in zip(names, roles) if r == role]
        if len(found) > 1:
            raise ConfigError(f"pipeline {name!r} has two {what} ({' and '.join(found)}); use one")
    if roles == ["plugin"] * len(roles) or roles[0] == "plugin":
        raise ConfigError(f"pipeline {name!r}: a plug-in needs a base method before it (e.g. gptq+{names[0]})")
    return classes


def resolve(name: str) -> type[Method]:
    """The method class of ``name``: a registered method, or the pipeline ``a+b(+c)`` of registered parts."""
    return compose(name) if "+" in name else METHODS.get(name)


def compose(name: str) -> type[Method]:
    """The :class:`Method` class of pipeline ``name`` (built once per name)."""
    if name in _BUILT:
        return _BUILT[name]
    classes = _parts(name)
    options: dict = {}
    for c in classes:
        for k, v in c.options.items():
            if k in options and options[k] != v:
                raise ConfigError(f"pipeline {name!r}: option {k!r} has different defaults in its parts")
            options[k] = v
    reads = [c for c in classes if c.needs_calibration]

    class Pipeline(Method):
        __doc__ = f"Pipeline {name}: " + " -> ".join(f"{c.name} ({c.role})" for c in classes)
        role = "method"
        defaults = classes[0].defaults
        headline = classes[0].headline
        choices = {k: v for c in classes for k, v in c.choices.items()}
        neutral = {k: v for c in classes for k, v in c.neutral.items()}
        ranges = {k: v for c in classes for k, v in c.ranges.items()}
        needs_calibration = bool(reads)
        weight_only = all(c.weight_only for c in classes)
        calib_defaults = reads[-1].calib_defaults if reads else Method.calib_defaults
        modifies = tuple(dict.fromkeys(p for c in classes for p in c.modifies))
        parts = tuple(classes)

        def __init__(self, seed: int = 0, device: str = "cpu", **opts):
            super().__init__(seed, device, **opts)
            self.stages = {c.role: c(seed, device, **{k: v for k, v in self.opts.items() if k in c.options},
                                     **({"_in_pipeline": True} if c.role == "plugin" else {}))
                           for c in classes}

        def specs(self):
            return self.stages[classes[0].role].specs()

        def restructure(self, lm):
            undos = [stage.restructure(lm) for stage in self.stages.values()]

            def undo():
                for u in reversed(undos):
                    u()
            return undo

        def check_model(self, geometry, scheme):
            for stage in self.stages.values():
                stage.check_model(geometry, scheme)

        def quantize(self, lm, scheme, calib, key=None):
            first = self.stages.get("transform") or self.stages["weights"]
            base = self.stages.get("weights") or self.stages["transform"]
            qm = first.prepare(lm, scheme, calib)
            qm.info.update(pipeline=[c.name for c in classes], weights=base.weights_label or base.name)
            if "plugin" in self.stages:
                self.stages["plugin"].run(lm, qm, base, calib, key=key)
            elif scheme.w:
                base.quantize_weights(qm, scheme.w, calib, key=key)
            return qm

    Pipeline.options = options
    Pipeline.name = name
    Pipeline.__name__ = Pipeline.__qualname__ = "Pipeline_" + "_".join(c.__name__ for c in classes)
    _BUILT[name] = Pipeline
    return Pipeline
