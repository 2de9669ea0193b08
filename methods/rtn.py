"""``rtn``: round-to-nearest weights + dynamic per-token activation quantization, no calibration.

The usual "RTN" baseline of the W4A4 papers (QuaRot ``fake_quant/quant_utils.py`` + ``gptq_utils.py::rtn_fwrd``
without rotation): every decoder linear's weight rounded on the scheme's grid (default symmetric per output
channel, ``[-8, 7]`` at 4 bits), its input quantized per token at run time, Q/K/V as the scheme says.
Embeddings, norms and lm_head stay in floating point, as in all reference repos.
"""
from quantbench.method import Method
from quantbench.registry import METHODS
from quantbench.weights import round_to_nearest


@METHODS.register("rtn")
class RTN(Method):
    role = "weights"
    weights_label = "round-to-nearest"

    def quantize_weights(self, qm, spec, calib, key=None):
        round_to_nearest(qm, spec)

    def quantize_block(self, qm, spec, ctx):
        round_to_nearest(qm, spec, block=ctx.index)
