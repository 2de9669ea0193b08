"""``smoothquant``: SmoothQuant (Xiao et al., 2023; ``mit-han-lab/smoothquant``).

Per-channel ``max|X|`` of every linear input over SmoothQuant's calibration recipe (512 windows x 512 tokens,
seed 42; the reference reads Pile-val documents, offline we read the selected corpus: recorded), then
``s = max|X|^α / max_{q,k,v} max|W|^(1-α)`` fused into input_layernorm → q/k/v and the same with gate/up into
post_attention_layernorm (``smooth.py::smooth_lm``); o_proj and down_proj are not smoothed. OPT and BLOOM as the
reference's own branches: self_attn_layer_norm → q/k/v and final_layer_norm → fc1 (OPT), input_layernorm →
query_key_value and post_attention_layernorm → dense_h_to_4h (BLOOM); a LayerNorm's weight *and* bias are divided
(``smooth_ln_fcs``). α comes from the
reference's per-model table (README / ``examples/ppl_eval.sh``), else the code default 0.5.

Quantizers are SmoothQuant's ``fake_quant.py`` with the bit width parametrised: per-channel symmetric absmax
weights (``±(2^(b-1)-1)``), dynamic per-token symmetric activations. The papers' W4A4 SmoothQuant rows were run
in OmniQuant's harness (asymmetric min/max grids: ``--wgrid minmax --agrid minmax`` here); the default here is
SmoothQuant's own quantizer. Its ``quantize_bmm_input`` (Q/K/V at 8 bits) is ``q8kv8`` in the scheme.
"""
from quantbench.method import Method
from quantbench.plan import plain_plan
from quantbench.quant import QuantSpec
from quantbench.registry import METHODS
from quantbench.smoothing import fuse_into_norm, smoothquant_scales
from quantbench.stats import activation_stats
from quantbench.weights import round_to_nearest

ALPHA = {  # SmoothQuant README / examples/ppl_eval.sh (W8A8)
    "meta-llama/Llama-2-7b-hf": 0.85, "meta-llama/Llama-2-13b-hf": 0.85, "meta-llama/Llama-2-70b-hf": 0.9,
    "meta-llama/Meta-Llama-3-8B": 0.85, "meta-llama/Meta-Llama-3-70B": 0.85, "mistralai/Mistral-7B-v0.1": 0.8,
    "mistralai/Mixtral-8x7B-v0.1": 0.8, "tiiuae/falcon-7b": 0.6, "tiiuae/falcon-40b": 0.7,
    # OPT (examples/smoothquant_opt_demo.ipynb, smooth_lm(model, act_scales, 0.5)) and BLOOM: the paper's α = 0.5
    # (§5: "α = 0.5 for OPT and BLOOM"; GLM-130B 0.75)
    **{f"facebook/opt-{s}": 0.5 for s in ("125m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    **{f"bigscience/bloom-{s}": 0.5 for s in ("560m", "1b1", "1b7", "3b", "7b1")}, "bigscience/bloom": 0.5,
}
CODE_ALPHA = 0.5  # ppl_eval.py --alpha default


def alpha_for(model_id: str, given: float) -> tuple[float, str]:
    if given >= 0:
        return given, "option"
    if model_id in ALPHA:
        return ALPHA[model_id], "reference table"
    return CODE_ALPHA, "code default (model not in the reference table)"


@METHODS.register("smoothquant")
class SmoothQuant(Method):
    role = "transform"
    headline = "w8a8"
    needs_calibration = True
    weight_only = False  # smoothing migrates activation outliers into weights: it is for quantized activations
    modifies = ("norms", "linears")
    calib_defaults = {"nsamples": 512, "seqlen": 512, "seed": 42}  # calibration.py: 512 samples x 512 tokens
    options = {"alpha": -1.0}  # < 0: the per-model reference value
    ranges = {"alpha": (0, 1)}
    defaults = {t: QuantSpec(8, "sym_pm", "channel" if t == "w" else "token") for t in "waqkv"}

    def prepare(self, lm, scheme, calib):
        ad = lm.adapter
        alpha, source = alpha_for(lm.info.get("id", ""), self.opts["alpha"])
        stats = activation_stats(lm, calib.windows)
        for i, block in enumerate(ad.blocks):
            for (norm, fcs), roles in zip(ad.norm_inputs(block), (ad.ATTN_IN, ad.MLP_IN)):
                s = smoothquant_scales(stats[ad.linear_name(i, roles[0])]["absmax"], [f.weight for f in fcs], alpha)
                fuse_into_norm(norm, fcs, s)
        leaf = lambda r: ad.LINEARS[r].rsplit(".", 1)[-1]  # noqa: E731
        qm = plain_plan(lm, scheme, weights="round-to-nearest", alpha=alpha, alpha_source=source,
                        smoothed=[f"{norm} -> {','.join(roles)}"
                                  for norm, roles in zip(ad.NORMS, (ad.ATTN_IN, ad.MLP_IN))],
                        not_smoothed=[leaf(ad.ATTN_OUT), leaf(ad.MLP_OUT)])
        return qm

    def quantize_weights(self, qm, spec, calib, key=None):
        round_to_nearest(qm, spec)

    def quantize_block(self, qm, spec, ctx):
        round_to_nearest(qm, spec, block=ctx.index)
