"""``gptq``: GPTQ weights (Frantar et al., 2023) + the scheme's dynamic activation quantization, no rotation.

Weights follow ``quantbench.weights.gptq`` (QuaRot's vendored ``GPTQ.fasterquant`` + ``gptq_fwrd``): 128 windows
x 2048 tokens of calibration by default, percdamp 0.01, block size 128, true-sequential groups, lm_head skipped.
The grid is the suite's default (QuaRot symmetric ``[-8, 7]`` per channel) so ``gptq`` and ``rtn`` rows differ
only in rounding; ``--wgrid asym`` gives GPTQ's asymmetric min/max grid (zero forced into range).
"""
from quantbench.method import Method
from quantbench.registry import METHODS
from quantbench.weights import GPTQ_OPTIONS, GPTQ_RANGES, gptq, gptq_block, gptq_config


@METHODS.register("gptq")
class GPTQ(Method):
    role = "weights"
    needs_calibration = True
    modifies = ("linears",)  # each linear holds its dequantized codes afterwards (what the next block sees)
    options = GPTQ_OPTIONS
    ranges = GPTQ_RANGES

    def quantize_weights(self, qm, spec, calib, key=None):
        qm.info.update(gptq(qm, calib.windows, spec, gptq_config(self.opts), self.device, key))

    def quantize_block(self, qm, spec, ctx):
        qm.info.setdefault("gptq", gptq_config(self.opts).to_dict())
        gptq_block(qm, ctx, spec, gptq_config(self.opts))
