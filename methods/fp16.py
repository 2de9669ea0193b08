"""``fp16``: the unquantized baseline row (the model in its load dtype: fp32 on CPU, fp16 on GPU)."""
from quantbench.method import Method
from quantbench.plan import QuantizedModel
from quantbench.registry import METHODS


@METHODS.register("fp16")
class FP16(Method):
    quantizes = False
    headline = "w16a16"

    def quantize(self, lm, scheme, calib):
        return QuantizedModel(lm.model, lm.adapter, scheme, info={"quantized": "nothing"})
