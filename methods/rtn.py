"""``rtn``: round-to-nearest weights + dynamic per-token activation quantization, no calibration.

The usual "RTN" baseline of the W4A4 papers (QuaRot ``fake_quant/quant_utils.py`` + ``gptq_utils.py::rtn_fwrd``
without rotation): every decoder linear's weight rounded on the scheme's grid (default symmetric per output
channel, ``[-8, 7]`` at 4 bits), its input quantized per token at run time, Q/K/V as the scheme says.
Embeddings, norms and lm_head stay in floating point, as in all reference repos.
"""
from quantbench.method import Method
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.registry import METHODS
from quantbench.weights import round_to_nearest


def plain_plan(lm, scheme, **info) -> QuantizedModel:
    """Every decoder linear with the scheme's activation spec and no transform; attention as the scheme says."""
    qm = QuantizedModel(lm.model, lm.adapter, scheme, info={"kept_fp": ["embed_tokens", "norms", "lm_head"], **info})
    for name, _, _, _ in lm.adapter.named_linears():
        qm.linears[name] = LinearPlan(weight=None, act=scheme.a)
    for i in range(len(lm.adapter.blocks)):
        qm.attention[i] = AttentionPlan(q=scheme.q, k=scheme.k, v=scheme.v)
    return qm


@METHODS.register("rtn")
class RTN(Method):
    def quantize(self, lm, scheme, calib):
        qm = plain_plan(lm, scheme, weights="round-to-nearest")
        if scheme.w:
            round_to_nearest(qm, scheme.w)
        return qm
