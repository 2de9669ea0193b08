"""``rtn``: round-to-nearest weights + dynamic per-token activation quantization, no calibration.

The usual "RTN" baseline of the W4A4 papers (QuaRot ``fake_quant/quant_utils.py`` + ``gptq_utils.py::rtn_fwrd``
without rotation): every decoder linear's weight rounded on the scheme's grid (default symmetric per output
channel, ``[-8, 7]`` at 4 bits), its input quantized per token at run time, Q/K/V as the scheme says.
Embeddings, norms and lm_head stay in floating point, as in all reference repos.
"""
from tqdm.auto import tqdm

from quantbench.errors import ConfigError
from quantbench.method import Method
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.quant import quantize
from quantbench.registry import METHODS


@METHODS.register("rtn")
class RTN(Method):
    def quantize(self, lm, scheme, calib):
        qm = QuantizedModel(lm.model, lm.adapter, scheme,
                            info={"kept_fp": ["embed_tokens", "norms", "lm_head"], "weights": "round-to-nearest"})
        for name, _, _, lin in tqdm(list(lm.adapter.named_linears()), desc="rtn: quantize weights", leave=False):
            try:
                weight = quantize(lin.weight.detach(), scheme.w) if scheme.w else None
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            qm.linears[name] = LinearPlan(weight=weight, act=scheme.a)
        for i in range(len(lm.adapter.blocks)):
            qm.attention[i] = AttentionPlan(q=scheme.q, k=scheme.k, v=scheme.v)
        return qm
