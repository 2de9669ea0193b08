"""Quantization methods, one small file each; importing this package registers them all."""
from quantbench.methods import duquant, fp16, gptq, load, normtweak, omniquant, quarot, rtn, smoothquant  # noqa: F401
