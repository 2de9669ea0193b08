"""``load``: evaluate a compressed-tensors checkpoint (``--model DIR``) through the suite's tasks and backends.

The checkpoint may come from ``quantbench export`` or from another tool (llm-compressor, auto-round); its
quantization is read as it is stored (:func:`quantbench.export.checkpoint_plan`): integer codes, scales and zero
points per linear, dynamic symmetric activations on ``sym_ct`` (the grid compressed-tensors computes). The model
around them is the same folder loaded dense. ``--scheme headline`` is the checkpoint's own scheme; ``label`` names
the row on the leaderboard (e.g. ``llm-compressor:gptq``) and ``base`` the model it was quantized from, whose
leaderboard section the row joins (default: the one a quantbench export names, else the folder); the record's
``model_id`` and ``model_revision`` stay the checkpoint's. The record keeps the checkpoint's
``quantization_config`` and, for a quantbench export, the provenance of the record it came from.
"""
import os

from quantbench import export
from quantbench.errors import ConfigError
from quantbench.method import Method
from quantbench.quant import DEFAULT_SPECS, QuantSpec
from quantbench.registry import METHODS


def _folder(config) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    if not os.path.isdir(path):
        raise ConfigError("--method load evaluates a compressed-tensors checkpoint folder: pass it as --model DIR")
    return path


@METHODS.register("load")
class Load(Method):
    role = "import"
    defaults = {**DEFAULT_SPECS, "a": QuantSpec(4, export.ACT_GRID, "token")}
    options = {"label": "", "base": ""}
    weights_label = "checkpoint"

    @classmethod
    def headline_for(cls, model) -> str:
        if not isinstance(model, str) or not os.path.isdir(model):
            raise ConfigError("--method load evaluates a compressed-tensors checkpoint folder: pass it as --model DIR")
        return export.checkpoint_scheme(model)

    def check_model(self, geometry, scheme):
        path = _folder(geometry.config)
        want = export.checkpoint_scheme(path)
        if scheme.name != want:
            raise ConfigError(f"{path} is a {want} checkpoint: pass --scheme {want} (or headline), not {scheme.name}")

    def quantize(self, lm, scheme, calib, key=None):
        path = lm.info.get("id", "")
        if not os.path.isdir(path):
            raise ConfigError("--method load evaluates a compressed-tensors checkpoint folder: pass it as --model DIR")
        origin = export.verify(path)  # an export: every file against its sha256
        plan = export.checkpoint_plan(lm, path)
        base = self.opts["base"] or ((origin or {}).get("model") or {}).get("name")
        plan.info.update(label=self.opts["label"] or None, base_model=base or None,
                         quantization_config=export.read_config(path),
                         exported_from=origin and {k: origin.get(k) for k in ("run_id", "record", "method", "scheme",
                                                                              "calibration", "versions")})
        return plan
