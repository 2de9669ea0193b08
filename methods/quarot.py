"""``quarot`` (RTN weights) and ``quarot-gptq``: QuaRot (Ashkboos et al., 2024; ``spcl/QuaRot:fake_quant/main.py``).

Flow as the reference: fuse the norms (on OPT: LayerNorm biases folded, the residual stream centred, the norms
turned into RMSNorms, as QuaRot's OPT path), rotate (randomized Hadamard residual ``Q`` + per-head Hadamard in v_proj +
online Hadamards on the o_proj and down_proj inputs, :mod:`quantbench.rotation`), quantize weights (RTN, or GPTQ
calibrated on the rotated, *unquantized* model with the online Hadamards active), then quantize every decoder
linear's input per token and K (after RoPE and a per-head Hadamard on Q and K) and V per the scheme. Q is never
quantized by QuaRot; lm_head, embeddings and norms stay FP.

Quantizers are QuaRot's: symmetric ``[-8, 7]`` (``scale = absmax/7``) weights per channel and activations per
token; ``--agrid asym`` / ``--kvgrid asym`` give its asymmetric grid (0 forced into range). Clip ratios default to
the code's 1.0; ``clips=paper`` uses the paper's activation 0.9 and K/V 0.95 with asymmetric K/V (QuaRot issues
#43, #55: the paper's numbers need them; their K/V group 128 is ``kvg128`` in the scheme).
"""
from dataclasses import replace

from quantbench import hadamard
from quantbench.errors import ConfigError
from quantbench.method import Method
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.registry import METHODS
from quantbench.rotation import ROTATE_MODES, fuse_norms, layernorms_to_rms, rotate
from quantbench.transforms import Hadamard
from quantbench.methods import gptq as _gptq  # noqa: F401 - registers "gptq" for the composition below
from quantbench.pipeline import compose
from quantbench.weights import round_to_nearest

QUAROT_OPTIONS = {"rotate_mode": "hadamard", "embed_mean": False, "clips": "code", "w_clip": False}


@METHODS.register("quarot")
class QuaRot(Method):
    role = "transform"
    headline = "w4a4"
    options = QUAROT_OPTIONS
    choices = {"rotate_mode": ROTATE_MODES, "clips": ("code", "paper")}
    weights_label = "rtn"
    modifies = ("embed", "norms", "linears", "final_norm", "lm_head")  # norms fused, Q fused everywhere, head untied

    def specs(self):
        s = dict(self.defaults)
        if self.opts["clips"] == "paper":
            s["a"] = replace(s["a"], clip_ratio=0.9)
            for t in "kv":
                s[t] = replace(s[t], grid="asym", clip_ratio=0.95)
        return s

    def check_model(self, geometry, scheme):
        """The Hadamards QuaRot needs (``rotation.rotate``): residual (in hadamard mode), down_proj input,
        per head; the o_proj one falls back to a full transform when the head count has none. BLOOM is refused."""
        if geometry.FAMILY == "bloom":
            raise ConfigError(
                "quarot cannot rotate BLOOM: its word_embeddings_layernorm sits between the embedding table and the "
                "residual stream, so neither the rotation nor the mean-centring folds into the table (it would need "
                "an FP d x d linear after that norm), the per-head v Hadamard would have to act inside the fused "
                "query_key_value rows, and K's Hadamard needs Q/K reachable under ALiBi; QuaRot's reference runs "
                "Llama and OPT only. Supported: llama, mistral, qwen2, opt")
        sizes = {"head_dim": geometry.head_dim, "intermediate_size": geometry.intermediate_size}
        if self.opts["rotate_mode"] == "hadamard":
            sizes["hidden_size"] = geometry.hidden_size
        for what, n in sizes.items():
            try:
                hadamard.factor(n)
            except ConfigError as e:
                raise ConfigError(f"quarot: {what} {n}: {e}") from None

    def prepare(self, lm, scheme, calib):
        ad = lm.adapter
        info = {"weights": self.weights_label, **fuse_norms(ad, self.opts["embed_mean"])}
        self.restructure(lm)
        online, rot_info = rotate(ad, self.opts["rotate_mode"], self.seed)
        info.update(rot_info, kept_fp=["embed_tokens", "lm_head", "q (QuaRot keeps Q in FP16)"])
        qm = QuantizedModel(lm.model, ad, scheme, info=info)
        for name, _, _, _ in ad.named_linears():
            qm.linears[name] = LinearPlan(weight=None, pre=online.get(name, []), act=scheme.a)
        qk = Hadamard(ad.head_dim) if scheme.k else None  # QKRotationWrapper: only when K is quantized
        for i in range(len(ad.blocks)):
            qm.attention[i] = AttentionPlan(q=scheme.q, k=scheme.k, v=scheme.v, qk_pre=qk)
        return qm

    def restructure(self, lm):
        """LayerNorm models: the norms become RMSNorms and lm_head gets a bias (:func:`rotation.layernorms_to_rms`)."""
        return layernorms_to_rms(lm.adapter)

    def quantize_weights(self, qm, spec, calib, key=None):
        round_to_nearest(qm, spec, clip_search=self.opts["w_clip"])

    def quantize_block(self, qm, spec, ctx):
        round_to_nearest(qm, spec, clip_search=self.opts["w_clip"], block=ctx.index)


@METHODS.register("quarot-gptq")
class QuaRotGPTQ(compose("quarot+gptq")):
    """The rotation, then GPTQ calibrated on the rotated (unquantized) model: the pipeline ``quarot+gptq``."""
